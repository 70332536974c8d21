"""Study 'theory': the paper's theorems, numerically (see :mod:`pixelfly_lab.studies.theorems` for the maths).

1. Flat vs residual butterfly (Pixelfly paper, Thm 1, Sec. 3.2): the gap ||R - F|| / ||F||
   shrinks as lam^2 and, relative to the perturbation ||R - I||, as lam. Both slopes are fixed
   by the algebra: 'check's of the code, not tests of the paper.
2. Block butterfly (Sec. 3.2, the talk's "block butterfly retains the expressiveness of
   butterfly"): block butterfly products against butterfly products with the same number of
   parameters, fitted by Adam from random starts and from a closed-form hierarchical
   factorisation. Hadamard and a random butterfly product lie in every class fitted: there the
   fits are the positive control (every class must reach relative error < 0.02, else the claim is
   undecided), shown as a reading. The 'paper' claim is on targets outside both classes (DCT, a
   Gaussian matrix), undecided also when a class containing the plain butterfly product fits
   worse than it (the fits did not converge). That blocks of 2 contain every butterfly product
   exactly is algebra: a 'check'.
3. Sparse + low-rank (Thm 2, Sec. 4: there exist matrices where sparse + low-rank beats either
   part): with the *fixed* flat block butterfly support. The 'paper' claim is decided in one
   regime named after the grid had been seen (local attention at temperature 1), on its own seeds, paired by seed
   (:func:`pixelfly_lab.studies.stats.paired_decision` on the relative gain of the best split
   over the better part, margin 5%); "on some target of a grid" is an existence statement that
   a wide grid always satisfies: a 'check', on other seeds than the claim's. The adaptive-support
   variant (top-k + low-rank) is robust PCA (Candes et al., 2011) / Scatterbrain's oracle, not a
   statement of the Pixelfly paper: 'info'.
4. Lazy training (Thm 3, :mod:`pixelfly_lab.studies.lazy_training`): one 'paper' claim over seeds
   with three members (the NTK change's slope against width, the change against dense's at the
   widest, the loss -> 0), dense as the positive control that must show both.
5. Exactness (Dao et al., ICML 2019, arXiv 1903.05895): butterfly products represent the DFT and
   Hadamard transforms exactly; the flat butterfly at the same budget does not: a 'check'.

CPU only, whatever ``device``: the matrices and networks are small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pixelfly_lab.approx.expressiveness import approximate
from pixelfly_lab.structure.projections import relative_error
from pixelfly_lab.approx.targets import random_butterfly_factors, target_matrix
from pixelfly_lab.studies.theorems import (block_butterfly_factor_masks, block_vs_butterfly, exact_butterflies,
                                           loglog_slope, lowrank_share_sweep, plot_block_vs_butterfly,
                                           plot_exact_butterflies, plot_lowrank_share_sweep, plot_residual_flat_gap,
                                           residual_flat_gap)
from pixelfly_lab.studies.lazy_training import ntk_change_vs_width, plot_ntk_change
from pixelfly_lab.studies.claims import Claim, decision_fields, member, save_figure, save_table
from pixelfly_lab.studies.expressiveness import comparison_labels
from pixelfly_lab.studies.stats import every_held, paired_decision

__all__ = ["TheoryConfig", "FULL", "QUICK", "TINY", "run"]


@dataclass(frozen=True)
class TheoryConfig:
    """Sizes of the 'theory' study."""

    n_gap: int = 64             # residual vs flat butterfly size (the slopes do not depend on it)
    n_sweep: int = 256          # low-rank share sweeps
    sweep_block: int = 8        # block of the fixed flat block butterfly support in the sweeps
    # Thm 2's regime claim is paired by seed; 5 in FULL: QUICK's 3 seeds decide it when the gain's sd
    # is below ~half its distance to the margin (seeds_for_power(sd, gain, 0.05) <= 5 then)
    sweep_seeds: int = 5
    n_exact: int = 64           # exact transforms
    fit_steps: int = 2000       # gradient fit of a butterfly product (shown beside the exact one)
    budget: float = 0.2         # the sweeps' fixed budget
    n_block: int = 32           # block butterfly vs butterfly size
    block_sizes: tuple[int, ...] = (2, 4)   # 2 contains butterfly by algebra; 4 is the real test
    block_steps: int = 1500     # Adam steps per fitted product
    block_restarts: int = 2     # random starts per fit, besides the closed-form one
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)   # Thm 3 network widths
    ntk_steps: int = 1000       # full-batch gradient-descent steps
    # Thm 3 is decided over seeds (per-seed slopes, paired with dense): 4 seeds of 32 samples decide it at QUICK
    # (per-seed slopes -0.75 to -0.95 against the -0.4 bound, sd ~0.08), ~30 s on two loaded cores
    ntk_seeds: int = 4
    ntk_samples: int = 32
    thm2_temperatures: tuple[float, ...] = (0.5, 1.0, 2.0)   # Thm 2's grid, crossed with locality 0 and 1


FULL = TheoryConfig()
# Minutes of FULL on ONE thread (a `reproduce --jobs` worker), measured 2026-12-06: FULL with ntk_seeds=1 and
# sweep_seeds=1 took 138 s of CPU at one thread (417 s wall at load 4-5, machine shared; `bench/full_minutes.py
# theory s1`). FULL has 4 and 5 of them: at most 5 x 138 = 690 s (the block fits and the exact transforms, which
# do not scale with seeds, counted 5 times: an upper bound), alone (reproduce's CONTENTION adds a neighbour)
FULL_MINUTES = 11.5
# block 4 at n = 32: 3 factors, 768 of the 1024 parameters, so the block claim is not the
# containment algebra (block 2) and the class is not dense
QUICK = TheoryConfig(sweep_seeds=3, n_sweep=128, sweep_block=4, n_exact=16, fit_steps=600, n_block=32, block_sizes=(4,),
                     block_steps=400, block_restarts=1, widths=(64, 128, 256, 512), ntk_steps=300, ntk_seeds=4)
TINY = TheoryConfig(n_gap=16, n_sweep=32, sweep_block=4, sweep_seeds=2, n_exact=8, fit_steps=50, n_block=8,
                    block_sizes=(2,), block_steps=60, block_restarts=1, widths=(32, 64), ntk_steps=30, ntk_seeds=1,
                    ntk_samples=8,
                    thm2_temperatures=(1.0,))

# Thm 2's margin: the best split must beat the best single part by 5% of its error on every seed,
# so that a tie within the projections' stopping tolerance is not read as a win
THM2_MARGIN = 0.05
# Thm 2's claim draws its targets from seeds THM2_CLAIM_SEED0, +1, ...: apart from the existence check's 0, 1, ...
THM2_CLAIM_SEED0 = 1000
# Thm 2's paper claim is decided in this regime: local attention at mid temperature (cold rows are
# sparse, hot ones low-rank: a mix needs both parts). Named after the grid had been measured in earlier
# runs (it is one of the cells where the mix won): the claim's own seeds are fresh, the choice is not
THM2_REGIME = "attention (t=1, local)"
# Block butterfly "retains" butterfly's expressiveness: its fitted error may exceed the butterfly
# product's at equal parameters by at most this much (fits stop near 1e-2 on hard targets)
BLOCK_TOLERANCE = 0.02
# The block claim's positive control: every fitted class must fit the targets it contains (Hadamard, a random
# butterfly product) to below this relative error, else the fits measure the optimiser and the claim is undecided
IN_CLASS_TOLERANCE = 0.02
# Targets outside both classes for the block butterfly paper claim (on Hadamard and butterfly products,
# which both classes contain exactly, the comparison measures the optimiser: a check)
OUTSIDE_TARGETS = ("dct", "gaussian")
# Thm 3: the predicted slope is -1/2; the measured one must be at most this
THM3_SLOPE = -0.4
# Thm 3: at the widest network the sparse NTK change may be at most this many times the dense one's
THM3_DENSE_FACTOR = 1.5
# Thm 3's convergence: the loss falls to at most this share of its initial value
THM3_LOSS = 1e-2


def run(out: Path, config: TheoryConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """The measurements of the module docstring, as figures, tables and claims."""
    return (_thm1(out, config) + _block_butterfly(out, config) + _thm2(out, config) + _thm3(out, config)
            + _exact(out, config))


def _thm1(out, config) -> list[Claim]:
    n_gap = config.n_gap
    gap = residual_flat_gap(n_gap)
    fit_max = 1e-2  # the asymptotic regime: beyond it the O(lam^3) terms bend the curve
    fitted = gap[gap.lam <= fit_max]
    slope = loglog_slope(fitted.lam, fitted.gap)
    slope_change = loglog_slope(fitted.lam, fitted.gap_over_change)
    csv = save_table(gap, out, "residual_flat_gap")
    figure = save_figure(plot_residual_flat_gap(gap, slope, fit_max, n_gap), out, "residual_flat_gap")
    return [Claim("Pixelfly paper, Thm 1 (Sec. 3.2), check of the algebra: the gap between the residual butterfly "
                  "R = prod(I + lam B_k) and the flat butterfly F = I + lam sum B_k, relative to ||F||, shrinks as "
                  "lam^2 (held when the fitted log-log slope over lam <= 1e-2 is within 0.05 of 2)",
                  f"fitted slope {slope:.4f} over lam in [{fitted.lam.min():.0e}, {fit_max:.0e}], n={n_gap}; "
                  f"gap/lam^2 at the smallest lam {fitted.gap_over_lam2.iloc[0]:.3f}",
                  abs(slope - 2.0) < 0.05, figure, kind="check", table=csv),
            Claim("Pixelfly paper, Thm 1, check: relative to what the residual adds to the identity, ||R - I||, the "
                  "flat butterfly's gap is only O(lam): ||R - F|| / ||R - I|| has slope 1 (held when the fitted "
                  "log-log slope over lam <= 1e-2 is within 0.05 of 1)",
                  f"fitted slope {slope_change:.4f}; ||R - F|| / ||R - I|| = "
                  + ", ".join(f"{g:.1e} at lam={lam:.0e}" for lam, g in
                              zip(gap.lam.iloc[[0, len(fitted) - 1, -1]], gap.gap_over_change.iloc[[0, len(fitted) - 1, -1]])),
                  abs(slope_change - 1.0) < 0.05, figure, kind="check", table=csv)]


def _block_rows(df, block_sizes):
    """Per (target, block size): the block product's error, the equal-parameter butterfly's, and the plain one's."""
    err = df.set_index(["kind", "method"]).error
    worst = df.set_index(["kind", "method"]).error_worst
    plain = "butterfly (log2 n factors)"
    rows = []
    for b in block_sizes:
        for kind in df.kind.unique():
            block, deep = f"block butterfly (block {b})", f"butterfly, params of block {b}"
            rows.append(dict(kind=kind, b=b, block=err[kind, block], deep=err[kind, deep], plain=err[kind, plain],
                             block_worst=worst[kind, block], deep_worst=worst[kind, deep]))
    return rows


