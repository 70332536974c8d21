"""pixelfly_lab: a lab bench for Pixelated Butterfly (Pixelfly) sparse training.

Dao, Chen, Liang, Yang, Song, Rudra, Re. "Pixelated Butterfly: Simple and Efficient Sparse
Training for Neural Network Models." ICLR 2022. https://arxiv.org/abs/2112.00029

The package is in tiers, each importing only from those below it: ``structure`` (masks, patterns,
the planner) <- ``ops`` (the layout registry, block-sparse matmul and attention) <- ``nn`` (layers,
attention, ``sparsify``) <- ``approx`` | ``ntk`` | ``training`` <- ``speed`` <- ``studies`` (the paper's
experiments: nothing in the library imports them). This module re-exports the public names.
Triton is never imported here (see :mod:`pixelfly_lab.ops.triton_kernels`, loaded on first CUDA use).
"""

from pixelfly_lab.structure.masks import (
    block_butterfly_mask,
    butterfly_factor_mask,
    butterfly_product_mask,
    flat_block_butterfly_layout,
    flat_butterfly_mask,
    layout_to_mask,
    mask_to_layout,
)
from pixelfly_lab.structure.connectivity import block_connectivity
from pixelfly_lab.structure.patterns import PATTERN_NAMES, Pattern, PixelflyPlan, make_pattern, plan_pixelfly
from pixelfly_lab.ops.matmul import block_sparse_matmul, sparse_lowrank_matmul
from pixelfly_lab.nn.layers import (
    BlockSparseLinear,
    LowRankLinear,
    MaskedLinear,
    MonarchLinear,
    PixelflyLinear,
    SparseLowRankLinear,
    layer_from_pattern,
)
from pixelfly_lab.nn.butterfly import ButterflyLinear
from pixelfly_lab.nn.sparsification import sparsify
from pixelfly_lab.nn.materialize import materialize
from pixelfly_lab.ops.attention import block_sparse_attention
from pixelfly_lab.nn.attention import PixelflyAttention
from pixelfly_lab.approx.targets import TARGET_KINDS, target_matrix
from pixelfly_lab.approx.expressiveness import Approximation, approximate, expressiveness_table
from pixelfly_lab.ntk.empirical import empirical_ntk, kernel_distance, seed_spread, spectra
from pixelfly_lab.training.data import DATASETS, load_data
from pixelfly_lab.training.models import MODEL_NAMES, build_model
from pixelfly_lab.training.loop import TrainConfig, train

from pixelfly_lab.structure.pictures import mask_explorer, pattern_gallery, pattern_table, show_mask, show_masks
from pixelfly_lab.structure.projections import relative_error, sparse_plus_lowrank
from pixelfly_lab.approx.targets import plot_targets
from pixelfly_lab.approx.expressiveness import plot_error_vs_budget
from pixelfly_lab.training.models import count_params
from pixelfly_lab.training.rank import layer_weights, singular_values
from pixelfly_lab.speed.timer import time_training_steps
from pixelfly_lab.speed.planner import apply_plan, plan_model
from pixelfly_lab.speed.bench import MODEL_CASES, BenchConfig, ModelCase, model_speed_table, plot_speed, speed_table
from pixelfly_lab.speed.attention import attention_speed_table
from pixelfly_lab.speed.machine import machine_header
from pixelfly_lab.approx.targets import attention_inputs
from pixelfly_lab.notebook import check, learned, pick, say

from pixelfly_lab._version import __version__ as __version__

__all__ = [
    # masks and patterns
    "butterfly_factor_mask", "butterfly_product_mask", "flat_butterfly_mask", "block_butterfly_mask",
    "flat_block_butterfly_layout", "layout_to_mask", "mask_to_layout",
    "Pattern", "PixelflyPlan", "PATTERN_NAMES", "make_pattern", "plan_pixelfly",
    "block_connectivity",
    # kernels, layers, whole models
    "block_sparse_matmul", "sparse_lowrank_matmul",
    "MaskedLinear", "BlockSparseLinear", "LowRankLinear", "SparseLowRankLinear", "PixelflyLinear",
    "MonarchLinear", "ButterflyLinear", "layer_from_pattern", "sparsify", "materialize",
    # attention on a block layout of the scores
    "block_sparse_attention", "PixelflyAttention", "attention_speed_table", "attention_inputs",
    # expressiveness
    "TARGET_KINDS", "target_matrix", "Approximation", "approximate", "expressiveness_table",
    # neural tangent kernel
    "empirical_ntk", "kernel_distance", "seed_spread", "spectra",
    # training
    "DATASETS", "load_data", "MODEL_NAMES", "build_model", "TrainConfig", "train",
    # for notebooks and interactive use: pictures, projections, plots, rank, speed tables, rendered prose
    "show_mask", "show_masks", "pattern_table", "pattern_gallery", "mask_explorer", "relative_error",
    "sparse_plus_lowrank", "plot_targets", "plot_error_vs_budget", "count_params", "layer_weights",
    "singular_values", "time_training_steps", "BenchConfig", "speed_table", "plot_speed", "MODEL_CASES",
    "ModelCase", "model_speed_table", "machine_header", "plan_model", "apply_plan", "say", "pick", "check", "learned",
]
# Not re-exported: the studies (pixelfly_lab.studies): the library never imports them.
