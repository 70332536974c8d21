"""Block-sparse attention against dense scaled dot-product attention: time and memory against T.

Times :func:`pixelfly_lab.ops.attention.block_sparse_attention` on a flat butterfly layout of
(T/b, T/b) blocks with a fixed number of factors (so a fixed fan-in of n_factors + 1 blocks per
row and density (n_factors + 1) b / T) against ``F.scaled_dot_product_attention``, forward and
forward+backward, interleaved round by round in one process (load from other processes hits
both alike; medians are reported). With a fixed fan-in the FLOP ratio T / ((n_factors + 1) b)
doubles with T: the Long Range Arena setting of the Pixelfly paper (Dao, Chen et al., ICLR
2022, arXiv 2112.00029, Sec. 5), where the sparse Transformer's speed-up grows with length.

Example:
    >>> table = attention_speed_table((128,), heads=1, head_dim=16, block_size=16, n_factors=1, repeats=1,
    ...                               memory=False)
    >>> table["T"].tolist(), table["density"].tolist()
    ([128], [0.25])
"""

from __future__ import annotations

import os
import statistics
import time

import pandas as pd
import torch
import torch.nn.functional as F

from pixelfly_lab.ops.attention import block_sparse_attention
from pixelfly_lab.structure.masks import flat_butterfly_mask
from pixelfly_lab.threads import num_threads

__all__ = ["attention_speed_table", "peak_memory_mb"]


_MEMORY_SCRIPT = """
import sys, torch, torch.nn.functional as F
from pixelfly_lab.ops.attention import block_sparse_attention
from pixelfly_lab.structure.masks import flat_butterfly_mask
method, B, H, T, D, b, n_factors, causal = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(1)
def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
def step(T):
    layout = flat_butterfly_mask(T // b, n_factors)
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, D)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    if method == "dense":
        F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal)).backward(grad)
    else:
        block_sparse_attention(q, k, v, layout, b, causal=bool(causal)).backward(grad)
    return (status("VmHWM") - before) / 1024
step(b * 2 ** n_factors)     # first call at the smallest size: one-time library set-up, small buffers
print(step(T))
"""


def peak_memory_mb(method: str, batch: int, heads: int, T: int, head_dim: int, block_size: int, n_factors: int,
                   causal: bool = False) -> float | None:
    """Peak resident memory added by one forward+backward, in MB, measured in a fresh process (Linux).

    ``method`` 'dense' (SDPA) or 'sparse' (block_sparse_attention on the flat butterfly layout).
    The child first runs the method once at the smallest length (one-time set-up: lazy imports,
    dispatch tables, ~150 MB that would otherwise swamp the figure, with buffers too small to
    be reused), then resets its high-water mark after building the inputs
    (``/proc/self/clear_refs``) and reports VmHWM - VmRSS: the inputs are excluded, their
    gradients and every temporary included. A fresh process, because an allocator that kept
    memory from an earlier call of the same size would hide the growth. None where /proc is
    missing (not Linux).
    """
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    args = [method, batch, heads, T, head_dim, block_size, n_factors, int(causal)]
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *map(str, args)], capture_output=True, text=True,
                            check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(result.stdout.split()[-1])


def _median_ms(times) -> float:
    return 1e3 * statistics.median(times)


def attention_speed_table(lengths=(1024, 2048, 4096, 8192), *, heads: int = 8, head_dim: int = 64,
                          block_size: int = 64, n_factors: int = 3, causal: bool = False, repeats: int = 5,
                          batch: int = 1, threads: int | None = 1, memory: bool = True) -> pd.DataFrame:
    """Forward and forward+backward times of block-sparse vs dense attention at each length.

    Args:
        lengths: T values (multiples of block_size, T / block_size a power of two >= 2^n_factors).
        heads, head_dim, batch: q, k, v are (batch, heads, T, head_dim) float32.
        block_size, n_factors: the flat butterfly layout; the defaults (64, 3) are the issue's
            setting: fan-in 4 blocks of 64, density 1/16 at T = 4096.
        causal: decoder attention for both.
        repeats: interleaved rounds; medians are reported.
        threads: torch threads while timing (1: the issue's single-thread setting; None: as set).
        memory: also measure each method's peak memory (:func:`peak_memory_mb`, a child process each).

    Returns:
        DataFrame, one row per T: density, flop_limit (1 / density), *_ms medians, speedup_forward,
        speedup_forward_backward, and dense_peak_mb, sparse_peak_mb when ``memory``.
    """
    rows = []
    with num_threads(threads):
        for T in lengths:
            layout = flat_butterfly_mask(T // block_size, n_factors)
            shape = (batch, heads, T, head_dim)
            q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
            grad = torch.randn(shape)

            def dense():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def sparse():
                return block_sparse_attention(q, k, v, layout, block_size, causal=causal)

            def forward(fn):
                with torch.no_grad():
                    fn()

            cases = {"dense_forward": lambda: forward(dense), "sparse_forward": lambda: forward(sparse),
                     "dense_forward_backward": lambda: dense().backward(grad),
                     "sparse_forward_backward": lambda: sparse().backward(grad)}
            for fn in cases.values():          # warm-up: plans, allocator, first-call dispatch
                fn()
            times = {name: [] for name in cases}
            for _ in range(repeats):
                for name, fn in cases.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            density = layout.float().mean().item()
            row = {"T": T, "heads": heads, "head_dim": head_dim, "block_size": block_size, "causal": causal,
                   "density": density, "flop_limit": 1 / density}
            row.update({f"{name}_ms": _median_ms(t) for name, t in times.items()})
            row["speedup_forward"] = row["dense_forward_ms"] / row["sparse_forward_ms"]
            row["speedup_forward_backward"] = row["dense_forward_backward_ms"] / row["sparse_forward_backward_ms"]
            if memory:
                for method in ("dense", "sparse"):
                    row[f"{method}_peak_mb"] = peak_memory_mb(method, batch, heads, T, head_dim, block_size,
                                                              n_factors, causal)
            rows.append(row)
    return pd.DataFrame(rows)
