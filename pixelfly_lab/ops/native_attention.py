"""The compiled CPU kernel of block-sparse attention: FlashAttention-2 over the kept blocks, read in place.

The function is :func:`pixelfly_lab.ops.attention.block_sparse_attention`'s (softmax of
s_ij = scale * q_i . k_j over each row's kept entries), for float32 CPU tensors. ``csrc/attention_cpu.cpp``
follows FlashAttention-2 (Dao 2023, arXiv 2307.08691; forward Alg. 1, backward Alg. 2) on the layout's
CSR of kept blocks (``plan.row_ptr``, ``plan.col_index``, built with the plan): for each (batch, head) and
block row i it multiplies Q_i with each kept key block K_j where it lies in the (B, H, T, D) tensor, so
no key or value block is gathered, no gathered gradient is zero-filled and none is scattered back
(the chunk paths' index_select / index_add_, a third of their time at T = 4096). The block products are
oneDNN's batch-reduce GEMM micro-kernels (``at::native::cpublas::brgemm``). A row's f * b scores fit in
cache, so its softmax is taken over the whole row at once; the backward recomputes the probabilities
from the saved log-sum-exp, with Delta = rowsum(dO * O) - dL, so a gradient on lse is taken too (the
fused chunks' backward takes none). (batch, head) pairs are split between threads (dK and dV add up
over a head's rows, which run in order).

Used by the registered op whenever :func:`native_applies` (CPU float32 inputs and the kernel built:
see :mod:`pixelfly_lab.ops.native`, ``PIXELFLY_NATIVE=0`` turns it off); otherwise the chunk paths of
:mod:`pixelfly_lab.ops.torch_attention` run, the same function to rounding. At T = 4096, 8 heads of 64, fan-in 8,
block 32, one thread, forward+backward, interleaved in one process (``bench/attention_bench.py
--chunks-only``, three runs at load 1.6-2.3 on 2 cores): 12.2x SDPA (median of 12.0-12.5x; the fused
chunks 7.0x), causal 8.1x (4.4x): ~21 ms forward and ~49 ms backward, 107 GFLOP/s over the call
where one dense (4096, 512) @ (512, 512) GEMM ran at 178 (a one-off ``perf`` session, no bench prints it:
70-77% of the time in the micro-kernels, at ~150). The full table (``bench/attention_bench.py``, quiet,
load 0.7-1.1): kernel 11.5x SDPA at T = 4096 (causal 7.4x), 22.1x at 8192, 35.6x at 16384; peak memory
0.78-0.85x SDPA's from T = 1024 to 16384.

Example:
    >>> from pixelfly_lab.ops.torch_attention import build_attention_plan
    >>> plan = build_attention_plan(torch.tensor([[True, False], [True, True]]), 4, False, "cpu")
    >>> plan.row_ptr.tolist(), plan.col_index.tolist()
    ([0, 1, 3], [0, 0, 1])
"""

from __future__ import annotations

import torch

from pixelfly_lab.ops import native
from pixelfly_lab.ops.torch_attention import AttentionPlan

__all__ = ["native_applies", "native_attention_forward", "native_attention_backward"]

SOURCE = "attention_cpu"


def native_applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the compiled kernel takes these inputs: CPU float32 q and v (any head widths) and the
    kernel built (:func:`pixelfly_lab.ops.native.load`: None when turned off or no compiler works)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and v.dtype == torch.float32
            and native.load(SOURCE) is not None)


def _module():
    module = native.load(SOURCE)
    if module is None:
        raise RuntimeError(f"the compiled kernel {SOURCE!r} is not available (PIXELFLY_NATIVE=0 or no compiler): "
                           "check native_applies before calling it")
    return module


def _csr(plan: AttentionPlan):
    if not isinstance(plan, AttentionPlan) or plan.row_ptr is None:
        raise TypeError(f"plan must be an AttentionPlan from build_attention_plan, got {type(plan).__name__}")
    return plan.row_ptr, plan.col_index


def native_attention_forward(q, k, v, plan: AttentionPlan, block_size: int, scale: float):
    """(out (B, H, T, Dv), lse (B, H, T)) of block-sparse attention on a plan, in the compiled kernel.

    Args:
        q, k: (B, H, T, D) float32 CPU; v: (B, H, T, Dv) float32 CPU.
        plan: the layout's :class:`AttentionPlan` (its CSR and ``causal``).
        block_size: b; scale: the score scale (> 0).
    """
    row_ptr, cols = _csr(plan)
    return tuple(_module().forward(q.contiguous(), k.contiguous(), v.contiguous(), row_ptr, cols, block_size,
                                   plan.causal, float(scale)))


def native_attention_backward(grad_out, q, k, v, out, lse, plan: AttentionPlan, block_size: int, scale: float,
                              grad_lse=None):
    """(dq, dk, dv) of block-sparse attention from the forward's out and lse, in the compiled kernel.

    Args:
        grad_out: (B, H, T, Dv); q, k, v, out, lse: the forward's inputs and outputs.
        grad_lse: (B, H, T) gradient reaching lse, or None.
    """
    row_ptr, cols = _csr(plan)
    dl = lse.new_empty(0) if grad_lse is None else grad_lse.contiguous().to(torch.float32)
    return tuple(_module().backward(grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                    out.contiguous(), lse.contiguous(), dl, row_ptr, cols, block_size, plan.causal,
                                    float(scale)))
