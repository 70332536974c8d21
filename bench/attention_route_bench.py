"""The PixelflyAttention layer's two routes against its SDPA twin at short lengths, one CPU thread.

Forward+backward of the default layer (no random features) with ``route='kernel'`` (block-sparse
kernel) and ``route='masked_sdpa'`` (one SDPA call with the layout's boolean mask), and of the same
layer with dense SDPA (pixelfly_lab.speed.attention.SDPAAttention): interleaved rounds in one
process, medians and ratios, the load average printed (on a loaded machine rerun when it is quiet).
The crossovers pixelfly_lab.nn.attention.MASKED_SDPA_BELOW (compiled kernel) and
MASKED_SDPA_BELOW_PYTORCH (PyTorch chunks) were read from this table.
Run: OMP_NUM_THREADS=1 python bench/attention_route_bench.py [--lengths 256 512 1024 2048] [--rounds 7]
"""

import argparse
import os
import statistics
import time

import pandas as pd
import torch
from tqdm import tqdm

from pixelfly_lab.nn.attention import PixelflyAttention, masked_sdpa_below
from pixelfly_lab.speed.attention import SDPAAttention
from pixelfly_lab.speed.bench import machine_header


def route_table(lengths, *, dim=512, heads=8, batch=1, block=32, causal=(False, True), rounds=7) -> pd.DataFrame:
    """Median ms of forward+backward per (T, causal) for the kernel route, the masked-SDPA route and dense SDPA."""
    rows = []
    for T in tqdm(lengths, desc="lengths"):
        for c in causal:
            torch.manual_seed(0)
            layers = {route: PixelflyAttention(dim, heads, T, block_size=block, causal=c, route=route)
                      for route in ("kernel", "masked_sdpa")}
            layers["masked_sdpa"].load_state_dict(layers["kernel"].state_dict())
            layers["sdpa"] = SDPAAttention(layers["kernel"])
            x = torch.randn(batch, T, dim, requires_grad=True)
            grad = torch.randn(batch, T, dim)
            times = {name: [] for name in layers}
            for _ in range(rounds + 1):                       # the first round warms up, not counted
                for name, layer in layers.items():
                    start = time.perf_counter()
                    layer(x).backward(grad)
                    times[name].append(time.perf_counter() - start)
            ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
            rows.append(dict(T=T, causal=c, kernel_ms=ms["kernel"], masked_sdpa_ms=ms["masked_sdpa"],
                             sdpa_ms=ms["sdpa"], kernel_speedup=ms["sdpa"] / ms["kernel"],
                             masked_sdpa_speedup=ms["sdpa"] / ms["masked_sdpa"],
                             faster="masked_sdpa" if ms["masked_sdpa"] < ms["kernel"] else "kernel",
                             auto=layers["kernel"].__class__(dim, heads, T, block_size=block, causal=c).route_at(T),
                             load_avg=os.getloadavg()[0]))
    return pd.DataFrame(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(machine_header())
    print(f"# crossover in force (masked_sdpa_below) = {masked_sdpa_below()}; load average {os.getloadavg()}")
    table = route_table(args.lengths, rounds=args.rounds)
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
