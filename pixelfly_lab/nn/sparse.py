"""Block-sparse and masked linear layers: W supported on a fixed element mask or block layout.

``MaskedLinear`` is the slow, obviously correct reference (dense storage times a mask);
``BlockSparseLinear`` stores only the kept (b x b) blocks and runs the block-sparse kernels of
:mod:`pixelfly_lab.ops.matmul`, its layout registered once at construction. Both project a dense
weight on their support exactly (the best fit in Frobenius norm keeps W0 on the support).

Paper: Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029 (block-aligned
sparsity, Sec. 4).

Example:
    >>> layer = BlockSparseLinear(64, 64, torch.eye(4, dtype=torch.bool), block_size=16)
    >>> layer.weight_params
    1024
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_lab._checks import check_divides, check_int
from pixelfly_lab.nn.base import LinearPart, StructuredLinear, ambient_device, uniform_
from pixelfly_lab.ops.matmul import (BACKENDS, block_sparse_matmul, blocks_to_dense, dense_to_blocks, register_layout,
                                     registered_layout)
from pixelfly_lab.structure.masks import layout_to_mask

__all__ = ["MaskedLinear", "BlockSparseLinear"]


class MaskedLinear(StructuredLinear):
    """Dense storage times a fixed element mask: the slow, obviously correct reference.

    W = weight * mask. Off-mask entries start at zero and receive zero gradient, so optimisers
    with decoupled weight decay (AdamW) keep them at zero.

    Args:
        in_features, out_features: sizes.
        mask: bool (out_features, in_features).
        bias: learn a bias.

    Init: each row r of the kept entries ~ U(-a, a) * sqrt(in / nnz_r) with a = 1/sqrt(in), so
    every output has the variance it would have in a dense nn.Linear. ``project_(W0)``: W0 on
    the mask.
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask must be a tensor of shape (out_features, in_features)="
                             f"{(out_features, in_features)}, got {tuple(getattr(mask, 'shape', ()))}")
        if mask.is_meta:
            raise ValueError("mask must hold values (build it on the CPU); the layer may live on 'meta'")
        # a host copy: reset_parameters restores the buffer after to_empty(), and weight_params
        # needs no device read
        self._mask_source = mask.detach().to("cpu", torch.bool).clone()
        self._nnz = int(self._mask_source.sum())
        self.register_buffer("mask", self._mask_source.to(ambient_device(device)))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self._make_bias(bias, factory)
        self.reset_parameters()

    @property
    def weight(self) -> torch.Tensor:
        """Parameter (out_features, in_features): the stored weight (W = weight * mask)."""
        try:
            return self._parameters["weight"]
        except KeyError:
            raise AttributeError("weight") from None

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            self.mask.copy_(self._mask_source)

    def _reset_weight(self) -> None:
        """Re-draw the weight (see the class docstring)."""
        with torch.no_grad():
            nnz_row = self._mask_source.sum(1, keepdim=True).clamp(min=1).to(self.weight.device)
            uniform_(self.weight, (self.in_features / nnz_row).sqrt() / math.sqrt(self.in_features))
            self.weight.mul_(self.mask)

    def _scale_weight(self, c: float) -> None:
        self.weight.mul_(c)

    def _project(self, work):
        """W = ``work`` on the mask (the best fit on a support); the residual is ``work`` off it."""
        mask = self._mask_source.to(work.device)
        self.weight.copy_(work * mask)
        return work * ~mask

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        mask = state_dict.get(prefix + "mask")
        if isinstance(mask, torch.Tensor) and not mask.is_meta:  # a new mask: read it once, here
            self._mask_source = mask.detach().to("cpu", torch.bool).clone()
            self._nnz = int(self._mask_source.sum())

    def _forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)

    def dense_weight(self):
        return self.weight * self.mask

    @property
    def weight_params(self):
        return self._nnz


