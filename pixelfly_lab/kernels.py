"""Block-sparse matmul with autograd: a slow reference and a fast plain-PyTorch CPU path.

Storage convention (shared with the layers and the Triton kernels): a weight W of shape
(out_features, in_features) supported on a bool block ``layout`` of shape (R, C) =
(out_features / b, in_features / b) is stored as ``values`` of shape (nnz, b, b), where block k
is the k-th True entry of ``layout`` in row-major order (the order of ``layout.nonzero()``):

    values[k] = W[i*b:(i+1)*b, j*b:(j+1)*b]  for (i, j) = layout.nonzero()[k]

The products computed here are nn.Linear's, y = x W^T + bias, and with a low-rank term
(Pixelfly, Dao, Chen et al. 2022, arXiv 2112.00029):

    y = x (S + U V^T)^T + bias = x S^T + (x V) U^T + bias,    U (out, r), V (in, r).

Backends (``backend=``):

* ``'reference'``: ``F.linear(x, blocks_to_dense(values, layout) + U V^T, bias)``; obviously
  correct, made of differentiable, vmappable torch ops (torch.func works through it).
* ``'torch'``: the fast CPU path. Block rows that share the same set of nonzero block columns
  (a flat block butterfly has only butterfly_size distinct sets, each spanning
  out_features / butterfly_size rows) form one GEMM: their input columns are gathered (a
  zero-copy slice when they are one contiguous run, as in block-diagonal layouts) and multiplied
  by the group's blocks packed as one dense matrix. The low-rank term rides along as r extra
  columns of every group's gathered input (z = x V) and r extra rows of its packed weight (U^T),
  so no second full-size output pass is made. The rows of x are swept in chunks of
  :data:`CHUNK_ROWS`, so gathered inputs and output slices stay in cache. The backward pass
  reuses the grouping in the same sweep: dX in "scatter" form (each group's product added into
  its column runs) and dS_g = gy_g^T [x gathered]; gy U and gy^T [z, 1] (dU and the bias
  gradient) ride in those GEMMs as extra columns, because GEMMs with only r = 32 output columns
  run at about half the efficiency of the block GEMMs on a CPU. When in_features > out_features
  the grouping is taken over the transposed layout instead, so that the narrower side is the
  one gathered or scattered; see :func:`plan_for`.

  Measured on a 2-core AMD EPYC with MKL, one thread, float32, x (4096, 1024) -> 4096, the
  released Pixelfly configuration (16, 2, rank 32, block 32, budget 0.227): forward 3.5-3.9x
  and forward+backward ~3x faster than nn.Linear (FLOP limit 4.4x): these GEMMs, 256 output
  columns wide, run at ~85% of a large dense GEMM's rate. ``python -m pixelfly_lab bench``.
* ``'triton'``: ``pixelfly_lab.triton_kernels`` (``block_sparse_matmul_triton``, and
  ``pixelfly_matmul_triton`` with the low-rank term fused) for CUDA tensors, or on the CPU under
  ``TRITON_INTERPRET=1``; imported lazily, only when used.
* ``'auto'`` (default): 'triton' for CUDA inputs when triton imports and supports the block size
  and dtype, else 'torch'; but 'reference' for small products (below :data:`AUTO_MIN_MACS`
  multiply-adds, where per-call overhead dominates) and inside torch.func transforms
  (vmap/grad/jacrev), which the custom autograd Function of the 'torch' path does not support.

Under ``torch.autocast`` the 'torch' and 'reference' paths compute in the autocast dtype.

Example:
    >>> layout = torch.tensor([[True, False], [True, True]])
    >>> values = torch.randn(3, 4, 4)
    >>> x = torch.randn(5, 8)
    >>> y = block_sparse_matmul(x, values, layout)
    >>> torch.allclose(y, x @ blocks_to_dense(values, layout).T, atol=1e-5)
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["BACKENDS", "AUTO_MIN_MACS", "block_sparse_matmul", "sparse_lowrank_matmul", "blocks_to_dense",
           "dense_to_blocks", "check_input_width", "resolve_backend", "plan_for"]

BACKENDS = ("auto", "torch", "reference", "triton")


# ----------------------------------------------------------------------------- validation

def check_input_width(x: torch.Tensor, expected: int, owner: str = "layer") -> None:
    """Raise a ValueError naming ``expected`` when x's last dimension differs from it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: input x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != expected:
        raise ValueError(f"{owner}: expected input x with last dimension in_features={expected}, "
                         f"got shape {tuple(x.shape)}")


