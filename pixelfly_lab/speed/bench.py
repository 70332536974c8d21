"""Layer speed against dense nn.Linear: ``python -m pixelfly_lab bench`` (the 'speed' study composes it).

What is measured (the speed targets are in the README's Notes): forward and forward+backward
wall time of one layer on x (rows, in_features) -> out_features, in float32 on one CPU thread (or on the GPU), for
Pixelfly layers over budgets, block sizes and kernel backends, and the peers a user would
otherwise pick: torch's BSR sparse tensors (forward only on the CPU: torch has no CPU autograd
for them), Monarch (Dao et al. 2022, arXiv 2204.00595) and a masked dense layer. Every case of a
shape is timed in the same process, interleaved (each repeat runs all cases, in rotating order),
so that a shared machine's load drifts onto all of them alike; the table reports medians and the
speed-up over nn.Linear of the same shape. The FLOP limit of a layer is 1 / budget, and the
fraction of it reached (speed-up / limit) is the kernel's efficiency relative to dense GEMM.

Whole models: :func:`time_training_steps` times AdamW training steps of any models on one
batch (interleaved medians, the ratio to the first model, and the FLOP limit from the matmul
multiply-adds that actually run); :func:`model_speed_table` applies it to Mixer-B/16- and
GPT-2-small-shaped models against copies with Pixelfly MLPs (:data:`MODEL_CASES`).

Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029) reports 2.3-2.5x end-to-end
training speed-ups on GPUs; the bar here is the layer on a laptop CPU: the released
configuration (butterfly_size 16, n_factors 2, rank 32, block 32) at 1024 -> 4096 with 4096 rows
at least 3x faster than nn.Linear forward+backward (FLOP limit 4.41x).

Example:
    >>> table = speed_table(BenchConfig(shapes=((256, 1024),), rows=512, budgets=(0.25,), repeats=2))
    >>> fig = plot_speed(table)
"""

from __future__ import annotations

import copy
import ctypes
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pixelfly_lab.nn.attention import PixelflyAttention
from pixelfly_lab.nn.layers import MaskedLinear, MonarchLinear, PixelflyLinear
from pixelfly_lab.speed.timer import time_training_steps
from pixelfly_lab.structure.patterns import make_pattern
from pixelfly_lab.training.models import Mixer, Transformer

__all__ = ["BenchConfig", "RELEASED", "speed_table", "add_rate_columns", "machine", "machine_header", "plot_speed",
           "time_training_steps", "ModelCase",
           "MODEL_CASES", "model_speed_table", "add_arguments", "run"]

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


def _time_case(layer, x, grad, now, backward: bool, autocast: torch.dtype | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward (no grad) or forward+backward (dx and parameter grads),
    under ``torch.autocast(x.device.type, autocast)`` when given."""
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
_PRODUCTS = {"forward": 1, "forward_backward": 3}


def add_rate_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Add the machine's dense GEMM rate and each row's useful rate to a :func:`speed_table` table.

    For each mode (suffix ``_forward``; none for forward+backward, the headline):
    ``dense_gflops`` = nn.Linear's FLOPs (2 * rows * in * out per product) / nn.Linear's median
    time at the same shape, threads, dtype and mode; ``useful_gflops`` = budget * those dense
    FLOPs / the row's median time (the dense-equivalent work its stored entries do per second);
    ``fraction_of_dense_rate`` = useful_gflops / dense_gflops (= speed-up / FLOP limit): what
    the kernels control, comparable between machines whose dense GEMMs differ.

    Args:
        table: rows with in_features, out_features, rows, budget, layer and ``{mode}_ms``.

    Returns:
        the same DataFrame, columns added in place.
    """
    dense = table[table["layer"] == "nn.Linear"].set_index(["in_features", "out_features"])
    index = pd.MultiIndex.from_frame(table[["in_features", "out_features"]])
    for mode in MODES:
        suffix = "" if mode == "forward_backward" else f"_{mode}"
        flops = 2.0 * _PRODUCTS[mode] * table["rows"] * table["in_features"] * table["out_features"]
        dense_ms = dense[f"{mode}_ms"].reindex(index).to_numpy()
        table[f"dense_gflops{suffix}"] = flops / (1e6 * dense_ms)
        table[f"useful_gflops{suffix}"] = table["budget"] * flops / (1e6 * table[f"{mode}_ms"])
        table[f"fraction_of_dense_rate{suffix}"] = table[f"useful_gflops{suffix}"] / table[f"dense_gflops{suffix}"]
    return table


_FLAGS = ("avx2", "avx512", "amx", "fma")   # flag prefixes that decide a CPU's GEMM rate


def machine() -> dict:
    """What decides this machine's GEMM rate: CPU model, the vector/matrix flags, load, threads.

    Returns:
        {'model': lscpu's model name, 'flags': the avx2/avx512*/amx_*/fma flags (space-separated),
        'load_avg': the 1-, 5- and 15-minute load averages, 'cores': CPUs torch sees}.
    """
    model, flags = "unknown", []
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    if not text and Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name",) and model == "unknown":
            model = value.strip()
        elif name == "flags" and not flags:
            flags = [f for f in value.split() if f.startswith(_FLAGS)]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"model": model, "flags": " ".join(flags), "load_avg": tuple(round(v, 2) for v in load),
            "cores": os.cpu_count()}


