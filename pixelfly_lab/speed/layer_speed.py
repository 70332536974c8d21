"""Layer speed against dense nn.Linear: :func:`speed_table` (what ``python -m pixelfly_lab bench`` prints).

What is measured: forward and forward+backward wall time of one layer on x (rows, in_features)
-> out_features, in float32 on one CPU thread (or on the GPU, or under bf16 autocast), for
Pixelfly layers over budgets, block sizes and kernel backends, and the peers a user would
otherwise pick: torch's BSR sparse tensors (forward only on the CPU: torch has no CPU autograd
for them), Monarch (Dao et al. 2022, arXiv 2204.00595) and a masked dense layer. Every case of a
shape is timed in the same process, interleaved (each repeat runs all cases, in rotating order),
so that a shared machine's load drifts onto all of them alike; the table reports medians and the
speed-up over nn.Linear of the same shape. The FLOP limit of a layer is 1 / budget, and the
fraction of it reached (speed-up / limit) is the kernel's efficiency relative to the same
machine's dense GEMM rate (:func:`add_rate_columns`). Tested in tests/test_bench.py.

Example:
    >>> table = speed_table(BenchConfig(shapes=((256, 1024),), rows=512, budgets=(0.25,), repeats=2))
"""

from __future__ import annotations

import ctypes
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pixelfly_lab.nn.layers import MaskedLinear, MonarchLinear, PixelflyLinear
from pixelfly_lab.speed.machine import load_average
from pixelfly_lab.structure.patterns import make_pattern
from pixelfly_lab.threads import num_threads

__all__ = ["BenchConfig", "RELEASED", "MODES", "speed_table", "add_rate_columns", "time_layer_call"]

# The released Pixelfly configuration (the paper's code for GPT-2 / Mixer MLPs).
RELEASED = {"butterfly_size": 16, "n_factors": 2, "rank": 32, "block_size": 32}


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`speed_table` times."""

    # (in_features, out_features): MLP up-projections of GPT-2 small-ish, ViT-B/Mixer-B, GPT-2 medium
    shapes: tuple[tuple[int, int], ...] = ((512, 2048), (768, 3072), (1024, 4096))
    rows: int = 4096                     # tokens in a batch, e.g. 8 sequences of 512
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)   # Pixelfly layers via plan_pixelfly
    block_sizes: tuple[int, ...] = (16, 32, 64)
    # the first backend runs at every block size; the others only at block 32, where they are
    # compared (the reference costs a dense matmul, so timing it everywhere only costs time)
    backends: tuple[str, ...] = ("torch", "reference")
    peers: tuple[str, ...] = ("monarch", "masked", "bsr")    # at each budget, block 32
    released: bool = True                # also time the released configuration (RELEASED)
    repeats: int = 5                     # timed runs per case; the median is reported
    warmup: int = 1                      # untimed runs per case first (allocations, plans)
    threads: int = 1                     # torch CPU threads: one, as the speed target is stated
    device: str = "cpu"
    dtype: torch.dtype = torch.float32   # of parameters and inputs; bfloat16 is what a GPU run wants
    # compute dtype under torch.autocast (None: off). torch.bfloat16 on the CPU is mixed-precision
    # training as users run it (float32 parameters, bf16 GEMMs: AMX/AVX512-BF16 where the CPU has
    # them); nn.Linear runs under the same autocast, so the ratio is against dense bf16.
    autocast: torch.dtype | None = None
    # 'retain': glibc keeps freed memory for reuse, as a caching allocator (jemalloc/tcmalloc)
    # would; without it every call of nn.Linear re-faults its fresh output's pages (see
    # _use_retaining_allocator; the 'torch' kernels reuse their large outputs themselves).
    # 'default': glibc as configured. Both layers get the same one.
    allocator: str = "default"          # what a user has; the targets (issue 16) are stated for it
    seed: int = 0


class _BSRLinear(nn.Module):
    """y = x W^T + bias with W a torch BSR tensor (forward only on the CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, block_size: int):
        super().__init__()
        with warnings.catch_warnings():  # "BSR support is in beta": known, and why it is a peer here
            warnings.simplefilter("ignore", UserWarning)
            self.weight = weight.to_sparse_bsr((block_size, block_size))
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x):
        # bsr @ dense: F.linear with a BSR weight takes a much slower path on the CPU
        return (self.weight @ x.reshape(-1, x.shape[-1]).T).T + self.bias


