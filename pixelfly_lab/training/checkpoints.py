"""Checkpoints and output files of a training run, written atomically.

Every file the loop writes goes through :func:`atomic_write` (a temporary file in the same folder,
fsync, then rename), so an interrupted run leaves either the old file or the new one, never half
of one. :func:`load_checkpoint` refuses a checkpoint whose config differs from the run's in any
field but those a resumed run may change (:data:`pixelfly_lab.training.config.RUN_ONLY`).

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "note.txt", lambda f: f.write(b"done"))
    >>> (folder / "note.txt").read_text()
    'done'
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from pixelfly_lab.training.config import RUN_ONLY, TrainConfig

__all__ = ["CHECKPOINT", "atomic_write", "load_checkpoint", "write_tables"]

CHECKPOINT = "checkpoint.pt"


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: TrainConfig) -> dict:
    """The state saved at ``path``; ValueError if unreadable or saved by a run with another config."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                         "delete it or run without resume") from None
    saved = state.get("config", {})
    changed = {f.name for f in fields(config) if f.name not in RUN_ONLY
               and saved.get(f.name) != getattr(config, f.name)}
    if changed:
        details = ", ".join(f"{n}: {saved.get(n)!r} -> {getattr(config, n)!r}" for n in sorted(changed))
        raise ValueError(f"cannot resume {path}: the config changed ({details})")
    return state


def write_tables(out: Path, history: list, ranks: list) -> None:
    """Write history.csv and ranks.csv (lists of row dicts) into ``out``."""
    for name, rows in (("history.csv", history), ("ranks.csv", ranks)):
        atomic_write(out / name, lambda f, rows=rows: f.write(pd.DataFrame(rows).to_csv(index=False).encode()))
