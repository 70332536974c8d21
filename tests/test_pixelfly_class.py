"""approximate(A, 'pixelfly', budget) as a class: never worse than either part, monotone in the budget."""

import pytest
import torch

from pixelfly_lab.approx.approximation import approximate
from pixelfly_lab.structure.patterns import make_pattern
from pixelfly_lab.approx.targets import target_matrix

F64 = torch.float64
BUDGETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def _on_support(n, block, seed=0):
    """A matrix in the class: a (16, 2) flat block butterfly part plus a rank-3 part."""
    generator = torch.Generator().manual_seed(seed)
    mask = make_pattern("butterfly", n, n, 3 / 16, block_size=block).mask()
    sparse = torch.randn(n, n, generator=generator, dtype=F64) * mask
    low = torch.randn(n, 3, generator=generator, dtype=F64) @ torch.randn(3, n, generator=generator, dtype=F64)
    return sparse + 0.3 * low / n ** 0.5


def _targets():
    yield "attention", target_matrix("attention", 64, seed=1)
    yield "sparse", target_matrix("sparse", 64, seed=2)
    yield "sparse_lowrank", target_matrix("sparse_lowrank", 64, seed=3)
    yield "on support", _on_support(64, 4)


@pytest.mark.parametrize("label, target", list(_targets()), ids=[label for label, _ in _targets()])
def test_pixelfly_is_never_worse_than_either_part_and_monotone_in_the_budget(label, target):
    # tol=0: every split's alternation runs towards its class optimum, the condition under which
    # the nested grid makes the error monotone in the budget. The alternation converges only
    # linearly: on the exact class member it stops near 1e-6 at some splits, hence that slack
    errors = []
    for budget in BUDGETS:
        best = approximate(target, "pixelfly", budget, block_size=4, max_iter=300, tol=0.0)
        assert best.budget <= budget + 1e-12
        sparse_alone = approximate(target, "butterfly", budget, block_size=4).error
        lowrank_alone = approximate(target, "lowrank", budget).error
        assert best.error <= min(sparse_alone, lowrank_alone) + 1e-12
        # the shares 0 and 1 asked for explicitly are the parts alone, and on the grid
        assert approximate(target, "pixelfly", budget, block_size=4, lowrank_share=1.0).error == pytest.approx(
            lowrank_alone, abs=1e-12)
        assert best.error <= approximate(target, "pixelfly", budget, block_size=4, lowrank_share=0.0).error + 1e-12
        errors.append(best.error)
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors


def test_pixelfly_finds_the_split_of_a_matrix_in_the_class_and_reports_it():
    target = _on_support(64, 4)
    best = approximate(target, "pixelfly", 3 / 16 + 0.2, block_size=4, max_iter=300, tol=0.0)
    assert best.error < 1e-6
    assert best.rank >= 3 and 0.0 < best.lowrank_share < 1.0
    assert best.sparse_budget == pytest.approx(best.pattern.sparse_params / 64 ** 2)
    assert best.lowrank_share == pytest.approx(best.rank * 128 / best.params)
    # neither part alone gets there
    assert approximate(target, "butterfly", 0.4, block_size=4).error > 0.05
    assert approximate(target, "lowrank", 0.4).error > 0.05


def test_the_grid_of_splits_is_nested_across_budgets():
    target = target_matrix("gaussian", 64, seed=4)
    previous = {}
    for budget in BUDGETS:
        rows = approximate(target, "pixelfly", budget, block_size=4).candidates
        splits = {(r["butterfly_size"], r["n_factors"]): r["rank"] for r in rows}
        assert (0, 0) in splits and splits[(0, 0)] >= 1                    # rank alone: share 1
        for split, rank in previous.items():                                # every earlier split, rank >= before
            assert splits[split] >= rank
        previous = splits


def test_lowrank_share_is_validated():
    target = target_matrix("gaussian", 32)
    with pytest.raises(ValueError, match="lowrank_share"):
        approximate(target, "pixelfly", 0.3, block_size=4, lowrank_share=1.5)
    with pytest.raises(ValueError, match="block_size"):
        approximate(target_matrix("gaussian", 36), "pixelfly", 0.3, block_size=5)


@pytest.mark.parametrize("name", ["random+lowrank", "local+lowrank"])
def test_lowrank_baselines_get_a_split_search_like_pixelfly(name):
    # the baseline's class contains its sparse part alone and rank alone: never worse than either
    target = target_matrix("attention", 64, seed=1, temperature=1.0, locality=1.0)
    best = approximate(target, name, 0.3, block_size=4)
    for share in (0.0, 1.0):
        assert best.error <= approximate(target, name, 0.3, block_size=4, lowrank_share=share).error + 1e-12
    assert len(best.candidates) >= 3 and best.params <= 0.3 * target.numel()
    assert best.error == min(c["error"] for c in best.candidates)
