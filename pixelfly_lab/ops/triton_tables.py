"""Index tables of a block layout for the Triton kernels (:mod:`pixelfly_lab.ops.triton_kernels`).

CSR (forward), CSC (input gradient) and per-block rows (weight gradient) of a bool layout, as
int32 tensors on the device of the tensors they index, with the row and column *groups* that let
one program compute several output blocks from one input tile. Built once per (layout, device)
by the layout registry (:func:`tables_for`). Index arithmetic only: this module does not import
triton. Tested in tests/test_triton.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixelfly_lab.ops.registry import derived, register_layout

__all__ = ["LayoutTables", "build_tables", "tables_for", "layout_tables"]


@dataclass(frozen=True)
class LayoutTables:
    """Index tables of one layout, on one device (int32).

    Attributes:
        shape: (R, C) = (out/b, in/b).
        nnz: number of stored blocks.
        row_ptr (R+1,), row_cols (nnz,): CSR; block row i holds blocks k = row_ptr[i] .. row_ptr[i+1]-1
            (row-major order, so k is the position) in columns row_cols[k]. Forward.
        col_ptr (C+1,), col_rows (nnz,), col_blocks (nnz,): CSC; block column j holds blocks
            col_blocks[t] in rows col_rows[t] for t in col_ptr[j] .. col_ptr[j+1]-1. Input gradient.
        block_rows (nnz,): the row i of block k (its column is row_cols[k]). Weight gradient.
        max_row_fanin, max_col_fanin: largest blocks per block row / column (part of the tuning key).
        row_group, col_group: the largest power of two G (<= 16) such that every aligned run of G
            block rows (columns) has the same set of blocks. One program can then compute G output
            blocks side by side from one tile of its input: a flat block butterfly stretched to
            blocks repeats each row (column) out/(butterfly_size*b) (in/(butterfly_size*b)) times.
        group_leads, group_fanin (nnz / row_group,): the blocks of the first row of every run of
            row_group rows, and that row's block count F; block g rows below lead k is k + g*F.
            Weight gradient, several blocks of one column per program.
    """

    shape: tuple[int, int]
    nnz: int
    row_ptr: torch.Tensor
    row_cols: torch.Tensor
    col_ptr: torch.Tensor
    col_rows: torch.Tensor
    col_blocks: torch.Tensor
    block_rows: torch.Tensor
    max_row_fanin: int
    max_col_fanin: int
    row_group: int
    col_group: int
    group_leads: torch.Tensor
    group_fanin: torch.Tensor


def _group(layout: torch.Tensor, limit: int = 16) -> int:
    """Largest power of two G <= limit dividing R with layout[G*q : G*q + G] all equal rows, for every q."""
    R = layout.shape[0]
    group = 1
    while layout.numel() and 2 * group <= limit and R % (2 * group) == 0:
        runs = layout.reshape(R // (2 * group), 2 * group, -1)
        if not bool((runs == runs[:, :1]).all()):
            break
        group *= 2
    return group


def _pointers(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def build_tables(layout: torch.Tensor, device: torch.device) -> LayoutTables:
    """The index tables of a CPU bool layout, on ``device``, uncached (ops cache them per key with
    :func:`pixelfly_lab.ops.registry.derived`: :func:`tables_for`, or an op's own derived layout)."""
    R, C = layout.shape
    rows, cols = layout.nonzero(as_tuple=True)            # row-major: the k-th pair is block k
    csc = torch.sort(cols * R + rows, stable=True).indices  # blocks ordered by (column, row)
    row_counts, col_counts = layout.sum(1), layout.sum(0)
    row_ptr = _pointers(row_counts)
    row_group = _group(layout)
    lead_rows = rows % row_group == 0   # blocks in the first row of a run
    tables = dict(row_ptr=row_ptr, row_cols=cols, col_ptr=_pointers(col_counts), col_rows=rows[csc],
                  col_blocks=csc, block_rows=rows, group_leads=lead_rows.nonzero().flatten(),
                  group_fanin=row_counts[rows[lead_rows]])
    tables = {name: t.to(device=device, dtype=torch.int32) for name, t in tables.items()}
    return LayoutTables(shape=(R, C), nnz=len(rows), max_row_fanin=max(row_counts.tolist(), default=0),
                        max_col_fanin=max(col_counts.tolist(), default=0), row_group=row_group,
                        col_group=_group(layout.T), **tables)


def tables_for(key: int, device: torch.device | str) -> LayoutTables:
    """The index tables of a registered layout (:func:`pixelfly_lab.ops.registry.register_layout`)
    on ``device``: built on first use and cached by the registry (what ``'triton_tables'``), so a
    forward or backward reads nothing from the host.

    Args:
        key: the layout's registry key.
        device: where the tables live (the device of the tensors they index).

    Returns:
        :class:`LayoutTables`.
    """
    return derived(key, "triton_tables", lambda entry, dev: build_tables(entry.layout, dev), device)


def layout_tables(layout: torch.Tensor, device: torch.device | str | None = None) -> LayoutTables:
    """The index tables of a layout tensor on ``device`` (default: the layout's).

    For callers without a registry key: the layout is read to the host and registered (a device
    sync for a GPU layout, and a hash of its bytes, on every call), then the tables come from
    :func:`tables_for`. Ops call :func:`tables_for` with the key their layer registered.

    Args:
        layout: bool (R, C) on the CPU or a GPU.
        device: where the tables live.

    Returns:
        :class:`LayoutTables`.
    """
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() != 2:
        raise TypeError(f"layout must be a 2-D bool tensor, got {getattr(layout, 'dtype', type(layout))} "
                        f"of shape {tuple(getattr(layout, 'shape', ()))}")
    # block size 1: the tables do not depend on it (a layer's key, at its block size, is another one)
    return tables_for(register_layout(layout, 1), device if device is not None else layout.device)
