"""Triton GPU kernels for the block-sparse linear y = x W^T + bias, and Pixelfly's y = x S^T + (x V) U^T + bias.

W (out_features, in_features) is stored as ``values`` (nnz, b, b) in the row-major order of a
bool ``layout`` (out/b, in/b): values[k] = W[i*b:(i+1)*b, j*b:(j+1)*b] for the k-th True (i, j).
Three kernels cover the forward and both gradients (Gray, Radford, Kingma, "GPU kernels for
block-sparse weights", 2017; the Pixelfly paper's Sec. 4, Dao, Chen et al., ICLR 2022,
https://arxiv.org/abs/2112.00029):

* dense x sparse ("dsd"), forward:  y[:, i] = sum_{j: layout[i, j]} x[:, j] @ values[k]^T
  (block columns of y, x are written [:, i] for [:, i*b:(i+1)*b]);
* the same kernel on the transposed layout, input gradient:  dx[:, j] = sum_{i: layout[i, j]} dy[:, i] @ values[k];
* sampled dense-dense ("sdd"), weight gradient, only the layout's blocks:  dvalues[k] = dy[:, i]^T @ x[:, j].

One dsd program owns a (BLOCK_M x GROUP*b) output tile and walks the fixed list of input blocks
(the fan-in) that its GROUP output blocks share, so every output element is written exactly once,
with no atomics; the low-rank term (x V) U^T (and (dy U) V^T in the backward) and the bias are
added in the same program's epilogue. GROUP > 1 uses the structure of the flat block butterfly:
stretched to hardware blocks it repeats every block row (and column) several times, and the
repeated rows can share one input tile (less traffic, wider tensor-core tiles). One sdd program
owns GROUP blocks of one block column, reducing over the rows (optionally split into chunks).
Tile sizes, GROUP, warps and pipeline depth are autotuned per shape (the key holds every
argument that changes the compiled kernel); configs that would exceed the device's shared memory
or spill registers are pruned first, by a model that tests/test_triton_compile.py checks against
real compiles for sm_80 and sm_90. Launches go to the tensors' device.
Accumulation is in float32 (float64 for float64 inputs); float32 inputs use TF32 when torch allows
it for matmuls (:func:`pixelfly_lab.ops.matmul.tf32_allowed`), as torch's own matmuls do.

Triton is imported here at module level, so nothing else in the package imports this module at
import time; :mod:`pixelfly_lab.ops.matmul` calls :func:`sparse_lowrank_forward` and
:func:`sparse_lowrank_backward` through its torch custom ops (backend='triton'). Off a GPU the
kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported), which executes them in
numpy on CPU tensors: that is how the tests check them. The interpreter computes bfloat16 dots
wrongly, so bfloat16 is only checked on a GPU.

Example (on a CUDA machine):
    >>> layout = torch.tensor([[True, False], [True, True]])
    >>> values = torch.randn(3, 64, 64, device='cuda')
    >>> y, _ = sparse_lowrank_forward(torch.randn(8, 128, device='cuda'), values, None, None, None,
    ...                               layout_tables(layout, 'cuda'))   # (8, 128)
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pixelfly_lab import _tf32

__all__ = ["BLOCK_SIZES", "DTYPES", "LayoutTables", "layout_tables", "tables_for", "dsd_matmul", "sdd_matmul",
           "sparse_lowrank_forward", "sparse_lowrank_backward", "check_operands", "DSD_CONFIGS", "SDD_CONFIGS",
           "SMEM_BY_ARCH", "MAX_TILE_N", "config_fits", "shared_bytes"]

from pixelfly_lab.ops.registry import BLOCK_SIZES, derived, register_layout  # noqa: E402  (one tuple, in the registry)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: exact tests only
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_LOWRANK_TILE = 64  # the low-rank rank is walked in chunks of at most 64 columns


# ----------------------------------------------------------------------------- index tables

@dataclass(frozen=True)
class LayoutTables:
    """Index tables of one layout, on one device (int32).

    Attributes:
        shape: (R, C) = (out/b, in/b).
        nnz: number of stored blocks.
        row_ptr (R+1,), row_cols (nnz,): CSR; block row i holds blocks k = row_ptr[i] .. row_ptr[i+1]-1
            (row-major order, so k is the position) in columns row_cols[k]. Forward.
        col_ptr (C+1,), col_rows (nnz,), col_blocks (nnz,): CSC; block column j holds blocks
            col_blocks[t] in rows col_rows[t] for t in col_ptr[j] .. col_ptr[j+1]-1. Input gradient.
        block_rows (nnz,): the row i of block k (its column is row_cols[k]). Weight gradient.
        max_row_fanin, max_col_fanin: largest blocks per block row / column (part of the tuning key).
        row_group, col_group: the largest power of two G (<= 16) such that every aligned run of G
            block rows (columns) has the same set of blocks. One program can then compute G output
            blocks side by side from one tile of its input: a flat block butterfly stretched to
            blocks repeats each row (column) out/(butterfly_size*b) (in/(butterfly_size*b)) times.
        group_leads, group_fanin (nnz / row_group,): the blocks of the first row of every run of
            row_group rows, and that row's block count F; block g rows below lead k is k + g*F.
            Weight gradient, several blocks of one column per program.
    """

    shape: tuple[int, int]
    nnz: int
    row_ptr: torch.Tensor
    row_cols: torch.Tensor
    col_ptr: torch.Tensor
    col_rows: torch.Tensor
    col_blocks: torch.Tensor
    block_rows: torch.Tensor
    max_row_fanin: int
    max_col_fanin: int
    row_group: int
    col_group: int
    group_leads: torch.Tensor
    group_fanin: torch.Tensor


def _group(layout: torch.Tensor, limit: int = 16) -> int:
    """Largest power of two G <= limit dividing R with layout[G*q : G*q + G] all equal rows, for every q."""
    R = layout.shape[0]
    group = 1
    while layout.numel() and 2 * group <= limit and R % (2 * group) == 0:
        runs = layout.reshape(R // (2 * group), 2 * group, -1)
        if not bool((runs == runs[:, :1]).all()):
            break
        group *= 2
    return group


def _pointers(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _build_tables(layout: torch.Tensor, device: torch.device) -> LayoutTables:
    """The index tables of a CPU bool layout, on ``device``."""
    R, C = layout.shape
    rows, cols = layout.nonzero(as_tuple=True)            # row-major: the k-th pair is block k
    csc = torch.sort(cols * R + rows, stable=True).indices  # blocks ordered by (column, row)
    row_counts, col_counts = layout.sum(1), layout.sum(0)
    row_ptr = _pointers(row_counts)
    row_group = _group(layout)
    lead_rows = rows % row_group == 0   # blocks in the first row of a run
    tables = dict(row_ptr=row_ptr, row_cols=cols, col_ptr=_pointers(col_counts), col_rows=rows[csc],
                  col_blocks=csc, block_rows=rows, group_leads=lead_rows.nonzero().flatten(),
                  group_fanin=row_counts[rows[lead_rows]])
    tables = {name: t.to(device=device, dtype=torch.int32) for name, t in tables.items()}
    return LayoutTables(shape=(R, C), nnz=len(rows), max_row_fanin=max(row_counts.tolist(), default=0),
                        max_col_fanin=max(col_counts.tolist(), default=0), row_group=row_group,
                        col_group=_group(layout.T), **tables)


def tables_for(key: int, device: torch.device | str) -> LayoutTables:
    """The index tables of a registered layout (:func:`pixelfly_lab.ops.registry.register_layout`)
    on ``device``: built on first use and cached by the registry (what ``'triton_tables'``), so a
    forward or backward reads nothing from the host.

    Args:
        key: the layout's registry key.
        device: where the tables live (the device of the tensors they index).

    Returns:
        :class:`LayoutTables`.
    """
    return derived(key, "triton_tables", lambda entry, dev: _build_tables(entry.layout, dev), device)


def layout_tables(layout: torch.Tensor, device: torch.device | str | None = None) -> LayoutTables:
    """The index tables of a layout tensor on ``device`` (default: the layout's).

    For callers without a registry key: the layout is read to the host and registered (a device
    sync for a GPU layout, and a hash of its bytes, on every call), then the tables come from
    :func:`tables_for`. Ops call :func:`tables_for` with the key their layer registered.

    Args:
        layout: bool (R, C) on the CPU or a GPU.
        device: where the tables live.

    Returns:
        :class:`LayoutTables`.
    """
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() != 2:
        raise TypeError(f"layout must be a 2-D bool tensor, got {getattr(layout, 'dtype', type(layout))} "
                        f"of shape {tuple(getattr(layout, 'shape', ()))}")
    # block size 1: the tables do not depend on it (a layer's key, at its block size, is another one)
    return tables_for(register_layout(layout, 1), device if device is not None else layout.device)


# ----------------------------------------------------------------------------- kernels

# Ints that only key the autotuner (or only bound a loop's trip count) are not specialised: Triton
# would otherwise compile separate, identical kernels for values equal to 1 or divisible by 16.
@triton.jit(do_not_specialize=["M_KEY", "MAX_FANIN", "MAX_GROUP"])
def _dsd_kernel(a_ptr, v_ptr, out_ptr, bias_ptr, e_ptr, f_ptr, ptr_ptr, idx_ptr, blk_ptr,
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
def _sdd_kernel(g_ptr, x_ptr, out_ptr, leads_ptr, fanin_ptr, rows_ptr, cols_ptr, M, CHUNK, NNZ, MAX_GROUP,
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


# ----------------------------------------------------------------------------- configs

MAX_TILE_N = 256  # widest output tile (GROUP * b) one program computes
# Shared memory a block may use, by compute capability (CUDA's per-block opt-in maxima); used
# where torch cannot ask the device (it can: shared_memory_per_block_optin), e.g. when
# compiling for a target without one (pixelfly_lab.ops.triton_check).
SMEM_BY_ARCH = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}


def _smem_limit(device: torch.device) -> int:
    """Bytes of shared memory a program may use on ``device`` (or the active Triton target)."""
    if _INTERPRET:  # numpy executes the kernels: no shared memory to run out of
        return max(SMEM_BY_ARCH.values())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        optin = getattr(props, "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
        arch = 10 * props.major + props.minor
    else:
        try:
            arch = triton.runtime.driver.active.get_current_target().arch
        except Exception:  # the interpreter: no target; the smallest limit of the table's GPUs
            arch = 86
    return SMEM_BY_ARCH.get(arch, min(SMEM_BY_ARCH.values()))


def shared_bytes(kernel: str, block: int, group: int, block_m: int, stages: int, size: int,
                  lowrank: bool = False, block_r: int = 64) -> int:
    """Model of the shared memory of a config: ``stages`` buffers of the pipelined tiles.

    dsd per stage: a (BLOCK_M x b) input tile + a (b x GROUP*b) weight tile; the fused low-rank
    epilogue's loop is pipelined too, with (BLOCK_M x BLOCK_R) + (BLOCK_R x GROUP*b) tiles, in the
    same buffers (the larger of the two loops counts). sdd per stage: (BLOCK_M x GROUP*b) of g +
    (BLOCK_M x b) of x. Fitted to Triton 3.7's allocation at sm_80 and sm_90, where it is exact
    for the pipelined loops and an upper bound otherwise; pixelfly_lab.ops.triton_check checks it
    against real compiles (tests/test_triton_compile.py).
    """
    width = group * block
    if kernel == "dsd":
        per_stage = block_m * block + block * width
        if lowrank:
            per_stage = max(per_stage, block_m * block_r + block_r * width)
    else:
        per_stage = block_m * (width + block)
    return stages * per_stage * size


def _acc_per_thread(kernel: str, block: int, group: int, block_m: int, warps: int) -> int:
    """Accumulator elements each thread holds in registers."""
    width = group * block
    return (block_m * width if kernel == "dsd" else width * block) // (32 * warps)


# Register model: the accumulator elements a thread may hold with no spill (255 registers a
# thread; the rest hold addresses, operand fragments and the pipeline's state). Measured with
# pixelfly_lab.ops.triton_check (Triton 3.7, sm_90): tensor-core dots (16-bit inputs, TF32) use
# ~120-160 registers at 64 accumulator floats a thread and 220-252 at 128, at the edge (the
# review of issue 12, with another Triton, saw those spill, the fused low-rank epilogue adding
# ~750 B), so 64 is the limit; FMA dots (float32 without TF32) keep their operands in registers
# too: 128-206 registers at 16-32 floats; float64 takes two registers an element: 8 (at 16, the
# fused low-rank epilogue used 254 registers and spilled 120 B). The FMA path ('auto' never takes
# it) also shows small stack frames (8-16 B) in some configs at any accumulator size, which no
# count of this kind predicts: pixelfly_lab.ops.triton_check reports them apart.
# At sm_80 (mma.sync: operand fragments live in registers too) 4-warp programs reached 255
# registers and spilled at 64 accumulator floats (16-bit) and from 32 with TF32 (fp32 operands
# take twice the registers; small stack frames even at 16), so 4-warp programs keep 32 (16-bit)
# and TF32 needs 8 warps.
def _max_acc(precision: str, size: int, lowrank: bool, warps: int = 8) -> int:
    if size == 8:
        return 8
    if precision == "ieee":
        return 32
    if size == 4:      # TF32 tensor cores
        return 32 if warps >= 8 else 0
    return 64 if warps >= 8 else 32


def config_fits(kernel: str, block: int, group: int, block_m: int, warps: int, stages: int, size: int, *,
          precision: str = "tf32", lowrank: bool = False, block_r: int = 64,
          smem_limit: int = min(SMEM_BY_ARCH.values()), registers: bool = True) -> bool:
    """Whether a config fits: shared memory within ``smem_limit`` and (``registers``) no register
    spill, by the models above; under the interpreter (numpy: no registers, no shared memory) only
    the tile width counts."""
    if _INTERPRET:
        return group * block <= MAX_TILE_N
    return (group * block <= MAX_TILE_N
            and shared_bytes(kernel, block, group, block_m, stages, size, lowrank, block_r) <= smem_limit
            and (not registers
                 or _acc_per_thread(kernel, block, group, block_m, warps) <= _max_acc(precision, size, lowrank, warps)))


def _fixed_config(kernel: str, block: int, size: int, max_group: int = 1, **fit) -> dict:
    """The config when not autotuning: the widest group, then the tallest tile and deepest pipeline that fit.

    Where no config is spill-free (float64 at block 128: its accumulator alone is 64 registers a
    thread at 8 warps), the smallest tile that fits shared memory: spills cost speed, not
    correctness, and float64 runs only for exact tests.
    """
    for registers, order in ((True, ((64, 32, 16), (3, 2, 1), (4, 8))), (False, ((16, 32, 64), (1, 2, 3), (8, 4)))):
        for group in (max_group, *[g for g in (8, 4, 2, 1) if g < max_group]) if registers else (1,):
            for block_m, stages, warps in itertools.product(*order):
                if config_fits(kernel, block, group, block_m, warps, stages, size, registers=registers, **fit):
                    return dict(BLOCK_M=block_m, GROUP=group, num_warps=warps, num_stages=stages)
    raise ValueError(f"no {kernel} kernel config fits block size {block} with {size}-byte elements on this "
                     "GPU (registers, shared memory); use a smaller block or backend='torch'")


def _fit_args(kernel: str, named_args: dict, meta: dict) -> dict:
    """The config_fits keywords of one launch: precision, fused low rank, the device's shared memory."""
    tensor = named_args["a_ptr" if kernel == "dsd" else "g_ptr"]
    return dict(precision=meta["PRECISION"], lowrank=bool(meta.get("HAS_LOWRANK", False)),
                block_r=meta.get("BLOCK_R", 64), smem_limit=_smem_limit(tensor.device))


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        """Keep the configs that fit (and whose group the layout allows); at least the fixed config."""
        block = kwargs["BLOCK"]
        size = named_args["a_ptr" if kernel == "dsd" else "g_ptr"].element_size()
        max_group = min(named_args["MAX_GROUP"], max(1, MAX_TILE_N // block))
        fit = _fit_args(kernel, named_args, kwargs)
        kept = [c for c in configs if c.kwargs["GROUP"] <= max_group
                and config_fits(kernel, block, c.kwargs["GROUP"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages, size, **fit)]
        if not kept:
            fixed = _fixed_config(kernel, block, size, max_group, **fit)
            kept = [triton.Config({k: v for k, v in fixed.items() if k in ("BLOCK_M", "GROUP")},
                                  num_warps=fixed["num_warps"], num_stages=fixed["num_stages"])]
        return kept
    return prune


def _autotune_options() -> dict:
    """Short benchmark runs (2 + 10 ms a config, against triton's default 25 + 100) keep the first
    call of a new shape to about a second beyond compiling; Triton < 3.2 takes warmup/rep instead."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        return dict(do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=2, rep=10, quantiles=quantiles))
    return dict(warmup=2, rep=10)


# (BLOCK_M, GROUP, num_warps, num_stages); few enough that tuning a new shape costs seconds of compiling.
DSD_CONFIGS = [triton.Config({"BLOCK_M": bm, "GROUP": g}, num_warps=w, num_stages=st)
               for bm, g, w, st in ((64, 1, 4, 3), (64, 1, 4, 4), (128, 1, 4, 3), (128, 1, 8, 3),
                                    (64, 2, 4, 3), (128, 2, 8, 3), (64, 4, 8, 3), (128, 4, 8, 3),
                                    (64, 8, 8, 3))]
SDD_CONFIGS = [triton.Config({"BLOCK_M": bm, "GROUP": g}, num_warps=w, num_stages=st)
               for bm, g, w, st in ((32, 1, 4, 3), (64, 1, 4, 3), (64, 1, 8, 3), (128, 1, 8, 3),
                                    (64, 2, 8, 3), (64, 4, 8, 3), (128, 4, 8, 3))]
# Autotune keys: every argument that changes the compiled kernel or its best config (the
# constexprs included; Triton adds the tensors' dtypes itself), plus the rounded row count.
DSD_KEY = ["M_KEY", "N_OUT", "MAX_FANIN", "MAX_GROUP", "RANK", "BLOCK", "BLOCK_R", "HAS_BIAS", "HAS_LOWRANK",
           "TRANSPOSE", "PRECISION"]
SDD_KEY = ["M_KEY", "NNZ", "CHUNK", "MAX_GROUP", "BLOCK", "PRECISION"]
_dsd_tuned = triton.autotune(DSD_CONFIGS, key=DSD_KEY, prune_configs_by={"early_config_prune": _pruner("dsd")},
                             **_autotune_options())(_dsd_kernel)
_sdd_tuned = triton.autotune(SDD_CONFIGS, key=SDD_KEY, prune_configs_by={"early_config_prune": _pruner("sdd")},
                             **_autotune_options())(_sdd_kernel)


# Default of the launchers' ``autotune`` argument: None = autotune on a GPU, never under the
# interpreter. Set False to run one fixed config (e.g. correctness sweeps, where tuning every
# dtype and block size would cost minutes of compiling).
AUTOTUNE: bool | None = None


def _use_autotune(autotune: bool | None) -> bool:
    autotune = AUTOTUNE if autotune is None else autotune
    return (not _INTERPRET) if autotune is None else bool(autotune) and not _INTERPRET


def _precision(dtype: torch.dtype, precision: str | None = None) -> tuple[str, object]:
    """(tl.dot input precision, accumulator dtype): TF32 for float32 only where torch allows it
    (or where ``precision`` says 'tf32'; 'ieee' asks for FMA dots)."""
    if dtype == torch.float64:
        return "ieee", tl.float64
    if precision not in (None, "tf32", "ieee"):
        raise ValueError(f"precision must be None, 'tf32' or 'ieee', got {precision!r}")
    if dtype == torch.float32 and (precision == "ieee" or precision is None and not _tf32.tf32_allowed()):
        return "ieee", tl.float32
    return "tf32", tl.float32  # ignored by tl.dot for 16-bit inputs


def _on_device(t: torch.Tensor):
    """Launch on the tensor's device, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(kernel: str, args: tuple, meta: dict, grid, autotune: bool | None, warmup: bool, size: int,
            block: int, max_group: int, device_tensor: torch.Tensor, prune: bool = True):
    """Run (or with ``warmup``, only compile) one launch: tuned, or with the fixed config.

    ``prune=False`` (warmup only): every tuning config whose tile the layout allows, whether the
    resource model keeps it or not (calibrating the model against real compiles).
    Returns [(config dict, compiled kernel)] when warming up (every config the tuner would try), else None.
    """
    jit, tuned = (_dsd_kernel, _dsd_tuned) if kernel == "dsd" else (_sdd_kernel, _sdd_tuned)
    if warmup and not prune:
        configs = [(c.kwargs, dict(num_warps=c.num_warps, num_stages=c.num_stages)) for c in tuned.configs
                   if c.kwargs["GROUP"] <= max_group and c.kwargs["GROUP"] * block <= MAX_TILE_N]
    elif _use_autotune(autotune) or (warmup and autotune is not False):
        configs = [(c.kwargs, dict(num_warps=c.num_warps, num_stages=c.num_stages))
                   for c in _pruner(kernel)(tuned.configs, dict(zip(jit.arg_names, args)), **meta)]
    else:
        fixed = _fixed_config(kernel, block, size, max_group,
                              **_fit_args(kernel, dict(zip(jit.arg_names, args)), meta))
        configs = [({k: fixed[k] for k in ("BLOCK_M", "GROUP")},
                    dict(num_warps=fixed["num_warps"], num_stages=fixed["num_stages"]))]
    if warmup:
        return [({**params, **options}, jit.warmup(*args, grid=(1,), **meta, **params, **options))
                for params, options in configs]
    with _on_device(device_tensor):
        if _use_autotune(autotune):
            tuned[lambda META: grid(META["GROUP"], META["BLOCK_M"])](*args, **meta)
        else:
            params, options = configs[0]
            jit[grid(params["GROUP"], params["BLOCK_M"])](*args, **meta, **params, **options)
    return None


# ----------------------------------------------------------------------------- launchers

def dsd_matmul(a: torch.Tensor, values: torch.Tensor, tables: LayoutTables, *, transpose: bool = False,
               bias: torch.Tensor | None = None, lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
               out: torch.Tensor | None = None, autotune: bool | None = None, warmup: bool = False,
               precision: str | None = None, prune: bool = True):
    """Dense times block-sparse, one launch: out = a W^T (transpose=False) or a W (transpose=True).

    Args:
        a: (M, in) for a W^T, (M, out) for a W; any strides.
        values: (nnz, b, b) contiguous, same dtype as ``a``.
        tables: :func:`layout_tables` of the layout, on a's device.
        transpose: False: forward product; True: input gradient.
        bias: (N,) added to every row, or None.
        lowrank: (e, f) with e (M, r), f (N, r): adds e f^T (the fused low-rank term), or None.
        out: (M, N) result buffer (every element is written), or None to allocate.
        autotune: None (module default :data:`AUTOTUNE`: tune on a GPU, not under the
            interpreter), True or False (one fixed config).
        warmup: compile the kernels this call would run (every config the tuner keeps), launch
            nothing, and return [(config, compiled kernel)] (works on meta tensors: see
            :mod:`pixelfly_lab.ops.triton_check`).
        precision: float32 dots: None (TF32 where torch allows it, :func:`pixelfly_lab._tf32.tf32_allowed`),
            'tf32' or 'ieee' (FMA); other dtypes ignore it.
        prune: with ``warmup``, False compiles every tuning config the layout allows, not only
            those the resource model keeps (:func:`config_fits`).

    Returns:
        out (M, N), N = R*b (forward) or C*b (input gradient); with ``warmup``, the compiled kernels.
    """
    M = a.shape[0]
    block = values.shape[-1]
    R, C = tables.shape
    if transpose:  # dx[:, j] = sum_i dy[:, i] @ values[k]: walk the columns of the layout
        n_blocks, ptr, idx, blk = C, tables.col_ptr, tables.col_rows, tables.col_blocks
        fanin, max_group, v_strides = tables.max_col_fanin, tables.col_group, (block, 1)
    else:          # y[:, i] = sum_j x[:, j] @ values[k]^T: walk the rows
        n_blocks, ptr, idx, blk = R, tables.row_ptr, tables.row_cols, tables.row_cols
        fanin, max_group, v_strides = tables.max_row_fanin, tables.row_group, (1, block)
    max_group = min(max_group, max(1, MAX_TILE_N // block))
    N = n_blocks * block
    if out is None:
        out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    if M == 0 and not warmup:
        return out
    e, f = lowrank if lowrank is not None else (a, a)  # dummies, never read
    rank = e.shape[1] if lowrank is not None else 0
    precision, acc_dtype = _precision(a.dtype, precision)
    args = (a, values, out, bias if bias is not None else a, e, f, ptr, idx, blk,
            M, rank, a.stride(0), a.stride(1), out.stride(0), out.stride(1), e.stride(0), e.stride(1),
            f.stride(0), f.stride(1), *v_strides, triton.next_power_of_2(M), N, fanin, max_group)
    meta = dict(BLOCK=block, BLOCK_R=min(_MAX_LOWRANK_TILE, max(16, triton.next_power_of_2(max(rank, 1)))),
                HAS_BIAS=bias is not None, HAS_LOWRANK=lowrank is not None and rank > 0, TRANSPOSE=transpose,
                PRECISION=precision, ACC_DTYPE=acc_dtype)

    def grid(group, block_m):
        return ((n_blocks // group) * triton.cdiv(M, block_m),)
    compiled = _launch("dsd", args, meta, grid, autotune, warmup, a.element_size(), block, max_group, a, prune)
    return compiled if warmup else out


def _split_count(M: int, programs: int, device: torch.device) -> int:
    """How many row chunks the weight gradient's reduction is split into.

    One program per block leaves most of the GPU idle when nnz is small and M large, so the rows
    are split until there are about two programs per multiprocessor, keeping >= 512 rows a chunk.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), M // 512))


def sdd_matmul(g: torch.Tensor, x: torch.Tensor, tables: LayoutTables, block: int, *, split: int | None = None,
               out: torch.Tensor | None = None, autotune: bool | None = None, warmup: bool = False,
               precision: str | None = None, prune: bool = True):
    """Sampled dense-dense product: the layout's blocks of g^T x, i.e. the weight gradient.

    Args:
        g: (M, R*b) output gradient.
        x: (M, C*b) layer input, same dtype.
        tables: :func:`layout_tables` of the layout.
        block: block size b.
        split: chunks the M reduction is split into (default: enough programs to fill the GPU);
            with split > 1, float32 partial sums are added up by torch.
        out: (nnz, b, b) result buffer (every element is written), or None to allocate.
        autotune, warmup, precision, prune: as in :func:`dsd_matmul`.

    Returns:
        out (nnz, b, b): out[k] = g[:, i-block]^T @ x[:, j-block] for the k-th block (i, j);
        with ``warmup``, the compiled kernels.
    """
    M = g.shape[0]
    nnz = tables.nnz
    if out is None:
        out = torch.empty(nnz, block, block, device=g.device, dtype=g.dtype)
    if nnz == 0 and not warmup:
        return out
    if M == 0 and not warmup:
        return out.zero_()
    max_group = tables.row_group  # the leads table's runs; configs use GROUP <= that (and tile width)
    fewest_programs = max(1, nnz // min(max_group, max(1, MAX_TILE_N // block)))
    split = _split_count(M, fewest_programs, g.device) if split is None else split
    chunk = triton.cdiv(triton.cdiv(max(M, 1), split), 128) * 128  # whole tiles for every BLOCK_M
    split = triton.cdiv(max(M, 1), chunk)
    partial = out if split == 1 else torch.empty(split, nnz, block, block, device=g.device,
                                                 dtype=torch.promote_types(g.dtype, torch.float32))
    precision, acc_dtype = _precision(g.dtype, precision)
    args = (g, x, partial, tables.group_leads, tables.group_fanin, tables.block_rows, tables.row_cols, M, chunk,
            nnz, max_group, g.stride(0), g.stride(1), x.stride(0), x.stride(1), triton.next_power_of_2(M))
    meta = dict(BLOCK=block, PRECISION=precision, ACC_DTYPE=acc_dtype)

    def grid(group, block_m):
        return (nnz // group, split)
    compiled = _launch("sdd", args, meta, grid, autotune, warmup, g.element_size(), block, max_group, g, prune)
    if warmup:
        return compiled
    if split > 1:
        torch.sum(partial, dim=0, out=out) if out.dtype == partial.dtype else out.copy_(partial.sum(0))
    return out


# ----------------------------------------------------------------------------- forward and backward

def check_operands(x2: torch.Tensor, values: torch.Tensor, tables: LayoutTables, bias=None, u=None, v=None) -> None:
    """What the kernels need beyond the shapes (:mod:`pixelfly_lab.ops.matmul` checks those): one
    device (CUDA, or any under the interpreter), one supported dtype, a supported block size."""
    if not (x2.is_cuda or _INTERPRET or x2.is_meta):
        raise ValueError(f"x must be a CUDA tensor for the Triton kernels (got device {x2.device}); "
                         "set TRITON_INTERPRET=1 before importing triton to run them on CPU")
    if values.dim() != 3 or values.shape[1] != values.shape[2] or values.shape[1] not in BLOCK_SIZES:
        raise ValueError(f"values must have shape (nnz, b, b) with b in {BLOCK_SIZES}, got {tuple(values.shape)}")
    if x2.dtype not in DTYPES:
        raise TypeError(f"x has dtype {x2.dtype}; the Triton kernels support {DTYPES}")
    for name, t in (("values", values), ("bias", bias), ("u", u), ("v", v), ("tables", tables.row_ptr)):
        if t is not None and t.device != x2.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x2.device}")
        if t is not None and name != "tables" and t.dtype != x2.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x2.dtype}")
    if values.shape[0] != tables.nnz:
        raise ValueError(f"values holds {values.shape[0]} blocks but layout has {tables.nnz} True entries")


def sparse_lowrank_forward(x2: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                           u: torch.Tensor | None, v: torch.Tensor | None, tables: LayoutTables):
    """y = x2 S^T + (x2 V) U^T + bias in one block-sparse launch (the low-rank term in its epilogue).

    Args:
        x2: (M, in_features); values: (nnz, b, b) contiguous; bias: (out,) or None;
        u: (out, r) and v: (in, r), or both None; tables: :func:`layout_tables` on x2's device.

    Returns:
        (y (M, out), t = x2 V (M, r) or None): t is what :func:`sparse_lowrank_backward` needs.
    """
    check_operands(x2, values, tables, bias, u, v)
    t = x2 @ v if u is not None else None
    y = dsd_matmul(x2, values, tables, bias=bias, lowrank=(t, u) if u is not None else None)
    return y, t


def sparse_lowrank_backward(gy: torch.Tensor, x2: torch.Tensor, values: torch.Tensor, u: torch.Tensor | None,
                            v: torch.Tensor | None, t: torch.Tensor | None, tables: LayoutTables,
                            needed: tuple[bool, bool, bool, bool, bool]):
    """Gradients of :func:`sparse_lowrank_forward`: dx = gy S + (gy U) V^T, dvalues = the layout's
    blocks of gy^T x, dbias = gy^T 1, dU = gy^T t, dV = x^T (gy U).

    Args:
        gy: (M, out) output gradient; x2, values, u, v, t: the forward's inputs and t.
        needed: which of (x2, values, bias, u, v) need a gradient.

    Returns:
        (dx2, dvalues, dbias, du, dv), None where not needed.
    """
    gy = gy.to(x2.dtype)
    need_x, need_values, need_bias, need_u, need_v = needed
    dx = dvalues = dbias = du = dv = None
    s = gy @ u if u is not None and (need_x or need_v) else None
    if need_x:
        dx = dsd_matmul(gy, values, tables, transpose=True, lowrank=(s, v) if s is not None else None)
    if need_values:
        dvalues = sdd_matmul(gy, x2, tables, values.shape[-1])
    if need_bias:
        dbias = gy.sum(0, dtype=torch.promote_types(gy.dtype, torch.float32)).to(gy.dtype)
    if u is not None and need_u:
        du = gy.T @ t
    if u is not None and need_v:
        dv = x2.T @ s
    return dx, dvalues, dbias, du, dv
