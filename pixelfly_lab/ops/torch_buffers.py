"""Retained output buffers for the 'torch' path's large outputs (:func:`new_output`).

glibc maps every allocation above its mmap threshold afresh and unmaps it on free, so a layer's
large output would be page-faulted in again on every call; buffers of :data:`POOL_MIN_BYTES` and
more are kept and handed out again once nothing references them. :func:`release_buffers` gives
the memory back. Tested in tests/test_torch_kernels.py.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["POOL_MIN_BYTES", "POOL_PER_SIZE", "new_output", "release_buffers"]

# Outputs at least this large come from retained buffers. glibc serves every allocation above
# its largest mmap threshold (32 MB on 64-bit) with a fresh mmap and unmaps it on free, so each
# call of a layer would otherwise page-fault its whole output in again: ~25 ms for the 64 MB y of
# x (4096, 1024) -> 4096, a quarter of the sparse forward's time. Smaller blocks are recycled by
# glibc's heap already, and other allocators (jemalloc, tcmalloc) retain memory themselves.
POOL_MIN_BYTES = 32 * 2 ** 20
# Retained buffers per size: a layer's output and the gradient of its input, alive at once in a
# training step, each twice (an output still referenced while the next call runs). Buffers in
# use are never handed out again; when all are, a fresh (unretained) one is allocated.
POOL_PER_SIZE = 4

_POOL: dict[int, list[torch.UntypedStorage]] = {}
_POOL_LOCK = threading.Lock()


# references to a storage (tensors, views, autograd records); a private torch helper since 2.0
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(storage: torch.UntypedStorage) -> int:
    return _USE_COUNT(storage._cdata)


def new_output(shape: tuple[int, ...], like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """An uninitialised (zeroed with ``zero``) tensor of ``shape`` with like's dtype and device.

    CPU tensors of at least :data:`POOL_MIN_BYTES` reuse a retained buffer nobody references
    any more (its storage's use count is the pool's alone): the caller owns the returned tensor
    exactly as a fresh one, since a buffer is only reused after every tensor, view and autograd
    record of it is gone. :func:`release_buffers` gives the retained memory back.
    """
    nbytes = like.element_size() * math.prod(shape)
    if like.device.type != "cpu" or nbytes < POOL_MIN_BYTES or _USE_COUNT is None:
        return like.new_zeros(shape) if zero else like.new_empty(shape)
    with _POOL_LOCK:
        buffers = _POOL.setdefault(nbytes, [])
        storage = next((s for s in buffers if _use_count(s) == 1), None)
        if storage is None:
            storage = torch.UntypedStorage(nbytes)
            if len(buffers) < POOL_PER_SIZE:
                buffers.append(storage)
        out = like.new_empty(0).set_(storage, 0, shape)
    return out.zero_() if zero else out


def release_buffers() -> int:
    """Drop the retained output buffers (see :data:`POOL_MIN_BYTES`); return the bytes released
    from the pool (memory still referenced by live tensors is freed when they are).

    Example:
        >>> release_buffers() >= 0
        True
    """
    with _POOL_LOCK:
        released = sum(s.nbytes() for buffers in _POOL.values() for s in buffers)
        _POOL.clear()
    return released

