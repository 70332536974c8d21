"""The 'torch' backend of :mod:`pixelfly_lab.ops.matmul`: block-sparse matmul as grouped dense GEMMs.

y = x W^T + (x V) U^T + bias for W stored as its nonzero (b x b) blocks on a block layout
(storage convention in :mod:`pixelfly_lab.ops.matmul`). On the CPU, float32 products (and bfloat16
ones on AMX and AVX512-BF16 CPUs) run the plan's GEMMs as one compiled row sweep of oneDNN micro-kernels
(:mod:`pixelfly_lab.ops.native_linear`) where its kernel is built; everything below describes the
plain-PyTorch path, which runs the same plan everywhere else (no compiler, ``PIXELFLY_NATIVE=0``,
float64, fp16, other devices):

* a :class:`~pixelfly_lab.ops.torch_plan.Plan` cuts the layout into groups of consecutive block rows that read the same
  block columns (a flat block butterfly has butterfly_size of them: every block row of a cell
  row shares its set); each group's blocks are packed as one dense matrix; a group whose columns
  form at most two runs reads them as views, one GEMM per run accumulated into its output slice,
  and a product that lands in at most two column pieces is written straight into them
  (:data:`~pixelfly_lab.ops.torch_grouped.MAX_SPLIT`: no gather, no temporary); groups with more
  runs gather them into one GEMM;
* the low-rank term is one more GEMM per group on [z, 1] = [x V, 1] and [U, bias] (the bias
  folded in); in the backward gy U is one GEMM per row chunk (K = out_features runs at the
  block GEMMs' rate), and gy^T [z, 1] (dU and the bias gradient) rides in the blocks' gradient
  GEMMs as extra columns, because GEMMs with only r = 32 output columns and K = 512 rows run at
  about half the rate of the block GEMMs on a CPU;
* rows of x are swept in chunks (:data:`~pixelfly_lab.ops.torch_sweep.CHUNK_ROWS`) so that
  gathered inputs, output slices and gradient slices stay in cache; the backward computes dX and
  the blocks' gradient in one sweep; with several torch threads the chunks are shared among
  worker threads that each run torch single-threaded (:func:`~pixelfly_lab.ops.torch_sweep.sweep`),
  and the work around the sweep runs single-threaded too
  (:func:`~pixelfly_lab.ops.torch_sweep.torch_serial`: OpenMP threads left spinning would take a
  worker's core);
* when in_features > out_features the plan groups the transposed layout instead (products are
  then added into y's column runs), so that the narrower side is the one gathered; a column's
  first product is written, later ones added (:attr:`Plan.scatter_pieces`), so no output or
  gradient buffer is zero-filled first; with a low-rank term each row chunk's output is first
  written as [x V, 1] [U, bias]^T and the products added while the chunk is in cache;
* 16-bit inputs that the compiled sweep does not take (bf16/fp16 under autocast: AMX/AVX512-BF16
  GEMMs, several times faster than float32) take a *padded* plan (:func:`plan_for` with ``fill``): consecutive groups whose columns
  together form one run become one GEMM with zero blocks where a row stores none (for a flat
  block butterfly with two factors, 4 cell rows over 4 contiguous cells, 3/4 stored), so inputs
  are views and outputs are written once, for 1/3 more multiply-adds of the sparse part; and
  one row chunk per worker, so that the blocks' gradient is one GEMM accumulated in float32;
* outputs of 32 MB and more reuse retained buffers once nothing references them
  (:data:`~pixelfly_lab.ops.torch_buffers.POOL_MIN_BYTES`): glibc would map and page-fault them
  afresh on every call;
* narrow low-rank products run in the r-row orientation (:func:`~pixelfly_lab.ops.torch_grouped.times_narrow`);
* where one dense GEMM on the materialised weight is faster (small widths, budgets near 0.5),
  the product takes it instead: :func:`dense_gemm_wins` measures both routes once per shape.

The modules: :mod:`~pixelfly_lab.ops.torch_plan` (the plan), :mod:`~pixelfly_lab.ops.torch_grouped`
(the grouped GEMMs, forward and backward), :mod:`~pixelfly_lab.ops.torch_sweep` (row chunks on
worker threads), :mod:`~pixelfly_lab.ops.torch_buffers` (retained outputs); this one holds the
entry points and the choice between the grouped GEMMs and one dense GEMM.

Reference: the Pixelfly paper's block-sparse kernels (Dao, Chen et al., ICLR 2022,
arXiv 2112.00029, Sec. 4) and block-sparse GEMM on GPUs (Gray, Radford, Kingma 2017); this CPU
formulation is ours. Tested against ``F.linear`` on the dense weight (tests/test_kernels.py).
"""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from pixelfly_lab.ops.native_linear import native_applies, native_backward, native_forward
from pixelfly_lab.ops.torch_buffers import release_buffers
from pixelfly_lab.ops.torch_grouped import (gather_columns, grouped_backward, grouped_forward, scatter_columns,
                                            times_narrow)
