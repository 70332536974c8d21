"""The training lab's comparisons: one config trained under several patterns, step times, figures.

:func:`compare_patterns` trains the same :class:`~pixelfly_lab.training.loop.TrainConfig` once per
(pattern, seed); :func:`step_speed` times training steps of dense and sparse models interleaved;
the ``plot_*`` functions draw convergence, parity, rank and step time. The paper's training claims
(Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 5: Pixelfly reaches dense accuracy with a
fraction of the parameters, 2.3-2.5x faster on GPUs) are checked by the study that composes these.

:mod:`pixelfly_lab.studies.training` composes these into the ``reproduce`` study 'training'.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pixelfly_lab.training.data import TaskData
from pixelfly_lab.training.models import build_model, count_params
from pixelfly_lab.training.loop import TrainConfig, task_loss, train
from pixelfly_lab.speed.timer import time_training_steps
from pixelfly_lab.training.rank import plot_spectra

__all__ = ["PATTERN_VARIANTS", "pattern_options", "Comparison", "compare_patterns", "step_speed", "plot_curves",
           "plot_parity", "plot_ranks", "plot_step_times"]


# Studied variants of a pattern, by label: (pattern name, build_model options). 'pixelfly-gated'
# is Pixelfly as the authors released it (a sigmoid-gated mix of the butterfly and low-rank parts,
# kaiming-initialised low-rank factors); plain 'pixelfly' is the library's default layer (the
# ungated sum, low-rank factors initialised from an SVD).
PATTERN_VARIANTS = {"pixelfly-gated": ("pixelfly", {"gating": True, "lowrank_init": "kaiming"})}


def pattern_options(label: str) -> tuple[str, dict]:
    """The pattern name and the extra ``build_model`` options of a pattern name or a variant label.

    Example:
        >>> pattern_options("pixelfly-gated")
        ('pixelfly', {'gating': True, 'lowrank_init': 'kaiming'})
        >>> pattern_options("lowrank")
        ('lowrank', {})
    """
    if not isinstance(label, str):
        raise TypeError(f"a pattern must be a name (str), got {type(label).__name__}")
    pattern, options = PATTERN_VARIANTS.get(label, (label, {}))
    return pattern, dict(options)


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
        patterns: pattern names (see :data:`pixelfly_lab.structure.patterns.PATTERN_NAMES`) or labels of
            :data:`PATTERN_VARIANTS` (e.g. 'pixelfly-gated'); the results are labelled by these.
        seeds: seeds per pattern.
        workdir: where the runs' folders go (default: a temporary folder, deleted after).
        **config: :class:`pixelfly_lab.training.loop.TrainConfig` fields shared by all runs.

    Returns:
        :class:`Comparison`.

    Example:
        >>> c = compare_patterns(["dense", "pixelfly"], model="mlp", data="digits", budget=0.25, epochs=2,
        ...                      progress=False)  # doctest: +SKIP
        >>> c.summary[["pattern", "test_accuracy", "density"]]  # doctest: +SKIP
    """
    summaries, histories, ranks, models = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        for pattern in patterns:
            for seed in seeds:
                out = root / f"{config.get('model', 'model')}-{pattern}-seed{seed}"
                name, options = pattern_options(pattern)
                options = {**config.get("model_options", {}), **options}
                run = {**config, "pattern": name, "model_options": options, "seed": seed, "out": str(out)}
                if options.get("gating"):  # a gated layer has no weight matrix (its mix depends on x): no ranks
                    run["track_rank"] = False
                result = train(TrainConfig(**run))
                keep = {k: v for k, v in result.summary.items() if not isinstance(v, (dict, list))}
                summaries.append({"pattern": pattern, "seed": seed, **keep})
                histories.append(result.history.assign(pattern=pattern, seed=seed))
                ranks.append(result.ranks.assign(pattern=pattern, seed=seed))
                models[pattern, seed] = result.model
    return Comparison(pd.DataFrame(summaries), pd.concat(histories, ignore_index=True),
                      pd.concat(ranks, ignore_index=True), models)


def step_speed(model_name: str, data: TaskData, patterns=("dense", "pixelfly"), *, size="tiny", budget=0.25,
               block_size=16, batch_size=32, device="cpu", steps=10, warmup=3, rounds=3, **model_options):
    """Median time of one AdamW training step per pattern, measured interleaved.

    The models are built once, then timed by :func:`pixelfly_lab.speed.timer.time_training_steps`
    (the toolkit's one step timer): ``warmup`` untimed steps each, then ``rounds`` rounds of
    ``steps`` timed steps, patterns interleaved so that drifts of the machine's speed hit every
    pattern alike. bf16 autocast on CUDA; torch's threads as they are.

    Returns:
        DataFrame with pattern, params, step_time (median seconds), speedup (dense's time / this).
    """
    device = torch.device(device)
    x, y = data.x_train[:batch_size].to(device), data.y_train[:batch_size].to(device)
    models = {}
    for label in patterns:
        pattern, options = pattern_options(label)
        models[label] = build_model(model_name, data, size=size, pattern=pattern,
                                    budget=1.0 if pattern == "dense" else budget, block_size=block_size,
                                    **{**model_options, **options}).to(device)
    table = time_training_steps(models, x, y, loss_fn=lambda output, target: task_loss(output, target, data.task),
                                steps=steps, warmup=warmup, rounds=rounds, threads=None,
                                autocast=torch.bfloat16 if device.type == "cuda" else None)
    frame = pd.DataFrame({"pattern": table["model"], "params": [count_params(models[p]) for p in models],
                          "step_time": table["step_ms"] / 1e3})
    if "dense" in models:
        frame["speedup"] = float(frame.loc[frame.pattern == "dense", "step_time"].iloc[0]) / frame["step_time"]
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

