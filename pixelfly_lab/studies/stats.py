"""The studies' decision rules: paired tests with a stated power, Holm across a family, rank correlations.

A comparison claim ("Pixelfly's NTK is closer to dense's than random's", "Pixelfly is not worse
than the best other pattern by more than 1 point") is decided from the *paired* differences, one
per seed (both sides measured with the same seed, data and reference), by a confidence interval
of their mean: a Student t interval (``scipy.stats.t``; the differences of a handful of seeds are
assumed roughly normal). With ``alpha`` the interval is the two-sided (1 - 2 alpha) one, so each
of its ends is a one-sided test at level ``alpha`` (the two one-sided tests of an equivalence
test, Schuirmann 1987):

* ``alternative='greater'`` (the claim: mean difference > ``margin``): held when the interval lies
  above the margin, refuted when it lies below it, otherwise undecided. A "not worse by more than
  m" claim is ``'greater'`` with ``margin=-m``; "better by at least m" is ``margin=m``.
* ``'less'``: the mirror image.
* ``'equivalent'`` (the claim: |mean| < ``margin``, parity): held when the interval lies inside
  (-margin, margin), refuted when it lies wholly outside on one side, otherwise undecided.

More seeds shrink the interval, so an undecided claim becomes decided: :func:`seeds_for_power` is
the number of seeds at which a true difference ``effect`` would be decided with probability
``power`` (the noncentral t distribution, ``scipy.stats.nct``), and the report prints it for every
undecided claim from the run's own mean and sd. Non-significance is never a refutation.

Several claims tried as one family (two primary Pixelfly layers; two distance metrics) are
corrected by Holm's step-down procedure (:func:`holm`; Holm 1979): the family is held when some
member is held after the correction.

Rank correlations (:func:`rank_correlation_verdict`): Spearman's rho with a permutation test
(``scipy.stats.permutation_test``, exact over every pairing up to 8 points); held when the claimed
sign is significant, refuted only when the *opposite* sign is, otherwise undecided.

Example:
    >>> paired_verdict([0.30, 0.25, 0.35, 0.28], margin=0.0)           # clearly above 0
    'held'
    >>> paired_verdict([-0.30, -0.25, -0.35, -0.28], margin=0.0)
    'refuted'
    >>> paired_verdict([0.1, -0.2, 0.15, -0.1], margin=0.0)
    'undecided'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

__all__ = ["ALTERNATIVES", "VERDICTS", "Decision", "paired_decision", "paired_verdict", "seeds_for_power", "holm",
           "family_verdicts", "every_held", "rank_correlation_verdict", "spearman", "spearman_permutation_test"]

ALTERNATIVES = ("greater", "less", "equivalent")
VERDICTS = ("held", "refuted", "undecided")
MAX_SEEDS = 10_000  # seeds_for_power's search stops here (a difference that small is not worth deciding)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be a number in (0, 0.5), got {alpha!r}")
    return float(alpha)


def _check_differences(differences) -> np.ndarray:
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1:
        raise ValueError(f"differences must be 1-D (one per seed), got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("differences must be finite (no NaN or inf)")
    return d


@dataclass(frozen=True)
class Decision:
    """A paired comparison and its verdict (see the module docstring).

    Attributes:
        verdict: 'held', 'refuted' or 'undecided'.
        mean, sd: mean and sample sd of the differences; n: how many (seeds).
        low, high: the (1 - 2 alpha) t interval of the mean (nan with n < 2).
        p_held, p_refuted: one-sided p-values of the claim and of its opposite (the largest and
            smallest over the two sides for 'equivalent'); 1.0 with n < 2.
        margin, alternative, alpha: the rule.
        hold_tests, refute_tests: how many tests share alpha on the way to held / to refuted (a
            family's Holm, the others of an intersection-union refutation): the seed count that
            would decide divides alpha by them (Bonferroni, the worst case of Holm).
    """

    verdict: str
    mean: float
    sd: float
    n: int
    low: float
    high: float
    p_held: float
    p_refuted: float
    margin: float
    alternative: str
    alpha: float
    hold_tests: int = 1
    refute_tests: int = 1

    def shared(self, tests: int) -> "Decision":
        """This decision as one of ``tests`` members of a Holm family (for :meth:`seeds_to_decide`)."""
        return replace(self, hold_tests=self.hold_tests * tests, refute_tests=self.refute_tests * tests)

    def boundary(self) -> float:
        """The margin the mean is nearest to on the way to a verdict (the bound it must clear)."""
        if self.alternative != "equivalent":
            return self.margin
        return self.margin if self.mean >= 0 else -self.margin

    def seeds_to_decide(self, power: float = 0.8) -> int | None:
        """Seeds at which a true difference equal to this mean and sd would be decided with ``power``.

        None when the mean sits on the boundary (no number of seeds decides it) or with n < 2.
        """
        if self.n < 2:
            return None
        toward_held = (self.mean > self.boundary()) == (self.alternative != "less")
        if self.alternative == "equivalent":
            toward_held = abs(self.mean) < self.margin
        tests = self.hold_tests if toward_held else self.refute_tests
        return seeds_for_power(self.sd, self.mean, self.boundary(), power=power, alpha=self.alpha / tests)

    def describe(self, digits: int = 3) -> str:
        """'+0.012 [-0.003, +0.027], 3 seeds' (mean, interval, seeds)."""
        if self.n < 2:
            return f"{self.mean:+.{digits}f} ({self.n} seed: no interval)"
        return (f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
                f"({100 * (1 - 2 * self.alpha):.0f}% t interval, {self.n} seeds)")


def paired_decision(differences, *, margin: float = 0.0, alpha: float = 0.05,
                    alternative: str = "greater") -> Decision:
    """Decide a paired comparison from its per-seed differences (the module docstring's rules).

    Args:
        differences: (n,) per-seed differences, signed so that the claim says "large"
            (e.g. other pattern's distance minus Pixelfly's, for "Pixelfly is closer").
        margin: the threshold of the claim (``'equivalent'``: the half-width of the parity band, > 0).
        alpha: the level of each one-sided test; the interval is the (1 - 2 alpha) t interval.
        alternative: 'greater', 'less' or 'equivalent'.

    Returns:
        :class:`Decision`. With n < 2 (no sd) 'undecided'; with sd 0 the interval is the mean itself.
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.floating)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    if alternative == "equivalent" and margin <= 0:
        raise ValueError(f"margin must be > 0 for alternative='equivalent' (the parity band), got {margin!r}")
    alpha = _check_alpha(alpha)
    d = _check_differences(differences)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n >= 2 else float("nan")
    rule = dict(margin=float(margin), alternative=alternative, alpha=alpha)
    if n < 2:
        return Decision("undecided", mean, sd, n, float("nan"), float("nan"), 1.0, 1.0, **rule)
    sem = sd / math.sqrt(n)
    half = float(sps.t.ppf(1 - alpha, n - 1)) * sem

    def p_above(bound: float) -> float:  # one-sided p of "mean > bound"
        if sem == 0:
            return 0.0 if mean > bound else 1.0
        return float(sps.t.sf((mean - bound) / sem, n - 1))

    def p_below(bound: float) -> float:
        if sem == 0:
            return 0.0 if mean < bound else 1.0
        return float(sps.t.cdf((mean - bound) / sem, n - 1))

    if alternative == "greater":
        p_held, p_refuted = p_above(margin), p_below(margin)
    elif alternative == "less":
        p_held, p_refuted = p_below(margin), p_above(margin)
    else:
        p_held = max(p_above(-margin), p_below(margin))
        p_refuted = min(p_above(margin), p_below(-margin))
    verdict = "held" if p_held < alpha else "refuted" if p_refuted < alpha else "undecided"
    return Decision(verdict, mean, sd, n, mean - half, mean + half, p_held, p_refuted, **rule)


def paired_verdict(differences, *, margin: float = 0.0, alpha: float = 0.05, alternative: str = "greater") -> str:
    """'held', 'refuted' or 'undecided' for a paired comparison (:func:`paired_decision`'s verdict).

    Args:
        differences: (n,) per-seed differences, signed so that the claim says "large".
        margin: the claim's threshold; alpha: each one-sided test's level; alternative:
            'greater', 'less' or 'equivalent'.

    Returns:
        the verdict: held when the (1 - 2 alpha) t interval of the mean lies beyond the margin on
        the claim's side, refuted when it lies on the other side, otherwise undecided.

    Example:
        >>> paired_verdict([0.2, 0.3, 0.25], margin=1.0, alternative="equivalent")
        'held'
    """
    return paired_decision(differences, margin=margin, alpha=alpha, alternative=alternative).verdict


def seeds_for_power(sd: float, effect: float, margin: float = 0.0, power: float = 0.8, *,
                    alpha: float = 0.05) -> int | None:
    """Smallest number of paired seeds at which a one-sided t-test decides a true mean ``effect``.

    The test of "mean > margin" (or "< margin" when ``effect < margin``) at level ``alpha``
    rejects with probability ``power`` when the differences have mean ``effect`` and sd ``sd``:
    1 - F_nct(t_{1-alpha, n-1}; n - 1, sqrt(n) |effect - margin| / sd) >= power.

    Args:
        sd: sd of the per-seed differences (> 0; 0 gives 2, the fewest that have an interval).
        effect: the true mean difference; margin: the claim's threshold.
        power: the wanted probability of a verdict, in (0, 1).

    Returns:
        n >= 2, or None when effect == margin or more than :data:`MAX_SEEDS` would be needed.

    Example:
        >>> seeds_for_power(1.0, 1.0)        # a difference of one sd: 8 seeds at 80% power
        8
    """
    for name, value in (("sd", sd), ("effect", effect), ("margin", margin)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    alpha = _check_alpha(alpha)
    gap = abs(effect - margin)
    if gap == 0:
        return None
    if sd == 0:
        return 2

    def power_at(n: int) -> float:
        return float(sps.nct.sf(sps.t.ppf(1 - alpha, n - 1), n - 1, math.sqrt(n) * gap / sd))

    if power_at(MAX_SEEDS) < power:
        return None
    low, high = 2, MAX_SEEDS  # power grows with n: bisect for the first n that reaches it
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if power_at(mid) < power else (low, mid)
    return low


def holm(p_values, alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which hypotheses of a family are rejected at family-wise level ``alpha``.

    The p-values sorted ascending, p_(k) (k = 1..m) is rejected while p_(j) <= alpha / (m - j + 1)
    for every j <= k.

    Args:
        p_values: (m,) p-values of the family.

    Returns:
        m booleans, in the input order.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [True, False, False]
    """
    alpha = _check_alpha(alpha)
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or ((p < 0) | (p > 1) | ~np.isfinite(p)).any():
        raise ValueError(f"p_values must be a 1-D sequence of numbers in [0, 1], got {p_values!r}")
    rejected = [False] * len(p)
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        if p[index] > alpha / (len(p) - rank):
            break
        rejected[index] = True
    return rejected


def family_verdicts(decisions: list[Decision], alpha: float | None = None) -> tuple[str, list[str]]:
    """Holm-corrected verdicts of a family of claims, and the family's verdict.

    Each member is held when Holm rejects its "not held" hypothesis among the members' ``p_held``,
    refuted when Holm rejects its "not refuted" one among their ``p_refuted``. The family (the
    claim "some member holds") is held when a member is held, refuted when every member is.

    Args:
        decisions: the members' :class:`Decision`\\ s.
        alpha: the family-wise level (default: the members' own alpha).

    Returns:
        (family verdict, member verdicts in order).
    """
    if not decisions:
        raise ValueError("decisions must hold at least one Decision")
    alpha = decisions[0].alpha if alpha is None else alpha
    held = holm([d.p_held for d in decisions], alpha)
    refuted = holm([d.p_refuted for d in decisions], alpha)
    members = ["held" if h else "refuted" if r else "undecided" for h, r in zip(held, refuted)]
    family = "held" if "held" in members else "refuted" if all(m == "refuted" for m in members) else "undecided"
    return family, members


def every_held(decisions: dict) -> tuple[str, Decision]:
    """The claim "every one of these comparisons holds" (e.g. "closer than every other pattern").

    An intersection-union test (Berger 1982): held when every comparison is held at level alpha
    (no correction needed), refuted when Holm across the comparisons refutes one of them,
    otherwise undecided.

    Args:
        decisions: {name: :class:`Decision`} of the comparisons.

    Returns:
        (name of the critical comparison, a :class:`Decision` of the whole): the critical one is
        the refuted one with the smallest p when refuted, else the one with the largest
        ``p_held`` (the hardest to hold); the whole carries its mean, sd and interval, with
        ``p_held`` the largest of the comparisons' and ``p_refuted`` Holm-adjusted (m times the
        smallest).
    """
    if not decisions:
        raise ValueError("decisions must hold at least one Decision")
    names, members = list(decisions), list(decisions.values())
    refuted = holm([d.p_refuted for d in members], members[0].alpha)
    if any(refuted):
        critical = min((i for i, r in enumerate(refuted) if r), key=lambda i: members[i].p_refuted)
        verdict = "refuted"
    else:
        critical = max(range(len(members)), key=lambda i: members[i].p_held)
        verdict = "held" if all(d.verdict == "held" for d in members) else "undecided"
    whole = replace(members[critical], verdict=verdict, p_held=max(d.p_held for d in members),
                    p_refuted=min(1.0, len(members) * min(d.p_refuted for d in members)),
                    refute_tests=members[critical].refute_tests * len(members))
    return names[critical], whole


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
    """Spearman's rank correlation rho (``scipy.stats.spearmanr``; ties get their average rank).

    Args:
        x, y: sequences of the same length n >= 3, not constant.

    Returns:
        rho in [-1, 1].

    Example:
        >>> spearman([1, 2, 3], [1, 4, 9])
        1.0
    """
    x, y = _as_pair(x, y)
    return float(sps.spearmanr(x, y).statistic)


def spearman_permutation_test(x, y, *, alternative: str = "less", n_permutations: int = 10_000,
                              seed: int = 0) -> tuple[float, float]:
    """Spearman's rho and its permutation p-value (``scipy.stats.permutation_test``, pairings).

    Under the null hypothesis every pairing of x with a permutation of y is equally likely; p is
    the share of pairings whose rho is at least as extreme as the observed one ('less':
    rho_perm <= rho; 'greater': >=; 'two-sided': twice the smaller of the two). scipy enumerates every pairing
    when n! <= ``n_permutations`` (exact: up to 7 points at the default, 8 with 40320), otherwise
    draws ``n_permutations`` from ``numpy.random.default_rng(seed)`` and counts the observed
    pairing once, so p is never 0.

    Args:
        x, y: sequences of the same length n >= 3, not constant.
        alternative: 'less', 'greater' or 'two-sided'.
        n_permutations: random pairings when not exact.
        seed: seeds the random pairings.

    Returns:
        (rho, p).

    Example:
        >>> rho, p = spearman_permutation_test([1, 2, 3, 4], [4, 3, 2, 1])   # exact: 1 of 4! = 24
        >>> rho, round(p, 4)
        (-1.0, 0.0417)
    """
    if alternative not in ("less", "greater", "two-sided"):
        raise ValueError(f"alternative must be 'less', 'greater' or 'two-sided', got {alternative!r}")
    for name, value in (("n_permutations", n_permutations), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, "
                             f"got {value!r}")
    x, y = _as_pair(x, y)
    rx, ry = sps.rankdata(x), sps.rankdata(y)
    cy = (ry - ry.mean()) / np.linalg.norm(ry - ry.mean())

    def rho_of(r, axis=-1):  # Pearson of the (permuted) ranks of x with the ranks of y: Spearman's rho
        c = r - r.mean(axis=axis, keepdims=True)
        return (c @ cy) / np.linalg.norm(c, axis=axis)

    result = sps.permutation_test((rx,), rho_of, permutation_type="pairings", vectorized=True,
                                  n_resamples=n_permutations, alternative=alternative,
                                  rng=np.random.default_rng(seed))
    return round(float(result.statistic), 12), float(result.pvalue)


def rank_correlation_verdict(x, y, *, alternative: str = "less", alpha: float = 0.05,
                             n_permutations: int = 40_320) -> tuple[str, float, float, float]:
    """Decide "x and y are rank-correlated with this sign" by a permutation test of Spearman's rho.

    Args:
        x, y: sequences of the same length n >= 3, not constant.
        alternative: the claimed sign: 'less' (anti-correlated) or 'greater'.
        alpha: level of each one-sided test.
        n_permutations: pairings (exact up to 8 points at the default 8! = 40320).

    Returns:
        (verdict, rho, p of the claimed sign, p of the opposite sign): held when the first p is
        below ``alpha``, refuted when the second is, otherwise undecided (a non-significant rho is
        never a refutation).
    """
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    alpha = _check_alpha(alpha)
    rho, p_claim = spearman_permutation_test(x, y, alternative=alternative, n_permutations=n_permutations)
    opposite = "greater" if alternative == "less" else "less"
    _, p_opposite = spearman_permutation_test(x, y, alternative=opposite, n_permutations=n_permutations)
    verdict = "held" if p_claim < alpha else "refuted" if p_opposite < alpha else "undecided"
    return verdict, rho, p_claim, p_opposite
