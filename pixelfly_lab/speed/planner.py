"""Choose a per-layer Pixelfly plan for a model from this machine's measured layer times.

The Pixelfly workflow (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Figure 1) allocates a
budget to each matmul by its dimensions and type. :func:`plan_model` does it for *your* model
on *this* machine, against a target: a training-step speed-up, or a parameter budget.

1. One forward of the example batch records every linear-like layer's rows (tokens) and shape;
   the dense training step is timed once (:func:`pixelfly_lab.speed.timer.time_training_steps`).
2. Each distinct (out, in, rows) is timed forward+backward, interleaved: dense, and Pixelfly at
   every budget of a grid and every block size that divides it.
3. The step time of a plan is predicted as

       t_step(plan) = t_step(dense) - sum_layers t_dense(layer) + sum_layers t_plan(layer),

   i.e. whatever is not a planned matmul (attention, norms, embeddings, the optimizer) stays.
4. Greedy: all layers start dense; the move that saves the most time per parameter given up
   (one layer to a lower budget, at its fastest block size) is taken until the target holds.

:func:`apply_plan` then sparsifies the model with :func:`pixelfly_lab.nn.sparsification.sparsify`
(per-layer budgets as its {name: budget} mapping, one call per block size), and ``measure=True``
times the planned model against the dense one: the predicted and measured speed-ups side by side.

Example:
    >>> model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    >>> plan = plan_model(model, torch.randn(512, 256), speedup=1.5, rounds=1, measure=False)
    >>> list(plan.columns)[:4]
    ['name', 'shape', 'rows', 'pattern']
"""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from fnmatch import fnmatchcase

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pixelfly_lab._checks import check_budget, check_int
from pixelfly_lab.nn.layers import layer_from_pattern
from pixelfly_lab.nn.linear_like import linear_features, linear_kind, linear_layers, parameter_owners
from pixelfly_lab.nn.sparsification import AUTO_BLOCK_SIZES, sparsify
from pixelfly_lab.outputs import check_output_fn
from pixelfly_lab.speed.timer import time_training_steps
from pixelfly_lab.structure.patterns import make_pattern
from pixelfly_lab.threads import num_threads
from pixelfly_lab.speed.layer_speed import time_layer_call
from pixelfly_lab.speed.machine import load_average

__all__ = ["PLAN_BUDGETS", "plan_model", "apply_plan"]

# Budgets tried per layer (fractions of its dense parameters); dense (1.0) is always a choice.
PLAN_BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5)


