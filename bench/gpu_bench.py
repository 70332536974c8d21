"""GPU check and speed table of the Triton block-sparse kernels (issue 4); run it through bench/gpu.sh.

Part 1, correctness (autotuning off, one compile per kernel variant): for every dtype and block
size, on layouts with and without repeated block rows and columns, every kernel (forward with fused bias and low-rank term, input gradient, weight gradient
with and without a split reduction) writes into a NaN-filled buffer and is compared with the
dense float64 reference (relative Frobenius error, bound per dtype); then the autograd entry
points (values and every gradient) and torch.autocast(bfloat16) with float32 parameters.

Part 2, speed (autotuned kernels, bfloat16): forward, backward and forward+backward time of
Pixelfly (the layer as dispatched by pixelfly_lab.layers, and the fused Triton kernel called
directly), its sparse part alone (Triton, and torch's BSR matmul), Monarch, and dense nn.Linear,
at the MLP shapes of GPT-2 small and medium and Mixer-B, budgets 0.1-0.5. Speed-up is dense time
over method time; the FLOP limit is 1/density (density = the method's fraction of the dense
parameters = of its FLOPs); "of limit" = speed-up x density. Goal (issue 4): forward+backward
speed-up >= 0.8/density for the fused kernel at block >= 64. Each row also reports the largest
relative error of its output (and, for Triton rows, gradients) against a float32 reference.

The run stops starting new rows after --deadline seconds, so it ends in under five minutes; rows
are printed as they finish and written to --out (CSV). Exit status 1 when a correctness check fails.

--smoke runs everything on the CPU under the Triton interpreter at toy sizes (float32), to check
this script end to end on a machine without a GPU (the timings then mean nothing).

Usage:
    bench/gpu.sh                                   # CUDA machine
    .venv/bin/python bench/gpu_bench.py --smoke    # anywhere, about a minute
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch  # does not import triton: TRITON_INTERPRET can still be set below

START = time.perf_counter()

# (label, in_features, out_features, tokens): GPT-2 at batch 8 x 1024 positions, Mixer-B/16 at
# 64 images x 196 patches (its channel MLP; the token MLP, 196 -> 384, is not block-aligned).
GPU_SHAPES = (("GPT-2 small fc", 768, 3072, 8192), ("GPT-2 small proj", 3072, 768, 8192),
              ("GPT-2 medium fc", 1024, 4096, 8192), ("Mixer-B channel fc", 768, 3072, 12544))
SMOKE_SHAPES = (("toy fc", 64, 128, 37), ("toy proj", 128, 64, 37))


@dataclass
class Check:
    name: str
    err: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.err < self.tol  # NaN (an unwritten element) fails


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="block sizes timed (default 64 128; smoke: 16)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; smoke: 2)")
    p.add_argument("--deadline", type=float, default=250.0,
                   help="seconds after which no new row is started (default 250)")
    p.add_argument("--skip-check", action="store_true", help="skip part 1")
    p.add_argument("--out", default="results/gpu_bench.csv", help="CSV of the speed table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; use --smoke on a CPU machine", file=sys.stderr)
        return 2
    from pixelfly_lab import triton_kernels as tk

    device = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    print(environment(device), flush=True)
    failures = []
    if not args.skip_check:
        checks = correctness(tk, device, args.smoke)
        failures = [c for c in checks if not c.ok]
        print(f"\ncorrectness: {len(checks) - len(failures)}/{len(checks)} checks passed", flush=True)
        for c in failures:
            print(f"  FAILED {c.name}: rel err {c.err:.2e} >= {c.tol:.0e}", flush=True)
    speed_table(tk, device, args)
    print(f"\ntotal {time.perf_counter() - START:.0f} s", flush=True)
    return 1 if failures else 0


def environment(device) -> str:
    import triton

    parts = [f"torch {torch.__version__}", f"triton {triton.__version__}"]
    if device == "cuda":
        parts += [torch.cuda.get_device_name(), f"CUDA {torch.version.cuda}",
                  f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}"]
    else:
        parts.append("CPU, TRITON_INTERPRET=1 (smoke test: timings are meaningless)")
    return "gpu_bench: " + ", ".join(parts)


# ----------------------------------------------------------------------------- part 1

def dense_weight(values, layout):
    """W (R*b, C*b) holding values[k] at the k-th True entry of layout (row-major)."""
    R, C = layout.shape
    b = values.shape[-1]
    blocks = values.new_zeros(R, C, b, b).index_put((layout.to(values.device),), values)
    return blocks.permute(0, 2, 1, 3).reshape(R * b, C * b)


def rel_err(a, ref) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def correctness(tk, device, smoke):
    """Every kernel, dtype and block size against the float64 dense reference."""
    dtypes = ((torch.float64, torch.float32, torch.float16) if smoke
              else (torch.float32, torch.float16, torch.bfloat16))
    blocks = (16, 32) if smoke else tk.BLOCK_SIZES
    R, C, M, rank = (3, 4, 37, 5) if smoke else (4, 6, 777, 24)
    tf32 = device == "cuda" and torch.backends.cuda.matmul.allow_tf32
    tol = {torch.float64: 1e-12, torch.float32: 5e-3 if tf32 else 1e-4, torch.float16: 3e-3,
           torch.bfloat16: 2e-2}
    checks = []
    tk.AUTOTUNE = False  # tuning every dtype x block would cost minutes of compiling
    print(f"\npart 1: correctness, dtypes {[str(d)[6:] for d in dtypes]}, blocks {list(blocks)}", flush=True)
    for dtype in dtypes:
        for block in blocks:
            started = time.perf_counter()
            grouped = blocks.index(block) % 2 == 0  # alternate: one program per block, or per two
            try:
                case = checks_one(tk, device, dtype, block, R, C, M, rank, tol[dtype], grouped)
            except Exception as err:  # e.g. a kernel that does not compile: record it, go on
                case = [Check(f"{str(dtype)[6:]} block {block}: {type(err).__name__}: {err}"[:300], float("inf"), 0.0)]
            checks += case
            bad = [c.name for c in case if not c.ok]
            print(f"  {str(dtype)[6:]:8s} block {block:3d}{' grouped' if grouped else '        '}: "
                  f"{len(case) - len(bad)}/{len(case)} ok, "
                  f"worst rel err {max(c.err for c in case):.1e} ({time.perf_counter() - started:.1f} s)"
                  + (f"  FAILED: {bad}" if bad else ""), flush=True)
    try:
        checks.append(check_autocast(tk, device, 16 if smoke else 64, R, C, M, rank))
    except Exception as err:
        checks.append(Check(f"autocast: {type(err).__name__}: {err}"[:300], float("inf"), 0.0))
    print(f"  autocast: rel err {checks[-1].err:.1e} ({'ok' if checks[-1].ok else 'FAILED'})", flush=True)
    tk.AUTOTUNE = None
    return checks


def random_operands(device, dtype, block, R, C, M, rank, seed=0, grouped=False):
    """Random operands on a random layout; grouped: every block row and column repeated twice
    (as in a stretched flat block butterfly), so that programs compute two output blocks each."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(R, C, generator=g) < 0.5
    layout[R - 1] = False   # an empty block row: its output is bias + low rank only
    layout[0, 0] = True
    if grouped:
        layout = layout.repeat_interleave(2, 0).repeat_interleave(2, 1)
        R, C = layout.shape

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    nnz = int(layout.sum())
    return dict(x=rand(M, C * block), values=rand(nnz, block, block, scale=block ** -0.5),
                bias=rand(R * block), u=rand(R * block, rank, scale=rank ** -0.5), v=rand(C * block, rank),
                dy=rand(M, R * block)), layout


