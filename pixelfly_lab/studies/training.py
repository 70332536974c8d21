"""Study 'training': parity of Pixelfly with dense training, rank of the weights, time per step.

Composes :func:`pixelfly_lab.training_study.compare_patterns` and
:func:`~pixelfly_lab.training_study.step_speed`. What the paper claims (Dao, Chen et al.,
ICLR 2022, arXiv 2112.00029, Sec. 5): sparse models with the Pixelfly pattern reach the dense
models' accuracy with a fraction of the parameters, and train 2.3-2.5x faster on GPUs
(MLP-Mixer, ViT, GPT-2). At laptop scale we check:

* digits MLP at budget 0.25: Pixelfly's test accuracy within 2 points of dense, in the same
  epochs; baselines (butterfly alone, low-rank, random blocks, Monarch) beside it;
* character GPT on the shipped Shakespeare: Pixelfly's validation loss within 5% of dense;
* the rank of trained weights (Pixelfly's are full rank; low-rank's are not), over training;
* time per training step, dense against sparse; on a CUDA GPU (full preset) the step of a
  GPT-2-small-shaped GPT and a Mixer-B/16-shaped Mixer against the 2.5x the paper reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..data import TaskData, load_data
from ..rank import layer_weights, singular_values
from ..threads import num_threads
from ..training_study import compare_patterns, plot_curves, plot_parity, plot_ranks, plot_step_times, step_speed
from .claims import Claim, save_figure, save_table

__all__ = ["TrainingConfig", "FULL", "QUICK", "TINY", "run", "speed_claims"]

# Baselines at the same budget; the quick run keeps the two most telling (low-rank alone, random blocks).
DIGITS_PATTERNS = ("dense", "pixelfly", "lowrank", "random", "butterfly", "monarch")
GPT_PATTERNS = ("dense", "pixelfly", "lowrank")


@dataclass(frozen=True)
class TrainingConfig:
    """Sizes of the 'training' study."""

    digits_patterns: tuple[str, ...] = DIGITS_PATTERNS
    digits_seeds: tuple[int, ...] = (0, 1, 2)   # the seed also draws the train/test split
    digits_epochs: int = 40
    digits_max_train: int | None = None          # None: all of digits' training split
    chars_patterns: tuple[str, ...] = GPT_PATTERNS
    chars_size: str = "small"                    # models.SIZES preset of the character GPT (4 blocks)
    context: int = 64                            # characters per window
    chars_epochs: int = 5
    chars_max_train: int | None = None           # windows kept of each split (None: all)
    chars_max_test: int | None = None
    chars_eval_every: int = 200                  # steps between validation losses
    timing_steps: int = 20                       # timed steps per pattern and round (step time figure)
    timing_rounds: int = 3
    gpu_speed: bool = True                       # on CUDA: GPT-2-small and Mixer-B/16-shaped step times


FULL = TrainingConfig()
# 10 epochs of the digits MLP, 150 steps of a 2-block GPT on 32-character windows
QUICK = TrainingConfig(digits_patterns=DIGITS_PATTERNS[:4], digits_seeds=(0, 1), digits_epochs=10,
                       chars_patterns=GPT_PATTERNS[:2], chars_size="tiny", context=32, chars_epochs=1,
                       chars_max_train=4800, chars_max_test=256, chars_eval_every=25, timing_steps=5,
                       timing_rounds=2, gpu_speed=False)
TINY = TrainingConfig(digits_patterns=("dense", "pixelfly", "lowrank"), digits_seeds=(0,), digits_epochs=1,
                      digits_max_train=256, chars_patterns=GPT_PATTERNS[:2], chars_size="tiny", context=16,
                      chars_epochs=1, chars_max_train=256, chars_max_test=64, chars_eval_every=4, timing_steps=1,
                      timing_rounds=1, gpu_speed=False)


def _digits_study(out: Path, cfg: TrainingConfig, device: str) -> tuple[list[Claim], pd.DataFrame]:
    seeds, patterns = cfg.digits_seeds, cfg.digits_patterns
    runs = compare_patterns(patterns, seeds, model="mlp", data="digits", size="tiny", budget=0.25, block_size=16,
                            epochs=cfg.digits_epochs, batch_size=64, lr=3e-3, max_train=cfg.digits_max_train,
                            device=device, progress=False)
    summary, history, ranks = runs.summary, runs.history, runs.ranks
    csv = save_table(summary, out, "digits_parity")
    save_table(ranks, out, "digits_ranks")
    save_figure(plot_curves(history, "test_accuracy", "digits MLP"), out, "digits_curves")
    parity_png = save_figure(plot_parity(summary, "test_accuracy", "digits MLP, budget 0.25"), out, "digits_parity")
    acc = summary.groupby("pattern").test_accuracy.mean()
    gap = 100 * (acc["dense"] - acc["pixelfly"])
    claims = [Claim(
        "Pixelfly paper (Sec. 5, Tables 1-2): Pixelfly models reach the dense model's accuracy with a fraction of "
        "the parameters -- here a digits MLP at budget 0.25 (held when Pixelfly's mean test accuracy is within 2 "
        "points of dense's after the same epochs)",
        f"test accuracy over {len(seeds)} seed(s), {cfg.digits_epochs} epoch(s): dense {100 * acc['dense']:.1f}%, "
        f"pixelfly {100 * acc['pixelfly']:.1f}% (gap {gap:+.1f} points); "
        + ", ".join(f"{p} {100 * acc[p]:.1f}%" for p in patterns[2:]), bool(gap <= 2.0), parity_png,
        kind="paper", table=csv)]
    # Rank: the 256x256 hidden layer's trained weight, first seed, every pattern.
    layer = "layers.1"
    spectra = {p: singular_values(layer_weights(runs.models[p, seeds[0]], (layer,))[layer])
               for p in ("dense", "pixelfly", "lowrank") if p in patterns}
    save_table(pd.DataFrame({p: s.numpy() for p, s in spectra.items()}), out, "digits_spectra")
    rank_png = save_figure(plot_ranks(ranks, layer, spectra, "digits MLP"), out, "digits_rank")
    last = ranks[(ranks.layer == layer) & (ranks.epoch == ranks.epoch.max())].groupby("pattern").effective_rank.mean()
    claims.append(Claim(
        "Pixelfly paper (Sec. 3-4): sparse + low-rank keeps the weight full-rank where a low-rank factorisation of "
        "the same budget cannot exceed its rank",
        "effective rank of the trained 256x256 hidden weight: " + ", ".join(f"{p} {v:.0f}" for p, v in last.items()),
        None, rank_png, kind="info"))
    return claims, summary


def _chars_study(out: Path, cfg: TrainingConfig, device: str) -> tuple[list[Claim], pd.DataFrame]:
    runs = compare_patterns(
        cfg.chars_patterns, (0,), model="gpt", data="chars", size=cfg.chars_size, budget=0.25, block_size=16,
        context=cfg.context, epochs=cfg.chars_epochs, batch_size=32, lr=3e-3, max_train=cfg.chars_max_train,
        max_test=cfg.chars_max_test, eval_every=cfg.chars_eval_every, device=device, progress=False)
    summary, history = runs.summary, runs.history
    csv = save_table(summary, out, "chars_parity")
    curves_png = save_figure(plot_curves(history, "val_loss", "character GPT"), out, "chars_curves")
    loss = summary.groupby("pattern").val_loss.mean()
    ratio = loss["pixelfly"] / loss["dense"]
    return [Claim(
        "Pixelfly paper (Sec. 5, GPT-2 on WikiText-103): the Pixelfly GPT matches the dense model's quality -- here a "
        "character GPT on Shakespeare (held when Pixelfly's validation loss is within 5% of dense's)",
        "validation loss: " + ", ".join(f"{p} {v:.3f}" for p, v in loss.items())
        + f"; pixelfly / dense = {ratio:.3f} ({100 * (ratio - 1):+.1f}%)",
        bool(ratio <= 1.05), curves_png, kind="paper", table=csv)], summary


def speed_claims(out: Path, device: str = "cuda", *, size: str = "gpt2-small", vocab: int = 50304,
                 context: int = 1024, image: int = 224, patch: int = 16, batches=(16, 64), block_size: int = 32,
                 budget: float = 0.25) -> list[Claim]:
    """Training-step time of a GPT-2-small-shaped GPT and a Mixer-B/16-shaped Mixer, dense against Pixelfly.

    The defaults are the paper's shapes (GPT-2 small: 12 blocks of width 768, 1024 tokens,
    vocabulary 50304; Mixer-B/16: 12 blocks of width 768 on 224x224 images in 16x16 patches),
    on synthetic batches; block 32 fits GPU tiles. Smaller arguments run the same code on a CPU.

    Returns:
        one Claim (held when both speedups reach 2.5x); writes gpu_step_time.csv/.png/.pdf.
    """
    n_gpt, n_mixer = batches
    tokens = torch.randint(vocab, (n_gpt, context))
    gpt_data = TaskData("synthetic", "lm", "tokens", tokens, tokens.roll(-1, dims=1), tokens[:1], tokens[:1],
                        n_outputs=vocab, vocab_size=vocab)
    images = torch.randn(n_mixer, 3, image, image)
    labels = torch.randint(1000, (n_mixer,))
    mixer_data = TaskData("synthetic", "classification", "image", images, labels, images[:1], labels[:1],
                          n_outputs=1000)
    common = dict(size=size, budget=budget, block_size=block_size, device=device)
    frames = {f"GPT ({size}, batch {n_gpt} x {context})": step_speed("gpt", gpt_data, batch_size=n_gpt, **common),
              f"Mixer ({size}, batch {n_mixer}, {image}px / {patch})": step_speed(
                  "mixer", mixer_data, batch_size=n_mixer, patch=patch, **common)}
    table = pd.concat([f.assign(model=label) for label, f in frames.items()], ignore_index=True)
    csv = save_table(table, out, "gpu_step_time")
    png = save_figure(plot_step_times(frames, f"Step time ({device})"), out, "gpu_step_time")
    speedups = {label: float(f.set_index("pattern").speedup["pixelfly"]) for label, f in frames.items()}
    return [Claim("Pixelfly paper (abstract, Tables 2-4): training GPT-2 small and MLP-Mixer is 2.3-2.5x faster than "
                  f"dense at the paper's budgets (held when each training step is at least 2.5x faster than dense's "
                  f"at budget {budget})",
                  ", ".join(f"{k}: {v:.2f}x" for k, v in speedups.items()),
                  bool(min(speedups.values()) >= 2.5), png, kind="paper", table=csv)]


def run(out: Path, config: TrainingConfig = QUICK, *, device: str = "cpu") -> list[Claim]:
    """The 'training' study (see the module docstring)."""
    out = Path(out)
    with num_threads(1 if device == "cpu" and config != FULL else None):  # tiny models: see pixelfly_lab.threads
        claims, digits = _digits_study(out, config, device)
        chars_claims, chars = _chars_study(out, config, device)
        claims += chars_claims
        # Step time measured interleaved on the same batch (the runs' own step times drift with the machine's load).
        timing = dict(steps=config.timing_steps, rounds=config.timing_rounds)
        frames = {"digits MLP": step_speed("mlp", load_data("digits"), list(digits.pattern.unique()), budget=0.25,
                                           batch_size=64, device=device, **timing),
                  "character GPT": step_speed("gpt", load_data("chars", context=config.context),
                                              list(chars.pattern.unique()), size=config.chars_size,
                                              budget=0.25, batch_size=32, device=device, **timing)}
        png = save_figure(plot_step_times(frames, f"Time per step ({device})"), out, "step_time")
        csv = save_table(pd.concat([f.assign(model=k) for k, f in frames.items()], ignore_index=True), out,
                         "step_time")
        described = "; ".join(f"{k}: " + ", ".join(f"{p} {1e3 * t:.1f} ms" for p, t in zip(f.pattern, f.step_time))
                              for k, f in frames.items())
        claims.append(Claim("Time per training step, dense against sparse, at these small sizes (the paper's "
                            "speedups need GPU-sized matmuls; tiny CPU models are bound by overheads)", described,
                            None, png, kind="info", table=csv))
        if device == "cuda" and config.gpu_speed:
            claims += speed_claims(out, device)
    return claims
