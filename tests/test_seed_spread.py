"""Kernel distances: which ignore scale, which are asymmetric; the dense seed-to-seed spread helper."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from pixelfly_lab import seed_spread
from pixelfly_lab.ntk.empirical import DISTANCE_METRICS, SCALE_FREE_METRICS, empirical_ntk, kernel_distance

F64 = torch.float64


def _psd(n, seed):
    a = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a @ a.T


@pytest.mark.parametrize("metric", SCALE_FREE_METRICS)
def test_scale_free_metrics_ignore_each_kernels_scale(metric):
    k1, k2 = _psd(6, 1), _psd(6, 2)
    d = kernel_distance(k1, k2, metric)
    assert d > 1e-3
    for a, b in [(5.0, 1.0), (1.0, 0.1), (1e-3, 40.0)]:
        assert kernel_distance(a * k1, b * k2, metric) == pytest.approx(d, rel=1e-10)
    assert kernel_distance(3.0 * k1, k1, metric) == pytest.approx(0.0, abs=1e-12)


def test_relative_frobenius_depends_on_scale_and_its_normalised_form_is_the_trace_normalised_one():
    k1, k2 = _psd(6, 1), _psd(6, 2)
    d = kernel_distance(k1, k2)
    assert kernel_distance(3.0 * k1, k2) != pytest.approx(d, rel=1e-3)     # scale moves it
    assert kernel_distance(3.0 * k1, 3.0 * k2) == pytest.approx(d)         # a common scale does not
    n1, n2 = k1 / k1.trace(), k2 / k2.trace()
    expected = float(torch.linalg.matrix_norm(n1 - n2) / torch.linalg.matrix_norm(n2))
    assert kernel_distance(k1, k2, "relative_frobenius_normalized") == pytest.approx(expected, rel=1e-12)


def test_centred_distance_ignores_scale_and_a_constant_and_matches_its_formula():
    k1, k2 = _psd(6, 1), _psd(6, 2)
    h = torch.eye(6, dtype=F64) - torch.full((6, 6), 1 / 6, dtype=F64)   # the centring matrix, built explicitly
    c1, c2 = h @ k1 @ h, h @ k2 @ h
    c1, c2 = c1 / c1.trace(), c2 / c2.trace()
    expected = float(torch.linalg.matrix_norm(c1 - c2) / torch.linalg.matrix_norm(c2))
    d = kernel_distance(k1, k2, "relative_frobenius_centered")
    assert d == pytest.approx(expected, rel=1e-12) and d > 1e-3
    for a, b, shift1, shift2 in [(5.0, 1.0, 0.0, 0.0), (1.0, 1.0, 40.0, -3.0), (0.01, 7.0, 1e3, 2.0)]:
        assert kernel_distance(a * k1 + shift1, b * k2 + shift2, "relative_frobenius_centered") == pytest.approx(
            d, rel=1e-9)
    # the trace-normalised (uncentred) distance is moved by a constant: the centred one is the shape of K
    assert kernel_distance(k1 + 40.0, k2, "relative_frobenius_normalized") != pytest.approx(
        kernel_distance(k1, k2, "relative_frobenius_normalized"), rel=1e-3)


def test_asymmetric_and_symmetric_metrics():
    k1, k2 = _psd(6, 1), 0.2 * _psd(6, 2)
    for metric in DISTANCE_METRICS:
        there, back = kernel_distance(k1, k2, metric), kernel_distance(k2, k1, metric)
        if metric.startswith("relative_frobenius"):
            assert there != pytest.approx(back, rel=1e-3)
        else:
            assert there == pytest.approx(back, rel=1e-12)


def test_normalised_distance_rejects_bad_kernels():
    k = _psd(4, 0)
    with pytest.raises(ValueError, match="square"):
        kernel_distance(k[:, :3], k[:, :3], "relative_frobenius_normalized")
    with pytest.raises(ValueError, match="positive trace"):
        kernel_distance(-k, k, "relative_frobenius_normalized")


def _factory(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def test_seed_spread_summarises_every_pair_of_seeds():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    seeds = (0, 1, 2)
    df = seed_spread(_factory, x, seeds)
    assert isinstance(df, pd.DataFrame) and df["metric"].tolist() == list(DISTANCE_METRICS)
    kernels = [empirical_ntk(_factory(s), x, method="loop") for s in seeds]
    for row in df.itertuples():
        ordered = row.metric.startswith("relative_frobenius")
        pairs = [(i, j) for i in range(3) for j in range(3) if i != j and (ordered or i < j)]
        values = torch.tensor([kernel_distance(kernels[i], kernels[j], row.metric) for i, j in pairs], dtype=F64)
        assert row.pairs == len(pairs)
        assert row.mean == pytest.approx(values.mean().item(), rel=1e-9)
        assert row.sd == pytest.approx(values.std().item(), rel=1e-9)
        assert row.min == pytest.approx(values.min().item(), rel=1e-9) and row.max >= row.mean > 0
        assert row.scale_free == (row.metric in SCALE_FREE_METRICS)
    one_pair = seed_spread(_factory, x, (3, 4), metrics="cka")
    assert one_pair["pairs"].tolist() == [1] and math.isnan(one_pair["sd"].item())


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(seeds=(0,)), ValueError, "seeds"),
    (dict(seeds=(1, 1)), ValueError, "seeds"),
    (dict(metrics=("euclid",)), ValueError, "metrics"),
    (dict(model_factory=3), TypeError, "model_factory"),
    (dict(model_factory=lambda s: "not a model"), TypeError, "nn.Module"),
])
def test_seed_spread_bad_input(kwargs, error, word):
    args = dict(model_factory=_factory, x=torch.randn(4, 3, dtype=F64))
    args.update(kwargs)
    with pytest.raises(error, match=word):
        seed_spread(**args)
