"""What the compiled row sweep (pixelfly_lab/ops/native_linear.py) is measured by: one thread, medians
of interleaved rounds, GFLOP/s beside nn.Linear's own GEMM on the same machine.

    python bench/native_gemm_bench.py            # a group's product three ways, and dense
    python bench/native_gemm_bench.py --tiles [--dtype bfloat16]   # forward, backward per (tile, panel) rows

The first table is the figure behind the sweep: one group of the budget-0.1 layout of 1024 -> 4096
(x (512, 1024) read through a 96-column view, 128 output columns written into a 4096-wide y),
as ``torch.mm`` on the views (what the pure-PyTorch path calls), as the sweep's micro-kernel on the
same views, and dense ``torch.mm`` of the whole layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pixelfly_lab.nn.layers import PixelflyLinear
from pixelfly_lab.ops import native, native_linear
from pixelfly_lab.ops.torch_plan import plan_for
from pixelfly_lab.speed.layer_speed import RELEASED
from pixelfly_lab.speed.machine import machine_header


def _median_ms(fns: dict, rounds: int) -> dict:
    """Median milliseconds of each function, rounds interleaved (one warm-up call each first)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            tick = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - tick) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def group_products(rounds: int) -> None:
    sweep = native.load("blocksparse_cpu").sweep
    rows, k, n, groups = 512, 96, 128, 32
    x, w = torch.randn(rows, 1024), torch.randn(1024, 4096)
    y = torch.empty(rows, 4096)
    rights = [torch.randn(k, n) for _ in range(groups)]
    table = torch.tensor([(0, (g * 32) % (1024 - k), k, g, 0, n, n, g * n, 0, 0) for g in range(groups)])
    no_grams = torch.empty(0, 9, dtype=torch.long)

    def views():
        for g in range(groups):
            c0 = (g * 32) % (1024 - k)
            torch.mm(x[:, c0:c0 + k], rights[g], out=y[:, g * n:(g + 1) * n])

    ms = _median_ms({"dense torch.mm (512 x 1024 @ 1024 x 4096)": lambda: torch.mm(x, w, out=y),
                     "torch.mm on the group views": views,
                     "sweep micro-kernels on the same views": lambda: sweep(False, rows, 64, 64, [x], rights, [y], table,
                                                                            [], [], no_grams, [],
                                                                            native_linear.STREAM_BYTES)}, rounds)
    flops = {"dense": 2 * rows * 1024 * 4096, "group": 2 * rows * k * n * groups}
    for name, t in ms.items():
        print(f"{name:48s} {t:7.2f} ms  {flops['dense' if name.startswith('dense') else 'group'] / t / 1e6:6.1f} GFLOP/s")


def tiles(rounds: int, rows: int, dtype: torch.dtype) -> None:
    """Forward and backward ms per (tile, panel) rows, medians of interleaved rounds, both configurations."""
    x, gy = torch.randn(rows, 1024, dtype=dtype), torch.randn(rows, 4096, dtype=dtype)
    sixteen = dtype != torch.float32
    names = ("TILE_ROWS_16BIT", "PANEL_ROWS_16BIT") if sixteen else ("TILE_ROWS", "PANEL_ROWS")
    for label, kw in (("released", RELEASED), ("budget 0.1", {"budget": 0.1, "block_size": 32})):
        layer = PixelflyLinear(1024, 4096, **kw)
        plan = plan_for(layer.sparse.layout, 32)
        values, bias, u, v = (t.detach().to(dtype) for t in (layer.sparse.values, layer.bias, layer.lowrank.u,
                                                               layer.lowrank.v))
        times = {}
        for _ in range(rounds):
            for tile in (32, 64, 128, 256):
                for panel in sorted({tile, 2 * tile, 256, 512} - {p for p in (256, 512) if p < tile}):
                    setattr(native_linear, names[0], tile)
                    setattr(native_linear, names[1], panel)
                    tick = time.perf_counter()
                    _, z = native_linear.native_forward(x, values, bias, u, v, plan, 4096)
                    mid = time.perf_counter()
                    native_linear.native_backward(gy, x, values, u, v, z, plan, (True,) * 5, True)
                    times.setdefault((tile, panel), []).append(((mid - tick) * 1e3, (time.perf_counter() - mid) * 1e3))
        med = {k: (statistics.median(f for f, _ in t), statistics.median(b for _, b in t)) for k, t in times.items()}
        print(f"{label} ({dtype}):", "  ".join(f"tile {t} panel {p}: {f:.1f} + {b:.1f} ms"
                                                 for (t, p), (f, b) in sorted(med.items(), key=lambda i: sum(i[1]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", action="store_true", help="time forward+backward per (tile, panel) rows")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="--tiles: operand dtype")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{machine_header()}; one thread")
    if native.load("blocksparse_cpu") is None:
        raise SystemExit("the compiled kernel is not built here (see pixelfly_lab/ops/native.py)")
    if args.tiles:
        tiles(args.rounds, args.rows, getattr(torch, args.dtype))
    else:
        group_products(args.rounds)


if __name__ == "__main__":
    main()