def checks_one(tk, device, dtype, block, R, C, M, rank, tol, grouped):
    ops, layout = random_operands(device, dtype, block, R, C, M, rank, grouped=grouped)
    R, C = layout.shape
    x, values, bias, u, v, dy = (ops[k] for k in ("x", "values", "bias", "u", "v", "dy"))
    d = {k: t.double() for k, t in ops.items()}
    W = dense_weight(d["values"], layout)
    tables = tk.layout_tables(layout, device)
    nan = float("nan")
    out = []

    # the launchers, into NaN-filled buffers (a NaN left over = an element never written)
    y = tk.dsd_matmul(x, values, tables, bias=bias, lowrank=(x @ v, u),
                      out=torch.full((M, R * block), nan, device=device, dtype=dtype))
    out.append(Check("forward + bias + low rank", rel_err(y, d["x"] @ W.T + d["bias"] + (d["x"] @ d["v"]) @ d["u"].T), tol))
    dx = tk.dsd_matmul(dy, values, tables, transpose=True, lowrank=(dy @ u, v),
                       out=torch.full((M, C * block), nan, device=device, dtype=dtype))
    out.append(Check("input gradient + low rank", rel_err(dx, d["dy"] @ W + (d["dy"] @ d["u"]) @ d["v"].T), tol))
    dW_blocks = (d["dy"].T @ d["x"]).reshape(R, block, C, block).permute(0, 2, 1, 3)[layout.to(device)]
    for split in (None, 3):
        dv = tk.sdd_matmul(dy, x, tables, block, split=split, out=torch.full_like(values, nan))
        out.append(Check(f"weight gradient, split={split or 'auto'}", rel_err(dv, dW_blocks), tol))

    # the autograd entry points: values and every gradient
    for fused in (True, False):
        names = ["x", "values", "bias", "u", "v"] if fused else ["x", "values", "bias"]
        leaves = [ops[k].clone().requires_grad_() for k in names]
        if fused:
            y = tk.pixelfly_matmul_triton(leaves[0], leaves[1], layout, leaves[3], leaves[4], leaves[2])
        else:
            y = tk.block_sparse_matmul_triton(leaves[0], leaves[1], layout, leaves[2])
        grads = torch.autograd.grad(y, leaves, dy)
        ref = [t.detach().double().requires_grad_() for t in leaves]
        y_ref = ref[0] @ dense_weight(ref[1], layout).T + ref[2]
        if fused:
            y_ref = y_ref + (ref[0] @ ref[4]) @ ref[3].T
        ref_grads = torch.autograd.grad(y_ref, ref, d["dy"])
        tag = "pixelfly_matmul_triton" if fused else "block_sparse_matmul_triton"
        out.append(Check(f"{tag} output", rel_err(y, y_ref), tol))
        for name, got, want in zip(names, grads, ref_grads):
            out.append(Check(f"{tag} d{name}", rel_err(got, want), tol))
    return out


