"""Pixelfly layer against nn.Linear on one GPU, bfloat16, forward+backward; run it through bench/gpu.sh.

One shot under one deadline (--deadline seconds from the interpreter's start, imports included):

1. precompile, in parallel worker processes, every Triton kernel the run will use (each config
   the autotuner keeps, for the GPU's compute capability; pixelfly_lab.ops.triton_check's stand-in
   driver, so no worker touches the GPU) into Triton's on-disk cache;
2. goal rows first: bfloat16, blocks 64 and 128, budget 0.25, the MLP shapes of GPT-2 small
   (768->3072, 3072->768) and medium (1024->4096) at 8192 tokens and of Mixer-B/16
   (768->3072) at 12544 tokens: a PixelflyLinear (as dispatched: the Triton custom op) against
   nn.Linear (cuBLAS);
3. correctness checks of every Triton kernel path (dtypes x blocks) against float64;
4. further rows (budgets 0.1 and 0.5) while time remains.

Timing: forward+backward (gradients of the input and every parameter), after >= 200 ms of
warm-up (which also autotunes), median of CUDA-graph replays and, separately, of eager calls,
dense and Pixelfly interleaved. Columns: speedup = dense time / Pixelfly time (graphs; eager in
speedup_eager), inv_density = 1/density (density = the layer's fraction of dense parameters =
of its FLOPs), roofline = t_roof(dense) / t_roof(pixelfly) with t_roof = max(FLOPs / peak,
bytes / bandwidth) of forward+backward (peak and bandwidth of --gpu, default H200: 989 TFLOP/s
dense bf16, 4.8 TB/s), of_limit = speedup / min(inv_density, roofline) (goal >= 0.8), err_y and
err_grad = relative Frobenius error of the output and of the gradients against float32.

Output: a summary under 8 KB on stdout; the CSV (gpu_bench.csv) and the full log (gpu_bench.log)
in --out. Exit status 0 when every check that ran passed (rows the deadline trimmed are listed),
1 when one failed, 2 when no CUDA GPU is visible (gpu.sh then tries another python).

--smoke runs everything on the CPU under the Triton interpreter at toy sizes in float32 (no
graphs, no precompile): it checks this script end to end; its timings mean nothing.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from gpu_common import Report, cuda_torch  # noqa: E402  (bench/ is the script's directory)

GOAL_SHAPES = (("GPT-2 small fc", 768, 3072, 8192), ("GPT-2 small proj", 3072, 768, 8192),
               ("GPT-2 medium fc", 1024, 4096, 8192), ("Mixer-B/16 fc", 768, 3072, 12544))
SMOKE_SHAPES = (("toy fc", 64, 128, 37), ("toy proj", 128, 64, 37))
GPUS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}  # bf16 dense, bytes/s
# relative errors against float32 a row may have (bfloat16 keeps 8 bits: ~4e-3 per rounding)
ERR_TOL = {"bfloat16": 2e-2, "float16": 3e-3, "float32": 1e-4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    p.add_argument("--deadline", type=float, default=240.0,
                   help="seconds from start after which nothing new starts (default 240)")
    p.add_argument("--out", default=os.environ.get("OUT") or "results", help="directory of the CSV and log")
    p.add_argument("--gpu", default="H200", choices=sorted(GPUS), help="peak and bandwidth of the roofline")
    p.add_argument("--workers", type=int, default=None, help="precompile processes (default: cores / 2, <= 8)")
    return p.parse_args(argv)


def left(args) -> float:
    return args.deadline - (time.perf_counter() - START)


# ----------------------------------------------------------------------------- roofline

def roofline(d_in: int, d_out: int, tokens: int, params: int, rank: int, peak: float, bandwidth: float,
             size: int = 2) -> float:
    """Lower bound of forward+backward seconds: max(FLOPs / peak, bytes / bandwidth).

    FLOPs: 3 products (y, dx, dW) of 2 * tokens * params each. Bytes: x, y read or written in the
    forward, dy read and dx written by the input gradient, dy and x read by the weight gradient:
    3 * tokens * (in + out); the weights read twice and their gradient written: 3 * params; the
    low-rank intermediates (x V, dy U) written and read: 4 * tokens * rank.
    """
    flops = 3 * 2 * tokens * params
    moved = size * (3 * tokens * (d_in + d_out) + 3 * params + 4 * tokens * rank)
    return max(flops / peak, moved / bandwidth)


# ----------------------------------------------------------------------------- timing

def timer(device: str, reps: int, warmup_s: float):
    """measure(fns) -> median ms of each fn; fns interleaved, each warmed up >= warmup_s first."""
    import torch

    def measure(fns):
        for fn in fns:
            t0 = time.perf_counter()
            while True:
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                if time.perf_counter() - t0 >= warmup_s:
                    break
        times = [[] for _ in fns]
        for _ in range(reps):
            for i, fn in enumerate(fns):
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[i].append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[i].append(1e3 * (time.perf_counter() - t0))
        return [statistics.median(t) for t in times]
    return measure


def graphed(fn):
    """fn captured in a CUDA graph (after 3 calls on a side stream); returns the replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rel_err(a, ref) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- precompile

