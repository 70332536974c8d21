"""Study 'training': parity of Pixelfly with dense training, rank of the weights, time per step.

Composes :func:`pixelfly_lab.training_study.compare_patterns` and
:func:`~pixelfly_lab.training_study.step_speed`. What the paper claims (Dao, Chen et al.,
ICLR 2022, arXiv 2112.00029, Sec. 5): sparse models with the Pixelfly pattern reach the dense
models' quality with a fraction of the parameters, and train faster on GPUs. At laptop scale,
on tasks where patterns differ (on scikit-learn's digits every pattern reaches ~97% and nothing
can fail), with several seeds (mean +- sd), for Pixelfly ungated (the library's default layer)
and gated (the authors' released layer), each task states two pass rules before measuring:

* parity: Pixelfly's mean is within the task's margin of dense's (MNIST-1D MLP and ListOps
  transformer: 2 accuracy points; character GPT: validation loss within 5% of dense's);
* best at its budget: Pixelfly's mean is at least the best other sparse pattern's mean minus
  the larger of the two sds over seeds (for a loss: at most the best plus that sd).

Also: the rank of trained weights (Pixelfly's are full rank; low-rank's are not), time per step
at these sizes (a reading), and on a CUDA GPU the talk's per-model speedups (Mixer-B/16 2.3x,
ViT-B/16 2.0x, GPT-2 small 2.1x, GPT-2 medium 2.5x); on a CPU that claim reports "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..data import TaskData, load_data
from ..rank import layer_weights, singular_values
from ..threads import num_threads
from ..training_study import compare_patterns, plot_curves, plot_parity, plot_ranks, plot_step_times, step_speed
from .claims import Claim, save_figure, save_table

__all__ = ["TaskSpec", "TrainingConfig", "FULL", "QUICK", "TINY", "run", "parity_claims", "SpeedModel", "GPU_SPEEDUPS",
           "speed_claims", "unmeasured_speed_claims"]

PIXELFLY = ("pixelfly", "pixelfly-gated")
ALL_PATTERNS = ("dense", "pixelfly", "pixelfly-gated", "lowrank", "butterfly", "random", "monarch")


@dataclass(frozen=True)
class TaskSpec:
    """One task of the parity comparison.

    Attributes:
        label: its name in figures and claims.
        model, data: :class:`pixelfly_lab.train.TrainConfig`'s model and data.
        metric: the summary column compared ('test_accuracy' or 'val_loss').
        margin: parity margin: accuracy points (accuracy) or a relative excess (loss: 0.05 = 5%).
        patterns, seeds: what is trained.
        train: other TrainConfig fields (epochs, sizes, block size, ...).
    """

    label: str
    model: str
    data: str
    metric: str
    margin: float
    patterns: tuple = ALL_PATTERNS
    seeds: tuple = (0, 1, 2)
    train: dict = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "val_loss"


# block 8 on the tiny presets: at block 16 a 64x256 layer has a 4x16 block grid on which Pixelfly
# at budget 0.25 has no rank left and is the butterfly layout
_COMMON = dict(size="tiny", budget=0.25, block_size=8, lr=3e-3, track_rank=True)
MNIST1D = TaskSpec("MNIST-1D MLP", "mlp", "mnist1d", "test_accuracy", 2.0,
                   train=dict(_COMMON, epochs=30, batch_size=64))
# ~15 s an epoch per run (4000 examples, one CPU thread): 21 runs of 10 epochs, about an hour of the full run
LISTOPS = TaskSpec("ListOps transformer", "vit", "listops", "test_accuracy", 2.0,
                   train=dict(_COMMON, epochs=10, batch_size=64, data_options={"max_len": 64}))
CHARS = TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.05,
                 train=dict(_COMMON, context=64, size="small", epochs=3, batch_size=32, max_test=2048,
                            eval_every=200))


@dataclass(frozen=True)
class TrainingConfig:
    """Sizes of the 'training' study."""

    tasks: tuple = (MNIST1D, LISTOPS, CHARS)
    rank_task: int = 0                           # the task whose ranks and spectra are shown
    timing_steps: int = 20                       # timed steps per pattern and round (step time figure)
    timing_rounds: int = 3
    gpu_speed: bool = True                       # on CUDA: the talk's models' step times


FULL = TrainingConfig()
# About two minutes on a 2-core CPU: MNIST-1D (2000 examples, 15 epochs) and 75 steps of a tiny
# GPT, 3 seeds each; ListOps (tens of seconds per run) in the full run only.
QUICK = TrainingConfig(
    tasks=(
        TaskSpec("MNIST-1D MLP", "mlp", "mnist1d", "test_accuracy", 2.0,
                 patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank", "butterfly"),
                 train=dict(_COMMON, epochs=15, batch_size=64, data_options={"n_train": 2000})),
        TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.05,
                 patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank"),
                 train=dict(_COMMON, context=32, epochs=1, batch_size=32, max_train=2400, max_test=256,
                            eval_every=25))),
    timing_steps=5, timing_rounds=2, gpu_speed=False)
TINY = TrainingConfig(
    tasks=(TaskSpec("MNIST-1D MLP", "mlp", "mnist1d", "test_accuracy", 2.0,
                    patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank"), seeds=(0, 1),
                    train=dict(_COMMON, epochs=1, batch_size=32, data_options={"n_train": 128, "n_test": 64})),
           TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.05, patterns=("dense", "pixelfly"),
                    seeds=(0,), train=dict(_COMMON, context=16, epochs=1, batch_size=16, max_train=32,
                                           max_test=16, eval_every=2))),
    timing_steps=1, timing_rounds=1, gpu_speed=False)


def _describe(value: float, task: TaskSpec) -> str:
    return f"{100 * value:.1f}%" if task.higher_is_better else f"{value:.3f}"


def parity_claims(task: TaskSpec, summary: pd.DataFrame, png: str, csv: str) -> list[Claim]:
    """The two pass rules of the module docstring, for each Pixelfly variant in ``summary``."""
    stats = summary.groupby("pattern", sort=False)[task.metric].agg(["mean", "std"])
    stats["std"] = stats["std"].fillna(0.0)
    n_seeds = summary.seed.nunique()
    table = ", ".join(f"{p} {_describe(r['mean'], task)}+-{_describe(r['std'], task)}" for p, r in stats.iterrows())
    setup = f"{task.label}, {n_seeds} seed(s), mean +- sd: {table}"
    sign = 1.0 if task.higher_is_better else -1.0  # compare "goodness" = sign * metric
    claims = []
    for variant in (v for v in PIXELFLY if v in stats.index):
        ours = stats.loc[variant]
        if "dense" in stats.index:
            dense = stats.loc["dense"]
            if task.higher_is_better:  # accuracy: a margin in points
                gap = 100 * (dense["mean"] - ours["mean"])
                held, rule = gap <= task.margin, f"within {task.margin:g} points of dense's"
                measured = f"gap to dense {gap:+.1f} points"
            else:  # a loss: a relative margin
                excess = ours["mean"] / dense["mean"] - 1
                held, rule = excess <= task.margin, f"at most {100 * task.margin:g}% above dense's"
                measured = f"{variant} / dense = {1 + excess:.3f}"
            claims.append(Claim(
                f"Pixelfly paper (Sec. 5, Tables 1-4): Pixelfly models match the dense model's quality with a fraction "
                f"of the parameters -- {task.label}, {variant} at budget {task.train.get('budget', 0.25)} (held when "
                f"its mean {task.metric.replace('_', ' ')} over seeds is {rule})",
                f"{measured}; {setup}", bool(held), png, kind="paper", table=csv))
        others = stats[~stats.index.isin(PIXELFLY + ("dense",))]
        if len(others):
            best_name = (sign * others["mean"]).idxmax()
            best = others.loc[best_name]
            slack = max(best["std"], ours["std"])
            held = sign * ours["mean"] >= sign * best["mean"] - slack if n_seeds >= 2 else None
            claims.append(Claim(
                f"Pixelfly paper (Sec. 5): Pixelfly is the pattern to use at a given budget -- {task.label}, {variant} "
                f"(held when its mean is at least as good as the best other sparse pattern's minus the larger sd over "
                f"seeds of the two; undecided with one seed)",
                f"best other: {best_name} {_describe(best['mean'], task)}; {variant} {_describe(ours['mean'], task)}; "
                f"slack {_describe(slack, task)}; {setup}", held, png, kind="paper", table=csv))
    return claims


def _task_study(out: Path, task: TaskSpec, index: int, device: str):
    runs = compare_patterns(task.patterns, task.seeds, model=task.model, data=task.data, device=device,
                            progress=False, **task.train)
    name = f"task{index}_{task.data}"
    csv = save_table(runs.summary, out, f"{name}_parity")
    save_table(runs.ranks, out, f"{name}_ranks")
    save_figure(plot_curves(runs.history, task.metric, task.label), out, f"{name}_curves")
    png = save_figure(plot_parity(runs.summary, task.metric, f"{task.label}, budget {task.train.get('budget', 0.25)}"),
                      out, f"{name}_parity")
    return parity_claims(task, runs.summary, png, csv), runs


def _rank_claim(out: Path, task: TaskSpec, runs) -> list[Claim]:
    """Rank of the first sparsified layer's trained weight (first seed), per pattern with a dense weight."""
    ranks = runs.ranks
    if not len(ranks):
        return []
    layer = ranks.layer.iloc[0]
    seed = task.seeds[0]
    spectra = {}
    for p in ("dense", "pixelfly", "lowrank"):
        if (p, seed) in runs.models:
            spectra[p] = singular_values(layer_weights(runs.models[p, seed], (layer,))[layer])
    save_table(pd.DataFrame({p: s.numpy() for p, s in spectra.items()}), out, "rank_spectra")
    png = save_figure(plot_ranks(ranks, layer, spectra, task.label), out, "rank")
    last = ranks[(ranks.layer == layer) & (ranks.epoch == ranks.epoch.max())].groupby("pattern").effective_rank.mean()
    return [Claim(
        "Pixelfly paper (Sec. 3-4): sparse + low-rank keeps the weight full-rank where a low-rank factorisation of "
        "the same budget cannot exceed its rank",
        f"effective rank of the trained {layer} weight ({task.label}): "
        + ", ".join(f"{p} {v:.0f}" for p, v in last.items()), None, png, kind="info")]


