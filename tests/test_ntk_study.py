"""The NTK study: scale-free distances, the dense seed-to-seed spread, and its two paper claims' rules."""

import pandas as pd
import pytest
import torch

from pixelfly_lab.training.data import load_data
from pixelfly_lab.training.models import build_model
from pixelfly_lab.ntk.empirical import empirical_ntk, kernel_distance
from pixelfly_lab.studies.ntk_comparison import STUDY_METRICS, NTKStudyConfig, kernel_distances, ntk_study

TINY = NTKStudyConfig(families=("mlp",), patterns=("dense", "pixelfly"), seeds=(0,), reference_seeds=(5, 6),
                      n_kernel=6, n_train=64, n_test=1000, epochs=1)


@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_scale_free_distances_ignore_the_kernels_size(scale):
    torch.manual_seed(0)
    a = torch.randn(8, 5, dtype=torch.float64)
    k = a @ a.T
    d = kernel_distances(scale * k, k)
    assert d["relative_frobenius_normalized"] == pytest.approx(0, abs=1e-12)
    assert d["relative_frobenius_centered"] == pytest.approx(0, abs=1e-12)
    assert kernel_distances(scale * k + 5.0, k)["relative_frobenius_centered"] == pytest.approx(0, abs=1e-12)
    assert d["cka"] == pytest.approx(0, abs=1e-12)
    assert d["relative_frobenius"] == pytest.approx(abs(scale - 1))  # the raw one measures the size
    b = torch.randn(8, 5, dtype=torch.float64)
    other = b @ b.T
    assert kernel_distances(scale * other, k)["cka"] == pytest.approx(kernel_distances(other, k)["cka"])


def test_study_spread_and_distances_match_kernels_built_by_hand():
    frame = ntk_study(TINY, progress=False)
    data = load_data("mnist1d", seed=0, n_train=64, n_test=1000)
    probe = data.x_test[:6]

    def kernel(seed, pattern="dense"):
        model = build_model("mlp", data, pattern=pattern, budget=0.25, block_size=8, seed=seed, depth=TINY.mlp_depth)
        return empirical_ntk(model, probe, progress=False)

    k5, k6, k0, p0 = kernel(5), kernel(6), kernel(0), kernel(0, "pixelfly")
    spread = frame.attrs["spread"].set_index("metric")
    assert set(spread.index) == set(STUDY_METRICS)
    for metric in STUDY_METRICS:
        # both orders for the asymmetric Frobenius distances, one for CKA (symmetric)
        pair = [kernel_distance(k5, k6, metric)] + ([kernel_distance(k6, k5, metric)] if "frob" in metric else [])
        assert spread.loc[metric, "pairs"] == len(pair)
        assert spread.loc[metric, "mean"] == pytest.approx(sum(pair) / len(pair), rel=1e-5)
        rows = frame.set_index("pattern")
        for pattern, k in (("dense", k0), ("pixelfly", p0)):
            want = (kernel_distance(k, k5, metric) + kernel_distance(k, k6, metric)) / 2
            assert rows.loc[pattern, metric] == pytest.approx(want, rel=1e-5)
    ref_trace = (float(k5.trace()) + float(k6.trace())) / 2
    assert frame.set_index("pattern").loc["pixelfly", "trace_ratio"] == pytest.approx(float(p0.trace()) / ref_trace,
                                                                                     rel=1e-5)
    assert frame.test_accuracy.between(0, 1).all() and (frame.density[frame.pattern == "pixelfly"] < 1).all()
    assert set(frame.attrs["history"].pattern) == {"dense", "pixelfly"}
    top = float(torch.linalg.eigvalsh(p0.double())[-1] / p0.double().trace())
    assert frame.set_index("pattern").loc["pixelfly", "top_share"] == pytest.approx(top, rel=1e-5)
    constant = float(p0.double().sum() / len(p0) / torch.linalg.matrix_norm(p0.double()))
    assert frame.set_index("pattern").loc["pixelfly", "constant_share"] == pytest.approx(abs(constant), rel=1e-5)
    conv = frame.attrs["convergence"]  # dense's learning curves: one evaluation per epoch, the last is its accuracy
    short, longer = conv[conv.run_epochs == 1], conv[conv.run_epochs == 2]
    assert list(short.seed) == [0] and list(short.epoch) == [1] and short.test_accuracy.iloc[0] == pytest.approx(
        float(frame.set_index("pattern").loc["dense", "test_accuracy"]))
    assert list(longer.epoch) == [1, 2] and longer.test_accuracy.between(0, 1).all()


@pytest.mark.parametrize("overrides, match", [
    ({"patterns": ("dense", "magic")}, "patterns"),
    ({"reference_seeds": (5,)}, "at least 2"),
    ({"reference_seeds": (0, 5)}, "must differ"),
    ({"epochs": 0}, "epochs"),
    ({"n_test": 4}, "n_test"),
    ({"train_seeds": 0}, "train_seeds"),
    ({"train_seeds": 2}, "train_seeds"),   # more than the one seed
])
def test_study_rejects_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        ntk_study(TINY, progress=False, **overrides)