class BlockSparseLinear(StructuredLinear):
    """y = x W^T + bias with W stored as its nonzero (b x b) blocks on a fixed block layout.

    Args:
        in_features, out_features: sizes, divisible by ``block_size``.
        layout: bool (out_features / block_size, in_features / block_size).
        block_size: block edge b.
        bias: learn a bias.
        backend: kernel backend ('auto', 'torch', 'reference', 'triton'; see
            :mod:`pixelfly_lab.ops.matmul`); an attribute, changeable at any time.

    Attributes:
        values: Parameter (nnz, b, b), block k = the k-th True entry of ``layout`` (row-major).
        layout, block_size, backend.

    Init (as the released Pixelfly code): blocks ~ U(-1/sqrt(in), 1/sqrt(in)) like a dense
    layer, then block row i scaled by sqrt(C / nnz_i) (C blocks per row, nnz_i kept), so each
    output's variance matches nn.Linear's. ``project_(W0)``: W0's blocks on the layout.
    """

    def __init__(self, in_features: int, out_features: int, layout: torch.Tensor, block_size: int,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.block_size = check_int("block_size", block_size)
        check_divides("block_size", block_size, in_features, out_features)
        shape = (out_features // block_size, in_features // block_size)
        if not isinstance(layout, torch.Tensor) or tuple(layout.shape) != shape:
            raise ValueError(f"layout must be a tensor of shape (out/b, in/b)={shape}, "
                             f"got {tuple(getattr(layout, 'shape', ()))}")
        if layout.is_meta:
            raise ValueError("layout must hold values (build it on the CPU); the layer may live on 'meta'")
        # validated and read to the host once, here: the kernels get its key, so no forward or
        # backward reads the layout back (no device sync; torch.compile traces without breaks)
        self._layout_key = register_layout(layout.to(torch.bool), block_size)
        self.register_buffer("layout", registered_layout(self._layout_key).layout.to(ambient_device(device)))
        self.backend = backend
        nnz = registered_layout(self._layout_key).nnz
        self.values = nn.Parameter(torch.empty(nnz, block_size, block_size, **factory))
        self._make_bias(bias, factory)
        self.reset_parameters()

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            self.layout.copy_(registered_layout(self._layout_key).layout)

    def _reset_weight(self) -> None:
        """Re-draw the blocks (see the class docstring)."""
        layout = registered_layout(self._layout_key).layout
        row_of_block = layout.nonzero()[:, 0]
        nnz_row = layout.sum(1)[row_of_block].double()
        scale = (layout.shape[1] / nnz_row).sqrt() / math.sqrt(self.in_features)
        with torch.no_grad():
            uniform_(self.values, scale[:, None, None].to(self.values.device, self.values.dtype))

    def _scale_weight(self, c: float) -> None:
        self.values.mul_(c)

    def _project(self, work):
        """The blocks = ``work`` on the layout (the best fit on a support); the residual is off it."""
        layout = registered_layout(self._layout_key).layout
        self.values.copy_(dense_to_blocks(work, layout.to(work.device), self.block_size))
        return work * ~layout_to_mask(layout, self.block_size).to(work.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        layout = state_dict.get(prefix + "layout")
        if isinstance(layout, torch.Tensor) and not layout.is_meta:  # validate a new layout once, here
            key = register_layout(layout.to(torch.bool), self.block_size)
            if tuple(layout.shape) != tuple(self.layout.shape):
                raise ValueError(f"{prefix}layout has shape {tuple(layout.shape)}, the layer's is "
                                 f"{tuple(self.layout.shape)}")
            self._layout_key = key
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setstate__(self, state):
        """Unpickling (torch.save of a whole model, copy.deepcopy, spawned workers): the layout key
        is this process's, so the layout buffer that came with the state is registered again."""
        super().__setstate__(state)
        if not self.layout.is_meta:
            self._layout_key = register_layout(self.layout, self.block_size)

    def linear_parts(self) -> list[LinearPart]:
        """One block-sparse part: ``values`` on the (host) layout."""
        return [LinearPart("block_sparse", ("values",), registered_layout(self._layout_key).layout, self.block_size)]

    @property
    def layout_key(self):
        """The layout's key in :mod:`pixelfly_lab.ops.registry` (what every kernel call takes)."""
        return self._layout_key

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def _forward(self, x):
        return block_sparse_matmul(x, self.values, self.layout, self.bias, backend=self.backend,
                                   layout_key=self._layout_key)

    def dense_weight(self):
        return blocks_to_dense(self.values, self.layout)

    def mask(self) -> torch.Tensor:
        """bool (out_features, in_features): the element support of W."""
        return layout_to_mask(self.layout, self.block_size)

    @property
    def weight_params(self):
        return self.values.numel()

    def extra_repr(self):
        return (f"{super().extra_repr()}, block_size={self.block_size}, "
                f"blocks={registered_layout(self._layout_key).nnz}/{self.layout.numel()}, "
                f"backend={self.backend!r}")
