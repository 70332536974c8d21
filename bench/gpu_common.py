"""What bench/gpu_bench.py and bench/gpu_train.py share: the torch probe and the report files."""

from __future__ import annotations

import sys
from pathlib import Path


def cuda_torch(name: str, smoke: bool):
    """torch, or None (with the reason on stderr) when it does not import or, unless ``smoke``,
    sees no CUDA GPU: the caller then exits 2, and bench/gpu_run.sh tries the next python."""
    try:
        import torch
    except ImportError:
        print(f"{name}: torch does not import in {sys.executable}", file=sys.stderr)
        return None
    if not smoke and not torch.cuda.is_available():
        print(f"{name}: no CUDA GPU visible to torch (use --smoke on a CPU machine)", file=sys.stderr)
        return None
    return torch


class Report:
    """The full log to ``out/<name>.log``; summary lines also to stdout, kept under 8 KB in all."""

    def __init__(self, out: Path, name: str):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{name}.log"
        self.log_file = open(self.path, "w")
        self.summary_bytes = 0

    def log(self, text: str) -> None:
        self.log_file.write(text + "\n")
        self.log_file.flush()

    def say(self, text: str) -> None:
        self.log(text)
        if self.summary_bytes + len(text) < 7800:
            print(text, flush=True)
        self.summary_bytes += len(text) + 1