def _check_operands(x, values, layout, bias, u=None, v=None) -> int:
    """Validate shapes; return the block size."""
    if not isinstance(layout, torch.Tensor) or layout.dim() != 2 or layout.dtype != torch.bool:
        raise ValueError("layout must be a 2-D bool tensor (out_features/b, in_features/b)")
    if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must have shape (nnz_blocks, b, b), got "
                         f"{tuple(getattr(values, 'shape', ()))}")
    if (isinstance(x, torch.Tensor) and x.dtype != values.dtype
            and not torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"x has dtype {x.dtype} but values has dtype {values.dtype}")
    nnz, b = values.shape[0], values.shape[1]
    if nnz != int(layout.sum()):
        raise ValueError(f"values holds {nnz} blocks but layout has {int(layout.sum())} nonzero blocks")
    rows, cols = layout.shape[0] * b, layout.shape[1] * b
    check_input_width(x, cols, "block_sparse_matmul")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
    if (u is None) != (v is None):
        raise ValueError("give both u and v for the low-rank term, or neither")
    if u is not None:
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != rows or v.shape[0] != cols or u.shape[1] != v.shape[1]:
            raise ValueError(f"u must be ({rows}, r) and v ({cols}, r), got {tuple(u.shape)} and {tuple(v.shape)}")
    return b


# ----------------------------------------------------------------------------- reference

def _block_index_map(layout: torch.Tensor) -> torch.Tensor:
    """Long (R*C,): 1 + the storage index of each block, 0 where the layout is False."""
    flat = layout.flatten().long()
    return torch.cumsum(flat, 0) * flat