def kernel_jobs(rows, checks, dtype_name: str):
    """The launches (as warmup specs) the rows and checks will make, in the order they are needed,
    one job per kernel (forward, input gradient, weight gradient) so that workers share the load.
    Rows that differ only in their token count (a multiple of 16 in every row: the same
    specialisation) compile the same kernels: one job covers them."""
    jobs, seen = [], set()
    for d_in, d_out, tokens, block, budget in rows:
        if (d_in, d_out, block, budget) in seen:
            continue
        seen.add((d_in, d_out, block, budget))
        jobs += [dict(kind="layer", part=part, d_in=d_in, d_out=d_out, tokens=tokens, block=block, budget=budget,
                      dtype=dtype_name, autotune=True) for part in ("forward", "input grad", "weight grad")]
    for dtype_name_c, block in checks:
        jobs += [dict(kind="check", part=part, dtype=dtype_name_c, block=block, autotune=False)
                 for part in ("forward", "input grad", "weight grad")]
    return jobs


CHECK_SHAPE = dict(R=4, C=6, M=777, rank=24)   # rows not a multiple of any tile; rank < 64


def check_layout(block_rows: int, block_cols: int):
    import torch

    g = torch.Generator().manual_seed(0)
    layout = torch.rand(block_rows, block_cols, generator=g) < 0.5
    layout[block_rows - 1] = False   # an empty block row: its output is bias + low rank only
    layout[0, 0] = True
    return layout.repeat_interleave(2, 0).repeat_interleave(2, 1)   # rows repeat: GROUP 2 programs


def warm_job(job: dict, arch: int) -> float:
    """Compile one job's kernels for sm_arch into Triton's cache (a worker process); seconds."""
    import torch
    from pixelfly_lab.ops import triton_kernels as tk
    from pixelfly_lab.structure.masks import flat_block_butterfly_layout
    from pixelfly_lab.structure.patterns import plan_pixelfly
    from pixelfly_lab.ops.triton_check import target

    t0 = time.perf_counter()
    dtype = getattr(torch, job["dtype"])
    block = job["block"]

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, device="meta", dtype=dt)
    if job["kind"] == "layer":
        plan = plan_pixelfly(job["d_out"], job["d_in"], job["budget"], block)
        layout = flat_block_butterfly_layout(job["d_out"], job["d_in"], plan.butterfly_size, plan.n_factors, block)
        rank, (M, d_in, d_out) = plan.rank, (job["tokens"], job["d_in"], job["d_out"])
    else:
        layout = check_layout(CHECK_SHAPE["R"], CHECK_SHAPE["C"])
        rank, M = CHECK_SHAPE["rank"], CHECK_SHAPE["M"]
        d_out, d_in = layout.shape[0] * block, layout.shape[1] * block
    tables = tk.layout_tables(layout, "meta")
    values = empty(tables.nnz, block, block)
    x, gy = empty(M, d_in), empty(M, d_out)
    lr_fwd = (empty(M, rank), empty(d_out, rank)) if rank else None
    lr_bwd = (empty(M, rank), empty(d_in, rank)) if rank else None
    with target(arch):
        if job["part"] == "forward":
            tk.dsd_matmul(x, values, tables, bias=empty(d_out), lowrank=lr_fwd, warmup=True, autotune=job["autotune"])
        elif job["part"] == "input grad":
            tk.dsd_matmul(gy, values, tables, transpose=True, lowrank=lr_bwd, warmup=True, autotune=job["autotune"])
        else:
            for split in (1, 2):   # one chunk writes the blocks; several reduce float32 partial sums
                tk.sdd_matmul(gy, x, tables, block, split=split, warmup=True, autotune=job["autotune"])
    return time.perf_counter() - t0


