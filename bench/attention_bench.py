"""PixelflyAttention (its defaults) against the same layer with dense SDPA, and the bare kernel, on one CPU thread.

Forward+backward at each length, causal and not: interleaved rounds in one process, medians and
their ratios, the FLOP limit of each row (projections included for the layer; causal pairs
counted as such), the sparse side's useful GFLOP/s beside the machine's dense GEMM rate, peak
memory in child processes (see pixelfly_lab.speed.attention). The CPU model, its flags, the dense
GEMM rate and the load average are printed above the table: on a loaded machine the ratios are
noisy, rerun when it is quiet.
Run: OMP_NUM_THREADS=1 python bench/attention_bench.py [--lengths 1024 2048 4096 8192] [--kernel-lengths 16384]
     [--causal both] [--block 32] [--layout connected|pixelfly] [--budget 0.0625] [--no-memory]
     [--chunks-only]   (the CPU kernel's compiled path and its two chunk paths, fused and bmm, interleaved against
                        SDPA; no table)
"""

import argparse
import math
import os
import statistics
import time

import pandas as pd
import torch
import torch.nn.functional as F

from pixelfly_lab.nn.attention import PixelflyAttention
from pixelfly_lab.ops.attention import attention_plan, block_sparse_attention
from pixelfly_lab.ops.native_attention import native_applies, native_attention_backward, native_attention_forward
from pixelfly_lab.ops.torch_attention import torch_attention_backward, torch_attention_forward

from pixelfly_lab.speed.attention import attention_speed_table
from pixelfly_lab.speed.bench import machine_header


def chunk_paths(lengths, *, dim, heads, block, causal_flags, rounds) -> pd.DataFrame:
    """Median ms of forward+backward of the compiled kernel (where it is built), the CPU kernel's fused chunks,
    its bmm chunks (the forward and backward functions called directly on the kernel's own plan), the op as
    block_sparse_attention runs it, and SDPA, interleaved in this process."""
    rows = []
    for T in lengths:
        for causal in causal_flags:
            layer = PixelflyAttention(dim, heads, T, block_size=block, causal=causal)
            plan = attention_plan(layer.layout_key(T), causal, "cpu")       # the one block_sparse_attention uses
            q, k, v, grad = torch.randn(4, 1, heads, T, dim // heads).unbind(0)
            scale = 1 / math.sqrt(dim // heads)

            def chunks(flash):
                out, lse = torch_attention_forward(q, k, v, plan, block, scale, flash=flash)
                torch_attention_backward(grad, q, k, v, out, lse, plan, block, scale, flash=flash)

            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            def compiled():
                out, lse = native_attention_forward(q, k, v, plan, block, scale)
                native_attention_backward(grad, q, k, v, out, lse, plan, block, scale)

            runs = {"native": compiled} if native_applies(q, v) else {}
            runs |= {"fused": lambda: chunks(True), "bmm": lambda: chunks(False),
                    "kernel": lambda: block_sparse_attention(qs, ks, vs, layer.layout_key(T), block,
                                                             causal=causal).backward(grad),
                    "sdpa": lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).backward(grad)}
            times = {name: [] for name in runs}
            for _ in range(rounds + 1):                      # the first round warms up, not counted
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
            rows.append(dict(T=T, causal=causal, **{f"{name}_ms": value for name, value in ms.items()},
                             **{f"{name}_speedup": ms["sdpa"] / ms[name] for name in runs if name != "sdpa"},
                             load_avg=os.getloadavg()[0]))
    return pd.DataFrame(rows)


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
    parser.add_argument("--chunks-only", action="store_true",
                        help="only the compiled kernel and the fused and bmm chunk paths against SDPA, at --lengths")
    args = parser.parse_args()
    causal = {"no": False, "yes": True, "both": (False, True)}[args.causal]
    if args.chunks_only:
        print(machine_header())
        table = chunk_paths(args.lengths, dim=args.dim, heads=args.heads, block=args.block,
                            causal_flags=causal if isinstance(causal, tuple) else (causal,), rounds=args.rounds)
        with pd.option_context("display.width", 250, "display.float_format", "{:.2f}".format):
            print(table.to_string(index=False))
        return
    options = {name: value for name, value in (("layout", args.layout), ("budget", args.budget)) if value is not None}
    print(machine_header())
    table = attention_speed_table(args.lengths, dim=args.dim, heads=args.heads, batch=args.batch, causal=causal,
                                  block_size=args.block, options=options or None, repeats=args.rounds,
                                  memory=not args.no_memory,
                                  kernel_lengths=args.kernel_lengths, progress=True)
    rate = table["dense_gemm_gflops"].iloc[0]
    print(f"# dense GEMM rate: {rate:.0f} GFLOP/s (one ({args.batch * min(4096, table['T'].max())}, {args.dim}) @ "
          f"({args.dim}, {args.dim}) fp32 matmul, same threads)")
    columns = ["T", "causal", "row", "route", "density", "flop_limit", "layout_flop_limit", "dense_ms", "sparse_ms",
               "speedup", "fraction_of_limit", "sparse_gflops", "load_avg"]
    columns += [] if args.no_memory else ["dense_peak_mb", "sparse_peak_mb", "memory_ratio"]
    with pd.option_context("display.width", 250, "display.float_format", "{:.3f}".format):
        print(table[columns].to_string(index=False))
    print(machine_header())


if __name__ == "__main__":
    main()
