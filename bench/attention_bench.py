"""Block-sparse attention against dense SDPA on one CPU thread: forward and forward+backward ratios.

The issue-13 setting by default: T=4096, 8 heads of 64, flat butterfly layout of blocks of 64
with 3 factors (fan-in 4 blocks, density 1/16; FLOP limit 16x). Interleaved rounds in one
process, medians and their ratios (see pixelfly_lab.speed.attention).
Run: OMP_NUM_THREADS=1 python bench/attention_bench.py [--T 1024 2048 4096] [--causal] [--memory]
"""

import argparse

import pandas as pd

from pixelfly_lab.speed.attention import attention_speed_table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--n-factors", type=int, default=3)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory", action="store_true", help="peak memory of each method, in child processes")
    args = parser.parse_args()
    table = attention_speed_table(args.T, heads=args.heads, head_dim=args.head_dim, block_size=args.block,
                                  n_factors=args.n_factors, causal=args.causal, repeats=args.rounds,
                                  memory=args.memory)
    columns = ["T", "density", "dense_forward_ms", "sparse_forward_ms", "speedup_forward",
               "dense_forward_backward_ms", "sparse_forward_backward_ms", "speedup_forward_backward"]
    columns += ["dense_peak_mb", "sparse_peak_mb"] if args.memory else []
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(table[columns].to_string(index=False))


if __name__ == "__main__":
    main()
