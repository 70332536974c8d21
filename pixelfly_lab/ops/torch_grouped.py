"""The grouped GEMMs of the 'torch' path: forward and backward of y = x S^T + (x V) U^T + bias.

Per group of a :class:`pixelfly_lab.ops.torch_plan.Plan` its blocks packed as one dense matrix
(all groups at once when they share a shape); its input runs read as views, one GEMM per run
accumulated into the output slice, and products written straight into the column pieces they
land on (:data:`MAX_SPLIT`; groups with more runs gather them into one GEMM); the low-rank term
(with the bias) one more GEMM per group on [x V, 1]; the low-rank factor and the bias gradient
ride in the blocks' gradient GEMMs as extra rows; rows are swept in chunks on worker threads
(:mod:`pixelfly_lab.ops.torch_sweep`). The dispatch between these and one dense
GEMM lives in :mod:`pixelfly_lab.ops.torch_kernels` (the module docstring there gives the
measurements behind each choice). Tested against the float64 reference in
tests/test_torch_kernels.py.
"""

from __future__ import annotations

import torch

from pixelfly_lab.ops.torch_buffers import new_output
from pixelfly_lab.ops.torch_plan import Plan
from pixelfly_lab.ops.torch_sweep import sweep, sweep_workers

__all__ = ["times_narrow", "gather_columns", "scatter_columns", "grouped_forward", "grouped_backward", "unpack_grads"]


def times_narrow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, K) @ b (K, r) for a narrow b, computed as (b^T a^T)^T: with r = 5-32 columns MKL's
    sgemm ran the r-row orientation 1-9x faster on one AVX-512 core (x2^T dY V: 23 -> 2.6 ms at
    r = 5). Returned contiguous (a copy of N * r values): its row slices are gathered later."""
    return (b.T @ a.T).T.contiguous()


def gather_columns(a: torch.Tensor, runs, extra: torch.Tensor | None) -> torch.Tensor:
    """a's columns over ``runs`` side by side (a view when one run and no extra), then ``extra``."""
    pieces = [a[:, c0:c1] for c0, c1 in runs]
    if extra is not None:
        pieces.append(extra)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _right_operands(values, plan: Plan, extra_w=None, transpose: bool = False):
    """Per group: M_g^T (transpose) or M_g (packed together where the plan allows:
    :meth:`Plan.packed_all`), with extra_w's rows of the group appended (as rows of M_g^T,
    columns of M_g): the low-rank factor riding in the block GEMM. None for empty groups."""
    packed = plan.packed_all(values, transpose)
    if extra_w is None:
        return packed
    rights = []
    for g, m in zip(plan.groups, packed):
        lr = extra_w[g.r0:g.r1].T if transpose else extra_w[g.r0:g.r1]
        rights.append(lr if m is None else torch.cat([m, lr], 0 if transpose else 1))
    return rights


def _scatter_pieces(out_rows: torch.Tensor, product: torch.Tensor, pieces) -> None:
    """Write or add product's columns into out_rows by :attr:`Plan.scatter_pieces` of a group."""
    for offset, c0, c1, write in pieces:
        part = product[:, offset:offset + c1 - c0]
        if write:
            out_rows[:, c0:c1].copy_(part)
        else:
            out_rows[:, c0:c1].add_(part)


def scatter_columns(out_rows: torch.Tensor, product: torch.Tensor, runs, write: bool) -> int:
    """Add (or write) product's leading columns into out_rows' column runs; return columns used."""
    offset = 0
    for c0, c1 in runs:
        part = product[:, offset:offset + c1 - c0]
        if write:
            out_rows[:, c0:c1].copy_(part)
        else:
            out_rows[:, c0:c1].add_(part)
        offset += c1 - c0
    return offset


# A group whose input columns form at most this many runs reads them as views, one GEMM per run
# accumulated into its output slice (the K dimension split), instead of copying them side by side
# first; and a product whose columns land in at most this many pieces is written straight into
# them (the N dimension split) instead of through a temporary. Measured on one AVX-512 core
# (Xeon, AMX), per 512-row chunk of the released configuration x (4096, 1024) -> 4096: a group's
# forward 493 -> 398-409 us (gather of 2 runs + z, one GEMM -> one GEMM per run + the low-rank
# GEMM), its dX 454 -> 386 us (product + scatter -> one GEMM per piece, gy U once per chunk);
# at budget 0.1 (butterfly 32, rank 5) 131 -> 108 and 135 -> 108 us.
MAX_SPLIT = 2


