"""The CPU (and CUDA-without-Triton) path of block-sparse attention, in chunks of block rows.

Float32 CPU inputs run the compiled kernel instead where it is built
(:mod:`pixelfly_lab.ops.native_attention`, which reads the plan's CSR, ``AttentionPlan.row_ptr`` and
``col_index``); the chunk paths here serve the other dtypes, CUDA without Triton, machines without a
compiler and ``PIXELFLY_NATIVE=0``.

The function is :func:`pixelfly_lab.ops.attention.block_sparse_attention`'s: softmax of
s_ij = scale * q_i . k_j over the kept entries of each row. Rows of blocks are bucketed by their
fan-in f (the number of kept blocks; a plan built once per layout key and device by the registry).
A bucket is processed one (batch, head) at a time and a chunk of block rows at a time: the chunk
gathers its rows' f key and value blocks (one ``index_select`` each, into buffers reused by every
chunk) and takes one softmax over each row's f * b scores, with the fan-in rows as the batch of
each ``bmm`` (n, b, D) @ (n, D, f * b). One head's keys and values (R x b x D) stay in cache while
its chunks gather from them. The chunk is sized so that its gathered blocks and scores stay within
about ``CHUNK_BYTES`` (half of it for the fused chunks below), so a call's memory beyond the inputs
and outputs is O(chunk), never O(T * f * b) nor T x T (a causal plan, cached once per layout,
keeps a boolean j > i mask over its rows' kept blocks, T * f * b bytes); exp, normalisation and
the scale are applied in place, results of contiguous rows are written straight into the output
(``out=``).

The backward recomputes the probabilities from the saved log-sum-exp, flash-attention style
(Dao et al. 2022, arXiv 2205.14135, Alg. 2): dV = P^T dO, dS = P * (dO V^T - Delta),
dQ = dS K, dK = dS^T Q (times ``scale``), Delta = rowsum(dO * O) - dL (L is an output too),
scattered back to the key blocks with index_add_.

Two ways to do a chunk, the same function: on the CPU, with equal head widths (:func:`flash_applies`),
torch's fused flash-attention kernel (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
backward) takes the chunk's queries (n, 1, b, D) against their gathered keys (n, 1, f * b, D), the
causal diagonal block as an additive mask; it does scores, softmax and products in cache-sized tiles.
Its backward takes no gradient on L, so a call whose L gets one (the random-feature layer) runs the
other way: bmm's over the chunk, with exp, normalisation and the scale in place (also the CUDA path
without Triton). At T = 4096, 8 heads of 64, fan-in 8, one thread, forward+backward, interleaved in
one process on a quiet machine (``bench/attention_bench.py --chunks-only``): fused 6.83x SDPA against
bmm's 6.75x, causal 3.71x against 3.41x.

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
           "torch_attention_forward", "torch_attention_backward", "torch_linear_attention", "flash_applies",
           "CHUNK_BYTES"]

# Working set of one head's chunk (gathered keys and values, scores, their gradient). 1 to 32 MiB
# measured at T = 4096 and 16384 (one thread, fwd+bwd, interleaved): 8 MiB the fastest by a few %
# (the fused chunks take half of it). Peak memory with the fused chunks (8 heads of 64, fan-in 8 at
# T = 4096; quiet machine, bench/attention_bench.py): kernel 0.99x SDPA's at T = 4096, 0.87x at 16384,
# 1.45x at 1024 (non-causal; 12 MB SDPA).
CHUNK_BYTES = 2 ** 23


@dataclass(frozen=True)
class RowBucket:
    """Block rows that keep the same number of blocks.

    Attributes:
        rows: (nr,) block-row indices, ascending.
        cols: (nr, f) kept block columns of each row, ascending.
        contiguous: rows are start, start + 1, ... (sliced, not gathered).
        masked: (nr, b, f * b) True where j > i (causal, diagonal block), or None.
        upper: (b, b) True where j > i when every row's last kept block is its diagonal (the
            causal case): the kernels then mask only that block; None otherwise.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    contiguous: bool
    start: int
    masked: torch.Tensor | None
    upper: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionPlan:
    """Rows bucketed by fan-in (the chunk paths), and the same layout as a CSR of kept block columns
    (the compiled kernel's, :mod:`pixelfly_lab.ops.native_attention`).

    Attributes:
        buckets: :class:`RowBucket` per fan-in, ascending.
        row_ptr: (R + 1,) int64 offsets into ``col_index`` (CPU), or None.
        col_index: kept block columns of every row, row after row, each row's ascending (CPU), or None.
        causal: the plan masks j > i in the diagonal blocks.
    """

    buckets: tuple[RowBucket, ...]
    row_ptr: torch.Tensor | None = None
    col_index: torch.Tensor | None = None
    causal: bool = False


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
        masked = last = None
        if causal:
            on_diagonal = cols == rows[:, None]                                   # (nr, f)
            i = torch.arange(block_size)
            upper = i[None, :] > i[:, None]                                       # (b, b): j > i
            masked = (on_diagonal[:, None, :, None] & upper[None, :, None, :])    # (nr, b, f, b)
            masked = masked.reshape(len(rows), block_size, f * block_size)
            masked = masked.to(device) if masked.any() else None
            # a tril'ed layout keeps no block right of the diagonal: when every row keeps it, it is the last
            last = upper.to(device) if bool(on_diagonal[:, -1].all()) else None
        start = int(rows[0])
        contiguous = bool((rows == torch.arange(start, start + len(rows))).all())
        buckets.append(RowBucket(rows.to(device), cols.to(device), contiguous, start, masked, last))
    row_ptr = torch.zeros(len(fan_in) + 1, dtype=torch.int64)
    torch.cumsum(fan_in, 0, out=row_ptr[1:])
    # the CSR stays on the CPU: only the compiled CPU kernel reads it
    return AttentionPlan(tuple(buckets), row_ptr, layout_cpu.nonzero()[:, 1].contiguous(), causal)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics of half-precision inputs in float32, as flash attention keeps them."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _rows_per_chunk(bucket: RowBucket, b: int, D: int, Dv: int, itemsize: int, fused: bool = False) -> int:
    """Block rows of one head per chunk: gathered keys and values, and scores and their gradient within
    CHUNK_BYTES (bmm's), or the gathered keys' and values' gradients within CHUNK_BYTES // 2 (the fused
    kernel's, whose own tiles hold the scores)."""
    f = bucket.cols.shape[1]
    per_row = f * b * (2 * (D + Dv) if fused else D + Dv + 2 * b) * itemsize
    # the fused chunks were as fast at CHUNK_BYTES / 2 (T = 1024, 4096) and hold less beside SDPA's memory
    return max(1, min(bucket.cols.shape[0], (CHUNK_BYTES // 2 if fused else CHUNK_BYTES) // per_row))


def _chunks(bucket: RowBucket, n: int) -> list:
    """(rows, flat, masked) of each chunk of a bucket, made once per call and used for every head:
    rows is a slice of the block rows or their index, flat the chunk's kept block columns (n * f,),
    masked the chunk's part of ``bucket.masked`` (None when there is none or ``bucket.upper`` does it)."""
    chunks = []
    for i in range(0, bucket.cols.shape[0], n):
        j = min(i + n, bucket.cols.shape[0])
        rows = slice(bucket.start + i, bucket.start + j) if bucket.contiguous else bucket.rows[i:j]
        masked = None if bucket.masked is None or bucket.upper is not None else bucket.masked[i:j]
        chunks.append((rows, bucket.cols[i:j].reshape(-1), masked))
    return chunks


def _take(x: torch.Tensor, rows) -> torch.Tensor:
    """Block rows of one head's (R, ...) tensor: a view for a slice, a copy for an index."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _give(x: torch.Tensor, rows, value: torch.Tensor) -> None:
    """Write block rows of one head's (R, ...) tensor (nothing to do when value is already that view)."""
    if isinstance(rows, slice):
        if value.data_ptr() != x[rows].data_ptr():
            x[rows] = value
    else:
        x.index_copy_(0, rows, value)


def _into(x: torch.Tensor, rows, dtype: torch.dtype):
    """The out= view for a contiguous chunk's result (written in place), or None."""
    return x[rows] if isinstance(rows, slice) and x.dtype == dtype else None


class _Chunk:
    """One head's gathered key and value blocks of a chunk of rows, in buffers reused across chunks."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n: int, f: int):
        self.f = f
        self.k = k.new_empty(n * f, k.shape[-1])
        self.v = v.new_empty(n * f, v.shape[-1])

    def gather(self, k_head, v_head, flat, b):
        """(n, f * b, D) keys and (n, f * b, Dv) values of the chunk's kept blocks."""
        m = flat.numel()
        kc = torch.index_select(k_head, 0, flat, out=self.k[:m])
        vc = torch.index_select(v_head, 0, flat, out=self.v[:m])
        return kc.view(m // self.f, self.f * b, -1), vc.view(m // self.f, self.f * b, -1)


def _scores(q_rows, k_cols, masked, upper, buffer):
    """Scores (n, b, f * b) of a chunk in the accumulation dtype, j > i masked (``masked`` over the
    chunk, or ``upper`` on its last block). q_rows is already scaled."""
    acc = accumulation_dtype(q_rows.dtype)
    if acc == q_rows.dtype:
        s = torch.bmm(q_rows, k_cols.transpose(1, 2), out=buffer[:q_rows.shape[0]])
    else:
        s = torch.bmm(q_rows, k_cols.transpose(1, 2)).to(acc)
    if upper is not None:
        s[:, :, -upper.shape[1]:].masked_fill_(upper, float("-inf"))
    elif masked is not None:
        s.masked_fill_(masked, float("-inf"))
    return s


def flash_applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's fused CPU flash-attention kernel can do a chunk: CPU tensors, head widths equal
    (D = Dv), a dtype it takes (float32, float64, bfloat16, float16). Its backward also needs no
    gradient on the log-sum-exp (:func:`torch_attention_backward` checks that)."""
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and q.dtype in _FLASH_DTYPES


# torch's fused CPU kernel (scores, softmax and its own backward in cache-sized tiles) for the chunks
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _shared_mask(bucket: RowBucket, b: int, dtype):
    """The flash kernel's additive mask shared by every chunk of a bucket: (b, f * b), -inf on the
    diagonal block's j > i (``bucket.upper``), built once per bucket; None when there is none."""
    if bucket.upper is None:
        return None
    mask = torch.zeros(b, bucket.cols.shape[1] * b, dtype=dtype, device=bucket.upper.device)
    mask[:, -b:].masked_fill_(bucket.upper, float("-inf"))
    return mask


def _chunk_mask(shared, rows_masked, dtype):
    """The additive mask of one chunk: the bucket's shared one, or (n, 1, b, f * b) built from the
    chunk's part of ``bucket.masked`` when the chunk runs (O(chunk) memory, never O(T * f * b); made
    again for every head, a fill beside the kernel's products: only causal layouts with a row that
    drops its diagonal block come here), or None."""
    if rows_masked is None:
        return shared
    mask = torch.zeros(rows_masked.shape, dtype=dtype, device=rows_masked.device)
    return mask.masked_fill_(rows_masked, float("-inf"))[:, None]


def _flash_attention_forward(q, k, v, plan: AttentionPlan, block_size: int, scale: float):
    """torch_attention_forward with each chunk's queries x its gathered keys in torch's fused kernel."""
    B, H, T, D = q.shape
    Dv, R, b = v.shape[-1], T // block_size, block_size
    q4 = q.reshape(B * H, R, b, D)
    k3, v3 = k.reshape(B * H, R, b * D), v.reshape(B * H, R, b * Dv)
    out = q.new_empty(B * H, R, b, Dv)
    lse = q.new_empty(B * H, R, b, dtype=accumulation_dtype(q.dtype))
    for bucket in plan.buckets:
        f = bucket.cols.shape[1]
        n = _rows_per_chunk(bucket, b, D, Dv, q.element_size(), fused=True)
        chunk, chunks, shared = _Chunk(k3, v3, n, f), _chunks(bucket, n), _shared_mask(bucket, b, q.dtype)
        for q_h, k_h, v_h, out_h, lse_h in zip(q4.unbind(0), k3.unbind(0), v3.unbind(0), out.unbind(0),
                                               lse.unbind(0)):
            for rows, flat, masked in chunks:
                k_cols, v_cols = chunk.gather(k_h, v_h, flat, b)
                o, L = _flash_forward(_take(q_h, rows)[:, None], k_cols[:, None], v_cols[:, None], 0.0, False,
                                      attn_mask=_chunk_mask(shared, masked, q.dtype),
                                      scale=scale)                                     # (n, 1, b, Dv), (n, 1, b)
                _give(out_h, rows, o.view(-1, b, Dv))
                _give(lse_h, rows, L.view(-1, b))
                del o, L                 # freed before the next chunk's results are allocated
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def torch_attention_forward(q, k, v, plan: AttentionPlan, block_size: int, scale: float, *, flash: bool = True):
    """(out (B, H, T, Dv), lse (B, H, T)) of block-sparse attention on a plan.

    ``flash`` (where :func:`flash_applies`): each chunk in torch's fused CPU kernel; otherwise (or
    ``flash=False``) scores, softmax and products in bmm's on the chunk.
    """
    if flash and flash_applies(q, v):
        return _flash_attention_forward(q, k, v, plan, block_size, scale)
    B, H, T, D = q.shape
    Dv, R, b = v.shape[-1], T // block_size, block_size
    q4 = q.reshape(B * H, R, b, D)
    k3, v3 = k.reshape(B * H, R, b * D), v.reshape(B * H, R, b * Dv)
    out = q.new_empty(B * H, R, b, Dv)
    acc = accumulation_dtype(q.dtype)
    lse = q.new_empty(B * H, R, b, 1, dtype=acc)
    for bucket in plan.buckets:
        f = bucket.cols.shape[1]
        n = _rows_per_chunk(bucket, b, D, Dv, q.element_size())
        chunk, q_buffer, s_buffer = _Chunk(k3, v3, n, f), q.new_empty(n, b, D), q.new_empty(n, b, f * b)
        chunks = _chunks(bucket, n)
        for q_h, k_h, v_h, out_h, lse_h in zip(q4.unbind(0), k3.unbind(0), v3.unbind(0), out.unbind(0),
                                               lse.unbind(0)):
            for rows, flat, masked in chunks:
                k_cols, v_cols = chunk.gather(k_h, v_h, flat, b)
                q_rows = _take(q_h, rows)
                q_rows = torch.mul(q_rows, scale, out=q_buffer[:q_rows.shape[0]])
                s = _scores(q_rows, k_cols, masked, bucket.upper, s_buffer)
                m = s.amax(-1, keepdim=True)
                s.sub_(m).exp_()                                # unnormalised: divide the (b, Dv) output instead
                total = s.sum(-1, keepdim=True)
                o = torch.bmm(s.to(q.dtype), v_cols, out=_into(out_h, rows, q.dtype))
                _give(out_h, rows, o.div_(total.to(q.dtype)))
                _give(lse_h, rows, m.add_(total.log_()))
    return out.reshape(B, H, T, Dv), lse.reshape(B, H, T)


def attention_delta(grad_out, out, like, grad_lse, keepdim: bool = False):
    """Delta_i = rowsum(dO * O)_i - dL_i: dS = P * (dP - Delta) covers both outputs (dL/dS = P).

    ``like`` gives the dtype (the log-sum-exp's, or the probabilities'); ``grad_lse`` has the
    shape of the result (None: no gradient reaches lse).
    """
    delta = (grad_out.to(like.dtype) * out.to(like.dtype)).sum(-1, keepdim=keepdim)
    return delta if grad_lse is None else delta - grad_lse.to(like.dtype)


def _flash_attention_backward(grad_out, q, k, v, out, lse, plan: AttentionPlan, block_size: int, scale: float):
    """torch_attention_backward (no gradient on lse) with each chunk in torch's fused kernel's backward;
    the gathered keys' gradients are added back to their blocks with index_add_."""
    B, H, T, D = q.shape
    Dv, R, b = v.shape[-1], T // block_size, block_size
    q4, do4, out4 = q.reshape(B * H, R, b, D), grad_out.reshape(B * H, R, b, Dv), out.reshape(B * H, R, b, Dv)
    k3, v3 = k.reshape(B * H, R, b * D), v.reshape(B * H, R, b * Dv)
    lse3 = lse.reshape(B * H, R, b)
    dq = torch.empty_like(q4)
    dk, dv = torch.zeros_like(k3), torch.zeros_like(v3)
    for bucket in plan.buckets:
        f = bucket.cols.shape[1]
        n = _rows_per_chunk(bucket, b, D, Dv, q.element_size(), fused=True)
        chunk, chunks, shared = _Chunk(k3, v3, n, f), _chunks(bucket, n), _shared_mask(bucket, b, q.dtype)
        for g in range(B * H):
            for rows, flat, masked in chunks:
                k_cols, v_cols = chunk.gather(k3[g], v3[g], flat, b)
                dq_rows, dk_cols, dv_cols = _flash_backward(
                    _take(do4[g], rows)[:, None], _take(q4[g], rows)[:, None], k_cols[:, None], v_cols[:, None],
                    _take(out4[g], rows)[:, None], _take(lse3[g], rows)[:, None], 0.0, False,
                    attn_mask=_chunk_mask(shared, masked, q.dtype), scale=scale)
                _give(dq[g], rows, dq_rows.view(-1, b, D))
                dk[g].index_add_(0, flat, dk_cols.reshape(-1, b * D))
                dv[g].index_add_(0, flat, dv_cols.reshape(-1, b * Dv))
                del dq_rows, dk_cols, dv_cols    # freed before the next chunk's gradients are allocated
    return dq.reshape(B, H, T, D), dk.reshape(B, H, T, D), dv.reshape(B, H, T, Dv)


def torch_attention_backward(grad_out, q, k, v, out, lse, plan: AttentionPlan, block_size: int, scale: float,
                             grad_lse=None, *, flash: bool = True):
    """(dq, dk, dv) of block-sparse attention from the forward's out and lse.

    ``flash`` (where :func:`flash_applies` and no gradient reaches lse: ``grad_lse`` None): torch's
    fused kernel's backward on each chunk; otherwise bmm's on the chunk.
    """
    if flash and grad_lse is None and flash_applies(q, v):
        return _flash_attention_backward(grad_out, q, k, v, out, lse, plan, block_size, scale)
    B, H, T, D = q.shape
    Dv, R, b = v.shape[-1], T // block_size, block_size
    q4, do4, out4 = q.reshape(B * H, R, b, D), grad_out.reshape(B * H, R, b, Dv), out.reshape(B * H, R, b, Dv)
    k3, v3 = k.reshape(B * H, R, b * D), v.reshape(B * H, R, b * Dv)
    lse4 = lse.reshape(B * H, R, b, 1)
    dlse4 = None if grad_lse is None else grad_lse.reshape(B * H, R, b, 1)
    dq = torch.empty_like(q4)
    dk, dv = torch.zeros_like(k3), torch.zeros_like(v3)
    for bucket in plan.buckets:
        f = bucket.cols.shape[1]
        n = _rows_per_chunk(bucket, b, D, Dv, q.element_size())
        chunk, q_buffer = _Chunk(k3, v3, n, f), q.new_empty(n, b, D)
        s_buffer, ds_buffer = q.new_empty(n, b, f * b), q.new_empty(n, b, f * b)
        dk_buffer, dv_buffer = q.new_empty(n, f * b, D), q.new_empty(n, f * b, Dv)
        chunks = _chunks(bucket, n)
        for g in range(B * H):
            q_h, k_h, v_h, do_h, out_h, lse_h, dq_h = q4[g], k3[g], v3[g], do4[g], out4[g], lse4[g], dq[g]
            dk_h, dv_h, dlse_h = dk[g], dv[g], None if dlse4 is None else dlse4[g]
            for rows, flat, masked in chunks:
                k_cols, v_cols = chunk.gather(k_h, v_h, flat, b)
                do_rows = _take(do_h, rows)
                n_rows = do_rows.shape[0]
                q_rows = torch.mul(_take(q_h, rows), scale, out=q_buffer[:n_rows])
                p = _scores(q_rows, k_cols, masked, bucket.upper, s_buffer)
                p = p.sub_(_take(lse_h, rows)).exp_()
                dlse = None if dlse_h is None else _take(dlse_h, rows)
                delta = attention_delta(do_rows, _take(out_h, rows), p, dlse, keepdim=True)     # (n, b, 1)
                p_in = p.to(q.dtype)
                dv_cols = torch.bmm(p_in.transpose(1, 2), do_rows, out=dv_buffer[:n_rows])
                dv_h.index_add_(0, flat, dv_cols.view(-1, b * Dv))
                ds = torch.bmm(do_rows, v_cols.transpose(1, 2), out=ds_buffer[:n_rows]).to(p.dtype)
                ds = ds.sub_(delta).mul_(p).to(q.dtype)
                _give(dq_h, rows, torch.bmm(ds, k_cols, out=_into(dq_h, rows, q.dtype)).mul_(scale))
                # q_rows already carries the scale: dK = scale * dS^T Q
                dk_cols = torch.bmm(ds.transpose(1, 2), q_rows, out=dk_buffer[:n_rows])
                dk_h.index_add_(0, flat, dk_cols.view(-1, b * D))
    return dq.reshape(B, H, T, D), dk.reshape(B, H, T, D), dv.reshape(B, H, T, Dv)


def _bucket_rows(x5: torch.Tensor, bucket: RowBucket) -> torch.Tensor:
    """(B, H, R, b, m) -> the bucket's block rows (B, H, nr, b, m): a slice when they are contiguous."""
    if bucket.contiguous:
        return x5[:, :, bucket.start:bucket.start + bucket.cols.shape[0]]
    return x5.index_select(2, bucket.rows)


def _bucket_cols(x5: torch.Tensor, bucket: RowBucket) -> torch.Tensor:
    """(B, H, R, b, m) -> (B, H, nr, f * b, m): each of the bucket's rows' kept blocks."""
    B, H, _, b, m = x5.shape
    return x5.index_select(2, bucket.cols.reshape(-1)).reshape(B, H, bucket.cols.shape[0], -1, m)


def torch_linear_attention(phi_q, phi_k, v, plan: AttentionPlan, block_size: int) -> torch.Tensor:
    """sum_{j in S(i)} (phi_q_i . phi_k_j) v_j on a plan, plain torch ops (autograd through them)."""
    B, H, T, m = phi_q.shape
    R, b, Dv = T // block_size, block_size, v.shape[-1]
    q5, k5, v5 = phi_q.reshape(B, H, R, b, m), phi_k.reshape(B, H, R, b, m), v.reshape(B, H, R, b, Dv)
    parts, rows = [], []
    for bucket in plan.buckets:
        scores = _bucket_rows(q5, bucket) @ _bucket_cols(k5, bucket).transpose(-1, -2)     # (B, H, nr, b, f*b)
        if bucket.masked is not None:
            scores = scores.masked_fill(bucket.masked, 0.0)
        parts.append(scores @ _bucket_cols(v5, bucket))
        rows.append(bucket.rows)
    if len(parts) == 1 and plan.buckets[0].contiguous:
        return parts[0].reshape(B, H, T, Dv)
    out = v.new_zeros(B, H, R, b, Dv).index_copy(2, torch.cat(rows), torch.cat(parts, 2))
    return out.reshape(B, H, T, Dv)
