"""Study 'ntk': how close each pattern's neural tangent kernel is to the dense model's.

Composes :func:`pixelfly_lab.studies.ntk_comparison.ntk_study` (kernels at initialisation, the dense
seed-to-seed spread, training) and its plots. The paper's statements checked (Dao, Chen et al.,
ICLR 2022, arXiv 2112.00029, the NTK analysis: the NTK-guided choice of the pattern), with their
pass rules fixed here before anything is measured:

* "among patterns at the same budget, Pixelfly's NTK is the closest to the dense model's": one
  family of four primary members, Holm-corrected (:func:`pixelfly_lab.studies.stats.family_verdicts`):
  the library's ungated layer and the authors' gated, Kaiming-initialised one, each on both
  headline distances (relative Frobenius of centred, trace-normalised kernels; 1 - CKA: blind to
  the kernel's scale and to its constant part). Per member, per seed, each other sparse
  pattern's distance minus Pixelfly's (both against the same dense reference kernels), decided
  by :func:`pixelfly_lab.studies.stats.paired_decision` (t interval of the mean difference):
  held when it lies above 0 for every other pattern, refuted when one lies below. The yardstick
  printed beside is each pattern's excess over dense's own seed-to-seed distance. The uncentred
  trace-normalised distance (with the top eigenvalue's share of the trace) and the raw relative
  Frobenius distance of the talk's slide (with the trace ratio) are readings.
* "a smaller NTK distance goes with a higher accuracy": over the sparse patterns only (dense
  excluded), mean centred distance at initialisation against mean test accuracy (10000 test
  examples) after a fixed epoch budget, by
  :func:`pixelfly_lab.studies.stats.rank_correlation_verdict`: held when Spearman's rho < 0 is
  significant (one-sided permutation test, 0.05), refuted only when rho > 0 is; undecided unless
  the budget lets dense converge: dense trained for twice the epochs gains less than 0.5
  accuracy points (mean over seeds).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from pixelfly_lab.studies.ntk_comparison import (QUICK as NTK_QUICK, SCALE_FREE_METRICS, NTKStudyConfig, ntk_study, plot_distance_at_init,
                         plot_distance_vs_accuracy, plot_spectra)
from pixelfly_lab.studies.stats import Decision, every_held, family_verdicts, paired_decision, rank_correlation_verdict
from pixelfly_lab.threads import num_threads
from pixelfly_lab.studies.claims import HELD, Claim, decision_fields, member, save_figure, save_table

__all__ = ["NTKStudyConfig", "FULL", "QUICK", "TINY", "run"]

# FULL's seeds from a power computation on QUICK's paired sd (studies.stats.seeds_for_power, 80%):
# the headline member (ungated, centred distance; QUICK: -0.075 +- 0.055 against butterfly, 3 seeds)
# needs 12 seeds once alpha is shared by the family's 4 members and 7 other patterns (8 for 1 - CKA,
# 5 for the gated layer). The MLP only (the Mixer family stays available in NTKStudyConfig), 2000
# training examples and 15 epochs: QUICK x 12/3 seeds x 2 data, about FULL_MINUTES on 2 cores.
FULL = NTKStudyConfig(families=("mlp",), seeds=tuple(range(12)), n_train=2000, epochs=15)
FULL_MINUTES = 20  # estimate: QUICK's ~2.5 minutes on a quiet 2-core machine x 8
QUICK = NTK_QUICK
# three sparse patterns: the rank correlation needs at least three points to mean anything; two
# seeds so that the closest claim's paired interval exists
TINY = NTKStudyConfig(families=("mlp",), patterns=("dense", "lowrank", "random", "pixelfly"), seeds=(0, 1),
                      reference_seeds=(5, 6), n_kernel=6, n_train=128, n_test=64, epochs=1)

PIXELFLY = "pixelfly"                        # the variant the claims test, chosen before measuring
VARIANTS = ("pixelfly", "pixelfly-gated")    # not "other patterns": the gated layer is Pixelfly too
ALPHA = 0.05  # level of each one-sided test (the paired intervals are 90% t intervals)
CONVERGED = 0.5  # accuracy points dense may still gain from E to 2E epochs for the budget to count as converged
_NAMES = {"relative_frobenius_centered": "relative Frobenius of centred trace-normalised kernels",
          "cka": "1 - CKA"}


def _stats(frame: pd.DataFrame, family: str, metric: str) -> pd.DataFrame:
    """Mean and sd over seeds of ``metric`` per sparse pattern, smallest mean first."""
    part = frame[(frame.family == family) & (frame.pattern != "dense")]
    return part.groupby("pattern")[metric].agg(["mean", "std"]).fillna(0.0).sort_values("mean")


def closest_decisions(frame: pd.DataFrame, family: str, metric: str, variant: str = PIXELFLY
                      ) -> dict[str, Decision]:
    """Per other sparse pattern, the paired decision of "its distance exceeds ``variant``'s" (by seed).

    Returns:
        {other pattern: :class:`~pixelfly_lab.studies.stats.Decision` of (its distance - the
        variant's), alternative 'greater', margin 0}; empty when the variant or the others are missing.
    """
    part = frame[(frame.family == family) & (frame.pattern != "dense")].pivot_table(
        index="seed", columns="pattern", values=metric)
    others = [p for p in part.columns if p not in VARIANTS]
    if variant not in part.columns or not others:
        return {}
    diffs = part[others].sub(part[variant], axis=0)
    return {p: paired_decision(diffs[p].dropna().to_numpy(), margin=0.0, alpha=ALPHA) for p in others}


def closest_verdict(frame: pd.DataFrame, family: str, metric: str, variant: str = PIXELFLY
                    ) -> tuple[str, str | None, Decision | None]:
    """Whether ``variant``'s NTK is closer than every other sparse pattern's (intersection-union, paired).

    Returns:
        (verdict, the critical other pattern, the whole's Decision); ('undecided', None, None)
        when there is nothing to compare.
    """
    decisions = closest_decisions(frame, family, metric, variant)
    if not decisions:
        return "undecided", None, None
    critical, whole = every_held(decisions)
    return whole.verdict, critical, whole


def _closest_claim(frame, family, setup, png, csv, metrics=SCALE_FREE_METRICS) -> Claim:
    """One family: {ungated, gated Pixelfly} x the scale-free metrics, Holm-corrected."""
    spread = frame.attrs["spread"]
    present = set(frame[frame.family == family].pattern)
    members, decisions, parts = [], [], []
    for metric in metrics:
        ref = spread[(spread.family == family) & (spread.metric == metric)].iloc[0]
        stats = _stats(frame, family, metric)
        parts.append(f"{_NAMES.get(metric, metric)}: " + ", ".join(
            f"{p} {r['mean']:.3f}+-{r['std']:.3f} (excess over dense seed-to-seed {r['mean'] - ref['mean']:+.3f})"
            for p, r in stats.iterrows()) + f"; dense seed-to-seed {ref['mean']:.3f}+-{ref['sd']:.3f} "
            f"({int(ref['pairs'])} pairs)")
        for variant in (v for v in VARIANTS if v in present):
            verdict, critical, whole = closest_verdict(frame, family, metric, variant)
            if whole is None:
                continue
            decisions.append(whole)
            members.append((f"{variant}, {_NAMES.get(metric, metric)} (critical: {critical})", whole))
    if not decisions:
        return Claim(_CLOSEST_TEXT.format(family=family), "undecided: fewer than 2 patterns to compare; "
                     + "; ".join(parts), None, png, kind="paper", table=csv)
    verdict, verdicts = family_verdicts(decisions, ALPHA)
    decisions = [d.shared(len(decisions)) for d in decisions]
    members = [(name, d) for (name, _), d in zip(members, decisions)]
    listed = [member(name, d, v) for (name, d), v in zip(members, verdicts)]
    best = min(range(len(decisions)), key=lambda i: decisions[i].p_held)
    return Claim(
        _CLOSEST_TEXT.format(family=family),
        f"verdict: {verdict}; members (other - pixelfly, Holm-corrected): " + "; ".join(
            f"{name}: {v} {d.describe()}" + (f", ~{d.seeds_to_decide()} seeds would decide" if v == "undecided"
                                             and d.seeds_to_decide() else "")
            for (name, d), v in zip(members, verdicts)) + f" ({setup}). " + " | ".join(parts),
        **decision_fields(replace(decisions[best], verdict=verdict)), figure=png, kind="paper", table=csv,
        members=listed)


_CLOSEST_TEXT = (
    "Pixelfly paper (NTK analysis): among patterns at the same budget, Pixelfly's NTK is the closest to the dense "
    "model's -- {family}, at init, scale- and constant-free distances (centred trace-normalised relative Frobenius, "
    "1 - CKA). Family of 4 primary members, Holm-corrected: the library's ungated layer and the authors' gated, "
    f"Kaiming-initialised one, on each distance. Rule per member: per seed, each other sparse pattern's distance "
    f"minus Pixelfly's against the same dense references; held when for every other pattern the "
    f"{100 * (1 - 2 * ALPHA):.0f}% t interval of the mean difference lies above 0 (intersection-union), refuted when "
    "Holm across the others puts one wholly below 0; the family is held when a member is held after Holm, refuted "
    "when every member is refuted, otherwise undecided. The yardstick is the excess over dense's own seed-to-seed "
    "distance")


def _converged(frame, family) -> tuple[bool, str]:
    """Whether dense gains less than :data:`CONVERGED` points from E to 2E epochs, and the reading."""
    conv = frame.attrs.get("convergence")
    conv = None if conv is None else conv[conv.family == family].dropna()
    if conv is None or not len(conv):
        return False, "dense not trained for 2E epochs: convergence unknown"
    gain = 100 * float(conv.accuracy_2e.mean() - conv.accuracy_e.mean())
    return gain < CONVERGED, (f"dense {100 * conv.accuracy_e.mean():.1f}% after E, {100 * conv.accuracy_2e.mean():.1f}% "
                              f"after 2E epochs (gain {gain:+.1f} points, {len(conv)} seed(s))")


def _correlation_claim(frame, family, metric, epochs, png, csv) -> Claim:
    part = frame[(frame.family == family) & (frame.pattern != "dense")]
    means = part.groupby("pattern")[[metric, "test_accuracy"]].mean()
    dense_acc = frame[(frame.family == family) & (frame.pattern == "dense")].test_accuracy
    n_test = frame.attrs.get("config", {}).get("n_test", "?")
    rule = (f"held when Spearman's rho < 0 with a one-sided permutation p-value < {ALPHA} (scipy's permutation test, "
            f"exact over all orderings of the patterns), refuted only when the opposite sign (rho > 0) is significant "
            f"at {ALPHA}, otherwise undecided; undecided below 3 patterns, or unless the budget lets dense converge: "
            f"dense trained for 2E = {2 * epochs} epochs gains less than {CONVERGED} accuracy points over E")
    text = (f"Pixelfly paper (NTK analysis): a smaller NTK distance goes with a higher accuracy -- {family}, "
            f"sparse patterns only (dense excluded), {_NAMES.get(metric, metric)} at init against test accuracy "
            f"({n_test} test examples) after E = {epochs} epochs ({rule})")
    if len(means) < 3 or means[metric].nunique() < 2 or means.test_accuracy.nunique() < 2:
        return Claim(text, f"{len(means)} sparse pattern(s): no rank correlation; undecided", None, png, kind="paper",
                     table=csv)
    verdict, rho, p, p_opposite = rank_correlation_verdict(means[metric], means.test_accuracy, alternative="less",
                                                           alpha=ALPHA)
    seeds = part.seed.nunique()
    other = "cka" if metric != "cka" else "relative_frobenius_centered"
    alt = part.groupby("pattern")[other].mean() if other in part else pd.Series(dtype=float)
    alt_text = ""
    if alt.nunique() > 1:
        _, alt_rho, alt_p, _ = rank_correlation_verdict(alt, means.test_accuracy, alternative="less", alpha=ALPHA)
        alt_text = f" (with {_NAMES.get(other, other)} instead: rho {alt_rho:+.2f}, p = {alt_p:.3f})"
    converged, conv_text = _converged(frame, family)
    if not converged:
        verdict = "undecided"
    return Claim(
        text, f"Spearman rho {rho:+.2f}, permutation p = {p:.3f} (opposite sign p = {p_opposite:.3f}){alt_text} "
        f"across {len(means)} patterns (means over {seeds} seed(s)); accuracies "
        + ", ".join(f"{q} {100 * a:.1f}%" for q, a in means.test_accuracy.items())
        + (f"; dense {100 * dense_acc.mean():.1f}%" if len(dense_acc) else "") + f"; {conv_text}; verdict: {verdict}"
        + ("" if converged else " (dense has not converged at E epochs)"),
        HELD[verdict], png, kind="paper", table=csv, effect=float(rho), seeds=int(seeds))


def run(out: Path, config: NTKStudyConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """Centred, scale-free distances against the dense seed-to-seed spread, and the distance-accuracy test."""
    cfg = replace(config, device=device)
    with num_threads(1 if device == "cpu" and config != FULL else None):  # tiny models: see pixelfly_lab.threads
        frame = ntk_study(cfg, progress=False)
    csv = save_table(frame, out, "ntk_distances")
    save_table(frame.attrs["spread"], out, "ntk_dense_spread")
    save_table(frame.attrs["spectra"], out, "ntk_spectra")
    pngs = {m: save_figure(plot_distance_at_init(frame, m), out, f"ntk_distance_init_{m}")
            for m in SCALE_FREE_METRICS + ("relative_frobenius_normalized", "relative_frobenius")}
    acc_png = save_figure(plot_distance_vs_accuracy(frame), out, "ntk_distance_vs_accuracy")
    save_figure(plot_spectra(frame.attrs["spectra"]), out, "ntk_spectra")
    setup = (f"{len(cfg.seeds)} init seed(s) against {len(cfg.reference_seeds)} dense references, budget "
             f"{cfg.budget}, block {cfg.block_size}, kernels on {cfg.n_kernel} held-out {cfg.data} examples "
             f"(data seed {cfg.data_seed}, fixed)")
    claims = []
    for family in cfg.families:
        claims.append(_closest_claim(frame, family, setup, pngs[SCALE_FREE_METRICS[0]], csv))
        rows = frame[frame.family == family].groupby("pattern")
        uncentred, raw = _stats(frame, family, "relative_frobenius_normalized"), _stats(frame, family,
                                                                                         "relative_frobenius")
        top, const, trace = rows.top_share.mean(), rows.constant_share.mean(), rows.trace_ratio.mean()
        claims.append(Claim(
            f"Trace-normalised relative Frobenius distance without centring at init -- {family}: it includes the "
            "kernel's constant (mean) part, which the headline distances remove; read beside that part's share of "
            "||K||_F (|mean K| N / ||K||_F) and the top eigenvalue's share of the trace",
            ", ".join(f"{p} {r['mean']:.3f} (constant share {const[p]:.2f}, top share {top[p]:.2f})"
                      for p, r in uncentred.iterrows())
            + (f"; dense: constant share {const['dense']:.2f}, top share {top['dense']:.2f}" if "dense" in top else ""),
            None, pngs["relative_frobenius_normalized"], kind="info", table=csv))
        claims.append(Claim(
            f"Raw relative Frobenius distance ||K - K_dense||_F / ||K_dense||_F at init -- {family}: it depends on the "
            f"kernel's size as much as on its shape (t K_dense, dense's own shape at t times its size, is at distance "
            "|1 - t|), so it is read beside the trace ratio tr K / tr K_dense",
            ", ".join(f"{p} {r['mean']:.3f} (trace ratio {trace[p]:.2f})" for p, r in raw.iterrows()),
            None, pngs["relative_frobenius"], kind="info", table=csv))
        claims.append(_correlation_claim(frame, family, "relative_frobenius_centered", cfg.epochs, acc_png, csv))
    return claims