def machine_header() -> str:
    """One line naming the CPU, its GEMM-relevant flags and the load, printed above every table."""
    info = machine()
    load = ", ".join(f"{v:.2f}" for v in info["load_avg"])
    return (f"# CPU: {info['model']} ({info['cores']} CPUs); flags: {info['flags'] or 'none of avx2/avx512/amx'}; "
            f"load average {load}")


def _measure(config: BenchConfig, progress: bool) -> pd.DataFrame:
    """The timing loop of :func:`speed_table`, in this process."""
    allocator = "retain" if config.allocator == "retain" and _use_retaining_allocator() else "default"
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    now = _clocks(config.device)
    compute = str(config.autocast or config.dtype).replace("torch.", "") + (" (autocast)" if config.autocast else "")
    common = {"rows": config.rows, "threads": config.threads, "device": config.device, "dtype": compute,
              "allocator": allocator}
    rows = []
    try:
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
            grad = torch.randn(config.rows, out_f, device=config.device, dtype=config.dtype)
            times = [{"note": "", **{f"{m}{c}": [] for m in MODES for c in ("", "_cpu")}} for _ in cases]
            runs = config.warmup + config.repeats
            for run_index in tqdm(range(runs), desc=f"{in_f}->{out_f}", leave=False, disable=not progress):
                shift = run_index % len(cases)          # rotate the order: no case always goes first
                for i in list(range(shift, len(cases))) + list(range(shift)):
                    layer, record = cases[i][1], times[i]
                    for mode in MODES:
                        try:
                            wall, cpu = _time_case(layer, x, grad, now, mode == "forward_backward",
                                                   config.autocast)
                        except RuntimeError as err:   # e.g. no autograd for BSR tensors on the CPU
                            record["note"] = f"{mode}: {str(err).splitlines()[0][:80]}"
                            continue
                        if run_index >= config.warmup:
                            record[mode].append(wall)
                            record[f"{mode}_cpu"].append(cpu)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            for (label, layer), record in zip(cases, times):
                budget = _weight_budget(layer, in_f, out_f)
                medians = {f"{key}_ms": 1e3 * statistics.median(record[key]) if record[key] else float("nan")
                           for key in record if key != "note"}
                rows.append({"in_features": in_f, "out_features": out_f, **common, **label, "budget": budget,
                             **medians, "flop_limit": 1.0 / budget, "note": record["note"], "load_avg": load})
            rows.extend(skipped)
    finally:
        torch.set_num_threads(threads)
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
        the forward: :func:`add_rate_columns`), note, threads, device, dtype (the compute dtype,
        '(autocast)' when under autocast), allocator, load_avg (the 1-minute load when the shape
        finished: a shared machine makes every number noisy).
    """
    if not isolate:
        return _measure(config, progress)
    # a plain subprocess, not multiprocessing: spawn would re-run the caller's main script
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((config, progress)))
        code = "import sys; from pixelfly_lab.speed.bench import _child; _child(sys.argv[1], sys.argv[2])"
        subprocess.run([sys.executable, "-c", code, str(job), str(result)], check=True)
        return pickle.loads(result.read_bytes())


def _child(job: str, result: str) -> None:
    """Entry point of the isolated timing process (see :func:`speed_table`)."""
    config, progress = pickle.loads(Path(job).read_bytes())
    Path(result).write_bytes(pickle.dumps(_measure(config, progress)))


def _plain_ratio_ticks(axis) -> None:
    """Ticks of a log-scaled speed-up axis read as plain ratios: 0.5x, 1x, 2x, 4x."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    low, high = axis.get_view_interval()
    ticks = [2.0 ** k for k in range(-6, 8) if low / 1.01 <= 2.0 ** k <= high * 1.01] or [1.0]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.set_minor_formatter(NullFormatter())