@dataclass(frozen=True)
class SpeedModel:
    """A model of the talk's speed table, at its shape, on synthetic batches.

    Attributes:
        label: the talk's name; family: 'mixer', 'vit' or 'gpt'; threshold: the talk's speedup.
        dims: ModelSize fields (dim, depth, heads); batch: examples per step.
        context, vocab: GPT's tokens per example and vocabulary (GPT-2's 50257 padded to 50304).
        image, patch: Mixer/ViT image edge and patch edge.
    """

    label: str
    family: str
    threshold: float
    dims: dict
    batch: int
    context: int = 1024
    vocab: int = 50304
    image: int = 224
    patch: int = 16


_BASE = {"dim": 768, "depth": 12, "heads": 12}
# The authors' talk (Pixelated Butterfly, ICLR 2022): end-to-end training speedups over dense.
GPU_SPEEDUPS = (SpeedModel("Mixer-B/16", "mixer", 2.3, _BASE, 64),
                SpeedModel("ViT-B/16", "vit", 2.0, _BASE, 64),
                SpeedModel("GPT-2 small", "gpt", 2.1, _BASE, 16),
                SpeedModel("GPT-2 medium", "gpt", 2.5, {"dim": 1024, "depth": 24, "heads": 16}, 8))


def _speed_data(spec: SpeedModel) -> TaskData:
    if spec.family == "gpt":
        tokens = torch.randint(spec.vocab, (spec.batch, spec.context))
        return TaskData("synthetic", "lm", "tokens", tokens, tokens.roll(-1, dims=1), tokens[:1], tokens[:1],
                        n_outputs=spec.vocab, vocab_size=spec.vocab)
    images = torch.randn(spec.batch, 3, spec.image, spec.image)
    labels = torch.randint(1000, (spec.batch,))
    return TaskData("synthetic", "classification", "image", images, labels, images[:1], labels[:1], n_outputs=1000)


