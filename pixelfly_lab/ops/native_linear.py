"""The 'torch' path's grouped GEMMs as one compiled row sweep on the CPU (float32; bfloat16 on AMX and
AVX512-BF16 CPUs).

Same products as :mod:`pixelfly_lab.ops.torch_grouped` (the plan of
:mod:`pixelfly_lab.ops.torch_plan`: per group of block rows, its blocks packed as one dense matrix),
but each product is a oneDNN micro-kernel call on raw pointers from C++
(``csrc/blocksparse_cpu.cpp``, built by :mod:`pixelfly_lab.ops.native`): a tile of
:data:`TILE_ROWS` rows of x times a group's packed blocks, read in place through its leading
dimension and written or added in place into the output's columns (outputs of :data:`STREAM_BYTES`
and more: accumulated per window, then streamed). Per tile the forward runs every
group; the backward runs dX's products per tile and the blocks' gradients (gathered side^T @ row
side) per panel of :data:`PANEL_ROWS` rows, the panel transposed once (float32, a plan that
gathers x: group by group, each group's dX products and then its gradients on the whole panel,
while the columns of gy both read are in the caches: :mod:`pixelfly_lab.ops.native_stages`);
threads take panels from a shared counter (OpenMP, torch's thread count) and sum their own
gradient accumulators at the end. The Python side turns a plan into integer tables of products
once per plan (:mod:`pixelfly_lab.ops.native_tables`, cached; the C++ side checks every entry
against its operands) and packs the blocks per call (one compiled pass for a stacked plan).

bfloat16 (under ``torch.autocast('cpu', torch.bfloat16)``, even block sizes, on CPUs with AMX or
AVX512-BF16: :func:`bfloat16_isa`; tiles, panels and K steps per kind of micro-kernel): the same
tables (gathered ones for gather tables: :data:`GATHERED`), B operands in VNNI pairs (low-rank K
padded to :data:`K_STEP_16BIT`), float32 accumulation rounded once (per output slice of a group in
a gather table, per tile otherwise), the blocks' gradients summed in float32 (:func:`native_takes`).
x may stay float32 (what autocast hands over): the sweep rounds each tile of it into a scratch
buffer (and the grams' panels 16 rows at a time, into a strip kept in L1), and dX comes back in
float32, unrounded: no bfloat16 copy of x is made, kept for the backward or cast back. Measured
(released configuration, 1024 -> 4096, one thread, autocast, a dense layer's step before each timed
call, medians of 9-41 interleaved rounds), x cast by autocast first / x float32 into the sweep:
fwd+bwd 67.6 / 66.5 ms at 4096 rows, 11.2 / 10.8 ms at 512 rows; forward 17.6 / 16.5 and 4.3 / 4.1
ms. So may the parameters: rounded as they are packed, their gradients the float32 sums (no
bfloat16 copies made by autocast, no rounded gradients cast back: layer fwd+bwd of the released
1024 -> 4096 under autocast, one thread, medians of 41 in alternating processes, 3.90 -> 3.45 ms at
16 rows, 9.78 -> 8.70 at 512).

Why: on one AVX-512 core (Xeon with AMX) ``torch.mm`` on a group's strided views, (512 x 96) @
(96 x 128) into a 4096-wide output, ran at ~117-140 GFLOP/s while nn.Linear's whole GEMM ran at
~166-170; the micro-kernel on the same views at ~140-200 (``bench/native_gemm_bench.py``, loaded and
quiet machine), and one C++ loop has none of the per-GEMM Python and dispatch cost (~30 us each,
100+ per call).

The low-rank term and the bias ride as one more product per group: [z, 1] @ [U^T; bias], with
z = x V computed per tile before the products that read it (by the tile's first product in a
gather table, group by group in a scatter table); in the backward gy U likewise, and gy^T [z, 1]
(dU, dbias) as extra rows of the blocks' gradients, or as grams of their own. A bfloat16 forward of
a plan that gathers x (:data:`GATHERED`) copies each group's runs of x and [z, 1] side by side per
tile and reads them with [its blocks; U^T; bias] in one product per output slice (and dX of a
transposed plan, gy's runs and gz with [its blocks; V^T]): every product into a slice reads and
writes its float32 window, which costs AMX about as much as its FLOPs.

Tested against the float64 reference in tests/test_native_linear.py (float32 and bfloat16, 1-3
threads), and through every float32 CPU layer in the other tests.
"""

