"""Pixel pictures of sparsity patterns, a density table and an interactive explorer.

Matplotlib is imported inside the functions so that ``import pixelfly_lab`` stays light.
"""

from __future__ import annotations

import pandas as pd
import torch

from pixelfly_lab.structure.masks import flat_block_butterfly_layout
from pixelfly_lab.structure.patterns import PATTERN_NAMES, Pattern, make_pattern

__all__ = ["show_mask", "show_masks", "pattern_table", "pattern_gallery", "mask_explorer"]

# The baselines of the paper's comparison, in display order.
GALLERY_NAMES = ("pixelfly", "butterfly", "lowrank", "random", "local", "global", "bigbird", "strided",
                 "blockdiag", "monarch", "bigbird+lowrank")


def show_mask(mask: torch.Tensor, ax=None, title: str | None = None, density: bool = True,
              block_size: int | None = None):
    """Draw a bool (rows, cols) mask as pixels (dark = kept); returns the axes.

    The picture keeps the matrix's true aspect ratio (a 4096 x 1024 weight is drawn four times
    taller than wide: stretching it would misstate the shape). With ``block_size`` b the mask is a
    block layout and the axes count blocks of b x b entries.
    """
    import matplotlib.pyplot as plt

    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a 2-D tensor")
    ax = ax or plt.subplots(figsize=(3, 3))[1]
    ax.imshow(mask.bool().cpu().numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1, aspect="equal")
    label = title or ""
    if density:
        label += f"{chr(10) if label else ''}density {mask.float().mean().item():.3f}"
    ax.set_title(label, fontsize=9)
    unit = f" block (of {block_size})" if block_size else " (column)"
    ax.set_xlabel(f"input{unit}", fontsize=8)
    ax.set_ylabel(f"output{unit.replace('column', 'row')}", fontsize=8)
    ax.tick_params(labelsize=6)
    return ax


def show_masks(masks: dict, ncols: int = 4, size: float = 2.6, suptitle: str | None = None,
               block_size: int | None = None):
    """A grid of :func:`show_mask` pictures, one per {title: mask} (layouts of ``block_size``
    blocks, if given); returns the figure."""
    import matplotlib.pyplot as plt

    if not masks:
        raise ValueError("masks must name at least one mask")
    nrows = -(-len(masks) // ncols)
    ncols = min(ncols, len(masks))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.4), squeeze=False)
    for ax, (title, mask) in zip(axes.flat, masks.items()):
        show_mask(mask, ax, title, block_size=block_size)
    for ax in list(axes.flat)[len(masks):]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def _pattern_picture(pattern: Pattern) -> torch.Tensor:
    """What a pattern stores, as a block picture: the layout, or the low-rank/Monarch factors' shape."""
    if pattern.layout is not None:
        return pattern.layout
    R, C = pattern.out_features // pattern.block_size, pattern.in_features // pattern.block_size
    if pattern.nblocks:  # Monarch: the support of its right factor R, block-diagonal
        rows = torch.arange(R)[:, None] * pattern.nblocks // R
        cols = torch.arange(C)[None, :] * pattern.nblocks // C
        return rows == cols
    return torch.zeros(R, C, dtype=torch.bool)  # pure low-rank: no sparse support


def pattern_table(out_features: int, in_features: int, budget: float, block_size: int = 32,
                  names=GALLERY_NAMES, seed: int = 0) -> pd.DataFrame:
    """One row per pattern at the same budget: structure, parameters, density, budget used.

    Returns:
        DataFrame with columns pattern, blocks, block_size, rank, nblocks, sparse_density,
        params, budget_used (<= budget), and the Pixelfly hyper-parameters where they apply.
    """
    rows = []
    for name in names:
        p = make_pattern(name, out_features, in_features, budget, block_size=block_size, seed=seed)
        rows.append({
            "pattern": name, "shape": f"{out_features}x{in_features}",
            "blocks": None if p.layout is None else int(p.layout.sum()), "block_size": block_size,
            "rank": p.rank, "nblocks": p.nblocks,
            "sparse_density": p.sparse_params / (in_features * out_features),
            "params": p.params, "budget_used": p.budget, "budget": budget,
            "butterfly_size": p.plan.butterfly_size if p.plan else None,
            "n_factors": p.plan.n_factors if p.plan else None,
        })
    return pd.DataFrame(rows)


def pattern_gallery(out_features: int, in_features: int, budget: float, block_size: int = 32,
                    names=GALLERY_NAMES, seed: int = 0, ncols: int = 4):
    """Every baseline at the same budget as block pictures; returns the figure."""
    masks = {}
    for name in names:
        p = make_pattern(name, out_features, in_features, budget, block_size=block_size, seed=seed)
        extra = f" + rank {p.rank}" if p.rank else ""
        extra += f" (R factor, {p.nblocks} blocks)" if p.nblocks else ""
        masks[f"{name}{extra}\nbudget {p.budget:.3f}"] = _pattern_picture(p)
    return show_masks(masks, ncols=ncols, suptitle=f"{out_features}x{in_features}, budget {budget}, "
                                                   f"block {block_size} (pictures show blocks)", block_size=block_size)


def mask_explorer():
    """An ipywidgets panel: move butterfly_size, n_factors, block size, shape, budget and pattern,
    and see the flat block butterfly layout and the chosen pattern with their densities."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    shapes = {"768 -> 3072": (3072, 768), "1024 -> 4096": (4096, 1024), "512 -> 512": (512, 512),
              "3072 -> 768": (768, 3072)}
    w = dict(
        shape=widgets.Dropdown(options=list(shapes), value="1024 -> 4096", description="shape"),
        butterfly_size=widgets.SelectionSlider(options=[2, 4, 8, 16, 32, 64], value=16, description="butterfly"),
        n_factors=widgets.IntSlider(value=2, min=1, max=6, description="n_factors"),
        block_size=widgets.SelectionSlider(options=[8, 16, 32, 64], value=32, description="block"),
        shuffle=widgets.Checkbox(value=False, description="shuffle"),
        global_size=widgets.IntSlider(value=0, min=0, max=256, step=32, description="global"),
        pattern=widgets.Dropdown(options=list(PATTERN_NAMES), value="pixelfly", description="pattern"),
        budget=widgets.FloatSlider(value=0.25, min=0.05, max=1.0, step=0.05, description="budget"),
    )
    status = widgets.HTML()
    output = widgets.Output()

    def redraw(_=None):
        out_f, in_f = shapes[w["shape"].value]
        w["n_factors"].max = w["butterfly_size"].value.bit_length() - 1
        output.clear_output(wait=True)
        with output:
            fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
            try:
                layout = flat_block_butterfly_layout(
                    out_f, in_f, w["butterfly_size"].value, w["n_factors"].value, w["block_size"].value,
                    shuffle=w["shuffle"].value, global_size=w["global_size"].value)
                show_mask(layout, left, "flat block butterfly (blocks)")
                p = make_pattern(w["pattern"].value, out_f, in_f, w["budget"].value,
                                 block_size=w["block_size"].value)
                show_mask(_pattern_picture(p), right, f"{p.name}, rank {p.rank}, budget used {p.budget:.3f}")
                status.value = f"<b>{p!r}</b>"
            except ValueError as err:  # an impossible combination: say why instead of drawing
                status.value = f"<span style='color:#b00'>{err}</span>"
            plt.show()

    for widget in w.values():
        widget.observe(redraw, names="value")
    redraw()
    controls = widgets.VBox([widgets.HBox(list(w.values())[:4]), widgets.HBox(list(w.values())[4:])])
    return widgets.VBox([controls, status, output])

