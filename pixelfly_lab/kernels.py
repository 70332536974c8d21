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
  out_features / butterfly_size rows) form one tall GEMM: their input columns are gathered
  once (a zero-copy slice when they are one contiguous run, as in block-diagonal layouts) and
  multiplied by the group's blocks packed as one dense (k*b, rows*b) matrix. The low-rank term
  rides along as r extra columns of every group's gathered input (z = x V) and r extra rows of
  its packed weight (U^T), so no second full-size output pass is made. The backward pass reuses
  the same grouping: dX is the "scatter" form (each group's dX contribution added to its
  column runs) and each block's gradient is one slice of one GEMM. When in_features >
  out_features the grouping is taken over the transposed layout instead, so that the cheap side
  (the narrower one) is the one gathered or scattered; see :func:`plan_for`.
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
    """Consecutive plan rows [r0, r1) sharing the column set ``runs`` (element offsets)."""

    r0: int                                  # element offsets of the rows
    r1: int
    runs: tuple[tuple[int, int], ...]        # element column runs [c0, c1), in order
    vidx: torch.Tensor                       # long (rows_in_group, k): storage index of each block


@dataclass(frozen=True)
class Plan:
    """How the 'torch' path cuts a layout into GEMMs (cached per layout; see :func:`plan_for`).

    Attributes:
        transposed: False: rows are W's block rows, x is gathered, y written slice by slice
            ("gather" forward). True: rows are W's block columns (the plan of layout^T), x is read
            in slices and each product added into y's column runs ("scatter" forward).
        groups: consecutive plan rows with identical nonzero column sets.
        block_size: b.
    """

    transposed: bool
    groups: tuple[_Group, ...]
    block_size: int

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

    def unpack_grad(self, grad_m: torch.Tensor, g: _Group) -> torch.Tensor:
        """Inverse of :meth:`packed` for a gradient: (rows*b, k*b) -> (rows*k, b, b) blocks of W."""
        n_rows, k = g.vidx.shape
        b = self.block_size
        view = grad_m.view(n_rows, b, k, b)
        order = (0, 2, 3, 1) if self.transposed else (0, 2, 1, 3)
        return view.permute(*order).reshape(n_rows * k, b, b)


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
    groups, start = [], 0
    col_sets = [tuple(row.nonzero().flatten().tolist()) for row in layout]
    for i in range(1, len(col_sets) + 1):
        if i == len(col_sets) or col_sets[i] != col_sets[start]:
            cols = list(col_sets[start])
            vidx = storage[start:i][:, cols] if cols else torch.empty(i - start, 0, dtype=torch.long)
            runs = tuple((c0 * b, c1 * b) for c0, c1 in _runs(cols))
            groups.append(_Group(start * b, i * b, runs, vidx.contiguous()))
            start = i
    return Plan(transposed, tuple(groups), block_size)


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

        def cost(p: Plan):
            return (sum(g.vidx.shape[1] for g in p.groups), len(p.groups))
        plan = min(candidates, key=cost)
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    return plan


# ----------------------------------------------------------------------------- the fast path

def _gather(a: torch.Tensor, runs, extra: torch.Tensor | None) -> torch.Tensor:
    """a's columns over ``runs`` side by side (a view when one run and no extra), then ``extra``."""
    pieces = [a[:, c0:c1] for c0, c1 in runs]
    if extra is not None:
        pieces.append(extra)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _gather_mm(a, values, plan: Plan, width: int, extra=None, extra_w=None, bias=None):
    """out[:, rows_g] = [a[:, runs_g], extra] @ [M_g^T; extra_w[rows_g]^T] (+ bias[rows_g])."""
    out = a.new_empty(a.shape[0], width)
    for g in plan.groups:
        right = plan.packed(values, g, transpose=True) if g.runs else None
        if extra is not None:
            lr = extra_w[g.r0:g.r1].T
            right = lr if right is None else torch.cat([right, lr], 0)
        target = out[:, g.r0:g.r1]
        if right is None:  # block rows with no blocks and no low-rank term: just the bias
            target.copy_(bias[g.r0:g.r1].expand_as(target)) if bias is not None else target.zero_()
            continue
        left = _gather(a, g.runs, extra)
        if bias is None:
            torch.mm(left, right, out=target)
        else:
            torch.addmm(bias[g.r0:g.r1], left, right, out=target)
    return out


def _scatter_mm(a, values, plan: Plan, out: torch.Tensor) -> torch.Tensor:
    """out[:, runs_g] += a[:, rows_g] @ M_g for every group, in place; returns out."""
    for g in plan.groups:
        if not g.runs:
            continue
        product = a[:, g.r0:g.r1] @ plan.packed(values, g)
        offset = 0
        for c0, c1 in g.runs:
            out[:, c0:c1] += product[:, offset:offset + c1 - c0]
            offset += c1 - c0
    return out


def _init_output(rows: int, width: int, like, z=None, w=None, bias=None):
    """(rows, width) = z @ w^T + bias (the dense part scattered products are added onto)."""
    if z is not None:
        return torch.addmm(bias, z, w.T) if bias is not None else z @ w.T
    if bias is not None:
        return bias.expand(rows, width).clone()
    return like.new_zeros(rows, width)


def _values_grad(row_side, col_side, values, plan: Plan) -> torch.Tensor:
    """dValues: for each group dM_g = row_side[:, rows_g]^T @ col_side[:, runs_g], unpacked."""
    grad = values.new_zeros(values.shape)
    for g in plan.groups:
        if not g.runs:
            continue
        grad_m = row_side[:, g.r0:g.r1].T @ _gather(col_side, g.runs, None)
        grad.index_copy_(0, g.vidx.flatten().to(grad.device), plan.unpack_grad(grad_m, g))
    return grad


class _BlockSparseLowRank(torch.autograd.Function):
    """y = x W^T + (x V) U^T + bias with W block-sparse; the 'torch' backend."""

    @staticmethod
    def forward(ctx, x2, values, bias, u, v, plan: Plan, out_features: int):
        z = x2 @ v if u is not None else None
        if plan.transposed:
            y = _init_output(x2.shape[0], out_features, x2, z, u, bias)
            _scatter_mm(x2, values, plan, y)
        else:
            y = _gather_mm(x2, values, plan, out_features, z, u, bias)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, values, u, v, z)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x2, values, u, v, z = ctx.saved_tensors
        plan: Plan = ctx.plan
        gy = gy.contiguous()
        need_x, need_values, need_bias, need_u, need_v = ctx.needs_input_grad[:5]
        gz = gy @ u if u is not None and (need_x or need_v) else None
        grad_x = grad_values = grad_bias = grad_u = grad_v = None
        if need_x:
            if plan.transposed:
                grad_x = _gather_mm(gy, values, plan, x2.shape[1], gz, v)
            else:
                grad_x = _scatter_mm(gy, values, plan, _init_output(gy.shape[0], x2.shape[1], gy, gz, v))
        if need_values:
            grad_values = (_values_grad(x2, gy, values, plan) if plan.transposed
                           else _values_grad(gy, x2, values, plan))
        if need_bias and ctx.has_bias:
            grad_bias = gy.sum(0)
        if need_u:
            grad_u = gy.T @ z
        if need_v:
            grad_v = x2.T @ gz
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