from __future__ import annotations

import torch

from pixelfly_lab.ops import native
from pixelfly_lab.ops.native_stages import NO_STAGES as _NO_STAGES
from pixelfly_lab.ops.native_stages import backward_stages as _stages
from pixelfly_lab.ops.native_stages import staging_pays
from pixelfly_lab.ops.native_tables import (NO_GATHERS, NO_GRAMS, gathered_products, gram_table, lead_table,
                                            product_tables)
from pixelfly_lab.ops.torch_buffers import new_output
from pixelfly_lab.ops.torch_grouped import unpack_grads
from pixelfly_lab.ops.torch_plan import Plan

__all__ = ["TILE_ROWS", "PANEL_ROWS", "TILE_ROWS_16BIT", "PANEL_ROWS_16BIT", "K_STEP_16BIT", "STREAM_BYTES",
           "bfloat16_isa", "native_takes", "native_applies", "native_forward", "native_backward", "product_tables"]

# Rows per tile of the products, and per panel of the grams (the blocks' gradients, summed over
# rows). Measured on one AVX-512 core with AMX (Xeon), 1024 -> 4096 at 4096 rows, fwd+bwd, medians of 5
# interleaved (bench/native_gemm_bench.py --tiles): float32 released configuration (tile, panel)
# (64, 128) 54.5 + 115 ms, (128, 128) 51 + 114, (32, 128) 61 + 118, panels of 512 rows 30% slower
# backward (gy's panel leaves the cache before its grams); budget 0.1: (64, 128) 34 + 71, (128, 128)
# 39 + 71. bfloat16 (AMX: fewer, longer micro-kernel calls pay): (128, 256) 24.3 + 34.2 ms released,
# 17.7 + 25.5 at budget 0.1, against (64, 128) 26.0 + 36.2 and 18.2 + 27.2. float32 re-measured once the
# grams' transposes were vectorised (csrc/transpose16.h), medians of 5 / 15, (128, 128) against (64, 128):
# released 55.4 + 115.2 against 58.9 + 118.0 ms at 4096 rows, 8.3 + 16.5 against 8.2 + 16.6 at 512; budget
# 0.1 29.8 + 66.8 against 29.3 + 67.7, 4.4 + 8.0 against 4.0 + 8.1: within 4% either way, so 64 stays (twice
# the tiles to share among threads at small batches).
TILE_ROWS = 64
PANEL_ROWS = 128
# bfloat16, per micro-kernel kind (:func:`bfloat16_isa`). AVX512-BF16 without AMX (AMD EPYC, Zen 4):
# interleaved in one process, one thread, 1024 -> 4096 fwd+bwd under autocast, medians of 7 (4096
# rows) and 31 (512), K step 2 with (tile, panel) (128, 256) against (64, 256): released 133.0 / 130.6
# ms at 4096 rows, 19.8 / 20.1 at 512; budget 0.1 79.8 / 72.5, 12.1 / 11.5; two threads 68.2 / 69.7,
# 11.5 / 11.3, 41.2 / 38.0, 7.4 / 7.2. (64, 128) and (32, 128) were no better than (64, 256).
TILE_ROWS_16BIT = {"amx": 128, "avx512_bf16": 64}
PANEL_ROWS_16BIT = {"amx": 256, "avx512_bf16": 256}
# bfloat16 K (the low-rank factors' products) padded with zeros to a multiple of this (see _k_pad):
# AMX tiles read K in steps of 32; AVX512-BF16's dot products in pairs. On AVX512-BF16 (as above),
# steps of 32 against 2: released 147.2 / 140.1 ms (4096 rows), 20.8 / 20.0 (512); budget 0.1
# 95.6 / 88.9, 13.1 / 12.2 (the released rank 32 and its bias make K 33: 64 with steps of 32).
K_STEP_16BIT = {"amx": 32, "avx512_bf16": 2}
# Outputs of at least this many bytes are accumulated per window and written by streaming
# (non-temporal) stores where a gather table's products form windows (csrc/blocksparse_cpu.cpp,
# find_windows, store_rows): y's lines are not read from memory before they are written, and y
# does not evict the operands from the caches. bench/stream_bench.py, one thread (Xeon with AMX),
# 1024 -> 4096 at 4096 rows (y 64 MB float32, 32 MB bfloat16), time without / with streaming for
# forward, forward+backward, forward then one read of y: float32 released 0.99 / 1.00 / 0.98, budget
# 0.1 1.08 / 1.01 / 1.04; bfloat16 released 1.06 / 1.06 / 1.12, budget 0.1 1.18 / 1.07 / 1.21. At
# 1568 rows of 768 -> 3072 (19 MB) and 1024 rows (16 MB), a threshold of 8 MB changed nothing.
STREAM_BYTES = 32 * 2 ** 20
# float32 backward of a plan that gathers x: each group's dX products, then its grams, panel by panel
# (:mod:`pixelfly_lab.ops.native_stages`). Interleaved in one process, medians of 9 (4096 rows) and
# 31 (512), backward, staged against the usual order: 1024 -> 4096 one thread released 116.1 -> 109.9 ms (4096 rows),
# 17.6 -> 17.0 (512), budget 0.1 68.7 -> 61.4, 10.8 -> 9.9; two threads 62.9 -> 59.3, 9.0 -> 8.7,
# 36.4 -> 33.0, 5.0 -> 4.8; 768 -> 3072 two threads 3-8% less. A transposed plan's dX (a gather
# table) measured -1% to +4%: not staged. On an AMD EPYC (Zen 4), interleaved in one process, one thread,
# layer fwd+bwd, medians of 7 (4096 rows) and 31-41 (512), staged against the usual order: released 247.8 /
# 251.0 ms (4096 rows), 36.8 / 37.0 (512); budget 0.1 131.0 / 124.2, 21.7 / 19.2; two threads at 512 rows
# 18.6 / 18.7, 11.4 / 10.5. So the order is measured on each machine ('measured': once per plan, config, rows
# bucket and threads, :func:`~pixelfly_lab.ops.native_stages.staging_pays`); True stages always, False never.
STAGED = "measured"
# The dtypes whose gather tables (the forward of a plan that gathers x, dX of a transposed plan) copy
# each group's runs and its low-rank operand side by side per tile, for one product per output slice
# (csrc/blocksparse_cpu.cpp, gathers). Interleaved in one process, bfloat16, medians of 11-21, one
# thread: forward of 1024 -> 4096 15.17 -> 13.37 ms released and 10.66 -> 9.05 at budget 0.1 (4096
# rows), 2.73 -> 2.71 and 2.33 -> 2.04 (512 rows), two threads 7.75 -> 7.19, 5.81 -> 4.73, 1.77 -> 1.78,
# 1.32 -> 1.22; dX of 4096 -> 1024 13.63 -> 11.95, 10.96 -> 9.80, 2.81 -> 2.79, 2.91 -> 2.62; results bit
# for bit the same. float32 gains nothing: its micro-kernels are bound by their FMAs, not by passes
# over the output (one K 256 product per slice 60.0 ms against K 192 + 64 58.2, 4096 rows of 16
# slices 256 wide). dX of a plan that gathers x through its layout's other orientation (a gather
# table of narrower slices and more runs): 12.3 -> 13.3 ms scattered / gathered plain, 13.4 -> 18.5
# with the gathers (released, 4096 rows): it stays a scatter table.
GATHERED = (torch.bfloat16,)


