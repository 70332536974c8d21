"""Study 'expressiveness': approximation error against budget of every pattern on every target.

Composes :func:`pixelfly_lab.approx.expressiveness.expressiveness_table` and
:func:`~pixelfly_lab.approx.expressiveness.plot_error_vs_budget`. The paper's statement checked
(Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 1 and 4): at equal budget, flat block
butterfly + low-rank approximates the matrices networks need better than either part alone,
decided per target of :data:`NETWORK_KINDS` (one claim each, mean +- sd over seeds): a mean
over a mix of targets would let the choice of the mix decide the verdict.
Runs on the CPU whatever ``device``: at these sizes kernel launches would dominate a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pixelfly_lab.approx.expressiveness import ORACLE_NAMES, expressiveness_table, plot_error_vs_budget
from pixelfly_lab.approx.targets import TARGET_KINDS, digits_mlp, target_matrix
from pixelfly_lab.studies.claims import Claim, save_figure, save_table

__all__ = ["ExpressivenessConfig", "FULL", "QUICK", "TINY", "run", "EXPRESSIVENESS_PATTERNS", "NETWORK_KINDS"]

# The patterns of the figure: the paper's comparison, its sparse + low-rank variants, Monarch,
# and the oracles that bound them.
EXPRESSIVENESS_PATTERNS = ("lowrank", "butterfly", "pixelfly", "local", "bigbird", "bigbird+lowrank",
                           "random+lowrank", "blockdiag", "monarch", "topk", "topk_blocks", "topk+lowrank")
# The matrices "networks need" (the paper's claim is about these): attention and trained weights.
# 'sparse_lowrank' (a sparse + low-rank matrix by construction) is robust PCA's target, not one of them
NETWORK_KINDS = ("attention", "attention (local)", "trained weight")


@dataclass(frozen=True)
class ExpressivenessConfig:
    """Sizes of the 'expressiveness' study."""

    n: int = 512                                          # target size (n, n); >= 256 so blocks of 8+ leave room
    seeds: int = 3                                        # targets and random patterns per kind
    budgets: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
    patterns: tuple[str, ...] = EXPRESSIVENESS_PATTERNS
    kinds: tuple[str, ...] = tuple(k for k in TARGET_KINDS if k != "weight")  # plus the two below
    digits_steps: int = 400                               # training of the MLP whose weight is a target
    block_size: int = 16                                  # the released code's blocks are 32 at n = 1024-4096


FULL = ExpressivenessConfig()
# n = 256 at block 8 (32 blocks a side) is the smallest size where a flat block butterfly of 2-3
# factors, a local band and a rank of 10+ all fit a budget of 0.1 (issue 14, item 11)
# 3 seeds: the claims state a spread over seeds (the trained weight is one matrix: sd 0 there)
QUICK = ExpressivenessConfig(n=256, seeds=3, budgets=(0.1, 0.25), digits_steps=150, block_size=8,
                             kinds=("lowrank", "sparse_lowrank", "hadamard", "attention"),
                             patterns=tuple(p for p in EXPRESSIVENESS_PATTERNS if p != "random+lowrank"))
TINY = ExpressivenessConfig(n=32, seeds=1, budgets=(0.2, 0.3), digits_steps=20,
                            patterns=("lowrank", "butterfly", "pixelfly", "local", "topk"),
                            kinds=("sparse_lowrank", "dct", "attention"), block_size=4)

# Pixelfly (the class search of approximate) is never worse than either part by construction;
# the paper's claim is that the combination helps, so it must win by this relative margin
PIXELFLY_MARGIN = 0.05


def run(out: Path, config: ExpressivenessConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """Error against budget; the paper's claim on network matrices, the top-k oracle check."""
    n, seeds, budgets = config.n, config.seeds, config.budgets
    kinds: dict = {kind: kind for kind in config.kinds}
    kinds["attention (local)"] = dict(kind="attention", locality=1.0)
    model = digits_mlp(n, steps=config.digits_steps)
    kinds["trained weight"] = target_matrix("weight", None, model=model, name="2.weight")
    df = expressiveness_table(kinds, config.patterns, budgets, n, seeds, block_size=config.block_size,
                              progress=False)
    csv = save_table(df, out, "expressiveness")
    figure = save_figure(plot_error_vs_budget(df, title=f"Approximation error against budget (n={n}, "
                                                        f"block {config.block_size})"), out, "error_vs_budget")

    mean = df.groupby("pattern").error.mean()
    network = df[df.kind.isin(NETWORK_KINDS) & df.pattern.isin(["pixelfly", "butterfly", "lowrank"])]
    network = network.groupby(["kind", "seed", "budget"]).filter(lambda g: len(g) == 3)  # all three fit
    # mean over budgets per seed, then mean and sd over seeds
    per_seed = network.groupby(["kind", "pattern", "seed"]).error.mean()
    stats = per_seed.groupby(["kind", "pattern"]).agg(["mean", "std"]).fillna(0.0)
    # the split approximate() chose: low-rank share of the parameters used (rank (out + in) of them)
    chosen = df[(df.pattern == "pixelfly") & df.kind.isin(NETWORK_KINDS)]
    chosen = chosen.assign(share=chosen["rank"] * 2 * n / (chosen.budget_used * n * n))
    shares = chosen.groupby("kind").share.agg(["min", "max"])

    keys = ["kind", "seed", "budget"]
    sparse_only = df[(df["rank"] == 0) & ~df.pattern.isin(["lowrank", "monarch", "topk"])]
    best_mask = sparse_only.groupby(keys).error.min()
    topk = df[df.pattern == "topk"].set_index(keys).error
    oracle_ok = bool(len(best_mask) > 0 and (topk.reindex(best_mask.index) <= best_mask + 1e-12).all())
    middle = budgets[len(budgets) // 2]
    winners = (df[(df.budget == middle) & ~df.pattern.isin(ORACLE_NAMES)]
               .groupby(["kind", "pattern"]).error.mean().reset_index()
               .sort_values("error").groupby("kind", sort=False).first())
    nan = float("nan")
    claims = []
    for kind in NETWORK_KINDS:
        if kind not in stats.index.get_level_values("kind"):
            continue
        row = stats.loc[kind]
        ours = row.loc["pixelfly"]
        better = row.loc[["butterfly", "lowrank"], "mean"].idxmin()
        held = bool(ours["mean"] <= (1 - PIXELFLY_MARGIN) * row.loc[better, "mean"])
        share = f"{shares.loc[kind, 'min']:.2f}" + (f"-{shares.loc[kind, 'max']:.2f}"
                                                    if shares.loc[kind, "max"] > shares.loc[kind, "min"] else "")
        claims.append(Claim(
            f"Pixelfly paper, Sec. 1 and 4, target '{kind}' (one claim per target of {', '.join(NETWORK_KINDS)}): at "
            f"equal budget, flat block butterfly + low-rank (pixelfly: the best split of the budget, as approximate() "
            f"searches it) approximates the matrices networks need better than the flat block butterfly alone and "
            f"low-rank alone. The search includes both parts, so pixelfly is never worse by construction; "
            f"held when pixelfly's relative error, mean over budgets and seeds, is at most {1 - PIXELFLY_MARGIN:.2f} x "
            f"the better part's",
            f"mean +- sd over seeds (n={n}, block {config.block_size}, budgets {budgets}, {seeds} seed(s)): pixelfly "
            f"{ours['mean']:.3f}+-{ours['std']:.3f}, butterfly {row.loc['butterfly', 'mean']:.3f}+-"
            f"{row.loc['butterfly', 'std']:.3f}, lowrank {row.loc['lowrank', 'mean']:.3f}+-{row.loc['lowrank', 'std']:.3f}; "
            f"ratio to the better part ({better}) {ours['mean'] / row.loc[better, 'mean']:.3f}; low-rank share of the "
            f"chosen split {share}" + (" (1 = low-rank alone)" if shares.loc[kind, "max"] >= 0.999 else ""),
            held, figure, kind="paper", table=csv))
    return claims + [
        Claim("Oracle check (exactness of the projections): the best unstructured top-k support is never beaten by "
              "any fixed sparse mask at the same budget (held when top-k <= every mask-only pattern + 1e-12)",
              f"top-k <= every mask-only pattern in {len(best_mask)} (target, seed, budget) cases: {oracle_ok}",
              oracle_ok, figure, kind="check", table=csv),
        Claim(f"Which structure fits which matrix (budget {middle}, n={n}, oracles left out)",
              "; ".join(f"{kind}: {row.pattern} ({row.error:.3f})" for kind, row in winners.iterrows())
              + "; mean error over all targets and budgets: "
              + ", ".join(f"{p} {e:.3f}" for p, e in mean.sort_values().items()),
              None, figure, kind="info", table=csv),
    ]
