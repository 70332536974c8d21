"""pixelfly_lab: a lab bench for Pixelated Butterfly (Pixelfly) sparse training.

Dao, Chen, Liang, Yang, Song, Rudra, Re. "Pixelated Butterfly: Simple and Efficient Sparse
Training for Neural Network Models." ICLR 2022. https://arxiv.org/abs/2112.00029
"""

from .masks import (
    block_butterfly_mask,
    butterfly_factor_mask,
    butterfly_product_mask,
    flat_block_butterfly_layout,
    flat_butterfly_mask,
    layout_to_mask,
    mask_to_layout,
)
from .patterns import PATTERN_NAMES, Pattern, PixelflyPlan, make_pattern, plan_pixelfly

__version__ = "0.1.0"

__all__ = [
    # masks
    "butterfly_factor_mask", "butterfly_product_mask", "flat_butterfly_mask", "block_butterfly_mask",
    "flat_block_butterfly_layout", "layout_to_mask", "mask_to_layout",
    # patterns
    "Pattern", "PixelflyPlan", "PATTERN_NAMES", "make_pattern", "plan_pixelfly",
]