from pixelfly_lab.ops.torch_plan import PAD_FILL, Plan, plan_for, row_bucket
from pixelfly_lab.ops.torch_sweep import torch_serial

try:   # hides a measurement from dispatch modes (FLOP counters, profilers); private in torch since 2.0
    from torch.utils._python_dispatch import _disable_current_modes as _hidden_from_modes
except ImportError:   # a torch without it: measure in the open
    _hidden_from_modes = nullcontext

# Plan, plan_for, PAD_FILL (torch_plan) and release_buffers (torch_buffers) are re-exported: the
# layout registry's callers and the tests import them from here
__all__ = ["Plan", "plan_for", "PAD_FILL", "release_buffers", "ROUTE_MIN_MACS", "ROUTE_MAX_WEIGHT", "ROUTE_MAX_MACS_16BIT",
           "dense_gemm_wins", "sparse_lowrank_forward", "sparse_lowrank_backward"]


# ----------------------------------------------------------------------------- entry points

def sparse_lowrank_forward(x2: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                           u: torch.Tensor | None, v: torch.Tensor | None, plan: Plan,
                           out_features: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = x2 W^T + (x2 V) U^T + bias with W block-sparse on ``plan``'s layout; no autograd.

    Grouped GEMMs (the module docstring), or one dense GEMM on the materialised weight where
    :func:`dense_gemm_wins` measured that faster for this shape.

    Args:
        x2: (N, in_features), contiguous rows; of the compute dtype, or wider (float32 under
            autocast: the compiled sweep rounds x2 itself, the other routes cast it first).
        values: (nnz, b, b), W's blocks in row-major layout order (see :mod:`pixelfly_lab.ops.matmul`).
        bias: (out_features,) or None.
        u: (out_features, r) or None; v: (in_features, r) or None (both or neither).
        plan: :func:`plan_for` of the layout and block size.
        out_features: rows of W.
        dtype: the compute dtype (default: values'); float32 parameters of a bfloat16 product
            are rounded by the compiled sweep as it packs them, cast first by the other routes.

    Returns:
        (y (N, out_features), z = x2 V (N, r) or None): z is what :func:`sparse_lowrank_backward`
        needs besides the inputs.

    Example:
        >>> layout = torch.eye(2, dtype=torch.bool)
        >>> y, z = sparse_lowrank_forward(torch.randn(3, 8), torch.randn(2, 4, 4), None, None, None,
        ...                               plan_for(layout, 4), 8)
        >>> y.shape, z
        (torch.Size([3, 8]), None)
    """
    dtype = dtype or values.dtype
    if dense_gemm_wins(plan, x2.shape[0], x2.shape[1], out_features, 0 if u is None else u.shape[1], values, dtype):
        return _dense_forward(x2, values, bias, u, v, plan, out_features, dtype)
    return _grouped_forward(x2, values, bias, u, v, plan, out_features, dtype)


def sparse_lowrank_backward(gy: torch.Tensor, x2: torch.Tensor, values: torch.Tensor,
                            u: torch.Tensor | None, v: torch.Tensor | None, z: torch.Tensor | None,
                            plan: Plan, needs_input_grad: tuple[bool, bool, bool, bool, bool],
                            has_bias: bool, dtype: torch.dtype | None = None):
    """Gradients of :func:`sparse_lowrank_forward` for the output gradient ``gy`` (N, out).

    dX = gy S + (gy U) V^T, dS_g = (row side)^T (gathered column side) on the layout's blocks,
    dU = gy^T z, dV = x2^T (gy U), dbias = gy^T 1.

    Args:
        gy: (N, out_features). x2, values, u, v: the forward's inputs; z: its second output.
        plan: the forward's plan.
        needs_input_grad: which of (x2, values, bias, u, v) need a gradient.
        has_bias: whether the forward had a bias.
        dtype: the forward's compute dtype (default: values').

    Returns:
        (grad_x2, grad_values, grad_bias, grad_u, grad_v), None where not needed; grad_x2 in x2's
        dtype, the others in their parameter's (the bias's: values'); no two share storage, and
        none shares it with an input.
    """
    dtype = dtype or values.dtype
    # the forward's route: decisions are cached for the life of the process, never evicted
    if dense_gemm_wins(plan, x2.shape[0], x2.shape[1], gy.shape[1], 0 if u is None else u.shape[1], values, dtype):
        grads = _dense_backward(gy, x2, values, u, v, plan, needs_input_grad, has_bias, dtype)
    else:
        grads = _grouped_backward(gy, x2, values, u, v, z, plan, needs_input_grad, has_bias, dtype)
    return _in_dtypes(grads, x2, values, u, v)


def _in_dtypes(grads: tuple, x2, values, u, v) -> tuple:
    """(dx2, dvalues, dbias, du, dv) in x2's, values', values', u's and v's dtypes (a route may
    compute them in another: the compute dtype)."""
    return tuple(g if g is None or t is None or g.dtype == t.dtype else g.to(t.dtype)
                 for g, t in zip(grads, (x2, values, values, u, v)))


def _cast(dtype: torch.dtype, *tensors) -> tuple:
    """The tensors in ``dtype`` (None stays None): parameters for a route that computes in one dtype."""
    return tuple(t if t is None else t.to(dtype) for t in tensors)


def _grouped_forward(x2, values, bias, u, v, plan: Plan, out_features: int, dtype: torch.dtype):
    """The grouped GEMMs: compiled (:mod:`pixelfly_lab.ops.native_linear`) where it takes the
    product (:func:`~pixelfly_lab.ops.native_linear.native_applies`), else in PyTorch
    (:mod:`pixelfly_lab.ops.torch_grouped`)."""
    if native_applies(x2, values, dtype):
        return native_forward(x2, values, bias, u, v, plan, out_features, dtype)
    x2 = x2.to(dtype)   # before torch_serial: the cast runs on every thread
    with torch_serial(x2):
        return grouped_forward(x2, *_cast(dtype, values, bias, u, v), plan, out_features)


def _grouped_backward(gy, x2, values, u, v, z, plan: Plan, needs_input_grad, has_bias: bool, dtype: torch.dtype):
    """The gradients of :func:`_grouped_forward`, by the same route."""
    if native_applies(x2, values, dtype):
        return native_backward(gy, x2, values, u, v, z, plan, needs_input_grad, has_bias, dtype)
    x2 = x2.to(dtype)
    with torch_serial(x2):
        return grouped_backward(gy, x2, *_cast(dtype, values, u, v), z, plan, needs_input_grad, has_bias)


# ----------------------------------------------------------------------------- the dense route

def _dense_weight(values, plan: Plan, u, v, out_features: int, in_features: int) -> torch.Tensor:
    """W = S + U V^T as a dense (out, in) matrix, S scattered from the plan's groups."""
    shape = (in_features, out_features) if plan.transposed else (out_features, in_features)
    dense = values.new_zeros(shape)
    for g in plan.groups:
        if g.runs:
            scatter_columns(dense[g.r0:g.r1], plan.packed(values, g), g.runs, write=True)
    weight = dense.T if plan.transposed else dense
    return weight if u is None else torch.addmm(weight, u, v.T)