def _split_terms(a_c: torch.Tensor, g, right: torch.Tensor) -> list:
    """(A, B) pairs whose products sum to a_c[:, runs_g] @ right: one per run of the group's
    columns (views, no copy) when it has at most :data:`MAX_SPLIT` runs, else one gathered."""
    if not g.runs:
        return []
    if len(g.runs) > MAX_SPLIT:
        return [(gather_columns(a_c, g.runs, None), right)]
    terms, offset = [], 0
    for c0, c1 in g.runs:
        terms.append((a_c[:, c0:c1], right[offset:offset + c1 - c0]))
        offset += c1 - c0
    return terms


def _sum_into(target: torch.Tensor, terms: list, bias: torch.Tensor | None = None) -> None:
    """target = sum of A @ B over ``terms`` (+ bias): the first product written, the others added."""
    if not terms:
        target.copy_(bias.expand_as(target)) if bias is not None else target.zero_()
        return
    (a0, b0), rest = terms[0], terms[1:]
    if bias is None:
        torch.mm(a0, b0, out=target)
    else:
        torch.addmm(bias, a0, b0, out=target)
    for a_i, b_i in rest:
        target.addmm_(a_i, b_i)


def _product_into(out_rows: torch.Tensor, a: torch.Tensor, right: torch.Tensor, pieces) -> None:
    """out_rows[:, c0:c1] = (or +=) a @ right[:, o:o + c1 - c0] for each (o, c0, c1, write) piece:
    written straight where it lands (at most :data:`MAX_SPLIT` pieces), else through one product."""
    if len(pieces) > MAX_SPLIT:
        _scatter_pieces(out_rows, a @ right, pieces)
        return
    for offset, c0, c1, write in pieces:
        part = right[:, offset:offset + c1 - c0]
        if write:
            torch.mm(a, part, out=out_rows[:, c0:c1])
        else:
            out_rows[:, c0:c1].addmm_(a, part)


def _gather_forward(a, plan: Plan, rights, width: int, z=None, lowrank=None, bias=None, v=None):
    """out[:, rows_g] = a[:, runs_g] @ rights[g] + z_1 @ lowrank[:, rows_g] (+ bias), chunk by chunk.

    ``rights[g]`` = M_g^T (k*b, rows*b); with a low-rank term ``z`` (N, r or r + 1) is written
    chunk by chunk first as a @ v (its last column, if r + 1, holds ones and ``lowrank`` (r + 1,
    out) = [U^T; bias]), by the sweep's workers: computed beforehand it was the largest serial
    part of the forward on 2 threads (4.5 of ~55 ms, x (4096, 1024) -> 4096, r = 32). The
    groups' input runs are read as views (:func:`_split_terms`)."""
    out = new_output((a.shape[0], width), a)
    rank = 0 if v is None else v.shape[1]
    bias_apart = bias if lowrank is None else None   # else folded into the low-rank product

    def chunk(rows, *_):
        a_c = a[rows]
        if lowrank is not None:
            z[rows, :rank] = times_narrow(a_c, v)
            z_c = z[rows]
        for g, right in zip(plan.groups, rights):
            terms = _split_terms(a_c, g, right) if right is not None else []
            if lowrank is not None:
                terms.append((z_c, lowrank[:, g.r0:g.r1]))
            _sum_into(out[rows, g.r0:g.r1], terms, None if bias_apart is None else bias_apart[g.r0:g.r1])
    sweep(a.shape[0], chunk, sweep_workers(a.shape[0], a), a)
    return out


def _scatter_forward(a, plan: Plan, rights, width: int, z=None, lowrank=None, bias=None, v=None):
    """out[:, runs_g] += a[:, rows_g] @ rights[g] (+ z_1 @ lowrank + bias), chunk by chunk.

    With a low-rank term, each chunk first writes z = a V into ``z`` (N, r or r + 1; its last
    column, if r + 1, holds ones and ``lowrank`` (r + 1, out) = [U^T; bias]) and its rows of the
    output as [z, 1] @ lowrank, onto which the products are added while the rows are in cache
    (before: z @ U^T + bias over all rows first, one more pass over the output). Without one,
    each column's first product is written, not added (no zeroing first); a bias alone is
    written first."""
    out = new_output((a.shape[0], width), a)
    pieces, holes = plan.scatter_pieces
    rank = 0 if v is None else v.shape[1]
    added = [_added(g) for g in plan.groups]

    def chunk(rows, *_):
        out_c, a_c = out[rows], a[rows]
        if lowrank is not None:
            z[rows, :rank] = times_narrow(a_c, v)
            torch.mm(z[rows], lowrank, out=out_c)
        elif bias is not None:
            out_c.copy_(bias.expand_as(out_c))
        else:
            for c0, c1 in holes:
                out_c[:, c0:c1] = 0
        first_written = lowrank is None and bias is None
        for g, right, own, more in zip(plan.groups, rights, pieces, added):
            if right is not None:
                _product_into(out_c, a_c[:, g.r0:g.r1], right, own if first_written else more)
    sweep(a.shape[0], chunk, sweep_workers(a.shape[0], a), a)
    return out


