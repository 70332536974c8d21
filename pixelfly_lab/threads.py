"""Run a block of code on a given number of torch CPU threads, restoring the count afterwards.

Tiny models and small matrices run fastest on one thread on a shared machine: a second thread
mostly waits on the first at every op, and costs several times over when the cores are busy.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["num_threads"]


@contextmanager
def num_threads(n: int | None):
    """Use ``n`` torch threads inside the block (None: leave the count as it is)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
