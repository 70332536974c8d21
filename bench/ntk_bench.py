"""Benchmark: empirical NTK time and peak memory against the plain torch.func recipe.

The recipe is the one in PyTorch's tutorial: J = vmap(jacrev(f)) over all examples, then one
einsum per parameter tensor (J computed once when x2 is x1, to be fair to it). Against it:
``empirical_ntk`` with method 'jacobian' (the same maths, chunked under a memory budget) and
'structured' (no weight Jacobians; what 'auto' picks for these models).

Every measurement runs in its own subprocess, so the peak resident memory (ru_maxrss, minus
what the process held before the kernel was computed) belongs to that method alone. A memory
cap (RLIMIT_AS) keeps a recipe that cannot fit from taking the machine down: it fails with an
allocation error, reported as OOM.

Data: scikit-learn's digits (1797 images of 8x8); the 2000-example runs add 203 of them shifted
by one pixel. Model: pixelfly_lab.training.models.MLP(64 -> 1024 -> 1024 -> 10), 1.14M parameters
(and a 256-wide one, 85k parameters, where the recipe fits at larger N).

Usage:
    .venv/bin/python bench/ntk_bench.py            # full table (~10 min on a 2-core CPU)
    .venv/bin/python bench/ntk_bench.py --gpt2     # a Hugging Face GPT-2's 8x8 kernel (transformers needed)
    .venv/bin/python bench/ntk_bench.py --quick    # a smaller table (~2 min)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30


def _data(n: int):
    import torch

    from pixelfly_lab.training.data import load_digits

    digits = load_digits()
    x = torch.cat([digits.x_train, digits.x_test])                     # (1797, 1, 8, 8)
    if n > len(x):
        x = torch.cat([x, torch.roll(x[: n - len(x)], shifts=1, dims=-1)])
    return x[:n]


def _recipe(model, x):
    """The plain torch.func NTK: per-example Jacobians of every parameter, then einsum."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    f = lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)
    jac = vmap(jacrev(f), (None, 0))(params, x)
    return sum(torch.einsum("Naf,Maf->NM", j.flatten(2), j.flatten(2)) for j in jac.values())


def worker(spec: dict) -> dict:
    """Run one measurement in this (fresh) process and return its record."""
    import torch

    from pixelfly_lab.training.models import MLP
    from pixelfly_lab.ntk.empirical import empirical_ntk

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = MLP(64, spec["width"], 2, 10).eval()
    x = _data(spec["n"])
    run = (lambda: _recipe(model, x)) if spec["method"] == "recipe" else (
        lambda: empirical_ntk(model, x, method=spec["method"], progress=False))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, kernel = [], None
    try:
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            kernel = run()
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as err:   # allocation beyond the cap
        return {**spec, "status": "OOM", "error": str(err).splitlines()[0][:120]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**spec, "status": "ok", "seconds": min(times), "peak_mib": (peak - before) / 1024,
            "params": sum(p.numel() for p in model.parameters()),
            "trace_sum": float(kernel.double().trace())}


def measure(spec: dict, mem_cap_gib: float) -> dict:
    """Run ``worker(spec)`` in a subprocess under an address-space cap."""
    cap = int((mem_cap_gib + 1.5) * GIB)   # + what torch maps before any tensor is made

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, preexec_fn=limit)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "status": "OOM" if "memory" in tail.lower() or "alloc" in tail.lower() else "failed",
                "error": tail[:120]}
    return json.loads(lines[-1])


def gpt2_times(threads: int, contexts=(8, 16)) -> None:
    """8x8 NTK of a Hugging Face GPT-2 (4 layers, width 256, 4 heads, 65 tokens; built from a config,
    nothing downloaded): all-position logits (the default, T x 65 outputs) and the last position's."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    from pixelfly_lab.ntk.empirical import empirical_ntk

    logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=65, n_positions=64)).eval()
    for context in contexts:
        x = torch.randint(0, 65, (8, context))
        cases = (("last position", lambda out: out.logits[:, -1]),) + ((("all positions", None),) if context <= 8 else ())
        for label, output_fn in cases:
            tick = time.perf_counter()
            empirical_ntk(model, x, output_fn=output_fn)
            print(f"GPT-2 8x8 NTK, T={context}, {label}: {time.perf_counter() - tick:.1f} s "
                  f"({threads} threads, load {os.getloadavg()[0]:.1f})", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~2 min)")
    parser.add_argument("--gpt2", action="store_true", help="only the Hugging Face GPT-2 8x8 kernel times")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per measurement")
    parser.add_argument("--mem-cap", type=float, default=8.0, help="GiB a measurement may allocate")
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.gpt2:
        gpt2_times(args.threads)
        return 0

    import pandas as pd
    from tqdm.auto import tqdm

    # (width, N, methods): where the recipe fits, then where it cannot
    grid = [(256, 200, ("recipe", "jacobian", "structured")),
            (1024, 32, ("recipe", "jacobian", "structured"))]
    if args.quick:
        grid += [(1024, 500, ("structured",)), (1024, 2000, ("recipe",))]
    else:
        grid += [(256, 800, ("recipe", "jacobian", "structured")),
                 (1024, 64, ("recipe", "jacobian", "structured")),
                 (1024, 2000, ("recipe", "structured"))]
    specs = [dict(width=w, n=n, method=m, threads=args.threads, repeats=1 if n >= 1000 else 2)
             for w, n, methods in grid for m in methods]
    rows = [measure(spec, args.mem_cap) for spec in tqdm(specs, desc="ntk bench", unit="run")]
    table = pd.DataFrame(rows)
    table["params"] = table.groupby("width")["params"].transform("max").astype("Int64")   # OOM rows too
    cols = [c for c in ("width", "params", "n", "method", "status", "seconds", "peak_mib", "trace_sum")
            if c in table]
    with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
        print(table[cols].to_string(index=False))
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
