"""Study 'ntk': how close each pattern's neural tangent kernel is to the dense model's.

Composes :func:`pixelfly_lab.studies.ntk_comparison.ntk_study` (kernels at initialisation, the dense
seed-to-seed spread, training) and its plots. The paper's statements checked (Dao, Chen et al.,
ICLR 2022, arXiv 2112.00029, the NTK analysis: the NTK-guided choice of the pattern), with their
pass rules fixed here before anything is measured:

* "among patterns at the same budget, Pixelfly's NTK is the closest to the dense model's": on
  each headline distance (relative Frobenius of centred, trace-normalised kernels; 1 - CKA: both
  blind to the kernel's scale and to its constant part), for the library's ungated Pixelfly
  layer, chosen up front (the authors' gated layer is shown, not tried as a second chance).
  Per seed, each other sparse pattern's distance minus Pixelfly's (both against the same dense
  reference kernels): held when every other pattern's mean difference exceeds its sd over seeds
  (Pixelfly closer, separated); refuted when some other pattern is closer by more than that sd;
  otherwise undecided (not resolved by the seeds). The uncentred trace-normalised distance (with
  the top eigenvalue's share of the trace) and the raw one (with the trace ratio) are readings.
* "a smaller NTK distance goes with a higher accuracy": over the sparse patterns only (dense
  excluded), mean centred distance at initialisation against mean test accuracy (10000 test
  examples) after a fixed epoch budget, held when Spearman's rho < 0 and its one-sided
  permutation p-value (exact over all orderings, :func:`pixelfly_lab.studies.stats.spearman_permutation_test`)
  is < 0.05; undecided unless the budget lets dense converge: dense trained for twice the epochs
  gains less than 0.5 accuracy points (mean over seeds).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from pixelfly_lab.studies.ntk_comparison import (QUICK as NTK_QUICK, SCALE_FREE_METRICS, NTKStudyConfig, ntk_study, plot_distance_at_init,
                         plot_distance_vs_accuracy, plot_spectra)
from pixelfly_lab.studies.stats import spearman_permutation_test
from pixelfly_lab.threads import num_threads
from pixelfly_lab.studies.claims import Claim, save_figure, save_table

__all__ = ["NTKStudyConfig", "FULL", "QUICK", "TINY", "run"]

FULL = NTKStudyConfig()
QUICK = NTK_QUICK
# three sparse patterns: the rank correlation needs at least three points to mean anything; two
# seeds so that the closest claim's three-way rule runs
TINY = NTKStudyConfig(families=("mlp",), patterns=("dense", "lowrank", "random", "pixelfly"), seeds=(0, 1),
                      reference_seeds=(5, 6), n_kernel=6, n_train=128, n_test=64, epochs=1)

PIXELFLY = "pixelfly"                        # the variant the claims test, chosen before measuring
VARIANTS = ("pixelfly", "pixelfly-gated")    # not "other patterns": the gated layer is Pixelfly too
ALPHA = 0.05  # significance level of the correlation claim
CONVERGED = 0.5  # accuracy points dense may still gain from E to 2E epochs for the budget to count as converged
_NAMES = {"relative_frobenius_centered": "relative Frobenius of centred trace-normalised kernels",
          "cka": "1 - CKA"}


def _stats(frame: pd.DataFrame, family: str, metric: str) -> pd.DataFrame:
    """Mean and sd over seeds of ``metric`` per sparse pattern, smallest mean first."""
    part = frame[(frame.family == family) & (frame.pattern != "dense")]
    return part.groupby("pattern")[metric].agg(["mean", "std"]).fillna(0.0).sort_values("mean")


def closest_verdict(frame: pd.DataFrame, family: str, metric: str) -> tuple[bool | None, pd.DataFrame]:
    """The three-way rule of the module docstring, paired by seed.

    Returns:
        (held, gaps): held True / False / None; gaps one row per other sparse pattern: mean and
        sd over seeds of (its distance - Pixelfly's), and seeds (how many were paired).
    """
    part = frame[(frame.family == family) & (frame.pattern != "dense")].pivot_table(
        index="seed", columns="pattern", values=metric)
    others = [p for p in part.columns if p not in VARIANTS]
    if PIXELFLY not in part.columns or not others:
        return None, pd.DataFrame(columns=["mean", "sd", "seeds"])
    diffs = part[others].sub(part[PIXELFLY], axis=0)
    gaps = pd.DataFrame({"mean": diffs.mean(), "sd": diffs.std(), "seeds": diffs.count()}).sort_values("mean")
    if (gaps.seeds < 2).any():
        return None, gaps  # no sd over seeds: undecided
    if (gaps["mean"] < -gaps["sd"]).any():
        return False, gaps
    return (True if (gaps["mean"] > gaps["sd"]).all() else None), gaps


def _closest_claim(frame, family, metric, setup, png, csv) -> Claim:
    stats = _stats(frame, family, metric)
    spread = frame.attrs["spread"]
    ref = spread[(spread.family == family) & (spread.metric == metric)].iloc[0]
    held, gaps = closest_verdict(frame, family, metric)
    name = _NAMES.get(metric, metric)
    if held is None and len(gaps) and (gaps.seeds >= 2).all():
        verdict = "; undecided: Pixelfly is not separated from " + ", ".join(
            p for p, r in gaps.iterrows() if abs(r["mean"]) <= r["sd"]) + " by more than the sd over seeds"
    else:
        verdict = "" if held is not None else "; undecided: fewer than 2 seeds or patterns"
    return Claim(
        f"Pixelfly paper (NTK analysis): among patterns at the same budget, Pixelfly's NTK is the closest to the "
        f"dense model's -- {family}, distance {name} at init (scale- and constant-free). Rule: for the ungated "
        f"Pixelfly layer, chosen up front, per seed each other sparse pattern's distance minus Pixelfly's against the "
        f"same dense references; held when every mean difference exceeds its sd over seeds, refuted when another "
        f"pattern is closer by more than that sd, otherwise undecided",
        f"{name} ({setup}), mean +- sd: "
        + ", ".join(f"{p} {r['mean']:.3f}+-{r['std']:.3f}" for p, r in stats.iterrows())
        + f"; other - pixelfly, paired by seed: "
        + ", ".join(f"{p} {r['mean']:+.3f}+-{r['sd']:.3f}" for p, r in gaps.iterrows())
        + f"; dense seed-to-seed {ref['mean']:.3f}+-{ref['sd']:.3f} ({int(ref['pairs'])} pairs)" + verdict,
        held, png, kind="paper", table=csv)


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
    rule = (f"held when Spearman's rho < 0 and its one-sided permutation p-value < {ALPHA}, exact over all "
            f"orderings of the patterns; undecided below 3 patterns, or unless the budget lets dense converge: dense "
            f"trained for 2E = {2 * epochs} epochs gains less than {CONVERGED} accuracy points over E")
    text = (f"Pixelfly paper (NTK analysis): a smaller NTK distance goes with a higher accuracy -- {family}, "
            f"sparse patterns only (dense excluded), {_NAMES.get(metric, metric)} at init against test accuracy "
            f"({n_test} test examples) after E = {epochs} epochs ({rule})")
    if len(means) < 3 or means[metric].nunique() < 2 or means.test_accuracy.nunique() < 2:
        return Claim(text, f"{len(means)} sparse pattern(s): no rank correlation", None, png, kind="paper", table=csv)
    rho, p = spearman_permutation_test(means[metric], means.test_accuracy, alternative="less")
    seeds = part.seed.nunique()
    other = "cka" if metric != "cka" else "relative_frobenius_centered"
    alt = part.groupby("pattern")[other].mean() if other in part else pd.Series(dtype=float)
    alt_text = ""
    if alt.nunique() > 1:
        alt_rho, alt_p = spearman_permutation_test(alt, means.test_accuracy, alternative="less")
        alt_text = f" (with {_NAMES.get(other, other)} instead: rho {alt_rho:+.2f}, p = {alt_p:.3f})"
    converged, conv_text = _converged(frame, family)
    held = bool(rho < 0 and p < ALPHA) if converged else None
    return Claim(
        text, f"Spearman rho {rho:+.2f}, permutation p = {p:.3f}{alt_text} across {len(means)} patterns (means over "
        f"{seeds} seed(s)); accuracies " + ", ".join(f"{q} {100 * a:.1f}%" for q, a in means.test_accuracy.items())
        + (f"; dense {100 * dense_acc.mean():.1f}%" if len(dense_acc) else "") + f"; {conv_text}"
        + ("" if converged else "; undecided: dense has not converged at E epochs"),
        held, png, kind="paper", table=csv)


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
        claims += [_closest_claim(frame, family, m, setup, pngs[m], csv) for m in SCALE_FREE_METRICS]
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