def _block_butterfly(out, config) -> list[Claim]:
    """The positive control on the classes' own ground, and the paper claim on targets outside both."""
    n = config.n_block
    home = block_vs_butterfly(n, config.block_sizes, steps=config.block_steps, restarts=config.block_restarts)
    away = block_vs_butterfly(n, config.block_sizes, kinds=OUTSIDE_TARGETS, steps=config.block_steps,
                              restarts=config.block_restarts)
    df = pd.concat([home.assign(ground="inside both classes"), away.assign(ground="outside both classes")])
    csv = save_table(df, out, "block_vs_butterfly")
    figure = save_figure(plot_block_vs_butterfly(df, n), out, "block_vs_butterfly")

    def parts(rows):
        return "; ".join(f"{r['kind']} b={r['b']}: block {r['block']:.3f} (worst restart {r['block_worst']:.3f}) vs "
                         f"butterfly {r['deep']:.3f} (worst restart {r['deep_worst']:.3f}), plain log2 n butterfly "
                         f"{r['plain']:.3f}" for r in rows)

    away_rows = _block_rows(away, config.block_sizes)
    # every fitted class contains the plain butterfly product: fitting worse than it is an optimisation failure
    stuck = [f"{r['kind']} b={r['b']} {m} {r[m]:.3f} > plain {r['plain']:.3f}" for r in away_rows
             for m in ("block", "deep") if r[m] > r["plain"] + BLOCK_TOLERANCE]
    # the positive control: every class fits the targets it contains (Hadamard, a butterfly product)
    missed = [f"{r.kind} {r.method} {r.error:.3f}" for r in home.itertuples() if r.error >= IN_CLASS_TOLERANCE]
    held = None if stuck or missed else all(r["block"] <= r["deep"] + BLOCK_TOLERANCE for r in away_rows)
    setting = (f"n={n}, {config.block_steps} Adam steps, best of {config.block_restarts} random start(s) and the "
               "closed-form hierarchical start")
    control = ("; ".join(f"{r.kind} {r.method}: {r.error:.1e} (random starts alone {r.error_random:.3f})"
                         for r in home.itertuples()))
    why = ("undecided, " + ("positive control failed: " + "; ".join(missed) + ". " if missed else "")
           + ("fits not converged: " + "; ".join(stuck) + ". " if stuck else "")) if stuck or missed else ""
    return [Claim("Block butterfly fits on the classes' own ground, the block claim's positive control as a reading: "
                  "Hadamard and a random butterfly product lie in every class fitted (block butterfly, butterfly with "
                  "as many parameters, the plain butterfly), so a fit short of 0 is the optimiser's; the fit from "
                  "random starts alone is shown beside the best",
                  control + f" ({setting})", None, figure, kind="info", table=csv),
            Claim("Pixelfly paper, Sec. 3.2 and the talk: block butterfly (products of block butterfly factors) "
                  "retains the expressiveness of butterfly at equal parameters -- on targets outside both classes ("
                  f"{', '.join(OUTSIDE_TARGETS)}), fitted by Adam from random starts and from the closed-form "
                  f"hierarchical factorisation (held when on every target the block product's error is at most the "
                  f"error of a butterfly product with the same parameter count + {BLOCK_TOLERANCE}, refuted when it "
                  f"exceeds it on one; decided only when the positive control holds: every fitted class reaches "
                  f"relative error < {IN_CLASS_TOLERANCE} on Hadamard and a random butterfly product, which it "
                  f"contains; undecided too when a fitted class that contains the plain log2 n butterfly product "
                  f"fits worse than it by more than {BLOCK_TOLERANCE}: the fits did not converge)",
                  why + parts(away_rows) + f"; positive control {'held' if not missed else 'FAILED'} (in-class "
                  f"errors up to {home.error.max():.1e}) ({setting})", held, figure, kind="paper", table=csv),
            _containment(n, figure)]