def check_autocast(tk, device, block, R, C, M, rank) -> Check:
    """float32 parameters under autocast: output in the autocast dtype, gradients in float32."""
    low = torch.float16 if device == "cpu" else torch.bfloat16  # the interpreter mishandles bf16 dots
    ops, layout = random_operands(device, torch.float32, block, R, C, M, rank, seed=1)
    leaves = [ops[k].clone().requires_grad_() for k in ("x", "values", "bias", "u", "v")]
    with torch.autocast(device, dtype=low):
        y = tk.pixelfly_matmul_triton(leaves[0], leaves[1], layout, leaves[3], leaves[4], leaves[2])
    grads = torch.autograd.grad(y, leaves, ops["dy"].to(low))
    if y.dtype != low or any(g.dtype != torch.float32 for g in grads):
        return Check(f"autocast {low}: dtypes {y.dtype}, {[g.dtype for g in grads]}", float("inf"), 1.0)
    d = [t.detach().double() for t in leaves]
    y_ref = d[0] @ dense_weight(d[1], layout).T + d[2] + (d[0] @ d[4]) @ d[3].T
    return Check(f"autocast {low} output", rel_err(y, y_ref), 3e-3 if low == torch.float16 else 2e-2)


# ----------------------------------------------------------------------------- part 2

