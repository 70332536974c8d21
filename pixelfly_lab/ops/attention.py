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
* ``'torch'`` on float32 CPU tensors, where the compiled kernel is built:
  :mod:`pixelfly_lab.ops.native_attention`, FlashAttention-2 over the kept blocks, read in place
  (``PIXELFLY_NATIVE=0`` turns it off). Otherwise (other dtypes, CUDA without Triton, no compiler),
  :mod:`pixelfly_lab.ops.torch_attention`: rows of
  blocks are bucketed by their fan-in f (the number of kept blocks); a chunk of one head's rows
  of a bucket gathers their f key/value blocks and takes one softmax over each row's f * b scores, so
  memory beyond inputs and outputs is one cache-sized chunk, never T x T, and rows of unequal
  fan-in (global rows next to local ones) each pay for their own blocks only. A chunk runs in
  torch's fused CPU flash-attention kernel where that kernel applies
  (:func:`pixelfly_lab.ops.torch_attention.flash_applies`: CPU tensors, equal head widths D = Dv, a
  float dtype it takes), and its backward only when no gradient reaches the log-sum-exp (the
  random-feature layer's ``return_lse`` gives it one); otherwise (CUDA without Triton, D != Dv, a
  gradient on lse) bmm's over the chunk. The backward recomputes the probabilities from the saved
  log-sum-exp, flash-attention style.
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

import functools
import math
import os

import torch

from pixelfly_lab._compile import assume_constant
from pixelfly_lab._checks import check_int
from pixelfly_lab.ops.native_attention import native_applies, native_attention_backward, native_attention_forward
from pixelfly_lab.ops.registry import BLOCK_SIZES, derived, register_layout, registered_layout
from pixelfly_lab.ops.torch_attention import (AttentionPlan, accumulation_dtype, attention_delta,
                                              build_attention_plan, torch_attention_backward,
                                              torch_attention_forward, torch_linear_attention)
from pixelfly_lab.structure.masks import layout_to_mask

__all__ = ["block_sparse_attention", "block_attention_reference", "block_sparse_linear_attention",
           "attention_plan", "ATTENTION_BACKENDS"]

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


@assume_constant
def _register(layout: torch.Tensor, block_size: int) -> int:
    """register_layout, seen by torch.compile as a constant (a layout captured by a compiled function)."""
    return register_layout(layout, block_size)


@assume_constant
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

def attention_plan(key: int, causal: bool, device) -> AttentionPlan:
    """The torch path's plan of a registered layout on ``device``, built once per (key, causal, device).

    Args:
        key: a key from :func:`pixelfly_lab.ops.registry.register_layout`.
        causal: plan the effective layout with j <= i (the tril'ed layout, diagonal blocks masked).
        device: where the plan's index tensors live.

    Returns:
        :class:`pixelfly_lab.ops.torch_attention.AttentionPlan` (what ``torch_attention_forward`` /
        ``_backward`` take; cached by the registry, so every caller shares one).
    """
    return derived(key, "attention_plan_causal" if causal else "attention_plan",
                   lambda entry, dev: build_attention_plan(_effective_layout(key, causal), entry.block_size, causal,
                                                           dev),
                   device)


# ------------------------------------------------------------------------- dispatch + autograd

@functools.cache  # Python does not remember a failed import: without triton each call would retry it
def _triton_available() -> bool:
    try:
        from pixelfly_lab.ops import triton_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(q: torch.Tensor, block_size: int) -> bool:
    """'auto' picks Triton for CUDA tensors when it is installed and the block fits a tile."""
    return q.is_cuda and block_size in BLOCK_SIZES and _triton_available()


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
    plan = attention_plan(layout_key, causal, q.device)
    if native_applies(q, v):
        return native_attention_forward(q, k, v, plan, block_size, scale)
    return torch_attention_forward(q, k, v, plan, block_size, scale)


def _backward_impl(grad_out, grad_lse, q, k, v, out, lse, layout_key, causal, scale, backend):
    block_size = registered_layout(layout_key).block_size
    if backend == "triton":
        from pixelfly_lab.ops.triton_attention import triton_attention_backward
        delta = attention_delta(grad_out, out, lse, None if grad_lse.numel() == 0 else grad_lse)
        return triton_attention_backward(grad_out, q, k, v, lse, delta, _triton_tables(layout_key, causal, q.device),
                                         block_size, causal, scale)
    plan = attention_plan(layout_key, causal, q.device)
    dl = None if grad_lse.numel() == 0 else grad_lse
    if native_applies(q, v):
        return native_attention_backward(grad_out, q, k, v, out, lse, plan, block_size, scale, dl)
    return torch_attention_backward(grad_out.contiguous(), q, k, v, out, lse, plan, block_size, scale, dl)


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
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=accumulation_dtype(q.dtype))


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
    ctx.set_materialize_grads(False)             # an unused lse's gradient stays None (no zeros to read)


def _op_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # an unused output's gradient may come as None: zeros keep the op's schema fixed
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    # no gradient on lse travels as an empty tensor (the CPU path then runs torch's fused backward)
    grad_lse = lse.new_empty(0) if grad_lse is None else grad_lse.contiguous()
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
    return torch_linear_attention(phi_q, phi_k, v, attention_plan(key, causal, phi_q.device), block_size)