def _speed_claim_text(spec: SpeedModel, budget: float) -> str:
    return (f"Pixelfly talk / paper (Tables 2-4): training {spec.label} with Pixelfly is {spec.threshold}x faster "
            f"than dense on a GPU (held when a training step at budget {budget} is at least {spec.threshold}x faster "
            f"than dense's, same batch, bf16)")


def speed_claims(out: Path, device: str = "cuda", *, models=GPU_SPEEDUPS, budget: float = 0.25,
                 block_size: int = 32, steps: int = 10, rounds: int = 3) -> list[Claim]:
    """Training-step time of each model of the talk's table, dense against Pixelfly; one claim per model.

    The defaults are the talk's models at their shapes (:data:`GPU_SPEEDUPS`: Mixer-B/16 2.3x,
    ViT-B/16 2.0x, GPT-2 small 2.1x, GPT-2 medium 2.5x) on synthetic batches; block 32 fits GPU
    tiles. Smaller :class:`SpeedModel`\\ s run the same code on a CPU (the tests do).

    Returns:
        one Claim per model (held when its speedup reaches its threshold); writes
        gpu_step_time.csv/.png/.pdf.
    """
    frames, claims = {}, []
    for spec in models:
        frame = step_speed(spec.family, _speed_data(spec), size="gpt2-small", budget=budget, block_size=block_size,
                           batch_size=spec.batch, device=device, steps=steps, rounds=rounds,
                           **({} if spec.family == "gpt" else {"patch": spec.patch}), **spec.dims)
        frames[f"{spec.label} (batch {spec.batch})"] = frame
        speedup = float(frame.set_index("pattern").speedup["pixelfly"])
        claims.append((spec, speedup))
    table = pd.concat([f.assign(model=label) for label, f in frames.items()], ignore_index=True)
    csv = save_table(table, out, "gpu_step_time")
    png = save_figure(plot_step_times(frames, f"Step time ({device})"), out, "gpu_step_time")
    return [Claim(_speed_claim_text(spec, budget), f"{spec.label}: {speedup:.2f}x on {device} (threshold "
                  f"{spec.threshold}x)", bool(speedup >= spec.threshold), png, kind="paper", table=csv)
            for spec, speedup in claims]


