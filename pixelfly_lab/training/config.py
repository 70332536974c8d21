"""The configuration of a training run: one commented dataclass, its result, and its learning-rate schedule.

:class:`TrainConfig` holds everything a run of :func:`pixelfly_lab.training.loop.train` depends on
(saved in summary.json and the checkpoint) and checks each field once, at construction.
:func:`lr_at` is the schedule: AdamW's learning rate with a linear warmup and a cosine decay,

    lr(t) = lr * t / T_w                                          for t < T_w
    lr(t) = lr * (m + (1 - m) (1 + cos(pi (t - T_w) / (T - T_w))) / 2)   after, m = min_lr.

Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, https://arxiv.org/abs/2112.00029.

Example:
    >>> config = TrainConfig(model="mlp", data="digits", pattern="pixelfly", budget=0.25, epochs=3)
    >>> round(lr_at(0, 100, config) / config.lr, 2)  # first warmup step
    0.2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pixelfly_lab._checks import check_budget, check_int
from pixelfly_lab.structure.patterns import PATTERN_NAMES
from pixelfly_lab.training.data import DATASETS
from pixelfly_lab.training.models import ATTENTION_NAMES, MODEL_NAMES, SIZES

__all__ = ["TrainConfig", "TrainResult", "lr_at", "RUN_ONLY"]

# Fields that may change when a run is resumed; every other field must match the checkpoint's.
RUN_ONLY = ("out", "resume", "max_steps", "checkpoint_every", "progress", "device")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in summary.json and the checkpoint)."""

    # --- what to train
    model: str = "mlp"            # 'mlp', 'mixer', 'vit' or 'gpt' (models.MODEL_NAMES)
    data: str = "digits"          # data.DATASETS: digits, mnist1d, listops, teacher(-pixelfly, -dense), chars, cifar10
    size: str = "tiny"            # models.SIZES preset: tiny (CPU seconds) ... gpt2-small (GPU)
    pattern: str = "dense"        # patterns.PATTERN_NAMES: dense, pixelfly, butterfly, lowrank, ...
    budget: float = 0.25          # fraction of each sparsified layer's dense parameters (not used by 'dense')
    attention: str = "dense"      # vit/gpt attention: models.ATTENTION_NAMES (dense SDPA, pixelfly, bigbird, ...)
    block_size: int = 16          # 16 divides every width of the tiny/small/base presets; 32 for GPT-2 on GPU
    data_dir: str | None = None   # cifar10: the local folder holding cifar-10-batches-py
    context: int = 64             # chars: characters per training window
    data_options: dict = field(default_factory=dict)  # other loader options, e.g. {"max_len": 64} for listops
    model_options: dict = field(default_factory=dict)  # other build_model options, e.g. {"gating": True}
    max_train: int | None = None  # keep only the first examples of each split (quick runs)
    max_test: int | None = None
    # --- optimisation
    epochs: int = 10
    batch_size: int = 64          # global batch: split across ranks under torchrun
    lr: float = 3e-3              # peak learning rate; suits the tiny/small presets (GPT-2 small: 6e-4)
    weight_decay: float = 0.01    # AdamW's default; applied to matrices and sparse blocks, not biases/norms
    warmup: float = 0.05          # share of all steps spent warming up linearly from 0
    min_lr: float = 0.1           # the cosine ends at min_lr * lr
    grad_clip: float = 1.0        # max global gradient norm (0 = no clipping)
    # --- the run
    seed: int = 0                 # seeds the weights, the example order and (unless data_options has
    #                               its own "seed") the data generators
    device: str = "auto"          # 'auto' (CUDA when available), 'cpu' or 'cuda'
    amp: bool = True              # bf16 autocast on CUDA (no effect on CPU, where fp32 is as fast)
    out: str = "runs/train"       # output folder (history.csv, ranks.csv, summary.json, checkpoint.pt)
    resume: bool = False          # continue from out/checkpoint.pt when it exists
    eval_every: int = 0           # steps between evaluations (also checkpointed); 0: at each epoch's end only
    checkpoint_every: int = 0     # steps between checkpoints; 0: after each evaluation only
    max_steps: int | None = None  # stop after this many steps in all (a smoke test, or a planned pause);
    #                               the schedule still spans all epochs, so resume finishes the same run
    track_rank: bool = True       # effective rank of chosen weights at each evaluation (ranks.csv)
    rank_layers: list | None = None  # fnmatch globs of those layers; None: where the pattern goes (SPARSIFY_WHERE)
    progress: bool = True         # tqdm progress bar on rank 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        for name, known in (("model", MODEL_NAMES), ("data", DATASETS), ("pattern", PATTERN_NAMES),
                            ("attention", ATTENTION_NAMES),
                            ("size", tuple(SIZES)), ("device", ("auto", "cpu", "cuda"))):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        check_budget(self.budget)
        for name in ("block_size", "context", "epochs", "batch_size"):
            check_int(name, getattr(self, name))
        check_int("seed", self.seed, 0)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        check_int("eval_every", self.eval_every, 0)
        for name in ("max_train", "max_test", "max_steps"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        for name, low, high in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("warmup", 0.0, 1.0),
                                ("min_lr", 0.0, 1.0), ("grad_clip", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if self.rank_layers is not None and (isinstance(self.rank_layers, str) or not all(
                isinstance(g, str) for g in self.rank_layers)):
            raise TypeError(f"rank_layers must be a list of glob strings, got {self.rank_layers!r}")
        if not isinstance(self.model_options, dict):
            raise TypeError(f"model_options must be a dict of build_model options, got "
                            f"{type(self.model_options).__name__}")
        if not isinstance(self.data_options, dict):
            raise TypeError(f"data_options must be a dict of loader options, got {type(self.data_options).__name__}")
        if self.data == "cifar10" and not self.data_dir:
            raise ValueError("data='cifar10' needs data_dir: the local folder that holds cifar-10-batches-py")


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (unwrapped), its history, ranks and summary."""

    model: torch.nn.Module
    history: object  # pandas.DataFrame, one row per step and per evaluation
    ranks: object    # pandas.DataFrame, effective rank of the sparsified weights per evaluation
    summary: dict
    out: Path


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate for optimisation step ``step`` (0-based): linear warmup, then cosine to min_lr * lr."""
    warmup = int(config.warmup * total_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return config.lr * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
