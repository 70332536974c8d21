"""The training study's pass rules, its Pixelfly variants and the per-model GPU speed claims."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from pixelfly_lab.studies.training import (FULL, FULL_MINUTES, FULL_SEEDS, GPU_SPEEDUPS, QUICK, QUICK_PAIRED, TINY,
                                           SpeedModel, TaskSpec, flop_ceiling, parity_claims, sparsified_budgets, speed_claims,
                                           unmeasured_speed_claims)
from pixelfly_lab.studies.stats import seeds_for_power
from pixelfly_lab.studies.training_rules import CONVERGENCE_SHARE, TaskRuns, task_claims
from pixelfly_lab.studies.training_comparison import compare_patterns, pattern_options

ACCURACY = TaskSpec("task", "mlp", "mnist1d", "test_accuracy", 2.0)
LOSS = TaskSpec("lm", "gpt", "chars", "val_loss", 0.01)


def _summary(metric, means: dict, sd: float = 0.0, seeds: int = 4, seed: int = 0):
    """``seeds`` seeds per pattern, each value its pattern's mean plus N(0, sd) noise of its own."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"pattern": p, "seed": s, metric: m + sd * rng.normal()} for p, m in means.items()
                         for s in range(seeds)])


MEANS = {"dense": 0.80, "pixelfly": 0.795, "pixelfly-gated": 0.79, "lowrank": 0.75, "random+lowrank": 0.76,
         "random": 0.79}


def _control(value=0.80, sd=0.003, seeds=4):
    return _summary("test_accuracy", {"dense": value}, sd, seeds, seed=9).assign(seed=lambda f: f.seed + 100)


def test_parity_is_held_only_when_the_controls_behave():
    claims = parity_claims(ACCURACY, _summary("test_accuracy", MEANS, 0.003), "f.png", "t.csv", control=_control())
    parity, best = claims
    assert [c.kind for c in claims] == ["paper", "paper"] and parity.held is True
    assert [m["name"] for m in parity.members] == ["pixelfly", "pixelfly-gated"]
    assert "negative control lowrank" in parity.measured and "positive control dense" in parity.measured
    assert parity.ci[0] > -2 and parity.seeds == 4
    # a negative control that also meets the margin: the task does not tell patterns apart
    loose = parity_claims(ACCURACY, _summary("test_accuracy", dict(MEANS, lowrank=0.798), 0.003), "f.png", "t.csv",
                          control=_control())[0]
    assert loose.held is None and "does not tell patterns apart" in loose.measured
    assert loose.seeds_to_decide is None   # more seeds do not make a task tell patterns apart
    # ... but a member heading below the margin could still be refuted by more seeds: they are printed
    sinking = parity_claims(ACCURACY, _summary("test_accuracy", dict(MEANS, lowrank=0.798, pixelfly=0.77,
                                                                     **{"pixelfly-gated": 0.77}), 0.02, seeds=3),
                            "f.png", "t.csv")[0]
    assert sinking.held is None and sinking.seeds_to_decide and sinking.seeds_to_decide > 3
    # dense against dense refuted: the measurement is broken, nothing is decided
    broken = parity_claims(ACCURACY, _summary("test_accuracy", MEANS, 0.003), "f.png", "t.csv",
                           control=_control(0.70))[0]
    assert broken.held is None and "positive control failed" in broken.measured
    # Pixelfly (both layers) 5 points below dense: refuted whatever the controls say
    worse = dict(MEANS, pixelfly=0.75, **{"pixelfly-gated": 0.75})
    assert parity_claims(ACCURACY, _summary("test_accuracy", worse, 0.003), "f.png", "t.csv")[0].held is False
    # noise as large as the margin at 3 seeds: undecided, with the seeds that would decide it
    noisy = parity_claims(ACCURACY, _summary("test_accuracy", dict(MEANS, pixelfly=0.785), 0.02, seeds=3), "f.png",
                          "t.csv", control=_control())[0]
    assert noisy.held is None and noisy.seeds_to_decide and noisy.seeds_to_decide > 3


