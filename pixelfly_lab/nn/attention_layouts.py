"""The block layouts of Pixelfly attention's T x T scores, and how the attention budget is spent.

:func:`attention_layout` builds every layout :class:`pixelfly_lab.nn.attention.PixelflyAttention`
offers (:data:`ATTENTION_LAYOUTS`): the default 'connected' layout (:func:`connected_layout`:
butterfly strides that span the whole block grid, then a local band), the paper's flat block
butterfly + random features ('pixelfly'; Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 4-5)
and the baselines 'bigbird', 'local', 'random' at the same budget.
"""

from __future__ import annotations

import torch

from pixelfly_lab._checks import check_budget, check_int
from pixelfly_lab.structure.connectivity import spanning_butterfly_layout
from pixelfly_lab.structure.patterns import make_pattern

__all__ = ["ATTENTION_LAYOUTS", "attention_layout", "connected_layout"]

ATTENTION_LAYOUTS = ("connected", "pixelfly", "bigbird", "local", "random")


def connected_layout(seq_len: int, block_size: int, budget: float | None = None, *,
                     causal: bool = False) -> tuple[torch.Tensor, int]:
    """The 'connected' layout's budget rule: spanning butterfly strides first, then a local band.

    The rule (R = T / b blocks per side):

    1. the floor is :func:`pixelfly_lab.structure.connectivity.spanning_butterfly_layout` (R):
       strides 1, 2, 4, ... < R (XOR partners, or offsets c = r - s when causal or R is not a
       power of two), at most 1 + ceil(log2 R) blocks a row; every block reaches every other
       (causal: every earlier one) within ceil(log2 R) stacked layers;
    2. the rest of the budget widens a band of local blocks around the diagonal (|r - c| <= w,
       causal 0 <= r - c <= w): the widest w whose layout still fits the budget;
    3. ``budget=None`` is the floor alone; a budget below the floor raises a ValueError that
       names the floor (no connected layout fits; layout='pixelfly' is the paper's, not connected).

    The budget is the fraction of the T^2 scores the layout keeps (blocks counted on the whole
    grid, causal or not).

    Args:
        seq_len: T, a multiple of ``block_size``.
        block_size: b.
        budget: fraction of T^2 in (0, 1], or None for the floor.
        causal: the causal form.

    Returns:
        (layout bool (R, R), band half-width w).

    Example:
        >>> layout, band = connected_layout(1024, 32)
        >>> layout.sum(1).max().item(), band          # 1 + log2(32) blocks a row, no band
        (6, 0)
    """
    check_int("block_size", block_size)
    check_int("seq_len", seq_len)
    if seq_len % block_size:
        raise ValueError(f"seq_len={seq_len} is not a multiple of block_size={block_size}")
    R = seq_len // block_size
    floor = spanning_butterfly_layout(R, causal)
    if budget is None:
        return floor, 0
    budget = check_budget(budget)
    floor_density = floor.float().mean().item()
    if floor_density > budget + 1e-12:
        raise ValueError(f"budget={budget:.4g} is below the connected layout's floor {floor_density:.4g} at "
                         f"seq_len={seq_len}, block_size={block_size} (1 + ceil(log2(T/b)) blocks a row); "
                         f"give budget >= {floor_density:.4g} or None, a smaller block_size, or layout='pixelfly' "
                         f"(the paper's layout, not connected)")
    band = 0
    while band + 1 < R and spanning_butterfly_layout(R, causal, band + 1).float().mean().item() <= budget + 1e-12:
        band += 1
    return spanning_butterfly_layout(R, causal, band), band


