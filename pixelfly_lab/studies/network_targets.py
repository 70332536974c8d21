"""Expressiveness targets from trained networks: MLP weights of a small ViT, attention maps of a small GPT.

The Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 4) argues that flat block
butterfly + low-rank approximates "the matrices networks need". Here those matrices come from the
toolkit's own small models (:mod:`pixelfly_lab.training`), trained on the CPU for a short, fixed
budget (:class:`NetworkTargets`):

* ``'ViT MLP weight'``: square (n, n) blocks of the MLP weights ``fc1`` (4n, n) and ``fc2`` (n, 4n)
  of a ViT of width n trained on scikit-learn's digits;
* ``'GPT attention map'``: per layer and head, softmax(Q K^T / sqrt(d_head)) with the causal mask,
  (n, n), of a GPT with context n trained on the shipped character corpus, on the first held-out
  window (:func:`attention_maps`).

Each network trains from its own seed and gives ``per_network`` matrices of each kind. Matrices of
one network share its training, so they are not independent: the network is the unit of
replication (the study averages over a network's matrices before its interval over networks).
Trained matrices are cached (:func:`trained_targets`), keyed by the whole training configuration.

Example:
    >>> targets, metrics = trained_targets(NetworkTargets(n=32, networks=1, per_network=2, vit_heads=2, vit_epochs=1,
    ...                                                   gpt_steps=5))
    >>> [len(v) for v in targets.values()], tuple(targets["GPT attention map"][0].shape)
    ([2, 2], (32, 32))
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pixelfly_lab.training.checkpoints import atomic_write
from pixelfly_lab.training.config import TrainConfig
from pixelfly_lab.training.data import load_data
from pixelfly_lab.training.loop import train

__all__ = ["NetworkTargets", "TARGET_NAMES", "attention_maps", "attention_queries_keys", "mlp_weight_blocks",
           "trained_targets"]

TARGET_NAMES = ("ViT MLP weight", "GPT attention map")


@dataclass(frozen=True)
class NetworkTargets:
    """What is trained and which matrices are taken (sizes of the QUICK preset by default)."""

    n: int = 128                # target size: the ViT's width and the GPT's context
    networks: int = 2           # trained networks of each model, seeds 0..networks-1
    per_network: int = 4        # matrices taken from each network, of each kind
    vit_depth: int = 2          # ViT blocks (2 x 2 x 4 = 16 square MLP blocks to choose from)
    vit_heads: int = 4
    vit_epochs: int = 4         # digits, batch 64: 22 steps an epoch; ~70% test accuracy at 4 epochs
    gpt_size: str = "tiny"      # dim 64, 2 blocks of 2 heads: 4 attention maps a network
    gpt_steps: int = 150        # batch gpt_batch windows of n characters; ~2.6 nats validation loss at 150
    gpt_batch: int = 16
    lr: float = 3e-3            # TrainConfig's default for the tiny/small presets


def mlp_weight_blocks(model: torch.nn.Module, count: int) -> list[torch.Tensor]:
    """``count`` square (n, n) blocks of a Transformer's MLP weights, n its width.

    Blocks are taken in the order: block j of every layer's fc1 (rows j n .. (j + 1) n) and fc2
    (columns likewise), for j = 0, 1, ...: spread over layers and both weights before reusing one.

    Returns:
        list of float64 (n, n) tensors.
    """
    width = model.blocks[0].mlp.fc1.in_features
    chunks = model.blocks[0].mlp.fc1.out_features // width
    order = [(layer, name, j) for j in range(chunks) for layer in range(len(model.blocks)) for name in ("fc1", "fc2")]
    if count > len(order):
        raise ValueError(f"count={count} exceeds the {len(order)} square MLP blocks of the model")
    blocks = []
    for layer, name, j in order[:count]:
        weight = getattr(model.blocks[layer].mlp, name).weight.detach().to(torch.float64)
        blocks.append((weight[j * width:(j + 1) * width] if name == "fc1" else weight[:, j * width:(j + 1) * width])
                      .clone())
    return blocks


def attention_queries_keys(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block's per-head queries and keys of a Transformer on one input, as its attention computes them.

    Args:
        model: a Transformer of :mod:`pixelfly_lab.training.models` (blocks with ``attn.q``,
            ``attn.k``, ``attn.heads``), in the mode the caller wants (eval for no dropout).
        tokens: (B, T) input (token ids, or the model's float input).

    Returns:
        (q, k), each (layers, B, heads, T, d_head) in the model's dtype; the scores are
        q . k / sqrt(d_head) (causal where the block's ``attn.causal``).
    """
    inputs = {}
    hooks = [block.attn.register_forward_hook(lambda module, args, output, i=i: inputs.__setitem__(i, args[0]))
             for i, block in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    queries, keys = [], []
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            attn, x = block.attn, inputs[i]
            B, T, C = x.shape
            for proj, out in ((attn.q, queries), (attn.k, keys)):   # (B, T, C) -> (B, heads, T, d)
                out.append(proj(x).view(B, T, attn.heads, C // attn.heads).transpose(1, 2))
    return torch.stack(queries), torch.stack(keys)


def attention_maps(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Every layer's and head's attention map softmax(Q K^T / sqrt(d_head)) of a dense Transformer on one input.

    Args:
        model: a Transformer of :mod:`pixelfly_lab.training.models` with dense attention (blocks
            with ``attn.q``, ``attn.k``, ``attn.heads``, ``attn.causal``).
        tokens: (1, T) input (token ids, or the model's float input).

    Returns:
        (layers, heads, T, T) float64: row i is query i's weights over the keys (causal: zero above
        the diagonal); ``maps @ V`` per head is what the attention layer averages.
    """
    q, k = attention_queries_keys(model, tokens)
    q, k = q[:, 0], k[:, 0]                                             # (layers, heads, T, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])           # (layers, heads, T, T)
    T = scores.shape[-1]
    causal = torch.tensor([block.attn.causal for block in model.blocks]).view(-1, 1, 1, 1)
    scores = scores.masked_fill(causal & torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores.to(torch.float64), dim=-1)


def _train_config(config: NetworkTargets, model: str, seed: int, out: str) -> TrainConfig:
    common = dict(device="cpu", out=out, progress=False, track_rank=False, seed=seed, lr=config.lr)
    if model == "vit":
        return TrainConfig(model="vit", data="digits", size="small", epochs=config.vit_epochs, batch_size=64,
                           model_options=dict(dim=config.n, depth=config.vit_depth, heads=config.vit_heads), **common)
    return TrainConfig(model="gpt", data="chars", size=config.gpt_size, context=config.n, epochs=1,
                       batch_size=config.gpt_batch, max_train=config.gpt_batch * config.gpt_steps,
                       max_test=config.gpt_batch, **common)


def _key(config: TrainConfig, per_network: int) -> dict:
    """What a cached file must match: the training configuration (not its output folder) and the count."""
    fields = dataclasses.asdict(config)
    fields.pop("out")
    return dict(train=fields, per_network=per_network)


def _trained(config: NetworkTargets, model: str, seed: int) -> tuple[list[torch.Tensor], dict]:
    """Train one network and take its matrices."""
    with tempfile.TemporaryDirectory() as tmp:
        result = train(_train_config(config, model, seed, tmp))
    net = result.model.eval()
    if model == "vit":
        matrices = mlp_weight_blocks(net, config.per_network)
    else:
        window = load_data("chars", context=config.n, max_test=1).x_test[:1]
        maps = attention_maps(net, window)
        if config.per_network > maps.shape[0] * maps.shape[1]:
            raise ValueError(f"per_network={config.per_network} exceeds the GPT's {maps.shape[0] * maps.shape[1]} "
                             "attention maps")
        matrices = list(maps.flatten(0, 1)[:config.per_network].clone())
    metrics = {k: v for k, v in result.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return matrices, metrics


def trained_targets(config: NetworkTargets = NetworkTargets(), cache: Path | None = None,
                    fallbacks: tuple = ()) -> tuple[dict[str, list[torch.Tensor]], pd.DataFrame]:
    """Train the networks (or read them from the cache) and return their matrices, unit Frobenius norm.

    Args:
        config: what to train and take.
        cache: a folder; each network's matrices and training metrics are written there as
            ``<model>-seed<k>.pt`` (None: not cached).
        fallbacks: more folders to read a cached network from (e.g. the previous run's), used
            only when the file's training configuration equals this one.

    Returns:
        ({name in :data:`TARGET_NAMES`: networks * per_network float64 (n, n) matrices, ordered
        network by network}, DataFrame of the networks' final metrics: one row per network with
        columns target, seed and the numbers of the training summary (test_accuracy, val_loss, seconds, ...)).
    """
    if config.networks < 1 or config.per_network < 1:
        raise ValueError(f"networks and per_network must be >= 1, got {config.networks}, {config.per_network}")
    out, rows = {name: [] for name in TARGET_NAMES}, []
    for name, model in zip(TARGET_NAMES, ("vit", "gpt")):
        for seed in range(config.networks):
            key = _key(_train_config(config, model, seed, ""), config.per_network)
            file = f"{model}-seed{seed}.pt"
            found = None
            for folder in ([cache] if cache is not None else []) + [Path(f) for f in fallbacks]:
                path = Path(folder) / file
                if path.is_file():
                    try:
                        saved = torch.load(path, weights_only=False)
                    except Exception:   # unreadable (another version, a broken disk): train again
                        continue
                    if isinstance(saved, dict) and saved.get("key") == key:
                        found = saved
                        break
            if found is None:
                matrices, metrics = _trained(config, model, seed)
                found = dict(key=key, matrices=matrices, metrics=metrics)
            if cache is not None:
                Path(cache).mkdir(parents=True, exist_ok=True)
                atomic_write(Path(cache) / file, lambda f, found=found: torch.save(found, f))
            out[name] += [m / torch.linalg.norm(m) for m in found["matrices"]]
            rows.append(dict(target=name, seed=seed, **found["metrics"]))
    return out, pd.DataFrame(rows)
