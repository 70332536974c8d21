"""One timer for training steps: interleaved medians and the FLOP limit from the matmuls that run.

Everything in the toolkit that times whole training steps (the ``bench`` command's model table,
the studies' step speeds, the GPU training script) uses :func:`time_training_steps`: each model
runs ``steps`` timed steps per round, rounds rotate which model goes first so that a shared
machine's load drifts onto all of them alike, and medians are reported with the ratio to the
first model. The multiply-adds that actually run are counted once with a dispatch mode, so the
FLOP limit of a sparse model is measured, not assumed; the same mode times the matmuls of one
forward+backward per model and round, so a table also says at what fraction of the baseline's matmul
rate a model's matmuls ran, and what ratio its step could reach with its other work as it is
(``attainable_ratio``): a FLOP limit that the non-matmul work (optimizer, normalisations, softmax,
the loss) puts out of reach shows there, on the machine that runs it.
"""

from __future__ import annotations

import copy  # noqa: F401  (used by the docstring example)
import math
import statistics
import time
from collections.abc import Mapping

try:
    import resource   # POSIX only: the system time of a step
except ImportError:
    resource = None

import pandas as pd
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pixelfly_lab.ops.registry import registered_layout
from pixelfly_lab.threads import num_threads
from pixelfly_lab.outputs import check_output_fn, model_output
from pixelfly_lab.speed.machine import load_average

__all__ = ["time_training_steps"]


