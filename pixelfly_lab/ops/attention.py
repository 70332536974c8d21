"""Block-sparse softmax attention: only the kept (b x b) blocks of the T x T scores are computed.

Given queries, keys and values Q, K, V of shape (B, H, T, D) and a boolean block layout L of
shape (T/b, T/b), the attention of query i is

    out_i = sum_{j in S(i)} softmax_j(s_ij) v_j,   s_ij = scale * q_i . k_j,

where S(i) = {j : L[i // b, j // b]} (and j <= i when ``causal``): each row is normalised over its
kept entries only. This is the sparse part of Pixelfly attention (Dao, Chen et al., "Pixelated
Butterfly", ICLR 2022, arXiv 2112.00029, Sec. 4 and the Long Range Arena experiment), where L is a
flat block butterfly layout of the scores; any layout works (local, BigBird, global rows ...).

Three paths compute the same function:

* ``'reference'``: a dense (T, T) masked softmax, obviously correct, O(T^2) memory; for tests.
* ``'torch'`` (CPU, and CUDA without Triton): rows of blocks are bucketed by their fan-in f (the
  number of kept blocks); a bucket gathers the f key/value blocks of each of its rows and takes
  one softmax over the row's f * b scores, so scores cost O(T * f * b) memory, never T x T, and
  rows of unequal fan-in (global rows next to local ones) each pay for their own blocks only.
  The backward recomputes the probabilities from the saved log-sum-exp, flash-attention style
  (Dao et al. 2022, arXiv 2205.14135, Alg. 2): dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
  dQ = dS K, dK = dS^T Q (times ``scale``), scattered back to the key blocks with index_add_.
* ``'triton'`` (CUDA): block-sparse flash attention, forward and backward, in
  :mod:`pixelfly_lab.ops.triton_attention` (imported on first CUDA use only).

The forward (returning O and the log-sum-exp L) and the backward are registered as
``torch.library`` custom ops (``pixelfly_lab::block_attention_fwd`` / ``_bwd``) so that
``torch.compile(fullgraph=True)`` traces through them. :func:`block_sparse_linear_attention`
is the same sum with the scores phi(q_i).phi(k_j) instead of exp(s_ij), unnormalised: the
discount term of Scatterbrain's sparse + low-rank attention.

Example:
    >>> q, k, v = torch.randn(3, 1, 2, 8, 4).unbind(0)
    >>> layout = torch.tensor([[True, False], [True, True]])
    >>> out = block_sparse_attention(q, k, v, layout, block_size=4)
    >>> ref = block_sparse_attention(q, k, v, layout, block_size=4, backend="reference")
    >>> torch.allclose(out, ref, atol=1e-6)
    True
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from pixelfly_lab._checks import check_int
from pixelfly_lab.ops.registry import derived, register_layout, registered_layout
from pixelfly_lab.structure.masks import layout_to_mask

__all__ = ["block_sparse_attention", "block_attention_reference", "block_sparse_linear_attention",
           "ATTENTION_BACKENDS"]

ATTENTION_BACKENDS = ("auto", "reference", "torch", "triton")


# ----------------------------------------------------------------------------------- checks

def _check_inputs(q, k, v, layout, block_size, causal, scale):
    """Validate arguments (registering a layout tensor); returns (layout key, block_size, scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, H, T, Dv) with (B, H, T) = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    block_size = check_int("block_size", block_size)
    T = q.shape[2]
    if T == 0:
        raise ValueError("sequence length T (q.shape[2]) must be >= 1, got 0")
    if T % block_size:
        raise ValueError(f"sequence length T={T} (q.shape[2]) is not a multiple of block_size={block_size}")
    n_blocks = T // block_size
    if isinstance(layout, int) and not isinstance(layout, bool):
        entry = registered_layout(layout)
        if entry.block_size != block_size:
            raise ValueError(f"layout key {layout} was registered with block_size={entry.block_size}, "
                             f"not block_size={block_size}")
        shape = tuple(entry.layout.shape)
    elif isinstance(layout, torch.Tensor) and layout.dtype == torch.bool:
        shape = tuple(layout.shape)
    else:
        raise ValueError(f"layout must be a bool tensor or a key from register_layout, got "
                         f"{getattr(layout, 'dtype', type(layout).__name__)}")
    if shape != (n_blocks, n_blocks):
        raise ValueError(f"layout must have shape (T/b, T/b) = ({n_blocks}, {n_blocks}) for T={T}, "
                         f"block_size={block_size}; got {shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])     # the usual softmax(Q K^T / sqrt(D))
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    # a tensor is registered here (one host read per call: layers register once and pass the key)
    key = layout if isinstance(layout, int) else _register(layout, block_size)
    _rows_checked(key, causal)                   # raises for a row with no block, once per key
    return key, block_size, float(scale)


@torch.compiler.assume_constant_result
def _register(layout: torch.Tensor, block_size: int) -> int:
    """register_layout, seen by torch.compile as a constant (a layout captured by a compiled function)."""
    return register_layout(layout, block_size)


@torch.compiler.assume_constant_result
def _rows_checked(key: int, causal: bool) -> bool:
    """True once every row of the registered layout keeps a block (host-side, cached per key)."""
    _effective_layout(key, causal)
    return True


def _check_rows(layout: torch.Tensor, causal: bool) -> torch.Tensor:
    """The layout of blocks that hold at least one kept score; raises for an empty row."""
    if causal:
        layout = torch.tril(layout)              # blocks above the diagonal hold no c <= r entry
    empty = (~layout.any(1)).nonzero().flatten()
    if len(empty):
        why = " at or below the diagonal (causal)" if causal else ""
        raise ValueError(f"layout rows {empty[:8].tolist()} keep no block{why}: their softmax would "
                         f"be over no entry (NaN); keep at least one block per row, e.g. the diagonal")
    return layout


def _effective_layout(key: int, causal: bool) -> torch.Tensor:
    """The registered layout's effective CPU layout (tril when causal), checked once per (key, causal)."""
    return derived(key, "attention_layout_causal" if causal else "attention_layout",
                   lambda entry: _check_rows(entry.layout, causal))


# ------------------------------------------------------------------------------- reference

def block_attention_reference(q, k, v, layout, block_size: int, *, causal: bool = False,
                              scale: float | None = None, return_lse: bool = False):
    """Dense masked softmax attention on the layout: O(T^2) memory, the oracle of the fast paths.

    Same arguments and result as :func:`block_sparse_attention`.
    """
    key, block_size, scale = _check_inputs(q, k, v, layout, block_size, causal, scale)
    mask = layout_to_mask(registered_layout(key).layout.to(q.device), block_size)
    if causal:
        mask = torch.tril(mask)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


# ------------------------------------------------------------------------------ torch path

@dataclass(frozen=True)
class _Bucket:
    """Block rows that keep the same number of blocks."""
    rows: torch.Tensor                # (nr,) block-row indices
    cols: torch.Tensor                # (nr, f) kept block columns of each row, ascending
    flat_cols: torch.Tensor           # (nr * f,) = cols.flatten(), for index_add_
    all_rows: bool                    # rows == arange(R): no gather / scatter of rows needed
    masked: torch.Tensor | None       # (nr, b, f * b) True where j > i (causal, diagonal block)


@dataclass(frozen=True)
class _Plan:
    buckets: tuple[_Bucket, ...]


def _plan(key: int, causal: bool, device) -> _Plan:
    """The torch path's plan of a registered layout on ``device``, built once per (key, causal, device)."""
    return derived(key, "attention_plan_causal" if causal else "attention_plan",
                   lambda entry, dev: _build_plan(_effective_layout(key, causal), entry.block_size, causal, dev),
                   device)


def _build_plan(layout_cpu: torch.Tensor, block_size: int, causal: bool, device) -> _Plan:
    R = layout_cpu.shape[0]
    fan_in = layout_cpu.sum(1)
    buckets = []
    for f in sorted(set(fan_in.tolist())):
        rows = (fan_in == f).nonzero().flatten()
        # nonzero is row-major, so each row's columns come out ascending
        cols = layout_cpu[rows].nonzero()[:, 1].reshape(len(rows), f)
        masked = None
        if causal:
            on_diagonal = cols == rows[:, None]                                   # (nr, f)
            i = torch.arange(block_size)
            upper = i[None, :] > i[:, None]                                       # (b, b): j > i
            masked = (on_diagonal[:, None, :, None] & upper[None, :, None, :])    # (nr, b, f, b)
            masked = masked.reshape(len(rows), block_size, f * block_size)
            if not masked.any():
                masked = None
            else:
                masked = masked.to(device)
        buckets.append(_Bucket(rows.to(device), cols.to(device), cols.flatten().to(device),
                               len(rows) == R, masked))
    return _Plan(tuple(buckets))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # softmax statistics of half-precision inputs in float32, as flash attention keeps them
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _gather_rows(x5: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
    return x5 if bucket.all_rows else x5.index_select(2, bucket.rows)


def _gather_cols(x5: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
    """(B, H, R, b, D) -> (B, H, nr, f * b, D): each row's kept key (or value) blocks."""
    B, H, _, b, D = x5.shape
    nr, f = bucket.cols.shape
    # index_select copies whole (b, D) blocks; ~15% faster than advanced indexing here
    return x5.index_select(2, bucket.flat_cols).reshape(B, H, nr, f * b, D)


def _probabilities(qs_rows, k_cols, bucket, lse=None):
    """Scores of a bucket, softmaxed in place; returns (P, lse). qs_rows is already scaled."""
    s = qs_rows @ k_cols.transpose(-1, -2)                       # (B, H, nr, b, f * b)
    acc = _acc_dtype(s.dtype)
    if acc != s.dtype:
        s = s.to(acc)
    if bucket.masked is not None:
        s.masked_fill_(bucket.masked, float("-inf"))
    if lse is None:
        m = s.amax(-1, keepdim=True)
        s.sub_(m).exp_()
        total = s.sum(-1, keepdim=True)
        s.div_(total)
        return s, (m + total.log()).squeeze(-1)
    return s.sub_(lse.unsqueeze(-1)).exp_(), lse


def _torch_forward(q, k, v, plan: _Plan, block_size: int, scale: float):
    B, H, T, D = q.shape
    R, b = T // block_size, block_size
    q5 = (q * scale).reshape(B, H, R, b, D)
    k5, v5 = k.reshape(B, H, R, b, D), v.reshape(B, H, R, b, v.shape[-1])
    out = q.new_empty(B, H, R, b, v.shape[-1])
    lse = q.new_empty(B, H, R, b, dtype=_acc_dtype(q.dtype))
    for bucket in plan.buckets:
        p, row_lse = _probabilities(_gather_rows(q5, bucket), _gather_cols(k5, bucket), bucket)
        o = p.to(v.dtype) @ _gather_cols(v5, bucket)            # (B, H, nr, b, Dv)
        if bucket.all_rows:
            out, lse = o, row_lse
        else:
            out[:, :, bucket.rows] = o
            lse[:, :, bucket.rows] = row_lse
    return out.reshape(B, H, T, -1), lse.reshape(B, H, T)


def _delta(grad_out, out, lse, grad_lse):
    """Delta_i = rowsum(dO * O)_i - dL_i: dS = P * (dP - Delta) covers both outputs (dL/dS = P)."""
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    return delta if grad_lse is None else delta - grad_lse.to(lse.dtype)


def _torch_backward(grad_out, q, k, v, out, lse, plan: _Plan, block_size: int, scale: float, grad_lse=None):
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    R, b = T // block_size, block_size
    q5 = (q * scale).reshape(B, H, R, b, D)
    k5, v5 = k.reshape(B, H, R, b, D), v.reshape(B, H, R, b, Dv)
    do5 = grad_out.reshape(B, H, R, b, Dv)
    lse5 = lse.reshape(B, H, R, b)
    delta5 = _delta(grad_out, out, lse, grad_lse).reshape(B, H, R, b)
    dq = torch.empty_like(q5)
    dk = torch.zeros_like(k5)
    dv = torch.zeros_like(v5)
    for bucket in plan.buckets:
        nr, f = bucket.cols.shape
        q_rows, do_rows = _gather_rows(q5, bucket), _gather_rows(do5, bucket)
        k_cols, v_cols = _gather_cols(k5, bucket), _gather_cols(v5, bucket)
        p, _ = _probabilities(q_rows, k_cols, bucket, _gather_rows(lse5, bucket))
        p_in = p.to(q.dtype)
        dv.index_add_(2, bucket.flat_cols, (p_in.transpose(-1, -2) @ do_rows).reshape(B, H, nr * f, b, Dv))
        ds = (do_rows @ v_cols.transpose(-1, -2)).to(p.dtype)
        ds.sub_(_gather_rows(delta5, bucket).unsqueeze(-1)).mul_(p)
        ds = ds.to(q.dtype)
        dq_rows = (ds @ k_cols).mul_(scale)
        if bucket.all_rows:
            dq = dq_rows
        else:
            dq[:, :, bucket.rows] = dq_rows
        # q_rows already carries the scale: dK = scale * dS^T Q
        dk.index_add_(2, bucket.flat_cols, (ds.transpose(-1, -2) @ q_rows).reshape(B, H, nr * f, b, D))
    return dq.reshape(B, H, T, D), dk.reshape(B, H, T, D), dv.reshape(B, H, T, Dv)


# ------------------------------------------------------------------------- dispatch + autograd

def _use_triton(q: torch.Tensor, block_size: int) -> bool:
    """'auto' picks Triton for CUDA tensors when it is installed and the block fits a tile."""
    if not q.is_cuda:
        return False
    try:
        from pixelfly_lab.ops.triton_attention import BLOCK_SIZES
    except ImportError:
        return False
    return block_size in BLOCK_SIZES


def _triton_tables(key: int, causal: bool, device):
    """The Triton kernels' CSR/CSC tables of a registered layout, once per (key, causal, device)."""
    from pixelfly_lab.ops.triton_attention import attention_tables
    return derived(key, "attention_triton_causal" if causal else "attention_triton",
                   lambda entry, dev: attention_tables(_effective_layout(key, causal), dev), device)


def _forward_impl(q, k, v, layout_key, causal, scale, backend):
    block_size = registered_layout(layout_key).block_size
    if backend == "triton":
        from pixelfly_lab.ops.triton_attention import triton_attention_forward
        return triton_attention_forward(q, k, v, _triton_tables(layout_key, causal, q.device), block_size,
                                        causal, scale)
    return _torch_forward(q, k, v, _plan(layout_key, causal, q.device), block_size, scale)


def _backward_impl(grad_out, grad_lse, q, k, v, out, lse, layout_key, causal, scale, backend):
    block_size = registered_layout(layout_key).block_size
    if backend == "triton":
        from pixelfly_lab.ops.triton_attention import triton_attention_backward
        delta = _delta(grad_out, out, lse, grad_lse)
        return triton_attention_backward(grad_out, q, k, v, lse, delta, _triton_tables(layout_key, causal, q.device),
                                         block_size, causal, scale)
    return _torch_backward(grad_out.contiguous(), q, k, v, out, lse, _plan(layout_key, causal, q.device),
                           block_size, scale, grad_lse)


# Registered ops (torch >= 2.4): torch.compile sees one opaque node with a fake (shape-only)
# implementation instead of tracing Python control flow that depends on the layout's values.
# The layout travels as its registry key (an int): nothing is read from a tensor per call.
@torch.library.custom_op("pixelfly_lab::block_attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_key: int, causal: bool,
                      scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _forward_impl(q, k, v, layout_key, causal, scale, backend)
    return out.contiguous(), lse.contiguous()


@_attention_fwd_op.register_fake
def _(q, k, v, layout_key, causal, scale, backend):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("pixelfly_lab::block_attention_bwd", mutates_args=())
def _attention_bwd_op(grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, layout_key: int, causal: bool,
                      scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _backward_impl(grad_out, grad_lse, q, k, v, out, lse, layout_key, causal, scale, backend)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_bwd_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, layout_key, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, layout_key, causal, scale, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.args = (layout_key, causal, scale, backend)


def _op_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # an unused output's gradient may come as None: zeros keep the op's schema fixed
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
    dq, dk, dv = _attention_bwd_op(grad_out, grad_lse, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None


_attention_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor | int,
                           block_size: int, *, causal: bool = False, scale: float | None = None,
                           backend: str = "auto", return_lse: bool = False):
    """Softmax attention restricted to the kept blocks of a (T/b, T/b) layout.

    out_i = sum_{j in S(i)} exp(s_ij - lse_i) v_j with s_ij = scale * q_i . k_j,
    lse_i = log sum_{j in S(i)} exp(s_ij), S(i) = {j : layout[i // b, j // b]} (and j <= i if
    ``causal``). Only the kept blocks are computed: time and memory O(T * fan-in * b), never T x T.

    Args:
        q, k: (B, H, T, D) queries and keys; v: (B, H, T, Dv) values; same dtype and device.
        layout: the int key of a bool (T / block_size, T / block_size) layout registered with
            :func:`pixelfly_lab.ops.registry.register_layout` (what layers pass: nothing is read,
            planned or hashed per call; plans are cached per (key, causal, device)), or the bool
            layout itself (registered here on every call: a host read and a hash, a device sync
            if it lives on a GPU). Every row must keep at least one entry (with ``causal``: at
            least one block at or left of the diagonal).
        block_size: b, the side of a block; T must be a multiple of it.
        causal: also drop j > i (decoder attention).
        scale: score scale; default 1 / sqrt(D), the scaled dot-product attention of Vaswani et al.
        backend: 'auto' (Triton on CUDA when installed, else 'torch'), 'torch', 'triton' or
            'reference' (dense masked softmax, for tests).
        return_lse: also return lse (B, H, T), differentiable: sparse + low-rank attention
            (:class:`pixelfly_lab.nn.attention.PixelflyAttention`) weighs the exact part by exp(lse).

    Returns:
        (B, H, T, Dv), or (out, lse) with ``return_lse``.

    Example:
        >>> from pixelfly_lab.structure.masks import flat_butterfly_mask
        >>> q = k = v = torch.randn(1, 2, 64, 16)
        >>> block_sparse_attention(q, k, v, flat_butterfly_mask(8, 2), 8, causal=True).shape
        torch.Size([1, 2, 64, 16])
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return block_attention_reference(q, k, v, layout, block_size, causal=causal, scale=scale,
                                         return_lse=return_lse)
    key, block_size, scale = _check_inputs(q, k, v, layout, block_size, causal, scale)
    if backend == "auto":
        backend = "triton" if _use_triton(q, block_size) else "torch"
    elif backend == "triton" and not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("backend='triton' needs CUDA tensors (q is on the CPU; TRITON_INTERPRET=1 "
                         "runs the kernels on CPU tensors, for tests)")
    out, lse = _attention_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), key, causal, scale, backend)
    return (out, lse) if return_lse else out


def block_sparse_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                                  layout: torch.Tensor | int,
                                  block_size: int, *, causal: bool = False) -> torch.Tensor:
    """Unnormalised kernel attention on the layout: sum_{j in S(i)} (phi_q_i . phi_k_j) v_j.

    The low-rank (random-feature) estimate restricted to the sparse support, which Scatterbrain
    (Chen et al., NeurIPS 2021, arXiv 2110.15343) subtracts so that no score is counted twice.
    Computed on the gathered blocks with plain torch ops (autograd through them): memory
    O(T * fan-in * b), like :func:`block_sparse_attention`.

    Args:
        phi_q, phi_k: (B, H, T, m) features; v: (B, H, T, Dv); layout, block_size, causal: as
            :func:`block_sparse_attention`.

    Returns:
        (B, H, T, Dv).

    Example:
        >>> phi = torch.rand(1, 1, 8, 3)
        >>> v = torch.randn(1, 1, 8, 2)
        >>> full = block_sparse_linear_attention(phi, phi, v, torch.ones(2, 2, dtype=torch.bool), 4)
        >>> torch.allclose(full, (phi @ phi.transpose(-1, -2)) @ v, atol=1e-6)
        True
    """
    key, block_size, _ = _check_inputs(phi_q, phi_k, v, layout, block_size, causal, None)
    plan = _plan(key, causal, phi_q.device)
    B, H, T, m = phi_q.shape
    R, b, Dv = T // block_size, block_size, v.shape[-1]
    q5, k5, v5 = phi_q.reshape(B, H, R, b, m), phi_k.reshape(B, H, R, b, m), v.reshape(B, H, R, b, Dv)
    out = v.new_zeros(B, H, R, b, Dv)
    for bucket in plan.buckets:
        scores = _gather_rows(q5, bucket) @ _gather_cols(k5, bucket).transpose(-1, -2)   # (B, H, nr, b, f*b)
        if bucket.masked is not None:
            scores = scores.masked_fill(bucket.masked, 0.0)
        rows = scores @ _gather_cols(v5, bucket)
        out = rows if bucket.all_rows else out.index_copy(2, bucket.rows, rows)
    return out.reshape(B, H, T, Dv)
