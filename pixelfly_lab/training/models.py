"""Small models built from nn.Linear, and where the Pixelfly paper sparsifies them.

Four families, each a plain nn.Module whose matmuls are nn.Linear layers so that
:func:`pixelfly_lab.nn.sparsification.sparsify` can swap them for sparse ones:

* MLP: flatten -> [Linear -> GELU] x depth -> Linear head.
* MLP-Mixer (Tolstikhin et al. 2021, arXiv 2105.01601): patches -> blocks of token mixing
  (an MLP across patches) and channel mixing (an MLP across features) -> mean pool -> head.
* ViT (Dosovitskiy et al. 2021, arXiv 2010.11929): patches or tokens -> pre-norm Transformer
  encoder blocks (q/k/v/proj attention + MLP) -> mean pool -> head.
* GPT (Radford et al. 2019): token + position embeddings -> causal Transformer blocks ->
  next-token logits (or, for classification, the last position's).

Where the paper sparsifies (Dao, Chen et al. 2022, Sec. 5): the MLPs of MLP-Mixer (channel
mixing), ViT's MLPs and q/k/v projections, GPT-2's MLPs; embeddings and heads stay dense.
:data:`SPARSIFY_WHERE` records those choices as module-name patterns.

Example:
    >>> from pixelfly_lab.training.data import load_data
    >>> data = load_data("digits")
    >>> model = build_model("mlp", data, pattern="dense")
    >>> model(data.x_train[:4]).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fnmatch import fnmatchcase

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_lab.nn.attention import ATTENTION_LAYOUTS, PixelflyAttention, connected_layout
from pixelfly_lab.nn.sparsification import sparsify
from pixelfly_lab._checks import check_bool, check_budget, check_int, check_lowrank_init
from pixelfly_lab.structure.patterns import PATTERN_NAMES

__all__ = ["MODEL_NAMES", "ATTENTION_NAMES", "SIZES", "SPARSIFY_WHERE", "ModelSize", "MLP", "Mixer", "Transformer",
           "build_model", "sparsify_model", "count_params", "default_patch"]

MODEL_NAMES = ("mlp", "mixer", "vit", "gpt")
# attention= of 'vit' and 'gpt': dense scaled dot-product attention, or PixelflyAttention's layouts
ATTENTION_NAMES = ("dense",) + ATTENTION_LAYOUTS


@dataclass(frozen=True)
class ModelSize:
    """Width and depth of a preset.

    Attributes:
        dim: embedding width (MLP: hidden width is dim * mlp_ratio).
        depth: blocks (MLP: hidden layers).
        heads: attention heads (ViT, GPT).
        mlp_ratio: MLP hidden width / dim; 4 as in ViT, GPT-2 and Mixer's channel MLP.
    """

    dim: int
    depth: int
    heads: int
    mlp_ratio: int = 4


# 'tiny' trains in seconds on a laptop CPU; 'gpt2-small' is GPT-2 small's shape (GPU).
# Widths are multiples of 64 so that block sizes 8, 16 and 32 all divide every MLP matmul.
SIZES = {
    "tiny": ModelSize(dim=64, depth=2, heads=2),
    "small": ModelSize(dim=128, depth=4, heads=4),
    "base": ModelSize(dim=256, depth=6, heads=8),
    "gpt2-small": ModelSize(dim=768, depth=12, heads=12),
}

# Module-name patterns (fnmatch) of the layers the paper sparsifies, per model family.
SPARSIFY_WHERE = {
    "mlp": ("layers.[1-9]*",),  # hidden-to-hidden; the input layer stays dense like a patch embedding
    "mixer": ("blocks.*.channel.fc1", "blocks.*.channel.fc2"),
    "vit": ("blocks.*.mlp.fc1", "blocks.*.mlp.fc2", "blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v"),
    "gpt": ("blocks.*.mlp.fc1", "blocks.*.mlp.fc2"),
}


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def default_patch(input_shape: tuple[int, ...]) -> int:
    """The smallest patch edge that cuts an input into at most 16 tokens (64 above 1024 values).

    digits (1, 8, 8) -> 2 (16 patches), mnist1d (1, 40) -> 4 (10), CIFAR (3, 32, 32) -> 4 (64),
    features (64,) -> 4 (16).
    """
    spatial = input_shape[-2:] if len(input_shape) == 3 else input_shape[-1:]
    target = 16 if math.prod(input_shape) <= 1024 else 64
    for patch in range(1, min(spatial) + 1):
        if all(s % patch == 0 for s in spatial) and math.prod(s // patch for s in spatial) <= target:
            return patch
    return min(spatial)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut inputs into non-overlapping patches, one token per patch.

    Args:
        x: (B, D) features, (B, C, L) signals or (B, C, H, W) images.
        patch: patch edge, dividing L (or H and W, or D).

    Returns:
        (B, n_patches, patch_dim): (B, D/p, p), (B, L/p, C p) or (B, (H/p)(W/p), C p p), patches in
        row-major order, each patch's values channel-major.
    """
    if x.dim() == 2:
        x = x[:, None]
    if x.dim() == 3:
        B, C, L = x.shape
        return x.reshape(B, C, L // patch, patch).permute(0, 2, 1, 3).reshape(B, L // patch, C * patch)
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    y = head(act(L_depth(... act(L_1(flatten(x)))))), hidden width ``hidden``.

    Args:
        in_features: flattened input size.
        hidden: hidden width.
        depth: hidden layers (>= 1).
        out_features: outputs.
    """

    def __init__(self, in_features: int, hidden: int, depth: int, out_features: int):
        super().__init__()
        widths = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)  # (B, out_features)


class FeedForward(nn.Module):
    """fc2(gelu(fc1(x))): the two-matmul MLP inside Mixer and Transformer blocks."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MixerBlock(nn.Module):
    """x += token_mlp(LN(x)^T)^T;  x += channel_mlp(LN(x)).  x: (B, T, D)."""

    def __init__(self, n_tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token = FeedForward(n_tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel = FeedForward(dim, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # mix across tokens
        return x + self.channel(self.norm2(x))                              # mix across features


class Mixer(nn.Module):
    """MLP-Mixer on patches: (B, ...) -> (B, out_features).

    Args:
        input_shape: one example's shape, (D,), (C, L) or (C, H, W).
        patch: patch edge (see :func:`patchify`).
        dim, depth, mlp_ratio: width, blocks, channel-MLP width / dim.
        out_features: outputs.
        token_hidden: token-MLP width; default dim // 2 (Mixer-S/16 uses 256 for 196 patches
            at dim 512).
    """

    def __init__(self, input_shape, patch: int, dim: int, depth: int, out_features: int, mlp_ratio: int = 4,
                 token_hidden: int | None = None):
        super().__init__()
        probe = patchify(torch.zeros(1, *input_shape), patch)
        n_tokens, patch_dim = probe.shape[1:]
        self.patch = patch
        self.embed = nn.Linear(patch_dim, dim)
        self.blocks = nn.ModuleList(MixerBlock(n_tokens, dim, token_hidden or max(dim // 2, 8), mlp_ratio * dim)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(patchify(x, self.patch))  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v, proj matmuls (so each can be sparsified)."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        def split(t):  # (B, T, C) -> (B, heads, T, C / heads)
            return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerBlock(nn.Module):
    """Pre-norm block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, causal: bool, attn: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal) if attn is None else attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """ViT (bidirectional, mean-pooled) or GPT (causal) Transformer.

    Args:
        seq_len: tokens (or patches) per example.
        dim, depth, heads, mlp_ratio: width, blocks, attention heads, MLP width / dim.
        out_features: outputs (classes, regression outputs, or the vocabulary for 'lm').
        causal: GPT-style causal attention.
        vocab_size: token inputs (int64 (B, T)) through an embedding; None: float inputs cut
            into patches of edge ``patch`` through a linear embedding.
        patch: patch edge for float inputs.
        per_token: return (B, T, out_features) logits at every position (language modelling);
            otherwise (B, out_features) from the mean over tokens (ViT) or the last token (GPT).
        attention: 'dense' (:class:`Attention`) or a layout of
            :class:`~pixelfly_lab.nn.attention.PixelflyAttention` ('pixelfly', 'bigbird', ...).
        attention_options: keyword arguments of PixelflyAttention (budget, block_size, ...).
    """

    def __init__(self, seq_len: int, dim: int, depth: int, heads: int, out_features: int, *, causal: bool,
                 vocab_size: int | None = None, patch: int | None = None, patch_dim: int | None = None,
                 mlp_ratio: int = 4, per_token: bool = False, attention: str = "dense",
                 attention_options: dict | None = None):
        super().__init__()
        if attention not in ATTENTION_NAMES:
            raise ValueError(f"attention must be one of {ATTENTION_NAMES}, got {attention!r}")
        def attn():
            if attention == "dense":
                return None
            return PixelflyAttention(dim, heads, seq_len, causal=causal, layout=attention, **(attention_options or {}))

        self.causal, self.per_token, self.patch = causal, per_token, patch
        self.embed = nn.Embedding(vocab_size, dim) if vocab_size else nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq_len, dim))  # GPT-2's 0.02 init
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio * dim, causal, attn())
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_features)

    def reset_parameters(self) -> None:
        """Re-draw the position embedding, N(0, 0.02) as GPT-2's (the sub-modules reset their own):
        what :func:`pixelfly_lab.nn.materialize.materialize` calls after building on the meta device."""
        with torch.no_grad():
            self.pos.normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch is not None:
            x = patchify(x, self.patch)
        x = self.embed(x)  # (B, T, D)
        x = x + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.per_token:
            return self.head(x)  # (B, T, out_features)
        return self.head(x[:, -1] if self.causal else x.mean(dim=1))


def _check_pattern_args(pattern, budget, block_size) -> None:
    if not isinstance(pattern, str) or pattern not in PATTERN_NAMES:
        raise ValueError(f"unknown pattern name {pattern!r}; known: {', '.join(PATTERN_NAMES)}")
    check_budget(budget)
    check_int("block_size", block_size)


def sparsify_model(model: nn.Module, family: str, pattern: str = "pixelfly", budget: float = 0.25,
                   block_size: int = 16, seed: int = 0, *, gating: bool = False, lowrank_init: str = "svd",
                   where: tuple | list | None = None):
    """Replace the nn.Linear layers the paper sparsifies (:data:`SPARSIFY_WHERE`) by sparse ones.

    Args:
        model: a model from :func:`build_model` (changed in place).
        family: its family, one of :data:`MODEL_NAMES`.
        pattern, budget, block_size, seed: passed to :func:`pixelfly_lab.nn.sparsification.sparsify`.
        gating, lowrank_init: options of the sparse + low-rank layers (see
            :class:`pixelfly_lab.nn.layers.SparseLowRankLinear`), passed to ``sparsify``.
        where: module-name globs replacing :data:`SPARSIFY_WHERE`'s for this model (e.g.
            ``('layers.*',)``: every MLP layer but the head, for a teacher whose structured layer
            reads the input); None: the paper's choice.

    Returns:
        The sparsify report (DataFrame, one row per replaced layer); empty for 'dense'.
    """
    if family not in SPARSIFY_WHERE:
        raise ValueError(f"unknown model name {family!r}; known: {', '.join(MODEL_NAMES)}")
    _check_pattern_args(pattern, budget, block_size)
    check_bool("gating", gating)                  # checked here too: a dense model never reaches sparsify
    check_lowrank_init(lowrank_init)
    if pattern == "dense":
        return pd.DataFrame()
    # a predicate, not the globs: at depth 1 the MLP has no hidden-to-hidden layer, and sparsify
    # refuses a glob that matches nothing (a user's typo); here that is the paper's choice at work
    if where is not None and (isinstance(where, str) or not all(isinstance(g, str) for g in where)):
        raise TypeError(f"where must be a tuple of module-name globs, got {where!r}")
    where = SPARSIFY_WHERE[family] if where is None else tuple(where)
    return sparsify(model, pattern=pattern, budget=budget,
                    include=lambda name, module: any(fnmatchcase(name, glob) for glob in where),
                    block_size=block_size, seed=seed, gating=gating, lowrank_init=lowrank_init)


def _attention_budget(attention: str, budget, seq_len: int, block_size: int, causal: bool):
    """The budget given to the attention layers: 'connected' below its floor gets the floor (None), with a warning."""
    if attention != "connected" or budget is None or seq_len % block_size:
        return budget                        # (a length the block does not divide raises in the layer)
    floor = connected_layout(seq_len, block_size, causal=causal)[0].float().mean().item()
    if check_budget(budget) < floor - 1e-12:
        warnings.warn(f"attention_budget={budget:.4g} is below the connected layout's floor {floor:.4g} at "
                      f"T={seq_len}, block_size={block_size} (1 + ceil(log2(T/b)) blocks a row): using the floor; "
                      f"pass attention_budget=None for the floor, a smaller block_size, or attention='pixelfly'",
                      stacklevel=3)
        return None
    return budget


def build_model(name: str, data, *, size: str = "tiny", pattern: str = "dense", budget: float = 1.0,
                block_size: int = 16, seed: int = 0, patch: int | None = None, attention: str = "dense",
                attention_budget: float = 0.25, gating: bool = False,
                lowrank_init: str = "svd", where: tuple | list | None = None, **overrides) -> nn.Module:
    """Build a model for a data set, sparsified where the paper does.

    Args:
        name: 'mlp', 'mixer', 'vit' or 'gpt'.
        data: a :class:`pixelfly_lab.training.data.TaskData` (its task, input kind and shape, number of
            outputs and vocabulary decide the input and output layers).
        size: a preset in :data:`SIZES` ('tiny', 'small', 'base', 'gpt2-small').
        pattern, budget, block_size: the sparsity (see :func:`pixelfly_lab.structure.patterns.make_pattern`);
            block 16 suits hidden widths 64-256, 32 matches the released code at GPT-2 widths.
        seed: seeds the initial weights (the global RNG is left as it was).
        patch: patch edge for float inputs to mixer/vit; default :func:`default_patch`.
        gating, lowrank_init: the sparse + low-rank layers' options (see
            :class:`pixelfly_lab.nn.layers.SparseLowRankLinear`): ``gating=True,
            lowrank_init='kaiming'`` is the authors' released Pixelfly layer; the defaults (ungated,
            SVD init) keep each layer linear with a dense weight.
        where: module-name globs of the layers to sparsify instead of :data:`SPARSIFY_WHERE`'s
            (see :func:`sparsify_model`); None: where the paper sparsifies.
        attention: 'vit' and 'gpt' only: 'dense' (scaled dot-product attention) or one of
            :data:`ATTENTION_NAMES`' layouts of :class:`~pixelfly_lab.nn.attention.PixelflyAttention`
            ('pixelfly': flat block butterfly + Performer features, as the paper's LRA model;
            'bigbird', 'local', 'random': sparse baselines), with ``block_size`` blocks.
        attention_budget: fraction of the T^2 attention scores computed (features included);
            0.25 as the MLPs' usual budget. With ``attention='connected'`` a budget below the
            connected layout's floor (1 + ceil(log2(T/b)) blocks a row: more than 0.25 of the scores
            at short lengths) is raised to the floor with a warning; None asks for the floor.
        **overrides: ModelSize fields (dim, depth, heads, mlp_ratio) replacing the preset's.

    Returns:
        nn.Module mapping a batch of ``data.x_*`` to logits (B, n_outputs), predictions
        (B, n_outputs), or for task 'lm' (B, T, vocab). Attached: ``model.family``,
        ``model.dense_params`` (parameters before sparsifying) and ``model.report`` (the sparsify
        report).

    Example:
        >>> from pixelfly_lab.training.data import load_data
        >>> model = build_model("gpt", load_data("chars", context=32), pattern="pixelfly", budget=0.25)
        >>> model(torch.zeros(2, 32, dtype=torch.long)).shape  # (batch, context, vocabulary)
        torch.Size([2, 32, 76])
    """
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    _check_pattern_args(pattern, budget, block_size)
    check_int("seed", seed, 0)
    if attention not in ATTENTION_NAMES:
        raise ValueError(f"attention must be one of {ATTENTION_NAMES}, got {attention!r}")
    if attention != "dense" and name not in ("vit", "gpt"):
        raise ValueError(f"attention={attention!r} needs a Transformer ('vit' or 'gpt'), got model {name!r}")
    unknown = set(overrides) - set(ModelSize.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown model option(s) {sorted(unknown)}; known: dim, depth, heads, mlp_ratio")
    spec = ModelSize(**{**SIZES[size].__dict__, **overrides})
    tokens, lm = data.kind == "tokens", data.task == "lm"
    if name in ("mlp", "mixer") and (tokens or lm):
        raise ValueError(f"model {name!r} takes float inputs; data {data.name!r} is tokens: use 'vit' or 'gpt'")
    if name == "gpt" and not tokens:
        raise ValueError(f"model 'gpt' takes token inputs; data {data.name!r} is {data.kind}: use 'vit'")
    if name == "vit" and lm:
        raise ValueError("model 'vit' is bidirectional and cannot do language modelling; use 'gpt'")
    shape = data.input_shape
    if not tokens:
        patch = patch or default_patch(shape)
        if any(s % patch for s in (shape[-2:] if len(shape) == 3 else shape[-1:])):
            raise ValueError(f"patch={patch} does not divide the input shape {shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            model = MLP(math.prod(shape), spec.mlp_ratio * spec.dim, spec.depth, data.n_outputs)
        elif name == "mixer":
            model = Mixer(shape, patch, spec.dim, spec.depth, data.n_outputs, spec.mlp_ratio)
        else:
            extra = dict(vocab_size=data.vocab_size) if tokens else dict(
                patch=patch, patch_dim=patchify(torch.zeros(1, *shape), patch).shape[-1])
            seq_len = shape[0] if tokens else patchify(torch.zeros(1, *shape), patch).shape[1]
            attention_budget = _attention_budget(attention, attention_budget, seq_len, block_size, name == "gpt")
            model = Transformer(seq_len, spec.dim, spec.depth, spec.heads, data.n_outputs, causal=name == "gpt",
                                mlp_ratio=spec.mlp_ratio, per_token=lm, attention=attention,
                                attention_options=dict(budget=attention_budget, block_size=block_size, seed=seed),
                                **extra)
        model.family, model.dense_params = name, count_params(model)
        model.report = sparsify_model(model, name, pattern, budget, block_size, seed, gating=gating,
                                      lowrank_init=lowrank_init, where=where)
    return model