def _numel(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def _matmul_macs(name: str, args) -> int:
    """Multiply-adds of one aten matmul, attention or Pixelfly custom-op call; 0 for other ops.

    The custom ops of :mod:`pixelfly_lab.ops.matmul` run their GEMMs out of the dispatch mode's
    sight, so they count by formula: N rows times the weight's stored entries (blocks, U, V)
    per product, the products being y in the forward and dX, dS, dU, dV in the backward.
    """
    if name.startswith("sparse_lowrank_"):
        if not name.endswith("backward"):      # (x2, values, bias, u, v, key)
            return args[0].shape[0] * (_numel(args[1]) + _numel(args[3]) + _numel(args[4]))
        gy, _, values, u, v, _, _, needed = args[:8]   # needed: dx, dvalues, dbias, du, dv
        dx, dvalues, _, du, dv = (bool(n) for n in needed)
        per_row = ((dx + dvalues) * _numel(values) + (dx or dv) * _numel(u) + dx * _numel(v)
                   + du * _numel(u) + dv * _numel(v))
        return gy.shape[0] * per_row
    if name in ("mm", "addmm", "addmm_"):
        a, b = args[-2], args[-1]
        return a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm", "baddbmm", "baddbmm_"):
        a, b = args[-2], args[-1]
        return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name.startswith("_scaled_dot_product"):
        # forward (q, k, v, dropout, is_causal): QK^T and PV; backward (grad, q, k, v, out, ...,
        # is_causal): the flash recompute of QK^T and dV, dP, dQ, dK. Causal: half the pairs.
        backward = name.endswith("backward")
        q, k = args[1:3] if backward else args[0:2]
        flags = [a for a in args if isinstance(a, bool)]
        macs = (5 if backward else 2) * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        return macs // 2 if flags and flags[-1] else macs
    if name.startswith("block_attention_"):
        return _block_attention_macs(name.endswith("bwd"), args)
    return 0


def _block_attention_macs(backward: bool, args) -> int:
    """Multiply-adds of a ``pixelfly_lab::block_attention_fwd`` / ``_bwd`` call: per kept (query,
    key) pair of its registered layout (causal: j <= i only), D for Q K^T and Dv for P V in the
    forward; the backward recomputes the scores and forms dV, dP, dQ and dK (3 D + 2 Dv), as
    scaled dot-product attention is counted above."""
    q, v = (args[2], args[4]) if backward else (args[0], args[2])
    key, causal = (args[7], args[8]) if backward else (args[3], args[4])
    entry = registered_layout(key)
    b, layout = entry.block_size, entry.layout
    pairs = int(layout.sum()) * b * b
    if causal:   # above the diagonal nothing; a diagonal block keeps b (b + 1) / 2 pairs
        upper, diagonal = int(layout.triu(1).sum()), int(layout.diagonal().sum())
        pairs -= upper * b * b + diagonal * b * (b - 1) // 2
    d, dv = q.shape[-1], v.shape[-1]
    return q.shape[:-2].numel() * pairs * ((3 * d + 2 * dv) if backward else (d + dv))


class _MacCounter(TorchDispatchMode):
    """Counts the multiply-adds of the matmuls (and attention) that actually run; with a ``clock``
    (seconds, synchronised on a GPU) also the time spent in them (``seconds``): each call that does
    multiply-adds is timed whole, its own kernels and set-up included (a custom op's packing, say)."""

    def __init__(self, clock=None):
        super().__init__()
        self.macs, self.seconds, self._clock = 0, 0.0, clock

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        macs = _matmul_macs(func.overloadpacket.__name__, args)
        self.macs += macs
        if not macs or self._clock is None:
            return func(*args, **(kwargs or {}))
        tick = self._clock()
        out = func(*args, **(kwargs or {}))
        self.seconds += self._clock() - tick
        return out


def _os_counters() -> tuple[float, float]:
    """(this process's CPU seconds in the operating system, summed over its threads; its page
    faults, minor and major) so far, one reading; NaN where the platform does not say."""
    if resource is None:
        return math.nan, math.nan
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, float(usage.ru_minflt + usage.ru_majflt)


def _ratios_without_system(times: dict, system: dict, base: str, one_thread: bool) -> dict:
    """{model: the baseline's median of (wall - system) per step / the model's}: the step ratio with
    the operating system's time (page faults of fresh allocations) taken out of every step. NaN
    with several threads (their system time is summed over threads, wall time is not) and where a
    model's median is not positive."""
    own = _own_medians(times, system, one_thread=True)
    usable = one_thread and own[base] > 0
    return {name: own[base] / own[name] if usable and own[name] > 0 else float("nan") for name in times}


def _own_medians(times: dict, system: dict, one_thread: bool) -> dict:
    """{model: median seconds per step}: of wall - system time on one thread (as
    :func:`_ratios_without_system`), of wall time otherwise."""
    if one_thread:
        return {name: statistics.median(w - s for w, s in zip(times[name], system[name])) for name in times}
    return {name: statistics.median(t) for name, t in times.items()}


def _matmul_seconds(model: nn.Module, loss_of, cuda: bool) -> float:
    """Seconds spent in the matmuls (and attention) of one forward+backward of ``model``
    (:class:`_MacCounter` with a clock, synchronised on a GPU); the gradients are cleared before
    and after."""
    def clock():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
    model.zero_grad(set_to_none=True)
    with _MacCounter(clock) as meter:
        loss_of(model).backward()
    model.zero_grad(set_to_none=True)
    return meter.seconds


def _matmul_columns(steps: dict, matmul: dict, macs: dict, base: str, name: str) -> dict:
    """matmul_fraction: ``name``'s multiply-adds per matmul second over the baseline's (the rate of
    its matmuls as a fraction of the baseline's, as ``fraction_of_dense_rate`` is for one layer);
    attainable_ratio: the baseline's step over ``name``'s with its matmuls at the baseline's rate,
    its other work (optimizer, normalisations, softmax, loss) as measured, steps as
    :func:`_own_medians` gives them. NaN where a model has no matmul time or multiply-adds."""
    nan = float("nan")
    if min(matmul[base], matmul[name]) <= 0 or min(macs[base], macs[name]) <= 0:
        return {"matmul_fraction": nan, "attainable_ratio": nan}
    at_base_rate = matmul[base] * macs[name] / macs[base]
    rest = steps[name] - matmul[name] + at_base_rate
    return {"matmul_fraction": at_base_rate / matmul[name],
            "attainable_ratio": steps[base] / rest if rest > 0 else nan}


def _default_loss(output: torch.Tensor, target) -> torch.Tensor:
    """Cross-entropy on integer targets, else mean squared error (a zero target when None)."""
    if target is not None and not target.is_floating_point():
        return nn.functional.cross_entropy(output.flatten(0, -2).float(), target.flatten())
    return nn.functional.mse_loss(output.float(), torch.zeros_like(output) if target is None else target.float())


def time_training_steps(models, batch: torch.Tensor, target: torch.Tensor | None = None, *,
                        loss_fn=None, output_fn=None, optimizer=None, steps: int = 3, warmup: int = 1,
                        rounds: int = 3, threads: int | None = 1, autocast: torch.dtype | None = None) -> pd.DataFrame:
    """Median wall time of one training step of each model on one batch, interleaved.

    A step is forward, loss, backward and ``optimizer.step()``. Every model first runs
    ``warmup`` untimed steps; then ``rounds`` times, each model in turn (rotating which goes
    first) runs ``steps`` timed steps, so that a shared machine's load drifts onto all alike.
    The FLOP limit of a model is the baseline's matmul multiply-adds in one forward+backward
    over its own: the matmuls (``mm``, ``addmm``, ``bmm``, scaled dot-product attention) that
    actually run, counted once with a dispatch mode; elementwise work, normalisations and the
    optimizer are not counted, so the limit bounds what sparsifying the matmuls can give.

    Args:
        models: {name: nn.Module} (or a sequence, named 'model 0', 'model 1', ...); the first
            is the baseline, e.g. {'dense': model, 'pixelfly': sparsified_copy}. Trained in place.
        batch: the input, passed as ``model(batch)``.
        target: passed to ``loss_fn``; None with the default loss means a zero target.
        loss_fn: (output, target) -> scalar, ``output`` being the tensor the model returned (or
            its ``['logits']`` / ``.logits``, as a Hugging Face model returns them, or what
            ``output_fn`` picks); default cross-entropy for an integer target ((B,) classes or
            (B, T) next tokens), mean squared error otherwise.
        output_fn: optional callable (model's output) -> tensor handed to ``loss_fn``.
        optimizer: model -> torch.optim.Optimizer; default AdamW (lr 1e-4: the step's cost does
            not depend on it, and small steps keep the weights finite over many timed steps).
        steps, warmup, rounds: timed steps per round, untimed steps per model, rounds.
        threads: torch CPU threads while timing (restored after); None leaves them as they are.
        autocast: a dtype (``torch.bfloat16``) to run forward and loss under ``torch.autocast`` on
            the batch's device, as mixed-precision training does; None: no autocast.

    Returns:
        DataFrame, one row per model: model, step_ms (median), system_ms (median of the operating
        system's CPU time inside a step, summed over the process's threads; NaN where the platform
        does not report it) and page_faults (median per step): fresh allocations are page-faulted
        in; on one virtual machine the same GPT-2 step took 5.1-11.1 s, 0.5-6.4 s of it in the
        operating system with ~430 000 faults each time, ratio (baseline's median / this),
        ratio_without_system (one thread: the same with each step's operating-system time taken
        out, median of wall - system per model; what the steps' own work gives, where page faults
        swing the wall ratio; NaN with several threads, whose system time is summed over threads),
        flop_limit (baseline's multiply-adds / this), fraction_of_limit (ratio / flop_limit),
        matmul_ms (median over rounds of the time in the matmuls of one forward+backward, timed
        call by call in a pass of its own after each round's steps), matmul_fraction (this
        model's multiply-adds per matmul second over the baseline's: 1 for the baseline),
        attainable_ratio (the baseline's step over this one's with its matmuls at the baseline's
        rate and its other work as measured: the ratio sparse matmuls at full efficiency would
        give; steps without system time on one thread, wall time otherwise), gmacs (multiply-adds
        of one forward+backward, 1e9), params, threads, load_avg.

    Example:
        >>> dense = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        >>> table = time_training_steps({"dense": dense, "copy": copy.deepcopy(dense)},
        ...                             torch.randn(32, 64), steps=1, rounds=1)
        >>> list(table["model"])
        ['dense', 'copy']
    """
    if not isinstance(models, Mapping):
        models = {f"model {i}": model for i, model in enumerate(models)}
    if len(models) < 1 or not all(isinstance(m, nn.Module) for m in models.values()):
        raise TypeError("models must be a non-empty {name: nn.Module} mapping or sequence of nn.Modules")
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
    for name, value in (("steps", steps), ("rounds", rounds), ("warmup", warmup)):
        if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'warmup' else 1}, got {value!r}")
    check_output_fn(output_fn)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (output, target) -> scalar or None, got {type(loss_fn).__name__}")
    user_loss = loss_fn or _default_loss

    def loss_fn(output, target):
        return user_loss(model_output(output, output_fn), target)

    optimizers = {name: (optimizer or (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4)))(model)
                  for name, model in models.items()}
    cuda = batch.is_cuda
    if autocast is not None and not isinstance(autocast, torch.dtype):
        raise TypeError(f"autocast must be a torch.dtype or None, got {type(autocast).__name__}")

    def loss_of(model):
        if autocast is None:
            return loss_fn(model(batch), target)
        with torch.autocast(batch.device.type, dtype=autocast):
            return loss_fn(model(batch), target)

    def step(name):
        model, opt = models[name], optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        opt.step()

    previous = torch.get_num_threads()
    with num_threads(threads):
        macs = {}
        for name, model in models.items():
            with _MacCounter() as counter:
                loss_of(model).backward()
            model.zero_grad(set_to_none=True)
            macs[name] = counter.macs
            for _ in range(warmup):
                step(name)
        times = {name: [] for name in models}
        system = {name: [] for name in models}   # operating-system CPU time per step
        faults = {name: [] for name in models}
        matmul = {name: [] for name in models}   # seconds in the matmuls of one forward+backward
        names = list(models)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for _ in range(steps):
                    if cuda:
                        torch.cuda.synchronize()
                    tick, (kernel, faulted) = time.perf_counter(), _os_counters()
                    step(name)
                    if cuda:
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - tick)
                    kernel_after, faulted_after = _os_counters()
                    system[name].append(kernel_after - kernel)
                    faults[name].append(faulted_after - faulted)
                matmul[name].append(_matmul_seconds(models[name], loss_of, cuda))
    base = names[0]
    medians = {name: statistics.median(t) for name, t in times.items()}
    used_threads = threads if threads is not None else previous
    without_system = _ratios_without_system(times, system, base, used_threads == 1)
    own = _own_medians(times, system, used_threads == 1)
    matmul = {name: statistics.median(m) for name, m in matmul.items()}
    load = load_average()[0]
    rows = []
    for name, model in models.items():
        ratio, limit = medians[base] / medians[name], macs[base] / max(macs[name], 1)
        rows.append({"model": name, "step_ms": 1e3 * medians[name], "system_ms": 1e3 * statistics.median(system[name]),
                     "page_faults": statistics.median(faults[name]), "ratio": ratio,
                     "ratio_without_system": without_system[name],
                     "flop_limit": limit,
                     "fraction_of_limit": ratio / limit, "matmul_ms": 1e3 * matmul[name],
                     **_matmul_columns(own, matmul, macs, base, name), "gmacs": macs[name] / 1e9,
                     "params": sum(p.numel() for p in model.parameters()),
                     "threads": used_threads, "load_avg": load})
    return pd.DataFrame(rows)
