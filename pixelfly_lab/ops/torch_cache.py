"""Tensors derived from a weight, kept between calls while the weight is unchanged.

The 'torch' path packs a layer's blocks into its GEMM layout (:meth:`pixelfly_lab.ops.torch_plan.Plan.packed_all`:
a gather and a permuting copy, ~1-1.5 ms per call at the released configuration 1024 -> 4096 on
one core) in the forward and again, in the other orientation, in the backward.
:func:`derived_tensor` keeps such a derived tensor until its source changes, so a backward reuses
its forward's packing, and calls without a weight update between them (inference, benchmarks)
pack once.

When a cached tensor is still right: an entry is keyed by its source's address, shape, strides
and dtype, and holds its source (so that address is not handed to another tensor while the entry
lives) and a snapshot of the source's values. A hit needs the source's version counter
(``Tensor._version``, which every in-place write through the tensor or a view of it increments:
an optimizer's ``step()``, ``copy_`` under ``no_grad``) unchanged **and** its values bitwise equal
to the snapshot (``torch.equal``, a read of the weight, ~5x cheaper than packing it): writes that
bypass the counter (in-place ops on ``param.data``, as ``torch.autograd.gradcheck`` and older
training code do) are caught by the comparison. Inference tensors and tensors off the CPU are
never cached.

Tested in tests/test_torch_kernels.py (weights updated between calls by an optimizer step, by
in-place writes, through ``.data`` and by ``.data`` assignment: outputs and gradients equal the
uncached ones).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

__all__ = ["CACHE_MAX_BYTES", "derived_tensor", "clear_derived", "cached_bytes"]

# Total size of the cached tensors and snapshots (least recently used dropped first): a
# GPT-2-small-shaped model sparsified at budget 0.25 has ~20 M sparse weights, 160 MB of packed
# float32 blocks and snapshots; a bound keeps a notebook that builds many models from growing.
CACHE_MAX_BYTES = 256 * 2 ** 20

# (address, shape, strides, dtype, what) -> (version, source, snapshot, value, bytes)
_ENTRIES: OrderedDict = OrderedDict()
_LOCK = threading.Lock()
_TOTAL = [0]


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value if v is not None)


def _cacheable(source: torch.Tensor) -> bool:
    return (source.device.type == "cpu" and not source.is_inference() and type(source) in (torch.Tensor, torch.nn.Parameter)
            and not torch._C._functorch.is_functorch_wrapped_tensor(source))


def derived_tensor(source: torch.Tensor, what, build, peek: bool = False):
    """``build()`` (a tensor, or a tuple/list of tensors and None) derived from ``source`` alone,
    the same object again while ``source`` is unchanged (see the module docstring).

    Args:
        source: the weight it is derived from.
        what: hashable, names the derivation (e.g. ("packed", plan signature, transpose)).
        build: () -> the derived value; called on a miss.
        peek: only look: return the cached value or None, build and store nothing.

    Returns:
        The cached or freshly built value. Callers must not write into it.

    Example:
        >>> w = torch.ones(3)
        >>> a = derived_tensor(w, "double", lambda: w * 2)
        >>> a is derived_tensor(w, "double", lambda: w * 2)
        True
        >>> with torch.no_grad():
        ...     _ = w.add_(1)
        >>> derived_tensor(w, "double", lambda: w * 2).tolist()
        [4.0, 4.0, 4.0]
    """
    if not _cacheable(source):
        return None if peek else build()
    key = (source.data_ptr(), tuple(source.shape), source.stride(), source.dtype, what)
    version = source._version
    with _LOCK:
        entry = _ENTRIES.get(key)
    if entry is not None and entry[0] == version and torch.equal(entry[2], source.detach()):
        with _LOCK:
            if key in _ENTRIES:
                _ENTRIES.move_to_end(key)
        return entry[3]
    if peek:
        return None
    with torch.no_grad():
        snapshot = source.detach().clone()
        value = build()
    size = _nbytes(value) + _nbytes(snapshot)
    if size > CACHE_MAX_BYTES:
        return value
    with _LOCK:
        old = _ENTRIES.pop(key, None)
        if old is not None:
            _TOTAL[0] -= old[4]
        _ENTRIES[key] = (version, source, snapshot, value, size)
        _TOTAL[0] += size
        while _TOTAL[0] > CACHE_MAX_BYTES:
            _, dropped = _ENTRIES.popitem(last=False)
            _TOTAL[0] -= dropped[4]
    return value


def clear_derived() -> int:
    """Drop every cached tensor; return the bytes dropped.

    Example:
        >>> clear_derived() >= 0
        True
    """
    with _LOCK:
        dropped = _TOTAL[0]
        _ENTRIES.clear()
        _TOTAL[0] = 0
    return dropped


def cached_bytes() -> int:
    """Bytes held by the cached tensors now."""
    return _TOTAL[0]
