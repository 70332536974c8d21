"""Attention estimators and oracles (pixelfly_lab.studies.estimators) against exact limits and the layer."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pixelfly_lab.studies.estimators import (ATTENTION_ESTIMATORS, ATTENTION_METHODS, ATTENTION_ORACLES, attention_table,
                                    fixed_sparse_attention, performer_attention, pixelfly_attention,
                                    sparse_lowrank_attention)
from pixelfly_lab.nn.attention import PixelflyAttention
from pixelfly_lab.structure.masks import flat_butterfly_mask, layout_to_mask
from pixelfly_lab.approx.targets import attention_inputs

F64 = torch.float64


def test_sparse_lowrank_attention_is_exact_on_full_support_and_performer_on_none():
    q, k = attention_inputs(32, seed=3)
    full, empty = torch.ones(32, 32, dtype=torch.bool), torch.zeros(32, 32, dtype=torch.bool)
    torch.testing.assert_close(sparse_lowrank_attention(q, k, 0.3, 4, full), torch.softmax(q @ k.T / 0.3, -1))
    torch.testing.assert_close(sparse_lowrank_attention(q, k, 2.0, 8, empty), performer_attention(q, k, 2.0, 8))
    with pytest.raises(ValueError, match="support"):
        sparse_lowrank_attention(q, k, 1.0, 4, full[:16])
    with pytest.raises(ValueError, match="support"):
        sparse_lowrank_attention(q, k, 1.0, 4, full.float())


def test_fixed_sparse_attention_is_masked_softmax():
    q, k = attention_inputs(64, seed=1)
    layout = flat_butterfly_mask(8, 2)
    mask = layout_to_mask(layout, 8)
    expected = torch.softmax((q @ k.T / 0.5).masked_fill(~mask, float("-inf")), -1)
    got = fixed_sparse_attention(q, k, 0.5, layout, 8)
    torch.testing.assert_close(got, expected)
    assert (got[~mask] == 0).all()


@pytest.mark.parametrize("seed", [0, 2])
def test_pixelfly_attention_is_the_matrix_the_layer_applies(seed):
    torch.manual_seed(seed)
    n, dim = 64, 8
    layer = PixelflyAttention(dim, heads=1, seq_len=n, budget=0.25, block_size=8, seed=seed, layout="pixelfly").double()
    x = torch.randn(1, n, dim, dtype=F64)
    q, k = layer.q(x)[0].detach(), layer.k(x)[0].detach()
    ours = pixelfly_attention(q, k, math.sqrt(dim), 0.25, block_size=8, seed=seed)
    torch.testing.assert_close(ours, layer.attention_matrix(x)[0, 0].detach())


def test_attention_table_separates_oracles_from_estimators():
    df = attention_table(64, [0.05, 10.0], 0.25, seeds=1, block_size=8, progress=False)
    assert set(df.method) == set(ATTENTION_METHODS) == set(ATTENTION_ORACLES) | set(ATTENTION_ESTIMATORS)
    assert set(df[df.role == "oracle"].method) == set(ATTENTION_ORACLES)
    assert df.error.notna().all() and (df.error >= 0).all()
    cold = df[df.temperature == 0.05].set_index("method").error
    hot = df[df.temperature == 10.0].set_index("method").error
    # the regimes: cold rows are nearly one-hot (top-k nearly exact), hot ones nearly uniform
    assert cold["topk"] < 0.05 < cold["lowrank (SVD)"] and hot["lowrank (SVD)"] < 0.1 < hot["topk"]
    # a fixed support renormalised over a share d of the keys of a nearly uniform matrix: error
    # sqrt(1/d - 1) (exact for uniform rows when every row keeps d n keys)
    density = df[(df.method == "butterfly")].kept.iloc[0]
    assert hot["butterfly"] == pytest.approx(math.sqrt(1 / density - 1), rel=0.05)
    # the top-k oracle keeps the best k entries: no support of at most k entries beats it
    local = df[df.method == "local"]
    assert (local.kept <= 0.25).all() and df[df.role == "oracle"].kept.isna().all()
    assert (df[df.method == "topk"].error.values <= local.error.values + 1e-12).all()
    assert df.top_mass.iloc[0] > df.top_mass.iloc[-1]


@pytest.mark.parametrize("pixelfly, spread, seeds, expected", [
    (0.5, 0.01, 3, True),      # below performer (0.9) and every sparse estimator (>= 1.7) on every seed
    (0.85, 0.1, 3, None),      # below performer's mean, but the paired interval straddles 0: undecided
    (1.5, 0.01, 3, False),     # above performer on every seed: refuted
    (0.5, 0.01, 1, None),      # one seed: no interval, no verdict
])
def test_attention_claim_decides_on_paired_intervals(monkeypatch, tmp_path, pixelfly, spread, seeds,
                                                              expected):
    from pixelfly_lab.studies import attention as study

    base = {"topk": 0.8, "lowrank (SVD)": 0.6, "topk+lowrank": 0.1, "local": 1.8, "bigbird": 2.0, "butterfly": 1.7,
            "performer": 0.9, "scatterbrain": 0.7, "pixelfly": pixelfly}

    def fake(n, temperatures, budget, seeds, **_):
        rows = [dict(temperature=float(t), seed=s, method=m, role="oracle" if m in ATTENTION_ORACLES else "estimator",
                     family=ATTENTION_METHODS[m], top_mass=0.5, kept=0.25 if m in study.SPARSE_ESTIMATORS else np.nan,
                     # the worst temperature carries the seed-to-seed spread (sd = spread for 3 seeds)
                     error=e + (spread * (s - 1) if m == "pixelfly" and t == max(temperatures) else 0.0))
                for t in temperatures for s in range(seeds) for m, e in base.items()]
        return pd.DataFrame(rows)

    monkeypatch.setattr(study, "attention_table", fake)
    config = study.AttentionConfig(n=64, seeds=seeds, temperatures=2, block_size=4)
    claims = [c for c in study.run(tmp_path, config) if c.kind == "paper"]
    assert len(claims) == 1 and claims[0].held is expected and len(claims[0].members) == 2  # the two regimes
    claim = claims[0]
    assert ("undecided, e.g. with one seed" in claim.claim and "worse than predicting the zero matrix" in claim.claim
            and "random features" in claim.claim)
    assert claim.seeds == seeds and (claim.seeds_to_decide is None) == (expected is not None or seeds == 1)
