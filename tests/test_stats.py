"""The decision rules on synthetic paired data (a large effect, a large opposite effect, pure noise),
the power computation against simulation, Holm against its definition, the permutation test against
a brute-force oracle."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from pixelfly_lab.studies.stats import (Decision, family_verdicts, holm, paired_decision, paired_verdict,
                                        rank_correlation_verdict, seeds_for_power, spearman,
                                        spearman_permutation_test)

N = 12  # seeds of the synthetic data


def _data(mean, seed=0, sd=1.0, n=N):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    return mean + sd * (z - z.mean()) / z.std(ddof=1)  # exactly this mean and sd


@pytest.mark.parametrize("alternative, margin, effect, want", [
    ("greater", 0.0, 3.0, "held"), ("greater", 0.0, -3.0, "refuted"), ("greater", 0.0, 0.0, "undecided"),
    ("less", 0.0, -3.0, "held"), ("less", 0.0, 3.0, "refuted"), ("less", 0.0, 0.0, "undecided"),
    # "not worse by more than 1": greater than -1
    ("greater", -1.0, 0.0, "held"), ("greater", -1.0, -4.0, "refuted"), ("greater", -1.0, -1.0, "undecided"),
    # parity within +-2: a mean of 0 with sd 1 over 12 seeds lies inside; 5 lies outside; 2 is on the edge
    ("equivalent", 2.0, 0.0, "held"), ("equivalent", 2.0, 5.0, "refuted"), ("equivalent", 2.0, -5.0, "refuted"),
    ("equivalent", 2.0, 2.0, "undecided")])
def test_every_rule_gives_the_three_verdicts(alternative, margin, effect, want):
    d = _data(effect)
    decision = paired_decision(d, margin=margin, alternative=alternative)
    assert decision.verdict == want == paired_verdict(d, margin=margin, alternative=alternative)
    # the interval is the (1 - 2 alpha) t interval of the mean
    half = 1.7958848187036696 / math.sqrt(N)  # t_{0.95, 11} * sd / sqrt(n) with sd 1
    assert (decision.low, decision.high) == pytest.approx((effect - half, effect + half))


def test_pure_noise_is_rarely_decided_and_never_by_one_seed():
    rng = np.random.default_rng(0)
    verdicts = [paired_verdict(rng.normal(size=5)) for _ in range(2000)]
    # the false verdict rate of each one-sided test is alpha = 0.05
    assert abs(verdicts.count("held") / 2000 - 0.05) < 0.02 and abs(verdicts.count("refuted") / 2000 - 0.05) < 0.02
    assert paired_decision([5.0]).verdict == "undecided" and paired_decision([5.0]).seeds_to_decide() is None
    # zero spread: the interval is the mean itself (a deterministic measurement)
    assert paired_verdict([0.2, 0.2, 0.2]) == "held"


def test_more_seeds_decide_what_few_leave_undecided():
    small, large = _data(0.5, n=3), _data(0.5, n=40)
    assert paired_verdict(small) == "undecided" and paired_verdict(large) == "held"
    needed = paired_decision(small).seeds_to_decide()
    assert needed == seeds_for_power(1.0, 0.5) and 20 < needed < 40


def test_seeds_for_power_matches_simulation():
    n = seeds_for_power(1.0, 0.8, power=0.8)
    rng = np.random.default_rng(1)
    rate = lambda k: np.mean([paired_verdict(rng.normal(0.8, 1.0, size=k)) == "held" for _ in range(3000)])  # noqa
    assert rate(n) >= 0.78 and rate(n - 1) < 0.8 + 0.02
    assert seeds_for_power(1.0, 1.0) == 8 and seeds_for_power(2.0, 1.0) > 20
    assert seeds_for_power(1.0, 0.0, margin=-1.0) == 8  # the distance to the margin counts
    assert seeds_for_power(1.0, 0.3, margin=0.3) is None and seeds_for_power(0.0, 1.0) == 2


def test_holm_is_the_step_down_procedure():
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]
    assert holm([0.01, 0.02, 0.03], alpha=0.1) == [True, True, True]   # 0.01 <= .1/3, 0.02 <= .1/2, 0.03 <= .1
    assert holm([0.2, 0.001]) == [False, True]
    # brute force: Holm = closed testing with Bonferroni; compare on random families
    rng = np.random.default_rng(2)
    for _ in range(200):
        p = rng.uniform(0, 0.06, size=4)
        order = np.argsort(p)
        want = [False] * 4
        for k, i in enumerate(order):
            if not all(p[order[j]] <= 0.05 / (4 - j) for j in range(k + 1)):
                break
            want[i] = True
        assert holm(p) == want


def test_family_is_held_when_a_member_survives_holm():
    strong, noise, opposite = (paired_decision(_data(m)) for m in (3.0, 0.0, -3.0))
    assert family_verdicts([strong, noise]) == ("held", ["held", "undecided"])
    assert family_verdicts([opposite, opposite]) == ("refuted", ["refuted", "refuted"])
    assert family_verdicts([noise, opposite]) == ("undecided", ["undecided", "refuted"])
    # a member decided alone (p just under 0.05) is undecided once the family has two members
    edge = next(d for d in (paired_decision(_data(m, n=6)) for m in np.linspace(0.6, 1.2, 61))
                if 0.025 < d.p_held < 0.05)
    assert edge.verdict == "held" and family_verdicts([edge, noise])[1][0] == "undecided"


@pytest.mark.parametrize("call, match", [
    (lambda: paired_decision([1, 2], alternative="bigger"), "alternative"),
    (lambda: paired_decision([1, 2], margin=0.0, alternative="equivalent"), "margin"),
    (lambda: paired_decision([1, 2], alpha=0.7), "alpha"),
    (lambda: paired_decision([[1, 2]]), "1-D"),
    (lambda: paired_decision([1, float("nan")]), "finite"),
    (lambda: seeds_for_power(-1.0, 1.0), "sd"),
    (lambda: seeds_for_power(1.0, 1.0, power=1.0), "power"),
    (lambda: holm([0.5, 1.5]), "p_values"),
    (lambda: family_verdicts([]), "decisions"),
    (lambda: rank_correlation_verdict([1, 2, 3], [3, 2, 1], alternative="two-sided"), "alternative")])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_decision_describes_itself():
    decision = paired_decision(_data(1.0, n=4))
    assert isinstance(decision, Decision) and "90% t interval, 4 seeds" in decision.describe()


# ------------------------------------------------------------------ rank correlations
def test_rank_correlation_refutes_only_the_opposite_sign():
    x = np.arange(6.0)
    assert rank_correlation_verdict(x, -x)[0] == "held"          # perfectly anti-correlated: p = 1/6!
    assert rank_correlation_verdict(x, x)[0] == "refuted"        # the opposite sign is significant
    rng = np.random.default_rng(0)
    noise = [rank_correlation_verdict(x, rng.normal(size=6))[0] for _ in range(20)]
    assert noise.count("undecided") >= 15                       # not significant: never a refutation
    verdict, rho, p, p_opposite = rank_correlation_verdict([0.1, 0.2, 0.3], [0.6, 0.5, 0.4])
    assert (verdict, rho) == ("undecided", -1.0) and p == pytest.approx(1 / 6) and p_opposite == 1.0


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_perfect_anticorrelation_has_the_exact_p(n):
    rho, p = spearman_permutation_test(range(n), range(n, 0, -1))
    assert rho == pytest.approx(-1.0) and p == pytest.approx(1 / math.factorial(n))
    assert spearman_permutation_test(range(n), range(n), alternative="greater")[1] == pytest.approx(
        1 / math.factorial(n))


def _oracle(x, y, alternative):
    """Spearman by 1 - 6 sum d^2 / (n (n^2 - 1)) (no ties) over every permutation, in plain Python."""
    n = len(x)
    rank = lambda v: [sorted(v).index(a) for a in v]  # noqa: E731 (no ties in these inputs)
    rx, ry = rank(x), rank(y)
    rho_of = lambda r: 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, r)) / (n * (n * n - 1))  # noqa: E731
    rho = rho_of(ry)
    rhos = [rho_of([ry[i] for i in perm]) for perm in itertools.permutations(range(n))]
    test = {"less": lambda r: r <= rho + 1e-12, "greater": lambda r: r >= rho - 1e-12}[alternative]
    return rho, sum(map(test, rhos)) / len(rhos)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alternative", ["less", "greater"])
def test_exact_test_matches_brute_force(seed, alternative):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=6)
    y = -0.7 * x + rng.normal(size=6)
    rho, p = spearman_permutation_test(x, y, alternative=alternative)
    want_rho, want_p = _oracle(list(x), list(y), alternative)
    assert rho == pytest.approx(want_rho, abs=1e-12) and p == pytest.approx(want_p, abs=1e-12)


def test_monte_carlo_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(3)
    x = rng.normal(size=8)
    y = -0.5 * x + rng.normal(size=8)
    exact = spearman_permutation_test(x, y, n_permutations=math.factorial(8))[1]
    sampled = spearman_permutation_test(x, y, n_permutations=4000, seed=5)[1]
    assert sampled == spearman_permutation_test(x, y, n_permutations=4000, seed=5)[1]
    assert abs(sampled - exact) < 0.03
    assert spearman_permutation_test(range(12), range(12, 0, -1), n_permutations=100)[1] == pytest.approx(1 / 101)


def test_ties_get_average_ranks():
    expected = np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    assert spearman([1, 2, 2, 5], [1, 2, 3, 4]) == pytest.approx(expected)


@pytest.mark.parametrize("x, y, match", [([1, 2], [2, 1], "at least 3"), ([1, 2, 3], [1, 2], "same length"),
                                         ([1, 1, 1], [1, 2, 3], "constant"), ([1, 2, np.nan], [1, 2, 3], "finite")])
def test_bad_correlation_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        spearman_permutation_test(x, y)
    with pytest.raises(ValueError, match="alternative"):
        spearman_permutation_test([1, 2, 3], [3, 2, 1], alternative="lower")
    with pytest.raises(ValueError, match="n_permutations"):
        spearman_permutation_test([1, 2, 3], [3, 2, 1], n_permutations=0)


def test_seeds_to_decide_account_for_the_tests_sharing_alpha():
    alone = paired_decision(_data(-0.5, n=3))          # on its way to refuted
    assert alone.shared(4).seeds_to_decide() == seeds_for_power(1.0, -0.5, alpha=0.05 / 4) > alone.seeds_to_decide()
    from pixelfly_lab.studies.stats import every_held

    _, whole = every_held({"a": alone, "b": paired_decision(_data(2.0, n=3))})
    assert whole.refute_tests == 2 and whole.seeds_to_decide() == seeds_for_power(1.0, -0.5, alpha=0.025)


def test_family_claim_headline_decides_alone_and_seeds_are_counted_once(monkeypatch):
    from pixelfly_lab.studies.claims import Claim, family_claim

    strong, noise, against = paired_decision(_data(3.0)), paired_decision(_data(0.3, n=4)), paired_decision(_data(-3.0))
    # no headline: Holm over all members, held when one is held (as family_verdicts)
    family = family_claim({"a": noise, "b": strong, "c": against})
    assert (family.verdict, list(family.verdicts)) == family_verdicts([noise, strong, against])
    assert family.names[family.lead] == "b" and family.fields()["effect"] == pytest.approx(3.0)
    # a headline decides alone, at its own alpha: a held secondary member cannot rescue it ...
    family = family_claim({"a": noise, "b": strong, "c": against}, headline="a")
    assert family.verdict == "undecided" and family.verdicts == ("undecided", "held", "refuted")
    assert family.names == ("a", "b", "c") and family.decisions[0].hold_tests == 1
    assert family.decisions[1].hold_tests == 2   # the secondary readings share alpha among themselves
    fields = family.fields()
    assert fields["held"] is None and fields["seeds_to_decide"] == noise.seeds_to_decide()
    assert [m["seeds_to_decide"] for m in fields["members"]] == [noise.seeds_to_decide(), None, None]
    # ... and a refuted secondary member cannot sink it
    assert family_claim({"b": strong, "c": against}, headline="b").verdict == "held"
    # a rule beyond the statistics (controls) may override the verdict; then no seed count when seeds cannot help
    assert family.fields("undecided", more_seeds_decide=False)["seeds_to_decide"] is None
    # a gate that cleared the lead's count leaves the claim with the largest count a member still needs
    cleared = replace(family, to_decide=(None, 7, 3))
    assert cleared.fields("undecided")["seeds_to_decide"] == 7
    Claim("c (held when x)", "m", **family.fields())
    # the noncentral-t search runs once per undecided member, however often the fields are read
    calls = []
    original = Decision.seeds_to_decide
    monkeypatch.setattr(Decision, "seeds_to_decide", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    family = family_claim({"a": noise, "b": strong, "c": against}, headline="a")
    family.fields(), family.fields(), family.members(), family.describe()
    assert len(calls) == 1
    with pytest.raises(ValueError, match="headline"):
        family_claim({"a": noise}, headline="z")
    with pytest.raises(ValueError, match="decisions"):
        family_claim({})