def bfloat16_isa() -> str:
    """The bfloat16 micro-kernels of this CPU that the sweep can run: ``'amx'`` (Xeon Sapphire
    Rapids and later), ``'avx512_bf16'`` (AVX512-BF16 dot products without AMX: AMD Zen 4 and later,
    Xeon Cooper Lake; found by one small product checked exactly) or ``''`` (none, or the compiled
    kernels off or not built). Asked of oneDNN on every call, as torch's oneDNN switch may change."""
    module = native.load("blocksparse_cpu") if native.enabled() else None
    return "" if module is None else module.bfloat16_isa()


def native_takes(dtype: torch.dtype, device, block_size: int = 2) -> bool:
    """Whether the compiled sweep takes products of ``dtype`` on ``device`` with blocks of
    ``block_size``: float32 on the CPU, and bfloat16 with an even block size (its micro-kernels read
    K in pairs) where the CPU has bfloat16 micro-kernels on VNNI-packed operands (AMX or
    AVX512-BF16: :func:`bfloat16_isa`); the kernel built (:func:`pixelfly_lab.ops.native.load`) and
    not turned off (``PIXELFLY_NATIVE=0``)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not native.enabled():
        return False
    if native.load("blocksparse_cpu") is None:
        return False
    return dtype == torch.float32 or (block_size % 2 == 0 and bool(bfloat16_isa()))


def native_applies(x2: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the compiled sweep takes this product in ``dtype`` (default: values'):
    :func:`native_takes` for that dtype and values' block size, x2's rows with unit column stride;
    x2 and values of that dtype, or float32 for bfloat16 (autocast: x2 rounded tile by tile inside
    the sweep and dX returned in float32, values rounded as they are packed)."""
    dtype = dtype or values.dtype

    def fits(t):
        return t.dtype == dtype or (t.dtype == torch.float32 and dtype == torch.bfloat16)
    return (fits(x2) and fits(values) and x2.dim() == 2 and x2.stride(1) == 1 and values.dim() == 3
            and native_takes(dtype, x2.device, values.shape[-1]))