def plot_speed(table: pd.DataFrame):
    """Speed-up over nn.Linear against budget: one column per shape, forward and forward+backward.

    The title names the budgets timed; every point is a labelled layer (the released
    configuration, a star, sits at its own budget)."""
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(zip(table["in_features"], table["out_features"])))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.6 * len(shapes), 7.5), squeeze=False)
    budgets = sorted(b for b in table["budget"].dropna().unique() if b < 1)
    layers = table[table["layer"] != "nn.Linear"].dropna(subset=["budget"])

    def label_of(layer, block, backend):
        return layer + (f" b{block}" if block else "") + (f" [{backend}]" if backend != "-" else "")
    labels = list(dict.fromkeys(label_of(*key) for key in zip(layers["layer"], layers["block_size"], layers["backend"])))
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {label: palette(i % palette.N) for i, label in enumerate(labels)}  # one colour in every panel
    for col, (in_f, out_f) in enumerate(shapes):
        part = layers[(layers["in_features"] == in_f) & (layers["out_features"] == out_f)]
        for row, mode in enumerate(("forward", "forward_backward")):
            ax = axes[row][col]
            for (layer, block, backend), group in part.groupby(["layer", "block_size", "backend"], sort=False):
                # peers planned at different budgets can land on one budget: keep the first
                group = group.dropna(subset=[f"speedup_{mode}"]).drop_duplicates("budget").sort_values("budget")
                if group.empty:
                    continue
                label = label_of(layer, block, backend)
                star = layer == "Pixelfly released"
                ax.plot(group["budget"], group[f"speedup_{mode}"], "*" if star else "o-", label=label,
                        color=colors[label], markersize=12 if star else 4)
            if budgets:
                ax.plot(budgets, [1 / b for b in budgets], "k--", linewidth=1, label="FLOP limit 1/budget")
            ax.axhline(1.0, color="grey", linewidth=1)
            ax.set_yscale("log")
            _plain_ratio_ticks(ax.yaxis)
            ax.set_xlabel("budget (fraction of dense parameters)")
            ax.set_ylabel(f"speed-up over nn.Linear ({mode.replace('_', '+')})")
            n_rows = int(table.loc[(table["in_features"] == in_f) & (table["out_features"] == out_f), "rows"].iloc[0])
            ax.set_title(f"{in_f} -> {out_f}, {n_rows} rows, {mode.replace('_', '+')}")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    device = table["device"].iloc[0]
    fig.suptitle(f"Layer speed against nn.Linear ({device}, {int(table['threads'].iloc[0])} thread(s), "
                 f"medians of interleaved runs); budgets {', '.join(f'{b:.3g}' for b in budgets)}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


# ----------------------------------------------------------------------------- whole models

@dataclass(frozen=True)
class ModelCase:
    """A whole-model shape for :func:`model_speed_table`: dense against its MLPs sparsified.

    Mixer-B/16 (Tolstikhin et al. 2021): 224 x 224 images in 16 x 16 patches (196 tokens),
    dim 768, 12 blocks, token MLP 384, channel MLP 3072, 1000 classes; its channel MLPs are
    ~89% of the FLOPs. GPT-2 small (Radford et al. 2019): dim 768, 12 heads, 12 blocks, MLP
    3072, vocabulary 50257 (an untied head, ~30% of the FLOPs at this width).
    """

    name: str
    family: str                # 'mixer' or 'gpt'
    batch: int                 # images, or sequences of ``context`` tokens
    depth: int = 12
    dim: int = 768             # width; MLPs 4 * dim, Mixer's token MLP dim / 2 (384 at 768)
    context: int = 256         # GPT only
    budget: float = 0.25       # of each sparsified MLP layer (Pixelfly, plan_pixelfly)
    block_size: int = 32       # matches the released code and the CPU's GEMM tiles
    # GPT only: the sparse copy's attention, 'dense' or a PixelflyAttention layout ('pixelfly':
    # sparse + low-rank scores, the paper's GPT-2 configuration), at attention_budget of T^2
    attention: str = "dense"
    attention_budget: float = 0.25


# Batch 8 for Mixer as the issue states it (1568 tokens); GPT batch 4 (1024 tokens): a dense
# GPT-2 small step at batch 8 takes ~17 s on one thread, too long to repeat interleaved. The GPT
# copy has Pixelfly attention and Pixelfly MLPs, as the paper sparsifies GPT-2 (its Table 3).
MODEL_CASES = (ModelCase("Mixer-B/16", "mixer", batch=8),
               ModelCase("GPT-2 small", "gpt", batch=4, attention="pixelfly"))


def _model_pair(case: ModelCase, seed: int):
    """(dense model, sparsified copy, batch, target): the copy's MLP layers are PixelflyLinear."""
    torch.manual_seed(seed)
    if case.family == "mixer":
        dense = Mixer((3, 224, 224), 16, case.dim, case.depth, 1000, token_hidden=case.dim // 2)
        batch, target = torch.randn(case.batch, 3, 224, 224), torch.randint(0, 1000, (case.batch,))
    elif case.family == "gpt":
        dense = Transformer(case.context, case.dim, case.depth, 12, 50257, causal=True, vocab_size=50257,
                            per_token=True)
        batch, target = (torch.randint(0, 50257, (case.batch, case.context)) for _ in range(2))
    else:
        raise ValueError(f"ModelCase.family must be 'mixer' or 'gpt', got {case.family!r}")
    sparse = copy.deepcopy(dense)
    if case.family == "gpt" and case.attention != "dense":
        for block in sparse.blocks:
            block.attn = PixelflyAttention(case.dim, 12, case.context, budget=case.attention_budget,
                                           block_size=case.block_size, causal=True, layout=case.attention)
    for mlp in [block.channel if case.family == "mixer" else block.mlp for block in sparse.blocks]:
        for name in ("fc1", "fc2"):
            old = getattr(mlp, name)
            setattr(mlp, name, PixelflyLinear(old.in_features, old.out_features, budget=case.budget,
                                               block_size=case.block_size))
    return dense, sparse, batch, target


def model_speed_table(cases=MODEL_CASES, *, steps: int = 1, rounds: int = 3, threads: int = 1,
                      seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Training-step speed of whole models against their dense versions (:func:`time_training_steps`).

    Args:
        cases: :class:`ModelCase` s; default Mixer-B/16 (batch 8) and GPT-2 small (batch 4).
        steps, rounds, threads: as :func:`time_training_steps` (one thread: the CPU target).
        seed: seeds the weights and the batch.
        progress: a progress bar over cases.

    Returns:
        DataFrame, two rows per case (dense, pixelfly): case, depth, dim, batch, budget, block_size
        and :func:`time_training_steps`' columns (step_ms, ratio, flop_limit, fraction_of_limit, ...).

    Example:
        >>> tiny = ModelCase("Mixer-B/16, 1 block", "mixer", batch=1, depth=1)
        >>> table = model_speed_table([tiny], rounds=1, progress=False)
        >>> list(table["model"])
        ['dense', 'pixelfly']
    """
    tables = []
    for case in tqdm(cases, desc="models", disable=not progress):
        dense, sparse, batch, target = _model_pair(case, seed)
        table = time_training_steps({"dense": dense, "pixelfly": sparse}, batch, target, steps=steps,
                                    rounds=rounds, threads=threads)
        table.insert(0, "case", case.name)
        for column in ("depth", "dim", "batch", "budget", "block_size", "attention"):
            table.insert(len(table.columns) - 1, column, getattr(case, column))
        table.loc[table["model"] == "dense", "budget"] = 1.0
        table.loc[table["model"] == "dense", "attention"] = "dense"
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


# ----------------------------------------------------------------------------- command line

def _shape(text: str) -> tuple[int, int]:
    try:
        in_f, out_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes takes IN x OUT like 1024x4096, got {text!r}") from None
    return in_f, out_f


def add_arguments(parser) -> None:
    default = BenchConfig()
    parser.add_argument("--out", default="results/bench", help="folder for speed.csv and speed.png/pdf")
    parser.add_argument("--quick", action="store_true",
                        help="the released configuration and two budgets at 1024x4096 (about a minute)")
    parser.add_argument("--shapes", nargs="+", metavar="INxOUT", help="e.g. 1024x4096 (default: 512x2048 768x3072 1024x4096)")
    parser.add_argument("--rows", nargs="+", type=int, default=[default.rows],
                        help="rows of x (tokens); several, e.g. 4096 512, give one table each")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(default.budgets),
                        help="Pixelfly budgets to time, fractions of the dense parameters")
    parser.add_argument("--block-sizes", nargs="+", type=int, default=list(default.block_sizes),
                        help="sparse block sizes to time")
    parser.add_argument("--backends", nargs="+", default=list(default.backends),
                        choices=("auto", "torch", "reference", "triton"), help="block-sparse matmul backends")
    parser.add_argument("--peers", nargs="*", default=list(default.peers), choices=("monarch", "masked", "bsr"),
                        help="other sparse layers timed at each budget (block 32)")
    parser.add_argument("--repeats", type=int, default=default.repeats,
                        help="timed runs per case; the median is reported")
    parser.add_argument("--threads", nargs="+", type=int, default=[default.threads],
                        help="torch CPU threads (default 1); several, e.g. 1 2, give one table each")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="compute dtype: bfloat16 on the CPU runs both layers under torch.autocast "
                             "(float32 parameters); default float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to time (default cpu)")
    parser.add_argument("--allocator", default=default.allocator, choices=("retain", "default"),
                        help="'retain': glibc keeps freed memory (as jemalloc/tcmalloc would); 'default': as is")
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--no-models", action="store_true",
                        help="skip the model table (Mixer-B/16 and GPT-2 small training steps, minutes at full depth)")
    models.add_argument("--models", action="store_true",
                        help="only the model table (Mixer-B/16 and GPT-2 small with Pixelfly attention and MLPs)")


def _config(args, threads: int, rows: int) -> BenchConfig:
    """The :class:`BenchConfig` of the command line for one thread count and row count."""
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    precision = ({"dtype": torch.bfloat16} if args.device == "cuda" else
                 {"dtype": torch.float32, "autocast": torch.bfloat16}) if dtype == "bfloat16" else {}
    if args.quick:
        # the released configuration and two budgets at 1024 -> 4096, block 32: about a minute
        return BenchConfig(shapes=((1024, 4096),), rows=rows, budgets=(0.1, 0.25), block_sizes=(32,),
                           backends=("auto",) if args.device == "cuda" else ("torch",), peers=("masked",),
                           repeats=3, threads=threads, device=args.device, allocator=args.allocator, **precision)
    return BenchConfig(shapes=tuple(_shape(s) for s in args.shapes) if args.shapes else BenchConfig.shapes,
                       rows=rows, budgets=tuple(args.budgets), block_sizes=tuple(args.block_sizes),
                       backends=tuple(args.backends), peers=tuple(args.peers), repeats=args.repeats,
                       threads=threads, device=args.device, allocator=args.allocator, **precision)


# what the command prints of a layer table
TABLE_COLUMNS = ["in_features", "out_features", "rows", "threads", "dtype", "layer", "block_size", "backend", "budget",
                 "forward_ms", "forward_backward_ms", "speedup_forward", "speedup_forward_backward", "flop_limit",
                 "dense_gflops", "useful_gflops", "fraction_of_dense_rate", "fraction_of_dense_rate_forward"]


def run(args, *, isolate: bool = True) -> int:
    """The ``bench`` command: layer tables (one per thread and row count), then the model table.

    ``isolate=False`` times in this process (see :func:`speed_table`; tests use it)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.models:
        tables = []
        for threads in args.threads:
            for rows in args.rows:
                config = _config(args, threads, rows)
                print(machine_header(), f"threads {threads}, rows {rows}", flush=True)
                table = speed_table(config, progress=isolate, isolate=isolate)
                with pd.option_context("display.width", 250, "display.max_rows", 500, "display.precision", 3):
                    print(table[TABLE_COLUMNS].to_string(index=False), flush=True)
                tables.append(table)
        table = pd.concat(tables, ignore_index=True)
        table.to_csv(out / "speed.csv", index=False)
        import matplotlib.pyplot as plt

        first = table[(table["threads"] == args.threads[0]) & (table["rows"] == args.rows[0])]
        fig = plot_speed(first)
        for suffix in ("png", "pdf"):
            fig.savefig(out / f"speed.{suffix}", dpi=120, bbox_inches="tight")
        plt.close(fig)
        print(f"table: {out / 'speed.csv'}, figure: {out / 'speed.png'} ({args.threads[0]} thread(s), "
              f"{args.rows[0]} rows)")
    if args.no_models or args.device != "cpu":
        return 0
    # quick: two blocks of each model (GPT at batch 1), the widths and budgets of the full ones
    cases = [replace(c, depth=2, batch=min(c.batch, 8 if c.family == "mixer" else 1)) for c in MODEL_CASES] \
        if args.quick else list(MODEL_CASES)
    for threads in args.threads:
        print(machine_header(), f"threads {threads}", flush=True)
        models = model_speed_table(cases, threads=threads)
        models.to_csv(out / f"models_threads{threads}.csv" if len(args.threads) > 1 else out / "models.csv",
                      index=False)
        columns = ["case", "model", "depth", "batch", "budget", "attention", "step_ms", "ratio", "flop_limit",
                   "fraction_of_limit", "gmacs", "params"]
        with pd.option_context("display.width", 220, "display.precision", 3):
            print(models[columns].to_string(index=False))
        print(f"model table: {out / 'models.csv'} ({threads} thread(s); load average "
              f"{models['load_avg'].iloc[-1]:.1f})")
    return 0
