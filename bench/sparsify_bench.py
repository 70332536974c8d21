"""Benchmark: wall time of ``sparsify`` on a GPT-2-small-sized model, one thread.

The model is Hugging Face's GPT-2 built from a config (12 layers, width 768, GPT-2's vocabulary,
no download; ``transformers`` is a test requirement): 48 Conv1D layers (c_attn 768 -> 2304,
c_proj 768 -> 768, c_fc 768 -> 3072, c_proj 3072 -> 768) plus the tied lm_head, which stays
dense. Without ``transformers`` it falls back to pixelfly_lab's own GPT at the 'gpt2-small'
preset. Each init mode is timed ``--repeats`` times on a fresh copy of the model (deep copies
made before the clock starts); the medians of wall time and of this process's CPU time are
printed (on a shared, loaded machine the CPU time is the fairer figure: it leaves out the time
spent waiting for a core). The target (issue 15): under 2 s.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/sparsify_bench.py [--repeats 3] [--budget 0.25]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from pixelfly_lab.nn.sparsification import INITS, sparsify


def gpt2_small() -> tuple[nn.Module, str]:
    """GPT-2 small (124M) built from its config, or pixelfly_lab's GPT-2-small-shaped stand-in."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        from types import SimpleNamespace

        from pixelfly_lab.training.models import build_model
        data = SimpleNamespace(name="chars", kind="tokens", task="lm", input_shape=(1024,), n_outputs=50257,
                               vocab_size=50257)
        return build_model("gpt", data, size="gpt2-small"), "pixelfly_lab GPT (gpt2-small preset)"
    return GPT2LMHeadModel(GPT2Config()), "transformers GPT2LMHeadModel(GPT2Config())"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, what = gpt2_small()
    print(f"model: {what}; torch {torch.__version__}, 1 thread, budget {args.budget}")
    for init in INITS:
        copies = [copy.deepcopy(model) for _ in range(args.repeats)]
        wall, cpu = [], []
        for fresh in copies:
            start, start_cpu = time.perf_counter(), time.process_time()
            report = sparsify(fresh, "pixelfly", budget=args.budget, block_size=32, init=init, progress=False)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        print(f"init={init:8s} wall median {statistics.median(wall):.2f} s (min {min(wall):.2f}), "
              f"CPU median {statistics.median(cpu):.2f} s (min {min(cpu):.2f}) over {args.repeats}; "
              f"replaced {int(report['replaced'].sum())} of {len(report)} layers, "
              f"budget {report.attrs['budget']:.3f}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
