"""What the compiled row sweep (pixelfly_lab/ops/native_linear.py) is measured by: one thread, medians
of interleaved rounds, GFLOP/s beside nn.Linear's own GEMM on the same machine.

    python bench/native_gemm_bench.py            # a group's product three ways, and dense
    python bench/native_gemm_bench.py --tiles [--dtype bfloat16]   # forward, backward per (tile, panel) rows
    python bench/native_gemm_bench.py --ceiling [--dtype bfloat16] # what bounds the forward's and backward's rates

Where the time goes inside the sweep: Linux ``perf`` samples user code without a hardware cycle
counter (``perf record -e cpu-clock -F 2000 python script.py``, then ``perf report --sort dso,sym``):
oneDNN's micro-kernels show as ``[JIT]``, the sweep's own loops (transposes, packing, rounding and
stores) under ``pixelfly_blocksparse_cpu.so``, and ``perf annotate`` points at the hot instructions.

The first table is the figure behind the sweep: one group of the budget-0.1 layout of 1024 -> 4096
(x (512, 1024) read through a 96-column view, 128 output columns written into a 4096-wide y),
as ``torch.mm`` on the views (what the pure-PyTorch path calls), as the sweep's micro-kernel on the
same views, and dense ``torch.mm`` of the whole layer.

``--ceiling`` bounds what the sweep can reach on this machine. The forward: the sweep's forward of
both configurations (x already in the dtype;
no autocast, custom op or autograd around it, which cost the layer a few ms more in ``bench``),
then the same products with every output slice moved into the first columns of a narrow output
that stays in the caches (same micro-kernel calls, no 4096-wide output written to memory). Rates
are useful GFLOP/s as fractions of dense ``torch.mm`` into a kept output (``of_mm``: the GEMM
itself) and of ``F.linear`` with a bias, allocating its output (``of_linear``: nn.Linear's
forward, the bench's reference, there also under autocast); one thread, same shape and dtype. The
gap between the two rows is mostly the cost of writing y (the narrow products are never
accumulated in windows nor streamed: their output columns overlap). The backward
(:func:`backward_ceiling`): dX, the grams and both, as run and with gy's columns folded so that it
stays in the caches. Last, the micro-kernel's rate by K (:func:`k_curve`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
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

    def micro_kernels():
        sweep(False, rows, 64, 64, [x], rights, [y], table, [], [], no_grams, [], native_linear.STREAM_BYTES,
              native_linear._NO_STAGES, native_linear.NO_GATHERS)

    ms = _median_ms({"dense torch.mm (512 x 1024 @ 1024 x 4096)": lambda: torch.mm(x, w, out=y),
                     "torch.mm on the group views": views,
                     "sweep micro-kernels on the same views": micro_kernels}, rounds)
    flops = {"dense": 2 * rows * 1024 * 4096, "group": 2 * rows * k * n * groups}
    for name, t in ms.items():
        print(f"{name:48s} {t:7.2f} ms  {flops['dense' if name.startswith('dense') else 'group'] / t / 1e6:6.1f} GFLOP/s")


def _fold(table: torch.Tensor, column: int, operand_field: int, width: int = 256) -> torch.Tensor:
    """The table with field ``column`` of the rows whose field ``operand_field`` is 0 (operand or
    output 0) taken modulo ``width``: every row reads or writes the same few columns of that
    operand (which then stay in the caches), same shapes, same calls. Folding only lowers an
    offset, so a read inside the operand stays inside."""
    moved = table.clone()
    rows = moved[:, operand_field] == 0
    moved[rows, column] %= width
    return moved


def _narrow(table: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the table with output 0's slices moved to columns [0, N) of an N-wide output, N): the
    widest slice's N; every slice starts at a multiple of its width (the plan's groups), so it
    lands inside."""
    out0 = table[:, 9] == 0
    width = int(table[out0, 6].max())
    moved = _fold(table, 7, 9, width)
    if bool((moved[out0, 7] + moved[out0, 6] > width).any()):
        raise ValueError("a slice of the table does not start at a multiple of its width")
    return moved, width


