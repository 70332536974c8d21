"""The layout registry: every block layout validated, keyed and planned once.

A block-sparse op never looks at a layout's bytes on its own: the layout is registered once (a
layer does it at construction and when a state dict is loaded), the op takes the integer key,
and whatever an op derives from a layout (the CPU path's GEMM plan, Triton's index tables, the
attention path's buckets) is built on first use and cached here per (key, what, device). A
forward or backward therefore reads nothing from the host and plans nothing.

Registration reads the layout to the host (a device sync if it lives on a GPU); call it where a
layout is created or changed, never per call. Registered layouts stay for the life of the
process (a model has few layouts; equal layouts share one key).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

__all__ = ["BLOCK_SIZES", "RegisteredLayout", "register_layout", "registered_layout", "derived",
           "registered_count", "derived_count"]

# The block sizes the Triton kernels take (tl.dot needs tiles >= 16; above 128 a block no longer
# fits a tile). One tuple, read by dispatch (no triton import needed), the kernels and the
# compile check.
BLOCK_SIZES = (16, 32, 64, 128)

T = TypeVar("T")


@dataclass(frozen=True)
class RegisteredLayout:
    """A validated block layout, as the ops know it (by ``key``).

    Attributes:
        key: the int the ops take; equal layouts (same content and block size) share one key.
        layout: bool (R, C) on the CPU (a private copy; never changed).
        block_size: b.
        nnz: number of True entries (blocks stored).
    """

    key: int
    layout: torch.Tensor
    block_size: int
    nnz: int

    @property
    def out_features(self) -> int:
        return self.layout.shape[0] * self.block_size

    @property
    def in_features(self) -> int:
        return self.layout.shape[1] * self.block_size


_LOCK = threading.Lock()
_ENTRIES: list[RegisteredLayout] = []
_KEYS: dict[tuple, int] = {}
_DERIVED: dict[tuple, object] = {}
_BUILDS = [0]   # derived objects built so far (a race may build one twice; one is kept)


def register_layout(layout: torch.Tensor, block_size: int) -> int:
    """Validate ``layout`` once and return its key for the block-sparse ops.

    Args:
        layout: bool (R, C) on any device but 'meta'.
        block_size: positive int b.

    Returns:
        int key; :func:`registered_layout` gives back its :class:`RegisteredLayout`.

    Example:
        >>> key = register_layout(torch.eye(2, dtype=torch.bool), 4)
        >>> registered_layout(key).nnz
        2
    """
    if not isinstance(layout, torch.Tensor) or layout.dim() != 2 or layout.dtype != torch.bool:
        raise ValueError("layout must be a 2-D bool tensor (out_features/b, in_features/b), got "
                         f"{getattr(layout, 'dtype', type(layout).__name__)} of shape "
                         f"{tuple(getattr(layout, 'shape', ()))}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if layout.is_meta:
        raise ValueError("layout is on the meta device (no values to read): register the layout "
                         "it was built from")
    cpu = layout.detach().to("cpu").contiguous()
    content = (tuple(cpu.shape), block_size, cpu.numpy().tobytes())
    with _LOCK:
        key = _KEYS.get(content)
        if key is None:
            key = len(_ENTRIES)
            _ENTRIES.append(RegisteredLayout(key, cpu.clone(), block_size, int(cpu.sum())))
            _KEYS[content] = key
    return key


def registered_layout(key: int) -> RegisteredLayout:
    """The :class:`RegisteredLayout` of a key from :func:`register_layout`."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(_ENTRIES):
        raise ValueError(f"layout_key must be a key from register_layout, got {key!r}")
    return _ENTRIES[key]


def registered_count() -> int:
    """How many distinct layouts are registered (tests count plans with it)."""
    return len(_ENTRIES)


def derived_count() -> int:
    """How many derived objects (plans, index tables, ...) have been built: a forward or backward
    of a layer that ran once builds none (tests count with it)."""
    return _BUILDS[0]


def derived(key: int, what: str, build: Callable[[RegisteredLayout], T], device: torch.device | str | None = None) -> T:
    """What an op derives from a registered layout, built once per (key, what, device) and cached.

    Args:
        key: a key from :func:`register_layout`.
        what: a name for the derived object, unique per op (e.g. ``'torch_plan'``, ``'triton_tables'``).
        build: ``build(entry)`` (or ``build(entry, device)`` when ``device`` is given) makes it.
        device: the device the derived tensors live on; ``None`` for host-side objects.

    Returns:
        the cached object.
    """
    dev = None if device is None else str(torch.device(device))
    slot = (key, what, dev)
    found = _DERIVED.get(slot)
    if found is None:
        entry = registered_layout(key)
        found = build(entry) if device is None else build(entry, torch.device(device))
        with _LOCK:
            _BUILDS[0] += 1
            found = _DERIVED.setdefault(slot, found)
    return found