def unmeasured_speed_claims(device: str, budget: float = 0.25) -> list[Claim]:
    """The talk's speed claims, undecided: this run has no CUDA device (or the preset skips them)."""
    return [Claim(_speed_claim_text(spec, budget), f"not measured: the run is on {device} (the claim needs a CUDA GPU "
                  "and the full preset)", None, kind="paper") for spec in GPU_SPEEDUPS]


def run(out: Path, config: TrainingConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """The 'training' study (see the module docstring)."""
    out = Path(out)
    claims, frames = [], {}
    with num_threads(1 if device == "cpu" and config != FULL else None):  # tiny models: see pixelfly_lab.threads
        for index, task in enumerate(config.tasks):
            task_claims, runs = _task_study(out, task, index, device)
            claims += task_claims
            if index == config.rank_task:
                claims += _rank_claim(out, task, runs)
            # Step time measured interleaved on the same batch (the runs' own step times drift with the load).
            options = {k: v for k, v in task.train.items() if k in ("size", "budget", "block_size")}
            data = load_data(task.data, **({"context": task.train["context"]} if task.data == "chars" else {}),
                             **task.train.get("data_options", {}))
            frames[task.label] = step_speed(task.model, data, list(task.patterns), batch_size=task.train["batch_size"],
                                            device=device, steps=config.timing_steps, rounds=config.timing_rounds,
                                            **options)
        png = save_figure(plot_step_times(frames, f"Time per step ({device})"), out, "step_time")
        csv = save_table(pd.concat([f.assign(model=k) for k, f in frames.items()], ignore_index=True), out,
                         "step_time")
        described = "; ".join(f"{k}: " + ", ".join(f"{p} {1e3 * t:.1f} ms" for p, t in zip(f.pattern, f.step_time))
                              for k, f in frames.items())
        claims.append(Claim("Time per training step, dense against sparse, at these small sizes (the paper's "
                            "speedups need GPU-sized matmuls; tiny CPU models are bound by overheads)", described,
                            None, png, kind="info", table=csv))
        if device == "cuda" and config.gpu_speed:
            claims += speed_claims(out, device)
        else:
            claims += unmeasured_speed_claims(device)
    return claims
