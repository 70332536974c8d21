"""The two Triton kernels of the block-sparse linear: dense x sparse (:func:`dsd_kernel`) and
sampled dense-dense (:func:`sdd_kernel`).

Their launchers, and what each kernel computes, are in :mod:`pixelfly_lab.ops.triton_kernels`;
the configs they are tuned over in :mod:`pixelfly_lab.ops.triton_configs`. Reference: block-sparse
GPU kernels (Gray, Radford, Kingma 2017) and the Pixelfly paper (Dao, Chen et al., ICLR 2022,
arXiv 2112.00029, Sec. 4). Triton is imported at module level: nothing imports this module at
package import.
"""

import triton
import triton.language as tl

__all__ = ["dsd_kernel", "sdd_kernel"]



# Ints that only key the autotuner (or only bound a loop's trip count) are not specialised: Triton
# would otherwise compile separate, identical kernels for values equal to 1 or divisible by 16.
@triton.jit(do_not_specialize=["M_KEY", "MAX_FANIN", "MAX_GROUP"])
def dsd_kernel(a_ptr, v_ptr, out_ptr, bias_ptr, e_ptr, f_ptr, ptr_ptr, idx_ptr, blk_ptr,
                M, RANK, stride_am, stride_ak, stride_om, stride_on, stride_em, stride_er,
                stride_fn, stride_fr, v_stride_r, v_stride_c, M_KEY, N_OUT, MAX_FANIN, MAX_GROUP,
                BLOCK: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, TRANSPOSE: tl.constexpr,
                PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """out[m, n-blocks] = sum_t a[m, idx[t]-block] @ [tile of each of the GROUP blocks] (+ e f^T) (+ bias).

    One program: BLOCK_M rows of GROUP consecutive output blocks (layout rows, or columns when
    TRANSPOSE), which share one list of input blocks: the first one's (ptr, idx) entries.
    The grid is 1-D (axis 0 allows 2^31 - 1 programs; axes 1 and 2 only 65535), output block
    groups fastest, so neighbouring programs share the rows of a.
    """
    n_groups = N_OUT // (GROUP * BLOCK)
    pid = tl.program_id(0)
    pid_n = pid % n_groups
    pid_m = pid // n_groups
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK)
    offs_c = tl.arange(0, GROUP * BLOCK)   # output columns of the program: (block g, column c)
    mask_m = offs_m < M
    a_rows = a_ptr + offs_m[:, None] * stride_am
    start = tl.load(ptr_ptr + pid_n * GROUP).to(tl.int64)  # int64 loop: k * b * b cannot overflow
    end = tl.load(ptr_ptr + pid_n * GROUP + 1).to(tl.int64)
    if TRANSPOSE:  # block g of the group is the next one in the same layout row: k + g
        g_stride = BLOCK * BLOCK
    else:          # the group's rows each hold end - start blocks, stored one row after another
        g_stride = (end - start) * BLOCK * BLOCK
    # (b x GROUP*b) tile for entry t: column (g, c) = block g's tile, v[k_g, r*v_stride_r + c*v_stride_c]
    v_tile = (offs_b[:, None] * v_stride_r + (offs_c % BLOCK)[None, :] * v_stride_c
              + (offs_c // BLOCK)[None, :] * g_stride)
    acc = tl.zeros((BLOCK_M, GROUP * BLOCK), dtype=ACC_DTYPE)
    for t in range(start, end):
        j = tl.load(idx_ptr + t).to(tl.int64)
        if TRANSPOSE:
            k = tl.load(blk_ptr + t).to(tl.int64)
        else:
            k = t
        a = tl.load(a_rows + (j * BLOCK + offs_b)[None, :] * stride_ak, mask=mask_m[:, None], other=0.0)
        v = tl.load(v_ptr + k * BLOCK * BLOCK + v_tile)
        acc = tl.dot(a, v, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    offs_n = pid_n * GROUP * BLOCK + offs_c
    if HAS_LOWRANK:  # + e[m, :] @ f[n, :]^T, the rank walked in BLOCK_R chunks
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < RANK
            e = tl.load(e_ptr + offs_m[:, None] * stride_em + offs_r[None, :] * stride_er,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            f = tl.load(f_ptr + offs_r[:, None] * stride_fr + offs_n[None, :] * stride_fn,
                        mask=mask_r[:, None], other=0.0)
            acc = tl.dot(e, f, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(ACC_DTYPE)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit(do_not_specialize=["M_KEY"])
def sdd_kernel(g_ptr, x_ptr, out_ptr, leads_ptr, fanin_ptr, rows_ptr, cols_ptr, M, CHUNK, NNZ, MAX_GROUP,
                stride_gm, stride_gn, stride_xm, stride_xk, M_KEY,
                BLOCK: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                ACC_DTYPE: tl.constexpr):
    """out[s, k_g] = g[rows of chunk s, (i+g)-block]^T @ x[rows of chunk s, j-block], g < GROUP.

    Program p computes GROUP blocks of one block column j in consecutive rows i..i+GROUP-1 (their
    runs of MAX_GROUP equal rows, described by leads/fanin, are cut into MAX_GROUP / GROUP parts).
    """
    p = tl.program_id(0)
    split = tl.program_id(1)
    parts = MAX_GROUP // GROUP
    fanin = tl.load(fanin_ptr + p // parts).to(tl.int64)
    k = tl.load(leads_ptr + p // parts).to(tl.int64) + (p % parts) * GROUP * fanin  # first block
    i = tl.load(rows_ptr + k).to(tl.int64)
    j = tl.load(cols_ptr + k).to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    offs_r = tl.arange(0, GROUP * BLOCK)  # rows of the GROUP blocks, stacked: (g, r)
    g_cols = g_ptr + (i * BLOCK + offs_r)[None, :] * stride_gn
    x_cols = x_ptr + (j * BLOCK + offs_b)[None, :] * stride_xk
    m_start = split.to(tl.int64) * CHUNK
    m_end = tl.minimum(M, m_start + CHUNK)
    acc = tl.zeros((GROUP * BLOCK, BLOCK), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = (offs_m < m_end)[:, None]
        g = tl.load(g_cols + offs_m[:, None] * stride_gm, mask=mask_m, other=0.0)
        x = tl.load(x_cols + offs_m[:, None] * stride_xm, mask=mask_m, other=0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    block_k = split * NNZ + k + (offs_r // BLOCK) * fanin  # block g of the group: k + g * fanin
    out = out_ptr + block_k[:, None] * BLOCK * BLOCK + (offs_r % BLOCK)[:, None] * BLOCK + offs_b[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty))