def precompile(jobs, arch: int, workers: int, report, timeout: float) -> None:
    """Run warm_job over ``jobs`` in ``workers`` processes for at most ``timeout`` seconds; what is
    left then is compiled on first use."""
    from concurrent.futures import ProcessPoolExecutor, wait
    import multiprocessing

    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(warm_job, job, arch) for job in jobs]
    done, pending = wait(futures, timeout=timeout)
    for f in pending:
        f.cancel()
    failed = [f.exception() for f in done if f.exception() is not None]
    pool.shutdown(wait=False, cancel_futures=True)
    report.say(f"precompile: {len(done) - len(failed)}/{len(jobs)} jobs in {time.perf_counter() - t0:.0f} s "
               f"({workers} processes)" + (f"; first failure: {failed[0]!r}"[:200] if failed else "")
               + (f"; {len(pending)} not finished (compiled on first use)" if pending else ""))


# ----------------------------------------------------------------------------- rows

def measure_row(label, d_in, d_out, tokens, block, budget, device, dtype, measure, use_graphs, peak_bw):
    """One row: PixelflyLinear (as dispatched) against nn.Linear, forward+backward."""
    import torch
    from pixelfly_lab.ops.matmul import resolve_backend
    from pixelfly_lab.nn.layers import PixelflyLinear

    torch.manual_seed(0)
    # what a user gets ('auto': the Triton custom op for bf16 on sm_80+); the smoke run asks for
    # 'triton' itself, since on the CPU 'auto' never picks it
    layer = PixelflyLinear(d_in, d_out, budget=budget, block_size=block, device=device, dtype=dtype,
                           backend="auto" if device == "cuda" else "triton")
    dense = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, d_out, device=device, dtype=dtype)
    p_inputs, d_inputs = [x, *layer.parameters()], [x, *dense.parameters()]

    def run_pixelfly():
        return torch.autograd.grad(layer(x), p_inputs, dy)

    def run_dense():
        return torch.autograd.grad(dense(x), d_inputs, dy)
    # errors against float32 with the same weights: output and every gradient
    y = layer(x)
    grads = torch.autograd.grad(y, p_inputs, dy)
    ref_inputs = [t.detach().float().requires_grad_() for t in p_inputs]
    ref_layer = PixelflyLinear(d_in, d_out, budget=budget, block_size=block, device=device, dtype=torch.float32,
                               backend="reference")
    with torch.no_grad():
        for dst, src in zip(ref_layer.parameters(), layer.parameters()):
            dst.copy_(src.float())
    ref_params = list(ref_layer.parameters())
    y_ref = ref_layer(ref_inputs[0])
    ref_grads = torch.autograd.grad(y_ref, [ref_inputs[0], *ref_params], dy.float())
    err_y = rel_err(y, y_ref)
    err_grad = max(rel_err(a, b) for a, b in zip(grads, ref_grads))
    fns = [run_dense, run_pixelfly]
    eager = measure(fns)
    graph = measure([graphed(fn) for fn in fns]) if use_graphs else [math.nan, math.nan]
    density = layer.budget
    rank = layer.rank
    peak, bandwidth = peak_bw
    size = torch.finfo(dtype).bits // 8
    t_dense = roofline(d_in, d_out, tokens, d_in * d_out, 0, peak, bandwidth, size)
    t_pf = roofline(d_in, d_out, tokens, layer.weight_params, rank, peak, bandwidth, size)
    speedup = (graph[0] / graph[1]) if use_graphs else (eager[0] / eager[1])
    limit = min(1 / density, t_dense / t_pf)
    return dict(shape=label, d_in=d_in, d_out=d_out, tokens=tokens, block=block, budget=budget, rank=rank,
                density=density, backend=resolve_backend(x, layer.backend, block, d_out),
                dense_ms=graph[0], pixelfly_ms=graph[1], dense_eager_ms=eager[0], pixelfly_eager_ms=eager[1],
                speedup=speedup, speedup_eager=eager[0] / eager[1], inv_density=1 / density,
                roofline=t_dense / t_pf, of_limit=speedup / limit, err_y=err_y, err_grad=err_grad)


