"""Study 'attention': attention matrices across temperatures, approximated by sparse, low-rank and
sparse + low-rank methods (see :mod:`pixelfly_lab.attention` for the methods).

Two regimes: random Q, K, and Q, K with a positional part (locality 1, like trained local
attention). The paper's statement (Scatterbrain, Chen et al., NeurIPS 2021, arXiv 2110.15343,
Sec. 3; Pixelfly paper, Sec. 4) is that sparse + low-rank stays accurate across temperatures
where each part alone fails in one regime. That Scatterbrain's sparse correction beats plain
Performer at the coldest temperature is a 'check': it holds by construction of the estimator.
CPU only, whatever ``device``: the matrices are small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..attention import ATTENTION_METHODS, attention_table, plot_attention_examples, plot_attention_table
from .claims import Claim, save_figure, save_table

__all__ = ["AttentionConfig", "FULL", "QUICK", "TINY", "run"]


@dataclass(frozen=True)
class AttentionConfig:
    """Sizes of the 'attention' study."""

    n: int = 256                # sequence length
    seeds: int = 3
    temperatures: int = 10      # points log-spaced over [0.05, 10]: one-hot rows to uniform ones
    budget: float = 0.125       # a flat block butterfly with 2 factors at butterfly size 16 + a small rank


FULL = AttentionConfig()
QUICK = AttentionConfig(n=64, seeds=1, temperatures=6)
TINY = AttentionConfig(n=32, seeds=1, temperatures=3)


def run(out: Path, config: AttentionConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """Error against temperature per method and regime; the robustness claim and the rescue check."""
    n, seeds, budget = config.n, config.seeds, config.budget
    temperatures = np.logspace(np.log10(0.05), 1, config.temperatures)
    tables = {"random Q, K": attention_table(n, temperatures, budget, seeds, progress=False),
              "local Q, K": attention_table(n, temperatures, budget, seeds, locality=1.0, progress=False)}
    csv = save_table(pd.concat([df.assign(regime=name) for name, df in tables.items()]), out, "attention")
    figure = save_figure(plot_attention_table(tables, budget), out, "attention_vs_temperature")
    save_figure(plot_attention_examples(n, (0.05, 0.5, 5.0), 1.0), out, "attention_examples")

    family = pd.Series(ATTENTION_METHODS)
    claims = []
    for regime, df in tables.items():
        worst = df.groupby(["method", "temperature"]).error.mean().groupby("method").max()
        best = {fam: worst[family[family == fam].index].idxmin() for fam in family.unique()}
        claims.append(Claim(
            f"Scatterbrain (Sec. 3) / Pixelfly paper (Sec. 4): sparse + low-rank stays accurate across temperatures, "
            f"where sparse-only and low-rank-only approximations each fail in one regime ({regime}; held when the "
            f"most robust sparse + low-rank method's worst error over the temperatures is below the most robust "
            f"sparse and low-rank methods' worst errors, budget {budget})",
            f"worst error over t in [{temperatures[0]:.2g}, {temperatures[-1]:.2g}], n={n}: "
            + ", ".join(f"{name} {worst[name]:.3f}" for name in ATTENTION_METHODS)
            + "; most robust per family: " + ", ".join(f"{fam} {name}" for fam, name in best.items()),
            bool(worst[best["sparse + low-rank"]] < min(worst[best["sparse"]], worst[best["low-rank"]])),
            figure, kind="paper", table=csv))
    coldest = {regime: df[df.temperature == df.temperature.min()].groupby("method").error.mean()
               for regime, df in tables.items()}
    claims.append(Claim(
        "Scatterbrain (Sec. 3), check of the estimator: a sparse correction on the largest scores rescues random "
        "features (Performer) in the nearly sparse regime (held when scatterbrain's error is below performer's at "
        "the coldest temperature in both regimes)",
        f"error at t={temperatures[0]:.2g}: " + "; ".join(
            f"{regime}: performer {e['performer']:.3f}, scatterbrain {e['scatterbrain']:.3f}"
            for regime, e in coldest.items()),
        all(bool(e["scatterbrain"] < e["performer"]) for e in coldest.values()), figure, kind="check", table=csv))
    return claims
