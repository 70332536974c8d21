"""The integer tables of the compiled row sweep (``csrc/blocksparse_cpu.cpp``), built from a plan.

A plan (:mod:`pixelfly_lab.ops.torch_plan`) lists, per group of block rows, its blocks packed as one
dense matrix and the runs of columns they read; the sweep reads it as tables of micro-kernel calls:

- products, (n, 10) int64 ``(a_id, a_col, K, b_id, b_off, ldb, N, c_col, add, c_id)``:
  C_c[:, c_col:c_col+N] (+)= A_a[:, a_col:a_col+K] @ B_b (K x N at b_off, leading dimension ldb);
  K == 0 zeroes the slice; a_id -1 reads the tile's gathered A (below);
- grams, (n, 9) int64 ``(a_id, a_col, M, b_id, b_col, N, acc_id, acc_row, acc_col)``:
  acc[acc_row:+M, acc_col:+N] += A_a[:, a_col:+M]^T @ B_b[:, b_col:+N], summed over rows;
- gathers, (n, 5) int64 ``(product, a_id, a_col, width, column)``: before that product runs on a
  tile, A_a[tile, a_col:a_col+width] is copied into the tile's gathered A at that column
  (:func:`gathered_products`).

Every table is built once per plan and cached; the C++ side checks each entry against its
operands. Tested in tests/test_native_linear.py.
"""

from __future__ import annotations

import torch

from pixelfly_lab.ops.torch_plan import Plan

__all__ = ["N_SPLIT", "product_tables", "gathered_products", "gram_table", "lead_table", "NO_GRAMS", "NO_GATHERS"]

# Widest product of one micro-kernel call (wider ones are cut into column pieces).
N_SPLIT = 256
NO_GRAMS = torch.empty(0, 9, dtype=torch.long)
NO_GATHERS = torch.empty(0, 5, dtype=torch.long)
_TABLES: dict[tuple, object] = {}


def _pieces(n: int) -> list[tuple[int, int]]:
    """(first column, width) of n columns cut into pieces of at most :data:`N_SPLIT`."""
    return [(n0, min(N_SPLIT, n - n0)) for n0 in range(0, n, N_SPLIT)]


def _product(table: list, a_id, a_col, k, b_id, b_off, ldb, n, c_col, add, c_id=0) -> None:
    """Append C_c[:, c_col:c_col+n] (+)= A_a[:, a_col:a_col+k] @ B_b (k x n at b_off, ld ldb),
    cut into :func:`_pieces`."""
    for n0, width in _pieces(n):
        table.append((a_id, a_col, k, b_id, b_off + n0, ldb, width, c_col + n0, int(add), c_id))


def _gather_products(plan: Plan, low_k: int, width: int) -> list:
    """C[:, rows_g] = A_0[:, runs_g] @ B_g (k*b x n_g) (+ A_1[:, :low_k] @ B_low[:, rows_g]):
    the forward of a plan that gathers x, and dX of a plan of the transposed layout."""
    table = []
    for i, g in enumerate(plan.groups):
        n_g = g.r1 - g.r0
        for n0, n in _pieces(n_g):   # piece by piece: each output slice's products consecutive (a window)
            offset = 0
            if not g.runs and not low_k:
                _product(table, 0, 0, 0, i, 0, 0, n, g.r0 + n0, False)   # a group without blocks: zeros
            for c0, c1 in g.runs:
                _product(table, 0, c0, c1 - c0, i, offset * n_g + n0, n_g, n, g.r0 + n0, offset)
                offset += c1 - c0
            if low_k:   # last, added while the slice is in L1 (first, written, measured 4-11% slower)
                _product(table, 1, 0, low_k, len(plan.groups), g.r0 + n0, width, n, g.r0 + n0, bool(g.runs))
    return table


def _scatter_products(plan: Plan, low_k: int, width: int, lead: tuple = ()) -> list:
    """C[:, runs_g] (+)= A_0[:, rows_g] @ B_g (n_g x k*b) over the groups (zeros where no group
    writes first), then C += A_1[:, :low_k] @ B_low: the forward of a plan of the transposed
    layout, and dX of a plan that gathers x.

    ``lead`` = (K, B id, N): A_1 = A_0 @ B_lead (z = x V, or gz = gy U) is summed group by group,
    A_0[:, rows_g] @ B_lead[rows_g] right before the group's own product reads the same columns,
    instead of one K-wide product first: that product was the first to read A_0's tile from memory
    and ran at the memory's pace (measured, dX of 1024 -> 4096 at 4096 rows, one thread, medians of
    7: the lead product alone 9.3 ms, the whole dX table 54.0 ms, the sum of its parts 53.5). The
    groups' rows tile A_0's K columns (every plan row is in one group, blocks or not)."""
    edges = [0] + [g.r1 for g in plan.groups]
    if lead and ([(g.r0, g.r1) for g in plan.groups] != list(zip(edges, edges[1:])) or edges[-1] != lead[0]):
        raise ValueError("the plan's groups must tile the rows of A_0 (plan_for's plans do)")
    table = []
    pieces, holes = plan.scatter_pieces
    for c0, c1 in holes:
        _product(table, 0, 0, 0, 0, 0, 0, c1 - c0, c0, False)
    for i, (g, own) in enumerate(zip(plan.groups, pieces)):
        if lead:
            _, b_id, n = lead
            _product(table, 0, g.r0, g.r1 - g.r0, b_id, g.r0 * n, n, n, 0, i > 0, 1)
        for offset, c0, c1, write in own:
            _product(table, 0, g.r0, g.r1 - g.r0, i, offset, g.width, c1 - c0, c0, not write)
    if low_k:
        _product(table, 1, 0, low_k, len(plan.groups), 0, width, width, 0, True)
    return table


