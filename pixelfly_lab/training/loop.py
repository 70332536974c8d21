"""Train a small (sparse) model: one commented config, one loop, on CPU, a GPU, or many under torchrun.

``train(TrainConfig(...))`` builds the data (:mod:`pixelfly_lab.training.data`) and the model
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
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelfly_lab._checks import check_budget, check_int
from pixelfly_lab._version import __version__
from pixelfly_lab.outputs import check_output_fn, model_output
from pixelfly_lab.training.data import DATASETS, load_data
from pixelfly_lab.training.models import ATTENTION_NAMES, MODEL_NAMES, SIZES, SPARSIFY_WHERE, build_model, count_params
from pixelfly_lab.structure.patterns import PATTERN_NAMES
from pixelfly_lab.training.rank import weight_ranks

__all__ = ["TrainConfig", "TrainResult", "train", "lr_at", "task_loss", "add_arguments", "run"]

CHECKPOINT = "checkpoint.pt"
# Fields that may change when a run is resumed; every other field must match the checkpoint's.
_RUN_ONLY = ("out", "resume", "max_steps", "checkpoint_every", "progress", "device")


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in summary.json and the checkpoint)."""

    # --- what to train
    model: str = "mlp"            # 'mlp', 'mixer', 'vit' or 'gpt' (models.MODEL_NAMES)
    data: str = "digits"          # data.DATASETS: digits, mnist1d, listops, teacher, chars, cifar10
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


# ---------------------------------------------------------------- distributed and device


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    created: bool = False  # we initialised the process group, so we tear it down


def _setup(device: str) -> tuple[_Dist, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1; pick this rank's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
    dist_info = _Dist()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
            dist_info.created = True
        dist_info.rank, dist_info.world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return dist_info, torch.device("cuda", index)
    return dist_info, torch.device("cpu")


def _all_sum(tensor: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _fingerprint(model: torch.nn.Module) -> str:
    """sha256 of all parameters' bytes: equal on every rank when DDP kept them in sync."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


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
def _evaluate(model, x, y, task: str, d: _Dist, autocast, batch: int, output_fn=None) -> dict:
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
    loss_sum, correct, count = _all_sum(sums.to(x.device), d).cpu().tolist()
    if task == "lm":
        val = loss_sum / count
        return {"val_loss": val, "perplexity": math.exp(min(val, 50.0)), "val_token_accuracy": correct / count}
    if task == "regression":
        return {"test_mse": loss_sum / count}  # mean over examples and outputs
    return {"test_loss": loss_sum / count, "test_accuracy": correct / count}


# ---------------------------------------------------------------- checkpoints and files


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, config: TrainConfig) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                         "delete it or run without resume") from None
    saved = state.get("config", {})
    changed = {f.name for f in fields(config) if f.name not in _RUN_ONLY
               and saved.get(f.name) != getattr(config, f.name)}
    if changed:
        details = ", ".join(f"{n}: {saved.get(n)!r} -> {getattr(config, n)!r}" for n in sorted(changed))
        raise ValueError(f"cannot resume {path}: the config changed ({details})")
    return state


def _write_tables(out: Path, history: list, ranks: list) -> None:
    for name, rows in (("history.csv", history), ("ranks.csv", ranks)):
        _atomic_write(out / name, lambda f, rows=rows: f.write(pd.DataFrame(rows).to_csv(index=False).encode()))


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


def _batch_index(config: TrainConfig, n_train: int, step: int, steps_per_epoch: int, d: _Dist) -> torch.Tensor:
    """This rank's examples for ``step``: its share of the step's global batch in epoch order.

    The order of epoch e is a permutation seeded by (seed, e) alone, so that a resumed run, or a
    run on another number of ranks, sees the same global batches.
    """
    epoch, batch = divmod(step, steps_per_epoch)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
    return order[batch * config.batch_size:(batch + 1) * config.batch_size][d.rank::d.world]


def _summary(config, data, model, metrics, history, d, device, *, step, total_steps, seconds, step_seconds,
             examples) -> dict:
    fingerprints = [_fingerprint(model)]
    if d.world > 1:
        import torch.distributed as dist

        fingerprints = [None] * d.world
        dist.all_gather_object(fingerprints, _fingerprint(model))
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
    d, device = _setup(config.device)
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
            state = _load_checkpoint(out / CHECKPOINT, config)
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
                _atomic_write(out / CHECKPOINT, lambda f: torch.save(state, f))
                _write_tables(out, history, ranks)
            _barrier(d)

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
            loss_value = float(_all_sum(loss.detach().float().reshape(1), d)) / d.world  # mean over ranks
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
            _write_tables(out, history, ranks)
            _atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
        _barrier(d)
        return TrainResult(model, pd.DataFrame(history), pd.DataFrame(ranks), summary, out)
    finally:
        if d.created:
            import torch.distributed as dist

            dist.destroy_process_group()


# ---------------------------------------------------------------- command line and experiment


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
    names = {f.name for f in fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in names}
    options["data_options"] = dict(_parse_option(text) for text in args.data_options)
    result = train(TrainConfig(**options, amp=not args.no_amp, progress=not args.no_progress))
    if int(os.environ.get("RANK", "0")) == 0:
        keys = [k for k in ("test_accuracy", "test_loss", "val_loss", "perplexity", "test_mse", "density",
                            "seconds") if k in result.summary]
        print(", ".join(f"{k} {result.summary[k]:.4g}" for k in keys) + f" -> {result.out / 'summary.json'}")
    return 0

