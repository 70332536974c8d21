"""The talk's GPU speed claims for the 'training' study: per-step speed-up of Pixelfly over dense.

At the talk's model shapes (Mixer-B/16 2.3x, ViT-B/16 2.0x, GPT-2 small 2.1x, GPT-2 medium 2.5x,
end to end; Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029, and the authors'
talk), on synthetic batches: :func:`speed_claims` times a training step of each model dense and
with Pixelfly (:func:`pixelfly_lab.studies.training_comparison.step_speed`) beside its FLOP ceiling
(:func:`flop_ceiling`); :func:`unmeasured_speed_claims` states them undecided where no CUDA GPU
ran them. :mod:`pixelfly_lab.studies.training` runs the study and re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pixelfly_lab.training.data import TaskData
from pixelfly_lab.studies.training_comparison import plot_step_times, step_speed
from pixelfly_lab.studies.claims import Claim, save_figure, save_table

__all__ = ["SpeedModel", "GPU_SPEEDUPS", "flop_ceiling", "speed_claims", "unmeasured_speed_claims"]


@dataclass(frozen=True)
class SpeedModel:
    """A model of the talk's speed table, at its shape, on synthetic batches.

    Attributes:
        label: the talk's name; family: 'mixer', 'vit' or 'gpt'; threshold: the talk's speedup.
        dims: ModelSize fields (dim, depth, heads); batch: examples per step.
        context, vocab: GPT's tokens per example and vocabulary (GPT-2's 50257 padded to 50304).
        image, patch: Mixer/ViT image edge and patch edge.
    """

    label: str
    family: str
    threshold: float
    dims: dict
    batch: int
    context: int = 1024
    vocab: int = 50304
    image: int = 224
    patch: int = 16


_BASE = {"dim": 768, "depth": 12, "heads": 12}
# The authors' talk (Pixelated Butterfly, ICLR 2022): end-to-end training speedups over dense.
GPU_SPEEDUPS = (SpeedModel("Mixer-B/16", "mixer", 2.3, _BASE, 64),
                SpeedModel("ViT-B/16", "vit", 2.0, _BASE, 64),
                SpeedModel("GPT-2 small", "gpt", 2.1, _BASE, 16),
                SpeedModel("GPT-2 medium", "gpt", 2.5, {"dim": 1024, "depth": 24, "heads": 16}, 8))


def _speed_data(spec: SpeedModel) -> TaskData:
    if spec.family == "gpt":
        tokens = torch.randint(spec.vocab, (spec.batch, spec.context))
        return TaskData("synthetic", "lm", "tokens", tokens, tokens.roll(-1, dims=1), tokens[:1], tokens[:1],
                        n_outputs=spec.vocab, vocab_size=spec.vocab)
    images = torch.randn(spec.batch, 3, spec.image, spec.image)
    labels = torch.randint(1000, (spec.batch,))
    return TaskData("synthetic", "classification", "image", images, labels, images[:1], labels[:1], n_outputs=1000)


def flop_ceiling(spec: SpeedModel, budget: float) -> dict:
    """Multiply-adds of one training step, dense and with the sparsified matmuls at ``budget``, and their ratio.

    Counted by formula, as :func:`pixelfly_lab.speed.timer.time_training_steps` counts what runs:
    every matmul 3 times (forward, input gradient, weight gradient; the patch embedding twice, its
    input needs no gradient), attention scores 7 times
    (QK^T and PV forward; the recomputed QK^T, dV, dP, dQ, dK backward), half of them when causal.
    Sparsified (:data:`pixelfly_lab.training.models.SPARSIFY_WHERE`): Mixer's channel MLPs,
    ViT's MLPs and q/k/v projections, GPT's MLPs; everything else dense (embeddings, token MLPs,
    output projections, attention scores, heads: GPT's 768 x 50304 head among them).

    Returns:
        {'dense': MACs, 'sparse': MACs, 'ceiling': dense / sparse, 'sparse_share': the dense
        step's share of MACs in the sparsified matmuls}.
    """
    d, depth, batch = spec.dims["dim"], spec.dims["depth"], spec.batch
    t = spec.context if spec.family == "gpt" else (spec.image // spec.patch) ** 2
    tokens = batch * t
    mlp = 2 * 4 * d * d * tokens                         # fc1 + fc2, hidden 4 d
    qkv, proj = 3 * d * d * tokens, d * d * tokens
    scores = (t * d * tokens) * (0.5 if spec.family == "gpt" else 1.0)   # QK^T (= PV) MACs, causal half
    if spec.family == "mixer":
        token_mlp = 2 * t * max(d // 2, 8) * d * batch    # models.Mixer's token MLP, hidden d / 2
        sparse, other, attention = mlp, token_mlp, 0.0
        embed, head = 3 * spec.patch ** 2 * d * tokens, d * 1000 * batch
    elif spec.family == "vit":
        sparse, other, attention = mlp + qkv, proj, 2 * scores
        embed, head = 3 * spec.patch ** 2 * d * tokens, d * 1000 * batch
    else:
        sparse, other, attention = mlp, qkv + proj, 2 * scores
        embed, head = 0, d * spec.vocab * tokens
    # the patch embedding's input (the images) needs no gradient: 2 products, not 3
    dense_step = 3 * (depth * (sparse + other) + head) + 2 * embed + 3.5 * depth * attention
    sparse_step = dense_step - 3 * depth * (1 - budget) * sparse
    return {"dense": dense_step, "sparse": sparse_step, "ceiling": dense_step / sparse_step,
            "sparse_share": 3 * depth * sparse / dense_step}


_SPARSE_PARTS = {"mixer": "its channel MLPs (Mixer has no attention; token MLPs, patch embedding and head dense)",
                 "vit": "its MLPs and q/k/v projections (attention scores, output projections, patch embedding and "
                        "head dense)",
                 "gpt": "its MLPs (attention dense, as are the q/k/v/output projections and the 768 x 50304 head)"}


def _speed_claim_text(spec: SpeedModel, budget: float) -> str:
    ceiling = flop_ceiling(spec, budget)["ceiling"]
    return (f"Pixelfly talk: training {spec.label} with Pixelfly is {spec.threshold}x faster than dense on a GPU (end "
            f"to end). Tested here: a training step of {spec.label} (batch {spec.batch}) with Pixelfly at budget "
            f"{budget:g} in {_SPARSE_PARTS[spec.family]} against dense, bf16; FLOP ceiling of that model "
            f"{ceiling:.2f}x (held when a step is at least {spec.threshold}x faster than dense's, same batch; a ceiling "
            f"below {spec.threshold}x makes the claim untestable here: marked so, not run, undecided)")


def speed_claims(out: Path, device: str = "cuda", *, models=GPU_SPEEDUPS, budget: float = 0.25,
                 block_size: int = 32, steps: int = 10, rounds: int = 3) -> list[Claim]:
    """Training-step time of each model of the talk's table, dense against Pixelfly; one claim per model.

    The defaults are the talk's models at their shapes (:data:`GPU_SPEEDUPS`: Mixer-B/16 2.3x,
    ViT-B/16 2.0x, GPT-2 small 2.1x, GPT-2 medium 2.5x) on synthetic batches; block 32 fits GPU
    tiles. Smaller :class:`SpeedModel`\\ s run the same code on a CPU (the tests do). A model whose
    FLOP ceiling (:func:`flop_ceiling`) is below its threshold is not timed: its claim says so.

    Returns:
        one Claim per model (held when its speedup reaches its threshold); writes
        gpu_step_time.csv/.png/.pdf when a model was timed.
    """
    frames, claims = {}, []
    for spec in models:
        ceiling = flop_ceiling(spec, budget)["ceiling"]
        if ceiling < spec.threshold:
            claims.append(Claim(_speed_claim_text(spec, budget), f"not measured: FLOP ceiling {ceiling:.2f}x is below "
                                f"the threshold {spec.threshold}x at this configuration; undecided", None,
                                kind="paper"))
            continue
        frame = step_speed(spec.family, _speed_data(spec), size="gpt2-small", budget=budget, block_size=block_size,
                           batch_size=spec.batch, device=device, steps=steps, rounds=rounds,
                           **({} if spec.family == "gpt" else {"patch": spec.patch}), **spec.dims)
        frames[f"{spec.label} (batch {spec.batch})"] = frame
        speedup = float(frame.set_index("pattern").speedup["pixelfly"])
        claims.append((spec, speedup, ceiling))
    png = csv = None
    if frames:
        table = pd.concat([f.assign(model=label) for label, f in frames.items()], ignore_index=True)
        csv = save_table(table, out, "gpu_step_time")
        png = save_figure(plot_step_times(frames, f"Step time ({device})"), out, "gpu_step_time")
    return [c if isinstance(c, Claim) else
            Claim(_speed_claim_text(c[0], budget), f"{c[0].label}: {c[1]:.2f}x on {device} (threshold "
                  f"{c[0].threshold}x, FLOP ceiling {c[2]:.2f}x)", bool(c[1] >= c[0].threshold), png, kind="paper",
                  table=csv)
            for c in claims]


def unmeasured_speed_claims(device: str, budget: float = 0.25) -> list[Claim]:
    """The talk's speed claims, undecided: this run has no CUDA device (or the preset skips them)."""
    return [Claim(_speed_claim_text(spec, budget), f"not measured: the run is on {device} (the claim needs a CUDA GPU "
                  f"and the full preset); FLOP ceiling {flop_ceiling(spec, budget)['ceiling']:.2f}x"
                  + (f", below the threshold {spec.threshold}x: untestable at this configuration"
                     if flop_ceiling(spec, budget)["ceiling"] < spec.threshold else ""), None, kind="paper")
            for spec in GPU_SPEEDUPS]
