"""Study 'attention': attention matrices across temperatures, Pixelfly against its own parts, oracles
against oracles and estimators against estimators (see :mod:`pixelfly_lab.studies.estimators`).

Two regimes: random Q, K, and Q, K with a positional part (locality 1, like trained local
attention). The paper's statement (Pixelfly paper, Dao, Chen et al., ICLR 2022, Sec. 4, after
Scatterbrain, Chen et al., NeurIPS 2021, arXiv 2110.15343, Sec. 3): sparse + low-rank attention is
more robust across temperatures than each of its parts. Tested as stated, on Pixelfly attention
with the attention layer's split (a flat block butterfly support plus m random features): at
every temperature of the grid and in both regimes, Pixelfly's relative error is below that of
its sparse part alone (softmax on the same support) and of its low-rank part alone (Performer with
the same m features), paired by seed (:func:`pixelfly_lab.studies.stats.paired_decision` on part -
Pixelfly, intersection-union over every (regime, temperature, part): held when every interval
lies above 0, refuted when Holm across them puts one below 0). A comparison in which both Pixelfly
and the part are worse than predicting zero (mean error above 1) cannot favour either: the claim
is then at best undecided, and more seeds do not change that. One seed count is printed: the
critical comparison's. The equal-budget estimators (fixed sparse supports, Performer,
Scatterbrain) and the oracles that project the target itself are readings beside it.
Checks (hold by construction): Scatterbrain's exact correction on the largest scores rescues
Performer at the coldest temperature; the top-k oracle beats every fixed-support estimator.
CPU only, whatever ``device``: the matrices are small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pixelfly_lab.studies.estimators import (ATTENTION_ESTIMATORS, ATTENTION_ORACLES, PIXELFLY_PARTS, attention_table,
                                             performer_rank, plot_attention_examples, plot_attention_table)
from pixelfly_lab.studies.claims import HELD, Claim, decision_fields, save_figure, save_table
from pixelfly_lab.studies.stats import every_held, paired_decision
from pixelfly_lab.nn.attention import attention_layout

__all__ = ["AttentionConfig", "FULL", "QUICK", "TINY", "run"]

SPARSE_ESTIMATORS = ("local", "bigbird", "butterfly")
ALPHA = 0.05  # level of each one-sided test (90% t intervals)


@dataclass(frozen=True)
class AttentionConfig:
    """Sizes of the 'attention' study."""

    n: int = 512                # sequence length; n >= 256 so that a block support can be local and sparse
    # paired by seed. FULL's 6: at QUICK (3 seeds) the claim is undecided by its both-fail rule (random Q, K at
    # t <= 0.29: Pixelfly and both parts above error 1), which seeds cannot change; the critical comparison
    # otherwise (low-rank part at t = 0.29, -0.075 [-0.30, +0.15] at 3 seeds) would need dozens. 6 seeds give each
    # comparison's sd a usable estimate; the verdict is decided by the grid, not by seeds
    seeds: int = 6
    temperatures: int = 10      # points log-spaced over [0.05, 10]: one-hot rows to uniform ones
    budget: float = 0.25        # the training lab's budget; how each method splits it is stated in the claim
    block_size: int = 8         # the released attention uses larger blocks at longer sequences


# FULL at 4 seeds, not the default 6 (issue 20's time budget): the verdict is decided by the grid's both-fail
# rule, which seeds cannot change, and the critical comparison would need dozens (seeds_for_power at QUICK's sd);
# 4 still give each comparison's sd an estimate
FULL = AttentionConfig(block_size=16, seeds=4)
# NOT measured on one thread (the one study without it; `bench/full_minutes.py attention s1` and `s2` would do it):
# 13.1 minutes (786 s) of wall clock for FULL at 0357eab (6 seeds) on 2 threads of 2 cores shared with six busy
# processes (load ~10, so well under one core for it); the parts added since cost two cheap estimators more. Taken as
# the estimate alone on one thread for 6 seeds, scaled to FULL's 4 seeds: 9 (no neighbour's cost in it: reproduce's
# CONTENTION adds that)
FULL_MINUTES = 9
# 3 seeds (the verdict needs an sd), 4 temperatures to stay within the time budget
QUICK = AttentionConfig(n=256, seeds=3, temperatures=4)
TINY = AttentionConfig(n=64, seeds=1, temperatures=2, block_size=4)


def _parts_claim(tables: dict, temperatures, size: str, split: str, figure: str, csv: str) -> Claim:
    """The paper's claim: Pixelfly's error below each of its parts at every temperature, both regimes."""
    decisions, means = {}, {}
    for regime, df in tables.items():
        errors = df.pivot_table(index=["temperature", "seed"], columns="method", values="error")
        for t in temperatures:
            at = errors.xs(float(t), level="temperature")
            for part in PIXELFLY_PARTS:
                name = f"{regime}, t={t:.2g}, {part}"
                decisions[name] = paired_decision((at[part] - at["pixelfly"]).to_numpy(), margin=0.0, alpha=ALPHA)
                means[name] = (float(at["pixelfly"].mean()), float(at[part].mean()))
    critical, whole = every_held(decisions)
    both_fail = [n for n, (ours, part) in means.items() if ours > 1 and part > 1]
    verdict, seeds_help = whole.verdict, True
    note = ""
    if both_fail and verdict != "refuted":
        verdict, seeds_help = "undecided", False
        note = (f"; undecided by the rule: at {len(both_fail)} comparison(s) both Pixelfly and its part are worse than "
                f"predicting zero ({', '.join(both_fail)}), so they cannot favour either (more seeds do not change it)")
    below = sum(d.verdict == "held" for d in decisions.values())
    fields = decision_fields(whole)  # its seeds_to_decide: the critical comparison's, computed once
    fields.update(held=HELD[verdict], seeds_to_decide=fields["seeds_to_decide"] if seeds_help else None)
    worst = max(means, key=lambda n: means[n][0])
    return Claim(
        "Pixelfly paper, Sec. 4 (after Scatterbrain, Sec. 3): sparse + low-rank attention is more robust across "
        f"temperatures than its parts -- Pixelfly attention's error stays below that of each of its parts at every "
        f"temperature (regimes {', '.join(tables)}; {split}; the parts: its support alone with exact softmax, and its "
        f"random features alone, as Performer). Rule, fixed before measuring: per (regime, temperature, part), per "
        f"seed (a seed fixes Q, K and the features), the part's relative error minus Pixelfly's; held when every "
        f"{100 * (1 - 2 * ALPHA):.0f}% t interval of the mean lies above 0 (intersection-union over "
        f"{len(decisions)} comparisons), refuted when Holm across them puts one below 0, otherwise undecided; a "
        "comparison where both mean errors exceed 1 (worse than the zero matrix) cannot favour either, so the claim "
        "is then at best undecided",
        f"verdict: {verdict} (critical: {critical}: part - pixelfly {whole.describe()}; {below} of {len(decisions)} "
        f"comparisons held alone; {size}). Pixelfly's largest mean error: {means[worst][0]:.3f} at "
        f"{worst.rsplit(', ', 1)[0]}"
        + note, **fields, figure=figure, kind="paper", table=csv)


def _estimator_reading(regime: str, df: pd.DataFrame, size: str, figure: str, csv: str) -> Claim:
    """Each estimator's worst error over the temperatures at equal budget (a reading: no verdict)."""
    per_seed = df.groupby(["method", "seed", "temperature"]).error.mean().groupby(["method", "seed"]).max()
    worst = per_seed.groupby("method").agg(["mean", "std"]).fillna(0.0)
    above = [m for m in ATTENTION_ESTIMATORS if worst.loc[m, "mean"] > 1]
    return Claim(
        f"Estimators at equal budget ({regime}): each one's worst relative error over the temperatures (fixed sparse "
        "supports, Performer, Scatterbrain with an ideal-LSH support, Pixelfly); above 1 is worse than the zero matrix",
        f"worst error over t, mean +- sd over seeds ({size}): "
        + ", ".join(f"{m} {worst.loc[m, 'mean']:.3f}+-{worst.loc[m, 'std']:.3f}" for m in ATTENTION_ESTIMATORS)
        + f"; above 1: {', '.join(above) or 'none'}", None, figure, kind="info", table=csv)