def ceiling(rows: int, rounds: int, dtype: torch.dtype) -> list[dict]:
    """The sweep's forward of the released configuration and budget 0.1 (1024 -> 4096; x already
    in ``dtype``, no autocast, no custom op or autograd around it), and its products into a
    cache-resident output; rates as fractions of two dense references: torch.mm into a kept
    output (the GEMM itself) and F.linear with a bias, allocating its output (what nn.Linear's
    forward does; the bench's reference, there also under autocast). One row each."""
    x, w = torch.randn(rows, 1024, dtype=dtype), torch.randn(1024, 4096, dtype=dtype)
    weight, bias = w.T.contiguous(), torch.randn(4096, dtype=dtype)
    y = torch.empty(rows, 4096, dtype=dtype)
    fns = {"mm": lambda: torch.mm(x, w, out=y), "linear": lambda: torch.nn.functional.linear(x, weight, bias)}
    flops = {"mm": 2 * rows * 1024 * 4096, "linear": 2 * rows * 1024 * 4096}
    tables, output, gathered = native_linear.product_tables, native_linear.new_output, native_linear.gathered_products
    for label, kw in (("released", RELEASED), ("budget 0.1", {"budget": 0.1, "block_size": 32})):
        layer = PixelflyLinear(1024, 4096, **kw)
        plan = plan_for(layer.sparse.layout, 32)
        operands = [t.detach().to(dtype) for t in (layer.sparse.values, layer.bias, layer.lowrank.u, layer.lowrank.v)]
        _, width = _narrow(tables(plan, "gather", 0, 4096))
        narrow_y, narrowed = torch.empty(rows, width, dtype=dtype), {}

        def narrow_tables(*args, narrowed=narrowed):   # moved once, outside the timed calls after the first
            if args not in narrowed:
                narrowed[args] = _narrow(tables(*args))[0]
            return narrowed[args]

        def narrow_gathered(*args, narrowed=narrowed):   # the gathers name products, not columns: kept
            if ("gathered",) + args not in narrowed:
                table, gathers = gathered(*args)
                narrowed[("gathered",) + args] = (_narrow(table)[0], gathers)
            return narrowed[("gathered",) + args]

        def run(narrow, operands=operands, plan=plan, narrow_y=narrow_y, narrow_tables=narrow_tables,
                narrow_gathered=narrow_gathered):
            if narrow:   # native_forward's own set-up, with y narrow and the slices moved into it
                native_linear.product_tables, native_linear.gathered_products = narrow_tables, narrow_gathered
                native_linear.new_output = lambda shape, like: narrow_y if shape[1] == 4096 else output(shape, like)
            try:
                native_linear.native_forward(x, *operands, plan, 4096)
            finally:
                native_linear.product_tables, native_linear.new_output = tables, output
                native_linear.gathered_products = gathered
        for narrow in (False, True):
            fns[(label, narrow)] = lambda run=run, narrow=narrow: run(narrow)
        flops[label] = 2 * rows * 1024 * 4096 * layer.budget   # useful: the stored entries' products
    ms = _median_ms(fns, rounds)
    mm_rate, linear_rate = (flops[k] / ms[k] / 1e6 for k in ("mm", "linear"))
    out = []
    for key, t in ms.items():
        if key in ("mm", "linear"):
            continue
        label, narrow = key
        rate = flops[label] / t / 1e6
        out.append({"layer": label, "output": "narrow (in cache)" if narrow else "4096 wide (sweep)", "ms": t,
                    "useful_gflops": rate, "mm_gflops": mm_rate, "of_mm": rate / mm_rate,
                    "linear_gflops": linear_rate, "of_linear": rate / linear_rate})
    return out