def timer(device, reps):
    """Median milliseconds of fn() over reps calls, after two warm-up calls (which autotune)."""
    def measure(fn) -> float:
        fn()
        fn()
        if device == "cpu":
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    return measure


def time_method(measure, forward, inputs, dy):
    """(forward, backward, forward+backward) milliseconds of y = forward() with grads to inputs."""
    fwd = measure(forward)
    y = forward()
    bwd = measure(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True))
    both = measure(lambda: torch.autograd.grad(forward(), inputs, dy))
    return fwd, bwd, both


@dataclass
class Method:
    """One timed row: y = forward() with gradients to ``inputs`` (None: the method is unavailable)."""

    density: float                  # fraction of the dense layer's parameters (= FLOPs)
    forward: object = None
    inputs: list | None = None
    weight: object = None           # float32 dense (out, in) weight it computes with
    bias: object = None
    operands: tuple | None = None   # (values, layout, u, v) of a Triton row: its gradients are checked too
    note: str = ""


def methods_for(tk, device, dtype, d_in, d_out, budget, block, x):
    """{name: Method} for one (shape, budget, block)."""
    import torch.nn.functional as F
    from pixelfly_lab.masks import flat_block_butterfly_layout
    from pixelfly_lab.patterns import make_pattern, plan_pixelfly

    plan = plan_pixelfly(d_out, d_in, budget, block)  # raises ValueError when the budget is too small
    layout = flat_block_butterfly_layout(d_out, d_in, plan.butterfly_size, plan.n_factors, block)
    nnz, rank = int(layout.sum()), plan.rank
    g = torch.Generator(device=device).manual_seed(0)

    def param(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype).requires_grad_()

    values = param(nnz, block, block, scale=(d_in * nnz / layout.numel()) ** -0.5)
    bias = param(d_out, scale=0.1)
    u, v = (param(d_out, rank, scale=rank ** -0.5), param(d_in, rank, scale=d_in ** -0.5)) if rank else (None, None)
    layout_dev = layout.to(device)
    W = dense_weight(values.detach().float(), layout_dev)
    W_lr = W if not rank else W + u.detach().float() @ v.detach().float().T
    s_density = nnz * block * block / (d_in * d_out)
    ms = {}
    if rank:
        ms["pixelfly fused (triton)"] = Method(
            plan.budget, lambda: tk.pixelfly_matmul_triton(x, values, layout_dev, u, v, bias),
            [x, values, bias, u, v], W_lr, bias, (values, layout_dev, u, v), f"rank {rank}")
    else:  # the plan spent the whole budget on the sparse part
        ms["pixelfly fused (triton)"] = Method(
            plan.budget, lambda: tk.block_sparse_matmul_triton(x, values, layout_dev, bias),
            [x, values, bias], W, bias, (values, layout_dev, None, None), "rank 0: S only")
    ms["S only (triton)"] = Method(s_density, lambda: tk.block_sparse_matmul_triton(x, values, layout_dev, bias),
                                   [x, values, bias], W, bias, (values, layout_dev, None, None))
    try:
        from pixelfly_lab.layers import PixelflyLinear
        layer = PixelflyLinear(d_in, d_out, budget=budget, block_size=block, device=device, dtype=dtype)
        ms["pixelfly layer"] = Method(plan.budget, lambda: layer(x), [x, *layer.parameters()],
                                      layer.dense_weight().detach().float(), layer.bias,
                                      note=f"backend {layer_backend(layer, x)}")
    except Exception as err:  # the layer API is another module's: report, don't stop
        ms["pixelfly layer"] = Method(plan.budget, note=f"{type(err).__name__}: {err}"[:80])
    ms["S only (torch BSR)"] = bsr_method(F, W.to(dtype), block, x, bias, s_density)
    try:
        from pixelfly_lab.layers import MonarchLinear
        pattern = make_pattern("monarch", d_out, d_in, budget)
        mon = MonarchLinear(d_in, d_out, pattern.nblocks, device=device, dtype=dtype)
        ms["monarch"] = Method(pattern.budget, lambda: mon(x), [x, *mon.parameters()],
                               mon.dense_weight().detach().float(), mon.bias, note=f"nblocks {pattern.nblocks}")
    except Exception as err:
        ms["monarch"] = Method(float("nan"), note=f"{type(err).__name__}: {err}"[:80])
    return ms