def _cases(cfg: BenchConfig, in_f: int, out_f: int):
    """(label dict, builder) for every layer timed at one shape; dense nn.Linear first."""
    factory = {"device": cfg.device, "dtype": cfg.dtype}
    yield {"layer": "nn.Linear", "block_size": 0, "backend": "-"}, \
        lambda: nn.Linear(in_f, out_f, **factory)
    fast = cfg.backends[0] if cfg.backends else "torch"
    if cfg.released:
        for backend in cfg.backends:
            yield {"layer": "Pixelfly released", "block_size": 32, "backend": backend}, \
                lambda backend=backend: PixelflyLinear(in_f, out_f, **RELEASED, backend=backend, **factory)
    for budget in cfg.budgets:
        for block in cfg.block_sizes:
            for backend in cfg.backends if block == 32 else (fast,):
                yield {"layer": "Pixelfly", "block_size": block, "backend": backend}, \
                    lambda budget=budget, block=block, backend=backend: PixelflyLinear(
                        in_f, out_f, budget=budget, block_size=block, backend=backend, **factory)
        # peers at this budget; the masks are Pixelfly's sparse part at block 32
        if "monarch" in cfg.peers:
            yield {"layer": "Monarch", "block_size": 0, "backend": "-"}, \
                lambda budget=budget: MonarchLinear(in_f, out_f, make_pattern("monarch", out_f, in_f, budget).nblocks,
                                                    **factory)
        if "masked" in cfg.peers:
            yield {"layer": "Masked dense", "block_size": 32, "backend": "-"}, \
                lambda budget=budget: MaskedLinear(in_f, out_f, _pixelfly_mask(in_f, out_f, budget), **factory)
        if "bsr" in cfg.peers:
            def bsr(budget=budget):
                dense = nn.Linear(in_f, out_f, **factory)
                mask = _pixelfly_mask(in_f, out_f, budget).to(cfg.device)
                return _BSRLinear(dense.weight.detach() * mask, dense.bias, 32)
            yield {"layer": "torch BSR", "block_size": 32, "backend": "-"}, bsr


def _pixelfly_mask(in_f: int, out_f: int, budget: float) -> torch.Tensor:
    return make_pattern("pixelfly", out_f, in_f, budget, block_size=32).mask()


def _weight_budget(layer: nn.Module, in_f: int, out_f: int) -> float:
    if isinstance(layer, _BSRLinear):
        return layer.weight.values().numel() / (in_f * out_f)
    return getattr(layer, "budget", 1.0)  # the structured layers know theirs; nn.Linear is 1


def _use_retaining_allocator() -> bool:
    """glibc: serve every allocation from the heap and never give freed memory back.

    By default glibc maps each allocation above 32 MB afresh (mmap) and unmaps it on free, so
    every call of a layer pays a first-touch page fault per 4 KB of its output (16K faults for
    a 4096 x 4096 float32 y). A caching allocator (jemalloc, tcmalloc; PyTorch's CPU performance
    guide recommends one) reuses the memory instead. This setting is process-wide and cannot be
    undone cleanly, which is why :func:`speed_table` applies it in a child process.
    Returns False where it is not available (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # mallopt parameter numbers, <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1))


def _clocks(device: str):
    """Wall clock (synchronised on CUDA) and, on the CPU, this process's CPU time (all its threads:
    the 'torch' kernels run worker threads when torch has several)."""
    if device.startswith("cuda"):
        def now():
            torch.cuda.synchronize()
            return time.perf_counter(), float("nan")
        return now
    return lambda: (time.perf_counter(), time.process_time())


def time_layer_call(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, backward: bool = True,
                    autocast: torch.dtype | None = None, now=None) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward (no grad) or forward+backward (dx and parameter grads).

    The one timing of a layer call: :func:`speed_table` and the model planner
    (:mod:`pixelfly_lab.speed.planner`) both take it.

    Args:
        layer: the module; its and x's gradients are cleared first.
        x: (rows, in_features), requires_grad for dx; grad: (rows, out_features), the output gradient.
        backward: forward+backward (True) or forward only, without grad.
        autocast: run under ``torch.autocast(x.device.type, autocast)`` (None: off).
        now: the clock (default: wall, synchronised on CUDA, and this process's CPU time).

    Returns:
        (wall seconds, CPU seconds; NaN on CUDA).
    """
    now = now or _clocks(x.device.type)
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        wall, cpu = now()
        if backward:
            layer(x).backward(grad)
        else:
            with torch.no_grad():
                layer(x)
        wall2, cpu2 = now()
    return wall2 - wall, cpu2 - cpu


