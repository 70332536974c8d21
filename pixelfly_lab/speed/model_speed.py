"""Whole-model training-step speed against dense: :func:`model_speed_table`.

:func:`pixelfly_lab.speed.timer.time_training_steps` (interleaved medians, the ratio to the first
model, and the FLOP limit from the matmul multiply-adds that actually run) applied to Mixer-B/16-
and GPT-2-small-shaped models against copies with Pixelfly MLPs (and, for GPT, Pixelfly
attention), :data:`MODEL_CASES`. Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029)
reports 2.3-2.5x end-to-end training speed-ups on GPUs. Tested in tests/test_bench.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from pixelfly_lab.nn.attention import PixelflyAttention
from pixelfly_lab.nn.layers import PixelflyLinear
from pixelfly_lab.speed.timer import time_training_steps
from pixelfly_lab.training.models import Mixer, Transformer

__all__ = ["ModelCase", "MODEL_CASES", "dense_model", "model_speed_table"]


@dataclass(frozen=True)
class ModelCase:
    """A whole-model shape for :func:`model_speed_table`: dense against its MLPs sparsified.

    Mixer-B/16 (Tolstikhin et al. 2021): 224 x 224 images in 16 x 16 patches (196 tokens),
    dim 768, 12 blocks, token MLP 384, channel MLP 3072, 1000 classes; its channel MLPs are
    ~89% of the FLOPs. GPT-2 small (Radford et al. 2019): dim 768, 12 heads, 12 blocks, MLP
    3072, vocabulary 50257 (an untied head, ~30% of the FLOPs at this width).
    """

    name: str
    family: str                # 'mixer' or 'gpt'
    batch: int                 # images, or sequences of ``context`` tokens
    depth: int = 12
    dim: int = 768             # width; MLPs 4 * dim, Mixer's token MLP dim / 2 (384 at 768)
    context: int = 256         # GPT only
    budget: float = 0.25       # of each sparsified MLP layer (Pixelfly, plan_pixelfly)
    block_size: int = 32       # matches the released code and the CPU's GEMM tiles
    # GPT only: the sparse copy's attention, 'dense' or a PixelflyAttention layout ('pixelfly':
    # sparse + low-rank scores, the paper's GPT-2 configuration), at attention_budget of T^2
    attention: str = "dense"
    attention_budget: float = 0.25


# Batch 8 for Mixer as the issue states it (1568 tokens); GPT batch 4 (1024 tokens): a dense
# GPT-2 small step at batch 8 takes ~17 s on one thread, too long to repeat interleaved. The GPT
# copy has Pixelfly attention and Pixelfly MLPs, as the paper sparsifies GPT-2 (its Table 3).
MODEL_CASES = (ModelCase("Mixer-B/16", "mixer", batch=8),
               ModelCase("GPT-2 small", "gpt", batch=4, attention="pixelfly"))


def dense_model(case: ModelCase, seed: int = 0):
    """(dense model, batch, target) at ``case``'s shape, weights and batch seeded by ``seed``.

    Example:
        >>> model, batch, target = dense_model(ModelCase("Mixer-B/16, 1 block", "mixer", batch=1, depth=1))
        >>> tuple(batch.shape)
        (1, 3, 224, 224)
    """
    torch.manual_seed(seed)
    if case.family == "mixer":
        dense = Mixer((3, 224, 224), 16, case.dim, case.depth, 1000, token_hidden=case.dim // 2)
        batch, target = torch.randn(case.batch, 3, 224, 224), torch.randint(0, 1000, (case.batch,))
    elif case.family == "gpt":
        dense = Transformer(case.context, case.dim, case.depth, 12, 50257, causal=True, vocab_size=50257,
                            per_token=True)
        batch, target = (torch.randint(0, 50257, (case.batch, case.context)) for _ in range(2))
    else:
        raise ValueError(f"ModelCase.family must be 'mixer' or 'gpt', got {case.family!r}")
    return dense, batch, target


def _model_pair(case: ModelCase, seed: int):
    """(dense model, sparsified copy, batch, target): the copy's MLP layers are PixelflyLinear."""
    dense, batch, target = dense_model(case, seed)
    sparse = copy.deepcopy(dense)
    if case.family == "gpt" and case.attention != "dense":
        for block in sparse.blocks:
            block.attn = PixelflyAttention(case.dim, 12, case.context, budget=case.attention_budget,
                                           block_size=case.block_size, causal=True, layout=case.attention)
    for mlp in [block.channel if case.family == "mixer" else block.mlp for block in sparse.blocks]:
        for name in ("fc1", "fc2"):
            old = getattr(mlp, name)
            setattr(mlp, name, PixelflyLinear(old.in_features, old.out_features, budget=case.budget,
                                               block_size=case.block_size))
    return dense, sparse, batch, target


def model_speed_table(cases=MODEL_CASES, *, steps: int = 1, rounds: int = 3, threads: int = 1,
                      seed: int = 0, progress: bool = True, time_matmuls: bool = True) -> pd.DataFrame:
    """Training-step speed of whole models against their dense versions (:func:`time_training_steps`).

    Args:
        cases: :class:`ModelCase` s; default Mixer-B/16 (batch 8) and GPT-2 small (batch 4).
        steps, rounds, threads, time_matmuls: as :func:`time_training_steps` (one thread: the
            CPU target; the matmuls timed by default: sparse_fraction and attainable_ratio).
        seed: seeds the weights and the batch.
        progress: a progress bar over cases.

    Returns:
        DataFrame, two rows per case (dense, pixelfly): case, depth, dim, batch, budget, block_size
        and :func:`time_training_steps`' columns (step_ms, ratio, flop_limit, fraction_of_limit, ...).

    Example:
        >>> tiny = ModelCase("Mixer-B/16, 1 block", "mixer", batch=1, depth=1)
        >>> table = model_speed_table([tiny], rounds=1, progress=False)
        >>> list(table["model"])
        ['dense', 'pixelfly']
    """
    tables = []
    for case in tqdm(cases, desc="models", disable=not progress):
        dense, sparse, batch, target = _model_pair(case, seed)
        table = time_training_steps({"dense": dense, "pixelfly": sparse}, batch, target, steps=steps,
                                    rounds=rounds, threads=threads, time_matmuls=time_matmuls)
        table.insert(0, "case", case.name)
        for column in ("depth", "dim", "batch", "budget", "block_size", "attention"):
            table.insert(len(table.columns) - 1, column, getattr(case, column))
        table.loc[table["model"] == "dense", "budget"] = 1.0
        table.loc[table["model"] == "dense", "attention"] = "dense"
        tables.append(table)
    return pd.concat(tables, ignore_index=True)
