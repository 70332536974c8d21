"""The CPU (and CUDA-without-Triton) path of block-sparse attention, in chunks of block rows.

The function is :func:`pixelfly_lab.ops.attention.block_sparse_attention`'s: softmax of
s_ij = scale * q_i . k_j over the kept entries of each row. Rows of blocks are bucketed by their
fan-in f (the number of kept blocks; a plan built once per layout key and device by the registry).
A bucket is processed a chunk of block rows at a time: the chunk gathers its rows' f key and
value blocks and takes one softmax over each row's f * b scores. The chunk is sized so that its
gathered blocks and scores stay within about ``CHUNK_BYTES`` (a cache-sized working set), so
memory beyond the inputs and outputs is O(chunk), never O(T * f * b) nor T x T, and the
gathered blocks are used while still in cache.

The backward recomputes the probabilities from the saved log-sum-exp, flash-attention style
(Dao et al. 2022, arXiv 2205.14135, Alg. 2): dV = P^T dO, dS = P * (dO V^T - Delta),
dQ = dS K, dK = dS^T Q (times ``scale``), Delta = rowsum(dO * O) - dL (L is an output too),
scattered back to the key blocks with index_add_.

Example:
    >>> layout = torch.tensor([[True, False], [True, True]])
    >>> plan = build_attention_plan(layout, 4, False, "cpu")
    >>> [bucket.cols.shape[1] for bucket in plan.buckets]       # fan-in 1 and 2
    [1, 2]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RowBucket", "AttentionPlan", "build_attention_plan", "accumulation_dtype", "attention_delta",
           "torch_attention_forward",
           "torch_attention_backward", "torch_linear_attention", "CHUNK_BYTES"]

# Working set of one chunk (gathered keys and values, scores): about an L2 cache.
CHUNK_BYTES = 2 ** 21


@dataclass(frozen=True)
class RowBucket:
    """Block rows that keep the same number of blocks.

    Attributes:
        rows: (nr,) block-row indices, ascending.
        cols: (nr, f) kept block columns of each row, ascending.
        contiguous: rows are start, start + 1, ... (sliced, not gathered).
        masked: (nr, b, f * b) True where j > i (causal, diagonal block), or None.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    contiguous: bool
    start: int
    masked: torch.Tensor | None


@dataclass(frozen=True)
class AttentionPlan:
    buckets: tuple[RowBucket, ...]