MODES = ("forward", "forward_backward")
# GEMMs of a dense layer per mode: y = x W^T; then dX = gy W and dW = gy^T x (x needs a gradient)
_PRODUCTS = {"forward": 1, "forward_backward": 3, "backward": 2}   # backward: dX and dW


def _paired_quartiles(dense: list, layer: list) -> tuple[float, float]:
    """The 25th and 75th percentiles of the per-round ratios dense / layer (the two timed in the same
    round, back to back; rounds where either has no time left out): how far a speed-up moves from
    round to round on this machine, paired so that slow drifts of the machine cancel. NaN for fewer
    than two rounds."""
    ratios = sorted(d / t for d, t in zip(dense, layer) if t > 0)
    if len(ratios) < 2:
        return float("nan"), float("nan")
    q25, _, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q25, q75


def add_rate_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Add the machine's dense GEMM rate and each row's useful rate to a :func:`speed_table` table.

    For each mode (suffix ``_forward``, ``_backward``; none for forward+backward, the headline):
    ``dense_gflops`` = nn.Linear's FLOPs (2 * rows * in * out per product) / nn.Linear's median
    time at the same shape, threads, dtype and mode; ``useful_gflops`` = budget * those dense
    FLOPs / the row's median time (the dense-equivalent work its stored entries do per second);
    ``fraction_of_dense_rate`` = useful_gflops / dense_gflops (= speed-up / FLOP limit): what
    the kernels control, comparable between machines whose dense GEMMs differ. The backward's
    time is added as ``backward_ms`` = forward_backward_ms - forward_ms (differences of medians of
    separate calls: an estimate).

    Args:
        table: rows with in_features, out_features, rows, budget, layer and ``{mode}_ms``.

    Returns:
        the same DataFrame, columns added in place.
    """
    # the backward alone, from the two medians (fwd+bwd minus forward; timed as separate calls)
    table["backward_ms"] = table["forward_backward_ms"] - table["forward_ms"]
    dense = table[table["layer"] == "nn.Linear"].set_index(["in_features", "out_features"])
    index = pd.MultiIndex.from_frame(table[["in_features", "out_features"]])
    for mode in (*MODES, "backward"):
        suffix = "" if mode == "forward_backward" else f"_{mode}"
        flops = 2.0 * _PRODUCTS[mode] * table["rows"] * table["in_features"] * table["out_features"]
        dense_ms = dense[f"{mode}_ms"].reindex(index).to_numpy()
        table[f"dense_gflops{suffix}"] = flops / (1e6 * dense_ms)
        table[f"useful_gflops{suffix}"] = table["budget"] * flops / (1e6 * table[f"{mode}_ms"])
        table[f"fraction_of_dense_rate{suffix}"] = table[f"useful_gflops{suffix}"] / table[f"dense_gflops{suffix}"]
    return table


def _measure(config: BenchConfig, progress: bool) -> pd.DataFrame:
    """The timing loop of :func:`speed_table`, in this process."""
    allocator = "retain" if config.allocator == "retain" and _use_retaining_allocator() else "default"
    now = _clocks(config.device)
    compute = str(config.autocast or config.dtype).replace("torch.", "")
    common = {"rows": config.rows, "threads": config.threads, "device": config.device,
              "dtype": compute + (" (autocast)" if config.autocast else ""), "grad_dtype": compute,
              "allocator": allocator}
    rows = []
    with num_threads(config.threads):
        for in_f, out_f in tqdm(config.shapes, desc="bench shapes", disable=not progress):
            torch.manual_seed(config.seed)
            cases, skipped = [], []
            for label, build in _cases(config, in_f, out_f):
                try:
                    cases.append((label, build()))
                except ValueError as err:  # the budget cannot be met at this block size
                    skipped.append({"in_features": in_f, "out_features": out_f, **common, **label,
                                    "note": f"skipped: {err}"})
            x = torch.randn(config.rows, in_f, device=config.device, dtype=config.dtype, requires_grad=True)
            # the output's gradient in the output's dtype (column grad_dtype): under autocast a layer's
            # output is bfloat16, and so is the gradient a bfloat16 op after it sends back. A float32
            # gradient (from a float32 residual add, say) is cast to bfloat16 by autograd before either
            # layer sees it: the same cast for both, not the layer's work (measured 22 ms for 4096 x 4096
            # on one thread, most of it page faults of the fresh 32 MB result: as long as the sparse
            # forward). Until 2026-12-07 the bench timed that cast too: its earlier bf16 ratios are lower.
            grad = torch.randn(config.rows, out_f, device=config.device, dtype=config.autocast or config.dtype)
            times = [{"note": "", **{f"{m}{c}": [] for m in MODES for c in ("", "_cpu")}} for _ in cases]
            runs = config.warmup + config.repeats
            for run_index in tqdm(range(runs), desc=f"{in_f}->{out_f}", leave=False, disable=not progress):
                shift = run_index % len(cases)          # rotate the order: no case always goes first
                for i in list(range(shift, len(cases))) + list(range(shift)):
                    layer, record = cases[i][1], times[i]
                    for mode in MODES:
                        try:
                            wall, cpu = time_layer_call(layer, x, grad, mode == "forward_backward",
                                                        config.autocast, now)
                        except RuntimeError as err:   # e.g. no autograd for BSR tensors on the CPU
                            record["note"] = f"{mode}: {str(err).splitlines()[0][:80]}"
                            continue
                        if run_index >= config.warmup:
                            record[mode].append(wall)
                            record[f"{mode}_cpu"].append(cpu)
            load = load_average()[0]
            for (label, layer), record in zip(cases, times):
                budget = _weight_budget(layer, in_f, out_f)
                medians = {f"{key}_ms": 1e3 * statistics.median(record[key]) if record[key] else float("nan")
                           for key in record if key != "note"}
                low, high = _paired_quartiles(times[0]["forward_backward"], record["forward_backward"])
                rows.append({"in_features": in_f, "out_features": out_f, **common, **label, "budget": budget,
                             **medians, "flop_limit": 1.0 / budget, "note": record["note"], "load_avg": load,
                             "fraction_q25": low * budget, "fraction_q75": high * budget})
            rows.extend(skipped)
    table = pd.DataFrame(rows)
    dense = table[table["layer"] == "nn.Linear"].set_index(["in_features", "out_features"])
    index = pd.MultiIndex.from_frame(table[["in_features", "out_features"]])
    for key in [f"{m}{c}" for m in MODES for c in ("", "_cpu")]:
        table[f"speedup_{key}"] = dense[f"{key}_ms"].reindex(index).to_numpy() / table[f"{key}_ms"].to_numpy()
    for mode in MODES:   # efficiency: how much of the FLOP limit the kernel reaches
        table[f"fraction_of_limit_{mode}"] = table[f"speedup_{mode}"] / table["flop_limit"]
    return add_rate_columns(table)


def speed_table(config: BenchConfig = BenchConfig(), progress: bool = True, isolate: bool = True) -> pd.DataFrame:
    """Time every case of ``config``; one row per (shape, layer), medians in milliseconds.

    Args:
        config: what to time (:class:`BenchConfig`).
        progress: progress bars.
        isolate: run in a fresh child process (spawn): the allocator setting stays there and
            earlier work in this process does not colour the timings. False runs here (and a
            'retain' allocator then stays set for the rest of this process).

    Returns:
        DataFrame: in_features, out_features, rows, layer, budget (exact weight fraction),
        block_size, backend, forward_ms, forward_backward_ms (wall clock; NaN where autograd is
        missing), forward_cpu_ms, forward_backward_cpu_ms (this process's CPU time: the machine's
        other load counts less), speedup_* for each (nn.Linear's median / this median),
        flop_limit (1 / budget), fraction_of_limit_forward and fraction_of_limit_forward_backward
        (speed-up / flop_limit: the kernel's efficiency relative to nn.Linear's GEMM),
        dense_gflops, useful_gflops, fraction_of_dense_rate (forward+backward; ``*_forward`` for
        the forward, ``*_backward`` for the backward alone: :func:`add_rate_columns`),
        fraction_q25 and fraction_q75 (forward+backward:
        the quartiles of the per-round paired speed-ups / flop_limit, how far the fraction moves
        from round to round here: :func:`_paired_quartiles`), note, threads, device, dtype (the compute dtype,
        '(autocast)' when under autocast), grad_dtype (the output gradient's: the compute dtype),
        allocator, load_avg (the 1-minute load when the shape
        finished: a shared machine makes every number noisy).
    """
    if not isolate:
        return _measure(config, progress)
    # a plain subprocess, not multiprocessing: spawn would re-run the caller's main script
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((config, progress)))
        code = "import sys; from pixelfly_lab.speed.layer_speed import _child; _child(sys.argv[1], sys.argv[2])"
        subprocess.run([sys.executable, "-c", code, str(job), str(result)], check=True)
        return pickle.loads(result.read_bytes())


def _child(job: str, result: str) -> None:
    """Entry point of the isolated timing process (see :func:`speed_table`)."""
    config, progress = pickle.loads(Path(job).read_bytes())
    Path(result).write_bytes(pickle.dumps(_measure(config, progress)))
