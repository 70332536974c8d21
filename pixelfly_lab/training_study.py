"""The training experiment: parity of Pixelfly with dense training, rank of the weights, time per step.

What the paper claims (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 5): sparse models with
the Pixelfly pattern reach the dense models' accuracy with a fraction of the parameters, and
train 2.3-2.5x faster on GPUs (MLP-Mixer, ViT, GPT-2). At laptop scale we check:

* digits MLP at budget 0.25: Pixelfly's test accuracy within 2 points of dense, in the same
  epochs; baselines (butterfly alone, low-rank, random blocks, Monarch) beside it;
* character GPT on the shipped Shakespeare: Pixelfly's validation loss within 5% of dense;
* the rank of trained weights (Pixelfly's are full rank; low-rank's are not), over training;
* time per training step, dense against sparse; on a CUDA GPU (full run) the step of a
  GPT-2-small-shaped GPT and a Mixer-B/16-shaped Mixer against the 2.5x the paper reports.

:func:`run_training_study` is registered as ``python -m pixelfly_lab reproduce`` experiment
'training' (through :func:`pixelfly_lab.train.experiment_training`).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .claims import Claim, save_figure, save_table
from .data import TaskData, load_data
from .models import build_model, count_params
from .rank import layer_weights, singular_values
from .train import TrainConfig, _loss, train
from .threads import num_threads

__all__ = ["run_training_study", "Comparison", "compare_patterns", "step_speed", "plot_curves", "plot_parity",
           "plot_ranks", "plot_step_times", "speed_claims"]

# Baselines at the same budget; the quick run keeps the two most telling (low-rank alone, random blocks).
DIGITS_PATTERNS = ("dense", "pixelfly", "lowrank", "random", "butterfly", "monarch")
QUICK_DIGITS_PATTERNS = DIGITS_PATTERNS[:4]
GPT_PATTERNS = ("dense", "pixelfly", "lowrank")


@dataclass
class Comparison:
    """Runs of one config under several patterns and seeds (see :func:`compare_patterns`).

    Attributes:
        summary: one row per run: pattern, seed, final metrics, params, density, median_step_time.
        history: every run's history rows, with pattern and seed columns.
        ranks: every run's effective ranks per evaluation, with pattern and seed columns.
        models: {(pattern, seed): trained model}.
    """

    summary: pd.DataFrame
    history: pd.DataFrame
    ranks: pd.DataFrame
    models: dict


def compare_patterns(patterns, seeds=(0,), workdir=None, **config) -> Comparison:
    """Train the same config once per (pattern, seed).

    Args:
        patterns: pattern names (see :data:`pixelfly_lab.patterns.PATTERN_NAMES`).
        seeds: seeds per pattern.
        workdir: where the runs' folders go (default: a temporary folder, deleted after).
        **config: :class:`pixelfly_lab.train.TrainConfig` fields shared by all runs.

    Returns:
        :class:`Comparison`.

    Example:
        >>> c = compare_patterns(["dense", "pixelfly"], model="mlp", data="digits", budget=0.25, epochs=2)
        >>> c.summary[["pattern", "test_accuracy", "density"]]  # doctest: +SKIP
    """
    summaries, histories, ranks, models = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        for pattern in patterns:
            for seed in seeds:
                out = root / f"{config.get('model', 'model')}-{pattern}-seed{seed}"
                result = train(TrainConfig(**{**config, "pattern": pattern, "seed": seed, "out": str(out)}))
                keep = {k: v for k, v in result.summary.items() if not isinstance(v, (dict, list))}
                summaries.append({"pattern": pattern, "seed": seed, **keep})
                histories.append(result.history.assign(pattern=pattern, seed=seed))
                ranks.append(result.ranks.assign(pattern=pattern, seed=seed))
                models[pattern, seed] = result.model
    return Comparison(pd.DataFrame(summaries), pd.concat(histories, ignore_index=True),
                      pd.concat(ranks, ignore_index=True), models)


def _timed_steps(model, x, y, task, steps, autocast) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        with autocast():
            loss = _loss(model(x), y, task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    return times


def step_speed(model_name: str, data: TaskData, patterns=("dense", "pixelfly"), *, size="tiny", budget=0.25,
               block_size=16, batch_size=32, device="cpu", steps=10, warmup=3, rounds=3, **model_options):
    """Median time of one AdamW training step per pattern, measured interleaved.

    The models are built once; then ``rounds`` times, each pattern runs ``warmup`` untimed and
    ``steps`` timed steps on the same batch, so that drifts of the machine's speed hit every
    pattern alike. bf16 autocast on CUDA.

    Returns:
        DataFrame with pattern, params, step_time (median seconds), speedup (dense's time / this).
    """
    device = torch.device(device)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    x, y = data.x_train[:batch_size].to(device), data.y_train[:batch_size].to(device)
    models = {p: build_model(model_name, data, size=size, pattern=p, budget=1.0 if p == "dense" else budget,
                             block_size=block_size, **model_options).to(device) for p in patterns}
    times = {p: [] for p in patterns}
    for _ in range(rounds):
        for pattern, model in models.items():
            _timed_steps(model, x, y, data.task, warmup, autocast)
            times[pattern] += _timed_steps(model, x, y, data.task, steps, autocast)
    rows = [{"pattern": p, "params": count_params(models[p]), "step_time": statistics.median(t)}
            for p, t in times.items()]
    frame = pd.DataFrame(rows)
    if "dense" in times:
        frame["speedup"] = statistics.median(times["dense"]) / frame["step_time"]
    return frame


# ---------------------------------------------------------------- figures


def plot_curves(history: pd.DataFrame, metric: str, title: str, ax_loss=None, ax_metric=None):
    """Training loss per step and ``metric`` at each evaluation, one line per pattern (mean over seeds)."""
    import matplotlib.pyplot as plt

    if ax_loss is None or ax_metric is None:
        _, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = history[history.event == "step"].groupby(["pattern", "step"], sort=False).train_loss.mean()
    evals = history[history.event == "eval"].groupby(["pattern", "step"], sort=False)[metric].mean()
    for pattern in history.pattern.unique():
        curve = steps[pattern]
        smooth = curve.rolling(max(1, len(curve) // 50), min_periods=1).mean()
        ax_loss.plot(smooth.index, smooth.values, label=pattern)
        ax_metric.plot(evals[pattern].index, evals[pattern].values, marker="o", ms=3, label=pattern)
    ax_loss.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log", title=f"{title}: training loss")
    ax_metric.set(xlabel="step", ylabel=metric.replace("_", " "), title=f"{title}: {metric.replace('_', ' ')}")
    ax_metric.legend(fontsize=8)
    return ax_loss.figure


def plot_parity(summary: pd.DataFrame, metric: str, title: str, ax=None):
    """Final ``metric`` per pattern (mean and spread over seeds), dense's level as a line."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    stats = summary.groupby("pattern", sort=False)[metric].agg(["mean", "min", "max"])
    density = summary.groupby("pattern", sort=False)["density"].mean()
    ax.bar(range(len(stats)), stats["mean"], yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
           color=["0.5" if p == "dense" else "C0" for p in stats.index], capsize=3)
    ax.set_xticks(range(len(stats)), [f"{p}\n{density[p]:.2f}" for p in stats.index], fontsize=8)
    if "dense" in stats.index:
        ax.axhline(stats.loc["dense", "mean"], color="k", lw=0.8, ls="--", label="dense")
        ax.legend(fontsize=8)
    low, high = stats["min"].min(), stats["max"].max()
    ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    ax.set(xlabel="pattern (model density)", ylabel=metric.replace("_", " "), title=title)
    return ax.figure


def plot_ranks(ranks: pd.DataFrame, layer: str, spectra: dict, title: str):
    """Effective rank of ``layer`` per epoch for each pattern, and its final singular-value spectra."""
    import matplotlib.pyplot as plt

    from .rank import plot_spectra

    fig, (ax_rank, ax_spec) = plt.subplots(1, 2, figsize=(10, 3.6))
    chosen = ranks[ranks.layer == layer].groupby(["pattern", "epoch"], sort=False).effective_rank.mean()
    for pattern in ranks.pattern.unique():
        ax_rank.plot(chosen[pattern].index + 1, chosen[pattern].values, marker="o", ms=3, label=pattern)
    ax_rank.set(xlabel="epoch", ylabel="effective rank", title=f"{title}: effective rank of {layer}")
    ax_rank.legend(fontsize=8)
    plot_spectra(spectra, ax=ax_spec, title=f"{title}: final spectra of {layer}")
    return fig


def plot_step_times(frames: dict, title: str = "Time per training step"):
    """Median step time per pattern, one panel per model: {model label: DataFrame(pattern, step_time)}."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(frames), figsize=(5 * len(frames), 3.6), squeeze=False)
    for ax, (label, frame) in zip(axes[0], frames.items()):
        ax.bar(frame.pattern, 1e3 * frame.step_time, color=["0.5" if p == "dense" else "C0" for p in frame.pattern])
        ax.set(xlabel="pattern", ylabel="median step time (ms)", title=f"{title}: {label}")
        ax.tick_params(axis="x", labelsize=8)
    return fig


# ---------------------------------------------------------------- the experiment


def _digits_study(out: Path, quick: bool, device: str) -> tuple[list[Claim], pd.DataFrame]:
    seeds = (0, 1) if quick else (0, 1, 2)  # the seed also draws the train/test split
    patterns = QUICK_DIGITS_PATTERNS if quick else DIGITS_PATTERNS
    runs = compare_patterns(patterns, seeds, model="mlp", data="digits", size="tiny", budget=0.25, block_size=16,
                            epochs=10 if quick else 40, batch_size=64, lr=3e-3, device=device, progress=False)
    summary, history, ranks = runs.summary, runs.history, runs.ranks
    save_table(summary, out, "digits_parity")
    save_table(ranks, out, "digits_ranks")
    save_figure(plot_curves(history, "test_accuracy", "digits MLP"), out, "digits_curves")
    parity_png = save_figure(plot_parity(summary, "test_accuracy", "digits MLP, budget 0.25"), out, "digits_parity")
    acc = summary.groupby("pattern").test_accuracy.mean()
    gap = 100 * (acc["dense"] - acc["pixelfly"])
    claims = [Claim(
        "Pixelfly paper (Sec. 5): Pixelfly models reach the dense model's accuracy with a fraction of the "
        "parameters -- here a digits MLP at budget 0.25 is within 2 points of dense test accuracy in the same epochs",
        f"test accuracy over {len(seeds)} seed(s): dense {100 * acc['dense']:.1f}%, pixelfly "
        f"{100 * acc['pixelfly']:.1f}% (gap {gap:+.1f} points); "
        + ", ".join(f"{p} {100 * acc[p]:.1f}%" for p in patterns[2:]), bool(gap <= 2.0), parity_png)]
    # Rank: the 256x256 hidden layer's trained weight, first seed, every pattern.
    layer = "layers.1"
    spectra = {p: singular_values(layer_weights(runs.models[p, 0], (layer,))[layer]) for p in ("dense", "pixelfly",
                                                                                               "lowrank")}
    save_table(pd.DataFrame({p: s.numpy() for p, s in spectra.items()}), out, "digits_spectra")
    rank_png = save_figure(plot_ranks(ranks, layer, spectra, "digits MLP"), out, "digits_rank")
    last = ranks[(ranks.layer == layer) & (ranks.epoch == ranks.epoch.max())].groupby("pattern").effective_rank.mean()
    claims.append(Claim(
        "Pixelfly paper (Sec. 3-4): sparse + low-rank keeps the weight full-rank where a low-rank factorisation "
        "of the same budget cannot exceed its rank",
        f"effective rank of the trained 256x256 hidden weight: " + ", ".join(f"{p} {v:.0f}" for p, v in last.items()),
        None, rank_png))
    return claims, summary


def _chars_study(out: Path, quick: bool, device: str) -> tuple[list[Claim], pd.DataFrame]:
    # quick: 150 steps of a 2-block GPT on 32-character windows; full: 5 epochs of the 4-block one
    runs = compare_patterns(
        GPT_PATTERNS[:2] if quick else GPT_PATTERNS, (0,), model="gpt", data="chars",
        size="tiny" if quick else "small", budget=0.25, block_size=16, context=32 if quick else 64,
        epochs=1 if quick else 5, batch_size=32, lr=3e-3, max_train=4800 if quick else None,
        max_test=256 if quick else None, eval_every=25 if quick else 200, device=device, progress=False)
    summary, history = runs.summary, runs.history
    save_table(summary, out, "chars_parity")
    curves_png = save_figure(plot_curves(history, "val_loss", "character GPT"), out, "chars_curves")
    loss = summary.groupby("pattern").val_loss.mean()
    ratio = loss["pixelfly"] / loss["dense"]
    return [Claim(
        "Pixelfly paper (Sec. 5, GPT-2 on WikiText-103): the Pixelfly GPT matches the dense model's quality -- "
        "here a character GPT on Shakespeare reaches a validation loss within 5% of dense",
        "validation loss: " + ", ".join(f"{p} {v:.3f}" for p, v in loss.items())
        + f"; pixelfly / dense = {ratio:.3f} ({100 * (ratio - 1):+.1f}%)",
        bool(ratio <= 1.05), curves_png)], summary


def speed_claims(out: Path, device: str = "cuda", *, size: str = "gpt2-small", vocab: int = 50304,
                 context: int = 1024, image: int = 224, patch: int = 16, batches=(16, 64), block_size: int = 32,
                 budget: float = 0.25) -> list[Claim]:
    """Training-step time of a GPT-2-small-shaped GPT and a Mixer-B/16-shaped Mixer, dense against Pixelfly.

    The defaults are the paper's shapes (GPT-2 small: 12 blocks of width 768, 1024 tokens,
    vocabulary 50304; Mixer-B/16: 12 blocks of width 768 on 224x224 images in 16x16 patches),
    on synthetic batches; block 32 fits GPU tiles. Smaller arguments run the same code on a CPU.

    Returns:
        one Claim (held when both speedups reach 2.5x); writes gpu_step_time.csv/.png/.pdf.
    """
    n_gpt, n_mixer = batches
    tokens = torch.randint(vocab, (n_gpt, context))
    gpt_data = TaskData("synthetic", "lm", "tokens", tokens, tokens.roll(-1, dims=1), tokens[:1], tokens[:1],
                        n_outputs=vocab, vocab_size=vocab)
    images = torch.randn(n_mixer, 3, image, image)
    labels = torch.randint(1000, (n_mixer,))
    mixer_data = TaskData("synthetic", "classification", "image", images, labels, images[:1], labels[:1],
                          n_outputs=1000)
    common = dict(size=size, budget=budget, block_size=block_size, device=device)
    frames = {f"GPT ({size}, batch {n_gpt} x {context})": step_speed("gpt", gpt_data, batch_size=n_gpt, **common),
              f"Mixer ({size}, batch {n_mixer}, {image}px / {patch})": step_speed(
                  "mixer", mixer_data, batch_size=n_mixer, patch=patch, **common)}
    table = pd.concat([f.assign(model=label) for label, f in frames.items()], ignore_index=True)
    save_table(table, out, "gpu_step_time")
    png = save_figure(plot_step_times(frames, f"Step time ({device})"), out, "gpu_step_time")
    speedups = {label: float(f.set_index("pattern").speedup["pixelfly"]) for label, f in frames.items()}
    return [Claim("Pixelfly paper (abstract, Table 2-4): training GPT-2 small and MLP-Mixer is 2.3-2.5x faster than "
                  f"dense at the paper's budgets -- here at least 2.5x per training step at budget {budget}",
                  ", ".join(f"{k}: {v:.2f}x" for k, v in speedups.items()),
                  bool(min(speedups.values()) >= 2.5), png)]


def run_training_study(out: Path, *, quick: bool, device: str) -> list[Claim]:
    """The 'training' experiment of ``python -m pixelfly_lab reproduce`` (see the module docstring)."""
    with num_threads(1 if quick and device == "cpu" else None):  # tiny models: see pixelfly_lab.threads
        return _run_training_study(Path(out), quick, device)


def _run_training_study(out: Path, quick: bool, device: str) -> list[Claim]:
    claims, digits = _digits_study(out, quick, device)
    chars_claims, chars = _chars_study(out, quick, device)
    claims += chars_claims
    # Step time measured interleaved on the same batch (the runs' own step times drift with the machine's load).
    timing = dict(steps=5, rounds=2) if quick else dict(steps=20, rounds=3)
    frames = {"digits MLP": step_speed("mlp", load_data("digits"), list(digits.pattern.unique()), budget=0.25,
                                       batch_size=64, device=device, **timing),
              "character GPT": step_speed("gpt", load_data("chars", context=32 if quick else 64),
                                          list(chars.pattern.unique()), size="tiny" if quick else "small",
                                          budget=0.25, batch_size=32, device=device, **timing)}
    png = save_figure(plot_step_times(frames, f"Time per step ({device})"), out, "step_time")
    save_table(pd.concat([f.assign(model=k) for k, f in frames.items()], ignore_index=True), out, "step_time")
    described = "; ".join(f"{k}: " + ", ".join(f"{p} {1e3 * t:.1f} ms" for p, t in zip(f.pattern, f.step_time))
                          for k, f in frames.items())
    claims.append(Claim("Time per training step, dense against sparse, at these small sizes (the paper's speedups "
                        "need GPU-sized matmuls; tiny CPU models are bound by overheads)", described, None, png))
    if device == "cuda" and not quick:
        claims += speed_claims(out, device)
    return claims