def blocks_to_dense(values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """The dense (R*b, C*b) weight that ``values`` stores on ``layout``; zero off the layout.

    Differentiable in ``values`` and made of gathers only, so it also works under torch.func.

    Args:
        values: (nnz, b, b), blocks in row-major layout order.
        layout: bool (R, C).

    Returns:
        W (R*b, C*b) with W[i*b:(i+1)*b, j*b:(j+1)*b] = values[k] for the k-th nonzero (i, j).
    """
    (R, C), b = layout.shape, values.shape[-1]
    padded = torch.cat([values.new_zeros(1, b, b), values])          # index 0 = the zero block
    blocks = padded.index_select(0, _block_index_map(layout).to(values.device))
    return blocks.reshape(R, C, b, b).permute(0, 2, 1, 3).reshape(R * b, C * b)


def dense_to_blocks(weight: torch.Tensor, layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """The blocks of ``weight`` (out, in) on ``layout``, as (nnz, b, b) in row-major layout order."""
    R, C = layout.shape
    if tuple(weight.shape) != (R * block_size, C * block_size):
        raise ValueError(f"weight must have shape {(R * block_size, C * block_size)} for this layout "
                         f"and block_size={block_size}, got {tuple(weight.shape)}")
    blocks = weight.reshape(R, block_size, C, block_size).permute(0, 2, 1, 3)
    return blocks[layout.to(weight.device)].contiguous()


def _reference(x, values, layout, bias, u, v):
    weight = blocks_to_dense(values, layout)
    if u is not None:
        weight = weight + u @ v.T
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class _Group:
    """Consecutive plan rows [r0, r1) sharing the nonzero column ``runs``: one GEMM."""

    r0: int                                  # element offsets of the rows
    r1: int
    runs: tuple[tuple[int, int], ...]        # element column runs [c0, c1), in order
    vidx: torch.Tensor                       # long (rows_in_group, k): storage index of each block

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
    """

    transposed: bool
    groups: tuple[_Group, ...]
    block_size: int
    covers_once: bool

    def packed(self, values: torch.Tensor, g: _Group, transpose: bool = False) -> torch.Tensor:
        """M_g: the group's blocks as one dense (rows*b, k*b) matrix of W (of W^T if the plan is
        transposed); with ``transpose``, M_g^T as a contiguous (k*b, rows*b) matrix, the fast right
        operand of a GEMM."""
        n_rows, k = g.vidx.shape
        b = self.block_size
        blocks = values.index_select(0, g.vidx.flatten().to(values.device)).view(n_rows, k, b, b)
        if transpose:
            order, shape = ((1, 2, 0, 3) if self.transposed else (1, 3, 0, 2)), (k * b, n_rows * b)
        else:
            order, shape = ((0, 3, 1, 2) if self.transposed else (0, 2, 1, 3)), (n_rows * b, k * b)
        return blocks.permute(*order).reshape(shape)

    def store_grad(self, grad: torch.Tensor, grad_m: torch.Tensor, g: _Group) -> None:
        """Inverse of :meth:`packed` for a gradient: write M_g's gradient into grad (nnz, b, b)."""
        n_rows, k = g.vidx.shape
        b = self.block_size
        order = (0, 2, 3, 1) if self.transposed else (0, 2, 1, 3)
        blocks = grad_m.reshape(n_rows, b, k, b).permute(*order).reshape(n_rows * k, b, b)
        grad.index_copy_(0, g.vidx.flatten().to(grad.device), blocks)


def _runs(cols: list[int]) -> list[tuple[int, int]]:
    """Sorted ints -> maximal runs [start, stop) of consecutive values."""
    runs: list[tuple[int, int]] = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def _build_plan(layout: torch.Tensor, block_size: int, transposed: bool) -> Plan:
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
            groups.append(_Group(start * b, i * b, runs, vidx.contiguous()))
            start = i
    runs = sorted(run for g in groups for run in g.runs)
    covers_once = (bool(runs) and runs[0][0] == 0 and runs[-1][1] == layout.shape[1] * b
                   and all(a[1] == c[0] for a, c in zip(runs, runs[1:])))
    return Plan(transposed, tuple(groups), block_size, covers_once)


_PLAN_CACHE: dict[tuple, Plan] = {}
_PLAN_CACHE_SIZE = 256  # layouts of a whole model fit; cleared wholesale when exceeded


def plan_for(layout: torch.Tensor, block_size: int) -> Plan:
    """The cached GEMM plan of ``layout`` for the 'torch' path.

    Orientation: gathering (or scattering) costs one pass over N * (sum over groups of the
    group's column width) elements, so the plan groups the rows of whichever of layout and
    layout^T makes that sum smaller; for a flat block butterfly this is the narrower side of the
    weight (the input side of an expanding 1024 -> 4096 layer, the output side of 4096 -> 1024).
    Fewer groups (fewer, larger GEMMs) break ties.
    """
    cpu_layout = layout.detach().to("cpu", torch.bool)
    key = (tuple(cpu_layout.shape), block_size, cpu_layout.numpy().tobytes())
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        candidates = [_build_plan(cpu_layout, block_size, transposed) for transposed in (False, True)]
        plan = min(candidates, key=lambda p: (sum(g.vidx.shape[1] for g in p.groups), len(p.groups)))
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    return plan


# ----------------------------------------------------------------------------- the fast path

# Rows of x handled per sweep over the groups. A chunk's gathered inputs, output slices and
# gradient slices then stay in cache between the copies and the GEMMs that use them; on a 2-core
# CPU this made the forward ~20% faster than whole-batch GEMMs (512 x 1024 floats = 2 MB of x).
CHUNK_ROWS = 512


def _chunks(n: int):
    return [slice(c, min(c + CHUNK_ROWS, n)) for c in range(0, n, CHUNK_ROWS)] or [slice(0, 0)]


def _gather(a: torch.Tensor, runs, extra: torch.Tensor | None) -> torch.Tensor:
    """a's columns over ``runs`` side by side (a view when one run and no extra), then ``extra``."""
    pieces = [a[:, c0:c1] for c0, c1 in runs]
    if extra is not None:
        pieces.append(extra)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _right_operands(values, plan: Plan, extra_w=None, transpose: bool = False):
    """Per group: M_g^T (transpose) or M_g, with extra_w's rows of the group appended (as rows
    of M_g^T, columns of M_g): the low-rank factor riding in the block GEMM. None for empty groups."""
    rights = []
    for g in plan.groups:
        parts = [plan.packed(values, g, transpose)] if g.runs else []
        if extra_w is not None:
            lr = extra_w[g.r0:g.r1]
            parts.append(lr.T if transpose else lr)
        rights.append(None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, 0 if transpose else 1))
    return rights


