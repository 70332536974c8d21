"""The theorems' instruments (pixelfly_lab.studies.theorems): block butterflies, the Thm 1 gap, the Thm 3 NTK change."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pixelfly_lab.structure.masks import butterfly_factor_mask, butterfly_product_mask
from pixelfly_lab.structure.projections import relative_error
from pixelfly_lab.approx.targets import random_butterfly_factors
from pixelfly_lab.studies.theorems import (_mlp, _ntk, block_butterfly_factor_masks, fit_factor_product,
                                 fit_factor_product_restarts, loglog_slope,
                                 ntk_change_vs_width, residual_flat_gap)

F64 = torch.float64


def test_block_butterfly_masks_count_and_cover():
    n = 32
    assert all(torch.equal(m, butterfly_factor_mask(n, 1 << k)) for k, m in enumerate(block_butterfly_factor_masks(n)))
    for b in (2, 4):
        masks = block_butterfly_factor_masks(n, b)
        assert len(masks) == (n // b).bit_length() - 1
        assert all(m.sum().item() == 2 * n * b for m in masks)             # 2 n b parameters per factor
        product = torch.eye(n, dtype=F64)
        for m in masks:
            product = m.to(F64) @ product
        assert (product > 0).all()                                          # full depth: dense support
    assert len(block_butterfly_factor_masks(16, 2, 5)) == 5                 # deeper: strides cycle
    with pytest.raises(ValueError, match="power of two"):
        block_butterfly_factor_masks(24, 2)
    with pytest.raises(ValueError, match="n_factors"):
        block_butterfly_factor_masks(16, 2, 0)


def test_block_butterfly_contains_butterfly_exactly():
    # B_n ... B_4 B_2 = F_{last} ... F_0 with F_0 = B_4 B_2 and F_k = B_{2^(k+2)}: block 2 contains butterfly
    n = 16
    factors = random_butterfly_factors(n, seed=4)
    masks = block_butterfly_factor_masks(n, 2)
    merged = [factors[1] @ factors[0]] + factors[2:]
    assert all(((f != 0) <= m).all() for f, m in zip(merged, masks))
    assert torch.allclose(torch.linalg.multi_dot(merged[::-1]), torch.linalg.multi_dot(factors[::-1]))


def test_fit_factor_product_finds_members_and_not_outsiders():
    n = 8
    masks = block_butterfly_factor_masks(n)
    generator = torch.Generator().manual_seed(0)
    member = torch.linalg.multi_dot([torch.randn(n, n, generator=generator, dtype=F64) * m for m in masks][::-1])
    assert fit_factor_product(member, masks, steps=800) < 1e-3
    outsider = torch.randn(n, n, generator=generator, dtype=F64)            # 64 entries, 48 parameters
    assert fit_factor_product(outsider, masks, steps=300) > 0.05


def test_residual_flat_gap_relative_to_the_perturbation_is_first_order():
    df = residual_flat_gap(16, np.logspace(-4, -2, 4), seed=2)
    assert loglog_slope(df.lam, df.gap_over_change) == pytest.approx(1.0, abs=0.01)
    factors = random_butterfly_factors(16, seed=2)
    eye, lam = torch.eye(16, dtype=F64), df.lam.iloc[-1]
    residual = torch.linalg.multi_dot([eye + lam * f for f in factors[::-1]])
    flat = eye + lam * sum(factors)
    expected = (torch.linalg.norm(residual - flat) / torch.linalg.norm(residual - eye)).item()
    assert df.gap_over_change.iloc[-1] == pytest.approx(expected, rel=1e-10)


def test_ntk_is_the_gram_matrix_of_per_sample_gradients():
    torch.manual_seed(0)
    width, n, d = 32, 5, 4
    params = {"w1": torch.randn(width, d, dtype=F64), "w2": torch.randn(width, width, dtype=F64),
              "v": torch.randn(width, dtype=F64)}
    mask = (torch.rand(width, width) < 0.3).to(F64)
    x = torch.randn(n, d, dtype=F64)
    grads = []
    for i in range(n):
        leaves = {k: p.clone().requires_grad_() for k, p in params.items()}
        out = _mlp(leaves, x[i:i + 1], mask, 10)[0]
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, list(leaves.values()))]))
    grads = torch.stack(grads)
    torch.testing.assert_close(_ntk(params, x, mask, 10), grads @ grads.T)


def test_ntk_change_shrinks_with_width_and_loss_vanishes():
    df = ntk_change_vs_width((32, 256), sparse=True, steps=200)
    assert df.density.tolist() == [3 / 16, 3 / 16]
    assert df.ntk_change.iloc[1] < 0.7 * df.ntk_change.iloc[0]
    assert (df.loss_ratio < 1e-2).all()
    dense = ntk_change_vs_width((32,), sparse=False, steps=5)
    assert dense.density.tolist() == [1.0] and 0 < dense.ntk_change.iloc[0] < 1


def test_fit_restarts_report_every_restart_and_the_best_is_the_fit():
    masks = block_butterfly_factor_masks(8)
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    errors = fit_factor_product_restarts(target, masks, steps=40, restarts=3)
    assert len(errors) == 3 and len(set(errors)) == 3                      # different starts, different ends
    assert min(errors) == fit_factor_product(target, masks, steps=40, restarts=3)


@pytest.mark.parametrize("deep_error, expected", [(0.5, None), (0.1, True), (0.01, False)])
def test_block_butterfly_claim_is_undecided_when_a_containing_fit_is_worse(monkeypatch, tmp_path, deep_error,
                                                                            expected):
    # every fitted class contains the plain butterfly: fitting worse than it means no convergence
    from pixelfly_lab.studies import theory as study

    def fake(n, block_sizes, steps, kinds=("hadamard", "butterfly")):
        rows = []
        for kind in kinds:
            rows += [dict(kind=kind, method="butterfly (log2 n factors)", block_size=1, n_factors=4, params=128,
                          error=0.1, error_worst=0.2),
                     dict(kind=kind, method="block butterfly (block 4)", block_size=4, n_factors=2, params=256,
                          error=0.05, error_worst=0.06),
                     dict(kind=kind, method="butterfly, params of block 4", block_size=1, n_factors=8, params=256,
                          error=deep_error, error_worst=deep_error)]
        return pd.DataFrame(rows)

    monkeypatch.setattr(study, "block_vs_butterfly", fake)
    reading, claim, _ = study._block_butterfly(tmp_path, study.TheoryConfig(n_block=16, block_sizes=(4,)))
    assert reading.kind == "info" and reading.held is None and ("worse than the plain" in reading.measured) == (
        deep_error > 0.1 + study.BLOCK_TOLERANCE)
    assert "hadamard" in reading.measured and "dct" in claim.measured and "gaussian" in claim.measured
    assert claim.held is expected and claim.kind == "paper" and "undecided" in claim.claim
    assert claim.measured.startswith("undecided") == (expected is None)


@pytest.mark.parametrize("sparse_slope, sparse_scale, seeds, expected", [
    (-0.5, 1.0, 2, True),      # the predicted slope, the dense network's size
    (-0.2, 1.0, 2, False),     # shrinks too slowly
    (-0.5, 2.0, 2, False),     # shrinks, but moves twice as much as dense
    (-0.5, 1.0, 1, None),      # one seed: undecided
])
def test_thm3_claim_needs_the_slope_and_the_dense_comparison(monkeypatch, tmp_path, sparse_slope, sparse_scale, seeds,
                                                             expected):
    from pixelfly_lab.studies import theory as study

    def fake(widths, sparse, steps, seeds):
        slope, scale = (sparse_slope, sparse_scale) if sparse else (-0.5, 1.0)
        return pd.DataFrame([dict(width=w, seed=s, density=0.2 if sparse else 1.0, loss_ratio=1e-9,
                                  ntk_change=scale * (w / 64) ** slope * (1 + 0.01 * s))
                             for w in widths for s in range(seeds)])

    monkeypatch.setattr(study, "ntk_change_vs_width", fake)
    claim, convergence = study._thm3(tmp_path, study.TheoryConfig(widths=(64, 128, 256), ntk_seeds=seeds))
    assert claim.held is expected and "undecided with one seed" in claim.claim
    assert convergence.held is True and "positive control" in convergence.claim  # both losses fall to 1e-9
    assert f"<= {study.THM3_SLOPE}" in claim.claim and f"{study.THM3_DENSE_FACTOR} x the dense" in claim.claim