def test_best_other_is_not_held_when_low_rank_stands_in_for_pixelfly():
    summary = _summary("test_accuracy", MEANS, 0.003)
    best = parity_claims(ACCURACY, summary, "f.png", "t.csv")[1]
    assert best.held is True and "not worse than any of {lowrank, random+lowrank, random}" in best.claim
    # Pixelfly replaced by low-rank (worse than random by 4 points on this task): refuted, never held
    swapped = summary.copy()
    lowrank = swapped.pattern == "lowrank"
    for variant in ("pixelfly", "pixelfly-gated"):
        swapped.loc[swapped.pattern == variant, "test_accuracy"] = swapped.loc[lowrank, "test_accuracy"].to_numpy()
    claim = parity_claims(ACCURACY, swapped, "f.png", "t.csv")[1]
    assert claim.held is False and "critical: random" in claim.measured
    # a task on which every pattern is as good as the rest: no other pattern fails the same rule -> undecided
    flat = _summary("test_accuracy", dict(MEANS, lowrank=0.795, **{"random+lowrank": 0.795}), 0.003)
    claim = parity_claims(ACCURACY, flat, "f.png", "t.csv")[1]
    assert claim.held is None and "does not separate patterns" in claim.measured
    assert "lowrank held" in claim.measured and claim.seeds_to_decide is None   # more seeds do not separate a task
    # Pixelfly's rule passes, and one other pattern fails it: the task separates, held
    assert parity_claims(ACCURACY, _summary("test_accuracy", dict(MEANS, random=0.795), 0.003), "f.png",
                         "t.csv")[1].held is True
    # one seed: no interval
    assert parity_claims(ACCURACY, summary.query("seed == 0"), "f.png", "t.csv")[1].held is None


def test_parity_rules_for_a_loss_and_info_tasks():
    means = {"dense": 2.00, "pixelfly": 2.005, "pixelfly-gated": 2.01, "lowrank": 2.10}
    claims = parity_claims(LOSS, _summary("val_loss", means, 0.002), "f.png", "t.csv")
    # lower is better: pixelfly 0.25% above dense (margin 1%), low-rank 5% above: refuted, the control behaves;
    # best other: low-rank, the only other, fails the same rule (5% worse than Pixelfly): the task separates
    assert [c.held for c in claims] == [True, True]
    info = parity_claims(replace(LOSS, kind="info"), _summary("val_loss", means, 0.002), "f.png", "t.csv")
    assert all(c.kind == "info" and c.held is None for c in info) and "verdict: held" in info[0].measured
    with pytest.raises(ValueError, match="kind"):
        replace(LOSS, kind="maybe")


def _history(dense_curve, steps=(10, 20, 30)):
    """Evaluation rows of dense (every seed alike) on a learning curve."""
    return pd.DataFrame([{"event": "eval", "pattern": "dense", "seed": s, "step": step, "test_accuracy": value}
                         for s in range(4) for step, value in zip(steps, dense_curve)])


def test_parity_is_undecided_while_dense_still_gains():
    summary = _summary("test_accuracy", MEANS, 0.003)
    limit = CONVERGENCE_SHARE * ACCURACY.margin   # 0.5 points
    gaining = parity_claims(ACCURACY, summary, "f.png", "t.csv", control=_control(),
                            history=_history([0.70, 0.78, 0.80 - 0.01 * limit * 1.5]))[0]
    assert gaining.held is None and "not converged" in gaining.measured and gaining.seeds_to_decide is None
    converged = parity_claims(ACCURACY, summary, "f.png", "t.csv", control=_control(),
                              history=_history([0.70, 0.798, 0.800]))[0]
    assert converged.held is True and "converged when <= 0.5" in converged.measured
    # a refutation on a run that has not converged is held back too
    worse = _summary("test_accuracy", dict(MEANS, pixelfly=0.75, **{"pixelfly-gated": 0.75}), 0.003)
    assert parity_claims(ACCURACY, worse, "f.png", "t.csv", history=_history([0.6, 0.7, 0.8]))[0].held is None
    assert parity_claims(ACCURACY, worse, "f.png", "t.csv", history=_history([0.6, 0.8, 0.8]))[0].held is False