def _scatter(out_rows: torch.Tensor, product: torch.Tensor, runs, write: bool) -> int:
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


def _gather_forward(a, plan: Plan, rights, width: int, extra=None, bias=None):
    """out[:, rows_g] = [a[:, runs_g], extra] @ rights[g] (+ bias[rows_g]), chunk by chunk."""
    out = a.new_empty(a.shape[0], width)
    for rows in _chunks(a.shape[0]):
        a_c, extra_c = a[rows], None if extra is None else extra[rows]
        for g, right in zip(plan.groups, rights):
            target = out[rows, g.r0:g.r1]
            if right is None:   # block rows with nothing stored and no low-rank term
                target.copy_(bias[g.r0:g.r1].expand_as(target)) if bias is not None else target.zero_()
            elif bias is None:
                torch.mm(_gather(a_c, g.runs, extra_c), right, out=target)
            else:
                torch.addmm(bias[g.r0:g.r1], _gather(a_c, g.runs, extra_c), right, out=target)
    return out


def _scatter_forward(a, plan: Plan, rights, width: int, init=None):
    """out[:, runs_g] += a[:, rows_g] @ rights[g] onto ``init`` (else zeros), chunk by chunk."""
    write = init is None and plan.covers_once          # every column written exactly once
    out = init if init is not None else (a.new_empty if write else a.new_zeros)(a.shape[0], width)
    for rows in _chunks(a.shape[0]):
        for g, right in zip(plan.groups, rights):
            if right is not None:
                _scatter(out[rows], a[rows, g.r0:g.r1] @ right, g.runs, write)
    return out


def _init_output(rows: int, width: int, z=None, w=None, bias=None):
    """(rows, width) = z @ w^T + bias, what scattered products are added onto (None: zeros)."""
    if z is not None:
        return torch.addmm(bias, z, w.T) if bias is not None else z @ w.T
    if bias is not None:
        return bias.expand(rows, width).clone()
    return None


def _grad_accumulators(plan: Plan, like: torch.Tensor, extra_cols: int):
    """Per group a zero (rows*b, k*b + extra_cols) buffer for dM_g (and the extra columns)."""
    return [like.new_zeros(g.r1 - g.r0, g.width + extra_cols) for g in plan.groups]


def _unpack_grads(plan: Plan, values, grads, extra_cols: int):
    """Blocks' gradient (nnz, b, b) and the extra columns' (plan rows * b, extra_cols) or None."""
    grad_values = values.new_zeros(values.shape)
    grad_extra = grads[0].new_empty(plan.groups[-1].r1, extra_cols) if extra_cols else None
    for g, grad_m in zip(plan.groups, grads):
        if g.runs:
            plan.store_grad(grad_values, grad_m[:, :g.width], g)
        if extra_cols:
            grad_extra[g.r0:g.r1] = grad_m[:, g.width:]
    return grad_values, grad_extra


