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
real compiles for sm_80 and sm_90. Launches go to the tensors' device. The modules: the kernels
in :mod:`~pixelfly_lab.ops.triton_jit`, their configs and resource model in
:mod:`~pixelfly_lab.ops.triton_configs`, the layout's index tables in
:mod:`~pixelfly_lab.ops.triton_tables`; this one holds the launchers and the forward and backward.
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

import torch
import triton
import triton.language as tl

from pixelfly_lab import _tf32
from pixelfly_lab.ops.registry import BLOCK_SIZES  # one tuple, in the registry
from pixelfly_lab.ops.triton_configs import (DSD_CONFIGS, INTERPRET, MAX_TILE_N, SDD_CONFIGS, SMEM_BY_ARCH,
                                             config_fits, dsd_tuned, fit_args, fixed_config, pruner, sdd_tuned,
                                             shared_bytes)
from pixelfly_lab.ops.triton_jit import dsd_kernel, sdd_kernel
from pixelfly_lab.ops.triton_tables import LayoutTables, layout_tables, tables_for

# LayoutTables, layout_tables, tables_for (triton_tables) and the config names (triton_configs) are
# re-exported: the attention kernels, the compile check and bench/gpu_bench.py import them from here
__all__ = ["BLOCK_SIZES", "DTYPES", "LayoutTables", "layout_tables", "tables_for", "dsd_matmul", "sdd_matmul",
           "sparse_lowrank_forward", "sparse_lowrank_backward", "check_operands", "DSD_CONFIGS", "SDD_CONFIGS",
           "SMEM_BY_ARCH", "MAX_TILE_N", "config_fits", "shared_bytes", "AUTOTUNE", "INTERPRET"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: exact tests only
_MAX_LOWRANK_TILE = 64  # the low-rank rank is walked in chunks of at most 64 columns


# ----------------------------------------------------------------------------- launch

# Default of the launchers' ``autotune`` argument: None = autotune on a GPU, never under the
# interpreter. Set False to run one fixed config (e.g. correctness sweeps, where tuning every
# dtype and block size would cost minutes of compiling).
AUTOTUNE: bool | None = None


def _use_autotune(autotune: bool | None) -> bool:
    autotune = AUTOTUNE if autotune is None else autotune
    return (not INTERPRET) if autotune is None else bool(autotune) and not INTERPRET


def _precision(dtype: torch.dtype, precision: str | None = None) -> tuple[str, object]:
    """(tl.dot input precision, accumulator tl dtype): :func:`pixelfly_lab._tf32.dot_precision`."""
    precision, accumulator = _tf32.dot_precision(dtype, precision)
    return precision, getattr(tl, accumulator)


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
    jit, tuned = (dsd_kernel, dsd_tuned) if kernel == "dsd" else (sdd_kernel, sdd_tuned)
    if warmup and not prune:
        configs = [(c.kwargs, dict(num_warps=c.num_warps, num_stages=c.num_stages)) for c in tuned.configs
                   if c.kwargs["GROUP"] <= max_group and c.kwargs["GROUP"] * block <= MAX_TILE_N]
    elif _use_autotune(autotune) or (warmup and autotune is not False):
        configs = [(c.kwargs, dict(num_warps=c.num_warps, num_stages=c.num_stages))
                   for c in pruner(kernel)(tuned.configs, dict(zip(jit.arg_names, args)), **meta)]
    else:
        fixed = fixed_config(kernel, block, size, max_group,
                              **fit_args(kernel, dict(zip(jit.arg_names, args)), meta))
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
    if not (x2.is_cuda or INTERPRET or x2.is_meta):
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
