"""The GEMM plan of the 'torch' path (:mod:`pixelfly_lab.ops.torch_kernels`): a block layout cut into
groups of consecutive block rows that read the same block columns, one dense GEMM each.

A flat block butterfly has butterfly_size such groups (every block row of a cell row shares its
set). :func:`plan_for` chooses the orientation (layout or layout^T, whichever gathers fewer
columns) and, for 16-bit inputs, merges consecutive groups into *padded* ones (zero blocks where a
row stores none) so that inputs are views and outputs are written once. Plans are index
arithmetic on the host, built once per (layout, device) by the layout registry
(:func:`pixelfly_lab.ops.registry.derived`).

Reference: the Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 4); this
grouping is ours. Tested in tests/test_torch_kernels.py (scatter pieces against replayed coverage).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["Plan", "plan_for", "PAD_FILL", "row_bucket"]


@dataclass(frozen=True)
class _Group:
    """Consecutive plan rows [r0, r1) sharing the nonzero column ``runs``: one GEMM."""

    r0: int                                  # element offsets of the rows
    r1: int
    runs: tuple[tuple[int, int], ...]        # element column runs [c0, c1), in order
    vidx: torch.Tensor                       # long (rows_in_group, k) on the CPU: storage index of each
    #                                          block, -1 for a zero block of a padded group
    # vidx.flatten() on the plan's device (-1 as 0), copied once when the plan is built (a CPU ->
    # GPU copy per call would stall the host); the registry caches one plan per (layout, device)
    index: torch.Tensor
    # padded groups only (else None), on the plan's device: positions in vidx.flatten() of the
    # zero blocks, and of the stored ones with their storage indices
    zero_at: torch.Tensor | None = None
    stored_at: torch.Tensor | None = None
    stored_index: torch.Tensor | None = None

    def flat_index(self, device: torch.device) -> torch.Tensor:
        """vidx.flatten() on ``device`` (the plan's own copy when it is on that device)."""
        return self.index if self.index.device == torch.device(device) else self.index.to(device)

    @property
    def width(self) -> int:
        """Columns the group reads: k * b."""
        return sum(c1 - c0 for c0, c1 in self.runs)


@dataclass(frozen=True)
class Plan:
    """How the 'torch' path cuts a layout into GEMMs (cached per layout; see :func:`plan_for`).

    Attributes:
        transposed: False: rows are W's block rows, x is gathered, y written slice by slice
            ("gather" forward). True: rows are W's block columns (the plan of layout^T), x is read
            in slices and each product added into y's column runs ("scatter" forward).
        groups: maximal runs of consecutive plan rows with identical nonzero column sets.
        block_size: b.
        covers_once: the groups' column runs tile all columns exactly once (a block-diagonal
            layout), so "scatter" products are written instead of added onto zeros.
        columns: element columns of the gathered (or scattered) side.
    """

    transposed: bool
    groups: tuple[_Group, ...]
    block_size: int
    covers_once: bool
    columns: int = 0        # element columns of the gathered side (in_features, or out if transposed)

    def packed(self, values: torch.Tensor, g: _Group, transpose: bool = False) -> torch.Tensor:
        """M_g: the group's blocks as one dense (rows*b, k*b) matrix of W (of W^T if the plan is
        transposed); with ``transpose``, M_g^T as a contiguous (k*b, rows*b) matrix, the fast right
        operand of a GEMM."""
        n_rows, k = g.vidx.shape
        b = self.block_size
        blocks = values.index_select(0, g.flat_index(values.device))
        if g.zero_at is not None:   # a padded group: its absent blocks are zeros
            blocks.index_fill_(0, g.zero_at.to(values.device), 0)
        blocks = blocks.view(n_rows, k, b, b)
        if transpose:
            order, shape = ((1, 2, 0, 3) if self.transposed else (1, 3, 0, 2)), (k * b, n_rows * b)
        else:
            order, shape = ((0, 3, 1, 2) if self.transposed else (0, 2, 1, 3)), (n_rows * b, k * b)
        return blocks.permute(*order).reshape(shape)

    @cached_property
    def stacked_index(self) -> torch.Tensor | None:
        """Every group's block indices side by side, when all groups have the same (rows, k) and
        store every block (a flat block butterfly): then one gather packs all of them
        (:meth:`packed_all`) and one copy unpacks their gradients (:meth:`store_grads`). Else None."""
        first = self.groups[0] if self.groups else None
        if first is None or any(not g.runs or g.zero_at is not None or g.vidx.shape != first.vidx.shape
                                or g.r0 != i * (first.r1 - first.r0) for i, g in enumerate(self.groups)):
            return None
        return torch.cat([g.index for g in self.groups])

    def packed_all(self, values: torch.Tensor, transpose: bool = False) -> list:
        """[:meth:`packed` (values, g, transpose) for each group] (None for a group without blocks);
        with :attr:`stacked_index`, one gather and one copy for all, the groups views of it."""
        index = self.stacked_index
        if index is None:
            return [self.packed(values, g, transpose) if g.runs else None for g in self.groups]
        n_rows, k = self.groups[0].vidx.shape
        b, count = self.block_size, len(self.groups)
        blocks = values.index_select(0, index.to(values.device)).view(count, n_rows, k, b, b)
        if transpose:
            order, shape = ((0, 2, 3, 1, 4) if self.transposed else (0, 2, 4, 1, 3)), (count, k * b, n_rows * b)
        else:
            order, shape = ((0, 1, 4, 2, 3) if self.transposed else (0, 1, 3, 2, 4)), (count, n_rows * b, k * b)
        return list(blocks.permute(*order).reshape(shape).unbind(0))

    def store_grads(self, grad: torch.Tensor, grad_mt: torch.Tensor) -> None:
        """:meth:`store_grad` of every group at once (plans with :attr:`stacked_index`): ``grad_mt``
        (groups, k*b (+ extra rows, ignored), rows*b) holds each group's M_g gradient transposed."""
        n_rows, k = self.groups[0].vidx.shape
        b, count = self.block_size, len(self.groups)
        order = (0, 1, 3, 4, 2) if self.transposed else (0, 1, 3, 2, 4)
        blocks = grad_mt[:, :k * b].transpose(1, 2).reshape(count, n_rows, b, k, b).permute(*order)
        grad.index_copy_(0, self.stacked_index.to(grad.device), blocks.reshape(count * n_rows * k, b, b))

    @cached_property
    def scatter_pieces(self) -> tuple[tuple[tuple[int, int, int, bool], ...], tuple[tuple[int, int], ...]]:
        """How the groups' products, taken in order, land on the columns they cover: per group
        (offset in the product, c0, c1, write) pieces, ``write`` where no earlier group covered
        those columns (so no output needs zeroing first, and the first product is copied, not
        added); and the column runs no group covers (to be zeroed).
        """
        b = self.block_size
        covered = [False] * (self.columns // b)
        per_group = []
        for g in self.groups:
            pieces, offset = [], 0
            for c0, c1 in g.runs:
                for blk in range(c0 // b, c1 // b):   # split the run where "covered" changes
                    write = not covered[blk]
                    covered[blk] = True
                    lo = offset + blk * b - c0
                    if pieces and pieces[-1][3] == write and pieces[-1][2] == blk * b:
                        pieces[-1] = (pieces[-1][0], pieces[-1][1], (blk + 1) * b, write)
                    else:
                        pieces.append((lo, blk * b, (blk + 1) * b, write))
                offset += c1 - c0
            per_group.append(tuple(pieces))
        holes = tuple((blk * b, (blk + 1) * b) for blk, done in enumerate(covered) if not done)
        return tuple(per_group), holes

    @cached_property
    def signature(self) -> tuple:
        """What identifies the plan's GEMMs (hashable): orientation, block size, groups' rows and runs."""
        return (self.transposed, self.block_size, tuple((g.r0, g.r1, g.runs) for g in self.groups))

    def store_grad(self, grad: torch.Tensor, grad_m: torch.Tensor, g: _Group) -> None:
        """Inverse of :meth:`packed` for a gradient: write M_g's gradient into grad (nnz, b, b)."""
        n_rows, k = g.vidx.shape
        b = self.block_size
        order = (0, 2, 3, 1) if self.transposed else (0, 2, 1, 3)
        blocks = grad_m.reshape(n_rows, b, k, b).permute(*order).reshape(n_rows * k, b, b)
        if g.zero_at is None:
            grad.index_copy_(0, g.flat_index(grad.device), blocks)
        else:                       # a padded group: only its stored blocks have a gradient
            grad.index_copy_(0, g.stored_index.to(grad.device), blocks.index_select(0, g.stored_at.to(grad.device)))


def _runs(cols: list[int]) -> list[tuple[int, int]]:
    """Sorted ints -> maximal runs [start, stop) of consecutive values."""
    runs: list[tuple[int, int]] = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def _padded_group(groups: list[_Group], storage: torch.Tensor, b: int, device: torch.device) -> _Group:
    """One group over consecutive groups' rows and the union of their columns (one run): the
    blocks no row stores are zeros."""
    r0, r1 = groups[0].r0, groups[-1].r1
    c0 = min(c for g in groups for c, _ in g.runs) // b
    c1 = max(c for g in groups for _, c in g.runs) // b
    vidx = storage[r0 // b:r1 // b, c0:c1].contiguous()
    flat = vidx.flatten()
    absent = flat < 0
    return _Group(r0, r1, ((c0 * b, c1 * b),), vidx, flat.clamp_min(0).to(device),
                  absent.nonzero().flatten().to(device), (~absent).nonzero().flatten().to(device),
                  flat[~absent].to(device))


def _pad_groups(groups: list[_Group], storage: torch.Tensor, b: int, fill: float, device) -> list[_Group]:
    """Merge runs of consecutive groups whose columns together form one contiguous run into
    one padded group, while at least ``fill`` of its blocks are stored (greedy, in order)."""
    merged, i = [], 0
    while i < len(groups):
        j = i + 1
        while j < len(groups):
            part = groups[i:j + 1]
            cols = sorted({c for g in part for c0, c1 in g.runs for c in range(c0 // b, c1 // b)})
            stored = sum(g.vidx.numel() for g in part)
            rows = (part[-1].r1 - part[0].r0) // b
            if not cols or cols[-1] - cols[0] + 1 != len(cols) or stored < fill * rows * len(cols):
                break
            j += 1
        merged.append(groups[i] if j == i + 1 else _padded_group(groups[i:j], storage, b, device))
        i = j
    return merged


def _build_plan(layout: torch.Tensor, block_size: int, transposed: bool, device: torch.device,
                fill: float | None = None) -> Plan:
    storage = torch.full(layout.shape, -1, dtype=torch.long)
    nz = layout.nonzero()
    storage[nz[:, 0], nz[:, 1]] = torch.arange(len(nz))
    if transposed:
        layout, storage = layout.T, storage.T
    b = block_size
    col_sets = [row.nonzero().flatten().tolist() for row in layout]
    groups, start = [], 0
    for i in range(1, len(col_sets) + 1):
        if i == len(col_sets) or col_sets[i] != col_sets[start]:
            cols = col_sets[start]
            vidx = storage[start:i][:, cols] if cols else torch.empty(i - start, 0, dtype=torch.long)
            runs = tuple((c0 * b, c1 * b) for c0, c1 in _runs(cols))
            groups.append(_Group(start * b, i * b, runs, vidx.contiguous(), vidx.flatten().to(device)))
            start = i
    if fill is not None:
        groups = _pad_groups(groups, storage, b, fill, device)
    runs = sorted(run for g in groups for run in g.runs)
    covers_once = (bool(runs) and runs[0][0] == 0 and runs[-1][1] == layout.shape[1] * b
                   and all(a[1] == c[0] for a, c in zip(runs, runs[1:])))
    return Plan(transposed, tuple(groups), block_size, covers_once, layout.shape[1] * b)


# Fill of a padded group (see plan_for's ``fill``): a flat block butterfly with two factors has
# groups of 4 block-row cells reading 4 contiguous cells, 3 of them stored in each row (0.75).
PAD_FILL = 0.75


def plan_for(layout: torch.Tensor, block_size: int, device: torch.device | str = "cpu",
             fill: float | None = None) -> Plan:
    """The GEMM plan of ``layout`` for the 'torch' path, its block indices on ``device``.

    With ``fill``, consecutive groups whose columns together form one contiguous run are merged
    into one padded group (zero blocks where a row stores none) as long as at least ``fill`` of
    its blocks are stored: fewer, wider GEMMs whose inputs are views (no gathering) and whose
    outputs are written once (no adds), at the price of the zero blocks' multiply-adds (1/3 more
    at :data:`PAD_FILL`). What 16-bit inputs take, whose GEMMs (AMX) are fast enough that the
    gathers and adds dominate.

    Built afresh on every call (index arithmetic on the host): the ops take the plan the layout
    registry caches per (layout, device) (:func:`pixelfly_lab.ops.registry.derived`, what
    ``'torch_plan'``), never this function per call.

    Orientation: gathering (or scattering) costs one pass over N * (sum over groups of the
    group's column width) elements, so the plan groups the rows of whichever of layout and
    layout^T makes that sum smaller; for a flat block butterfly this is the narrower side of the
    weight (the input side of an expanding 1024 -> 4096 layer, the output side of 4096 -> 1024).
    Fewer groups (fewer, larger GEMMs) break ties.
    """
    cpu_layout = layout.detach().to("cpu", torch.bool)
    device = torch.device(device)
    candidates = [_build_plan(cpu_layout, block_size, transposed, device, fill) for transposed in (False, True)]
    return min(candidates, key=lambda p: (sum(g.vidx.shape[1] for g in p.groups), len(p.groups)))


def row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two in [64, 4096]: the kernels' measured choices (a route, an
    order of the backward) are made once per bucket."""
    return min(max(64, 1 << max(rows - 1, 0).bit_length()), 4096)
