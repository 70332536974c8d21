"""Triton block-sparse flash attention (forward and backward), the CUDA path of block_sparse_attention.

The function is that of :func:`pixelfly_lab.ops.attention.block_sparse_attention`: softmax
attention restricted to the kept (b x b) blocks of a (T/b, T/b) layout. The kernels follow
FlashAttention-2 (Dao 2023, arXiv 2307.08691) with the loop over key blocks replaced by a loop
over a row's kept blocks (Pixelfly, Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 4):

* forward, one program per (query block r, batch x head): online softmax over the blocks
  c in row r of the layout (CSR), writing O and the log-sum-exp L;
* dQ, one program per (query block, batch x head): recompute P = exp(S - L), dS = P * (dO V^T - Delta),
  Delta = rowsum(dO * O) - dL (the caller's; dL is the gradient of L, an output too),
  dQ = scale * dS K over the same row;
* dK and dV, one program per (key block c, batch x head): walk the rows that keep block column c
  (CSC), dV = sum P^T dO, dK = scale * sum dS^T Q. Every output block is written by exactly one
  program: no atomics.

The caller passes the *effective* layout (with ``causal``, blocks above the diagonal already
dropped, every row non-empty); causal masking inside the diagonal block is done here.
Accumulation is float32 (float64 for float64 inputs); float32 inputs use TF32 when
torch allows it for matmuls (either of torch's two TF32 APIs; :func:`pixelfly_lab._tf32.tf32_allowed`).

Triton is imported at module level, so only :mod:`pixelfly_lab.ops.attention` imports this
module, lazily, on first CUDA use. Off a GPU, ``TRITON_INTERPRET=1`` (set before triton is
imported) runs the kernels in numpy on CPU tensors: that is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pixelfly_lab._tf32 import dot_precision
from pixelfly_lab.ops.registry import BLOCK_SIZES
from pixelfly_lab.ops.triton_configs import INTERPRET
from pixelfly_lab.ops.triton_tables import build_tables

__all__ = ["BLOCK_SIZES", "attention_tables", "triton_attention_forward", "triton_attention_backward"]


def attention_tables(layout_cpu: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """CSR (row_ptr, row_cols) and CSC (col_ptr, col_rows) int32 tables of the effective layout on
    ``device``: the block-sparse matmul's tables (:func:`pixelfly_lab.ops.triton_tables.build_tables`),
    built uncached. :mod:`pixelfly_lab.ops.attention` builds them once per (layout key, causal,
    device) through the registry (the one cache) and hands them to the kernels below."""
    t = build_tables(layout_cpu, device)
    return t.row_ptr, t.row_cols, t.col_ptr, t.col_rows


def _check(q: torch.Tensor, block_size: int) -> None:
    if not (q.is_cuda or INTERPRET):
        raise ValueError("the Triton attention kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                         "before triton is imported, to run them on CPU)")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} for the Triton path, got {block_size}")


@triton.jit
def _tile_ptrs(ptr, bh, T, width, offs_rows, BLOCK_W: tl.constexpr):
    """Pointers to rows offs_rows of the (T, width) matrix of batch x head bh, and the column mask."""
    offs = tl.arange(0, BLOCK_W)
    return ptr + bh * T * width + offs_rows[:, None] * width + offs[None, :], offs[None, :] < width


@triton.jit
def _load(ptr, bh, T, width, offs_rows, BLOCK_W: tl.constexpr):
    ptrs, mask = _tile_ptrs(ptr, bh, T, width, offs_rows, BLOCK_W)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store(ptr, value, bh, T, width, offs_rows, BLOCK_W: tl.constexpr):
    ptrs, mask = _tile_ptrs(ptr, bh, T, width, offs_rows, BLOCK_W)
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, row_ptr, row_cols, scale, T, D, DV,
                    CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    r = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = r * BLOCK + tl.arange(0, BLOCK)
    q = _load(q_ptr, bh, T, D, offs_m, BLOCK_D)
    m_i = tl.full((BLOCK,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK,), ACC_DTYPE)
    acc = tl.zeros((BLOCK, BLOCK_DV), ACC_DTYPE)
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    for t in range(start, end):
        c = tl.load(row_cols + t)
        offs_n = c * BLOCK + tl.arange(0, BLOCK)
        k = _load(k_ptr, bh, T, D, offs_n, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC_DTYPE) * scale
        if CAUSAL:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        # every row keeps >= 1 entry of its first block (the caller's effective layout), so
        # m_new is finite from the first block on and no exp(-inf - -inf) appears
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_ptr, bh, T, DV, offs_n, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store(o_ptr, acc, bh, T, DV, offs_m, BLOCK_DV)
    tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log(l_i))


@triton.jit
def _probs_and_score_grads(q, k, v, do, lse, delta, offs_m, offs_n, scale, CAUSAL: tl.constexpr,
                           PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One tile of the backward: P = exp(S - lse) recomputed (causal-masked), dS = P * (dP - delta)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC_DTYPE) * scale
    p = tl.exp(s - lse[:, None])                                        # (query rows, key cols)
    if CAUSAL:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return p, p * (dp - delta[:, None])


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, row_ptr, row_cols, scale, T, D, DV,
               CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    r = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = r * BLOCK + tl.arange(0, BLOCK)
    q = _load(q_ptr, bh, T, D, offs_m, BLOCK_D)
    do = _load(do_ptr, bh, T, DV, offs_m, BLOCK_DV)
    lse = tl.load(lse_ptr + bh * T + offs_m)
    delta = tl.load(delta_ptr + bh * T + offs_m)
    dq = tl.zeros((BLOCK, BLOCK_D), ACC_DTYPE)
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    for t in range(start, end):
        c = tl.load(row_cols + t)
        offs_n = c * BLOCK + tl.arange(0, BLOCK)
        k = _load(k_ptr, bh, T, D, offs_n, BLOCK_D)
        v = _load(v_ptr, bh, T, DV, offs_n, BLOCK_DV)
        p, ds = _probs_and_score_grads(q, k, v, do, lse, delta, offs_m, offs_n, scale, CAUSAL, PRECISION,
                                       ACC_DTYPE)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    _store(dq_ptr, dq * scale, bh, T, D, offs_m, BLOCK_D)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, col_ptr, col_rows, scale,
                 T, D, DV, CAUSAL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = c * BLOCK + tl.arange(0, BLOCK)
    k = _load(k_ptr, bh, T, D, offs_n, BLOCK_D)
    v = _load(v_ptr, bh, T, DV, offs_n, BLOCK_DV)
    dk = tl.zeros((BLOCK, BLOCK_D), ACC_DTYPE)
    dv = tl.zeros((BLOCK, BLOCK_DV), ACC_DTYPE)
    start = tl.load(col_ptr + c)
    end = tl.load(col_ptr + c + 1)
    for t in range(start, end):
        r = tl.load(col_rows + t)
        offs_m = r * BLOCK + tl.arange(0, BLOCK)
        q = _load(q_ptr, bh, T, D, offs_m, BLOCK_D)
        do = _load(do_ptr, bh, T, DV, offs_m, BLOCK_DV)
        lse = tl.load(lse_ptr + bh * T + offs_m)
        delta = tl.load(delta_ptr + bh * T + offs_m)
        p, ds = _probs_and_score_grads(q, k, v, do, lse, delta, offs_m, offs_n, scale, CAUSAL, PRECISION,
                                       ACC_DTYPE)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    _store(dk_ptr, dk * scale, bh, T, D, offs_n, BLOCK_D)
    _store(dv_ptr, dv, bh, T, DV, offs_n, BLOCK_DV)


def _meta(q, v, block_size, causal):
    precision, accumulator = dot_precision(q.dtype)
    acc_dtype = getattr(tl, accumulator)
    return dict(CAUSAL=causal, BLOCK=block_size, BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
                BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])), PRECISION=precision,
                ACC_DTYPE=acc_dtype)


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_attention_forward(q, k, v, tables, block_size: int, causal: bool, scale: float):
    """(out (B, H, T, Dv), lse (B, H, T)) of block-sparse attention; q, k, v contiguous (B, H, T, D).

    ``tables`` are :func:`attention_tables` of the effective layout on q's device.
    """
    _check(q, block_size)
    B, H, T, D = q.shape
    row_ptr, row_cols, _, _ = tables
    out = q.new_empty(B, H, T, v.shape[-1])
    lse = q.new_empty(B, H, T, dtype=_stat_dtype(q.dtype))
    grid = (T // block_size, B * H)
    _forward_kernel[grid](q, k, v, out, lse, row_ptr, row_cols, scale, T, D, v.shape[-1],
                          **_meta(q, v, block_size, causal))
    return out, lse


def triton_attention_backward(grad_out, q, k, v, lse, delta, tables, block_size: int, causal: bool,
                              scale: float):
    """(dq, dk, dv) of block-sparse attention from the forward's lse and delta = rowsum(dO * O) - dlse."""
    _check(q, block_size)
    B, H, T, D = q.shape
    row_ptr, row_cols, col_ptr, col_rows = tables
    grad_out = grad_out.contiguous()
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid = (T // block_size, B * H)
    meta = _meta(q, v, block_size, causal)
    _dq_kernel[grid](q, k, v, grad_out, lse, delta, dq, row_ptr, row_cols, scale, T, D, v.shape[-1], **meta)
    _dkdv_kernel[grid](q, k, v, grad_out, lse, delta, dk, dv, col_ptr, col_rows, scale, T, D, v.shape[-1],
                       **meta)
    return dq, dk, dv
