"""Study 'ntk': how far each pattern's neural tangent kernel is from the dense model's.

Composes :func:`pixelfly_lab.ntk_study.ntk_study` (which trains the models and measures the
kernels) and its plots. The paper's statements checked (Dao, Chen et al., ICLR 2022,
arXiv 2112.00029, Sec. 3.3 and Fig. 3, the NTK-guided choice of the pattern): among patterns
at the same budget, Pixelfly's NTK is the closest to the dense model's, and a smaller NTK
distance goes with a higher accuracy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from ..ntk_study import (QUICK as NTK_QUICK, NTKStudyConfig, ntk_study, plot_distance_at_init,
                         plot_distance_over_training, plot_distance_vs_accuracy, plot_spectra)
from ..threads import num_threads
from .claims import Claim, save_figure, save_table

__all__ = ["NTKStudyConfig", "FULL", "QUICK", "TINY", "run"]

# The study's config is the library's NTKStudyConfig (frozen); ``device`` is set by run().
FULL = NTKStudyConfig()
QUICK = NTK_QUICK
# three patterns: the rank correlation needs at least three points to mean anything
TINY = NTKStudyConfig(families=("mlp",), patterns=("dense", "lowrank", "pixelfly"), seeds=(0,),
                      reference_seeds=(5,), n_kernel=6, n_train=16, steps=2, eval_every=1)


def _closest_sparse(frame: pd.DataFrame, family: str, metric: str) -> pd.Series:
    init = frame[(frame.family == family) & (frame.step == 0) & (frame.pattern != "dense")]
    return init.groupby("pattern")[metric].mean().sort_values()


def run(out: Path, config: NTKStudyConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """Distances, spectra and the distance-accuracy picture, with the paper's two claims per family."""
    cfg = replace(config, device=device)
    with num_threads(1 if device == "cpu" and config != FULL else None):  # tiny models: see pixelfly_lab.threads
        frame = ntk_study(cfg, progress=False)
    csv = save_table(frame, out, "ntk_distances")
    save_table(frame.attrs["spectra"], out, "ntk_spectra")
    init_png = save_figure(plot_distance_at_init(frame), out, "ntk_distance_init")
    save_figure(plot_distance_at_init(frame, "cka"), out, "ntk_distance_init_cka")
    train_png = save_figure(plot_distance_over_training(frame), out, "ntk_distance_training")
    acc_png = save_figure(plot_distance_vs_accuracy(frame), out, "ntk_distance_vs_accuracy")
    save_figure(plot_spectra(frame.attrs["spectra"]), out, "ntk_spectra")
    setup = (f"{len(cfg.seeds)} seed(s), budget {cfg.budget}, block {cfg.block_size}, kernels on "
             f"{cfg.n_kernel} held-out digits")
    claims = []
    for family in cfg.families:
        ranking = _closest_sparse(frame, family, "relative_frobenius")
        floor = frame[(frame.family == family) & (frame.step == 0) & (frame.pattern == "dense")]
        claims.append(Claim(
            f"Pixelfly paper (Sec. 3.3, NTK analysis): among patterns at the same budget, Pixelfly's NTK is the "
            f"closest to the dense model's -- {family} on digits (held when pixelfly has the smallest mean relative "
            f"Frobenius distance at initialisation among the sparse patterns)",
            f"relative Frobenius distance at init ({setup}): "
            + ", ".join(f"{p} {d:.3f}" for p, d in ranking.items())
            + (f"; dense seed-to-seed floor {floor.relative_frobenius.mean():.3f}" if len(floor) else ""),
            "pixelfly" in ranking.index and ranking.index[0] == "pixelfly", init_png, kind="paper", table=csv))
        part = frame[frame.family == family]
        dist = part[part.step == 0].groupby("pattern").relative_frobenius.mean()
        acc = part[part.step == part.step.max()].groupby("pattern").test_accuracy.mean()
        rho = dist.corr(acc, method="spearman") if len(dist) > 2 else float("nan")
        claims.append(Claim(
            f"Pixelfly paper (Sec. 3.3, NTK analysis): a smaller NTK distance goes with a higher accuracy -- {family}, "
            f"patterns ranked after {part.step.max()} full-batch Adam steps (held when the Spearman correlation "
            f"between distance at init and test accuracy is negative; undecided below 3 patterns)",
            f"Spearman correlation across {len(dist)} patterns: {rho:+.2f}",
            bool(rho < 0) if rho == rho else None, acc_png, kind="paper", table=csv))
    drift = frame[frame.step == frame.step.max()].groupby(["family", "pattern"]).relative_frobenius.mean()
    claims.append(Claim(
        "NTK along training: how the distance to the equally trained dense models moves in a short training",
        "relative Frobenius distance at the last step: "
        + ", ".join(f"{f}/{p} {d:.3f}" for (f, p), d in drift.items()), None, train_png, kind="info", table=csv))
    return claims
