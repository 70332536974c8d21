"""The training study's pass rules, its Pixelfly variants and the per-model GPU speed claims."""

import json

import pandas as pd
import pytest

from pixelfly_lab.studies.training import (GPU_SPEEDUPS, SpeedModel, TaskSpec, parity_claims, speed_claims,
                                           unmeasured_speed_claims)
from pixelfly_lab.training_study import compare_patterns, pattern_options

ACCURACY = TaskSpec("task", "mlp", "mnist1d", "test_accuracy", 2.0)
LOSS = TaskSpec("lm", "gpt", "chars", "val_loss", 0.05)


def _summary(metric, means: dict, sd: float = 0.0):
    """Three seeds per pattern at mean - sd, mean, mean + sd (sample sd = sd)."""
    return pd.DataFrame([{"pattern": p, "seed": s, metric: m + (s - 1) * sd} for p, m in means.items()
                         for s in range(3)])


def _verdicts(claims):
    return [(c.claim.split(" -- ")[1].split(" (")[0], c.held) for c in claims]


def test_parity_rules_for_accuracy():
    means = {"dense": 0.80, "pixelfly": 0.785, "pixelfly-gated": 0.77, "lowrank": 0.79, "random": 0.70}
    claims = parity_claims(ACCURACY, _summary("test_accuracy", means, sd=0.004), "f.png", "t.csv")
    assert all(c.kind == "paper" for c in claims) and len(claims) == 4
    # pixelfly: 1.5 points from dense (within 2); 0.5 below lowrank, the best other, with sd 0.4: not held
    # pixelfly-gated: 3 points from dense; 2 below lowrank
    assert [c.held for c in claims] == [True, False, False, False]
    relaxed = parity_claims(ACCURACY, _summary("test_accuracy", means, sd=0.006), "f.png", "t.csv")
    assert [c.held for c in relaxed] == [True, True, False, False]  # 0.5 points is now within one sd (0.6)
    assert "best other: lowrank 79.0%" in claims[1].measured


def test_parity_rules_for_a_loss():
    means = {"dense": 2.00, "pixelfly": 2.08, "pixelfly-gated": 2.12, "lowrank": 2.10}
    claims = parity_claims(LOSS, _summary("val_loss", means, sd=0.01), "f.png", "t.csv")
    # lower is better: pixelfly 4% above dense and below lowrank; gated 6% above dense and above lowrank + sd
    assert [c.held for c in claims] == [True, True, False, False]
    one_seed = _summary("val_loss", means).query("seed == 0")
    assert [c.held for c in parity_claims(LOSS, one_seed, "f.png", "t.csv")][1::2] == [None, None]


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
    toy = (SpeedModel("toy GPT", "gpt", 2.1, {"dim": 64, "depth": 1, "heads": 2}, 2, context=32, vocab=64),
           SpeedModel("toy Mixer", "mixer", 2.3, {"dim": 64, "depth": 1, "heads": 2}, 2, image=32, patch=16))
    claims = speed_claims(tmp_path, "cpu", models=toy, block_size=16, steps=1, rounds=1)
    assert len(claims) == 2 and all(type(c.held) is bool for c in claims)
    assert "2.1x faster" in claims[0].claim and "2.3x faster" in claims[1].claim
    assert (tmp_path / "gpu_step_time.csv").is_file()
    json.dumps([c.to_dict() for c in claims])  # the report stores claims as JSON


def test_model_options_must_be_a_dict():
    from pixelfly_lab.train import TrainConfig

    with pytest.raises(TypeError, match="model_options"):
        TrainConfig(model_options=["gating"])
    assert TrainConfig(model_options={"gating": True}).model_options == {"gating": True}