def _plot_parts(tables: dict, budget: float):
    """Pixelfly's error and its two parts' against temperature, one panel per regime (mean over seeds)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.6), squeeze=False)
    for ax, (regime, df) in zip(axes[0], tables.items()):
        means = df.groupby(["method", "temperature"]).error.mean()
        for i, method in enumerate(("pixelfly",) + tuple(PIXELFLY_PARTS)):
            part = means.loc[method]
            ax.plot(part.index, part.values, "o-" if i == 0 else "s--", ms=3, label=method)
        ax.axhline(1.0, color="grey", ls=":", label="error of the zero matrix")
        ax.set(xscale="log", yscale="log", xlabel="temperature t (low: nearly sparse, high: nearly low-rank)",
               ylabel="relative Frobenius error", title=f"{regime}: Pixelfly and its parts, budget {budget}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(out: Path, config: AttentionConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """Error against temperature per method and regime; Pixelfly against its parts (the paper's claim), the
    equal-budget estimators and the oracles as readings, and two checks."""
    n, seeds, budget, block = config.n, config.seeds, config.budget, config.block_size
    temperatures = np.logspace(np.log10(0.05), 1, config.temperatures)
    tables = {regime: attention_table(n, temperatures, budget, seeds, locality=locality, block_size=block, parts=True,
                                      progress=False)
              for regime, locality in (("random Q, K", 0.0), ("local Q, K", 1.0))}
    both = pd.concat([df.assign(regime=name) for name, df in tables.items()])  # built once: the CSV and the check
    csv = save_table(both, out, "attention")
    estimators = {name: df[df.role != "part"] for name, df in tables.items()}
    figure = save_figure(plot_attention_table(estimators, budget), out, "attention_vs_temperature")
    parts_png = save_figure(_plot_parts(tables, budget), out, "attention_parts")
    save_figure(plot_attention_examples(n, (0.05, 0.5, 5.0), 1.0), out, "attention_examples")

    size = (f"n={n}, block {block}, budget {budget}, {seeds} seed(s), "
            f"t in [{temperatures[0]:.2g}, {temperatures[-1]:.2g}]")
    claims = [_parts_claim(tables, temperatures, size, _budget_split(n, budget, block), parts_png, csv)]
    for regime, df in estimators.items():
        claims.append(_estimator_reading(regime, df, size, figure, csv))
        worst = df.groupby(["method", "temperature"]).error.mean().groupby("method").max()
        claims.append(Claim(
            f"Oracles ({regime}): the best k-sparse projection, the truncated SVD and top-k + SVD (half the budget "
            f"each) see the target itself; they bound the estimators and decide nothing about them",
            f"worst error over t, mean over seeds ({size}): "
            + ", ".join(f"{m} {worst.loc[m]:.3f}" for m in ATTENTION_ORACLES),
            None, figure, kind="info", table=csv))
    coldest = {regime: df[df.temperature == df.temperature.min()].groupby("method").error.mean()
               for regime, df in tables.items()}
    claims.append(Claim(
        "Scatterbrain (Sec. 3), check of the estimator: an exact correction on the largest scores rescues random "
        "features (Performer) in the nearly sparse regime (held when scatterbrain's error is below performer's at "
        "the coldest temperature in both regimes)",
        f"error at t={temperatures[0]:.2g}: " + "; ".join(
            f"{regime}: performer {e['performer']:.3f}, scatterbrain {e['scatterbrain']:.3f}"
            for regime, e in coldest.items()),
        all(bool(e["scatterbrain"] < e["performer"]) for e in coldest.values()), figure, kind="check", table=csv))
    within = both[both.method.isin(SPARSE_ESTIMATORS) & (both.kept <= budget + 1e-12)]
    topk = both[both.method == "topk"].set_index(["regime", "temperature", "seed"]).error
    worse = within.error.values + 1e-12 >= topk.loc[list(zip(within.regime, within.temperature, within.seed))].values
    topk_ok = bool(len(within) and worse.all())
    claims.append(Claim(
        "Oracle check: the best k-sparse projection (top-k) is never beaten by a fixed-support sparse estimator "
        "keeping at most k entries (held when top-k <= every such estimator + 1e-12 in every case)",
        f"{len(within)} (estimator, regime, temperature, seed) cases within the budget "
        f"({', '.join(sorted(set(within.method)))}): {topk_ok}", topk_ok, figure, kind="check", table=csv))
    return claims


def _budget_split(n: int, budget: float, block: int) -> str:
    """How each estimator spends the budget (m random features cost 2 n m of the n^2 scores)."""

    layout, m = attention_layout("pixelfly", n, budget, block)
    rank = performer_rank(n, budget)
    return (f"Pixelfly = the attention layer's planner split, a flat block butterfly support of density "
            f"{layout.float().mean().item():.4g} + {m} random features ({2 * m / n:.4g} of the n^2 scores); "
            f"Scatterbrain = top-{budget / 2:g} n^2 support + {max(1, rank // 2)} features; Performer = {rank} "
            f"features; sparse estimators = their densest layout within the budget")
