"""Pixelfly attention against dense scaled dot-product attention: time, FLOP limit and memory against T.

What a user puts in a model is the layer, so the layer is what is timed:
:class:`pixelfly_lab.nn.attention.PixelflyAttention` (its defaults unless told otherwise) forward +
backward against :class:`SDPAAttention`, the same layer (the same q, k, v and output projections)
calling ``F.scaled_dot_product_attention``. The bare kernel
(:func:`pixelfly_lab.ops.attention.block_sparse_attention` on the layer's layout against SDPA on the
same q, k, v) is the second row of each length. Cases are interleaved round by round in one
process (load from other processes hits both alike; medians are reported).

The FLOP limit of a row is dense FLOPs / the FLOPs of the route the sparse side takes, the q, k, v
and output projections included for the layer, and for ``causal`` only the scores with j <= i counted
on both sides (dense: T (T + 1) / 2; the kernel: the kept blocks below the diagonal plus half of each
diagonal block): the causal limit is not 1 / density. A layer below
:func:`pixelfly_lab.nn.attention.masked_sdpa_below` tokens takes the masked-SDPA route (column
``route``), whose fused kernel computes all T^2 scores (the layout and causality are its mask): its
limit is about 1 (below 1 when causal), and ``layout_flop_limit`` keeps what the layout alone would
allow (the kernel route's limit). With a fan-in that grows like log2(T / b) that limit grows with T:
the Long Range Arena setting of the Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029,
Sec. 5).

Example:
    >>> table = attention_speed_table((128,), dim=32, heads=2, block_size=16, causal=False, repeats=1,
    ...                               memory=False)
    >>> table["row"].tolist(), table["T"].tolist()
    (['layer', 'kernel'], [128, 128])
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pixelfly_lab.nn.attention import PixelflyAttention
from pixelfly_lab.ops.attention import block_sparse_attention
from pixelfly_lab.threads import num_threads
from pixelfly_lab.training.models import Attention
from pixelfly_lab.speed.machine import load_average

__all__ = ["SDPAAttention", "attention_flops", "attention_speed_table", "dense_gemm_gflops", "peak_memory_mb"]


class SDPAAttention(Attention):
    """The dense twin of a :class:`PixelflyAttention`: its own projections, softmax over all keys (SDPA).

    The forward is :class:`pixelfly_lab.training.models.Attention`'s (the toolkit's dense attention);
    only the construction differs: the projections are the layer's (shared, not copied), so
    ``Attention.__init__`` (which would make new ones) is skipped.

    Args:
        layer: the PixelflyAttention whose q, k, v and proj (shared, not copied) and causal flag it uses.
    """

    def __init__(self, layer: PixelflyAttention):
        if not isinstance(layer, PixelflyAttention):
            raise TypeError(f"layer must be a PixelflyAttention, got {type(layer).__name__}")
        nn.Module.__init__(self)
        self.heads, self.causal = layer.heads, layer.causal
        self.q, self.k, self.v, self.proj = layer.q, layer.k, layer.v, layer.proj


def dense_gemm_gflops(rows: int, dim: int, *, repeats: int = 5, threads: int | None = 1) -> float:
    """The machine's dense fp32 GEMM rate on one (rows, dim) @ (dim, dim) matmul, in GFLOP/s.

    The shape of the layers' projections (x (B T, dim) times a (dim, dim) weight), timed at the
    table's threads: the yardstick the attention speed-ups are read against (DESIGN: targets are
    fractions of the same machine's dense rate).

    Args:
        rows, dim: the matmul's shape.
        repeats: timed calls after one warm-up; the median is used.
        threads: torch threads while timing (None: as set).

    Returns:
        2 * rows * dim * dim / median seconds / 1e9.

    Example:
        >>> dense_gemm_gflops(64, 32, repeats=1) > 0
        True
    """
    x, w = torch.randn(rows, dim), torch.randn(dim, dim)
    with num_threads(threads):
        x @ w
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ w
            times.append(time.perf_counter() - start)
    return 2 * rows * dim * dim / statistics.median(times) / 1e9


def attention_flops(layer: PixelflyAttention, T: int, batch: int = 1, *, dense: bool = False,
                    projections: bool = True, route: str | None = None) -> float:
    """Forward multiply-add FLOPs (x2) of the layer (or its dense twin) at length T, on the route it takes.

    Scores and the weighted sum cost 2 * 2 * D per computed (i, j) and head; with ``causal`` only
    j <= i is computed (dense: T (T + 1) / 2 pairs; the kernel: b^2 per kept block below the diagonal,
    b (b + 1) / 2 per diagonal block); the masked-SDPA route computes all T^2 pairs (its fused kernel
    skips no tile of a masked call). Projections: 4 * 2 * T * dim^2. Random features (m > 0):
    feature maps 2 * 2 T m D, the low-rank product 2 * 2 T m (D + 1) and the discount on the
    support 2 * pairs * (m + D + 1), per head.

    Args:
        layer: the layer (its layout at T, heads, dim, features).
        T: sequence length.
        batch: B.
        dense: count the dense twin (SDPA) instead.
        projections: count the whole layer: the four projections and the random features (False:
            the attention alone, which computes neither).
        route: the sparse side's route, 'kernel' or 'masked_sdpa' (None: the layer's
            :meth:`~pixelfly_lab.nn.attention.PixelflyAttention.route_at` T on its device when
            ``projections``, 'kernel' when not: the bare kernel row).

    Returns:
        FLOPs of one forward pass.
    """
    D = layer.dim // layer.heads
    b = layer.block_size
    if route is None:
        route = layer.route_at(T) if projections else "kernel"
    if route not in ("kernel", "masked_sdpa"):
        raise ValueError(f"route must be 'kernel' or 'masked_sdpa', got {route!r}")
    if dense:
        pairs = T * (T + 1) / 2 if layer.causal else T * T
    elif route == "masked_sdpa":
        pairs = T * T                            # every score of a masked call, causal ones included
    else:
        layout = layer.layout_for(T)
        if layer.causal:
            below = torch.tril(layout, diagonal=-1).sum().item()
            pairs = below * b * b + layout.diagonal().sum().item() * b * (b + 1) / 2
        else:
            pairs = layout.sum().item() * b * b
    flops = 4 * D * pairs * layer.heads
    if not dense and layer.features and projections:
        m = layer.features
        flops += layer.heads * (4 * T * m * D + 4 * T * m * (D + 1) + 2 * pairs * (m + D + 1))
    if projections:
        flops += 4 * 2 * T * layer.dim ** 2
    return batch * flops


_MEMORY_SCRIPT = """
import json, sys, torch
from pixelfly_lab.nn.attention import PixelflyAttention
from pixelfly_lab.ops.attention import block_sparse_attention
from pixelfly_lab.speed.attention import SDPAAttention
import torch.nn.functional as F
case = json.loads(sys.argv[1])
torch.set_num_threads(1)
def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
def step(T, **extra):
    layer = PixelflyAttention(case["dim"], case["heads"], T, **{**case["options"], **extra})
    B, H, D = case["batch"], case["heads"], case["dim"] // case["heads"]
    if case["row"] == "layer":
        x = torch.randn(B, T, case["dim"], requires_grad=True)
        fn = layer if case["method"] == "sparse" else SDPAAttention(layer)
        run = lambda: fn(x)
    else:
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
        key = layer.layout_key(T)
        if case["method"] == "sparse":
            run = lambda: block_sparse_attention(q, k, v, key, layer.block_size, causal=layer.causal)
        else:
            run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=layer.causal)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    out = run()
    out.backward(torch.ones_like(out))
    return (status("VmHWM") - before) / 1024
