"""Study 'training': parity of Pixelfly with dense training, which pattern to use, rank of the weights, time per step.

Composes :func:`pixelfly_lab.studies.training_comparison.compare_patterns` and
:func:`~pixelfly_lab.studies.training_comparison.step_speed`; the pass rules are in
:mod:`pixelfly_lab.studies.training_rules`. What the paper claims (Dao, Chen et al., ICLR 2022,
arXiv 2112.00029, Sec. 5): sparse models with the Pixelfly pattern reach the dense models' quality
with a fraction of the parameters, and train faster on GPUs. At laptop scale, on tasks where
patterns differ (on scikit-learn's digits every pattern reaches ~97% and nothing can fail), with
several seeds (the data's seed is fixed, the seeds vary the initialisation and the example order):

* MNIST-1D, an MLP with every hidden layer sparsified, at budgets 0.25 and 0.1: parity with dense
  (one family over both budgets and both primary Pixelfly layers, the library's ungated one and the
  authors' gated, Kaiming-initialised one; controls and a convergence gate) and "Pixelfly is the
  pattern to use" (the same rule run for every pattern);
* teacher-student regression (:func:`pixelfly_lab.training.generated.make_teacher_student`): on a
  teacher whose weights have Pixelfly's structure, low-rank and random must fall behind Pixelfly at
  equal budget (kind 'check': the study's rule can separate patterns when the task does); on a
  teacher with unstructured Gaussian weights the same rule is a paper claim that no structure
  favours;
* as a reading, a few dozen steps of a character GPT (its loss still falls: no verdict).

Also: the rank of trained weights (Pixelfly's effective rank far above low-rank's, which cannot
exceed its rank), time per step at these sizes (a reading), and on a CUDA GPU the per-step speed-up
at the talk's model shapes against the talk's end-to-end figures (Mixer-B/16 2.3x, ViT-B/16 2.0x,
GPT-2 small 2.1x, GPT-2 medium 2.5x), each beside its FLOP ceiling
(:mod:`pixelfly_lab.studies.training_speed`); on a CPU that claim reports "not measured".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from pixelfly_lab.training.data import load_data
from pixelfly_lab.training.rank import layer_weights, singular_values
from pixelfly_lab.threads import num_threads
from pixelfly_lab.studies.training_comparison import (Comparison, compare_patterns, plot_curves, plot_parity,
                                                      plot_ranks, plot_step_times, step_speed)
from pixelfly_lab.studies.claims import Claim, save_figure, save_table
from pixelfly_lab.studies.stats import seeds_for_power
from pixelfly_lab.studies.training_rules import (TaskRuns, TaskSpec, parity_claims, sparsified_budgets,
                                                 task_claims)
from pixelfly_lab.studies.training_speed import (GPU_SPEEDUPS, SpeedModel, flop_ceiling, speed_claims,
                                                 unmeasured_speed_claims)

__all__ = ["TaskSpec", "TrainingConfig", "FULL", "QUICK", "TINY", "FULL_MINUTES", "run", "parity_claims",
           "task_claims", "sparsified_budgets", "SpeedModel", "GPU_SPEEDUPS", "flop_ceiling", "speed_claims",
           "unmeasured_speed_claims"]

CONTROL_SEED = 100  # the positive control's dense seeds: task.seeds shifted by this

# block 8 on the tiny presets: at block 16 a 64x256 layer has a 4x16 block grid on which Pixelfly
# at budget 0.25 has no rank left and is the butterfly layout
_COMMON = dict(size="tiny", budget=0.25, block_size=8, lr=3e-3, track_rank=True)
# The MLP at depth 4: three 256x256 hidden layers, every one sparsified (94% of the parameters; the
# 40-input layer stays dense like a patch embedding). At depth 2 one layer (85%) was sparsified and
# every pattern landed within 0.3 points of the others at budget 0.25: the task told nothing apart.
_MLP = dict(_COMMON, model_options={"depth": 4})
_DATA = {"seed": 0}  # the data's seed, fixed: TaskSpec.seeds vary the initialisation and the example order
# MNIST-1D at QUICK and FULL alike: 2000 training and 10000 test examples, 15 epochs (at 10 dense
# still gained 0.68 points over its last epoch, over the convergence gate's 0.5; at 15 it gains 0.15).
# FULL trains the same runs with more patterns and more seeds, so QUICK's sd is FULL's.
_MNIST_TRAIN = dict(_MLP, epochs=15, batch_size=64, data_options=dict(_DATA, n_train=2000, n_test=10_000))
# Seeds of the full preset, from a power computation on the QUICK run's paired differences
# (studies.stats.seeds_for_power, 80% power): QUICK (3 seeds, 15 epochs, 2026-12-06) measured, per
# comparison with dense that decides the parity family, its mean and sd (points) and its test's level
# (the 4 members share 0.05 by Holm; the negative controls test alone); FULL trains the most seeds any
# of them needs to be decided against the 2-point margin (8: low-rank's control at 0.25, sd 3.2).
QUICK_PAIRED = {"pixelfly @0.25": (-5.38, 2.23, 0.05 / 4), "pixelfly-gated @0.25": (-8.66, 0.52, 0.05 / 4),
                "pixelfly @0.1": (-6.93, 0.70, 0.05 / 4), "pixelfly-gated @0.1": (-7.74, 0.83, 0.05 / 4),
                "lowrank @0.25": (-5.33, 3.19, 0.05), "random+lowrank @0.25": (-5.69, 1.70, 0.05),
                "lowrank @0.1": (-7.86, 1.30, 0.05), "random+lowrank @0.1": (-7.43, 1.23, 0.05)}
FULL_SEEDS = tuple(range(max(seeds_for_power(sd, mean, -2.0, alpha=level)
                             for mean, sd, level in QUICK_PAIRED.values())))
MNIST1D = TaskSpec("MNIST-1D MLP", "mlp", "mnist1d", "test_accuracy", 2.0, seeds=FULL_SEEDS, train=_MNIST_TRAIN)
MNIST1D_SPARSE = replace(MNIST1D, train=dict(MNIST1D.train, budget=0.1, track_rank=False))
# ~15 s an epoch per run (4000 examples, one CPU thread): 21 runs of 10 epochs, about an hour of the full run
LISTOPS = TaskSpec("ListOps transformer", "vit", "listops", "test_accuracy", 2.0,
                   train=dict(_COMMON, epochs=10, batch_size=64, data_options=dict(_DATA, max_len=64)))
# margin 1% of the loss: 5% (0.14 nats at 2.7) let every pattern pass. The 'tiny' GPT at context 64,
# 2 epochs (724 steps), the primary layers and the negative controls: at the 'small' size with all
# nine patterns and 3 epochs one step took ~0.8 s (load ~9), 27 runs of 1086 steps: hours, not minutes
CHARS = TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.01,
                 patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank", "random+lowrank"),
                 train=dict(_COMMON, context=64, epochs=2, batch_size=32, max_test=2048, eval_every=200))
# Teacher-student regression (training.generated.make_teacher_student, defaults: width 128, one
# structured layer, 64 outputs, 8000 examples): the student MLP has the teacher's width (dim 32 x
# mlp_ratio 4) and its one hidden layer, the input layer, sparsified (where=layers.*): behind a
# dense input layer no student found the teacher's alignment (Pixelfly 0.337 vs random 0.340 test
# MSE, width 256). Margin 5% of the test MSE (best other: 2.5%). Only the sparse patterns: no parity.
_TEACHER = dict(_COMMON, track_rank=False, epochs=3, batch_size=64, data_options=_DATA,
                model_options={"depth": 1, "dim": 32, "where": ("layers.*",)})
_TEACHER_PATTERNS = ("pixelfly", "pixelfly-gated", "lowrank", "random+lowrank", "random")
TEACHER_PIXELFLY = TaskSpec(
    "teacher-pixelfly student", "mlp", "teacher-pixelfly", "test_mse", 0.05, patterns=_TEACHER_PATTERNS,
    train=_TEACHER, kind="check", parity=False, must_fail=("lowrank", "random"),
    statement="Control of the study (teacher with Pixelfly's structure: flat block butterfly + low-rank hidden "
              "weights): the best-other rule separates patterns where the task does; Pixelfly is not worse than "
              "the best other and low-rank alone and random fall behind it")
TEACHER_DENSE = replace(
    TEACHER_PIXELFLY, label="teacher-dense student", data="teacher-dense", kind="paper", must_fail=(),
    statement="Pixelfly paper (Sec. 5), on a teacher with no structure (Gaussian hidden weights, where no pattern is "
              "favoured by its support): Pixelfly is the pattern to use at a given budget")


@dataclass(frozen=True)
class TrainingConfig:
    """Sizes of the 'training' study."""

    # ListOps is defined above but not in FULL: dense stays near chance at laptop sizes (QUICK: at
    # chance), so parity there tells nothing, and it cost an hour of the full run
    tasks: tuple = (MNIST1D, MNIST1D_SPARSE, TEACHER_PIXELFLY, TEACHER_DENSE, CHARS)
    rank_task: int = 0                           # the task whose ranks and spectra are shown
    timing_steps: int = 20                       # timed steps per pattern and round (step time figure)
    timing_rounds: int = 3
    gpu_speed: bool = True                       # on CUDA: the talk's models' step times


# The teacher tasks borrow MNIST-1D's FULL_SEEDS: no power computation of their own (they make no parity claim,
# and their margin is in relative MSE); QUICK decided both teacher claims at 3 seeds.
FULL = TrainingConfig(tasks=(MNIST1D, MNIST1D_SPARSE, replace(TEACHER_PIXELFLY, seeds=FULL_SEEDS),
                             replace(TEACHER_DENSE, seeds=FULL_SEEDS), CHARS))
# MNIST-1D at budgets 0.25 and 0.1 (2000 training, 10000 test examples, 15 epochs, 3 seeds; dense and
# its positive control, 3 other seeds, trained once and shared by both budgets: dense has no budget),
# the two teacher-student tasks (5 sparse patterns x 3 seeds, 8000 examples x 3 epochs) and, as a
# reading only, 75 steps of a tiny GPT (its loss still falls: no verdict); ListOps in no preset (see
# TrainingConfig). At 1000 examples x 12 epochs dense no longer separated from low-rank (the controls
# failed, every verdict undecided), so QUICK keeps 2000 examples.
_QUICK_MNIST = replace(MNIST1D, seeds=(0, 1, 2), patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank",
                                                             "random+lowrank", "random", "monarch"))
QUICK = TrainingConfig(
    tasks=(_QUICK_MNIST,
           replace(_QUICK_MNIST, patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank", "random+lowrank"),
                   train=dict(_QUICK_MNIST.train, budget=0.1, track_rank=False)),
           TEACHER_PIXELFLY, TEACHER_DENSE,
           TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.01, kind="info",
                    patterns=("dense", "pixelfly", "lowrank"), seeds=(0,),
                    train=dict(_COMMON, context=32, epochs=1, batch_size=32, max_train=2400, max_test=256,
                               eval_every=25))),
    timing_steps=5, timing_rounds=2, gpu_speed=False)
_TINY_TEACHER = dict(_TEACHER, epochs=1, data_options=dict(_DATA, n_train=128, n_test=64, width=64, n_outputs=8),
                     model_options=dict(_TEACHER["model_options"], dim=16))
TINY = TrainingConfig(
    tasks=(TaskSpec("MNIST-1D MLP", "mlp", "mnist1d", "test_accuracy", 2.0,
                    patterns=("dense", "pixelfly", "pixelfly-gated", "lowrank", "random"), seeds=(0, 1),
                    train=dict(_COMMON, epochs=1, batch_size=32, data_options=dict(_DATA, n_train=128, n_test=64))),
           replace(TEACHER_PIXELFLY, patterns=("pixelfly", "lowrank", "random"), seeds=(0, 1), train=_TINY_TEACHER),
           TaskSpec("character GPT", "gpt", "chars", "val_loss", 0.01, patterns=("dense", "pixelfly"), kind="info",
                    seeds=(0,), train=dict(_COMMON, context=16, epochs=1, batch_size=16, max_train=32,
                                           max_test=16, eval_every=2))),
    timing_steps=1, timing_rounds=1, gpu_speed=False)
# Estimate of FULL, from the QUICK run measured 2026-12-06 (`reproduce --preset quick --only training`,
# one thread, load 6-9: 205 s of CPU, 9 min wall): an MNIST-1D run ~5.5 CPU seconds, a teacher-student
# run ~0.65, a tiny-GPT step at context 32 ~0.03 (so ~0.06 at 64). FULL, counted from its TaskSpecs:
# per seed every MNIST-1D pattern at 0.25 + the positive control + the patterns at 0.1 (dense shared),
# the teacher runs; the character GPT's patterns x seeds + one control per seed, of CHARS_STEPS steps
# each (2 epochs of 362 steps); a minute of step timing.
MNIST_RUN_S, TEACHER_RUN_S, CHARS_STEP_S, CHARS_STEPS = 5.5, 0.65, 0.06, 724
_MNIST_RUNS = len(MNIST1D.patterns) + 1 + len(MNIST1D_SPARSE.patterns) - 1
_TEACHER_RUNS = len(TEACHER_PIXELFLY.patterns) + len(TEACHER_DENSE.patterns)
# Measured on ONE thread (a `reproduce --jobs` worker), 2026-12-06: FULL with the MNIST-1D and teacher seeds (0, 1)
# and one character-GPT seed took 457.5 s of CPU (M2C1_CPU_S; 1737 s wall at load 5-6, machine shared;
# `bench/full_minutes.py training m2c1`), ~15% below what the count says for it. FULL_MINUTES is FULL's count
# scaled by that measurement: FULL alone on one thread (~24; reproduce's CONTENTION adds a neighbour's cost)
M2C1_CPU_S = 457.5


def _counted_s(seeds: int, chars_seeds: int) -> float:
    """CPU seconds the count gives FULL with ``seeds`` MNIST-1D and teacher seeds and ``chars_seeds`` GPT seeds."""
    return (seeds * (_MNIST_RUNS * MNIST_RUN_S + _TEACHER_RUNS * TEACHER_RUN_S)
            + (len(CHARS.patterns) + 1) * chars_seeds * CHARS_STEPS * CHARS_STEP_S + 60)   # + a minute of timing


FULL_MINUTES = round(_counted_s(len(FULL_SEEDS), len(CHARS.seeds)) * M2C1_CPU_S / _counted_s(2, 1) / 60, 1)


def _key(task: TaskSpec, seeds: tuple) -> str:
    """What dense's runs depend on: everything but the budget (dense has none) and the rank tracking."""
    train = {k: v for k, v in task.train.items() if k not in ("budget", "track_rank")}
    return json.dumps([task.model, task.data, train, list(seeds)], sort_keys=True, default=str)