def _frame(distances: dict, accuracies: dict, seeds=(0, 1, 2), jitter=0.001, gain=0.001, epochs=10, more=0.001):
    """A study frame with given means per pattern; seeds spread by +- jitter, the sign alternating
    between patterns (so that paired differences have an sd of about 2 jitter); dense's learning
    curve gains 0.05 per epoch, then ``gain`` per epoch over the last fifth of ``epochs``; the run of
    twice the epochs ends ``more`` above it."""
    rows = []
    for k, (pattern, d) in enumerate(distances.items()):
        for i, seed in enumerate(seeds):
            offset = (i - (len(seeds) - 1) / 2) * jitter * (-1) ** k
            rows.append(dict(family="mlp", pattern=pattern, seed=seed, relative_frobenius_normalized=d + offset,
                             relative_frobenius_centered=d + offset, cka=d + offset, relative_frobenius=d,
                             trace_ratio=1.0, top_share=0.8, constant_share=0.7, test_accuracy=accuracies[pattern]))
    frame = pd.DataFrame(rows)
    frame.attrs["spread"] = pd.DataFrame([dict(family="mlp", metric=m, mean=0.1, sd=0.01, pairs=6)
                                          for m in STUDY_METRICS])
    tail = epochs - max(1, round(0.2 * epochs))
    curve = [0.5 - 0.05 * max(0, tail - e) + gain * max(0, e - tail) for e in range(1, epochs + 1)]
    longer = [a - 0.05 for a in curve] + [curve[-1] + more] * epochs   # its own schedule; only its end is read
    frame.attrs["convergence"] = pd.DataFrame(
        [dict(family="mlp", run_epochs=run, seed=s, epoch=e, test_accuracy=a + 0.001 * s)
         for run, values in ((epochs, curve), (2 * epochs, longer)) for s in seeds for e, a in enumerate(values, 1)])
    return frame


def test_correlation_claim_rule():
    from pixelfly_lab.studies.ntk import _correlation_claim

    metric = "relative_frobenius_centered"
    acc = {"dense": 0.9, "a": 0.8, "b": 0.7, "c": 0.6, "pixelfly": 0.5}
    # dense is excluded: the four sparse patterns are perfectly anti-correlated, exact p = 1/4! = 0.042
    claim = _correlation_claim(_frame({"dense": 0.0, "a": 0.1, "b": 0.2, "c": 0.3, "pixelfly": 0.4}, acc),
                               "mlp", metric, 5, None, None)
    assert claim.held is True and "rho -1.00" in claim.measured and "p = 0.042" in claim.measured
    # three sparse patterns perfectly anti-correlated: p = 1/6 > 0.05, not held although rho < 0
    three = {k: v for k, v in acc.items() if k != "c"}
    claim = _correlation_claim(_frame({"dense": 0.0, "a": 0.1, "b": 0.2, "pixelfly": 0.4}, three), "mlp", metric, 5,
                               None, None)
    assert claim.held is None and "p = 0.167" in claim.measured  # not significant: never a refutation
    # correlated the wrong way, significantly (p of rho > 0 is 1/4! = 0.042): refuted
    claim = _correlation_claim(_frame({"dense": 0.0, "a": 0.4, "b": 0.3, "c": 0.2, "pixelfly": 0.1}, acc),
                               "mlp", metric, 5, None, None)
    assert claim.held is False and "opposite sign p = 0.042" in claim.measured
    # perfectly anti-correlated, but dense still gains 2 x 0.3 points over the last evaluation interval
    # (epochs 8 -> 10 of 10): undecided (not converged), with what would decide it; 0.2 x 2 passes the gate
    unconverged = _frame({"dense": 0.0, "a": 0.1, "b": 0.2, "c": 0.3, "pixelfly": 0.4}, acc, gain=0.003)
    claim = _correlation_claim(unconverged, "mlp", metric, 10, None, None)
    assert claim.held is None and "gain +0.60 points" in claim.measured and "epoch 8" in claim.measured
    assert "undecided (not converged)" in claim.measured and "not more seeds" in claim.measured
    assert "less than 0.5 points over the last evaluation interval" in claim.claim and "2E = 20" in claim.claim
    passed = _frame({"dense": 0.0, "a": 0.1, "b": 0.2, "c": 0.3, "pixelfly": 0.4}, acc, gain=0.002)
    assert _correlation_claim(passed, "mlp", metric, 10, None, None).held is True
    # a curve flat at its end (the cosine schedule) that still gains 0.6 points when trained twice as long
    flat = _frame({"dense": 0.0, "a": 0.1, "b": 0.2, "c": 0.3, "pixelfly": 0.4}, acc, gain=0.0, more=0.006)
    claim = _correlation_claim(flat, "mlp", metric, 10, None, None)
    assert claim.held is None and "+0.60 points over E" in claim.measured and "not converged" in claim.measured
    # one evaluation only: convergence unknown, undecided
    single = _frame({"dense": 0.0, "a": 0.1, "b": 0.2, "c": 0.3, "pixelfly": 0.4}, acc, epochs=1)
    claim = _correlation_claim(single, "mlp", metric, 1, None, None)
    assert claim.held is None and "convergence unknown" in claim.measured
    # too few sparse patterns: undecided
    two = _frame({"dense": 0.0, "a": 0.1, "pixelfly": 0.2}, acc)
    assert _correlation_claim(two, "mlp", metric, 5, None, None).held is None