def backward_ceiling(rows: int, rounds: int, dtype: torch.dtype) -> list[dict]:
    """The sweep's backward (1024 -> 4096, both configurations, x and gy already in ``dtype``)
    in parts: dX alone (with gz = gy U, which it reads), the grams alone (the blocks', U's,
    V's and the bias's gradients, with gz for dV), and both in one sweep (what the layer runs);
    each as run and with every read of gy folded into its first 256 columns (:func:`_fold`: gy
    in the caches, same products). Rates are useful GFLOP/s (the stored entries' products: one
    GEMM's worth for a part, two for both) as fractions of dense ``torch.mm`` into a kept output
    on the same shapes: gy @ W for dX, gy^T @ x for the weight's gradient, their combined rate for
    both (``of_mm``). The gap between a part as run and folded is what reading gy from memory
    costs it, with two exceptions: the grams alone compute gz = gy U (for dV) as one product per
    tile over all of gy, which is not folded; and bfloat16 grams pack a B slice once for
    consecutive grams that read the same one, which folding makes more frequent (fewer packs,
    besides gy in the caches). "both" runs as the layer does (float32: staged, group by group,
    :mod:`pixelfly_lab.ops.native_stages`), folded too: its stages are found from the unfolded
    tables (the folded ones have the same rows in the same order). A plan of the transposed layout
    (gy on the other side of the grams) is refused: only 1024 -> 4096 is timed, whose plans gather x."""
    x, gy = torch.randn(rows, 1024, dtype=dtype), torch.randn(rows, 4096, dtype=dtype)
    w = torch.randn(4096, 1024, dtype=dtype)
    dx, dw = torch.empty(rows, 1024, dtype=dtype), torch.empty(4096, 1024, dtype=dtype)
    fns = {"dX": lambda: torch.mm(gy, w, out=dx), "grams": lambda: torch.mm(gy.T, x, out=dw)}
    flops = {"dX": 2 * rows * 1024 * 4096, "grams": 2 * rows * 1024 * 4096}
    tables, grams, stages = native_linear.product_tables, native_linear.gram_table, native_linear._stages
    needs = {"dX": (True, False, False, False, False), "grams": (False, True, True, True, True), "both": (True,) * 5}
    for label, kw in (("released", RELEASED), ("budget 0.1", {"budget": 0.1, "block_size": 32})):
        layer = PixelflyLinear(1024, 4096, **kw)
        plan = plan_for(layer.sparse.layout, 32)
        values, bias, u, v = (t.detach().to(dtype) for t in (layer.sparse.values, layer.bias, layer.lowrank.u,
                                                               layer.lowrank.v))
        if plan.transposed:
            raise ValueError("backward_ceiling folds gy as the grams' B operand: plans that gather x only")
        _, z = native_linear.native_forward(x, values, bias, u, v, plan, 4096)
        folded, unfolded = {}, {}   # (kind, args) -> folded table; id(folded table) -> (it, the original)

        def cached(kind, fold_args, make, args, folded=folded, unfolded=unfolded):
            if (kind,) + args not in folded:   # folded once, outside the timed calls after the first
                original = make(*args)
                folded[(kind,) + args] = _fold(original, *fold_args)
                unfolded[id(folded[(kind,) + args])] = (folded[(kind,) + args], original)
            return folded[(kind,) + args]

        def original(table, unfolded=unfolded):
            hit = unfolded.get(id(table))
            return hit[1] if hit is not None and hit[0] is table else table

        def run(part, fold, values=values, u=u, v=v, z=z, plan=plan, cached=cached, original=original):
            if fold:   # gy's columns folded in the products (A operand 0) and the grams (B operand 0)
                native_linear.product_tables = lambda *a: cached("p", (1, 0), tables, a)
                native_linear.gram_table = lambda *a: cached("g", (4, 3), grams, a)
                native_linear._stages = lambda plan, kind, t, g: stages(plan, kind, original(t), original(g))
            try:
                native_linear.native_backward(gy, x, values, u, v, z, plan, needs[part], True)
            finally:
                native_linear.product_tables, native_linear.gram_table = tables, grams
                native_linear._stages = stages
        for part in needs:
            for fold in (False, True):
                fns[(label, part, fold)] = lambda run=run, part=part, fold=fold: run(part, fold)
                flops[(label, part, fold)] = 2 * rows * 1024 * 4096 * layer.budget * (2 if part == "both" else 1)
    ms = _median_ms(fns, rounds)
    dense = {part: flops[part] / ms[part] / 1e6 for part in ("dX", "grams")}
    out = []
    for key, t in ms.items():
        if key in dense:
            continue
        label, part, fold = key
        rate = flops[key] / t / 1e6
        both = (flops["dX"] + flops["grams"]) / (ms["dX"] + ms["grams"]) / 1e6   # the two GEMMs one after the other
        mm_rate = both if part == "both" else dense[part]
        out.append({"layer": label, "part": part, "gy": "in cache (folded)" if fold else "as run", "ms": t,
                    "useful_gflops": rate, "mm_gflops": mm_rate, "of_mm": rate / mm_rate})
    return out


def k_curve(rows: int, rounds: int, dtype: torch.dtype, ks=(32, 64, 128, 256, 512, 1024), n: int = 256) -> list[dict]:
    """The micro-kernel's rate by K: one product per tile, (tile x K) @ (K x n), written into an
    n-wide output that stays in the caches (A: rows x 1024, read in place; B packed as the sweep
    reads it), one thread. A block-sparse layer's products have K = the blocks a group reads (96-192
    at 1024 -> 4096, budget 0.1-0.23) against 1024 for the dense GEMM."""
    sweep = native.load("blocksparse_cpu").sweep
    x, y = torch.randn(rows, 1024, dtype=dtype), torch.empty(rows, n, dtype=dtype)
    no_grams = torch.empty(0, 9, dtype=torch.long)
    sixteen = dtype == torch.bfloat16
    isa = native_linear.bfloat16_isa()
    tile = native_linear.TILE_ROWS_16BIT[isa] if sixteen else native_linear.TILE_ROWS
    panel = max(tile, native_linear.PANEL_ROWS_16BIT[isa] if sixteen else native_linear.PANEL_ROWS)
    fns = {}
    for k in ks:
        b = native_linear._right(torch.randn(k, n, dtype=dtype))
        table = torch.tensor([(0, 0, k, 0, 0, n, n, 0, 0, 0)])
        fns[k] = lambda b=b, table=table: sweep(sixteen, rows, tile, panel, [x], [b], [y], table, [], [], no_grams, [],
                                                native_linear.STREAM_BYTES, native_linear._NO_STAGES,
                                                native_linear.NO_GATHERS)
    ms = _median_ms(fns, rounds)
    return [{"K": k, "N": n, "tile_rows": tile, "ms": t, "gflops": 2 * rows * k * n / t / 1e6} for k, t in ms.items()]


