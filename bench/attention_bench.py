"""PixelflyAttention (its defaults) against the same layer with dense SDPA, and the bare kernel, on one CPU thread.

Forward+backward at each length, causal and not: interleaved rounds in one process, medians and
their ratios, the FLOP limit of each row (projections included for the layer; causal pairs
counted as such), the sparse side's useful GFLOP/s beside the machine's dense GEMM rate, peak
memory in child processes (see pixelfly_lab.speed.attention). The CPU model, its flags, the dense
GEMM rate and the load average are printed above the table: on a loaded machine the ratios are
noisy, rerun when it is quiet.
Run: OMP_NUM_THREADS=1 python bench/attention_bench.py [--lengths 1024 2048 4096 8192] [--kernel-lengths 16384]
     [--causal both] [--block 32] [--layout connected|pixelfly] [--budget 0.0625] [--no-memory]
"""

import argparse

import pandas as pd

from pixelfly_lab.speed.attention import attention_speed_table
from pixelfly_lab.speed.bench import machine_header


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", "--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="sequence lengths timed for the layer and the kernel")
    parser.add_argument("--kernel-lengths", type=int, nargs="*", default=[16384],
                        help="further lengths timed for the kernel row only (none: --kernel-lengths)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--layout", default=None,
                        help="PixelflyAttention layout name (default: the layer's, 'connected'; 'pixelfly': the "
                             "paper's, which reaches density 1/16 at block 64 where the connected floor is 7/64)")
    parser.add_argument("--budget", type=float, default=None, help="PixelflyAttention budget (default: the layer's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    args = parser.parse_args()
    causal = {"no": False, "yes": True, "both": (False, True)}[args.causal]
    options = {name: value for name, value in (("layout", args.layout), ("budget", args.budget)) if value is not None}
    print(machine_header())
    table = attention_speed_table(args.lengths, dim=args.dim, heads=args.heads, batch=args.batch, causal=causal,
                                  block_size=args.block, options=options or None, repeats=args.rounds,
                                  memory=not args.no_memory,
                                  kernel_lengths=args.kernel_lengths, progress=True)
    rate = table["dense_gemm_gflops"].iloc[0]
    print(f"# dense GEMM rate: {rate:.0f} GFLOP/s (one ({args.batch * min(4096, table['T'].max())}, {args.dim}) @ "
          f"({args.dim}, {args.dim}) fp32 matmul, same threads)")
    columns = ["T", "causal", "row", "density", "flop_limit", "dense_ms", "sparse_ms", "speedup",
               "fraction_of_limit", "sparse_gflops", "load_avg"]
    columns += [] if args.no_memory else ["dense_peak_mb", "sparse_peak_mb", "memory_ratio"]
    with pd.option_context("display.width", 250, "display.float_format", "{:.3f}".format):
        print(table[columns].to_string(index=False))
    print(machine_header())


if __name__ == "__main__":
    main()
