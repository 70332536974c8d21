"""The ``bench`` command: layer and model speed against dense, printed and plotted (``python -m pixelfly_lab bench``).

Layer tables (:func:`pixelfly_lab.speed.layer_speed.speed_table`: forward and forward+backward of
Pixelfly layers and their peers against nn.Linear, interleaved medians), one per thread count and
row count, each under a line naming the CPU, its GEMM flags and the load
(:func:`pixelfly_lab.speed.machine.machine_header`), with the machine's dense GEMM rate
(``dense_gflops``) and the fraction of it each layer's stored entries reach
(``fraction_of_dense_rate`` = speed-up / FLOP limit) and how far it moves from round to round
(``fraction_q25``, ``fraction_q75``); then whole-model training steps
(:func:`pixelfly_lab.speed.model_speed.model_speed_table`, with ``ratio_without_system``: the step
ratio without the operating system's page-fault time, which swings the wall ratio on some
machines; ``sparse_fraction``: the rate of the sparse model's Pixelfly ops as a fraction of the dense
model's average matmul rate (the model's counterpart of ``fraction_of_dense_rate``, against all the
dense model's matmuls rather than nn.Linear at one shape); ``attainable_ratio``: the
ratio with those ops at the dense rate and the rest of the step as measured); :func:`plot_speed` draws speed-up against budget. The speed targets are fractions of the same machine's dense rate (the README's
Notes): the released configuration (butterfly_size 16, n_factors 2, rank 32, block 32) at
1024 -> 4096 forward and forward+backward at 0.9 of its FLOP limit, budget 0.1 at 0.75, bf16
autocast at 0.75 against dense bf16. The Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv
2112.00029) reports 2.3-2.5x end-to-end training speed-ups on GPUs.

Example:
    >>> table = speed_table(BenchConfig(shapes=((256, 1024),), rows=512, budgets=(0.25,), repeats=2))
    >>> fig = plot_speed(table)
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from pixelfly_lab.speed.layer_speed import MODES, RELEASED, BenchConfig, add_rate_columns, speed_table
from pixelfly_lab.speed.machine import machine, machine_header
from pixelfly_lab.speed.model_speed import MODEL_CASES, ModelCase, model_speed_table
from pixelfly_lab.speed.timer import time_training_steps

# re-exported from layer_speed, model_speed, machine and timer: the package's public names, the
# studies, notebooks, tests and bench/ scripts import them from here
__all__ = ["BenchConfig", "RELEASED", "MODES", "speed_table", "add_rate_columns", "machine", "machine_header",
           "plot_speed", "time_training_steps", "ModelCase", "MODEL_CASES", "model_speed_table", "add_arguments",
           "run"]


# ----------------------------------------------------------------------------- figure

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

# ----------------------------------------------------------------------------- command line

def _shape(text: str) -> tuple[int, int]:
    try:
        in_f, out_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes takes IN x OUT like 1024x4096, got {text!r}") from None
    return in_f, out_f


def _positive(text: str) -> int:
    """An int >= 1 from the command line (argparse's type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    parser.add_argument("--model-rounds", type=_positive, default=None,
                        help="interleaved rounds of the model table, one step per model each, the median reported "
                             "(default 5, 3 with --quick; three read GPT-2 small at 1.04x-1.48x on one quiet "
                             "machine within an hour)")
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
                 "dense_gflops", "useful_gflops", "fraction_of_dense_rate", "fraction_q25", "fraction_q75",
                 "fraction_of_dense_rate_forward", "fraction_of_dense_rate_backward"]


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
    rounds = args.model_rounds or (3 if args.quick else 5)
    for threads in args.threads:
        print(machine_header(), f"threads {threads}", flush=True)
        models = model_speed_table(cases, threads=threads, rounds=rounds)
        models.to_csv(out / f"models_threads{threads}.csv" if len(args.threads) > 1 else out / "models.csv",
                      index=False)
        columns = ["case", "model", "depth", "batch", "budget", "attention", "step_ms", "system_ms", "page_faults",
                   "ratio", "ratio_without_system", "flop_limit", "fraction_of_limit", "matmul_ms", "other_ms",
                   "sparse_ms", "sparse_fraction", "attainable_ratio", "gmacs", "params"]
        with pd.option_context("display.width", 220, "display.precision", 3):
            print(models[columns].to_string(index=False))
        print(f"model table: {out / 'models.csv'} ({threads} thread(s); load average "
              f"{models['load_avg'].iloc[-1]:.1f})")
    return 0
