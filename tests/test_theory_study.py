"""The theorems' instruments (pixelfly_lab.studies.theorems, .lazy_training) and the theory study's rules:
block butterflies and their closed-form factorisation, the Thm 1 gap, the Thm 3 NTK change."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pixelfly_lab.structure.masks import butterfly_factor_mask, butterfly_product_mask
from pixelfly_lab.structure.projections import relative_error
from pixelfly_lab.approx.targets import random_butterfly_factors
from pixelfly_lab.approx.targets import target_matrix
from pixelfly_lab.studies.lazy_training import mlp_ntk, mlp_output, ntk_change_vs_width
from pixelfly_lab.studies.theorems import (block_butterfly_factor_masks, butterfly_factorization, fit_factor_product,
                                           fit_factor_product_restarts, loglog_slope, residual_flat_gap)

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
        out = mlp_output(leaves, x[i:i + 1], mask, 10)[0]
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, list(leaves.values()))]))
    grads = torch.stack(grads)
    torch.testing.assert_close(mlp_ntk(params, x, mask, 10), grads @ grads.T)


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


def test_butterfly_factorization_is_exact_on_members_and_not_on_outsiders():
    n = 16
    for b in (1, 2, 4):
        masks = block_butterfly_factor_masks(n, b)
        generator = torch.Generator().manual_seed(b)
        member = torch.linalg.multi_dot([torch.randn(n, n, generator=generator, dtype=F64) * m for m in masks][::-1])
        factors = butterfly_factorization(member, b)
        assert len(factors) == len(masks) and all(((f != 0) <= m).all() for f, m in zip(factors, masks))
        assert relative_error(member, torch.linalg.multi_dot(factors[::-1])) < 1e-12
    for kind in ("hadamard", "butterfly"):                                  # both are butterfly products
        target = target_matrix(kind, n)
        assert relative_error(target, torch.linalg.multi_dot(butterfly_factorization(target)[::-1])) < 1e-12
    outsider = torch.randn(n, n, generator=torch.Generator().manual_seed(9), dtype=F64)
    assert relative_error(outsider, torch.linalg.multi_dot(butterfly_factorization(outsider)[::-1])) > 0.3
    with pytest.raises(ValueError, match="square"):
        butterfly_factorization(torch.ones(16, 8, dtype=F64))


def test_fit_from_the_closed_form_start_keeps_a_member_exact():
    n = 16
    target = target_matrix("hadamard", n)
    deep = block_butterfly_factor_masks(n, 1, 8)                            # 8 factors, strides cycling
    init = butterfly_factorization(target) + [torch.eye(n, dtype=F64)] * 4
    errors = fit_factor_product_restarts(target, deep, steps=30, restarts=1, init=init)
    assert len(errors) == 2 and errors[1] < 1e-10 < errors[0]               # random start: far; closed form: exact
    with pytest.raises(ValueError, match="one factor per mask"):
        fit_factor_product_restarts(target, deep, steps=1, init=init[:3])


@pytest.mark.parametrize("deep_error, home_error, expected", [
    (0.5, 1e-9, None),     # a class containing the plain butterfly fits worse than it: not converged
    (0.1, 1e-9, True),     # block within the tolerance of the equal-parameter butterfly
    (0.01, 1e-9, False),   # the equal-parameter butterfly fits better
    (0.1, 0.05, None),     # the positive control fails: an in-class target is not fitted to < 0.02
])
def test_block_butterfly_claim_needs_its_positive_control(monkeypatch, tmp_path, deep_error, home_error, expected):
    from pixelfly_lab.studies import theory as study

    def fake(n, block_sizes, steps, kinds=("hadamard", "butterfly"), restarts=2):
        home = kinds == ("hadamard", "butterfly")
        rows = []
        for kind in kinds:
            for method, b, k, error in (("butterfly (log2 n factors)", 1, 4, 0.1),
                                        ("block butterfly (block 4)", 4, 2, 0.05),
                                        ("butterfly, params of block 4", 1, 8, deep_error)):
                error = home_error if home else error
                rows.append(dict(kind=kind, method=method, block_size=b, n_factors=k, params=128 * b, error=error,
                                 error_worst=2 * error, error_random=error, error_init=error))
        return pd.DataFrame(rows)

    monkeypatch.setattr(study, "block_vs_butterfly", fake)
    reading, claim, _ = study._block_butterfly(tmp_path, study.TheoryConfig(n_block=16, block_sizes=(4,)))
    assert reading.kind == "info" and reading.held is None and "hadamard" in reading.measured
    assert "dct" in claim.measured and "gaussian" in claim.measured and claim.kind == "paper"
    assert claim.held is expected and "positive control" in claim.claim
    assert claim.measured.startswith("undecided") == (expected is None)
    assert ("positive control failed" in claim.measured) == (home_error >= study.IN_CLASS_TOLERANCE)


@pytest.mark.parametrize("sparse_slope, sparse_scale, loss, dense_slope, seeds, expected", [
    (-0.5, 1.0, 1e-9, -0.5, 3, True),      # the predicted slope, the dense network's size, the loss gone
    (-0.2, 1.0, 1e-9, -0.5, 3, False),     # shrinks too slowly
    (-0.5, 2.0, 1e-9, -0.5, 3, False),     # shrinks, but moves twice as much as dense
    (-0.5, 1.0, 0.5, -0.5, 3, False),      # the loss does not go to ~0
    (-0.5, 1.0, 1e-9, -0.2, 3, None),      # dense (the positive control) is not lazy: undecided
    (-0.5, 1.0, 1e-9, -0.5, 1, None),      # one seed: undecided
])
def test_thm3_is_one_claim_with_dense_as_its_gate(monkeypatch, tmp_path, sparse_slope, sparse_scale, loss,
                                                  dense_slope, seeds, expected):
    from pixelfly_lab.studies import theory as study

    def fake(widths, sparse, steps, seeds, n_samples):
        slope, scale, ratio = (sparse_slope, sparse_scale, loss) if sparse else (dense_slope, 1.0, 1e-9)
        return pd.DataFrame([dict(width=w, seed=s, density=0.2 if sparse else 1.0, fan_in=w // 5 if sparse else w,
                                  loss_ratio=ratio * (1 + 0.1 * s),
                                  ntk_change=scale * (1 + 0.01 * s) * (w / 64) ** (slope + 0.01 * s))
                             for w in widths for s in range(seeds)])

    monkeypatch.setattr(study, "ntk_change_vs_width", fake)
    (claim,) = study._thm3(tmp_path, study.TheoryConfig(widths=(64, 128, 256), ntk_seeds=seeds))
    assert claim.held is expected and claim.kind == "paper" and len(claim.members) == 3
    assert "undecided with one seed" in claim.claim and "positive control" in claim.claim
    assert "density 3/16 at every width" in claim.claim and "fan-in" in claim.measured
    assert ("positive control failed" in claim.measured) == (dense_slope > study.THM3_SLOPE and seeds > 1)
    if expected is False:   # labels after Holm only: the refuted member says so, none is refuted while held
        assert "refuted" in [m["verdict"] for m in claim.members]


def test_thm2_claim_and_existence_check_draw_different_seeds(monkeypatch, tmp_path):
    from pixelfly_lab.studies import theory as study

    drawn = []

    def recording(kind, n, seed=0, **options):
        drawn.append((options.get("temperature"), options.get("locality"), seed))
        return target_matrix(kind, n, seed, **options)

    monkeypatch.setattr(study, "target_matrix", recording)
    regime, check, _ = study._thm2(tmp_path, study.TINY)
    local = [seed for t, locality, seed in drawn if (t, locality) == (1.0, 1.0)]
    claim_seeds = {seed for seed in local if seed >= study.THM2_CLAIM_SEED0}
    check_seeds = set(local) - claim_seeds
    assert len(claim_seeds) == len(check_seeds) == study.TINY.sweep_seeds and not claim_seeds & check_seeds
    assert regime.kind == "paper" and check.kind == "check" and "[claim]" not in check.measured