def _containment(n: int, figure: str) -> Claim:
    """Check: B_n ... B_4 B_2 = F_last ... F_0 with F_0 = B_4 B_2 on block 2's first factor, F_k = B_{2^(k+2)}."""
    factors = random_butterfly_factors(n, seed=0)
    merged = [factors[1] @ factors[0]] + factors[2:]
    on_support = all(bool(((f != 0) <= m).all()) for f, m in zip(merged, block_butterfly_factor_masks(n, 2)))
    gap = relative_error(torch.linalg.multi_dot(factors[::-1]), torch.linalg.multi_dot(merged[::-1]))
    return Claim("Block butterfly contains butterfly, check of the algebra: a butterfly product B_n ... B_2 is a "
                 "block butterfly product with blocks of 2 (its first factor B_4 B_2 is block 2's first factor, the "
                 "others are block factors with diagonal blocks; held when every merged factor lies on its block "
                 "mask and the products agree to 1e-12)",
                 f"n={n}: factors on their block masks {on_support}, relative difference of the products {gap:.1e}",
                 on_support and gap < 1e-12, figure, kind="check")


def _thm2(out, config) -> list[Claim]:
    n, budget, block = config.n_sweep, config.budget, config.sweep_block
    shares = np.linspace(0, 1, 5)
    # Thm 2 is an existence statement; the grid runs from nearly sparse (cold, local) to nearly
    # low-rank (hot) attention, is fixed here before measuring, and is reported whole
    labels = {f"attention (t={t:g}, {'local' if locality else 'random'})": dict(temperature=t, locality=locality)
              for locality in (0.0, 1.0) for t in config.thm2_temperatures}
    rows, sweeps, alone, fixed = [], {}, {}, []
    # the existence check's grid draws seeds 0..k-1; the regime claim draws its own, THM2_CLAIM_SEED0 + i, so the
    # claim and the check never share a measurement
    regime = {f"{THM2_REGIME} [claim]": labels[THM2_REGIME]} if THM2_REGIME in labels else {}
    draws = [(label, options, seed) for label, options in labels.items() for seed in range(config.sweep_seeds)]
    draws += [(label, options, THM2_CLAIM_SEED0 + i) for label, options in regime.items()
              for i in range(config.sweep_seeds)]
    for label, options, seed in draws:
        matrix = target_matrix("attention", n, seed, **options)
        sweep = lowrank_share_sweep(matrix, ["pixelfly"], budget, shares, block_size=block)
        parts = {"butterfly": approximate(matrix, "butterfly", budget, block_size=block).error,
                 "lowrank": approximate(matrix, "lowrank", budget).error}
        interior = sweep[sweep.share.between(0, 1, "neither")]
        best = interior.loc[interior.error.idxmin()]
        fixed.append(dict(target=label, seed=seed, split=best.error, share=best.share, **parts))
        rows += [dict(target=label, seed=seed, **r) for r in sweep.to_dict("records")]
        rows += [dict(target=label, seed=seed, pattern=f"{k} alone", share=float("nan"), error=e)
                 for k, e in parts.items()]
        if seed == 0:
            sweeps[label], alone[label] = sweep, parts
    # the adaptive support: robust PCA / Scatterbrain's oracle, on a sparse + low-rank target and attention
    adaptive = {}
    for label, matrix in {"sparse + low-rank": target_matrix("sparse_lowrank", n),
                          "attention (t=0.5, random)": target_matrix("attention", n, temperature=0.5)}.items():
        sweep = lowrank_share_sweep(matrix, ["topk+lowrank"], budget, shares)
        parts = {"topk": approximate(matrix, "topk", budget).error, "lowrank": approximate(matrix, "lowrank", budget).error}
        adaptive[label] = (sweep[sweep.share.between(0, 1, "neither")].error.min(), min(parts.values()))
        rows += [dict(target=f"{label} (adaptive support)", seed=0, **r) for r in sweep.to_dict("records")]
        rows += [dict(target=f"{label} (adaptive support)", seed=0, pattern=f"{k} alone", share=float("nan"), error=e)
                 for k, e in parts.items()]
    csv = save_table(pd.DataFrame(rows), out, "lowrank_share_sweep")
    figure = save_figure(plot_lowrank_share_sweep(sweeps, alone, budget), out, "lowrank_share_sweep")
    fixed = pd.DataFrame(fixed)
    fixed["single"] = fixed[["butterfly", "lowrank"]].min(axis=1)
    fixed["wins"] = fixed.split <= (1 - THM2_MARGIN) * fixed.single
    claim_rows = fixed[fixed.target == f"{THM2_REGIME} [claim]"]
    fixed = fixed[fixed.target != f"{THM2_REGIME} [claim]"]
    cells = fixed.groupby("target", sort=False).agg(
        wins=("wins", "all"), split=("split", "mean"), butterfly=("butterfly", "mean"), lowrank=("lowrank", "mean"),
        share_min=("share", "min"), share_max=("share", "max"))
    held = bool(cells.wins.any())
    grid = f"t in {list(config.thm2_temperatures)} x locality in [0, 1]"
    # the paper claim: the regime stated up front, paired by seed (1 - split / better part >= the margin)
    gain = (1 - claim_rows.split / claim_rows.single).to_numpy()
    decision = paired_decision(gain, margin=THM2_MARGIN, alternative="greater")
    regime_claim = Claim(
        f"Pixelfly paper, Thm 2 (Sec. 4), in one regime (named after the grid had been seen; its seeds fresh), {THM2_REGIME} (local attention at mid "
        f"temperature, where neither part alone should fit; its own seeds, {THM2_CLAIM_SEED0}+, apart from the existence "
        f"check's): flat block butterfly + low-rank beats the flat block "
        f"butterfly alone and low-rank alone at equal budget {budget} (block {block}). Per seed (a seed draws Q, K), "
        f"the relative gain 1 - (best interior split's error) / (better single part's error); held when the 90% t "
        f"interval of its mean lies above {THM2_MARGIN}, refuted when it lies below, otherwise undecided",
        ("gain per seed: " + ", ".join(f"{g:.3f}" for g in gain) + f"; mean {decision.describe()}; verdict: "
         f"{decision.verdict}" if len(gain) else f"not measured: {THM2_REGIME} is not on this preset's grid; "
         "undecided"), **decision_fields(decision), figure=figure, kind="paper", table=csv)
    return [regime_claim,
            Claim(f"Thm 2's existence statement, check (an existence claim over a grid cannot fail on a grid wide "
                  f"enough): there exist attention-like matrices on which flat block butterfly "
                  f"+ low-rank beats the flat block butterfly alone and low-rank alone at equal budget, with the fixed "
                  f"support (block {block}, budget {budget}; targets: softmax(Q K^T / t) on the grid {grid}, all "
                  f"reported; held when on at least one target of the grid, on every one of the seeds, the best "
                  f"interior split (low-rank share in (0, 1)) has an error at most {1 - THM2_MARGIN:.2f} x the better "
                  f"single part's)",
                  f"won on {int(cells.wins.sum())} of {len(cells)} targets; per target, mean over seeds, split / "
                  f"butterfly / low-rank (best interior share): "
                  + "; ".join(f"{t} {'WIN' if r.wins else 'no'} {r.split:.3f} / {r.butterfly:.3f} / {r.lowrank:.3f} "
                              f"(share {r.share_min:.2f}" + (f"-{r.share_max:.2f})" if r.share_max > r.share_min else ")")
                              for t, r in cells.iterrows())
                  + f" (n={n}, {config.sweep_seeds} seeds)", held, figure, kind="check", table=csv),
            Claim(f"Robust PCA (Candes et al., 2011) / Scatterbrain's oracle (Chen et al., 2021, Sec. 3), not a "
                  f"statement of the Pixelfly paper: with an adaptive support (top-k + low-rank, the support chosen "
                  f"from the target), the best interior split against top-k alone and low-rank alone (budget {budget})",
                  "; ".join(f"{k}: {v[0]:.3f} vs best single part {v[1]:.3f}" for k, v in adaptive.items()) + f" (n={n})",
                  None, figure, kind="info", table=csv)]


