"""Study 'attention': attention matrices across temperatures, oracles against oracles and
estimators against estimators (see :mod:`pixelfly_lab.studies.estimators` for the methods).

Two regimes: random Q, K, and Q, K with a positional part (locality 1, like trained local
attention). The paper's statement (Scatterbrain, Chen et al., NeurIPS 2021, arXiv 2110.15343,
Sec. 3; Pixelfly paper, Dao, Chen et al., ICLR 2022, Sec. 4) is that sparse + low-rank attention
is more robust across temperatures than each part alone, which fails in one regime. Pixelfly
attention spends the budget as the attention layer's planner splits it (a flat block butterfly
support plus a few random features, not half and half; the claim states the split). The verdict
is paired by seed (:func:`pixelfly_lab.studies.stats.paired_decision` on each method's worst
error minus Pixelfly's, intersection-union over the methods and both regimes); an error above 1
is worse than predicting zero, and the text says which estimators are there. It is decided on
*estimators* (methods that see Q and K only, as a layer does), never on an oracle that projects
the target itself: an oracle sparse + low-rank projection with its split searched cannot lose to
its parts, so it would be a check, not evidence. The oracles are shown beside, as bounds.
Checks (hold by construction): Scatterbrain's exact correction on the largest scores rescues
Performer at the coldest temperature; the top-k oracle beats every fixed-support estimator.
CPU only, whatever ``device``: the matrices are small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pixelfly_lab.studies.estimators import ATTENTION_ESTIMATORS, ATTENTION_ORACLES, attention_table, plot_attention_examples, plot_attention_table
from pixelfly_lab.studies.claims import Claim, decision_fields, member, save_figure, save_table
from pixelfly_lab.studies.stats import every_held, paired_decision
from pixelfly_lab.nn.attention import attention_layout

__all__ = ["AttentionConfig", "FULL", "QUICK", "TINY", "run"]

SPARSE_ESTIMATORS = ("local", "bigbird", "butterfly")
ALPHA = 0.05  # level of each one-sided test (90% t intervals)


@dataclass(frozen=True)
class AttentionConfig:
    """Sizes of the 'attention' study."""

    n: int = 512                # sequence length; n >= 256 so that a block support can be local and sparse
    # paired by seed; FULL's 6: at QUICK the closest paired gap was decided at 3 seeds (a power
    # computation on QUICK's sd asks for <= 5); 6 leaves room for a gap half that size
    seeds: int = 6
    temperatures: int = 10      # points log-spaced over [0.05, 10]: one-hot rows to uniform ones
    budget: float = 0.25        # the training lab's budget; how each method splits it is stated in the claim
    block_size: int = 8         # the released attention uses larger blocks at longer sequences


FULL = AttentionConfig(block_size=16)
FULL_MINUTES = 3  # estimate: QUICK's half minute x 4 (n 512 against 256) x 2 (6 seeds against 3), 10 temperatures
# 3 seeds (the verdict needs an sd), 4 temperatures to stay within the time budget
QUICK = AttentionConfig(n=256, seeds=3, temperatures=4)
TINY = AttentionConfig(n=64, seeds=1, temperatures=2, block_size=4)


def run(out: Path, config: AttentionConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """Error against temperature per method and regime; the robustness claim on estimators, the
    oracles for information, and two checks."""
    n, seeds, budget, block = config.n, config.seeds, config.budget, config.block_size
    temperatures = np.logspace(np.log10(0.05), 1, config.temperatures)
    tables = {regime: attention_table(n, temperatures, budget, seeds, locality=locality, block_size=block,
                                      progress=False)
              for regime, locality in (("random Q, K", 0.0), ("local Q, K", 1.0))}
    csv = save_table(pd.concat([df.assign(regime=name) for name, df in tables.items()]), out, "attention")
    figure = save_figure(plot_attention_table(tables, budget), out, "attention_vs_temperature")
    save_figure(plot_attention_examples(n, (0.05, 0.5, 5.0), 1.0), out, "attention_examples")

    size = f"n={n}, block {block}, budget {budget}, {seeds} seed(s), t in [{temperatures[0]:.2g}, {temperatures[-1]:.2g}]"
    split = _budget_split(n, budget, block)
    claims, regimes, readings = [], {}, []
    for regime, df in tables.items():
        # worst error over the temperatures per seed (the seed fixes Q, K for every method: paired)
        per_seed = df.groupby(["method", "seed", "temperature"]).error.mean().groupby(["method", "seed"]).max()
        worst = per_seed.groupby("method").agg(["mean", "std"]).fillna(0.0)
        ours = per_seed.loc["pixelfly"]
        decisions = {m: paired_decision((per_seed.loc[m] - ours).to_numpy(), margin=0.0, alpha=ALPHA)
                     for m in SPARSE_ESTIMATORS + ("performer",)}
        critical, whole = every_held(decisions)
        regimes[regime] = whole
        best_sparse = worst.loc[list(SPARSE_ESTIMATORS), "mean"].idxmin()
        readings.append(
            f"{regime}: {whole.verdict} (critical: {critical}, worst error of it - pixelfly's {whole.describe()}); "
            f"worst error over t, mean +- sd: pixelfly {worst.loc['pixelfly', 'mean']:.3f}+-"
            f"{worst.loc['pixelfly', 'std']:.3f}, most robust sparse {best_sparse} "
            f"{worst.loc[best_sparse, 'mean']:.3f}+-{worst.loc[best_sparse, 'std']:.3f}, performer "
            f"{worst.loc['performer', 'mean']:.3f}+-{worst.loc['performer', 'std']:.3f}; scatterbrain (ideal-LSH "
            f"support) {worst.loc['scatterbrain', 'mean']:.3f}; above 1 (worse than zero): "
            + (", ".join(m for m in ATTENTION_ESTIMATORS if worst.loc[m, "mean"] > 1) or "none"))
        claims.append(Claim(
            f"Oracles ({regime}): the best k-sparse projection, the truncated SVD and top-k + SVD (half the budget "
            f"each) see the target itself; they bound the estimators and decide nothing about them",
            f"worst error over t, mean over seeds ({size}): "
            + ", ".join(f"{m} {worst.loc[m, 'mean']:.3f}" for m in ATTENTION_ORACLES),
            None, figure, kind="info", table=csv))
    critical, whole = every_held(regimes)
    claims.insert(0, Claim(
        f"Pixelfly paper, Sec. 4 (after Scatterbrain, Sec. 3): sparse + low-rank attention is more robust across "
        f"temperatures than sparse-only and low-rank-only attention, each of which fails in one regime (regimes "
        f"{', '.join(tables)}; estimators only, from Q and K at equal budget {budget}: {split}. Measure: each "
        f"method's worst relative error over the temperatures, per seed (a seed fixes Q and K for every method). "
        f"Held when in both regimes, for every fixed-support sparse estimator ({', '.join(SPARSE_ESTIMATORS)}) and "
        f"Performer, the {100 * (1 - 2 * ALPHA):.0f}% t interval of (its worst error - Pixelfly's) lies above 0; "
        f"refuted when one lies below 0 (Holm across the comparisons); otherwise undecided, e.g. with one seed. A "
        f"relative error above 1 is worse than predicting the zero matrix)",
        f"verdict: {whole.verdict} (critical regime: {critical}; {size}). " + " | ".join(readings),
        **decision_fields(whole), figure=figure, kind="paper", table=csv,
        members=[member(r, d) for r, d in regimes.items()]))
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
    both = pd.concat([df.assign(regime=name) for name, df in tables.items()])
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
    rank = max(1, int(budget * n / 2))     # as pixelfly_lab.studies.estimators: Performer's features
    return (f"Pixelfly = the attention layer's planner split, a flat block butterfly support of density "
            f"{layout.float().mean().item():.4g} + {m} random features ({2 * m / n:.4g} of the n^2 scores); "
            f"Scatterbrain = top-{budget / 2:g} n^2 support + {max(1, rank // 2)} features; Performer = {rank} "
            f"features; sparse estimators = their densest layout within the budget")