class _BlockSparseLowRank(torch.autograd.Function):
    """y = x W^T + (x V) U^T + bias with W block-sparse; the 'torch' backend."""

    @staticmethod
    def forward(ctx, x2, values, bias, u, v, plan: Plan, out_features: int):
        z = x2 @ v if u is not None else None
        if plan.transposed:
            init = _init_output(x2.shape[0], out_features, z, u, bias)
            y = _scatter_forward(x2, plan, _right_operands(values, plan), out_features, init)
        else:
            y = _gather_forward(x2, plan, _right_operands(values, plan, u, transpose=True), out_features, z, bias)
        ctx.plan, ctx.has_bias = plan, bias is not None
        ctx.save_for_backward(x2, values, u, v, z)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, values, u, v, z = ctx.saved_tensors
        plan: Plan = ctx.plan
        gy = gy.contiguous()
        need_x, need_values, need_bias, need_u, need_v = ctx.needs_input_grad[:5]
        need_bias = need_bias and ctx.has_bias
        grad_x = grad_values = grad_bias = grad_u = grad_v = None
        # dX = gy S + (gy U) V^T, dU = gy^T z, dV = x^T (gy U), dbias = gy^T 1, dS_g = (row side)^T
        # (gathered column side). One sweep over row chunks computes dX and dS together, so each
        # chunk of gy is reused from cache; the low-rank factor on the plan's row side rides in the
        # group GEMMs as extra columns (r-column GEMMs alone run at half the efficiency).
        if plan.transposed:      # rows of the plan = W's block columns; gy is the gathered side
            gz = gy @ u if u is not None and (need_x or need_v) else None
            lowrank_cols = 0 if gz is None else gz.shape[1]
            rights = _right_operands(values, plan, v if gz is not None else None, transpose=True) if need_x else None
            grad_x = gy.new_empty(x2.shape) if need_x else None
            grads = _grad_accumulators(plan, gy, lowrank_cols) if need_values or need_v else None
            for rows in _chunks(gy.shape[0]):
                gy_c, gz_c = gy[rows], None if gz is None else gz[rows]
                for i, g in enumerate(plan.groups):
                    left = _gather(gy_c, g.runs, gz_c) if g.runs or gz_c is not None else None
                    if need_x:
                        if left is None:
                            grad_x[rows, g.r0:g.r1] = 0
                        else:
                            torch.mm(left, rights[i], out=grad_x[rows, g.r0:g.r1])
                    if grads is not None and left is not None:
                        grads[i].addmm_(x2[rows, g.r0:g.r1].T, left)
            if grads is not None:
                grad_values, grad_v = _unpack_grads(plan, values, grads, lowrank_cols)
                grad_v = grad_v if need_v else None
            if need_u:
                grad_u = gy.T @ z
        else:                    # rows of the plan = W's block rows; x is the gathered side
            lowrank = u is not None and (need_x or need_v)
            rights = _right_operands(values, plan, u if lowrank else None) if need_x or lowrank else None
            write = plan.covers_once
            grad_x = (gy.new_empty if write else gy.new_zeros)(x2.shape) if need_x else None
            gz = gy.new_zeros(gy.shape[0], u.shape[1]) if lowrank else None
            # with a low-rank term the bias gradient is one more column of the dS GEMMs: [z, 1]
            fold_bias = z is not None and need_bias
            if fold_bias:
                z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
            extra_cols = z.shape[1] if z is not None and (need_u or fold_bias) else 0
            grads = _grad_accumulators(plan, gy, extra_cols) if need_values or extra_cols else None
            for rows in _chunks(gy.shape[0]):
                x_c, z_c = x2[rows], None if z is None else z[rows]
                for i, g in enumerate(plan.groups):
                    gy_g = gy[rows, g.r0:g.r1]
                    if rights is not None and rights[i] is not None:
                        product = gy_g @ rights[i]
                        used = _scatter(grad_x[rows], product, g.runs, write) if need_x else g.width
                        if lowrank:
                            gz[rows] += product[:, used:]
                    if grads is not None and (g.runs or extra_cols):
                        grads[i].addmm_(gy_g.T, _gather(x_c, g.runs, z_c if extra_cols else None))
            if need_x and lowrank:
                grad_x.addmm_(gz, v.T)
            if grads is not None:
                grad_values, grad_z = _unpack_grads(plan, values, grads, extra_cols)
                if extra_cols:   # columns: U's gradient, then (folded) the bias's
                    grad_u = grad_z[:, :u.shape[1]] if need_u else None
                    grad_bias = grad_z[:, -1] if fold_bias else None
            if need_v:
                grad_v = x2.T @ gz
        if need_bias and grad_bias is None:
            grad_bias = gy.sum(0)
        return grad_x, grad_values, grad_bias, grad_u, grad_v, None, None


# ----------------------------------------------------------------------------- dispatch