def _thm3(out, config) -> list[Claim]:
    """Thm 3 as one claim: the sparse NTK's slope, its change against dense's, and the loss, with dense as the gate."""
    tables = {label: ntk_change_vs_width(config.widths, sparse=sparse, steps=config.ntk_steps, seeds=config.ntk_seeds,
                                         n_samples=config.ntk_samples)
              for label, sparse in (("flat block butterfly (3/16)", True), ("dense", False))}
    csv = save_table(pd.concat([df.assign(network=label) for label, df in tables.items()]), out, "ntk_change_vs_width")
    slopes = {label: loglog_slope(df.groupby("width").ntk_change.mean().index,
                                  df.groupby("width").ntk_change.mean()) for label, df in tables.items()}
    figure = save_figure(plot_ntk_change(tables, slopes), out, "ntk_change_vs_width")
    sparse, dense = tables["flat block butterfly (3/16)"], tables["dense"]
    widest = max(config.widths)

    def per_seed_slopes(df):
        return np.array([loglog_slope(part.width, part.ntk_change) for _, part in df.groupby("seed")])

    def at_widest(df, column):
        return df[df.width == widest].sort_values("seed")[column].to_numpy()

    # per seed (a seed draws the inputs, labels and weights of both networks: paired)
    rules = {
        f"sparse slope < {THM3_SLOPE}": paired_decision(per_seed_slopes(sparse), margin=THM3_SLOPE, alternative="less"),
        f"sparse change at width {widest} < {THM3_DENSE_FACTOR} x dense's": paired_decision(
            np.log(at_widest(sparse, "ntk_change") / at_widest(dense, "ntk_change")),
            margin=float(np.log(THM3_DENSE_FACTOR)), alternative="less"),
        f"sparse loss ratio at width {widest} < {THM3_LOSS:g}": paired_decision(
            np.log10(np.maximum(at_widest(sparse, "loss_ratio"), 1e-300)), margin=float(np.log10(THM3_LOSS)),
            alternative="less"),
    }
    gate = {"dense slope": paired_decision(per_seed_slopes(dense), margin=THM3_SLOPE, alternative="less"),
            "dense loss": paired_decision(np.log10(np.maximum(at_widest(dense, "loss_ratio"), 1e-300)),
                                          margin=float(np.log10(THM3_LOSS)), alternative="less")}
    control = all(d.verdict == "held" for d in gate.values())
    why = "one seed" if min(d.n for d in rules.values()) < 2 else "positive control failed"
    critical, whole = every_held(rules)
    labels = comparison_labels(rules)
    fields = decision_fields(whole) if control else dict(held=None, seeds=whole.n)
    fan_in = sparse.groupby("width").fan_in.first()
    density = sparse.groupby("width").density.first()
    return [Claim(
        "Pixelfly paper, Thm 3: wide sparse (flat block butterfly) networks train like dense ones under gradient "
        "descent: the NTK stays nearly fixed as the width grows, and the training loss goes to ~0 (two-hidden-layer "
        f"ReLU MLP, NTK parametrisation, full-batch GD, {config.ntk_samples} samples; the hidden layer a flat block "
        f"butterfly of butterfly_size 16, n_factors 2: density 3/16 at every width, so a unit's fan-in grows in "
        f"proportion to the width). One rule of three members, each a 90% t interval over seeds (a seed draws the "
        f"inputs, labels and weights of both networks): the per-seed log-log slope of ||K_T - K_0|| / ||K_0|| against "
        f"width lies below {THM3_SLOPE} (the lazy-training bound is O(width^-1/2), a slope of at most -0.5; a steeper one is within it); at the widest width the log ratio of the "
        f"sparse change to the dense one lies below log {THM3_DENSE_FACTOR}; log10 of the final / initial loss lies "
        f"below log10 {THM3_LOSS:g}. Held when all three hold, refuted when Holm across them refutes one; decided "
        f"only when dense, the positive control, has a slope below {THM3_SLOPE} and a loss ratio below "
        f"{THM3_LOSS:g} (held at the same level), else undecided; undecided with one seed",
        (f"verdict: {whole.verdict if control else 'undecided (' + why + ')'}; "
         + "; ".join(f"{name}: {labels[name]} {rules[name].describe(2)}" for name in rules)
         + "; positive control (dense): " + "; ".join(f"{name} {d.verdict} {d.describe(2)}" for name, d in gate.items())
         + f"; widths {list(config.widths)}: density " + ", ".join(f"{v:.3f}" for v in density)
         + ", fan-in " + ", ".join(str(int(v)) for v in fan_in)
         + "; relative NTK change, mean over seeds: sparse " + ", ".join(f"{v:.3f}" for v in
                                                                     sparse.groupby("width").ntk_change.mean())
         + "; dense " + ", ".join(f"{v:.3f}" for v in dense.groupby("width").ntk_change.mean())
         + f"; slope of the means: sparse {slopes['flat block butterfly (3/16)']:.2f}, dense {slopes['dense']:.2f} "
         f"({config.ntk_steps} steps, {config.ntk_seeds} seed(s))"),
        **fields, figure=figure, kind="paper", table=csv,
        members=[member(name, rules[name], labels[name] if control else "undecided") for name in rules])]


