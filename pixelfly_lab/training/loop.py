"""Train a small (sparse) model: one commented config, one loop, on CPU, a GPU, or many under torchrun.

``train(TrainConfig(...))`` (:mod:`pixelfly_lab.training.config`) builds the data (:mod:`pixelfly_lab.training.data`) and the model
(:mod:`pixelfly_lab.training.models`, sparsified where the Pixelfly paper does), then runs AdamW with a
linear warmup and cosine decay,

    lr(t) = lr * t / T_w                                          for t < T_w
    lr(t) = lr * (m + (1 - m) (1 + cos(pi (t - T_w) / (T - T_w))) / 2)   after, m = min_lr,

with gradient-norm clipping, bf16 autocast on CUDA, a progress bar and an evaluation after each
epoch. Into ``config.out`` it writes

* ``history.csv``: one row per step (event 'step': lr, train_loss, grad_norm, step_time) and
  per evaluation (event 'eval', after each epoch and every ``eval_every`` steps: train_loss
  since the previous evaluation, test_loss and test_accuracy, or val_loss and perplexity, or
  test_mse);
* ``ranks.csv``: effective and stable rank of chosen weights (default: those the pattern
  sparsifies) at each evaluation;
* ``summary.json``: final metrics, params, density, seconds, throughput, world_size, the config,
  versions and device;
* ``checkpoint.pt``: written atomically (temporary file, then rename) every
  ``checkpoint_every`` steps and after each evaluation; ``resume=True`` continues from it and gives
  the same parameters, bit for bit on CPU, as the run that was never interrupted.

Determinism: the model's initial weights depend on ``seed`` only, and the order of the
examples in epoch e on (seed, e) only, so a run is a function of its config (on CUDA, up to the
non-deterministic kernels PyTorch uses by default).

Several processes: under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N -m
pixelfly_lab train ...``) each step's global batch of ``batch_size`` examples is split across the
N ranks (rank r takes examples r, r + N, ...), gradients are averaged by
DistributedDataParallel (gloo on CPU, nccl on GPUs), and rank 0 writes the files. The run then
matches the one-process run with the same ``batch_size`` up to floating-point summation order.

Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, https://arxiv.org/abs/2112.00029.

Example:
    >>> result = train(TrainConfig(model="mlp", data="digits", pattern="pixelfly", budget=0.25,
    ...                            epochs=3, out="runs/digits-pixelfly"))
    >>> result.summary["test_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelfly_lab._version import __version__
from pixelfly_lab.outputs import check_output_fn, model_output
from pixelfly_lab.training.checkpoints import CHECKPOINT, atomic_write, load_checkpoint, write_tables
from pixelfly_lab.training.config import TrainConfig, TrainResult, lr_at
from pixelfly_lab.training.data import load_data
from pixelfly_lab.training.distributed import DistInfo, all_sum, barrier, gather_fingerprints, setup, teardown
from pixelfly_lab.training.models import SPARSIFY_WHERE, build_model, count_params
from pixelfly_lab.training.rank import weight_ranks

# TrainConfig, TrainResult, lr_at and CHECKPOINT live in .config and .checkpoints; named here too, where
# the package, the studies and the tests import them.
__all__ = ["TrainConfig", "TrainResult", "train", "lr_at", "task_loss", "CHECKPOINT"]


# ---------------------------------------------------------------- loss and evaluation


def task_loss(output: torch.Tensor, target: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    """The training loss of a task: mean squared error for 'regression', else cross-entropy.

    Args:
        output: (N, C) logits or outputs, or (N, T, V) language-model logits (flattened to (N T, V)).
        target: (N,) class indices, (N, T) next tokens, or (N, C) regression targets.
        task: 'regression', 'classification' or 'lm' (a :class:`~pixelfly_lab.training.data.TaskData` task).
        reduction: 'mean' or 'sum', as in torch.nn.functional. Computed in float32 (bf16 logits
            under autocast would lose the loss's small differences).

    Example:
        >>> round(task_loss(torch.zeros(2, 3), torch.tensor([0, 1]), "classification").item(), 4)  # log 3
        1.0986
    """
    if task == "regression":
        return F.mse_loss(output.float(), target, reduction=reduction)
    return F.cross_entropy(output.float().reshape(-1, output.shape[-1]), target.reshape(-1), reduction=reduction)


@torch.no_grad()
def _evaluate(model, x, y, task: str, d: DistInfo, autocast, batch: int, output_fn=None) -> dict:
    """Test metrics over this rank's share (examples rank, rank + world, ...), summed over ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for index in torch.arange(d.rank, len(x), d.world).split(batch):
        xb, yb = x[index], y[index]
        with autocast():
            output = model_output(model(xb), output_fn)
        sums[0] += float(task_loss(output, yb, task, reduction="sum"))
        if task != "regression":
            sums[1] += float((output.argmax(-1) == yb).sum())
        sums[2] += yb.numel() if task != "classification" else len(yb)
    model.train()
    loss_sum, correct, count = all_sum(sums.to(x.device), d).cpu().tolist()
    if task == "lm":
        val = loss_sum / count
        return {"val_loss": val, "perplexity": math.exp(min(val, 50.0)), "val_token_accuracy": correct / count}
    if task == "regression":
        return {"test_mse": loss_sum / count}  # mean over examples and outputs
    return {"test_loss": loss_sum / count, "test_accuracy": correct / count}


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pixelfly_lab": __version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- the loop


def _load_data(config: TrainConfig):
    options = dict(config.data_options)
    if config.data == "chars":
        options["context"] = config.context
    if config.data == "cifar10":
        options["root"] = config.data_dir
    # data_options={"seed": s} holds the data fixed while `seed` varies the initialisation (the studies' seeds)
    options.setdefault("seed", config.seed)
    return load_data(config.data, max_train=config.max_train, max_test=config.max_test, **options)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and sparse blocks (dim >= 2), none on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def _batch_index(config: TrainConfig, n_train: int, step: int, steps_per_epoch: int, d: DistInfo) -> torch.Tensor:
    """This rank's examples for ``step``: its share of the step's global batch in epoch order.

    The order of epoch e is a permutation seeded by (seed, e) alone, so that a resumed run, or a
    run on another number of ranks, sees the same global batches.
    """
    epoch, batch = divmod(step, steps_per_epoch)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
    return order[batch * config.batch_size:(batch + 1) * config.batch_size][d.rank::d.world]


def _summary(config, data, model, metrics, history, d, device, *, step, total_steps, seconds, step_seconds,
             examples) -> dict:
    fingerprints = gather_fingerprints(model, d)
    unit, per_example = ("tokens", data.x_train.shape[1]) if data.task == "lm" else ("examples", 1)
    step_times = [row["step_time"] for row in history if row["event"] == "step"]
    params = count_params(model)
    report, dense_params = getattr(model, "report", None), getattr(model, "dense_params", params)
    return {
        **metrics, "completed": step >= total_steps, "epochs": config.epochs, "steps": step,
        "total_steps": total_steps, "params": params, "dense_params": dense_params,
        "density": params / dense_params,
        "sparsified_layers": int(report["replaced"].sum()) if report is not None and len(report) else 0,
        "sparsified_budget": report.attrs.get("budget", 1.0) if report is not None else None, "seconds": seconds,
        f"{unit}_per_second": examples * per_example / step_seconds if step_seconds else None,
        "median_step_time": float(torch.tensor(step_times).median()) if step_times else None,
        "world_size": d.world, "ranks_agree": len(set(fingerprints)) == 1, "rank_fingerprints": fingerprints,
        "config": asdict(config), "versions": _versions(), "device": _device_name(device),
    }


def train(config: TrainConfig | None = None, *, module: torch.nn.Module | None = None, loss_fn=None,
          output_fn=None, **overrides) -> TrainResult:
    """Train one model as ``config`` says; write history.csv, ranks.csv, summary.json, checkpoint.pt.

    Args:
        config: a :class:`TrainConfig` (default: TrainConfig()).
        module: your own model (trained in place) instead of the one ``config.model`` names, e.g. a
            sparsified Hugging Face GPT-2 on ``data='chars'``; its forward may return a tensor, a
            mapping with 'logits' or an object with ``.logits``. ``config.model``, ``size``,
            ``pattern`` and ``budget`` are then only recorded; ranks are tracked only for
            ``config.rank_layers``.
        loss_fn: optional (output, target) -> scalar replacing the task's loss (cross-entropy, or
            mean squared error for regression) in training; evaluation keeps the task's metrics.
        output_fn: optional callable (model's output) -> tensor, e.g. ``lambda out: out.logits``.
        **overrides: TrainConfig fields replacing the config's (``train(model="gpt", data="chars")``).

    Returns:
        :class:`TrainResult` (model, history, ranks, summary, out folder).
    """

    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    if module is not None and not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be an nn.Module or None, got {type(module).__name__}")
    check_output_fn(output_fn)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (output, target) -> scalar or None, got {type(loss_fn).__name__}")
    d, device = setup(config.device)
    try:
        data = _load_data(config)
        steps_per_epoch = len(data.x_train) // config.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"batch_size={config.batch_size} exceeds the {len(data.x_train)} training examples")
        if config.batch_size % d.world:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by the world size {d.world}")
        total_steps = config.epochs * steps_per_epoch
        if module is None:
            model = build_model(config.model, data, size=config.size, pattern=config.pattern, budget=config.budget,
                                block_size=config.block_size, seed=config.seed, attention=config.attention,
                                **config.model_options).to(device)
        else:
            model = module.to(device)
        optimizer = _optimizer(model, config)
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        history, ranks, step, elapsed = [], [], 0, 0.0
        if config.resume and (out / CHECKPOINT).exists():
            state = load_checkpoint(out / CHECKPOINT, config)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history, ranks, step, elapsed = state["history"], state["ranks"], state["step"], state["seconds"]
        net = model
        if d.world > 1:
            # Layouts are fixed buffers, equal on every rank: synced once at wrapping, not every step.
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and config.amp
                    else contextlib.nullcontext)
        x_train, y_train = data.x_train.to(device), data.y_train.to(device)
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)
        started, step_seconds, examples = time.perf_counter(), 0.0, 0

        def evaluate() -> dict:
            return _evaluate(model, x_test, y_test, data.task, d, autocast, 4 * config.batch_size, output_fn)

        def checkpoint() -> None:
            if d.rank == 0:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "history": history, "ranks": ranks, "seconds": elapsed + time.perf_counter() - started,
                         "config": asdict(config)}
                atomic_write(out / CHECKPOINT, lambda f: torch.save(state, f))
                write_tables(out, history, ranks)
            barrier(d)

        bar = tqdm(total=total_steps, initial=step, disable=not config.progress or d.rank > 0,
                   desc=f"{config.model}/{config.data}/{config.pattern}", unit="step")
        last_eval = max([row["step"] for row in history if row["event"] == "eval"], default=0)
        window = [row["train_loss"] for row in history if row["event"] == "step" and row["step"] > last_eval]
        saved_step = step  # the latest checkpoint's step (the one resumed from, or none yet)
        net.train()
        while step < total_steps and (config.max_steps is None or step < config.max_steps):
            index = _batch_index(config, len(x_train), step, steps_per_epoch, d).to(device)
            lr = lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tick = time.perf_counter()
            with autocast():
                output = model_output(net(x_train[index]), output_fn)
            loss = (loss_fn(output, y_train[index]) if loss_fn is not None
                    else task_loss(output, y_train[index], data.task))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - tick
            step_seconds, examples, step = step_seconds + seconds, examples + config.batch_size, step + 1
            loss_value = float(all_sum(loss.detach().float().reshape(1), d)) / d.world  # mean over ranks
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the training loss became {loss_value} at step {step}; lower lr")
            epoch = (step - 1) // steps_per_epoch
            history.append({"event": "step", "epoch": epoch, "step": step, "lr": lr, "train_loss": loss_value,
                            "grad_norm": float(grad_norm), "step_time": seconds})
            window.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            if step % steps_per_epoch == 0 or (config.eval_every and step % config.eval_every == 0):
                metrics = evaluate()
                history.append({"event": "eval", "epoch": epoch, "step": step,
                                "train_loss": sum(window) / len(window), **metrics})
                window = []
                if config.track_rank and d.rank == 0 and (module is None or config.rank_layers):
                    chosen = config.rank_layers or SPARSIFY_WHERE[config.model]
                    for row in weight_ranks(model, chosen).to_dict("records"):
                        ranks.append({"epoch": epoch, "step": step, **row})
                if config.progress and d.rank == 0:
                    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    bar.write(f"epoch {epoch + 1}/{config.epochs}, step {step}: {scores}")
            if history[-1]["event"] == "eval" or (config.checkpoint_every and step % config.checkpoint_every == 0):
                checkpoint()
                saved_step = step
        bar.close()
        if step != saved_step:  # stopped by max_steps between checkpoints
            checkpoint()
        evals = [row for row in history if row["event"] == "eval" and row["step"] == step]
        metrics = ({k: v for k, v in evals[-1].items() if k not in ("event", "epoch", "step", "train_loss")}
                   if evals else evaluate())
        summary = _summary(config, data, model, metrics, history, d, device, step=step, total_steps=total_steps,
                           seconds=elapsed + time.perf_counter() - started, step_seconds=step_seconds,
                           examples=examples)
        if d.rank == 0:
            write_tables(out, history, ranks)
            atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
        barrier(d)
        return TrainResult(model, pd.DataFrame(history), pd.DataFrame(ranks), summary, out)
    finally:
        teardown(d)
