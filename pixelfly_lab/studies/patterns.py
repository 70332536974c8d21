"""Study 'patterns': pictures of every sparsity pattern, a density table, and exact-density checks.

The definitions checked are those of the paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029,
Sec. 3-4) and of the butterfly papers it builds on (Dao et al., ICML 2019, arXiv 1903.05895).
All claims here are of kind 'check': they hold whenever the masks are built right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pixelfly_lab.structure.masks import butterfly_factor_mask, butterfly_product_mask, flat_block_butterfly_layout, flat_butterfly_mask
from pixelfly_lab.structure.pictures import pattern_gallery, pattern_table, show_masks
from pixelfly_lab.studies.claims import Claim, save_figure, save_table

__all__ = ["PatternsConfig", "FULL", "QUICK", "TINY", "run"]

# a pattern using less than this share of its budget is named in the table's claim (information)
UNDER_USE = 0.9


@dataclass(frozen=True)
class PatternsConfig:
    """Sizes of the 'patterns' study."""

    # (out, in) of the baseline gallery and the density table: the paper's 1024 -> 4096 MLP
    shape: tuple[int, int] = (4096, 1024)
    budget: float = 0.25        # the training lab's budget
    low_budget: float = 0.1     # a second, sparser column of the table
    block_size: int = 32        # the released code's block


FULL = PatternsConfig()
# one thread: 4.7 s CPU (9.6 s wall at load 3.9; `bench/full_minutes.py patterns full`, 2026-12-06)
FULL_MINUTES = 0.1
# 1024x256 at block 32 cannot go below 0.125 with pixelfly, hence the low budget 0.15
QUICK = PatternsConfig(shape=(1024, 256), low_budget=0.15)
TINY = PatternsConfig(shape=(512, 256), low_budget=0.15)


def run(out: Path, config: PatternsConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """Figures of every pattern and a density table; checks the exact densities (CPU only)."""
    out = Path(out)
    n = 16
    factors = {f"B_{2 * s} (stride {s})": butterfly_factor_mask(n, s) for s in (1, 2, 4, 8)}
    factors["product B_16 ... B_2"] = butterfly_product_mask(n)
    fig_factors = save_figure(show_masks(factors, ncols=5, suptitle=f"butterfly factors, n={n}"), out, "factors")

    flats = {f"n_factors={k}": flat_butterfly_mask(32, k) for k in (1, 2, 3, 5)}
    flat_ok = all(abs(m.float().mean().item() - (1 + k) / 32) < 1e-12
                  for k, m in zip((1, 2, 3, 5), flats.values()))
    fig_flat = save_figure(show_masks(flats, suptitle="flat butterfly, n=32"), out, "flat_butterfly")

    layouts = {}
    for out_f, in_f in ((3072, 768), (4096, 1024)):
        for shuffle, global_size in ((False, 0), (True, 0), (False, 128)):
            key = (f"{in_f}->{out_f}" + (" shuffle" if shuffle else "")
                   + (f" global {global_size}" if global_size else ""))
            layouts[key] = flat_block_butterfly_layout(out_f, in_f, 16, 2, 32, shuffle, global_size)
    released = layouts["1024->4096"].float().mean().item()
    fig_block = save_figure(show_masks(layouts, ncols=3, suptitle="flat block butterfly (16, 2), block 32",
                                       block_size=32),
                            out, "flat_block_butterfly")

    shape, budget, block = config.shape, config.budget, config.block_size
    table = pd.concat([pattern_table(*shape, budget, block_size=block),
                       pattern_table(*shape, config.low_budget, block_size=block,
                                     names=("pixelfly", "lowrank", "random", "local", "bigbird", "monarch"))])
    csv = save_table(table, out, "pattern_densities")
    fig_gallery = save_figure(pattern_gallery(*shape, budget, block_size=block), out, "baselines")
    within = bool((table["budget_used"] <= table["budget"] + 1e-12).all())
    # staying within the budget says nothing of under-use (Monarch's sizes are powers of the
    # block count, so it may use far less than it is given): name the rows below 0.9 of it
    ratio = table["budget_used"] / table["budget"]
    under = table[ratio < UNDER_USE]
    single = table[(table.pattern == "pixelfly") & (table.n_factors == 1)]
    return [
        Claim("Flat butterfly with k factors has density (1 + k)/n (Pixelfly paper, Sec. 3.2, Def. of the flat "
              "butterfly; held when every density equals (1 + k)/n to 1e-12)",
              f"n=32, k in (1, 2, 3, 5): densities {[round(m.float().mean().item(), 4) for m in flats.values()]}",
              flat_ok, fig_flat, kind="check"),
        Claim("The support of the butterfly product B_n ... B_2 covers every entry (Dao et al. 2019, Sec. 3). A dense "
              "support is not expressiveness: one butterfly product has only 2 n log2 n free parameters, so it cannot "
              "fit an arbitrary n x n transform; products of butterflies and their transposes (BB*) of depth O(s/n) "
              "capture any matrix with s nonzeros (Kaleidoscope, Dao et al., ICLR 2020). Held when the product's "
              "support covers every entry",
              f"support of the product of {n.bit_length() - 1} factors covers "
              f"{butterfly_product_mask(n).float().mean():.0%} of the {n}x{n} entries with "
              f"{2 * n * (n.bit_length() - 1)} parameters, against {n * n} for a dense matrix",
              bool(butterfly_product_mask(n).all()), fig_factors, kind="check"),
        Claim("The released Pixelfly layout (butterfly 16, 2 factors, block 32) at 1024->4096 keeps 3/16 of the "
              "weight (held when the density is 3/16 to 1e-12)",
              f"density {released:.4f}", abs(released - 3 / 16) < 1e-12, fig_block, kind="check"),
        Claim("Every pattern stays within its parameter budget, low-rank part included (held when budget used <= "
              "budget given for every row of the table)",
              f"{len(table)} patterns at {shape[1]}->{shape[0]}, budget used / given from {ratio.min():.4f} to "
              f"{ratio.max():.4f}; below {UNDER_USE} (under-used, for information): "
              + (", ".join(f"{r.pattern} at {r.budget:g} uses {r.budget_used:.3f}" for r in under.itertuples()) or "none")
              + ("; pixelfly with n_factors = 1 (block-diagonal butterfly) at budget "
                 + ", ".join(f"{b:g}" for b in single.budget) if len(single) else ""),
              within, fig_gallery, kind="check", table=csv),
    ]
