"""One timer for training steps: interleaved medians and the FLOP limit from the matmuls that run.

Everything in the toolkit that times whole training steps (the ``bench`` command's model table,
the studies' step speeds, the GPU training script) uses :func:`time_training_steps`: each model
runs ``steps`` timed steps per round, rounds rotate which model goes first so that a shared
machine's load drifts onto all of them alike, and medians are reported with the ratio to the
first model. The multiply-adds that actually run are counted once with a dispatch mode, so the
FLOP limit of a sparse model is measured, not assumed. On request (``time_matmuls``) the same mode
times the matmuls of one forward+backward per model and round, so a table also says at what
fraction of the baseline's matmul rate the toolkit's sparse ops ran inside the model, and what ratio
the step could reach with them at that rate and the rest of it as it is (``attainable_ratio``): the
part of a FLOP limit that the non-matmul work (optimizer, normalisations, softmax, the loss) puts
out of reach of faster sparse kernels shows there, on the machine that runs it.
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
    """Counts the multiply-adds of the matmuls (and attention) that actually run (``macs``; those of
    the toolkit's own ops, namespace ``pixelfly_lab``, also in ``own_macs``); with a ``clock`` (seconds)
    also the time spent in them (``seconds``, ``own_seconds``): each call that does multiply-adds is
    timed whole, its own kernels and set-up included (a custom op's packing, say); nothing inside a
    call is seen (or timed) again."""

    def __init__(self, clock=None):
        super().__init__()
        self.macs, self.own_macs, self.seconds, self.own_seconds, self._clock = 0, 0, 0.0, 0.0, clock

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        macs = _matmul_macs(func.overloadpacket.__name__, args)
        own = func.namespace == "pixelfly_lab"
        self.macs += macs
        self.own_macs += macs if own else 0
        if not macs or self._clock is None:
            return func(*args, **(kwargs or {}))
        tick = self._clock()
        out = func(*args, **(kwargs or {}))
        elapsed = self._clock() - tick
        self.seconds += elapsed
        self.own_seconds += elapsed if own else 0.0
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
    own = _own_medians(times, system, one_thread=True)   # wall medians where system time is unknown:
    usable = one_thread and _system_known(system) and own[base] > 0   # then NaN here
    return {name: own[base] / own[name] if usable and own[name] > 0 else float("nan") for name in times}


def _own_medians(times: dict, system: dict, one_thread: bool) -> dict:
    """{model: median seconds per step}: of wall - system time on one thread (as
    :func:`_ratios_without_system`), of wall time otherwise or where the platform does not report
    system time (NaN)."""
    if one_thread and _system_known(system):
        return {name: statistics.median(w - s for w, s in zip(times[name], system[name])) for name in times}
    return {name: statistics.median(t) for name, t in times.items()}


def _system_known(system: dict) -> bool:
    """Whether the platform reported the steps' system time (no NaN among them)."""
    return not any(math.isnan(s) for per_step in system.values() for s in per_step)


def _thread_clock():
    """Seconds of wall time less this thread's operating-system time (Linux; plain wall time
    elsewhere): a matmul's page faults (the first write into a fresh output) are left out, as the
    steps' system time is on one thread."""
    if resource is None or not hasattr(resource, "RUSAGE_THREAD"):
        return time.perf_counter
    return lambda: time.perf_counter() - resource.getrusage(resource.RUSAGE_THREAD).ru_stime


def _matmul_pass(model: nn.Module, loss_of, one_thread: bool) -> _MacCounter:
    """One forward+backward of ``model`` under a timing :class:`_MacCounter` (:func:`_thread_clock`
    on one thread, wall time otherwise); the gradients are cleared before and after."""
    model.zero_grad(set_to_none=True)
    with _MacCounter(_thread_clock() if one_thread else time.perf_counter) as meter:
        loss_of(model).backward()
    model.zero_grad(set_to_none=True)
    return meter


def _matmul_columns(steps: dict, passes: dict, base: str, name: str) -> dict:
    """The matmul columns of ``name`` from its steps (:func:`_own_medians`) and its timing passes
    (:func:`_matmul_pass`, medians over them): matmul_ms and other_ms (the step less it); sparse_ms
    and sparse_fraction (the toolkit's own ops: their multiply-adds per second over the baseline's
    average matmul rate, all its matmuls together: a layer's ``fraction_of_dense_rate`` divides by
    nn.Linear at the same shape instead); attainable_ratio (the baseline's
    step over ``name``'s with its own ops at the baseline's matmul rate, everything else as
    measured). NaN without passes (or where a rate has no time); the baseline's ratio is 1."""
    nan = float("nan")
    if not passes[name] or not passes[base]:
        return dict.fromkeys(("matmul_ms", "other_ms", "sparse_ms", "sparse_fraction", "attainable_ratio"), nan)

    def median(model, what):
        return statistics.median(getattr(m, what) for m in passes[model])
    matmul, sparse, base_matmul = median(name, "seconds"), median(name, "own_seconds"), median(base, "seconds")
    own_macs, base_macs = passes[name][0].own_macs, passes[base][0].macs
    rate = base_macs / base_matmul if base_matmul > 0 else nan          # the baseline's multiply-adds per second
    at_rate = own_macs / rate if own_macs else 0.0
    rest = steps[name] - sparse + at_rate
    return {"matmul_ms": 1e3 * matmul, "other_ms": 1e3 * (steps[name] - matmul), "sparse_ms": 1e3 * sparse,
            "sparse_fraction": at_rate / sparse if own_macs and sparse > 0 else nan,
            "attainable_ratio": 1.0 if name == base else steps[base] / rest if rest > 0 else nan}


def _default_loss(output: torch.Tensor, target) -> torch.Tensor:
    """Cross-entropy on integer targets, else mean squared error (a zero target when None)."""
    if target is not None and not target.is_floating_point():
        return nn.functional.cross_entropy(output.flatten(0, -2).float(), target.flatten())
    return nn.functional.mse_loss(output.float(), torch.zeros_like(output) if target is None else target.float())


def time_training_steps(models, batch: torch.Tensor, target: torch.Tensor | None = None, *,
                        loss_fn=None, output_fn=None, optimizer=None, steps: int = 3, warmup: int = 1,
                        rounds: int = 3, threads: int | None = 1, autocast: torch.dtype | None = None,
                        time_matmuls: bool = False) -> pd.DataFrame:
    """Median wall time of one training step of each model on one batch, interleaved.

    A step is forward, loss, backward and ``optimizer.step()``. Every model first runs
    ``warmup`` untimed steps; then ``rounds`` times, each model in turn (rotating which goes
    first) runs ``steps`` timed steps, so that a shared machine's load drifts onto all alike.
    The FLOP limit of a model is the baseline's matmul multiply-adds in one forward+backward
    over its own: the matmuls (``mm``, ``addmm``, ``bmm``, scaled dot-product attention, the
    toolkit's block-sparse layers and attention) that actually run, counted once with a dispatch
    mode; elementwise work, normalisations and the optimizer are not counted, so the limit bounds
    what sparsifying the matmuls can give. With ``time_matmuls`` each round also runs one
    forward+backward per model with every matmul call timed on its own (CPU only): what the
    toolkit's sparse ops reach of the baseline's matmul rate, and the ratio the step would reach
    with them at that rate and everything else as it is.

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
        time_matmuls: also time the matmuls (one more forward+backward per model and round; the
            columns below are NaN without it, and on a GPU).

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
        with ``time_matmuls`` (medians over rounds; on one thread without the operating
        system's time, as the steps): matmul_ms (the matmuls of one forward+backward) and
        other_ms (the step less them: optimizer, normalisations, softmax, loss), sparse_ms (the
        toolkit's own ops among them: Pixelfly layers, block-sparse attention) and
        sparse_fraction (their multiply-adds per second over the baseline's average matmul rate, all
        its matmuls together), attainable_ratio (the baseline's step over
        this one's with its own ops at the baseline's matmul rate, all else as measured: what
        faster sparse kernels alone could give); gmacs (multiply-adds of one forward+backward,
        1e9), params, threads, load_avg.

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
    if not isinstance(time_matmuls, bool):
        raise TypeError(f"time_matmuls must be a bool, got {type(time_matmuls).__name__}")
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
        passes = {name: [] for name in models}   # a timed forward+backward per round (time_matmuls)
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
                if time_matmuls and not cuda:
                    passes[name].append(_matmul_pass(models[name], loss_of, torch.get_num_threads() == 1))
    base = names[0]
    medians = {name: statistics.median(t) for name, t in times.items()}
    used_threads = threads if threads is not None else previous
    without_system = _ratios_without_system(times, system, base, used_threads == 1)
    own = _own_medians(times, system, used_threads == 1)
    load = load_average()[0]
    rows = []
    for name, model in models.items():
        ratio, limit = medians[base] / medians[name], macs[base] / max(macs[name], 1)
        rows.append({"model": name, "step_ms": 1e3 * medians[name], "system_ms": 1e3 * statistics.median(system[name]),
                     "page_faults": statistics.median(faults[name]), "ratio": ratio,
                     "ratio_without_system": without_system[name],
                     "flop_limit": limit,
                     "fraction_of_limit": ratio / limit, **_matmul_columns(own, passes, base, name),
                     "gmacs": macs[name] / 1e9,
                     "params": sum(p.numel() for p in model.parameters()),
                     "threads": used_threads, "load_avg": load})
    return pd.DataFrame(rows)