def test_budgets_are_one_family():
    """Parity at two budgets is one claim: four members (two layers x two budgets), Holm across them."""
    at_01 = replace(ACCURACY, train={"budget": 0.1})
    good, broken = _summary("test_accuracy", MEANS, 0.003), _control(0.70)
    results = [TaskRuns(ACCURACY, good, "f.png", "t.csv", control=_control()),
               TaskRuns(at_01, _summary("test_accuracy", MEANS, 0.003, seed=1), "g.png", "u.csv", control=broken)]
    parity, best = task_claims(results)
    assert [m["name"] for m in parity.members] == ["pixelfly @0.25", "pixelfly-gated @0.25", "pixelfly @0.1",
                                                   "pixelfly-gated @0.1"]
    assert "budget(s) 0.25, 0.1" in parity.claim and len(best.members) == 4
    # budget 0.1's positive control failed: its members decide nothing, 0.25's hold the family
    verdicts = {m["name"]: m["verdict"] for m in parity.members}
    assert verdicts["pixelfly @0.1"] == verdicts["pixelfly-gated @0.1"] == "undecided" and parity.held is True
    assert "budget 0.1: undecided: the positive control failed" in parity.measured
    # both budgets refuted: the family is refuted; one refuted, one undecided: undecided
    worse = _summary("test_accuracy", dict(MEANS, pixelfly=0.75, **{"pixelfly-gated": 0.75}), 0.003)
    both = task_claims([TaskRuns(ACCURACY, worse), TaskRuns(at_01, worse)])[0]
    assert both.held is False and {m["verdict"] for m in both.members} == {"refuted"}
    noisy = _summary("test_accuracy", dict(MEANS, pixelfly=0.78, **{"pixelfly-gated": 0.78}), 0.03, seeds=3)
    mixed = task_claims([TaskRuns(ACCURACY, worse), TaskRuns(at_01, noisy)])[0]
    assert mixed.held is None
    # ... and each budget's own verdict is printed: the refuted budget is not hidden by the undecided one
    assert "budget 0.25 alone: refuted" in mixed.measured and "budget 0.1 alone: undecided" in mixed.measured
    assert "budget 0.1 alone: held" not in parity.measured and "budget 0.25 alone: held" in parity.measured


def test_a_pattern_that_must_fail_the_rule_holds_back_the_check():
    teacher = TaskSpec("teacher", "mlp", "teacher-pixelfly", "test_mse", 0.05, kind="check", parity=False,
                       must_fail=("lowrank", "random"))
    means = {"pixelfly": 0.25, "pixelfly-gated": 0.245, "lowrank": 0.34, "random+lowrank": 0.30, "random": 0.325}
    claims = parity_claims(teacher, _summary("test_mse", means, 0.004), "f.png", "t.csv")
    assert len(claims) == 1 and claims[0].kind == "check" and claims[0].held is True
    assert "lowrank refuted" in claims[0].measured and "random refuted" in claims[0].measured
    # random as good as Pixelfly: the control does not separate what it must
    close = parity_claims(teacher, _summary("test_mse", dict(means, random=0.251), 0.004), "f.png", "t.csv")[0]
    assert close.held is None and "random did not fall behind" in close.measured


def test_presets_carry_the_teacher_tasks_and_full_seeds_from_power():
    assert len(FULL_SEEDS) == max(seeds_for_power(sd, mean, -2.0, alpha=level)
                                  for mean, sd, level in QUICK_PAIRED.values()) >= 3
    labels = {t.label: t for t in QUICK.tasks}
    assert {"teacher-pixelfly student", "teacher-dense student"} <= set(labels)
    assert labels["teacher-pixelfly student"].kind == "check" and labels["teacher-dense student"].kind == "paper"
    assert all(len(t.seeds) == len(FULL_SEEDS) for t in FULL.tasks if t.kind != "info" and t.data != "chars")
    assert any(t.data == "teacher-pixelfly" for t in TINY.tasks) and 10 < FULL_MINUTES < 200