def layer_backend(layer, x) -> str:
    """The kernel backend the layer's 'auto' picks for x (as pixelfly_lab.kernels resolves it)."""
    try:
        from pixelfly_lab.kernels import resolve_backend
        return resolve_backend(x, layer.backend)
    except Exception:
        return str(getattr(layer, "backend", "?"))


def bsr_method(F, W, block, x, bias, density) -> Method:
    """torch's BSR matmul on the same sparse weight: the first formulation this torch runs."""
    try:
        with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
            warnings.simplefilter("ignore")
            Wb = W.detach().to_sparse_bsr((block, block)).requires_grad_()
    except Exception as err:
        return Method(density, note=f"to_sparse_bsr: {type(err).__name__}: {err}"[:80])
    candidates = (("F.linear", lambda: F.linear(x, Wb, bias)),
                  ("bsr @ x^T", lambda: (Wb @ x.T).T + bias))
    for name, fwd in candidates:
        try:
            y = fwd()
        except Exception:
            continue
        for inputs, note in (([x, Wb, bias], name), ([x, bias], f"{name}, no weight grad")):
            try:
                torch.autograd.grad(y, inputs, torch.ones_like(y), retain_graph=True)
                return Method(density, fwd, inputs, W.float(), bias, note=note)
            except Exception:
                continue
        return Method(density, fwd, [], W.float(), bias, note=f"{name}, forward only")
    return Method(density, note="no BSR matmul for this dtype and device")


def reference_grads(x, dy, operands):
    """float32 autograd of the dense reference: (gradients, the leaves they belong to)."""
    values, layout, u, v = operands
    leaves = [t for t in (x, values, u, v) if t is not None]
    ref = [t.detach().float().requires_grad_() for t in leaves]
    y_ref = ref[0] @ dense_weight(ref[1], layout).T
    if u is not None:
        y_ref = y_ref + (ref[0] @ ref[3]) @ ref[2].T
    return torch.autograd.grad(y_ref, ref, dy.float()), leaves


def speed_table(tk, device, args):
    import pandas as pd

    smoke = args.smoke
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    blocks = args.blocks or ([16] if smoke else [64, 128])
    reps = args.reps or (2 if smoke else 20)
    dtype = torch.float32 if smoke else torch.bfloat16
    measure = timer(device, reps)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\npart 2: speed, {str(dtype)[6:]}, {reps} reps, times in ms (median)", flush=True)
    try:
        for label, d_in, d_out, tokens in shapes:
            if time.perf_counter() - START > args.deadline:
                print(f"  deadline reached: skipping {label}", flush=True)
                continue
            g = torch.Generator(device=device).manual_seed(1)
            x = torch.randn(tokens, d_in, generator=g, device=device).to(dtype).requires_grad_()
            dy = torch.randn(tokens, d_out, generator=g, device=device).to(dtype)
            dense = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
            base = dict(shape=label, d_in=d_in, d_out=d_out, tokens=tokens)
            d_fwd, d_bwd, d_both = time_method(measure, lambda: dense(x), [x, *dense.parameters()], dy)
            rows.append(dict(base, budget=1.0, block=0, method="dense nn.Linear", density=1.0, fwd_ms=d_fwd,
                             bwd_ms=d_bwd, fwdbwd_ms=d_both, speedup=1.0, flop_limit=1.0, of_limit=1.0,
                             max_rel_err=0.0, note=""))
            print_row(rows[-1])
            for budget in args.budgets:
                for block in blocks:
                    if time.perf_counter() - START > args.deadline:
                        print(f"  deadline reached: skipping {label} budget {budget} block {block}", flush=True)
                        continue
                    try:
                        ms = methods_for(tk, device, dtype, d_in, d_out, budget, block, x)
                    except ValueError as err:  # the budget is too small for this block size
                        print(f"  {label} budget {budget} block {block}: skipped ({err})"[:160], flush=True)
                        continue
                    except Exception as err:
                        print(f"  {label} budget {budget} block {block}: FAILED to set up: "
                              f"{type(err).__name__}: {err}"[:300], flush=True)
                        continue
                    for name, method in ms.items():
                        row = dict(base, budget=budget, block=block, method=name, density=method.density,
                                   note=method.note)
                        if method.forward is not None:
                            row.update(measure_row(measure, method, x, dy, d_both))
                        rows.append(row)
                        print_row(row)
                    pd.DataFrame(rows).to_csv(out, index=False)
    except KeyboardInterrupt:  # bench/gpu.sh's timeout: keep what was measured
        print("  interrupted: printing the rows measured so far", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out, index=False)
    summarise(table, smoke)
    print(f"table written to {out}", flush=True)