def _exact(out, config) -> list[Claim]:
    n_exact = config.n_exact
    exact = exact_butterflies(n_exact, fit_steps=config.fit_steps)
    csv = save_table(exact, out, "exact_butterflies")
    figure = save_figure(plot_exact_butterflies(exact, n_exact), out, "exact_butterflies")
    err = exact.set_index(["transform", "method"]).error
    exact_ok = bool((err.xs("butterfly product (exact twiddles)", level="method") < 1e-12).all())
    flat = err[[m.startswith("flat") for _, m in err.index]]
    return [Claim("Dao et al. 2019 (Sec. 3), check: butterfly products represent the DFT and Hadamard transforms "
                  "exactly; flat and flat block butterflies at the same budget do not (held when the exact "
                  "twiddles' error is < 1e-12 and every flat error is > 0.1)",
                  "; ".join(f"{t}: exact twiddles {err[t, 'butterfly product (exact twiddles)']:.1e}, "
                            f"gradient fit {err[t, 'butterfly product (gradient fit)']:.1e}, "
                            f"flat {err[t, 'flat butterfly (block 1)']:.3f}, low-rank {err[t, 'low-rank']:.3f}"
                            for t in ("dft", "hadamard")) + f" (n={n_exact})",
                  exact_ok and bool((flat > 0.1).all()), figure, kind="check", table=csv)]