def test_patterns_under_budget_are_named_and_left_out():
    means = {"dense": 0.80, "pixelfly": 0.795, "lowrank": 0.70, "random": 0.79, "monarch": 0.82}
    budgets = {"pixelfly": 0.245, "lowrank": 0.24, "random": 0.25, "monarch": 0.156}
    claims = parity_claims(ACCURACY, _summary("test_accuracy", means, 0.003), "f.png", "t.csv", budgets)
    assert "monarch 0.156" in claims[0].measured and "left out of the best-other comparison (parity still compares them): monarch" in claims[0].measured
    assert "not worse than any of {lowrank, random}" in claims[1].claim and claims[1].held is True
    # at budget 0.1 every pattern lands a little under the target (0.094): the reference is Pixelfly's own share
    low = {p: 0.094 for p in ("pixelfly", "lowrank", "random")}
    at_01 = parity_claims(replace(ACCURACY, train={"budget": 0.1}), _summary("test_accuracy", means, 0.003), "f.png",
                          "t.csv", dict(low, monarch=0.08))
    assert "not worse than any of {lowrank, random}" in at_01[1].claim and "them): monarch" in at_01[0].measured


def test_sparsified_budgets_from_the_models_reports():
    from pixelfly_lab.training.data import load_data
    from pixelfly_lab.training.models import build_model

    data = load_data("mnist1d", n_train=32, n_test=16)
    models = {(p, 0): build_model("mlp", data, size="tiny", pattern=p, budget=0.25, block_size=8)
              for p in ("dense", "pixelfly", "lowrank")}
    budgets = sparsified_budgets(models)
    assert set(budgets) == {"pixelfly", "lowrank"}
    layer = models["pixelfly", 0].layers[1]
    assert budgets["pixelfly"] == pytest.approx(layer.weight_params / (layer.in_features * layer.out_features))


def test_gated_layers_have_no_rank_and_training_tracks_the_others(tmp_path):
    from pixelfly_lab.training.data import load_data
    from pixelfly_lab.training.models import build_model
    from pixelfly_lab.training.rank import gated_layers, layer_weights, weight_ranks
    from pixelfly_lab.training.loop import TrainConfig, train

    data = load_data("mnist1d", n_train=32, n_test=16)
    model = build_model("mlp", data, size="tiny", pattern="pixelfly", budget=0.25, block_size=8, gating=True)
    assert gated_layers(model) == ["layers.1"]
    assert set(layer_weights(model)) == {"layers.0", "head"}  # neither the gated layer nor its parts
    ranks = weight_ranks(model)
    assert list(ranks.layer) == ["layers.0", "head"] and ranks.attrs["skipped"] == ["layers.1"]
    result = train(TrainConfig(model="mlp", data="mnist1d", size="tiny", pattern="pixelfly", budget=0.25,
                               block_size=8, epochs=1, batch_size=16, data_options={"n_train": 32, "n_test": 16},
                               model_options={"gating": True}, track_rank=True, rank_layers=["*"],
                               out=str(tmp_path), progress=False, device="cpu"))
    assert set(result.ranks.layer) == {"layers.0", "head"}


def test_data_seed_is_fixed_by_data_options(tmp_path):
    from pixelfly_lab.training.loop import TrainConfig, _load_data

    a, b = (_load_data(TrainConfig(data="mnist1d", seed=s, data_options={"seed": 0, "n_train": 16, "n_test": 8},
                                   out=str(tmp_path))) for s in (1, 2))
    c = _load_data(TrainConfig(data="mnist1d", seed=2, data_options={"n_train": 16, "n_test": 8}, out=str(tmp_path)))
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(b.x_train, c.x_train)


def test_gated_variant_is_built_and_trained():
    assert pattern_options("pixelfly-gated") == ("pixelfly", {"gating": True, "lowrank_init": "kaiming"})
    assert pattern_options("random") == ("random", {})
    runs = compare_patterns(["pixelfly", "pixelfly-gated"], seeds=(0,), model="mlp", data="mnist1d", size="tiny",
                            budget=0.25, block_size=8, epochs=1, batch_size=32,
                            data_options={"n_train": 64, "n_test": 32}, progress=False)
    assert list(runs.summary.pattern) == ["pixelfly", "pixelfly-gated"]
    gates = {label: [m.gate is not None for m in runs.models[label, 0].modules() if hasattr(m, "gate")]
             for label in ("pixelfly", "pixelfly-gated")}
    assert gates["pixelfly"] and not any(gates["pixelfly"]) and all(gates["pixelfly-gated"])
    with pytest.raises(TypeError, match="name"):
        pattern_options(3)