def _dense_runs(task: TaskSpec, seeds: tuple, device: str, cache: dict) -> Comparison:
    key = _key(task, seeds)
    if key not in cache:
        cache[key] = compare_patterns(("dense",), seeds, model=task.model, data=task.data, device=device,
                                      progress=False, **task.train)
    return cache[key]


def _task_study(out: Path, task: TaskSpec, index: int, device: str, cache: dict) -> tuple[TaskRuns, Comparison]:
    """Train one task (dense and its positive control from ``cache`` when another budget trained them)."""
    sparse = tuple(p for p in task.patterns if p != "dense")
    parts = [compare_patterns(sparse, task.seeds, model=task.model, data=task.data, device=device, progress=False,
                              **task.train)]
    if "dense" in task.patterns:
        parts.insert(0, _dense_runs(task, task.seeds, device, cache))
    runs = Comparison(*(pd.concat([getattr(c, f) for c in parts], ignore_index=True)
                        for f in ("summary", "history", "ranks")), {k: m for c in parts for k, m in c.models.items()})
    control = None
    if task.positive_control and "dense" in task.patterns and task.kind == "paper" and task.parity:
        control = _dense_runs(task, tuple(CONTROL_SEED + s for s in task.seeds), device, cache).summary
    name = f"task{index}_{task.data}_b{task.budget:g}"
    csv = save_table(runs.summary, out, f"{name}_parity")
    save_table(runs.ranks, out, f"{name}_ranks")
    save_figure(plot_curves(runs.history, task.metric, task.label), out, f"{name}_curves")
    png = save_figure(plot_parity(runs.summary, task.metric, f"{task.label}, budget {task.budget:g}"), out,
                      f"{name}_parity")
    return TaskRuns(task, runs.summary, png, csv, sparsified_budgets(runs.models), control, runs.history), runs


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
    results, extra, frames, cache = [], [], {}, {}
    with num_threads(1 if device == "cpu" and config != FULL else None):  # tiny models: see pixelfly_lab.threads
        for index, task in enumerate(config.tasks):
            task_runs, runs = _task_study(out, task, index, device, cache)
            results.append(task_runs)
            if index == config.rank_task:
                extra += _rank_claim(out, task, runs)
            # Step time measured interleaved on the same batch (the runs' own step times drift with the load).
            options = {k: v for k, v in task.train.items() if k in ("size", "budget", "block_size")}
            options.update(task.train.get("model_options", {}))
            data = load_data(task.data, **({"context": task.train["context"]} if task.data == "chars" else {}),
                             **task.train.get("data_options", {}))
            frames[f"{task.label}, budget {task.budget:g}"] = step_speed(
                task.model, data, list(task.patterns), batch_size=task.train["batch_size"], device=device,
                steps=config.timing_steps, rounds=config.timing_rounds, **options)
        claims = task_claims(results) + extra
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


if __name__ == "__main__":  # the power computation behind FULL's seeds and the FULL estimate
    for name, (mean, sd, level) in QUICK_PAIRED.items():
        print(f"{name}: seeds_for_power(sd={sd}, effect={mean}, margin=-2.0, power=0.8, alpha={level:g}) = "
              f"{seeds_for_power(sd, mean, -2.0, alpha=level)}")
    print(f"FULL seeds: {len(FULL_SEEDS)}; FULL_MINUTES ~ {FULL_MINUTES} (QUICK's CPU seconds per run, 2 cores)")
