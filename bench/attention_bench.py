"""Block-sparse attention against dense SDPA on one CPU thread: forward+backward and forward ratios.

The issue-13 setting: T=4096, 8 heads of 64, flat butterfly layout of 64 x 64 blocks of 64 with
3 factors (fan-in 4 blocks, density 1/16; FLOP limit 16x). Runs interleaved (dense, sparse,
dense, ...) in one process and prints medians and their ratio, so that load from other
processes hits both alike. Run: OMP_NUM_THREADS=1 python bench/attention_bench.py [--T 4096]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pixelfly_lab.block_attention import block_sparse_attention
from pixelfly_lab.masks import flat_butterfly_mask


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--n-factors", type=int, default=3)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layout = flat_butterfly_mask(args.T // args.block, args.n_factors)
    shape = (1, args.heads, args.T, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)

    def dense_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    def sparse_fwd():
        with torch.no_grad():
            block_sparse_attention(q, k, v, layout, args.block, causal=args.causal)

    def dense_fb():
        F.scaled_dot_product_attention(q, k, v, is_causal=args.causal).backward(grad)

    def sparse_fb():
        block_sparse_attention(q, k, v, layout, args.block, causal=args.causal).backward(grad)

    for fn in (dense_fwd, sparse_fwd, dense_fb, sparse_fb):   # warm-up (plans, allocator)
        fn()
    results = {name: [] for name in ("dense_fwd", "sparse_fwd", "dense_fb", "sparse_fb")}
    for _ in range(args.rounds):
        for name, fn in (("dense_fwd", dense_fwd), ("sparse_fwd", sparse_fwd),
                         ("dense_fb", dense_fb), ("sparse_fb", sparse_fb)):
            results[name] += _time(fn, 1)
    med = {name: statistics.median(t) for name, t in results.items()}
    density = layout.float().mean().item()
    print(f"T={args.T} heads={args.heads} head_dim={args.head_dim} block={args.block} "
          f"density={density:.4f} causal={args.causal} threads={torch.get_num_threads()}")
    print(f"forward:          dense {med['dense_fwd'] * 1e3:8.1f} ms  sparse {med['sparse_fwd'] * 1e3:8.1f} ms  "
          f"ratio {med['dense_fwd'] / med['sparse_fwd']:.2f}x")
    print(f"forward+backward: dense {med['dense_fb'] * 1e3:8.1f} ms  sparse {med['sparse_fb'] * 1e3:8.1f} ms  "
          f"ratio {med['dense_fb'] / med['sparse_fb']:.2f}x")


if __name__ == "__main__":
    main()