def measure_row(measure, m: Method, x, dy, dense_both) -> dict:
    """Times and errors of one method."""
    row = {}
    try:
        y = m.forward()
        y_ref = x.detach().float() @ m.weight.T
        if m.bias is not None:
            y_ref = y_ref + m.bias.detach().float()
        errors = [rel_err(y, y_ref)]
        if m.operands is not None:
            want, leaves = reference_grads(x, dy, m.operands)
            errors += [rel_err(a, b) for a, b in zip(torch.autograd.grad(y, leaves, dy), want)]
        row["max_rel_err"] = max(errors)
        if m.inputs:
            f, b, both = time_method(measure, m.forward, m.inputs, dy)
        else:
            f, b, both = measure(m.forward), float("nan"), float("nan")
        row.update(fwd_ms=f, bwd_ms=b, fwdbwd_ms=both, speedup=dense_both / both, flop_limit=1 / m.density,
                   of_limit=dense_both / both * m.density)
    except Exception as err:  # one failing method must not lose the table
        row["note"] = f"{m.note}; {type(err).__name__}: {err}"[:100]
    return row


def print_row(r):
    def f(key, spec):
        value = r.get(key, float("nan"))
        return format(value, spec) if isinstance(value, (int, float)) and not math.isnan(value) else "-"
    print(f"  {r['shape']:19s} {r['tokens']:6d} budget {f('budget', '.2f')} block {r['block']:3d} "
          f"{r['method']:24s} dens {f('density', '.3f')} fwd {f('fwd_ms', '7.3f')} bwd {f('bwd_ms', '7.3f')} "
          f"f+b {f('fwdbwd_ms', '7.3f')} x{f('speedup', '5.2f')} /lim {f('flop_limit', '5.2f')} "
          f"={f('of_limit', '4.2f')} err {f('max_rel_err', '.1e')} {r.get('note', '')}", flush=True)


def summarise(table, smoke):
    import pandas as pd

    if table.empty:
        return
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    cols = ["shape", "tokens", "budget", "block", "method", "density", "fwd_ms", "bwd_ms", "fwdbwd_ms",
            "speedup", "flop_limit", "of_limit", "max_rel_err", "note"]
    print("\n" + table.reindex(columns=cols).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    goal = table[(table.method == "pixelfly fused (triton)") & (table.block >= 64)]
    if len(goal) and "of_limit" in goal:
        met = int((goal.of_limit >= 0.8).sum())
        print(f"\ngoal: fused Pixelfly forward+backward speed-up >= 0.8/density at block >= 64: "
              f"{met}/{len(goal)} rows" + (" (smoke: meaningless)" if smoke else ""))


if __name__ == "__main__":
    sys.exit(main())