def _gram_terms(plan: Plan, extra: int) -> list:
    """acc_g[o:o+w] += A_0[:, run]^T @ B_0[:, rows_g] per run at offset o, and
    acc_g[k*b:k*b+extra] += A_1[:, :extra]^T @ B_0[:, rows_g]: the blocks' gradients (and the
    extra rows: dU and dbias, or dV)."""
    terms = []
    for i, g in enumerate(plan.groups):
        offset = 0
        for c0, c1 in g.runs:
            terms.append((0, c0, c1 - c0, 0, g.r0, g.r1 - g.r0, i, offset, 0))
            offset += c1 - c0
        if extra:
            terms.append((1, 0, extra, 0, g.r0, g.r1 - g.r0, i, g.width, 0))
    return terms


def product_tables(plan: Plan, kind: str, low_k: int, width: int, lead: tuple = ()) -> torch.Tensor:
    """The integer table of ``kind`` ('gather', 'scatter' or 'gram') for the plan, cached: (n, 10)
    int64 products or (n, 9) grams as ``csrc/blocksparse_cpu.cpp`` reads them. ``lead`` = (K, B id,
    N), where the products read A_1 = A_0[:, :K] @ B (N columns; the low-rank z = x V or gz = gy U):
    a gather table computes it first in each tile, a scatter table group by group
    (:func:`_scatter_products`)."""
    if kind == "gram":
        return gram_table(plan, True, low_k, (), (0, 0))
    key = (plan.signature, kind, low_k, width, lead)
    if key not in _TABLES:
        if kind == "gather":
            rows = _lead_rows(lead) + _gather_products(plan, low_k, width)
        elif kind == "scatter":
            rows = _scatter_products(plan, low_k, width, lead)
        else:
            raise ValueError(f"kind must be 'gather', 'scatter' or 'gram', got {kind!r}")
        _TABLES[key] = torch.tensor(rows, dtype=torch.long).reshape(-1, 10)
    return _TABLES[key]


def _lead_rows(lead: tuple) -> list:
    """The rows of C_1[:, :n] = A_0[:, :k] @ B_b (k x n) for ``lead`` = (k, b, n), none for ():
    z = x V (or gz = gy U) before the products that read it."""
    table = []
    if lead:
        k, b_id, n = lead
        _product(table, 0, 0, k, b_id, 0, n, n, 0, False, 1)
    return table


def lead_table(lead: tuple) -> torch.Tensor:
    """The product table of :func:`_lead_rows` alone (the backward's gz = gy U without dX), cached."""
    key = ("lead", lead)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(_lead_rows(lead), dtype=torch.long).reshape(-1, 10)
    return _TABLES[key]


def _extra_grams(pairs: list, first_b: int, first_acc: int) -> list:
    """Gram rows acc_i[r:r+m, c:c+n] += A_a[:, r:r+m]^T B_i[:, c:c+n] for each (a, m, n) of ``pairs``:
    A_a an operand the groups' grams read already (transposed once per panel), B_i and the
    accumulators numbered from first_b and first_acc; A's and B's columns cut into N_SPLIT pieces."""
    terms = []
    for i, (a, m, n) in enumerate(pairs):
        for r, height in _pieces(m):
            for c, width in _pieces(n):
                terms.append((a, r, height, first_b + i, c, width, first_acc + i, r, c))
    return terms


def gram_table(plan: Plan, groups: bool, extra: int, pairs: tuple, first: tuple) -> torch.Tensor:
    """The backward's grams, cached: the groups' (:func:`_gram_terms`, with ``groups``), then
    :func:`_extra_grams` of ``pairs`` numbered from ``first`` = (first B, first accumulator)."""
    key = (plan.signature, "grams", groups, extra, pairs, first)
    if key not in _TABLES:
        rows = (_gram_terms(plan, extra) if groups else []) + _extra_grams(list(pairs), *first)
        _TABLES[key] = torch.tensor(rows, dtype=torch.long).reshape(-1, 9)
    return _TABLES[key]


def gathered_products(plan: Plan, low_k: int, lead: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(products, gathers) of the plan's gather table (the forward of a plan that gathers x, dX of a
    transposed plan), each output slice one product: :func:`product_tables` ('gather'), but a group
    whose A is more than one piece (runs of A_0, and A_1[:, :low_k]: [z, 1] or gz) has its pieces
    copied side by side into the tile's gathered A before its first product, which then reads
    K = runs + low_k at once; B_i is then the group's packed blocks with the rows of the low-rank
    factor ([U^T; bias], or V^T) for its columns below them ((K_g + low_k) x n_g). A group of one
    piece reads it in place. ``lead`` as for :func:`product_tables`. Cached."""
    key = (plan.signature, "gathered", low_k, lead)
    if key not in _TABLES:
        table, gathers = _lead_rows(lead), []
        for i, g in enumerate(plan.groups):
            n_g = g.r1 - g.r0
            pieces = [(0, c0, c1 - c0) for c0, c1 in g.runs] + ([(1, 0, low_k)] if low_k else [])
            k = sum(w for _, _, w in pieces)
            if len(pieces) > 1:
                column = 0
                for a_id, a_col, w in pieces:
                    gathers.append((len(table), a_id, a_col, w, column))
                    column += w
            a_id, a_col = (-1, 0) if len(pieces) > 1 else pieces[0][:2] if pieces else (0, 0)
            for n0, n in _pieces(n_g):
                _product(table, a_id, a_col, k, i, n0, n_g, n, g.r0 + n0, False)
        _TABLES[key] = (torch.tensor(table, dtype=torch.long).reshape(-1, 10),
                        torch.tensor(gathers, dtype=torch.long).reshape(-1, 5))
    return _TABLES[key]
