"""How far a stack of block layouts carries information: the fraction of block pairs a path links.

A square block layout ``L`` (``L[i, j]`` True when output block ``i`` reads input block ``j``) is
one layer's block graph. Stacking ``h`` layers ``L_1, ..., L_h`` (``y = L_h ... L_1 x``) links
output block ``i`` to input block ``j`` exactly when the boolean product
``R_h = L_h @ ... @ L_1`` has ``R_h[i, j]`` set, i.e. when a path ``j -> ... -> i`` exists that
takes one kept block per layer. :func:`block_connectivity` reports the share of linked pairs.

The lesson it teaches (Dao, Chen et al., "Pixelated Butterfly", arXiv 2112.00029, section 3): a flat
block butterfly with ``n_factors < log2(butterfly_size)`` and no shuffle is block-diagonal, so
however many layers are stacked it links only the pairs inside one group; strides that span the
whole grid link every pair within ``log2`` of the grid hops, and global blocks within two. In the
paper's layers the low-rank term is what links the groups.

Example:
    >>> import torch
    >>> block_connectivity(torch.eye(4, dtype=torch.bool), hops=(1, 8))["linked_fraction"].tolist()
    [0.25, 0.25]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
import torch

from pixelfly_lab._checks import check_int, is_power_of_two

__all__ = ["block_connectivity", "spanning_butterfly_layout"]


def _as_layouts(layouts) -> list[torch.Tensor]:
    """The layouts as a non-empty list of square CPU bool tensors of one shape."""
    items = list(layouts) if isinstance(layouts, (list, tuple)) else [layouts]
    if not items:
        raise ValueError("layouts must be one square block layout or a non-empty list of them")
    out = []
    for index, layout in enumerate(items):
        if not isinstance(layout, torch.Tensor):
            try:
                layout = torch.as_tensor(layout)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(f"layouts[{index}] must be a 2-D bool tensor, got {type(layout).__name__}") from error
        if layout.dim() != 2 or layout.shape[0] != layout.shape[1] or layout.shape[0] == 0:
            raise ValueError(f"layouts[{index}] must be a square non-empty 2-D block layout, "
                             f"got shape {tuple(layout.shape)}")
        if layout.dtype != torch.bool:
            raise TypeError(f"layouts[{index}] must be a bool tensor, got dtype {layout.dtype}")
        out.append(layout.detach().to("cpu"))
    if any(layout.shape != out[0].shape for layout in out):
        raise ValueError(f"layouts must all have one shape, got {[tuple(layout.shape) for layout in out]}")
    return out


def _as_hops(hops) -> list[int]:
    """The hop counts as a non-empty list of ints >= 1."""
    values = [hops] if isinstance(hops, int) and not isinstance(hops, bool) else (
        list(hops) if isinstance(hops, Iterable) else None)
    if not values:
        raise ValueError(f"hops must be an int >= 1 or a non-empty sequence of them, got {hops!r}")
    return [check_int("hops", value) for value in values]


def block_connectivity(layouts: torch.Tensor | Sequence[torch.Tensor],
                       hops: int | Sequence[int] = (1, 2, 4, 8)) -> pd.DataFrame:
    """Fraction of (output block, input block) pairs linked through ``hops`` stacked layouts.

    Layer ``t`` (1-based) of the stack uses ``layouts[(t - 1) % len(layouts)]`` (a list cycles),
    and a pair ``(i, j)`` is linked after ``h`` layers when ``(L_h @ ... @ L_1)[i, j]`` is True in
    boolean arithmetic. No residual path is added: a layout that keeps its diagonal blocks (as
    butterflies and local windows do) already carries each block forward.

    Args:
        layouts: one square bool block layout (n_blocks, n_blocks), or a list of them (one per layer,
            same shape), e.g. ``PixelflyAttention.layout`` or a ``flat_block_butterfly_layout``.
        hops: the stack depths to report, ints >= 1 (one int or a sequence).

    Returns:
        ``pandas.DataFrame`` with one row per entry of ``hops`` (in the order given) and columns
        ``hops`` (int) and ``linked_fraction`` (float in [0, 1]: linked pairs / n_blocks**2).
    """
    stack = _as_layouts(layouts)
    depths = _as_hops(hops)
    n_blocks = stack[0].shape[0]
    reach = torch.eye(n_blocks, dtype=torch.bool)  # R_0: every block reaches itself through zero layers
    fractions = {}
    for depth in range(1, max(depths) + 1):
        layer = stack[(depth - 1) % len(stack)].to(torch.float64)
        # Counts of paths are bounded by n_blocks ** depth but only their positivity matters: re-binarise each step.
        reach = (layer @ reach.to(torch.float64)) > 0
        fractions[depth] = reach.sum().item() / n_blocks ** 2
    return pd.DataFrame({"hops": depths, "linked_fraction": [fractions[depth] for depth in depths]})


def spanning_butterfly_layout(n_blocks: int, causal: bool = False, band: int = 0) -> torch.Tensor:
    """A block layout whose butterfly strides span the whole grid, so every block reaches every other.

    With strides S = {1, 2, 4, ...} below ``n_blocks`` = R:

    * not causal, R a power of two: the flat butterfly with all log2(R) factors,
      ``r XOR c in {0} | S`` (:func:`pixelfly_lab.structure.masks.flat_butterfly_mask` (R, log2 R));
      flipping one bit of the block index per layer links any pair within log2(R) layers;
    * otherwise: cyclic offsets ``(r - c) mod R in {0} | S`` (not causal) or offsets
      ``r - c in {0} | S`` (causal: block c reaches r > c by the binary digits of r - c, every step
      forwards; the XOR partners above the diagonal that a causal mask drops would leave only the
      pairs whose bits nest).

    Either way every (linked) pair is joined within ceil(log2 R) layers and each row keeps at most
    1 + ceil(log2 R) blocks. ``band`` > 0 also keeps the blocks with ``|r - c| <= band`` (causal:
    ``0 <= r - c <= band``): local context on top of the long-range strides.

    Args:
        n_blocks: R >= 1, blocks per side.
        causal: build the causal form (only c <= r kept).
        band: half-width of the local band, >= 0.

    Returns:
        bool (R, R) on the CPU.

    Example:
        >>> spanning_butterfly_layout(8).sum(1).tolist()
        [4, 4, 4, 4, 4, 4, 4, 4]
    """
    check_int("n_blocks", n_blocks)
    check_int("band", band, 0)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    r = torch.arange(n_blocks, device="cpu")[:, None]
    c = torch.arange(n_blocks, device="cpu")[None, :]
    strides = [1 << i for i in range(max(n_blocks - 1, 0).bit_length()) if 1 << i < n_blocks]
    if causal:
        offsets = r - c
        layout = offsets == 0
        for stride in strides:
            layout |= offsets == stride
        return layout | ((offsets >= 0) & (offsets <= band))
    if is_power_of_two(n_blocks):
        partner = r ^ c
        layout = partner == 0
        for stride in strides:
            layout |= partner == stride
    else:
        offsets = (r - c) % n_blocks
        layout = offsets == 0
        for stride in strides:
            layout |= offsets == stride
    return layout | ((r - c).abs() <= band)