def attention_layout(name: str, seq_len: int, budget: float | None, block_size: int, *,
                     lowrank_features: int | None = None, global_tokens: int = 0,
                     seed: int = 0, causal: bool = False) -> tuple[torch.Tensor, int]:
    """The block layout of the T x T attention scores and the number of random features.

    The budget is the fraction of the T^2 scores computed, the low-rank part included: m random
    features cost 2 T m, like a rank-m factor (Sec. 3 of the Pixelfly paper counts a rank-r
    term as r (in + out)).

    * 'connected' (the layer's default): :func:`connected_layout`'s rule within budget - 2 m / T,
      m = ``lowrank_features`` (None means 0); ``budget=None`` is its floor (plus 2 m / T).
    * 'pixelfly' with ``lowrank_features=None``: :func:`pixelfly_lab.structure.patterns.plan_pixelfly` on
      the (T, T) score matrix splits the budget into a flat block butterfly layout and a rank,
      used as the number of features, exactly as for a weight.
    * otherwise the features are ``lowrank_features`` (None means 0 for the baselines: they are
      the sparse-only methods the paper compares against), and the layout takes what is left:
      the densest flat block butterfly ('pixelfly'), or ``make_pattern``'s 'bigbird', 'local',
      'random' within budget - 2 m / T.
    * the diagonal blocks are always kept, so every token sees itself and no row is empty
      ('random' is asked for one block row less to make room; 'local' and 'pixelfly' already
      hold the diagonal; 'bigbird' below 3 T/b blocks may exceed the budget by the diagonal).
    * ``global_tokens`` g: the first ceil(g / b) block rows and columns are dense (the first g
      tokens attend to and are attended by all), on top of the budget.

    Args:
        name: one of :data:`ATTENTION_LAYOUTS`.
        seq_len: T, a multiple of ``block_size``.
        budget: fraction of T^2 in (0, 1]; None: 'connected''s floor, 0.25 for the others.
        block_size: b, the edge of a block.
        lowrank_features: m >= 0, or None for the rule above.
        global_tokens: g >= 0.
        seed: seeds the random blocks of 'random' and 'bigbird'.
        causal: 'connected' builds its causal form (the others ignore it).

    Returns:
        (layout bool (T/b, T/b), m).

    Example:
        >>> layout, m = attention_layout("pixelfly", 1024, 0.25, 32)
        >>> layout.sum(1)[:4].tolist(), m        # 6 blocks of 32 per row (3/16) + 32 features (1/16)
        ([6, 6, 6, 6], 32)
    """
    if name not in ATTENTION_LAYOUTS:
        raise ValueError(f"layout must be one of {ATTENTION_LAYOUTS}, got {name!r}")
    if budget is not None or name != "connected":
        budget = check_budget(0.25 if budget is None else budget)
    check_int("block_size", block_size)
    check_int("seq_len", seq_len)
    if seq_len % block_size:
        raise ValueError(f"seq_len={seq_len} is not a multiple of block_size={block_size}")
    check_int("global_tokens", global_tokens, 0)
    if global_tokens > seq_len:
        raise ValueError(f"global_tokens={global_tokens} exceeds seq_len={seq_len}")
    R = seq_len // block_size
    if name == "connected":
        features = 0 if lowrank_features is None else check_int("lowrank_features", lowrank_features, 0)
        sparse_budget = None if budget is None else budget - 2 * features / seq_len
        if sparse_budget is not None and sparse_budget <= 0:
            raise ValueError(f"lowrank_features={features} uses the whole budget={budget} at seq_len="
                             f"{seq_len} (m features cost 2 m / T = {2 * features / seq_len:.4f})")
        layout = connected_layout(seq_len, block_size, sparse_budget, causal=causal)[0]
    elif name == "pixelfly" and lowrank_features is None:
        pattern = make_pattern("pixelfly", seq_len, seq_len, budget, block_size)
        layout, features = pattern.layout.clone(), pattern.rank
    else:
        features = 0 if lowrank_features is None else check_int("lowrank_features", lowrank_features, 0)
        sparse_budget = budget - 2 * features / seq_len - (1 / R if name == "random" else 0)
        if sparse_budget <= 0:
            raise ValueError(f"lowrank_features={features} uses the whole budget={budget} at seq_len="
                             f"{seq_len} (m features cost 2 m / T = {2 * features / seq_len:.4f})")
        base = "butterfly" if name == "pixelfly" else name
        layout = make_pattern(base, seq_len, seq_len, sparse_budget, block_size, seed).layout.clone()
    layout |= torch.eye(R, dtype=torch.bool, device="cpu")
    n_global = -(-global_tokens // block_size)
    layout[:n_global] = True
    layout[:, :n_global] = True
    return layout, features
