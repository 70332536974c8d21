"""The expressiveness study's low-rank check is run at a budget that holds the target's rank."""

from dataclasses import replace

import pytest

from pixelfly_lab.studies import expressiveness


def test_lowrank_check_uses_the_smallest_budget_that_holds_the_rank():
    # n=64, rank 2: low rank alone needs 2 n r / n^2 = 0.0625 of the entries; 0.05 cannot hold it
    config = replace(expressiveness.TINY, n=64, budgets=(0.05, 0.1, 0.25), seeds=1)
    claim = expressiveness._lowrank_claim(config, "figure.png")
    assert "budget 0.1," in claim.claim
    assert claim.held is True, claim.measured


def test_lowrank_check_refuses_budgets_that_hold_no_rank():
    config = replace(expressiveness.TINY, n=64, budgets=(0.01, 0.05), seeds=1)
    with pytest.raises(ValueError, match="budgets"):
        expressiveness._lowrank_claim(config, "figure.png")
