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


@pytest.mark.parametrize("pixelfly, lowrank_part, spread, seeds, expected, count", [
    (0.5, 0.9, 0.01, 3, True, False),      # below both parts (0.9, 1.7) at every temperature, every seed: held
    (0.85, 0.9, 0.1, 3, None, True),       # below the low-rank part's mean, the paired interval straddles 0
    (1.5, 0.9, 0.01, 3, False, False),     # above its low-rank part on every seed: refuted
    (1.2, 1.4, 0.01, 3, None, False),      # below both parts, but all three worse than zero: cannot favour it
    (0.5, 0.9, 0.01, 1, None, False),      # one seed: no interval, no verdict
])
def test_attention_claim_is_pixelfly_against_its_parts(monkeypatch, tmp_path, pixelfly, lowrank_part, spread, seeds,
                                                       expected, count):
    from pixelfly_lab.studies import attention as study
    from pixelfly_lab.studies.estimators import PIXELFLY_PARTS

    base = {"topk": 0.8, "lowrank (SVD)": 0.6, "topk+lowrank": 0.1, "local": 1.8, "bigbird": 2.0, "butterfly": 1.7,
            "performer": 0.9, "scatterbrain": 0.7, "pixelfly": pixelfly, "pixelfly: sparse part": 1.7,
            "pixelfly: low-rank part": lowrank_part}
    families = {**ATTENTION_METHODS, **PIXELFLY_PARTS}

    def fake(n, temperatures, budget, seeds, parts=False, **_):
        assert parts
        rows = [dict(temperature=float(t), seed=s, method=m,
                     role="oracle" if m in ATTENTION_ORACLES else "part" if m in PIXELFLY_PARTS else "estimator",
                     family=families[m], top_mass=0.5, kept=0.25 if m in study.SPARSE_ESTIMATORS else np.nan,
                     # the hottest temperature carries the seed-to-seed spread (sd = spread for 3 seeds)
                     error=e + (spread * (s - 1) if m == "pixelfly" and t == max(temperatures) else 0.0))
                for t in temperatures for s in range(seeds) for m, e in base.items()]
        return pd.DataFrame(rows)

    monkeypatch.setattr(study, "attention_table", fake)
    config = study.AttentionConfig(n=64, seeds=seeds, temperatures=2, block_size=4)
    claims = study.run(tmp_path, config)
    paper = [c for c in claims if c.kind == "paper"]
    assert len(paper) == 1 and paper[0].held is expected and not paper[0].members
    claim = paper[0]
    assert "below that of each of its parts at every temperature" in claim.claim and "held when" in claim.claim
    assert "cannot favour either" in claim.claim and "intersection-union over 8 comparisons" in claim.claim
    # one seed count, for the critical comparison, and only when more seeds could decide
    assert claim.seeds == seeds and (claim.seeds_to_decide is not None) == count
    assert ("both Pixelfly and its part are worse than predicting zero" in claim.measured) == (pixelfly > 1 and
                                                                                              lowrank_part > 1)
    readings = [c for c in claims if c.kind == "info" and c.claim.startswith("Estimators at equal budget")]
    assert len(readings) == 2 and all(c.held is None for c in readings)


def test_pixelfly_parts_are_its_support_and_its_features():
    from pixelfly_lab.nn.attention import attention_layout
    from pixelfly_lab.studies.estimators import PIXELFLY_PARTS, performer_rank, pixelfly_parts

    q, k = attention_inputs(64, seed=4)
    parts = pixelfly_parts(q, k, 0.7, 0.25, block_size=8, seed=1)
    assert set(parts) == set(PIXELFLY_PARTS)
    layout, m = attention_layout("pixelfly", 64, 0.25, 8)
    support = layout_to_mask(layout, 8)
    torch.testing.assert_close(parts["pixelfly: low-rank part"], performer_attention(q, k, 0.7, m, seed=1))
    # Pixelfly is exact on its support: restricted there and renormalised it is its sparse part
    whole = pixelfly_attention(q, k, 0.7, 0.25, block_size=8, seed=1)
    on_support = whole * support
    torch.testing.assert_close(on_support / on_support.sum(-1, keepdim=True), parts["pixelfly: sparse part"])
    assert (parts["pixelfly: sparse part"][~support] == 0).all() and not torch.allclose(whole, on_support)
    assert performer_rank(256, 0.25) == 32 and performer_rank(4, 0.1) == 1
    table = attention_table(64, [1.0], 0.25, seeds=1, block_size=8, parts=True, progress=False)
    assert set(table[table.role == "part"].method) == set(PIXELFLY_PARTS)


@pytest.mark.parametrize("ratios, densities, expected", [
    ([1.02, 0.99, 1.03, 1.00, 1.01, 0.98], (0.1875, 0.1875), True),     # within +-15%, tight: held
    ([1.50, 1.55, 1.45, 1.52, 1.48, 1.51], (0.1875, 0.1875), False),    # BigBird 1.5x slower: refuted
    ([0.80, 1.40, 0.90, 1.30, 1.00, 1.20], (0.1875, 0.1875), None),     # noisy: the interval crosses a margin
    ([1.02, 0.99, 1.03, 1.00, 1.01, 0.98], (0.1875, 0.25), None),       # not equal budget: undecided
])
def test_bigbird_speed_claim_is_an_equivalence_test(monkeypatch, tmp_path, ratios, densities, expected):
    from pixelfly_lab.studies import long_range

    table = pd.DataFrame([dict(repeat=i, pixelfly_ms=10.0, bigbird_ms=10.0 * r, log_ratio=math.log(r), load_avg=1.0)
                          for i, r in enumerate(ratios)])
    monkeypatch.setattr(long_range, "bigbird_timings", lambda config: (table, dict(zip(("pixelfly", "bigbird"),
                                                                                      densities))))
    claim = long_range._bigbird_claim(tmp_path, long_range.TINY, "# machine")
    assert claim.held is expected and claim.kind == "paper" and claim.seeds == len(ratios)
    assert "within +-log(1.15)" in claim.claim and "fixed before measuring" in claim.claim
    assert ("not equal budget" in claim.measured) == (densities[0] != densities[1])
    assert ("because Pixelfly is faster than BigBird (1.50x its speed)" in claim.measured) == (expected is False)
    assert (tmp_path / "bigbird_speed.png").is_file() and (tmp_path / "bigbird_speed.csv").is_file()


def test_bigbird_timings_compare_equal_densities():
    from pixelfly_lab.studies import long_range

    table, density = long_range.bigbird_timings(long_range.TINY)
    assert len(table) == long_range.TINY.bigbird_repeats and (table[["pixelfly_ms", "bigbird_ms"]] > 0).all().all()
    assert table.log_ratio.to_numpy() == pytest.approx(np.log(table.bigbird_ms / table.pixelfly_ms).to_numpy())
    assert density["bigbird"] == pytest.approx(density["pixelfly"], rel=long_range.SAME_DENSITY)