def _added(g) -> tuple:
    """The pieces of a group's product that land on its column runs, all added."""
    pieces, offset = [], 0
    for c0, c1 in g.runs:
        pieces.append((offset, c0, c1, False))
        offset += c1 - c0
    return tuple(pieces)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc = a @ b on a worker's first chunk (acc is uninitialised then), acc += a @ b after."""
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)


def _grad_accumulators(plan: Plan, like: torch.Tensor, extra_cols: int, written=None):
    """Per group a (k*b + extra_cols, rows*b) buffer for dM_g^T (and the extra columns):
    uninitialised where ``written(g)`` (the sweep's first chunk writes it), zero elsewhere.

    Transposed because (gathered side)^T @ (row side) ran ~15% faster than (row side)^T @
    (gathered side) in MKL's sgemm on an AVX-512 CPU, the row side being a strided slice."""
    if plan.stacked_index is not None:   # every group has blocks (so is written): one tensor, unpacked at once
        g = plan.groups[0]
        return like.new_empty(len(plan.groups), g.width + extra_cols, g.r1 - g.r0)
    return [(like.new_empty if written is None or written(g) else like.new_zeros)(g.width + extra_cols, g.r1 - g.r0)
            for g in plan.groups]


def _summed(accs):
    """The first worker's accumulators with the others' added in (None stays None)."""
    if accs is None:
        return None
    for other in accs[1:]:
        if isinstance(other, torch.Tensor):
            accs[0].add_(other)
        else:
            for total, part in zip(accs[0], other):
                total.add_(part)
    return accs[0]


def unpack_grads(plan: Plan, values, grads, extra_cols: int, store=None):
    """Blocks' gradient (nnz, b, b) and the extra columns' (plan rows * b, extra_cols) or None;
    ``grads``: the groups' accumulators, a list or one stacked tensor (:func:`_grad_accumulators`).
    ``store(grad_values, grads)`` unpacks a stacked one (default :meth:`Plan.store_grads`; the
    compiled sweep passes its own)."""
    if isinstance(grads, torch.Tensor):   # a stacked plan: its groups cover every block and row once
        grad_values = values.new_empty(values.shape)
        (store or plan.store_grads)(grad_values, grads)
        width = plan.groups[0].width
        grad_extra = grads[:, width:].transpose(1, 2).reshape(-1, extra_cols) if extra_cols else None
        return grad_values, grad_extra
    grad_values = values.new_zeros(values.shape)
    grad_extra = grads[0].new_empty(plan.groups[-1].r1, extra_cols) if extra_cols else None
    for g, grad_mt in zip(plan.groups, grads):
        grad_m = grad_mt.T
        if g.runs:
            plan.store_grad(grad_values, grad_m[:, :g.width], g)
        if extra_cols:
            grad_extra[g.r0:g.r1] = grad_m[:, g.width:]
    return grad_values, grad_extra


def grouped_forward(x2, values, bias, u, v, plan: Plan, out_features: int):
    # z = x2 V is written chunk by chunk in the sweep, beside a column of ones for the bias
    z = lowrank = None
    if u is not None:
        z = x2.new_empty(x2.shape[0], u.shape[1] + (bias is not None))
        lowrank = u.T if bias is None else torch.cat([u.T, bias[None]], 0)
        if bias is not None:
            z[:, -1] = 1
    if plan.transposed:
        y = _scatter_forward(x2, plan, _right_operands(values, plan), out_features, z, lowrank, bias, v)
    else:
        y = _gather_forward(x2, plan, _right_operands(values, plan, transpose=True), out_features, z, lowrank,
                            bias, v)
    return y, None if z is None else z[:, :u.shape[1]]


