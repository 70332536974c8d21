"""The ``train`` command: ``python -m pixelfly_lab train`` options, one per TrainConfig field.

Example:
    python -m pixelfly_lab train --model mlp --data digits --pattern pixelfly --budget 0.25 --epochs 3
"""

from __future__ import annotations

import os
from dataclasses import fields

from pixelfly_lab.structure.patterns import PATTERN_NAMES
from pixelfly_lab.training.config import TrainConfig
from pixelfly_lab.training.data import DATASETS
from pixelfly_lab.training.loop import train
from pixelfly_lab.training.models import ATTENTION_NAMES, MODEL_NAMES, SIZES

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    """``python -m pixelfly_lab train`` options: every TrainConfig field."""
    defaults = TrainConfig()
    parser.add_argument("--model", default=defaults.model, choices=MODEL_NAMES,
                        help=f"model family (default {defaults.model})")
    parser.add_argument("--data", default=defaults.data, choices=DATASETS,
                        help=f"data set, generated or shipped; nothing is downloaded (default {defaults.data})")
    parser.add_argument("--pattern", default=defaults.pattern, choices=PATTERN_NAMES, metavar="NAME",
                        help="sparsity pattern: " + ", ".join(PATTERN_NAMES))
    parser.add_argument("--attention", default=defaults.attention, choices=ATTENTION_NAMES,
                        help="vit/gpt attention: dense, or PixelflyAttention with that layout")
    parser.add_argument("--budget", type=float, default=defaults.budget,
                        help="fraction of each sparsified layer's dense parameters, in (0, 1]")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"passes over the training set "
                        f"(default {defaults.epochs})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seeds the weights, the example order and the data generators (default 0)")
    parser.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when available (default auto)")
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--size", default=defaults.size, choices=tuple(SIZES),
                        help=f"model size preset, tiny (CPU seconds) to GPT-2 small (default {defaults.size})")
    parser.add_argument("--block-size", type=int, default=defaults.block_size,
                        help=f"sparse block size; must divide the sparsified widths (default {defaults.block_size})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help=f"peak learning rate of AdamW's warmup-cosine schedule (default {defaults.lr:g})")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help=f"AdamW weight decay on matrices and sparse blocks (default {defaults.weight_decay:g})")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="share of steps warming up")
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip,
                        help=f"max global gradient norm, 0 for none (default {defaults.grad_clip:g})")
    parser.add_argument("--data-dir", default=None, help="cifar10: folder holding cifar-10-batches-py")
    parser.add_argument("--context", type=int, default=defaults.context, help="chars: window length")
    parser.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE", dest="data_options",
                        help="a loader option, repeatable, e.g. --data-option max_len=64 (listops)")
    parser.add_argument("--max-train", type=int, default=None, help="keep the first N training examples")
    parser.add_argument("--max-test", type=int, default=None, help="keep the first N test examples")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N steps (resume later)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: each epoch)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints")
    parser.add_argument("--rank-layers", nargs="+", metavar="GLOB", default=None,
                        help="layers whose effective rank ranks.csv tracks (default: the sparsified ones)")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--data-option wants KEY=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def run(args) -> int:
    """Train as the parsed ``args`` say; print the final metrics on rank 0."""
    names = {f.name for f in fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in names}
    options["data_options"] = dict(_parse_option(text) for text in args.data_options)
    result = train(TrainConfig(**options, amp=not args.no_amp, progress=not args.no_progress))
    if int(os.environ.get("RANK", "0")) == 0:
        keys = [k for k in ("test_accuracy", "test_loss", "val_loss", "perplexity", "test_mse", "density",
                            "seconds") if k in result.summary]
        print(", ".join(f"{k} {result.summary[k]:.4g}" for k in keys) + f" -> {result.out / 'summary.json'}")
    return 0
