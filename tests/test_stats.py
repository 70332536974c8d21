"""The permutation test against known cases and a brute-force oracle."""

import itertools
import math

import numpy as np
import pytest

from pixelfly_lab.studies.stats import spearman, spearman_permutation_test


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_perfect_anticorrelation_has_the_exact_p(n):
    # only the identity pairing of the reversed order reaches rho = -1: p = 1 / n!
    rho, p = spearman_permutation_test(range(n), range(n, 0, -1))
    assert rho == pytest.approx(-1.0)
    assert p == pytest.approx(1 / math.factorial(n))
    assert spearman_permutation_test(range(n), range(n), alternative="greater")[1] == pytest.approx(
        1 / math.factorial(n))
    assert spearman_permutation_test(range(n), range(n), alternative="two-sided")[1] == pytest.approx(
        2 / math.factorial(n))


def _oracle(x, y, alternative):
    """Spearman by 1 - 6 sum d^2 / (n (n^2 - 1)) (no ties) over every permutation, in plain Python."""
    n = len(x)
    rank = lambda v: [sorted(v).index(a) for a in v]  # noqa: E731 (no ties in these inputs)
    rx, ry = rank(x), rank(y)
    rho_of = lambda r: 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, r)) / (n * (n * n - 1))  # noqa: E731
    rho = rho_of(ry)
    rhos = [rho_of([ry[i] for i in perm]) for perm in itertools.permutations(range(n))]
    test = {"less": lambda r: r <= rho + 1e-12, "greater": lambda r: r >= rho - 1e-12,
            "two-sided": lambda r: abs(r) >= abs(rho) - 1e-12}[alternative]
    return rho, sum(map(test, rhos)) / len(rhos)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alternative", ["less", "greater", "two-sided"])
def test_exact_test_matches_brute_force(seed, alternative):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=6)
    y = -0.7 * x + rng.normal(size=6)
    rho, p = spearman_permutation_test(x, y, alternative=alternative)
    want_rho, want_p = _oracle(list(x), list(y), alternative)
    assert rho == pytest.approx(want_rho, abs=1e-12)
    assert p == pytest.approx(want_p, abs=1e-12)


def test_monte_carlo_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(3)
    x = rng.normal(size=7)
    y = -0.5 * x + rng.normal(size=7)
    _, exact = spearman_permutation_test(x, y)
    _, sampled = spearman_permutation_test(x, y, max_exact=1, n_permutations=4000, seed=5)
    assert sampled == spearman_permutation_test(x, y, max_exact=1, n_permutations=4000, seed=5)[1]
    assert abs(sampled - exact) < 0.03  # 4 sd of a Monte Carlo estimate with 4000 draws near p = 0.2
    # never 0: the observed pairing counts once
    assert spearman_permutation_test(range(12), range(12, 0, -1), n_permutations=100)[1] == pytest.approx(1 / 101)


def test_ties_get_average_ranks():
    # ranks of x: 0, 1.5, 1.5, 3; Pearson of those with 0..3
    expected = np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    assert spearman([1, 2, 2, 5], [1, 2, 3, 4]) == pytest.approx(expected)


@pytest.mark.parametrize("x, y, match", [([1, 2], [2, 1], "at least 3"), ([1, 2, 3], [1, 2], "same length"),
                                         ([1, 1, 1], [1, 2, 3], "constant"), ([1, 2, np.nan], [1, 2, 3], "finite")])
def test_bad_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        spearman_permutation_test(x, y)


def test_bad_options():
    with pytest.raises(ValueError, match="alternative"):
        spearman_permutation_test([1, 2, 3], [3, 2, 1], alternative="lower")
    with pytest.raises(ValueError, match="n_permutations"):
        spearman_permutation_test([1, 2, 3], [3, 2, 1], n_permutations=0)