def _dense_forward(x2, values, bias, u, v, plan: Plan, out_features: int, dtype: torch.dtype):
    """(y, z) of :func:`sparse_lowrank_forward` by one GEMM on the materialised weight, the operands
    cast to ``dtype`` first."""
    x2, values, bias, u, v = _cast(dtype, x2, values, bias, u, v)
    y = torch.nn.functional.linear(x2, _dense_weight(values, plan, u, v, out_features, x2.shape[1]), bias)
    return y, None if u is None else times_narrow(x2, v)


def _dense_backward(gy, x2, values, u, v, plan: Plan, needs_input_grad, has_bias: bool, dtype: torch.dtype):
    """Gradients by dense GEMMs in ``dtype`` (the operands cast first): dW = gy^T x2, then S's blocks,
    dU = dW V, dV = dW^T U."""
    x2, values, u, v = _cast(dtype, x2, values, u, v)
    need_x, need_values, need_bias, need_u, need_v = needs_input_grad
    grad_x = grad_values = grad_bias = grad_u = grad_v = None
    if need_x:
        grad_x = gy @ _dense_weight(values, plan, u, v, gy.shape[1], x2.shape[1])
    if need_values or need_u or need_v:
        grad_w = gy.T @ x2                                          # (out, in)
        if need_values:
            grad_values = values.new_zeros(values.shape)
            side = grad_w.T if plan.transposed else grad_w
            for g in plan.groups:
                if g.runs:
                    plan.store_grad(grad_values, gather_columns(side[g.r0:g.r1], g.runs, None), g)
        grad_u = grad_w @ v if need_u else None
        grad_v = grad_w.T @ u if need_v else None
    if need_bias and has_bias:
        grad_bias = gy.sum(0)
    return grad_x, grad_values, grad_bias, grad_u, grad_v