def grouped_backward(gy, x2, values, u, v, z, plan: Plan, needs_input_grad, has_bias: bool):
    gy = gy.contiguous()
    need_x, need_values, need_bias, need_u, need_v = needs_input_grad
    need_bias = need_bias and has_bias
    grad_x = grad_values = grad_bias = grad_u = grad_v = None
    # dX = gy S + (gy U) V^T, dU = gy^T z, dV = x^T (gy U), dbias = gy^T 1, dS_g = (row side)^T
    # (gathered column side). One sweep over row chunks computes dX and dS together, so each
    # chunk of gy is reused from cache; the low-rank factor on the plan's row side rides in the
    # group GEMMs as extra columns (r-column GEMMs alone run at half the efficiency).
    if plan.transposed:      # rows of the plan = W's block columns; gy is the gathered side
        # gy's runs and gz gathered into one tile per chunk and group, which feeds both dX and dS:
        # reading the runs as views instead (one GEMM per run, as the forward does) measured
        # 8-14% slower for this backward (4096 -> 1024, budget 0.1 and released, 512 and 4096 rows,
        # one thread): the copy is shared by two products, the split doubles their narrow GEMMs.
        gz = times_narrow(gy, u) if u is not None and (need_x or need_v) else None
        lowrank_cols = 0 if gz is None else gz.shape[1]
        rights = _right_operands(values, plan, v if gz is not None else None, transpose=True) if need_x else None
        grad_x = new_output(tuple(x2.shape), gy) if need_x else None
        workers = sweep_workers(gy.shape[0], gy)
        # one set of accumulators per worker, summed after the sweep
        accs = [_grad_accumulators(plan, gy, lowrank_cols, lambda g: g.runs or gz is not None)
                for _ in range(workers)] if need_values or need_v else None

        def chunk(rows, k, first):
            gy_c, gz_c = gy[rows], None if gz is None else gz[rows]
            for i, g in enumerate(plan.groups):
                left = gather_columns(gy_c, g.runs, gz_c) if g.runs or gz_c is not None else None
                if need_x:
                    if left is None:
                        grad_x[rows, g.r0:g.r1] = 0
                    else:
                        torch.mm(left, rights[i], out=grad_x[rows, g.r0:g.r1])
                if accs is not None and left is not None:
                    _accumulate(accs[k][i], left.T, x2[rows, g.r0:g.r1], first)
        sweep(gy.shape[0], chunk, workers, gy)
        grads = _summed(accs)
        if grads is not None:
            grad_values, grad_v = unpack_grads(plan, values, grads, lowrank_cols)
            grad_v = grad_v if need_v else None
        if need_u:
            grad_u = (z.T @ gy).T
    else:                    # rows of the plan = W's block rows; x is the gathered side
        lowrank = u is not None and (need_x or need_v)
        rights = _right_operands(values, plan) if need_x else None
        pieces, holes = plan.scatter_pieces
        grad_x = new_output(tuple(x2.shape), gy) if need_x else None   # every column written below
        gz = gy.new_empty(gy.shape[0], u.shape[1]) if lowrank else None
        # with a low-rank term the bias gradient is one more column of the dS GEMMs: [z, 1]
        fold_bias = z is not None and need_bias
        if fold_bias:
            z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
        extra_cols = z.shape[1] if z is not None and (need_u or fold_bias) else 0
        workers = sweep_workers(gy.shape[0], gy)
        accs = [_grad_accumulators(plan, gy, extra_cols, lambda g: g.runs or extra_cols)
                for _ in range(workers)] if need_values or extra_cols else None

        def chunk(rows, k, first):
            x_c, z_c = x2[rows], None if z is None else z[rows]
            if lowrank:   # gy U: one GEMM of the chunk's rows (K = out_features runs at the block GEMMs' rate)
                torch.mm(gy[rows], u, out=gz[rows])
            if need_x:
                for c0, c1 in holes:
                    grad_x[rows, c0:c1] = 0
            for i, g in enumerate(plan.groups):
                gy_g = gy[rows, g.r0:g.r1]
                if need_x and rights[i] is not None:
                    _product_into(grad_x[rows], gy_g, rights[i], pieces[i])
                if accs is not None and (g.runs or extra_cols):
                    _accumulate(accs[k][i], gather_columns(x_c, g.runs, z_c if extra_cols else None).T, gy_g, first)
            if need_x and lowrank:   # gz of this chunk is complete; its rows of dX are in cache
                grad_x[rows].addmm_(gz[rows], v.T)
        sweep(gy.shape[0], chunk, workers, gy)
        grads = _summed(accs)
        if grads is not None:
            grad_values, grad_z = unpack_grads(plan, values, grads, extra_cols)
            if extra_cols:   # columns: U's gradient, then (folded) the bias's; copied apart, as
                # gradients that share storage may not leave a custom op (kernels.py registers one)
                grad_u = grad_z[:, :u.shape[1]].contiguous() if need_u else None
                grad_bias = grad_z[:, -1].contiguous() if fold_bias else None
        if need_v:
            grad_v = (gz.T @ x2).T
    if need_bias and grad_bias is None:
        grad_bias = gy.sum(0)
    if not need_values:   # computed beside dU or dV in the same GEMMs, not asked for
        grad_values = None
    return grad_x, grad_values, grad_bias, grad_u, grad_v


