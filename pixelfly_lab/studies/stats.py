"""Small statistics for the studies' verdicts: mean and spread over seeds, a rank-correlation test.

A claim such as "a smaller NTK distance goes with a higher accuracy" is a statement about a
handful of points (one per sparsity pattern); a negative Spearman correlation happens by chance
often at that size. :func:`spearman_permutation_test` gives the probability of a correlation at
least as extreme under the null hypothesis that the pairing of x and y is random: exactly, by
enumerating every permutation of y when there are few points, otherwise from a seeded sample of
permutations.

Example:
    >>> rho, p = spearman_permutation_test([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    >>> rho, round(p * 120)     # the one permutation (of 5! = 120) as anti-correlated as this one
    (-1.0, 1)
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["ALTERNATIVES", "spearman", "spearman_permutation_test"]

ALTERNATIVES = ("less", "greater", "two-sided")


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a 1-D array, tied values given their average rank."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson_rows(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pearson correlation of the vector rx with every row of ry."""
    cx = rx - rx.mean()
    cy = ry - ry.mean(-1, keepdims=True)
    denominator = np.sqrt((cx ** 2).sum() * (cy ** 2).sum(-1))
    return (cy @ cx) / denominator


def _as_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = (np.asarray(v, dtype=float) for v in (x, y))
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"x and y need at least 3 points for a rank correlation, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite (no NaN or inf)")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("x and y must not be constant: the rank correlation is undefined")
    return x, y


def spearman(x, y) -> float:
    """Spearman's rank correlation rho: the Pearson correlation of the ranks (ties averaged).

    Args:
        x, y: sequences of the same length n >= 3, not constant.

    Returns:
        rho in [-1, 1].

    Example:
        >>> spearman([1, 2, 3], [1, 4, 9])
        1.0
    """
    x, y = _as_pair(x, y)
    return float(_pearson_rows(_ranks(x), _ranks(y)[None])[0])


def spearman_permutation_test(x, y, *, alternative: str = "less", n_permutations: int = 10_000,
                              max_exact: int = 40_320, seed: int = 0) -> tuple[float, float]:
    """Spearman's rho and its permutation p-value.

    Under the null hypothesis every pairing of x with a permutation of y is equally likely. The
    p-value is the share of pairings whose rho is at least as extreme as the observed one:
    ``'less'`` P(rho_perm <= rho) (the alternative "x and y are anti-correlated"), ``'greater'``
    P(rho_perm >= rho), ``'two-sided'`` P(|rho_perm| >= |rho|). With n! <= ``max_exact`` all n!
    permutations are enumerated (the exact p-value); otherwise ``n_permutations`` random ones are
    drawn from ``numpy.random.default_rng(seed)`` and p = (hits + 1) / (n_permutations + 1), which
    counts the observed pairing once and is never 0 (Phipson and Smyth 2010). A tolerance of 1e-12
    counts ties of rho as "at least as extreme".

    Args:
        x, y: sequences of the same length n >= 3, not constant.
        alternative: 'less', 'greater' or 'two-sided'.
        n_permutations: random permutations when the test is not exact; 10000 puts the Monte Carlo
            error of p near 0.05 at about 0.002.
        max_exact: enumerate when n! is at most this; 8! = 40320 keeps the exact test under a
            second.
        seed: seeds the random permutations (unused when exact).

    Returns:
        (rho, p).

    Example:
        >>> spearman_permutation_test([1, 2, 3, 4], [4, 3, 2, 1])   # exact: 1 of 4! = 24
        (-1.0, 0.041666666666666664)
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    for name, value in (("n_permutations", n_permutations), ("max_exact", max_exact), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, "
                             f"got {value!r}")
    x, y = _as_pair(x, y)
    rx, ry = _ranks(x), _ranks(y)
    rho = float(_pearson_rows(rx, ry[None])[0])
    n = len(x)
    exact = math.factorial(n) <= max_exact
    if exact:
        permuted = ry[np.array(list(itertools.permutations(range(n))))]
    else:
        rng = np.random.default_rng(seed)
        permuted = rng.permuted(np.broadcast_to(ry, (n_permutations, n)), axis=1)
    rhos = _pearson_rows(rx, permuted)
    tol = 1e-12
    if alternative == "less":
        hits = rhos <= rho + tol
    elif alternative == "greater":
        hits = rhos >= rho - tol
    else:
        hits = np.abs(rhos) >= abs(rho) - tol
    p = hits.mean() if exact else (hits.sum() + 1) / (n_permutations + 1)
    return rho, float(p)