def build_attention_plan(layout_cpu: torch.Tensor, block_size: int, causal: bool, device) -> AttentionPlan:
    """Bucket the rows of an effective CPU layout (tril'ed when causal, no empty row) by fan-in.

    Args:
        layout_cpu: bool (R, R) on the CPU.
        block_size: b.
        causal: also mask j > i inside the diagonal blocks.
        device: where the plan's index tensors live.

    Returns:
        :class:`AttentionPlan`.
    """
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
            masked = masked.to(device) if masked.any() else None
        start = int(rows[0])
        contiguous = bool((rows == torch.arange(start, start + len(rows))).all())
        buckets.append(RowBucket(rows.to(device), cols.to(device), contiguous, start, masked))
    return AttentionPlan(tuple(buckets))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics of half-precision inputs in float32, as flash attention keeps them."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(bucket: RowBucket, x5: torch.Tensor, f: int):
    """(i, j) ranges of a bucket's rows, each chunk's working set about CHUNK_BYTES."""
    B, H, _, b, D = x5.shape
    per_row = B * H * f * b * (2 * D + 2 * b) * x5.element_size()       # keys, values, scores, probabilities
    size = max(1, CHUNK_BYTES // max(per_row, 1))
    n = bucket.cols.shape[0]
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _rows(x5: torch.Tensor, bucket: RowBucket, i: int, j: int) -> torch.Tensor:
    if bucket.contiguous:
        return x5[:, :, bucket.start + i:bucket.start + j]
    return x5.index_select(2, bucket.rows[i:j])


def _put(out5: torch.Tensor, bucket: RowBucket, i: int, j: int, value: torch.Tensor) -> None:
    if bucket.contiguous:
        out5[:, :, bucket.start + i:bucket.start + j] = value
    else:
        out5.index_copy_(2, bucket.rows[i:j], value)


def _cols(x5: torch.Tensor, flat_cols: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, R, b, D) -> (B, H, n, f * b, D): each row's kept key (or value) blocks."""
    B, H, _, b, D = x5.shape
    return x5.index_select(2, flat_cols).reshape(B, H, n, -1, D)


def _scores(qs_rows, k_cols, masked):
    """Scores of a chunk (B, H, n, b, f * b) in the accumulation dtype, j > i masked. qs_rows is already scaled."""
    s = qs_rows @ k_cols.transpose(-1, -2)
    acc = accumulation_dtype(s.dtype)
    if acc != s.dtype:
        s = s.to(acc)
    if masked is not None:
        s.masked_fill_(masked, float("-inf"))
    return s


def torch_attention_forward(q, k, v, plan: AttentionPlan, block_size: int, scale: float):
    """(out (B, H, T, Dv), lse (B, H, T)) of block-sparse attention on a plan."""
    B, H, T, D = q.shape
    R, b = T // block_size, block_size
    q5 = (q * scale).reshape(B, H, R, b, D)
    k5, v5 = k.reshape(B, H, R, b, D), v.reshape(B, H, R, b, v.shape[-1])
    out = q.new_empty(B, H, R, b, v.shape[-1])
    lse = q.new_empty(B, H, R, b, dtype=accumulation_dtype(q.dtype))
    for bucket in plan.buckets:
        f = bucket.cols.shape[1]
        for i, j in _chunks(bucket, k5, f):
            flat = bucket.cols[i:j].reshape(-1)
            masked = None if bucket.masked is None else bucket.masked[i:j]
            s = _scores(_rows(q5, bucket, i, j), _cols(k5, flat, j - i), masked)
            m = s.amax(-1, keepdim=True)
            s.sub_(m).exp_()                                    # unnormalised: divide the (b, Dv) output instead
            total = s.sum(-1, keepdim=True)
            _put(out, bucket, i, j, (s.to(v.dtype) @ _cols(v5, flat, j - i)).div_(total.to(v.dtype)))
            _put(lse, bucket, i, j, (m + total.log()).squeeze(-1))
    return out.reshape(B, H, T, -1), lse.reshape(B, H, T)


def attention_delta(grad_out, out, lse, grad_lse):
    """Delta_i = rowsum(dO * O)_i - dL_i: dS = P * (dP - Delta) covers both outputs (dL/dS = P)."""
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    return delta if grad_lse is None else delta - grad_lse.to(lse.dtype)


def torch_attention_backward(grad_out, q, k, v, out, lse, plan: AttentionPlan, block_size: int, scale: float,
                             grad_lse=None):
    """(dq, dk, dv) of block-sparse attention from the forward's out and lse."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    R, b = T // block_size, block_size
    q5 = (q * scale).reshape(B, H, R, b, D)
    k5, v5 = k.reshape(B, H, R, b, D), v.reshape(B, H, R, b, Dv)
    do5 = grad_out.reshape(B, H, R, b, Dv)
    lse5 = lse.reshape(B, H, R, b)
    delta5 = attention_delta(grad_out, out, lse, grad_lse).reshape(B, H, R, b)
    dq = torch.empty_like(q5)
    dk = torch.zeros_like(k5)
    dv = torch.zeros_like(v5)
    for bucket in plan.buckets:
        f = bucket.cols.shape[1]
        for i, j in _chunks(bucket, k5, f):
            n = j - i
            flat = bucket.cols[i:j].reshape(-1)
            masked = None if bucket.masked is None else bucket.masked[i:j]
            q_rows, do_rows = _rows(q5, bucket, i, j), _rows(do5, bucket, i, j)
            k_cols, v_cols = _cols(k5, flat, n), _cols(v5, flat, n)
            p = _scores(q_rows, k_cols, masked).sub_(_rows(lse5, bucket, i, j).unsqueeze(-1)).exp_()
            dv.index_add_(2, flat, (p.to(q.dtype).transpose(-1, -2) @ do_rows).reshape(B, H, n * f, b, Dv))
            ds = (do_rows @ v_cols.transpose(-1, -2)).to(p.dtype)
            ds.sub_(_rows(delta5, bucket, i, j).unsqueeze(-1)).mul_(p)
            ds = ds.to(q.dtype)
            _put(dq, bucket, i, j, (ds @ k_cols).mul_(scale))
            # q_rows already carries the scale: dK = scale * dS^T Q
            dk.index_add_(2, flat, (ds.transpose(-1, -2) @ q_rows).reshape(B, H, n * f, b, D))
    return dq.reshape(B, H, T, D), dk.reshape(B, H, T, D), dv.reshape(B, H, T, Dv)


def torch_linear_attention(phi_q, phi_k, v, plan: AttentionPlan, block_size: int) -> torch.Tensor:
    """sum_{j in S(i)} (phi_q_i . phi_k_j) v_j on a plan, plain torch ops (autograd through them)."""
    B, H, T, m = phi_q.shape
    R, b, Dv = T // block_size, block_size, v.shape[-1]
    q5, k5, v5 = phi_q.reshape(B, H, R, b, m), phi_k.reshape(B, H, R, b, m), v.reshape(B, H, R, b, Dv)
    parts, rows = [], []
    for bucket in plan.buckets:
        n = bucket.cols.shape[0]
        flat = bucket.cols.reshape(-1)
        scores = _rows(q5, bucket, 0, n) @ _cols(k5, flat, n).transpose(-1, -2)     # (B, H, nr, b, f*b)
        if bucket.masked is not None:
            scores = scores.masked_fill(bucket.masked, 0.0)
        parts.append(scores @ _cols(v5, flat, n))
        rows.append(bucket.rows)
    if len(parts) == 1 and plan.buckets[0].contiguous:
        return parts[0].reshape(B, H, T, Dv)
    out = v.new_zeros(B, H, R, b, Dv).index_copy(2, torch.cat(rows), torch.cat(parts, 2))
    return out.reshape(B, H, T, Dv)