def test_closest_claim_rule():
    from pixelfly_lab.studies.ntk import _closest_claim, closest_verdict

    metric = "relative_frobenius_centered"
    acc = dict.fromkeys(["dense", "pixelfly", "pixelfly-gated", "random", "lowrank"], 0.5)
    clear = _frame({"dense": 0.1, "pixelfly": 0.20, "pixelfly-gated": 0.5, "random": 0.25, "lowrank": 0.4}, acc)
    claim = _closest_claim(clear, "mlp", "", None, None)
    assert claim.held is True and len(claim.members) == 4   # {ungated, gated} x {centred, CKA}
    # the headline (ungated, centred) first, then the secondary readings
    assert claim.members[0]["name"].startswith("pixelfly, relative Frobenius of centred")
    assert [m["verdict"] for m in claim.members] == ["held", "refuted", "held", "refuted"]
    assert claim.ci[0] > 0 and claim.seeds == 3 and claim.seeds_to_decide is None
    assert claim.effect == pytest.approx(claim.members[0]["effect"])
    # the headline decides alone: gated closest, ungated not -> refuted, though the gated reading holds
    gated = _frame({"dense": 0.1, "pixelfly": 0.5, "pixelfly-gated": 0.20, "random": 0.25, "lowrank": 0.4}, acc)
    verdict, critical, whole = closest_verdict(gated, "mlp", metric)
    assert (verdict, critical) == ("refuted", "random") and whole.mean == pytest.approx(-0.25)
    claim = _closest_claim(gated, "mlp", "", None, None)
    assert claim.held is False and claim.members[1]["verdict"] == "held" and "(headline)" in claim.measured
    # and the other way round: the headline holds although every secondary reading is refuted
    ungated = _frame({"dense": 0.1, "pixelfly": 0.20, "pixelfly-gated": 0.5, "random": 0.25, "lowrank": 0.4}, acc)
    ungated.loc[ungated.pattern == "pixelfly", "cka"] = 0.6
    claim = _closest_claim(ungated, "mlp", "", None, None)
    assert claim.held is True and [m["verdict"] for m in claim.members] == ["held", "refuted", "refuted", "refuted"]
    # smallest mean, but random within the noise of the paired differences: undecided, with the seeds that decide
    noisy = _frame({"dense": 0.1, "pixelfly": 0.20, "random": 0.21, "lowrank": 0.4}, acc, jitter=0.05)
    claim = _closest_claim(noisy, "mlp", "", None, None)
    assert claim.held is None and "verdict: undecided" in claim.measured and "critical: random" in claim.measured
    assert claim.seeds_to_decide and claim.seeds_to_decide > 3
    # one seed count per comparison: the claim's is the headline member's, printed once in the text
    assert claim.seeds_to_decide == claim.members[0]["seeds_to_decide"]
    headline = claim.measured.split("(headline)")[1].split("; ")[0]
    assert headline.count("seeds would decide") == 1 and f"~{claim.seeds_to_decide} seeds" in headline
    # the same when random's mean is slightly below Pixelfly's, inside the noise: undecided, not refuted
    assert closest_verdict(_frame({"pixelfly": 0.21, "random": 0.20}, acc, jitter=0.05), "mlp", metric)[0] == \
        "undecided"
    beaten = _frame({"dense": 0.1, "pixelfly": 0.30, "pixelfly-gated": 0.5, "random": 0.25, "lowrank": 0.4}, acc)
    claim = _closest_claim(beaten, "mlp", "", None, None)
    assert claim.held is False and "dense seed-to-seed 0.100+-0.010" in claim.measured
    one_seed = _frame({"dense": 0.1, "pixelfly": 0.2, "random": 0.3}, acc, seeds=(0,))
    assert _closest_claim(one_seed, "mlp", "", None, None).held is None


def test_train_seeds_trains_the_first_seeds_only():
    from dataclasses import replace

    from pixelfly_lab.studies import ntk

    frame = ntk_study(replace(TINY, seeds=(0, 1), train_seeds=1), progress=False)
    trained = frame.set_index("seed").test_accuracy
    assert trained.loc[0].notna().all() and trained.loc[1].isna().all()
    assert set(frame.attrs["convergence"].seed) == {0} and set(frame.attrs["convergence"].run_epochs) == {1, 2}
    # FULL trains fewer seeds than it probes, long enough for the convergence gate (see ntk.FULL_EPOCHS)
    assert ntk.FULL.train_seeds < len(ntk.FULL.seeds) and ntk.FULL.epochs == ntk.FULL_EPOCHS >= 2 * ntk.QUICK.epochs
    from pixelfly_lab.studies.ntk_comparison import _check_config

    _check_config(ntk.FULL)  # FULL's config passes the checks
