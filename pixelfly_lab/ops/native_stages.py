"""The stages of the compiled sweep's float32 backward: :func:`backward_stages`.

A plan that gathers x (:mod:`pixelfly_lab.ops.torch_plan`) has its dX as a scatter table and its
blocks' gradients as grams (:mod:`pixelfly_lab.ops.native_linear`): group g's dX products read
gy[:, rows_g], and so do its grams. Cut into one stage per group, the sweep
(``csrc/blocksparse_cpu.cpp``) runs on each panel every stage's products and then its grams, so the
second read of those columns comes from the caches (measured in ``native_linear.STAGED``'s comment);
whether that is faster depends on the machine, so it is measured there once (:func:`staging_pays`).
Same products and grams in the same table order: on one thread and with the same tiles the results
are bit for bit those of the usual order (tests/test_native_linear.py; staged, the sweep runs one
tile per panel, which the usual order does not: dX's products then have more rows per call).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from pixelfly_lab.ops.torch_plan import Plan, row_bucket

__all__ = ["NO_STAGES", "MEASURE_MIN_ROWS", "MEASURE_MAX_ROWS", "backward_stages", "staging_pays"]

NO_STAGES = torch.empty(0, 4, dtype=torch.long)
_STAGES: dict[tuple, tuple] = {}
_PAYS: dict[tuple, bool] = {}
# staging_pays measures calls of at least MEASURE_MIN_ROWS rows, on at most MEASURE_MAX_ROWS of them
MEASURE_MIN_ROWS = 64
MEASURE_MAX_ROWS = 2048


def backward_stages(plan: Plan, kind: str, table: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """(groups + 2, 4) int64 rows (first product, end, first gram, end) of a backward's tables, one
    stage per group of the plan between what runs before (zeroed holes, a gather table's lead
    gz = gy U) and after (a scatter table's low-rank product, the other grams: dU, dV, dbias): the
    sweep runs each group's dX products and then its grams while the gy columns both read are in
    the caches. Found from the tables (a scatter row's A columns start at its group's first row, a
    gather row writes inside its group's columns; a gram row's accumulator is its group's); empty
    (the sweep's usual order) where the rows are not in that order, or the plan has no groups.
    Wrong stages could only be slower: the sweep refuses stages that would let a gram read an output
    of the products before they wrote it. Cached per pair of tables (the tables are cached per plan:
    :func:`pixelfly_lab.ops.native_linear.product_tables`); the cache forgets everything past 256
    pairs."""
    key = (id(table), id(grams))
    hit = _STAGES.get(key)
    if hit is not None and hit[0] is table and hit[1] is grams:   # the entry holds them: ids not reused
        return hit[2]
    if not plan.groups:
        return NO_STAGES
    if len(_STAGES) >= 256:
        _STAGES.clear()
    r0 = torch.tensor([g.r0 for g in plan.groups])
    r1 = torch.tensor([g.r1 for g in plan.groups])
    n = len(plan.groups)
    if kind == "scatter":   # A_0[:, rows_g]: the lead's part and the group's products
        mine = (table[:, 0] == 0) & (table[:, 2] > 0)
        at = table[:, 1].contiguous()
    else:                   # into C_0[:, rows_g]: the group's products, its zeros and its low-rank product
        mine = table[:, 9] == 0
        at = table[:, 7].contiguous()
    group = (torch.searchsorted(r0, at, right=True) - 1).clamp(min=0)
    mine &= (r0[group] <= at) & (at < r1[group])
    if kind == "scatter":
        mine &= r0[group] == at
    p = _starts(torch.where(mine, group, -1), n)
    g = _starts(torch.where(grams[:, 6] < n, grams[:, 6], -1), n)
    stages = NO_STAGES
    if p is not None and g is not None:
        rows = [(0, p[0], 0, g[0])] + [(p[i], p[i + 1], g[i], g[i + 1]) for i in range(n)]
        stages = torch.tensor(rows + [(p[n], len(table), g[n], len(grams))], dtype=torch.long)
    _STAGES[key] = (table, grams, stages)
    return stages


def _starts(ids: torch.Tensor, n: int) -> list[int] | None:
    """Where group 0, 1, ..., n - 1 begin and the last ends (n + 1 row indices), from each row's
    group (-1: none); None unless every group's rows are consecutive, in group order, with no
    other row between them."""
    rows = torch.nonzero(ids >= 0).flatten()
    if len(rows) == 0:
        return None
    span = ids[rows[0]:rows[-1] + 1]
    if not bool((span >= 0).all()) or not bool((span.diff() >= 0).all()):
        return None
    return (torch.searchsorted(span.contiguous(), torch.arange(n + 1)) + rows[0]).tolist()


def staging_pays(plan: Plan, rows: int, run: Callable[..., None], stages: torch.Tensor, config: tuple = ()) -> bool:
    """Whether the sweep runs this backward faster with ``stages`` than in the usual order, measured
    once per (plan, ``config`` (what else shapes the tables: rank, gradients needed, bias), rows
    bucket (:func:`~pixelfly_lab.ops.torch_plan.row_bucket`), threads) and cached for the life of the
    process: ``run(stages, m)`` and ``run(NO_STAGES, m)`` (the caller's sweep on the first m =
    min(rows, :data:`MEASURE_MAX_ROWS`) rows of the call's own operands; both write the same
    outputs, and the caller's own run after this leaves them right), three rounds, the order
    alternating, the best time of each. Which order pays depends on the CPU's caches: on a Xeon with
    AMX staging took 5-11% off the float32 backward, on an AMD EPYC (Zen 4) it added 5-12% at budget
    0.1 (``native_linear.STAGED``'s comment). Below :data:`MEASURE_MIN_ROWS` rows (timings of mostly
    fixed costs) and under ``torch.use_deterministic_algorithms`` (the two orders differ in rounding
    where their tiles differ) nothing is measured: staged, as before measuring existed."""
    if rows < MEASURE_MIN_ROWS or torch.are_deterministic_algorithms_enabled():
        return True
    key = (plan.signature, config, row_bucket(rows), torch.get_num_threads())
    if key not in _PAYS:
        m = min(rows, MEASURE_MAX_ROWS)
        best = {True: float("inf"), False: float("inf")}
        for order in ((True, False), (False, True), (True, False)):
            for staged in order:
                tick = time.perf_counter()
                run(stages if staged else NO_STAGES, m)
                best[staged] = min(best[staged], time.perf_counter() - tick)
        _PAYS[key] = best[True] < best[False]
    return _PAYS[key]