def tiles(rounds: int, rows: int, dtype: torch.dtype) -> None:
    """Forward and backward ms per (tile, panel) rows, medians of interleaved rounds, both configurations."""
    x, gy = torch.randn(rows, 1024, dtype=dtype), torch.randn(rows, 4096, dtype=dtype)
    sixteen = dtype != torch.float32
    for label, kw in (("released", RELEASED), ("budget 0.1", {"budget": 0.1, "block_size": 32})):
        layer = PixelflyLinear(1024, 4096, **kw)
        plan = plan_for(layer.sparse.layout, 32)
        values, bias, u, v = (t.detach().to(dtype) for t in (layer.sparse.values, layer.bias, layer.lowrank.u,
                                                               layer.lowrank.v))
        times = {}
        for _ in range(rounds):
            for tile in (32, 64, 128, 256):
                for panel in sorted({tile, 2 * tile, 256, 512} - {p for p in (256, 512) if p < tile}):
                    if sixteen:   # this CPU's bfloat16 micro-kernels' entry
                        native_linear.TILE_ROWS_16BIT[native_linear.bfloat16_isa()] = tile
                        native_linear.PANEL_ROWS_16BIT[native_linear.bfloat16_isa()] = panel
                    else:
                        native_linear.TILE_ROWS, native_linear.PANEL_ROWS = tile, panel
                    tick = time.perf_counter()
                    _, z = native_linear.native_forward(x, values, bias, u, v, plan, 4096)
                    mid = time.perf_counter()
                    native_linear.native_backward(gy, x, values, u, v, z, plan, (True,) * 5, True)
                    times.setdefault((tile, panel), []).append(((mid - tick) * 1e3, (time.perf_counter() - mid) * 1e3))
        med = {k: (statistics.median(f for f, _ in t), statistics.median(b for _, b in t)) for k, t in times.items()}
        print(f"{label} ({dtype}):", "  ".join(f"tile {t} panel {p}: {f:.1f} + {b:.1f} ms"
                                                 for (t, p), (f, b) in sorted(med.items(), key=lambda i: sum(i[1]))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", action="store_true", help="time forward+backward per (tile, panel) rows")
    parser.add_argument("--ceiling", action="store_true",
                        help="the forward's rate as run and into a cache-resident output, the backward's parts "
                             "as run and with gy in the caches, beside dense")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="--tiles, --ceiling: operand dtype")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{machine_header()}; one thread")
    if native.load("blocksparse_cpu") is None:
        raise SystemExit("the compiled kernel is not built here (see pixelfly_lab/ops/native.py)")
    if args.rows < 1 or args.rounds < 1:
        raise ValueError(f"--rows and --rounds must be positive, got {args.rows} and {args.rounds}")
    if args.dtype == "bfloat16" and not native_linear.native_takes(torch.bfloat16, "cpu", 32):
        raise SystemExit("bfloat16: the compiled sweep needs AMX or AVX512-BF16 here (native_linear.native_takes)")
    if args.ceiling:
        dtype = getattr(torch, args.dtype)
        print(pd.DataFrame(ceiling(args.rows, args.rounds, dtype)).to_string(index=False))
        print("\nthe backward in parts, as run and with gy in the caches:")
        print(pd.DataFrame(backward_ceiling(args.rows, args.rounds, dtype)).to_string(index=False))
        print("\nthe micro-kernel by K (one product per tile into a cache-resident output):")
        print(pd.DataFrame(k_curve(args.rows, args.rounds, dtype)).to_string(index=False))
    elif args.tiles:
        tiles(args.rounds, args.rows, getattr(torch, args.dtype))
    else:
        group_products(args.rounds)


if __name__ == "__main__":
    main()