def _layer_rows(model: nn.Module, batch: torch.Tensor, names: dict) -> dict:
    """name -> rows (input elements / in_features) of each listed layer in one forward."""
    rows, hooks = {}, []

    def record(name, in_f, inputs):
        rows.setdefault(name, inputs[0].numel() // in_f)   # the first call's rows

    for name, module in names.items():
        in_f = linear_features(module, linear_kind(module))[1]
        hooks.append(module.register_forward_hook(
            lambda m, inputs, out, name=name, in_f=in_f: record(name, in_f, inputs)))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def _candidates(out_f: int, in_f: int, budgets, block_sizes) -> list:
    """[(budget asked, block, Pattern)] of the Pixelfly plans that fit, dense excluded."""
    found = []
    for budget in budgets:
        for block in block_sizes:
            if out_f % block or in_f % block:
                continue
            try:
                pattern = make_pattern("pixelfly", out_f, in_f, budget, block_size=block)
            except ValueError:   # no plan at this budget and block
                continue
            if pattern.params < out_f * in_f:
                found.append((budget, block, pattern))
    return found


def _time_layers(cases: list, rounds: int, device, progress: bool) -> list:
    """Median ms of one forward+backward of each (layer, rows), interleaved over ``rounds``."""
    inputs = {}
    for _, rows, in_f, out_f in cases:
        if (rows, in_f, out_f) not in inputs:
            x = torch.randn(rows, in_f, device=device, requires_grad=True)
            inputs[rows, in_f, out_f] = x, torch.randn(rows, out_f, device=device)

    def once(layer, key):
        return 1e3 * time_layer_call(layer, *inputs[key])[0]   # wall seconds of forward+backward

    times = [[] for _ in cases]
    for layer, rows, in_f, out_f in cases:   # warm-up: first calls allocate and plan
        once(layer, (rows, in_f, out_f))
    for r in tqdm(range(rounds), desc="layer times", disable=not progress):
        order = list(range(len(cases)))
        for i in order[r % len(order):] + order[:r % len(order)]:
            layer, rows, in_f, out_f = cases[i]
            times[i].append(once(layer, (rows, in_f, out_f)))
    return [statistics.median(t) for t in times]


def _greedy(layers: list, options: dict, dense_step: float, speedup, budget) -> dict:
    """name -> chosen option index (options sorted by parameters, dense first).

    A parameter budget puts every layer at the largest grid budget within it. A speed-up then
    moves one layer at a time to its next faster option, taking the move that saves the most
    time per parameter given up, until the predicted step reaches the target.
    """
    chosen = {name: 0 for name in layers}
    if budget is not None:
        for name in layers:
            within = [k for k, o in enumerate(options[name]) if o["params"] <= budget * options[name][0]["params"]]
            chosen[name] = within[0] if within else len(options[name]) - 1   # dense when it has no option
    if speedup is None:
        return chosen
    matmul_dense = sum(options[name][0]["ms"] for name in layers)

    def step_ms():
        return dense_step - matmul_dense + sum(options[n][chosen[n]]["ms"] for n in layers)

    while dense_step / step_ms() < speedup:
        best, best_score = None, -math.inf
        for name in layers:
            now = options[name][chosen[name]]
            faster = [k for k in range(chosen[name] + 1, len(options[name])) if options[name][k]["ms"] < now["ms"]]
            if not faster:
                continue
            nxt = options[name][faster[0]]
            score = (now["ms"] - nxt["ms"]) / max(1, now["params"] - nxt["params"])
            if score > best_score:
                best, best_score = (name, faster[0]), score
        if best is None:
            break
        chosen[best[0]] = best[1]
    return chosen


def plan_model(model: nn.Module, example_batch: torch.Tensor, *, speedup: float | None = None,
               budget: float | None = None, target: torch.Tensor | None = None, loss_fn=None, output_fn=None,
               include=None, budgets=PLAN_BUDGETS, block_sizes=AUTO_BLOCK_SIZES[:3], rounds: int = 3,
               threads: int | None = 1, measure: bool = True, steps: int = 1,
               progress: bool | None = None) -> pd.DataFrame:
    """A per-layer Pixelfly plan (budget, block size) reaching a step speed-up or a parameter budget.

    Args:
        model: the dense model (left untouched; ``measure`` times a sparsified deep copy).
        example_batch: one input batch, as ``model(example_batch)``; its shapes set each layer's rows.
        speedup: target training-step speed-up over dense (e.g. 1.5), predicted from layer times.
        budget: target parameter budget of the planned layers, a fraction in (0, 1] of their
            dense weight parameters. At least one of ``speedup`` and ``budget``; with both, both hold.
        target, loss_fn, output_fn: the step's loss, as :func:`~pixelfly_lab.speed.timer.time_training_steps`
            takes them (models returning ``.logits`` included).
        include: fnmatch glob(s) of the layer names to plan (default: every nn.Linear / Conv1D
            whose weight no other module shares).
        budgets: per-layer budgets tried; block_sizes: block edges tried (those dividing the layer).
        rounds: interleaved timing rounds per layer case (medians).
        threads: torch CPU threads while timing (None: as they are).
        measure: also sparsify a copy with :func:`apply_plan` and time it against the dense model.
        steps: timed steps per round of the whole-model timings.
        progress: progress bars (None: on a terminal).

    Returns:
        DataFrame, one row per planned layer: name, shape (out, in), rows, pattern ('pixelfly' or
        'dense'), budget (exact, of the layer's weight), budget_asked (the grid value planned at),
        block_size, params_before, params_after,
        dense_ms, planned_ms (forward+backward of the layer at its rows), note (why a layer has
        no sparse option: it stays dense and the budget target counts only the others). ``attrs``: dense_step_ms,
        predicted_step_ms, predicted_speedup, measured_speedup (NaN unless ``measure``),
        measured_ratio_of_predicted, budget (planned params / dense params of the layers),
        reached (the target holds in the prediction), target, threads, load_avg.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_batch, torch.Tensor):
        raise TypeError(f"example_batch must be a torch.Tensor, got {type(example_batch).__name__}")
    if speedup is None and budget is None:
        raise ValueError("give speedup (a step speed-up > 1) or budget (a parameter fraction in (0, 1]), or both")
    if speedup is not None and (isinstance(speedup, bool) or not isinstance(speedup, (int, float))
                                or not speedup >= 1):
        raise ValueError(f"speedup must be a number >= 1, got {speedup!r}")
    if budget is not None:
        check_budget(budget)
    check_int("rounds", rounds)
    check_int("steps", steps)
    check_output_fn(output_fn)
    budgets = tuple(budgets)
    for value in budgets:
        check_budget(value)
    for value in block_sizes:
        check_int("block_sizes", value)
    globs = [include] if isinstance(include, str) else include
    owners = parameter_owners(model)
    layers = {name: module for name, module in linear_layers(model)
              if linear_kind(module) in ("linear", "conv1d") and len(owners[id(module.weight)]) == 1
              and (globs is None or any(fnmatchcase(name, g) for g in globs))}
    if not layers:
        raise ValueError("model has no linear layer to plan (nn.Linear or Conv1D, weight not shared"
                         + (f", matching {globs}" if globs else "") + ")")
    device = example_batch.device
    rows = _layer_rows(model, example_batch, layers)
    layers = {name: module for name, module in layers.items() if name in rows}   # those the forward ran
    shapes = {name: linear_features(module, linear_kind(module)) for name, module in layers.items()}
    with num_threads(threads):
        keys = sorted({(shapes[n][0], shapes[n][1], rows[n]) for n in layers})
        cases, labels = [], []
        for out_f, in_f, n_rows in keys:
            dense = nn.Linear(in_f, out_f, device=device)
            cases.append((dense, n_rows, in_f, out_f))
            labels.append(((out_f, in_f, n_rows), "dense", 1.0, 0, out_f * in_f))
            for asked, block, pattern in _candidates(out_f, in_f, budgets, block_sizes):
                layer = layer_from_pattern(pattern, device=device)
                cases.append((layer, n_rows, in_f, out_f))
                labels.append(((out_f, in_f, n_rows), "pixelfly", asked, block, pattern.params))
        times = _time_layers(cases, rounds, device, progress if progress is not None else len(cases) > 20)
    options_by_key = {}
    for (key, pattern, asked, block, params), ms in zip(labels, times):
        options_by_key.setdefault(key, []).append(dict(pattern=pattern, asked=asked, block_size=block,
                                                      params=params, ms=ms))
    for key, opts in options_by_key.items():   # per budget keep the fastest block; dense first
        best = {}
        for o in opts[1:]:
            if o["asked"] not in best or o["ms"] < best[o["asked"]]["ms"]:
                best[o["asked"]] = o
        options_by_key[key] = [opts[0]] + sorted(best.values(), key=lambda o: -o["params"])
    options = {n: options_by_key[(shapes[n][0], shapes[n][1], rows[n])] for n in layers}
    dense_table = time_training_steps({"dense": model}, example_batch, target, loss_fn=loss_fn, output_fn=output_fn,
                                      steps=steps, rounds=rounds, threads=threads)
    dense_step = float(dense_table["step_ms"].iloc[0])
    chosen = _greedy(list(layers), options, dense_step, speedup, budget)
    table = pd.DataFrame([dict(name=n, shape=shapes[n], rows=rows[n], pattern=options[n][k]["pattern"],
                               budget=options[n][k]["params"] / options[n][0]["params"],
                               budget_asked=options[n][k]["asked"], block_size=options[n][k]["block_size"] or None,
                               params_before=options[n][0]["params"], params_after=options[n][k]["params"],
                               dense_ms=options[n][0]["ms"], planned_ms=options[n][k]["ms"],
                               note="" if len(options[n]) > 1 else "no Pixelfly plan at these budgets and block sizes")
                          for n, k in chosen.items()])
    predicted = dense_step - table["dense_ms"].sum() + table["planned_ms"].sum()
    plannable = table[table["note"] == ""]
    reached = ((speedup is None or dense_step / predicted >= speedup)
               and (budget is None or plannable["params_after"].sum() <= budget * plannable["params_before"].sum()))
    if not reached:
        warnings.warn(f"plan_model: the target (speedup={speedup}, budget={budget}) is out of reach with budgets "
                      f"{budgets} and block sizes {tuple(block_sizes)}; the plan is the closest found "
                      f"(predicted speed-up {dense_step / predicted:.2f})", UserWarning, stacklevel=2)
    table.attrs.update(dense_step_ms=dense_step, predicted_step_ms=predicted, predicted_speedup=dense_step / predicted,
                       measured_speedup=float("nan"), measured_ratio_of_predicted=float("nan"),
                       budget=float(table["params_after"].sum() / table["params_before"].sum()), reached=reached,
                       target={"speedup": speedup, "budget": budget},
                       threads=threads if threads is not None else torch.get_num_threads(),
                       load_avg=load_average()[0])
    if measure:
        planned = copy.deepcopy(model)
        apply_plan(planned, table)
        measured = time_training_steps({"dense": model, "planned": planned}, example_batch, target, loss_fn=loss_fn,
                                       output_fn=output_fn, steps=steps, rounds=rounds, threads=threads)
        ratio = float(measured["ratio"].iloc[1])
        table.attrs.update(measured_speedup=ratio, measured_ratio_of_predicted=ratio / table.attrs["predicted_speedup"],
                           measured=measured)
    return table


def apply_plan(model: nn.Module, plan: pd.DataFrame, **options) -> pd.DataFrame:
    """Sparsify ``model`` in place as ``plan`` (from :func:`plan_model`) says.

    One :func:`~pixelfly_lab.nn.sparsification.sparsify` call per block size, each with its
    layers' budgets as a {name: budget} mapping; layers planned 'dense' are left as they are.

    Args:
        model: the model the plan was made for (or a copy of it).
        plan: :func:`plan_model`'s DataFrame (columns name, pattern, budget_asked, block_size).
        **options: passed to sparsify (``init``, ``seed``, ``backend``, ...).

    Returns:
        The sparsify reports concatenated, one row per planned sparse layer.
    """
    if not isinstance(plan, pd.DataFrame) or not {"name", "pattern", "budget_asked", "block_size"} <= set(plan.columns):
        raise TypeError("plan must be plan_model's DataFrame (columns name, pattern, budget_asked, block_size)")
    sparse = plan[plan["pattern"] == "pixelfly"]
    reports = []
    for block, group in sparse.groupby("block_size"):
        # the budget each layer was planned at, at its block: make_pattern rebuilds the same pattern
        budgets = dict(zip(group["name"], map(float, group["budget_asked"])))
        reports.append(sparsify(model, "pixelfly", budget=budgets, include=list(budgets), block_size=int(block),
                                **options))
    if not reports:
        return pd.DataFrame()
    return pd.concat([r[r["name"].isin(sparse["name"])] for r in reports], ignore_index=True)