def _right(m: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A B operand as the sweep reads it, in ``dtype`` (default: m's): contiguous (K, N) for float32;
    for bfloat16 in the VNNI layout (K/2, N, 2), rows in pairs (K must be even)."""
    m = m if dtype is None else m.to(dtype)
    if m.dtype == torch.float32:
        return m.contiguous()
    k, n = m.shape
    return m.reshape(k // 2, 2, n).transpose(1, 2).contiguous()


def _stacked(parts: list, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """The rows of ``parts`` (each (k_i, n)) in ``dtype``, then ``pad`` zero rows: a low-rank B operand
    ([U^T; bias] or V^T) with K padded for the micro-kernels (:func:`_k_pad`)."""
    return torch.cat([p.to(dtype) for p in parts] + [parts[0].new_zeros(pad, parts[0].shape[1], dtype=dtype)])


def _packed(values, plan: Plan, transpose: bool, dtype: torch.dtype, extra: torch.Tensor | None = None) -> list:
    """Each group's packed blocks as a B operand in ``dtype`` (:func:`_right`; float32 values
    rounded for bfloat16), an empty placeholder for a group without blocks; with ``extra`` (e, width)
    and ``transpose`` (B_g of K_g x n_g), each group's columns of it as e more rows below its blocks
    (:func:`~pixelfly_lab.ops.native_tables.gathered_products`). A stacked
    plan (every group alike: a flat block butterfly) is packed in one compiled pass (``pack_blocks``:
    0.3 instead of 1.3 ms for the released 1024 -> 4096)."""
    index, groups = plan.stacked_index, plan.groups
    if extra is not None and not transpose:
        raise ValueError("extra rows go below (K_g x n_g) operands: transpose=True only")
    if index is not None and values.is_contiguous():
        n_rows, k = groups[0].vidx.shape
        e = 0 if extra is None else extra.shape[0]
        stacked = native.load("blocksparse_cpu").pack_blocks(values, index, len(groups), n_rows, k, transpose,
                                                            plan.transposed, dtype == torch.bfloat16, e)
        if e:   # the groups tile extra's columns in order, n_g each
            n_g, below = groups[0].r1 - groups[0].r0, stacked.shape[1] - (e // 2 if dtype == torch.bfloat16 else e)
            ext = _right(extra, dtype=dtype)
            stacked[:, below:] = ext.reshape(ext.shape[0], len(groups), n_g, *ext.shape[2:]).transpose(0, 1)
        return list(stacked.unbind(0))
    blocks = plan.packed_all(values, transpose)
    if extra is not None:
        blocks = [extra[:, g.r0:g.r1] if m is None else torch.cat([m, extra[:, g.r0:g.r1].to(m.dtype)])
                  for m, g in zip(blocks, groups)]
    empty = values.new_empty(0, 0, dtype=dtype)
    return [empty if m is None else _right(m, dtype=dtype) for m in blocks]


def _unpacked(plan: Plan, values, grads, extra: int):
    """(the blocks' float32 gradient (nnz, b, b), the extra columns' (rows, extra) or None) from
    the sweep's accumulators: :func:`unpack_grads`, a stacked plan's blocks in one compiled pass."""
    def store(grad_values, grad_mt):
        n_rows, k = plan.groups[0].vidx.shape
        native.load("blocksparse_cpu").unpack_blocks(grad_mt, plan.stacked_index, n_rows, k, plan.transposed,
                                                     grad_values)
    like = values.new_empty((1,) * values.dim(), dtype=torch.float32).expand(values.shape)   # float32, unallocated
    return unpack_grads(plan, like, grads, extra, store)


def _kernels(dtype: torch.dtype) -> str:
    """The micro-kernels a call of the sweep in ``dtype`` runs on, read once per call: '' for
    float32, :func:`bfloat16_isa` for bfloat16 (an error where it names none: callers ask
    :func:`native_takes` first, and oneDNN may have been switched off since)."""
    if dtype != torch.bfloat16:
        return ""
    isa = bfloat16_isa()
    if isa not in TILE_ROWS_16BIT:
        raise RuntimeError(f"the bfloat16 sweep needs AMX or AVX512-BF16 micro-kernels, and bfloat16_isa() is {isa!r} "
                           "(oneDNN switched off, or none on this CPU)")
    return isa


def _k_pad(k: int, kernels: str) -> int:
    """Zero columns to add to a K of k for the micro-kernels of :func:`_kernels`: bfloat16 ones read
    K in pairs, and oneDNN's AMX ones in steps of :data:`K_STEP_16BIT` (a K of 34 ran at 74 GFLOP/s,
    one of 64 at 230, one thread, y 4096 wide)."""
    return -k % K_STEP_16BIT[kernels] if kernels else 0


def _sweep(kernels, rows, a_ops, b_ops, outs, table, g_a=(), g_b=(), grams=NO_GRAMS, accs=(), stages=_NO_STAGES,
           gathers=None):
    sixteen = bool(kernels)   # bfloat16: its micro-kernels' tiles and panels
    tile, panel = (TILE_ROWS_16BIT[kernels], PANEL_ROWS_16BIT[kernels]) if sixteen else (TILE_ROWS, PANEL_ROWS)
    tile, panel = (max(panel, tile),) * 2 if len(stages) else (tile, max(panel, tile))   # staged: one tile per panel
    native.load("blocksparse_cpu").sweep(sixteen, rows, tile, panel, list(a_ops), list(b_ops),
                                         list(outs), table, list(g_a), list(g_b), grams, list(accs), STREAM_BYTES,
                                         stages, NO_GATHERS if gathers is None else gathers)


def native_forward(x2, values, bias, u, v, plan: Plan, out_features: int, dtype: torch.dtype | None = None):
    """(y, z) of :func:`pixelfly_lab.ops.torch_grouped.grouped_forward`, by the compiled sweep:
    per tile z = x V (into [z, 1]) before the products that read it, the groups' products and
    [z, 1] @ [U^T; bias]. Computed in ``dtype`` (default: values'; y and z too); x2 and the
    parameters may be float32 for bfloat16 (autocast: rounded by the sweep and the packing). A
    plan that gathers x reads each group's runs and [z, 1] as one gathered A in the dtypes of
    :data:`GATHERED` (:func:`~pixelfly_lab.ops.native_tables.gathered_products`; so does dX of a
    transposed plan, in :func:`native_backward`)."""
    rows, dtype = x2.shape[0], dtype or values.dtype
    kernels = _kernels(dtype)
    gathered = dtype in GATHERED and not plan.transposed
    y = new_output((rows, out_features), values.new_empty(0, dtype=dtype))   # retained when large: no page faults
    a_ops, outs, lead, low_k, z1, low_b = [x2], [y], (), 0, None, None
    if u is not None or bias is not None:
        r = 0 if u is None else u.shape[1]
        low = r + (bias is not None)
        pad = _k_pad(low, kernels)
        low_k = low + pad
        z1 = x2.new_empty(rows, low_k, dtype=dtype)
        if bias is not None:
            z1[:, r] = 1
        if pad:
            z1[:, low:] = 0
        a_ops.append(z1)
        low_b = _stacked(([u.T] if u is not None else []) + ([bias[None]] if bias is not None else []), pad, dtype)
    b_ops = _packed(values, plan, not plan.transposed, dtype, low_b if gathered else None)
    if low_b is not None and not gathered:
        b_ops.append(_right(low_b))
    if u is not None:
        b_ops.append(_right(v, dtype=dtype))
        outs.append(z1)
        lead = (x2.shape[1], len(b_ops) - 1, r)
    if gathered:
        table, gathers = gathered_products(plan, low_k, lead)
    else:
        table, gathers = product_tables(plan, "scatter" if plan.transposed else "gather", low_k, out_features, lead), None
    _sweep(kernels, rows, a_ops, b_ops, outs, table, gathers=gathers)
    z = None if u is None else (z1 if low_k == u.shape[1] else z1[:, :u.shape[1]].contiguous())
    return y, z


def _accumulators(plan: Plan, extra: int) -> tuple[object, list]:
    """(what :func:`unpack_grads` reads, the 2-d float32 tensors the sweep writes): one stacked
    tensor for a stacked plan, else one per group."""
    if plan.stacked_index is not None:
        g = plan.groups[0]
        stacked = torch.empty(len(plan.groups), g.width + extra, g.r1 - g.r0)
        return stacked, list(stacked.unbind(0))
    accs = [torch.zeros(g.width + extra, g.r1 - g.r0) for g in plan.groups]
    return accs, accs


def native_backward(gy, x2, values, u, v, z, plan: Plan, needs_input_grad, has_bias: bool,
                    dtype: torch.dtype | None = None):
    """The gradients of :func:`native_forward` (what :func:`pixelfly_lab.ops.torch_grouped.grouped_backward`
    returns), by one compiled sweep: per tile gz = gy U and dX's products (gz before the products
    that read it), then per panel the blocks' gradients and the low-rank factors' and bias's
    (grams over the panel, transposed once; summed in float32 also for bfloat16 operands, rounded
    to the operands' dtype at the end); float32 with a plan that gathers x (:data:`STAGED`, where
    that measured faster): per panel, group by group, the group's dX products and then its grams.
    Computed in ``dtype`` (default: values'; gy, z of it); dX in x2's (float32 x2 of a bfloat16
    product: stored unrounded), the other gradients in the parameters' (float32 parameters: the
    float32 sums)."""
    gy = gy.contiguous()
    dtype = dtype or values.dtype
    kernels = _kernels(dtype)
    rows, in_features, out_features = x2.shape[0], x2.shape[1], gy.shape[1]
    need_x, need_values, need_bias, need_u, need_v = needs_input_grad
    need_bias = need_bias and has_bias
    grad_x = grad_values = grad_bias = grad_u = grad_v = None
    r = 0 if u is None else u.shape[1]
    pad = _k_pad(r, kernels)
    gz_full = gy.new_empty(rows, r + pad, dtype=dtype) if u is not None and (need_x or need_v) else None
    if gz_full is not None and pad:
        gz_full[:, r:] = 0
    gz = None if gz_full is None else gz_full[:, :r]
    # products: gz = gy U (output 1), and dX (output 0) reading gz; a gather table (a transposed
    # plan's) in the dtypes of GATHERED with each group's runs of gy and gz as one gathered A
    kind = "gather" if plan.transposed else "scatter"
    gathered = need_x and kind == "gather" and dtype in GATHERED
    low_t = None if gz is None else _stacked([v.T], pad, dtype)
    a_ops, b_ops, outs, lead, gathers = [gy], [], [gy.new_empty(0, 0)], (), None
    if need_x:
        b_ops = _packed(values, plan, plan.transposed, dtype, low_t if gathered else None)
        grad_x = outs[0] = new_output(tuple(x2.shape), x2)
    if gz is not None:
        a_ops.append(gz_full)
        outs.append(gz_full)
        b_ops += ([] if gathered else [_right(low_t)]) + [_right(u, dtype=dtype)]
        lead = (out_features, len(b_ops) - 1, r)
    if gathered:
        table, gathers = gathered_products(plan, r + pad if gz is not None else 0, lead)
    elif need_x:
        table = product_tables(plan, kind, r + pad if gz is not None else 0, in_features, lead)
    else:
        table = lead_table(lead)
    # grams: the groups' (gathered side^T @ row side, extra rows riding along), then the others: with the
    # groups' grams, gathered side^T @ a narrow operand, reading the gathered side as those transposed
    # it (no wide operand packed for them: bfloat16 dV of 1024 -> 4096 repacked x whole per panel);
    # without, narrow^T @ gathered side, the narrow operand transposed (float32 dV alone: 13.5 against
    # 12.8 ms the other way round, 12.1 against 10.8 at budget 0.1, 4096 rows, one thread)
    fold_bias = not plan.transposed and need_bias
    if plan.transposed:        # gathered side: gy (and gz: dV's rows); row side: x
        extra_a = gz if need_v else None
        g_a, g_b = [gy], [x2]
        others = ([(z, "u")] if need_u else []) + ([(None, "bias")] if need_bias else [])   # gy^T z, gy^T 1
    else:                      # gathered side: x (and [z, 1]: dU's and dbias's rows); row side: gy
        parts = ([z] if need_u else []) + ([gy.new_ones(rows, 1, dtype=dtype)] if fold_bias else [])
        extra_a = None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        g_a, g_b = [x2], [gy]
        others = [(gz, "v")] if need_v else []                                               # x^T gz
    if extra_a is not None:
        g_a.append(extra_a)
    extra = 0 if extra_a is None else extra_a.shape[1]
    groups = bool(need_values or extra)
    grads, accs = _accumulators(plan, extra) if groups else (None, [])
    pairs, first, wide = [], (len(g_b), len(accs)), g_a[0]
    for b, _ in others:
        b = gy.new_ones(rows, 1, dtype=dtype) if b is None else b
        if groups:   # acc (wide x narrow) += wide^T b
            g_b.append(b)
            pairs.append((0, wide.shape[1], b.shape[1]))
        else:        # acc (narrow x wide) += b^T wide
            g_a.append(b)
            g_b.append(wide)
            pairs.append((len(g_a) - 1, b.shape[1], wide.shape[1]))
        accs.append(torch.empty(pairs[-1][1], pairs[-1][2]))
    grams = gram_table(plan, groups, extra, tuple(pairs), first)
    if STAGED not in (True, False, "measured"):
        raise ValueError(f"native_linear.STAGED must be True, False or 'measured', got {STAGED!r}")
    staged = STAGED and need_x and groups and dtype == torch.float32 and not plan.transposed
    stages = _stages(plan, kind, table, grams) if staged else _NO_STAGES

    def run(stages, rows=rows):   # the sweep writes (never adds into) its outputs: run again, they are right
        _sweep(kernels, rows, a_ops, b_ops, outs, table, g_a, g_b, grams, accs, stages, gathers)
    config = (r, tuple(needs_input_grad), has_bias)
    if len(stages) and STAGED == "measured" and not staging_pays(plan, rows, run, stages, config):
        stages = _NO_STAGES
    run(stages)
    if grads is not None:
        grad_values, grad_extra = _unpacked(plan, values, grads, extra)
        if plan.transposed:
            grad_v = grad_extra if need_v else None
        else:
            grad_u = grad_extra[:, :r] if need_u else None
            grad_bias = grad_extra[:, -1] if fold_bias else None
    for (_, name), acc in zip(others, accs[len(accs) - len(others):]):
        acc = acc if groups else acc.T   # (wide x narrow)
        if name == "bias":
            grad_bias = acc[:, 0]
        elif name == "u":
            grad_u = acc
        else:
            grad_v = acc
    if not need_values:
        grad_values = None
    # the parameters' dtypes (the bias's is values'), and storage of their own: gradients that share
    # storage may not leave a custom op, and the strided slices above are the only ones that do
    # (views are not tracked here)
    like = (values, values, u, v)
    return (None if grad_x is None else grad_x.contiguous(),
            *(None if g is None else g.contiguous().to(t.dtype) for g, t in zip((grad_values, grad_bias, grad_u, grad_v),
                                                                                like)))
