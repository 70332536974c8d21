"""Streaming stores for large outputs of the compiled sweep, on and off, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stream_bench.py [--rows 4096] [--rounds 15]

``pixelfly_lab.ops.native_linear.STREAM_BYTES`` decides which outputs the sweep writes by
non-temporal stores (accumulated per output window first; ``csrc/blocksparse_cpu.cpp``,
``store_rows``). This times a PixelflyLinear 1024 -> 4096 (the released configuration and budget
0.1; float32 and under bfloat16 autocast) with the threshold as shipped and with streaming off,
interleaved (the order alternates each round), 32 MB of other memory traffic before every call:

- forward (no grad), forward+backward (the bench's headline), and forward followed by one read
  of y (``y.sum()``: a consumer must fetch a streamed y from memory; this shows whether the
  writer's saving is only moved to the reader).

Prints the CPU line, one row per (dtype, configuration) with the medians in ms, and the ratios
off / on (above 1: streaming faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pixelfly_lab.nn.layers import PixelflyLinear
from pixelfly_lab.ops import native_linear
from pixelfly_lab.speed.layer_speed import RELEASED, time_layer_call
from pixelfly_lab.speed.machine import machine_header

MODES = ("forward", "forward_backward", "forward_then_read")


def _time(layer, x, gy, mode: str, autocast) -> float:
    if mode != "forward_then_read":
        return time_layer_call(layer, x, gy, backward=mode == "forward_backward", autocast=autocast)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        tick = time.perf_counter()
        layer(x).sum()
        return time.perf_counter() - tick


def compare(rows: int, rounds: int) -> list[dict]:
    """Medians (ms) of every mode with the shipped threshold ('on') and with streaming off."""
    shipped, results = native_linear.STREAM_BYTES, []
    other = torch.randn(32 * 2 ** 20 // 4)
    try:
        for autocast in (None, torch.bfloat16):
            for name, kwargs in (("released", RELEASED), ("budget 0.1", {"budget": 0.1, "block_size": 32})):
                torch.manual_seed(0)
                layer = PixelflyLinear(1024, 4096, **kwargs)
                x = torch.randn(rows, 1024, requires_grad=True)
                gy = torch.randn(rows, 4096, dtype=autocast or torch.float32)
                times = {(s, m): [] for s in ("on", "off") for m in MODES}
                for r in range(rounds + 1):                  # round 0 warms up
                    for setting in (("on", "off") if r % 2 else ("off", "on")):
                        native_linear.STREAM_BYTES = shipped if setting == "on" else 2 ** 62
                        for mode in MODES:
                            other.mul_(1.0)                   # other work between calls
                            ms = 1e3 * _time(layer, x, gy, mode, autocast)
                            if r:
                                times[(setting, mode)].append(ms)
                row = {"dtype": "bfloat16 (autocast)" if autocast else "float32", "layer": name, "rows": rows}
                for mode in MODES:
                    on, off = (statistics.median(times[(s, mode)]) for s in ("on", "off"))
                    row.update({f"{mode}_on": on, f"{mode}_off": off, f"{mode}_off/on": off / on})
                results.append(row)
    finally:
        native_linear.STREAM_BYTES = shipped
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="rows of x (4096 x 4096 outputs: 64 MB float32)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rounds < 1:
        raise ValueError(f"--rows and --rounds must be >= 1, got {args.rows} and {args.rounds}")
    print(machine_header(), f"threads {torch.get_num_threads()}; STREAM_BYTES {native_linear.STREAM_BYTES}")
    for row in compare(args.rows, args.rounds):
        print(f"{row['dtype']:20s} {row['layer']:11s} rows {row['rows']}: " + "  ".join(
            f"{m} {row[f'{m}_on']:.1f} (off {row[f'{m}_off']:.1f}, {row[f'{m}_off/on']:.2f}x)" for m in MODES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