def format_row(r) -> str:
    def f(key, spec):
        value = r.get(key, math.nan)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
    return (f"{r['shape']:17s} {r['tokens']:5d} b{r['block']:<3d} budget {r['budget']:.2f} r{r['rank']:<3d} "
            f"{r['backend']:7s} dense {f('dense_ms', '7.3f')} pf {f('pixelfly_ms', '7.3f')} ms "
            f"x{f('speedup', '5.2f')} (eager x{f('speedup_eager', '5.2f')}) 1/dens {f('inv_density', '5.2f')} "
            f"roof {f('roofline', '5.2f')} of_limit {f('of_limit', '4.2f')} err {f('err_y', '.1e')}/{f('err_grad', '.1e')}")


# ----------------------------------------------------------------------------- checks

def run_checks(device, dtypes, blocks, report, args):
    """Every Triton kernel path through the custom op, fixed configs, against float64."""
    import torch
    from pixelfly_lab.ops import triton_kernels as tk
    from pixelfly_lab.ops.matmul import blocks_to_dense, sparse_lowrank_matmul

    tol = {torch.float64: 1e-12, torch.float32: 5e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}
    failures, ran, skipped = [], 0, []
    tk.AUTOTUNE = False
    for dtype in dtypes:
        for block in blocks:
            if left(args) < 15:
                skipped.append(f"{str(dtype)[6:]}/b{block}")
                continue
            layout = check_layout(CHECK_SHAPE["R"], CHECK_SHAPE["C"])
            g = torch.Generator().manual_seed(1)
            R, C, M, r = layout.shape[0], layout.shape[1], CHECK_SHAPE["M"], CHECK_SHAPE["rank"]

            def rand(*shape, scale=1.0):
                return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)
            ops64 = dict(x=rand(M, C * block), values=rand(int(layout.sum()), block, block, scale=block ** -0.5),
                         bias=rand(R * block), u=rand(R * block, r, scale=r ** -0.5), v=rand(C * block, r))
            dy = rand(M, R * block)
            leaves = {k: t.to(dtype).requires_grad_() for k, t in ops64.items()}
            try:
                y = sparse_lowrank_matmul(leaves["x"], leaves["values"], layout.to(device), leaves["u"], leaves["v"],
                                          leaves["bias"], backend="triton")
                grads = torch.autograd.grad(y, list(leaves.values()), dy.to(dtype))
                ref = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
                y_ref = (ref["x"] @ blocks_to_dense(ref["values"], layout.to(device)).T + ref["bias"]
                         + (ref["x"] @ ref["v"]) @ ref["u"].T)
                ref_grads = torch.autograd.grad(y_ref, list(ref.values()), dy)
                errs = [rel_err(y, y_ref)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
                worst = max(errs)
            except Exception as err:   # a kernel that does not compile or run: a failed check, go on
                worst, errs = math.inf, [f"{type(err).__name__}: {err}"[:200]]
            ran += 1
            ok = worst < tol[dtype]
            report.log(f"  check {str(dtype)[6:]:8s} b{block:<3d}: worst rel err {worst:.1e} "
                       f"({'ok' if ok else 'FAILED'}) {errs if not ok else ''}")
            if not ok:
                failures.append(f"{str(dtype)[6:]}/b{block}: {worst:.1e}")
    tk.AUTOTUNE = None
    report.say(f"checks: {ran - len(failures)}/{ran} passed" + (f"; FAILED {failures}" if failures else "")
               + (f"; trimmed by the deadline: {skipped}" if skipped else ""))
    return failures


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is first imported
    torch = cuda_torch("gpu_bench", args.smoke)
    if torch is None:
        return 2
    import pandas as pd
    import triton

    out = Path(args.out)
    report = Report(out, "gpu_bench")
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    peak_bw = GPUS[args.gpu]
    env = [f"torch {torch.__version__}", f"triton {triton.__version__}"]
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env += [torch.cuda.get_device_name(), f"sm_{major}{minor}", f"CUDA {torch.version.cuda}"]
    else:
        env.append("CPU smoke run (TRITON_INTERPRET=1): timings mean nothing")
    report.say("gpu_bench: " + ", ".join(env) + f"; deadline {args.deadline:.0f} s, imports took "
               f"{time.perf_counter() - START:.0f} s")
    shapes = SMOKE_SHAPES if args.smoke else GOAL_SHAPES
    blocks = (16,) if args.smoke else (64, 128)
    goal = [(label, d_in, d_out, tokens, block, 0.25) for label, d_in, d_out, tokens in shapes for block in blocks]
    extra = [(label, d_in, d_out, tokens, block, budget) for budget in ((0.5,) if args.smoke else (0.1, 0.5))
             for label, d_in, d_out, tokens in shapes[:1 if args.smoke else None] for block in blocks]
    check_dtypes = (torch.float64,) if args.smoke else (torch.bfloat16, torch.float16, torch.float32)
    check_blocks = (16,) if args.smoke else (16, 32, 64, 128)
    if device == "cuda":
        jobs = kernel_jobs([r[1:] for r in goal + extra], [(str(d)[6:], b) for d in check_dtypes for b in check_blocks],
                           str(dtype)[6:])
        workers = args.workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        try:
            precompile(jobs, 10 * major + minor, workers, report, timeout=max(5.0, min(90.0, left(args) - 120)))
        except Exception as err:   # compiling on first use instead costs time, not results
            report.say(f"precompile failed ({type(err).__name__}: {err}"[:200] + "); compiling on first use")
    measure = timer(device, reps=2 if args.smoke else 25, warmup_s=0.0 if args.smoke else 0.2)
    rows, trimmed, failures = [], [], []
    csv = out / "gpu_bench.csv"

    def run_rows(todo, title):
        report.say(title)
        for label, d_in, d_out, tokens, block, budget in todo:
            if left(args) < (5 if args.smoke else 25):
                trimmed.append(f"{label} b{block} budget {budget}")
                continue
            try:
                row = measure_row(label, d_in, d_out, tokens, block, budget, device, dtype, measure,
                                  use_graphs=device == "cuda", peak_bw=peak_bw)
            except ValueError as err:  # the planner: no Pixelfly layout this sparse at this block size
                if "too small" not in str(err):
                    raise
                report.say(f"{label} b{block} budget {budget}: skipped ({err})"[:200])
                continue
            except Exception as err:   # one failing row must not lose the table
                report.say(f"{label} b{block} budget {budget}: FAILED {type(err).__name__}: {err}"[:300])
                failures.append(f"{label} b{block} budget {budget}: {type(err).__name__}")
                continue
            tol = ERR_TOL[str(dtype)[6:]]
            if not (row["err_y"] < tol and row["err_grad"] < tol):
                failures.append(f"{label} b{block} budget {budget}: error {row['err_y']:.1e}/{row['err_grad']:.1e}")
            rows.append(row)
            report.say(format_row(row))
            pd.DataFrame(rows).to_csv(csv, index=False)

    try:
        run_rows(goal, f"goal rows ({str(dtype)[6:]}, forward+backward, ms: median of CUDA graph replays):")
        failures += run_checks(device, check_dtypes, check_blocks, report, args)
        run_rows(extra, "further rows:")
    except KeyboardInterrupt:   # gpu.sh's timeout: keep what was measured
        report.say("interrupted by the deadline: rows so far kept")
    pd.DataFrame(rows).to_csv(csv, index=False)
    goal_rows = [r for r in rows if r["budget"] == 0.25 and r["block"] >= 64]
    if goal_rows:
        met = sum(r["of_limit"] >= 0.8 for r in goal_rows)
        report.say(f"goal: forward+backward speed-up >= 0.8 x min(1/density, roofline) at block >= 64: "
                   f"{met}/{len(goal_rows)} rows" + (" (smoke: meaningless)" if args.smoke else ""))
    if trimmed:
        report.say(f"trimmed by the deadline: {len(trimmed)} rows: {'; '.join(trimmed)}"[:600])
    report.say(f"{'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'}"[:800])
    report.say(f"csv {csv}, log {out / 'gpu_bench.log'}, total {time.perf_counter() - START:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