# Products of fewer multiply-adds than this take the grouped GEMMs unmeasured: the 'auto'
# dispatch sends them to the reference anyway, and an explicit backend='torch' on them is a
# request for the grouped path (its tests run there).
ROUTE_MIN_MACS = 2 ** 26
# Weights of at least this many entries (1024 x 4096) take the grouped GEMMs unmeasured: at
# budgets below 0.5 they won at every row count tried, and timing their dense GEMMs costs seconds.
ROUTE_MAX_WEIGHT = 2 ** 22
# 16-bit products of at most this many multiply-adds are measured whatever their weight's size:
# their GEMMs (AMX) run 4-7x faster than float32's, so the grouped route's fixed costs weigh that
# much more, and a large layer at few rows can lose to one dense GEMM (bf16 autocast, 1024 -> 4096
# at 512 rows on 2 threads: 0.87x of nn.Linear, issue 21); timing both routes there costs ~0.2 s once.
ROUTE_MAX_MACS_16BIT = 2 ** 31
_ROUTES: dict[tuple, bool] = {}


def dense_gemm_wins(plan: Plan, rows: int, in_features: int, out_features: int, rank: int,
                    like: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether one dense GEMM beats the grouped GEMMs for this product (measured once, cached).

    Measured on the CPU for products of at least :data:`ROUTE_MIN_MACS` multiply-adds with
    weights under :data:`ROUTE_MAX_WEIGHT` entries, or 16-bit products (bf16/fp16 autocast) of
    at most :data:`ROUTE_MAX_MACS_16BIT` multiply-adds whatever their weight (so the sparse layer
    is not slower than dense at small batches where AMX makes dense GEMMs fast): forward+backward of both routes on random
    operands of this shape (rows rounded up to a power of two, at most 2048), three rounds
    interleaved, the best time of each; cached per (plan, rows bucket, rank, dtype, threads) for
    the life of the process (so a backward always takes its forward's route). Elsewhere, and
    on other devices, False.

    Args:
        plan: the layout's plan; rows: rows of x; in_features, out_features: W's shape;
        rank: r of the low-rank term (0 for none); like: a tensor with the parameters' dtype and
        the device; dtype: the compute dtype (default: like's; float32 parameters of a bfloat16
        product are timed as the call runs them: the sweep rounds them, the dense route casts).

    Example:
        >>> plan = plan_for(torch.eye(4, dtype=torch.bool), 8)
        >>> dense_gemm_wins(plan, 16, 32, 32, 0, torch.zeros(1))   # too small to measure
        False
    """
    weight, dtype = in_features * out_features, dtype or like.dtype
    small_16bit = dtype in (torch.bfloat16, torch.float16) and rows * weight <= ROUTE_MAX_MACS_16BIT
    if (like.device.type != "cpu" or rows * weight < ROUTE_MIN_MACS or (weight >= ROUTE_MAX_WEIGHT and not small_16bit)
            or dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16)):
        return False
    key = (plan.signature, row_bucket(rows), rank, like.dtype, dtype, torch.get_num_threads())
    if key not in _ROUTES:
        # at most 2048 rows timed: the grouped route's advantage grows with rows, and a
        # one-time measurement should cost well under a second on an idle core
        _ROUTES[key] = _measure_routes(plan, min(row_bucket(rows), 2048), in_features, out_features, rank,
                                       dtype, like.dtype)
    return _ROUTES[key]


def _measure_routes(plan: Plan, rows: int, in_features: int, out_features: int, rank: int, dtype,
                    params: torch.dtype) -> bool:
    """True when the dense route's best forward+backward time beats the grouped route's, each as
    :func:`sparse_lowrank_forward` and :func:`sparse_lowrank_backward` run it: x and the parameters
    in ``params`` (float32 into a bfloat16 product: autocast), computed in ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    nnz = sum(int((g.vidx >= 0).sum()) for g in plan.groups)
    b = plan.block_size

    def rand(*shape, dtype=params):
        return torch.randn(*shape, generator=gen).to(dtype)
    x2, gy, values, bias = rand(rows, in_features), rand(rows, out_features, dtype=dtype), rand(nnz, b, b), rand(out_features)
    u, v = (rand(out_features, rank), rand(in_features, rank)) if rank else (None, None)
    needs = (True, True, True, rank > 0, rank > 0)

    def grouped():   # the route sparse_lowrank_forward/backward take
        _, z = _grouped_forward(x2, values, bias, u, v, plan, out_features, dtype)
        _grouped_backward(gy, x2, values, u, v, z, plan, needs, True, dtype)

    def dense():     # its casts included, as there
        _dense_forward(x2, values, bias, u, v, plan, out_features, dtype)
        _in_dtypes(_dense_backward(gy, x2, values, u, v, plan, needs, True, dtype), x2, values, u, v)

    best = {grouped: float("inf"), dense: float("inf")}
    # the measurement is no part of the caller's computation: hidden from dispatch modes such as
    # FLOP counters and profilers that are active around the call that triggered it
    with torch.no_grad(), _hidden_from_modes():
        for _ in range(3):
            for route in best:
                tick = time.perf_counter()
                route()
                best[route] = min(best[route], time.perf_counter() - tick)
    return best[dense] < best[grouped]