def _in_functorch_transform() -> bool:
    """True inside torch.func transforms (vmap, grad, jacrev, ...)."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # a torch without functorch internals: no transforms either
        return False


def _triton_module():
    """pixelfly_lab.triton_kernels, or None when it (or triton) cannot be imported here."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _triton_runs_here(x: torch.Tensor) -> bool:
    """CUDA tensors, or any tensor when Triton's CPU interpreter is on (TRITON_INTERPRET=1)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# Below this many multiply-adds of the dense product (rows of x * in * out) 'auto' uses the
# reference: one dense GEMM beats a dozen small ones plus their per-call overhead. Measured on a
# 2-core CPU at one thread: the grouped path wins from about 1e8 (512 x 256 -> 1024), loses at
# 3e7 (128 x 256 -> 1024), and is 4-5x slower on tiny layers (128 x 64 -> 256).
AUTO_MIN_MACS = 2 ** 26


def resolve_backend(x: torch.Tensor, backend: str = "auto", block_size: int | None = None,
                    out_features: int | None = None) -> str:
    """The backend that ``backend`` means for input ``x``: 'torch', 'reference' or 'triton'.

    'auto' picks 'reference' inside torch.func transforms; 'triton' for CUDA tensors when
    ``pixelfly_lab.triton_kernels`` imports and supports the block size and dtype; 'reference'
    when the dense product is small (x.numel() * out_features < :data:`AUTO_MIN_MACS`); else
    'torch' (which also runs on CUDA, as plain PyTorch). Asking for 'triton' where it cannot run
    raises a ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if _in_functorch_transform():
            return "reference"
        if x.is_cuda and (module := _triton_module()) is not None:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            if (block_size is None or block_size in module.BLOCK_SIZES) and dtype in module.DTYPES:
                return "triton"
        if out_features is not None and x.numel() * out_features < AUTO_MIN_MACS:
            return "reference"
        return "torch"
    if backend == "triton":
        if not _triton_runs_here(x):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'auto' or "
                             "'torch' on the CPU")
        if _triton_module() is None:
            raise ValueError("backend='triton' asked for but pixelfly_lab.triton_kernels (triton) does not import")
    return backend


def _triton(x, values, layout, bias, u, v):
    module = _triton_module()
    if u is None:
        return module.block_sparse_matmul_triton(x, values, layout, bias)
    return module.pixelfly_matmul_triton(x, values, layout, u, v, bias)


def sparse_lowrank_matmul(x: torch.Tensor, values: torch.Tensor, layout: torch.Tensor,
                          u: torch.Tensor | None, v: torch.Tensor | None,
                          bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """y = x (S + U V^T)^T + bias, S block-sparse on ``layout``: Pixelfly's product, fused.

    Args:
        x: (..., in_features).
        values: (nnz, b, b) blocks of S in row-major layout order.
        layout: bool (out_features / b, in_features / b).
        u: (out_features, r) or None; v: (in_features, r) or None (no low-rank term).
        bias: (out_features,) or None.
        backend: one of :data:`BACKENDS` (see the module docstring).

    Returns:
        y (..., out_features); gradients flow to x, values, bias, u and v.

    Example:
        >>> layout = torch.eye(2, dtype=torch.bool)
        >>> y = sparse_lowrank_matmul(torch.randn(3, 8), torch.randn(2, 4, 4), layout,
        ...                           torch.randn(8, 1), torch.randn(8, 1))
        >>> y.shape
        torch.Size([3, 8])
    """
    b = _check_operands(x, values, layout, bias, u, v)
    out_features = layout.shape[0] * b
    chosen = resolve_backend(x, backend, b, out_features)
    if chosen == "triton":  # the Triton kernels handle autocast themselves
        return _triton(x, values, layout, bias, u, v)
    if torch.is_autocast_enabled(x.device.type):
        # compute in the autocast dtype, as F.linear would; the GEMMs below then see one dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, values, bias, u, v = (t if t is None else t.to(dtype) for t in (x, values, bias, u, v))
        with torch.autocast(x.device.type, enabled=False):
            return sparse_lowrank_matmul(x, values, layout, u, v, bias, backend=chosen)
    if chosen == "reference":
        return _reference(x, values, layout, bias, u, v)
    batch = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _BlockSparseLowRank.apply(x2, values, bias, u, v, plan_for(layout, b), out_features)
    return y.reshape(*batch, out_features)


def block_sparse_matmul(x: torch.Tensor, values: torch.Tensor, layout: torch.Tensor,
                        bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """y = x W^T + bias for W stored as its nonzero blocks on ``layout``.

    Args:
        x: (..., in_features), in_features = layout.shape[1] * b.
        values: (nnz, b, b), block k = the k-th True entry of ``layout`` in row-major order.
        layout: bool (out_features / b, in_features / b).
        bias: (out_features,) or None.
        backend: 'auto', 'torch' (fast CPU), 'reference' (F.linear on the dense weight) or 'triton'.

    Returns:
        y (..., out_features); gradients flow to x, values and bias (values' gradient is only
        ever the layout's blocks: W has no other entries).
    """
    return sparse_lowrank_matmul(x, values, layout, None, None, bias, backend=backend)