def test_speed_claims_have_the_talks_thresholds(tmp_path):
    assert {s.label: s.threshold for s in GPU_SPEEDUPS} == {"Mixer-B/16": 2.3, "ViT-B/16": 2.0, "GPT-2 small": 2.1,
                                                           "GPT-2 medium": 2.5}
    unmeasured = unmeasured_speed_claims("cpu")
    assert [c.held for c in unmeasured] == [None] * 4 and all(c.kind == "paper" for c in unmeasured)
    assert all("not measured" in c.measured for c in unmeasured)
    # the measuring code path, at toy sizes on the CPU
    # thresholds under the toy models' FLOP ceilings, so that both are timed
    toy = (SpeedModel("toy GPT", "gpt", 1.1, {"dim": 64, "depth": 1, "heads": 2}, 2, context=32, vocab=64),
           SpeedModel("toy Mixer", "mixer", 1.2, {"dim": 64, "depth": 1, "heads": 2}, 2, image=32, patch=16))
    claims = speed_claims(tmp_path, "cpu", models=toy, block_size=16, steps=1, rounds=1)
    assert len(claims) == 2 and all(type(c.held) is bool for c in claims)
    assert "1.1x faster" in claims[0].claim and "1.2x faster" in claims[1].claim
    assert all("FLOP ceiling" in c.measured for c in claims)
    assert (tmp_path / "gpu_step_time.csv").is_file()
    json.dumps([c.to_dict() for c in claims])  # the report stores claims as JSON


def test_model_options_must_be_a_dict():
    from pixelfly_lab.training.loop import TrainConfig

    with pytest.raises(TypeError, match="model_options"):
        TrainConfig(model_options=["gating"])
    assert TrainConfig(model_options={"gating": True}).model_options == {"gating": True}


@pytest.mark.parametrize("family, extra", [("gpt", dict(context=32, vocab=64)), ("mixer", dict(image=32, patch=8)),
                                           ("vit", dict(image=32, patch=8))])
def test_flop_ceiling_counts_what_the_step_timer_counts(family, extra):
    import torch.nn.functional as F

    from pixelfly_lab.speed.timer import time_training_steps
    from pixelfly_lab.studies.training_speed import _speed_data, flop_ceiling
    from pixelfly_lab.training.models import build_model

    spec = SpeedModel("toy", family, 2.0, {"dim": 64, "depth": 2, "heads": 2}, 2, **extra)
    data = _speed_data(spec)
    dense = build_model(family, data, size="gpt2-small", **({} if family == "gpt" else {"patch": spec.patch}),
                        **spec.dims)
    table = time_training_steps({"dense": dense}, data.x_train, data.y_train, steps=1, rounds=1, warmup=0,
                                loss_fn=lambda out, y: F.cross_entropy(out.flatten(0, -2), y.flatten()))
    counts = flop_ceiling(spec, 0.25)
    assert counts["dense"] == pytest.approx(1e9 * table.gmacs.iloc[0], rel=1e-9)   # the dispatch counter's MACs
    assert 1 < counts["ceiling"] < flop_ceiling(spec, 0.1)["ceiling"] < 1 / (1 - counts["sparse_share"])


def test_talks_gpt_claims_are_untestable_at_this_configuration():
    ceilings = {s.label: flop_ceiling(s, 0.25)["ceiling"] for s in GPU_SPEEDUPS}
    assert ceilings["GPT-2 small"] == pytest.approx(1.47, abs=0.02) and ceilings["GPT-2 medium"] < 2.5
    claims = {s.label: c for s, c in zip(GPU_SPEEDUPS, unmeasured_speed_claims("cpu"))}
    assert "untestable" in claims["GPT-2 small"].measured and "untestable" not in claims["Mixer-B/16"].measured
    assert "Mixer has no attention" in claims["Mixer-B/16"].claim and "FLOP ceiling" in claims["ViT-B/16"].claim
    toy = SpeedModel("toy GPT", "gpt", 9.0, {"dim": 64, "depth": 1, "heads": 2}, 2, context=32, vocab=64)
    skipped = speed_claims(None, "cpu", models=(toy,))   # ceiling below 9x: not timed, nothing written
    assert skipped[0].held is None and skipped[0].measured.startswith("not measured: FLOP ceiling")