# one-time set-up at the smallest size, of both routes the layer may take (auto: masked SDPA there)
step(4 * case["options"].get("block_size", 32))
step(4 * case["options"].get("block_size", 32), route="kernel")
print(step(case["T"]))
"""


def peak_memory_mb(method: str, row: str, T: int, *, dim: int, heads: int, batch: int = 1,
                   options: dict | None = None) -> float | None:
    """Peak resident memory added by one forward+backward, in MB, measured in a fresh process (Linux).

    Args:
        method: 'sparse' (PixelflyAttention / block_sparse_attention) or 'dense' (SDPA twin / SDPA).
        row: 'layer' (the modules, input x (B, T, dim)) or 'kernel' (q, k, v (B, heads, T, dim / heads)).
        T, dim, heads, batch: sizes.
        options: keyword arguments of PixelflyAttention (its layout is the kernel's too).

    Returns:
        MB, or None where /proc is missing (not Linux). The child runs once at a small length
        (one-time set-up: lazy imports, dispatch tables), builds the inputs, resets its high-water
        mark (``/proc/self/clear_refs``) and reports VmHWM - VmRSS: the parameters and inputs are
        excluded, their gradients and every temporary included. A fresh process, because an
        allocator that kept memory from an earlier call of the same size would hide the growth.
    """

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    case = {"method": method, "row": row, "T": T, "dim": dim, "heads": heads, "batch": batch,
            "options": options or {}}
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(case)], capture_output=True, text=True,
                            check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(result.stdout.split()[-1])


def attention_speed_table(lengths=(1024, 2048, 4096, 8192), *, dim: int = 512, heads: int = 8, batch: int = 1,
                          causal: bool | tuple = (False, True), block_size: int = 32, options: dict | None = None,
                          repeats: int = 5, threads: int | None = 1, memory: bool = True,
                          kernel_lengths=(), progress: bool = False) -> pd.DataFrame:
    """Forward+backward of PixelflyAttention against its SDPA twin (row 'layer') and of the kernel
    against SDPA (row 'kernel'), at each length and causal flag.

    Args:
        lengths: T values (multiples of ``block_size``).
        dim, heads, batch: the layer's width and heads (head dim = dim / heads), x is (batch, T, dim).
        causal: a bool or a tuple of them (both by default).
        block_size: the layer's b (32, its default).
        options: other keyword arguments of PixelflyAttention (default: none, its defaults).
        repeats: interleaved rounds; medians are reported.
        threads: torch threads while timing (1: the targets' single-thread setting; None: as set).
        memory: also measure each case's peak memory (:func:`peak_memory_mb`, a child process each).
        kernel_lengths: further T values where only the kernel row is timed (long sequences whose
            layer rows would take too long).
        progress: show a tqdm bar over the cases.

    Returns:
        DataFrame, one row per (T, causal, row): route (the sparse side's: the layer's
        :meth:`~pixelfly_lab.nn.attention.PixelflyAttention.route_at` T, 'kernel' for the kernel row),
        density (of the layout at T), flop_limit (dense FLOPs / the route's, see the module
        docstring), layout_flop_limit (dense / the kernel route's: what the layout allows),
        dense_ms and sparse_ms (medians of forward + backward), speedup, fraction_of_limit (speedup /
        flop_limit), sparse_gflops (the sparse side's rate on the work its route does: forward FLOPs
        x 3.5 for the attention (2 products forward, 5 backward with the recomputed scores) and x 3
        for the projections and random features, over sparse_ms),
        dense_gemm_gflops (:func:`dense_gemm_gflops` at (batch * T, dim) x (dim, dim), T capped at
        4096, same threads, measured once per table), and dense_peak_mb, sparse_peak_mb,
        memory_ratio when ``memory``; load_avg (1-minute, after the row's timing).
    """

    flags = (causal,) if isinstance(causal, bool) else tuple(causal)
    cases = [(T, c, ("layer", "kernel")) for T in lengths for c in flags]
    cases += [(T, c, ("kernel",)) for T in kernel_lengths for c in flags]
    gemm_rows = batch * min(4096, max(T for T, _, _ in cases))
    gemm_rate = dense_gemm_gflops(gemm_rows, dim, repeats=repeats, threads=threads)
    rows = []
    with num_threads(threads):
        for T, is_causal, kinds in tqdm(cases, disable=not progress, desc="attention speed"):
            layer_options = {"block_size": block_size, "causal": is_causal, **(options or {})}
            torch.manual_seed(0)
            layer = PixelflyAttention(dim, heads, T, **layer_options)
            runs = _runs(layer, T, batch, kinds)
            for run in runs.values():            # warm-up: plans, allocator, first-call dispatch
                run()
            times = {name: [] for name in runs}
            for _ in range(repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            for row in kinds:
                entry = _row(layer, T, batch, row, times)
                entry["dense_gemm_gflops"] = gemm_rate
                entry["load_avg"] = load_average()[0]
                if memory:
                    for method in ("dense", "sparse"):
                        entry[f"{method}_peak_mb"] = peak_memory_mb(method, row, T, dim=dim, heads=heads,
                                                                    batch=batch, options=layer_options)
                    if entry["dense_peak_mb"]:
                        entry["memory_ratio"] = entry["sparse_peak_mb"] / entry["dense_peak_mb"]
                rows.append(entry)
    return pd.DataFrame(rows)


def _runs(layer: PixelflyAttention, T: int, batch: int, kinds) -> dict:
    """{(row, method): forward+backward closure} of a case, on fresh inputs."""
    shape = (batch, layer.heads, T, layer.dim // layer.heads)
    runs = {}
    if "layer" in kinds:
        twin = SDPAAttention(layer)
        x, grad_x = torch.randn(batch, T, layer.dim, requires_grad=True), torch.randn(batch, T, layer.dim)
        runs[("layer", "sparse")] = lambda: layer(x).backward(grad_x)
        runs[("layer", "dense")] = lambda: twin(x).backward(grad_x)
    if "kernel" in kinds:
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        grad_q = torch.randn(shape)
        key, b, causal = layer.layout_key(T), layer.block_size, layer.causal   # the layer's registered layout
        runs[("kernel", "sparse")] = lambda: block_sparse_attention(q, k, v, key, b, causal=causal).backward(grad_q)
        runs[("kernel", "dense")] = lambda: F.scaled_dot_product_attention(q, k, v,
                                                                           is_causal=causal).backward(grad_q)
    return runs


def _row(layer: PixelflyAttention, T: int, batch: int, row: str, times: dict) -> dict:
    """One table row from the timings: medians, speed-up, FLOP limit of the route taken and the sparse side's rate."""
    projections = row == "layer"
    route = layer.route_at(T) if projections else "kernel"
    dense_flops = attention_flops(layer, T, batch, dense=True, projections=projections)
    sparse_flops = attention_flops(layer, T, batch, projections=projections, route=route)
    entry = {"T": T, "causal": layer.causal, "row": row, "route": route, "dim": layer.dim, "heads": layer.heads,
             "batch": batch, "block_size": layer.block_size, "features": layer.features,
             "density": layer.density_at(T), "flop_limit": dense_flops / sparse_flops,
             "layout_flop_limit": dense_flops / attention_flops(layer, T, batch, projections=projections,
                                                                route="kernel"),
             "dense_ms": 1e3 * statistics.median(times[(row, "dense")]),
             "sparse_ms": 1e3 * statistics.median(times[(row, "sparse")])}
    entry["speedup"] = entry["dense_ms"] / entry["sparse_ms"]
    entry["fraction_of_limit"] = entry["speedup"] / entry["flop_limit"]
    attention_only = attention_flops(layer, T, batch, projections=False, route=route)
    useful = 3.5 * attention_only + 3 * (sparse_flops - attention_only)
    entry["sparse_gflops"] = useful / (entry["sparse_ms"] * 1e6)
    return entry
