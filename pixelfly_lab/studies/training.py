"""Study 'training': parity of Pixelfly with dense training, rank of the weights, time per step.

Composes :func:`pixelfly_lab.studies.training_comparison.compare_patterns` and
:func:`~pixelfly_lab.studies.training_comparison.step_speed`. What the paper claims (Dao, Chen et al.,
ICLR 2022, arXiv 2112.00029, Sec. 5): sparse models with the Pixelfly pattern reach the dense
models' quality with a fraction of the parameters, and train faster on GPUs. At laptop scale,
on tasks where patterns differ (on scikit-learn's digits every pattern reaches ~97% and nothing
can fail), with several seeds (mean +- sd; the data's seed is fixed, the seeds vary the
initialisation and the example order). The MLP sparsifies every hidden layer, at budgets 0.25 and
0.1. Both Pixelfly layers are primary, as one Holm-corrected family per claim: the library's
ungated layer and the authors' gated, Kaiming-initialised one. Comparisons are paired by seed
and decided by :func:`pixelfly_lab.studies.stats.paired_decision` (90% t interval of the mean
difference: held beyond the margin on the claim's side, refuted on the other side, otherwise
undecided; the report prints the seeds that would decide an undecided claim). Each task states
its pass rules before measuring:

* parity: not worse than dense by more than the task's margin (MNIST-1D MLP and ListOps
  transformer: 2 accuracy points; character GPT: validation loss at most 1% above dense's);
  decided only when the controls behave: low-rank and random+lowrank at the same budget
  (negative controls) refuted by the same rule, dense against dense of other seeds (positive
  control) not refuted;
* not worse than any other sparse pattern (so than the best of them) by more than half that
  margin, with low-rank through the same rule as a negative control. Patterns whose sparsified
  layers hold more than 5% fewer parameters than the budget are left out of that list (named in
  the measured text; every pattern's share is printed).

A task of kind 'info' (the QUICK character GPT: a few dozen steps, its loss still falling) is a
reading with its step count, not a verdict. Also: the rank of trained weights (Pixelfly's
effective rank far above low-rank's, which cannot exceed its rank), time per step at these sizes
(a reading), and on a CUDA GPU the per-step speed-up at the talk's model shapes against the talk's
end-to-end figures (Mixer-B/16 2.3x, ViT-B/16 2.0x, GPT-2 small 2.1x, GPT-2 medium 2.5x), each
beside its FLOP ceiling (:mod:`pixelfly_lab.studies.training_speed`); on a CPU that claim reports
"not measured".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pixelfly_lab.training.data import load_data
from pixelfly_lab.training.rank import layer_weights, singular_values
from pixelfly_lab.threads import num_threads
from pixelfly_lab.studies.training_comparison import compare_patterns, plot_curves, plot_parity, plot_ranks, plot_step_times, step_speed
from pixelfly_lab.studies.claims import Claim, decision_fields, member, save_figure, save_table
from pixelfly_lab.studies.stats import Decision, every_held, family_verdicts, paired_decision
from pixelfly_lab.studies.training_speed import (GPU_SPEEDUPS, SpeedModel, flop_ceiling, speed_claims,
                                             unmeasured_speed_claims)

__all__ = ["TaskSpec", "TrainingConfig", "FULL", "QUICK", "TINY", "run", "parity_claims", "SpeedModel", "GPU_SPEEDUPS",
           "flop_ceiling",
           "speed_claims", "unmeasured_speed_claims"]

PIXELFLY = "pixelfly"                        # the variant the claims test, chosen before measuring
VARIANTS = ("pixelfly", "pixelfly-gated")    # not "other patterns": the gated layer is Pixelfly too
ALL_PATTERNS = ("dense", "pixelfly", "pixelfly-gated", "lowrank", "random+lowrank", "butterfly", "random", "local",
                "monarch")
UNDER_BUDGET = 0.05  # a pattern whose sparsified layers fall more than this share below the budget is left out
ALPHA = 0.05  # level of each one-sided test (90% t intervals)
NEGATIVE_CONTROLS = ("lowrank", "random+lowrank")  # parity must refute these for the task to tell patterns apart
# "not worse than the best other" by at most this share of the parity margin (1 point of MNIST-1D's 2)
BEST_OTHER_SHARE = 0.5
CONTROL_SEED = 100  # the positive control's dense seeds: task.seeds shifted by this


@dataclass(frozen=True)
class TaskSpec:
    """One task of the parity comparison.

    Attributes:
        label: its name in figures and claims.
        model, data: :class:`pixelfly_lab.training.loop.TrainConfig`'s model and data.
        metric: the summary column compared ('test_accuracy' or 'val_loss').
        margin: parity margin: accuracy points (accuracy) or a relative excess (loss: 0.05 = 5%).
        patterns, seeds: what is trained.
        train: other TrainConfig fields (epochs, sizes, block size, ...).
        kind: 'paper' (verdicts) or 'info' (a reading: a run too short for a verdict).
        positive_control: train dense again with other seeds (the positive control of parity).
    """

    label: str
    model: str
    data: str
    metric: str
    margin: float
    patterns: tuple = ALL_PATTERNS
    seeds: tuple = (0, 1, 2)
    train: dict = field(default_factory=dict)
    kind: str = "paper"
    positive_control: bool = True

    def __post_init__(self):
        if self.kind not in ("paper", "info"):
            raise ValueError(f"kind must be 'paper' or 'info', got {self.kind!r}")

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "val_loss"


# block 8 on the tiny presets: at block 16 a 64x256 layer has a 4x16 block grid on which Pixelfly
# at budget 0.25 has no rank left and is the butterfly layout
_COMMON = dict(size="tiny", budget=0.25, block_size=8, lr=3e-3, track_rank=True)
# The MLP at depth 4: three 256x256 hidden layers, every one sparsified (94% of the parameters; the
# 40-input layer stays dense like a patch embedding). At depth 2 one layer (85%) was sparsified and
# every pattern landed within 0.3 points of the others at budget 0.25: the task told nothing apart.
_MLP = dict(_COMMON, model_options={"depth": 4})
_DATA = {"seed": 0}  # the data's seed, fixed: TaskSpec.seeds vary the initialisation and the example order
# Seeds of the full preset, from a power computation on QUICK's paired sd (studies.stats.seeds_for_power):
# QUICK's MNIST-1D paired differences (pattern - dense, 3 seeds) have sd ~0.6-1 points; deciding a
# 1-point gap against the 2-point parity margin (or a half-point gap against the 1-point best-other
# margin) at 80% power needs 5-8 seeds: FULL trains 8.
FULL_SEEDS = tuple(range(8))
MNIST1D = TaskSpec("MNIST-1D MLP", "mlp", "mnist1d", "test_accuracy", 2.0, seeds=FULL_SEEDS,
                   train=dict(_MLP, epochs=20, batch_size=64, data_options=dict(_DATA, n_test=10_000)))
MNIST1D_SPARSE = replace(MNIST1D, train=dict(MNIST1D.train, budget=0.1))
# ~15 s an epoch per run (4000 examples, one CPU thread): 21 runs of 10 epochs, about an hour of the full run
LISTOPS = TaskSpec("ListOps transformer", "vit", "listops", "test_accuracy", 2.0,
                   train=dict(_COMMON, epochs=10, batch_size=64, data_options=dict(_DATA, max_len=64)))
# margin 1% of the loss: 5% (0.14 nats at 2.7) let every pattern pass
CHARS = TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.01,
                 train=dict(_COMMON, context=64, size="small", epochs=3, batch_size=32, max_test=2048,
                            eval_every=200))


@dataclass(frozen=True)
class TrainingConfig:
    """Sizes of the 'training' study."""

    # ListOps is defined above but not in FULL: dense stays near chance at laptop sizes (QUICK: at
    # chance), so parity there tells nothing, and it cost an hour of the full run
    tasks: tuple = (MNIST1D, MNIST1D_SPARSE, CHARS)
    rank_task: int = 0                           # the task whose ranks and spectra are shown
    timing_steps: int = 20                       # timed steps per pattern and round (step time figure)
    timing_rounds: int = 3
    gpu_speed: bool = True                       # on CUDA: the talk's models' step times


FULL = TrainingConfig()
# estimate: 2 MNIST-1D tasks x (9 patterns + the positive control) x 8 seeds at 4000 examples x 20
# epochs (~8 QUICK runs' time each) and the character GPT's 3 epochs
FULL_MINUTES = 45
# MNIST-1D at budgets 0.25 and 0.1 (2000 training, 10000 test examples, 10 epochs, 3 seeds; at 0.25
# dense again with 3 other seeds as the positive control, at 0.1 the primary layers and the controls
# only) and, as a reading only, 75 steps of a tiny GPT (its loss still falls: no verdict); ListOps in
# no preset (see TrainingConfig). 39 runs of the depth-4 MLP: 12 minutes on a loaded 2-core machine
# (load ~7-11). At 1000 examples x 12 epochs (6 minutes) dense no longer separated from low-rank (the
# controls failed, every verdict undecided), so QUICK keeps 2000 x 10.
_QUICK_MNIST = TaskSpec("MNIST-1D MLP", "mlp", "mnist1d", "test_accuracy", 2.0,
                        patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank", "random+lowrank", "random",
                                  "monarch"),
                        train=dict(_MLP, epochs=10, batch_size=64, data_options=dict(_DATA, n_train=2000,
                                                                                     n_test=10_000)))
QUICK = TrainingConfig(
    tasks=(_QUICK_MNIST,
           replace(_QUICK_MNIST, patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank", "random+lowrank"),
                   positive_control=False, train=dict(_QUICK_MNIST.train, budget=0.1, track_rank=False)),
           TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.01, kind="info",
                    patterns=("dense", "pixelfly", "lowrank"), seeds=(0,),
                    train=dict(_COMMON, context=32, epochs=1, batch_size=32, max_train=2400, max_test=256,
                               eval_every=25))),
    timing_steps=5, timing_rounds=2, gpu_speed=False)
TINY = TrainingConfig(
    tasks=(TaskSpec("MNIST-1D MLP", "mlp", "mnist1d", "test_accuracy", 2.0,
                    patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank", "random"), seeds=(0, 1),
                    train=dict(_COMMON, epochs=1, batch_size=32, data_options=dict(_DATA, n_train=128, n_test=64))),
           TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.01, patterns=("dense", "pixelfly"), kind="info",
                    seeds=(0,), train=dict(_COMMON, context=16, epochs=1, batch_size=16, max_train=32,
                                           max_test=16, eval_every=2))),
    timing_steps=1, timing_rounds=1, gpu_speed=False)


def _describe(value: float, task: TaskSpec) -> str:
    return f"{100 * value:.1f}%" if task.higher_is_better else f"{value:.3f}"


def sparsified_budgets(models: dict) -> dict:
    """{pattern: parameters of its sparsified layers / those layers' dense parameters} (first seed's model)."""
    budgets = {}
    for (pattern, _), model in models.items():
        report = getattr(model, "report", None)
        if pattern in budgets or report is None or not len(report) or not report["replaced"].any():
            continue
        replaced = report[report["replaced"]]
        budgets[pattern] = float(replaced["params_after"].sum() / replaced["params_before"].sum())
    return budgets


def _differences(task: TaskSpec, table: pd.DataFrame, a: str, b: str) -> np.ndarray:
    """Per-seed differences of pattern ``a`` against ``b`` in the margin's units, signed "a better = large".

    Accuracy: 100 (a - b), points. Loss: -(a / b - 1), the relative excess with the sign flipped.
    ``table``: seed x pattern values of ``task.metric``; seeds missing on either side are dropped.
    """
    pair = table[[a, b]].dropna()
    if task.higher_is_better:
        return (100 * (pair[a] - pair[b])).to_numpy()
    return (-(pair[a] / pair[b] - 1)).to_numpy()


def _not_worse(task, table, a, b, margin) -> Decision:
    return paired_decision(_differences(task, table, a, b), margin=-margin, alternative="greater", alpha=ALPHA)


def _margin_text(task: TaskSpec, margin: float) -> str:
    return f"{margin:g} points" if task.higher_is_better else f"{100 * margin:g}%"


def parity_claims(task: TaskSpec, summary: pd.DataFrame, png: str, csv: str, budgets: dict | None = None,
                  control: pd.DataFrame | None = None) -> list[Claim]:
    """The pass rules of the module docstring: parity with dense and not worse than the best other.

    Both are families over the primary Pixelfly layers present (:data:`VARIANTS`: the library's
    ungated layer and the authors' gated one), Holm-corrected
    (:func:`pixelfly_lab.studies.stats.family_verdicts`).

    Args:
        task: the task (its margin, metric and kind).
        summary: one row per run: pattern, seed, ``task.metric`` (and steps, epochs when known).
        png, csv: the figure and table the claims point to.
        budgets: {pattern: its sparsified layers' parameter share} (:func:`sparsified_budgets`);
            patterns more than :data:`UNDER_BUDGET` below ``task.train['budget']`` are left out of
            the "best other" list.
        control: the positive control, dense trained again with other seeds (pattern, seed,
            ``task.metric``), paired with dense's seeds in order; None: no positive control.

    Returns:
        [parity family, best-other family] (kind ``task.kind``; an 'info' task states what the
        rule would say).
    """
    table = summary.pivot_table(index="seed", columns="pattern", values=task.metric)
    stats = summary.groupby("pattern", sort=False)[task.metric].agg(["mean", "std"])
    stats["std"] = stats["std"].fillna(0.0)
    n_seeds = summary.seed.nunique()
    target = task.train.get("budget", 0.25)
    budgets = budgets or {}
    short = [p for p, b in budgets.items() if b < (1 - UNDER_BUDGET) * target]
    listing = ", ".join(f"{p} {_describe(r['mean'], task)}+-{_describe(r['std'], task)}" for p, r in stats.iterrows())
    length = ""
    if "steps" in summary and "epochs" in summary:
        length = f" after {int(summary.steps.max())} steps ({int(summary.epochs.max())} epoch(s))"
    setup = f"{task.label}{length}, budget {target:g}, {n_seeds} seed(s), mean +- sd: {listing}"
    if budgets:
        setup += ("; sparsified layers' parameters / dense's (target " + f"{target:g}): "
                  + ", ".join(f"{p} {b:.3f}" for p, b in budgets.items())
                  + (f"; more than {100 * UNDER_BUDGET:g}% under it, left out of the best-other comparison (parity still compares them): {', '.join(short)}"
                     if short else ""))
    variants = [v for v in VARIANTS if v in table.columns]
    kind = "info" if task.kind == "info" else "paper"
    claims = []
    if not variants:
        return claims
    interval = f"{100 * (1 - 2 * ALPHA):.0f}% t interval"

    # ---- parity with dense: not worse than dense by more than the margin, with its controls
    if "dense" in table.columns:
        decisions = {v: _not_worse(task, table, v, "dense", task.margin) for v in variants}
        verdict, verdicts = family_verdicts(list(decisions.values()), ALPHA)
        decisions = {v: d.shared(len(decisions)) for v, d in decisions.items()}
        notes = []
        negatives = {c: _not_worse(task, table, c, "dense", task.margin) for c in NEGATIVE_CONTROLS
                     if c in table.columns}
        if not negatives:
            notes.append("no negative control (low-rank) trained")
        for c, d in negatives.items():
            notes.append(f"negative control {c} - dense {d.describe(2)}: {d.verdict} (must be refuted)")
        positive = None
        if control is not None and len(control):
            dense, again = table["dense"].dropna().to_numpy(), control.sort_values("seed")[task.metric].to_numpy()
            m = min(len(dense), len(again))
            paired = pd.DataFrame({"again": again[:m], "dense": dense[:m]})
            positive = _not_worse(task, paired, "again", "dense", task.margin)
            notes.append(f"positive control dense (other seeds) - dense {positive.describe(2)}: {positive.verdict} "
                         f"(must not be refuted)")
        if positive is not None and positive.verdict == "refuted":
            verdict = "undecided"
            notes.append("undecided: the positive control failed (dense against dense refuted)")
        elif verdict == "held" and (not negatives or any(d.verdict != "refuted" for d in negatives.values())):
            verdict = "undecided"
            notes.append("undecided: the task does not tell patterns apart (a negative control is not refuted)")
        best = min(decisions.values(), key=lambda d: d.p_held)
        by_controls = verdict == "undecided" and "undecided:" in " ".join(notes)  # more seeds do not fix a task
        claims.append(Claim(
            f"Pixelfly paper (Sec. 5, Tables 1-4): Pixelfly models match the dense model's quality with a fraction of "
            f"the parameters -- {task.label}, budget {target:g}{length}. Family of the primary Pixelfly layers "
            f"({', '.join(variants)}; 'pixelfly-gated' is the authors' gated, Kaiming-initialised layer), "
            f"Holm-corrected. Per member, per seed, its {task.metric.replace('_', ' ')} minus dense's "
            f"({'points' if task.higher_is_better else 'relative excess of the loss, sign flipped'}): held when the "
            f"{interval} of the mean lies above -{_margin_text(task, task.margin)} (not worse than dense by more "
            f"than the margin), refuted when it lies below; decided only when the controls behave: low-rank at the "
            f"same budget (negative control) refuted by the same rule, dense against dense of other seeds (positive "
            f"control) not refuted; otherwise undecided",
            f"verdict: {verdict}; " + "; ".join(f"{v} - dense {decisions[v].describe(2)}: {mv}" for v, mv in
                                               zip(variants, verdicts)) + "; " + "; ".join(notes) + f"; {setup}",
            **{**_fields(replace(best, verdict=verdict), kind), **({"seeds_to_decide": None} if by_controls else {})},
            figure=png, kind=kind, table=csv,
            members=[member(v, decisions[v], mv) for v, mv in zip(variants, verdicts)]))

    # ---- not worse than every other sparse pattern (so than the best of them)
    others = [p for p in summary.pattern.unique() if p not in VARIANTS + ("dense",) and p not in short]
    if others:
        margin = BEST_OTHER_SHARE * task.margin
        wholes, criticals = {}, {}
        for v in variants:
            criticals[v], wholes[v] = every_held({o: _not_worse(task, table, v, o, margin) for o in others})
        verdict, verdicts = family_verdicts(list(wholes.values()), ALPHA)
        wholes = {v: d.shared(len(wholes)) for v, d in wholes.items()}
        notes = []
        rivals = [o for o in others if o != "lowrank"]
        if "lowrank" in table.columns and rivals:
            _, lowrank = every_held({o: _not_worse(task, table, "lowrank", o, margin) for o in rivals})
            notes.append(f"control: low-rank by the same rule against {{{', '.join(rivals)}}}: {lowrank.verdict} "
                         "(must not be held)")
            if lowrank.verdict == "held" and verdict == "held":
                verdict = "undecided"
                notes.append("undecided: low-rank passes the same rule, the task does not tell patterns apart")
        else:
            notes.append("no low-rank control")
            verdict = "undecided" if verdict == "held" else verdict
        best = min(wholes.values(), key=lambda d: d.p_held)
        claims.append(Claim(
            f"Pixelfly paper (Sec. 5): Pixelfly is the pattern to use at a given budget -- {task.label}, budget "
            f"{target:g}{length}: not worse than any of {{{', '.join(others)}}} (so not worse than the best of them) "
            f"by more than {_margin_text(task, margin)}. Family of the primary Pixelfly layers ({', '.join(variants)}), "
            f"Holm-corrected; per member, paired by seed against each other pattern, held when every {interval} of "
            f"the mean difference lies above -{_margin_text(task, margin)} (intersection-union), refuted when Holm "
            f"across the others puts one below it; undecided when low-rank passes the same rule (negative control), "
            f"e.g. with one seed",
            f"verdict: {verdict}; " + "; ".join(
                f"{v}: {mv} (critical: {criticals[v]}, {v} - {criticals[v]} {wholes[v].describe(2)})"
                for v, mv in zip(variants, verdicts)) + "; " + "; ".join(notes) + f"; {setup}",
            **_fields(replace(best, verdict=verdict), kind), figure=png, kind=kind, table=csv,
            members=[member(f"{v} (critical: {criticals[v]})", wholes[v], mv) for v, mv in zip(variants, verdicts)]))
    return claims


def _fields(decision: Decision, kind: str) -> dict:
    """decision_fields, with no verdict for a reading."""
    fields = decision_fields(decision)
    return {**fields, "held": None} if kind == "info" else fields


def _task_study(out: Path, task: TaskSpec, index: int, device: str):
    runs = compare_patterns(task.patterns, task.seeds, model=task.model, data=task.data, device=device,
                            progress=False, **task.train)
    control = None
    if task.positive_control and "dense" in task.patterns and task.kind == "paper":
        control = compare_patterns(("dense",), tuple(CONTROL_SEED + s for s in task.seeds), model=task.model,
                                   data=task.data, device=device, progress=False, **task.train).summary
    name = f"task{index}_{task.data}_b{task.train.get('budget', 0.25):g}"
    csv = save_table(runs.summary, out, f"{name}_parity")
    save_table(runs.ranks, out, f"{name}_ranks")
    save_figure(plot_curves(runs.history, task.metric, task.label), out, f"{name}_curves")
    png = save_figure(plot_parity(runs.summary, task.metric, f"{task.label}, budget {task.train.get('budget', 0.25)}"),
                      out, f"{name}_parity")
    return parity_claims(task, runs.summary, png, csv, sparsified_budgets(runs.models), control), runs


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
        "Pixelfly paper (Sec. 3-4): sparse + low-rank keeps the weight's effective rank far above low-rank's, "
        "which cannot exceed the rank of a factorisation of the same budget",
        f"effective rank of the trained {layer} weight ({task.label}): "
        + ", ".join(f"{p} {v:.0f}" for p, v in last.items()), None, png, kind="info")]


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
            options.update(task.train.get("model_options", {}))
            data = load_data(task.data, **({"context": task.train["context"]} if task.data == "chars" else {}),
                             **task.train.get("data_options", {}))
            frames[f"{task.label}, budget {task.train.get('budget', 0.25):g}"] = step_speed(task.model, data, list(task.patterns), batch_size=task.train["batch_size"],
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
