"""The 'torch' backend of :mod:`pixelfly_lab.ops.matmul`: block-sparse matmul as grouped dense GEMMs.

y = x W^T + (x V) U^T + bias for W stored as its nonzero (b x b) blocks on a block layout
(storage convention in :mod:`pixelfly_lab.ops.matmul`), in plain PyTorch, fast on a CPU:

* a :class:`Plan` cuts the layout into groups of consecutive block rows that read the same
  block columns (a flat block butterfly has butterfly_size of them: every block row of a cell
  row shares its set); each group is one GEMM, its input columns gathered (a zero-copy view when
  they form one run, as in block-diagonal layouts) and its blocks packed as one dense matrix;
* the low-rank term rides in the same GEMMs as r extra input columns (z = x V) and r extra
  weight rows (U^T), so y is written once; in the backward, gy U and gy^T [z, 1] (dU and the
  bias gradient) ride in the block GEMMs as extra columns too, because GEMMs with only r = 32
  output columns run at about half the rate of the block GEMMs on a CPU;
* rows of x are swept in chunks of :data:`CHUNK_ROWS` so that gathered inputs, output slices and
  gradient slices stay in cache; the backward computes dX and the blocks' gradient in one sweep;
  with several torch threads the chunks are shared among worker threads that each run torch
  single-threaded (:func:`_sweep`), and the work around the sweep runs single-threaded too
  (:func:`_torch_serial`: OpenMP threads left spinning would take a worker's core);
* when in_features > out_features the plan groups the transposed layout instead (products are
  then added into y's column runs), so that the narrower side is the one gathered; a column's
  first product is written, later ones added (:attr:`Plan.scatter_pieces`), so no output or
  gradient buffer is zero-filled first;
* 16-bit inputs (bf16/fp16 under autocast: AMX/AVX512-BF16 GEMMs, several times faster than
  float32) take a *padded* plan (:func:`plan_for` with ``fill``): consecutive groups whose columns
  together form one run become one GEMM with zero blocks where a row stores none (for a flat
  block butterfly with two factors, 4 cell rows over 4 contiguous cells, 3/4 stored), so inputs
  are views and outputs are written once, for 1/3 more multiply-adds of the sparse part; and
  one row chunk per worker, so that the blocks' gradient is one GEMM accumulated in float32;
* outputs of 32 MB and more reuse retained buffers once nothing references them
  (:data:`POOL_MIN_BYTES`): glibc would map and page-fault them afresh on every call;
* narrow low-rank products run in the r-row orientation (:func:`_times_narrow`);
* where one dense GEMM on the materialised weight is faster (small widths, budgets near 0.5),
  the product takes it instead: :func:`dense_gemm_wins` measures both routes once per shape.

Reference: the Pixelfly paper's block-sparse kernels (Dao, Chen et al., ICLR 2022,
arXiv 2112.00029, Sec. 4) and block-sparse GEMM on GPUs (Gray, Radford, Kingma 2017); this CPU
formulation is ours. Tested against ``F.linear`` on the dense weight (tests/test_kernels.py).
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch

try:   # hides a measurement from dispatch modes (FLOP counters, profilers); private in torch since 2.0
    from torch.utils._python_dispatch import _disable_current_modes as _hidden_from_modes
except ImportError:   # a torch without it: measure in the open
    _hidden_from_modes = nullcontext

__all__ = ["Plan", "plan_for", "PAD_FILL", "CHUNK_ROWS", "CHUNK_ROWS_16BIT", "MIN_ROWS_PER_WORKER", "POOL_MIN_BYTES", "POOL_PER_SIZE", "release_buffers",
           "ROUTE_MIN_MACS", "ROUTE_MAX_WEIGHT", "dense_gemm_wins", "sparse_lowrank_forward",
           "sparse_lowrank_backward"]


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class _Group:
    """Consecutive plan rows [r0, r1) sharing the nonzero column ``runs``: one GEMM."""

    r0: int                                  # element offsets of the rows
    r1: int
    runs: tuple[tuple[int, int], ...]        # element column runs [c0, c1), in order
    vidx: torch.Tensor                       # long (rows_in_group, k) on the CPU: storage index of each
    #                                          block, -1 for a zero block of a padded group
    # vidx.flatten() on the plan's device (-1 as 0), copied once when the plan is built (a CPU ->
    # GPU copy per call would stall the host); the registry caches one plan per (layout, device)
    index: torch.Tensor
    # padded groups only (else None), on the plan's device: positions in vidx.flatten() of the
    # zero blocks, and of the stored ones with their storage indices
    zero_at: torch.Tensor | None = None
    stored_at: torch.Tensor | None = None
    stored_index: torch.Tensor | None = None

    def flat_index(self, device: torch.device) -> torch.Tensor:
        """vidx.flatten() on ``device`` (the plan's own copy when it is on that device)."""
        return self.index if self.index.device == torch.device(device) else self.index.to(device)

    @property
    def width(self) -> int:
        """Columns the group reads: k * b."""
        return sum(c1 - c0 for c0, c1 in self.runs)


@dataclass(frozen=True)
class Plan:
    """How the 'torch' path cuts a layout into GEMMs (cached per layout; see :func:`plan_for`).

    Attributes:
        transposed: False: rows are W's block rows, x is gathered, y written slice by slice
            ("gather" forward). True: rows are W's block columns (the plan of layout^T), x is read
            in slices and each product added into y's column runs ("scatter" forward).
        groups: maximal runs of consecutive plan rows with identical nonzero column sets.
        block_size: b.
        covers_once: the groups' column runs tile all columns exactly once (a block-diagonal
            layout), so "scatter" products are written instead of added onto zeros.
        columns: element columns of the gathered (or scattered) side.
    """

    transposed: bool
    groups: tuple[_Group, ...]
    block_size: int
    covers_once: bool
    columns: int = 0        # element columns of the gathered side (in_features, or out if transposed)

    def packed(self, values: torch.Tensor, g: _Group, transpose: bool = False) -> torch.Tensor:
        """M_g: the group's blocks as one dense (rows*b, k*b) matrix of W (of W^T if the plan is
        transposed); with ``transpose``, M_g^T as a contiguous (k*b, rows*b) matrix, the fast right
        operand of a GEMM."""
        n_rows, k = g.vidx.shape
        b = self.block_size
        blocks = values.index_select(0, g.flat_index(values.device))
        if g.zero_at is not None:   # a padded group: its absent blocks are zeros
            blocks.index_fill_(0, g.zero_at.to(values.device), 0)
        blocks = blocks.view(n_rows, k, b, b)
        if transpose:
            order, shape = ((1, 2, 0, 3) if self.transposed else (1, 3, 0, 2)), (k * b, n_rows * b)
        else:
            order, shape = ((0, 3, 1, 2) if self.transposed else (0, 2, 1, 3)), (n_rows * b, k * b)
        return blocks.permute(*order).reshape(shape)

    @cached_property
    def scatter_pieces(self) -> tuple[tuple[tuple[int, int, int, bool], ...], tuple[tuple[int, int], ...]]:
        """How the groups' products, taken in order, land on the columns they cover: per group
        (offset in the product, c0, c1, write) pieces, ``write`` where no earlier group covered
        those columns (so no output needs zeroing first, and the first product is copied, not
        added); and the column runs no group covers (to be zeroed).
        """
        b = self.block_size
        covered = [False] * (self.columns // b)
        per_group = []
        for g in self.groups:
            pieces, offset = [], 0
            for c0, c1 in g.runs:
                for blk in range(c0 // b, c1 // b):   # split the run where "covered" changes
                    write = not covered[blk]
                    covered[blk] = True
                    lo = offset + blk * b - c0
                    if pieces and pieces[-1][3] == write and pieces[-1][2] == blk * b:
                        pieces[-1] = (pieces[-1][0], pieces[-1][1], (blk + 1) * b, write)
                    else:
                        pieces.append((lo, blk * b, (blk + 1) * b, write))
                offset += c1 - c0
            per_group.append(tuple(pieces))
        holes = tuple((blk * b, (blk + 1) * b) for blk, done in enumerate(covered) if not done)
        return tuple(per_group), holes

    @cached_property
    def signature(self) -> tuple:
        """What identifies the plan's GEMMs (hashable): orientation, block size, groups' rows and runs."""
        return (self.transposed, self.block_size, tuple((g.r0, g.r1, g.runs) for g in self.groups))

    def store_grad(self, grad: torch.Tensor, grad_m: torch.Tensor, g: _Group) -> None:
        """Inverse of :meth:`packed` for a gradient: write M_g's gradient into grad (nnz, b, b)."""
        n_rows, k = g.vidx.shape
        b = self.block_size
        order = (0, 2, 3, 1) if self.transposed else (0, 2, 1, 3)
        blocks = grad_m.reshape(n_rows, b, k, b).permute(*order).reshape(n_rows * k, b, b)
        if g.zero_at is None:
            grad.index_copy_(0, g.flat_index(grad.device), blocks)
        else:                       # a padded group: only its stored blocks have a gradient
            grad.index_copy_(0, g.stored_index.to(grad.device), blocks.index_select(0, g.stored_at.to(grad.device)))


def _runs(cols: list[int]) -> list[tuple[int, int]]:
    """Sorted ints -> maximal runs [start, stop) of consecutive values."""
    runs: list[tuple[int, int]] = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def _padded_group(groups: list[_Group], storage: torch.Tensor, b: int, device: torch.device) -> _Group:
    """One group over consecutive groups' rows and the union of their columns (one run): the
    blocks no row stores are zeros."""
    r0, r1 = groups[0].r0, groups[-1].r1
    c0 = min(c for g in groups for c, _ in g.runs) // b
    c1 = max(c for g in groups for _, c in g.runs) // b
    vidx = storage[r0 // b:r1 // b, c0:c1].contiguous()
    flat = vidx.flatten()
    absent = flat < 0
    return _Group(r0, r1, ((c0 * b, c1 * b),), vidx, flat.clamp_min(0).to(device),
                  absent.nonzero().flatten().to(device), (~absent).nonzero().flatten().to(device),
                  flat[~absent].to(device))


def _pad_groups(groups: list[_Group], storage: torch.Tensor, b: int, fill: float, device) -> list[_Group]:
    """Merge runs of consecutive groups whose columns together form one contiguous run into
    one padded group, while at least ``fill`` of its blocks are stored (greedy, in order)."""
    merged, i = [], 0
    while i < len(groups):
        j = i + 1
        while j < len(groups):
            part = groups[i:j + 1]
            cols = sorted({c for g in part for c0, c1 in g.runs for c in range(c0 // b, c1 // b)})
            stored = sum(g.vidx.numel() for g in part)
            rows = (part[-1].r1 - part[0].r0) // b
            if not cols or cols[-1] - cols[0] + 1 != len(cols) or stored < fill * rows * len(cols):
                break
            j += 1
        merged.append(groups[i] if j == i + 1 else _padded_group(groups[i:j], storage, b, device))
        i = j
    return merged


def _build_plan(layout: torch.Tensor, block_size: int, transposed: bool, device: torch.device,
                fill: float | None = None) -> Plan:
    storage = torch.full(layout.shape, -1, dtype=torch.long)
    nz = layout.nonzero()
    storage[nz[:, 0], nz[:, 1]] = torch.arange(len(nz))
    if transposed:
        layout, storage = layout.T, storage.T
    b = block_size
    col_sets = [row.nonzero().flatten().tolist() for row in layout]
    groups, start = [], 0
    for i in range(1, len(col_sets) + 1):
        if i == len(col_sets) or col_sets[i] != col_sets[start]:
            cols = col_sets[start]
            vidx = storage[start:i][:, cols] if cols else torch.empty(i - start, 0, dtype=torch.long)
            runs = tuple((c0 * b, c1 * b) for c0, c1 in _runs(cols))
            groups.append(_Group(start * b, i * b, runs, vidx.contiguous(), vidx.flatten().to(device)))
            start = i
    if fill is not None:
        groups = _pad_groups(groups, storage, b, fill, device)
    runs = sorted(run for g in groups for run in g.runs)
    covers_once = (bool(runs) and runs[0][0] == 0 and runs[-1][1] == layout.shape[1] * b
                   and all(a[1] == c[0] for a, c in zip(runs, runs[1:])))
    return Plan(transposed, tuple(groups), block_size, covers_once, layout.shape[1] * b)


# Fill of a padded group (see plan_for's ``fill``): a flat block butterfly with two factors has
# groups of 4 block-row cells reading 4 contiguous cells, 3 of them stored in each row (0.75).
PAD_FILL = 0.75


def plan_for(layout: torch.Tensor, block_size: int, device: torch.device | str = "cpu",
             fill: float | None = None) -> Plan:
    """The GEMM plan of ``layout`` for the 'torch' path, its block indices on ``device``.

    With ``fill``, consecutive groups whose columns together form one contiguous run are merged
    into one padded group (zero blocks where a row stores none) as long as at least ``fill`` of
    its blocks are stored: fewer, wider GEMMs whose inputs are views (no gathering) and whose
    outputs are written once (no adds), at the price of the zero blocks' multiply-adds (1/3 more
    at :data:`PAD_FILL`). What 16-bit inputs take, whose GEMMs (AMX) are fast enough that the
    gathers and adds dominate.

    Built afresh on every call (index arithmetic on the host): the ops take the plan the layout
    registry caches per (layout, device) (:func:`pixelfly_lab.ops.registry.derived`, what
    ``'torch_plan'``), never this function per call.

    Orientation: gathering (or scattering) costs one pass over N * (sum over groups of the
    group's column width) elements, so the plan groups the rows of whichever of layout and
    layout^T makes that sum smaller; for a flat block butterfly this is the narrower side of the
    weight (the input side of an expanding 1024 -> 4096 layer, the output side of 4096 -> 1024).
    Fewer groups (fewer, larger GEMMs) break ties.
    """
    cpu_layout = layout.detach().to("cpu", torch.bool)
    device = torch.device(device)
    candidates = [_build_plan(cpu_layout, block_size, transposed, device, fill) for transposed in (False, True)]
    return min(candidates, key=lambda p: (sum(g.vidx.shape[1] for g in p.groups), len(p.groups)))


# ----------------------------------------------------------------------------- large outputs

# Outputs at least this large come from retained buffers. glibc serves every allocation above
# its largest mmap threshold (32 MB on 64-bit) with a fresh mmap and unmaps it on free, so each
# call of a layer would otherwise page-fault its whole output in again: ~25 ms for the 64 MB y of
# x (4096, 1024) -> 4096, a quarter of the sparse forward's time. Smaller blocks are recycled by
# glibc's heap already, and other allocators (jemalloc, tcmalloc) retain memory themselves.
POOL_MIN_BYTES = 32 * 2 ** 20
# Retained buffers per size: a layer's output and the gradient of its input, alive at once in a
# training step, each twice (an output still referenced while the next call runs). Buffers in
# use are never handed out again; when all are, a fresh (unretained) one is allocated.
POOL_PER_SIZE = 4

_POOL: dict[int, list[torch.UntypedStorage]] = {}
_POOL_LOCK = threading.Lock()


# references to a storage (tensors, views, autograd records); a private torch helper since 2.0
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(storage: torch.UntypedStorage) -> int:
    return _USE_COUNT(storage._cdata)


def _new_output(shape: tuple[int, ...], like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """An uninitialised (zeroed with ``zero``) tensor of ``shape`` with like's dtype and device.

    CPU tensors of at least :data:`POOL_MIN_BYTES` reuse a retained buffer nobody references
    any more (its storage's use count is the pool's alone): the caller owns the returned tensor
    exactly as a fresh one, since a buffer is only reused after every tensor, view and autograd
    record of it is gone. :func:`release_buffers` gives the retained memory back.
    """
    nbytes = like.element_size() * math.prod(shape)
    if like.device.type != "cpu" or nbytes < POOL_MIN_BYTES or _USE_COUNT is None:
        return like.new_zeros(shape) if zero else like.new_empty(shape)
    with _POOL_LOCK:
        buffers = _POOL.setdefault(nbytes, [])
        storage = next((s for s in buffers if _use_count(s) == 1), None)
        if storage is None:
            storage = torch.UntypedStorage(nbytes)
            if len(buffers) < POOL_PER_SIZE:
                buffers.append(storage)
        out = like.new_empty(0).set_(storage, 0, shape)
    return out.zero_() if zero else out


def release_buffers() -> int:
    """Drop the retained output buffers (see :data:`POOL_MIN_BYTES`); return the bytes released
    from the pool (memory still referenced by live tensors is freed when they are).

    Example:
        >>> release_buffers() >= 0
        True
    """
    with _POOL_LOCK:
        released = sum(s.nbytes() for buffers in _POOL.values() for s in buffers)
        _POOL.clear()
    return released


# ----------------------------------------------------------------------------- the fast path

# Rows of x handled per sweep over the groups. A chunk's gathered inputs, output slices and
# gradient slices then stay in cache between the copies and the GEMMs that use them; on a 2-core
# CPU this made the forward ~20% faster than whole-batch GEMMs (512 x 1024 floats = 2 MB of x).
CHUNK_ROWS = 512
# The same for 16-bit inputs: one chunk per worker. Their GEMMs (AMX/AVX512-BF16) are several
# times faster, so the per-chunk Python and elementwise work would dominate, and the blocks'
# gradient is then one GEMM over all rows, accumulated in float32 inside it rather than summed
# chunk by chunk in bfloat16 (measured, released configuration at 4096 rows on one AVX-512 core
# under autocast: 512-row chunks ~10% slower than 2048).
CHUNK_ROWS_16BIT = 1 << 30


def _chunks(n: int, parts: int = 1, limit: int | None = None):
    """Row slices of at most ``limit`` (default CHUNK_ROWS), of equal sizes (to within one) so
    that no chunk is a thin remainder (1568 rows are 4 x 392, not 3 x 512 + 32); a multiple of
    ``parts`` of them."""
    limit = limit or CHUNK_ROWS
    count = -(-max(1, -(-n // limit)) // parts) * parts
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


# Rows per worker below which a sweep stays on the calling thread.
MIN_ROWS_PER_WORKER = 256
_EXECUTOR: list = []            # one ThreadPoolExecutor, created on first use, grown as needed
_EXECUTOR_LOCK = threading.Lock()


_CALLER = threading.local()      # .threads: the caller's torch thread count inside _torch_serial


@contextmanager
def _torch_serial(like: torch.Tensor):
    """Run the enclosed grouped product with torch single-threaded; its sweeps still use the
    caller's thread count of workers (:func:`_workers`).

    Why: libgomp's threads spin for several ms after each parallel region (GOMP_SPINCOUNT, ~7 ms
    on the AMD EPYC here) before they sleep. An op run with 2 torch threads just before a sweep
    (the caller's, or our own packing and low-rank products) left one core spinning while both
    sweep workers wanted it: one worker's first chunk took 18 ms instead of 11 (x (4096, 1024) ->
    4096, block 32). Run single-threaded, the packing and narrow products before the sweep are
    about as fast (they scaled < 1.2x on 2 threads) and give a preceding op's spin time to end.
    """
    threads = torch.get_num_threads()
    if like.device.type != "cpu" or threads == 1 or getattr(_CALLER, "threads", None):
        yield
        return
    _CALLER.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _CALLER.threads = None


def _workers(n_rows: int, like: torch.Tensor) -> int:
    """Threads for a sweep over n_rows: torch's intra-op thread count (the caller's, inside
    :func:`_torch_serial`), with enough rows each; one for tensors off the CPU (CUDA streams are
    per thread)."""
    if like.device.type != "cpu":
        return 1
    threads = getattr(_CALLER, "threads", None) or torch.get_num_threads()
    return max(1, min(threads, n_rows // MIN_ROWS_PER_WORKER))


def _sweep(n_rows: int, body, workers: int, like: torch.Tensor | None = None) -> None:
    """body(rows, worker, first) over the row chunks, on ``workers`` threads (chunk k on worker
    k % workers; ``first``: the worker's first chunk). Chunks of :data:`CHUNK_ROWS` rows, or
    :data:`CHUNK_ROWS_16BIT` when ``like`` is a 16-bit tensor.

    With several threads the chunks are shared among Python threads that each run torch
    single-threaded: the GEMMs release the GIL and overlap. torch's own threading of each small
    op synchronises its threads hundreds of times per call, and stalls whenever one of them is
    descheduled: on a loaded 2-core machine two threads ran the grouped path 4-5x slower than
    one. torch's thread count is 1 while the sweep runs (process-wide) and restored after; the
    caller's grad and inference modes are carried into the workers.
    """
    sixteen = like is not None and like.dtype in (torch.bfloat16, torch.float16)
    chunks = _chunks(n_rows, workers, CHUNK_ROWS_16BIT if sixteen else None)
    if workers == 1:
        for i, rows in enumerate(chunks):
            body(rows, 0, i == 0)
        return
    with _EXECUTOR_LOCK:
        if not _EXECUTOR or _EXECUTOR[0]._max_workers < workers:
            _EXECUTOR[:] = [ThreadPoolExecutor(workers, thread_name_prefix="pixelfly-sweep")]
        pool = _EXECUTOR[0]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def work(k):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for i, rows in enumerate(chunks[k::workers]):
                body(rows, k, i == 0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for future in [pool.submit(work, k) for k in range(workers)]:
            future.result()
    finally:
        torch.set_num_threads(previous)


def _times_narrow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (N, K) @ b (K, r) for a narrow b, computed as (b^T a^T)^T: with r = 5-32 columns MKL's
    sgemm ran the r-row orientation 1-9x faster on one AVX-512 core (x2^T dY V: 23 -> 2.6 ms at
    r = 5). Returned contiguous (a copy of N * r values): its row slices are gathered later."""
    return (b.T @ a.T).T.contiguous()


def _gather(a: torch.Tensor, runs, extra: torch.Tensor | None) -> torch.Tensor:
    """a's columns over ``runs`` side by side (a view when one run and no extra), then ``extra``."""
    pieces = [a[:, c0:c1] for c0, c1 in runs]
    if extra is not None:
        pieces.append(extra)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _right_operands(values, plan: Plan, extra_w=None, transpose: bool = False):
    """Per group: M_g^T (transpose) or M_g, with extra_w's rows of the group appended (as rows
    of M_g^T, columns of M_g): the low-rank factor riding in the block GEMM. None for empty groups."""
    rights = []
    for g in plan.groups:
        parts = [plan.packed(values, g, transpose)] if g.runs else []
        if extra_w is not None:
            lr = extra_w[g.r0:g.r1]
            parts.append(lr.T if transpose else lr)
        rights.append(None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, 0 if transpose else 1))
    return rights


def _scatter_pieces(out_rows: torch.Tensor, product: torch.Tensor, pieces) -> None:
    """Write or add product's columns into out_rows by :attr:`Plan.scatter_pieces` of a group."""
    for offset, c0, c1, write in pieces:
        part = product[:, offset:offset + c1 - c0]
        if write:
            out_rows[:, c0:c1].copy_(part)
        else:
            out_rows[:, c0:c1].add_(part)


def _scatter(out_rows: torch.Tensor, product: torch.Tensor, runs, write: bool) -> int:
    """Add (or write) product's leading columns into out_rows' column runs; return columns used."""
    offset = 0
    for c0, c1 in runs:
        part = product[:, offset:offset + c1 - c0]
        if write:
            out_rows[:, c0:c1].copy_(part)
        else:
            out_rows[:, c0:c1].add_(part)
        offset += c1 - c0
    return offset


def _gather_forward(a, plan: Plan, rights, width: int, extra=None, bias=None, extra_w=None):
    """out[:, rows_g] = [a[:, runs_g], extra] @ rights[g] (+ bias[rows_g]), chunk by chunk.

    With ``extra_w`` (K, r), ``extra`` (N, r) is written chunk by chunk first as a @ extra_w, by
    the sweep's workers: computed beforehand it was the largest serial part of the forward on 2
    threads (4.5 of ~55 ms, x (4096, 1024) -> 4096, r = 32)."""
    out = _new_output((a.shape[0], width), a)

    def chunk(rows, *_):
        if extra_w is not None:
            extra[rows] = _times_narrow(a[rows], extra_w)
        a_c, extra_c = a[rows], None if extra is None else extra[rows]
        for g, right in zip(plan.groups, rights):
            target = out[rows, g.r0:g.r1]
            if right is None:   # block rows with nothing stored and no low-rank term
                target.copy_(bias[g.r0:g.r1].expand_as(target)) if bias is not None else target.zero_()
            elif bias is None:
                torch.mm(_gather(a_c, g.runs, extra_c), right, out=target)
            else:
                torch.addmm(bias[g.r0:g.r1], _gather(a_c, g.runs, extra_c), right, out=target)
    _sweep(a.shape[0], chunk, _workers(a.shape[0], a), a)
    return out


def _scatter_forward(a, plan: Plan, rights, width: int, init=None):
    """out[:, runs_g] += a[:, rows_g] @ rights[g] onto ``init`` (else zeros), chunk by chunk.

    Without ``init`` each column's first product is written, not added (no zeroing first)."""
    out = init if init is not None else _new_output((a.shape[0], width), a)
    pieces, holes = plan.scatter_pieces

    def chunk(rows, *_):
        if init is None:
            for c0, c1 in holes:
                out[rows, c0:c1] = 0
        for g, right, own in zip(plan.groups, rights, pieces):
            if right is not None:
                product = a[rows, g.r0:g.r1] @ right
                if init is None:
                    _scatter_pieces(out[rows], product, own)
                else:
                    _scatter(out[rows], product, g.runs, False)
    _sweep(a.shape[0], chunk, _workers(a.shape[0], a), a)
    return out


def _init_output(rows: int, width: int, z=None, w=None, bias=None):
    """(rows, width) = z @ w^T + bias, what scattered products are added onto (None: zeros)."""
    if z is None and bias is None:
        return None
    out = _new_output((rows, width), z if z is not None else bias)
    if z is None:
        return out.copy_(bias.expand(rows, width))
    return torch.addmm(bias, z, w.T, out=out) if bias is not None else torch.mm(z, w.T, out=out)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc = a @ b on a worker's first chunk (acc is uninitialised then), acc += a @ b after."""
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)


def _grad_accumulators(plan: Plan, like: torch.Tensor, extra_cols: int, written=None):
    """Per group a (k*b + extra_cols, rows*b) buffer for dM_g^T (and the extra columns):
    uninitialised where ``written(g)`` (the sweep's first chunk writes it), zero elsewhere.

    Transposed because (gathered side)^T @ (row side) ran ~15% faster than (row side)^T @
    (gathered side) in MKL's sgemm on an AVX-512 CPU, the row side being a strided slice."""
    return [(like.new_empty if written is None or written(g) else like.new_zeros)(g.width + extra_cols, g.r1 - g.r0)
            for g in plan.groups]


def _summed(accs):
    """The first worker's accumulators with the others' added in (None stays None)."""
    if accs is None:
        return None
    for other in accs[1:]:
        for total, part in zip(accs[0], other):
            total.add_(part)
    return accs[0]


def _unpack_grads(plan: Plan, values, grads, extra_cols: int):
    """Blocks' gradient (nnz, b, b) and the extra columns' (plan rows * b, extra_cols) or None."""
    grad_values = values.new_zeros(values.shape)
    grad_extra = grads[0].new_empty(plan.groups[-1].r1, extra_cols) if extra_cols else None
    for g, grad_mt in zip(plan.groups, grads):
        grad_m = grad_mt.T
        if g.runs:
            plan.store_grad(grad_values, grad_m[:, :g.width], g)
        if extra_cols:
            grad_extra[g.r0:g.r1] = grad_m[:, g.width:]
    return grad_values, grad_extra


def sparse_lowrank_forward(x2: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                           u: torch.Tensor | None, v: torch.Tensor | None, plan: Plan,
                           out_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = x2 W^T + (x2 V) U^T + bias with W block-sparse on ``plan``'s layout; no autograd.

    Grouped GEMMs (the module docstring), or one dense GEMM on the materialised weight where
    :func:`dense_gemm_wins` measured that faster for this shape.

    Args:
        x2: (N, in_features), contiguous rows.
        values: (nnz, b, b), W's blocks in row-major layout order (see :mod:`pixelfly_lab.ops.matmul`).
        bias: (out_features,) or None.
        u: (out_features, r) or None; v: (in_features, r) or None (both or neither).
        plan: :func:`plan_for` of the layout and block size.
        out_features: rows of W.

    Returns:
        (y (N, out_features), z = x2 V (N, r) or None): z is what :func:`sparse_lowrank_backward`
        needs besides the inputs.

    Example:
        >>> layout = torch.eye(2, dtype=torch.bool)
        >>> y, z = sparse_lowrank_forward(torch.randn(3, 8), torch.randn(2, 4, 4), None, None, None,
        ...                               plan_for(layout, 4), 8)
        >>> y.shape, z
        (torch.Size([3, 8]), None)
    """
    if dense_gemm_wins(plan, x2.shape[0], x2.shape[1], out_features, 0 if u is None else u.shape[1], x2):
        return _dense_forward(x2, values, bias, u, v, plan, out_features)
    with _torch_serial(x2):
        return _grouped_forward(x2, values, bias, u, v, plan, out_features)


def _grouped_forward(x2, values, bias, u, v, plan: Plan, out_features: int):
    if plan.transposed:
        z = _times_narrow(x2, v) if u is not None else None
        init = _init_output(x2.shape[0], out_features, z, u, bias)
        y = _scatter_forward(x2, plan, _right_operands(values, plan), out_features, init)
    else:   # z = x2 V is written chunk by chunk in the sweep
        z = x2.new_empty(x2.shape[0], u.shape[1]) if u is not None else None
        y = _gather_forward(x2, plan, _right_operands(values, plan, u, transpose=True), out_features, z, bias,
                            extra_w=v)
    return y, z


def sparse_lowrank_backward(gy: torch.Tensor, x2: torch.Tensor, values: torch.Tensor,
                            u: torch.Tensor | None, v: torch.Tensor | None, z: torch.Tensor | None,
                            plan: Plan, needs_input_grad: tuple[bool, bool, bool, bool, bool],
                            has_bias: bool):
    """Gradients of :func:`sparse_lowrank_forward` for the output gradient ``gy`` (N, out).

    dX = gy S + (gy U) V^T, dS_g = (row side)^T (gathered column side) on the layout's blocks,
    dU = gy^T z, dV = x2^T (gy U), dbias = gy^T 1.

    Args:
        gy: (N, out_features). x2, values, u, v: the forward's inputs; z: its second output.
        plan: the forward's plan.
        needs_input_grad: which of (x2, values, bias, u, v) need a gradient.
        has_bias: whether the forward had a bias.

    Returns:
        (grad_x2, grad_values, grad_bias, grad_u, grad_v), None where not needed; no two share
        storage, and none shares it with an input.
    """
    # the forward's route: decisions are cached for the life of the process, never evicted
    if dense_gemm_wins(plan, x2.shape[0], x2.shape[1], gy.shape[1], 0 if u is None else u.shape[1], x2):
        return _dense_backward(gy, x2, values, u, v, plan, needs_input_grad, has_bias)
    with _torch_serial(x2):
        return _grouped_backward(gy, x2, values, u, v, z, plan, needs_input_grad, has_bias)


def _grouped_backward(gy, x2, values, u, v, z, plan: Plan, needs_input_grad, has_bias: bool):
    gy = gy.contiguous()
    need_x, need_values, need_bias, need_u, need_v = needs_input_grad
    need_bias = need_bias and has_bias
    grad_x = grad_values = grad_bias = grad_u = grad_v = None
    # dX = gy S + (gy U) V^T, dU = gy^T z, dV = x^T (gy U), dbias = gy^T 1, dS_g = (row side)^T
    # (gathered column side). One sweep over row chunks computes dX and dS together, so each
    # chunk of gy is reused from cache; the low-rank factor on the plan's row side rides in the
    # group GEMMs as extra columns (r-column GEMMs alone run at half the efficiency).
    if plan.transposed:      # rows of the plan = W's block columns; gy is the gathered side
        gz = _times_narrow(gy, u) if u is not None and (need_x or need_v) else None
        lowrank_cols = 0 if gz is None else gz.shape[1]
        rights = _right_operands(values, plan, v if gz is not None else None, transpose=True) if need_x else None
        grad_x = _new_output(tuple(x2.shape), gy) if need_x else None
        workers = _workers(gy.shape[0], gy)
        # one set of accumulators per worker, summed after the sweep
        accs = [_grad_accumulators(plan, gy, lowrank_cols, lambda g: g.runs or gz is not None)
                for _ in range(workers)] if need_values or need_v else None

        def chunk(rows, k, first):
            gy_c, gz_c = gy[rows], None if gz is None else gz[rows]
            for i, g in enumerate(plan.groups):
                left = _gather(gy_c, g.runs, gz_c) if g.runs or gz_c is not None else None
                if need_x:
                    if left is None:
                        grad_x[rows, g.r0:g.r1] = 0
                    else:
                        torch.mm(left, rights[i], out=grad_x[rows, g.r0:g.r1])
                if accs is not None and left is not None:
                    _accumulate(accs[k][i], left.T, x2[rows, g.r0:g.r1], first)
        _sweep(gy.shape[0], chunk, workers, gy)
        grads = _summed(accs)
        if grads is not None:
            grad_values, grad_v = _unpack_grads(plan, values, grads, lowrank_cols)
            grad_v = grad_v if need_v else None
        if need_u:
            grad_u = (z.T @ gy).T
    else:                    # rows of the plan = W's block rows; x is the gathered side
        lowrank = u is not None and (need_x or need_v)
        rights = _right_operands(values, plan, u if lowrank else None) if need_x or lowrank else None
        pieces, holes = plan.scatter_pieces
        grad_x = _new_output(tuple(x2.shape), gy) if need_x else None   # every column written below
        gz = gy.new_empty(gy.shape[0], u.shape[1]) if lowrank else None  # every group has U's rows
        # with a low-rank term the bias gradient is one more column of the dS GEMMs: [z, 1]
        fold_bias = z is not None and need_bias
        if fold_bias:
            z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
        extra_cols = z.shape[1] if z is not None and (need_u or fold_bias) else 0
        workers = _workers(gy.shape[0], gy)
        accs = [_grad_accumulators(plan, gy, extra_cols, lambda g: g.runs or extra_cols)
                for _ in range(workers)] if need_values or extra_cols else None

        def chunk(rows, k, first):
            x_c, z_c = x2[rows], None if z is None else z[rows]
            if need_x:
                for c0, c1 in holes:
                    grad_x[rows, c0:c1] = 0
            for i, g in enumerate(plan.groups):
                gy_g = gy[rows, g.r0:g.r1]
                if rights is not None and rights[i] is not None:
                    product = gy_g @ rights[i]
                    if need_x:
                        _scatter_pieces(grad_x[rows], product, pieces[i])
                    if lowrank:   # group 0 writes this chunk's gz, the others add
                        gz[rows].copy_(product[:, g.width:]) if i == 0 else gz[rows].add_(product[:, g.width:])
                if accs is not None and (g.runs or extra_cols):
                    _accumulate(accs[k][i], _gather(x_c, g.runs, z_c if extra_cols else None).T, gy_g, first)
            if need_x and lowrank:   # gz of this chunk is complete; its rows of dX are in cache
                grad_x[rows].addmm_(gz[rows], v.T)
        _sweep(gy.shape[0], chunk, workers, gy)
        grads = _summed(accs)
        if grads is not None:
            grad_values, grad_z = _unpack_grads(plan, values, grads, extra_cols)
            if extra_cols:   # columns: U's gradient, then (folded) the bias's; copied apart, as
                # gradients that share storage may not leave a custom op (kernels.py registers one)
                grad_u = grad_z[:, :u.shape[1]].contiguous() if need_u else None
                grad_bias = grad_z[:, -1].contiguous() if fold_bias else None
        if need_v:
            grad_v = (gz.T @ x2).T
    if need_bias and grad_bias is None:
        grad_bias = gy.sum(0)
    return grad_x, grad_values, grad_bias, grad_u, grad_v


# ----------------------------------------------------------------------------- the dense route

def _dense_weight(values, plan: Plan, u, v, out_features: int, in_features: int) -> torch.Tensor:
    """W = S + U V^T as a dense (out, in) matrix, S scattered from the plan's groups."""
    shape = (in_features, out_features) if plan.transposed else (out_features, in_features)
    dense = values.new_zeros(shape)
    for g in plan.groups:
        if g.runs:
            _scatter(dense[g.r0:g.r1], plan.packed(values, g), g.runs, write=True)
    weight = dense.T if plan.transposed else dense
    return weight if u is None else torch.addmm(weight, u, v.T)


def _dense_forward(x2, values, bias, u, v, plan: Plan, out_features: int):
    """(y, z) of :func:`sparse_lowrank_forward` by one GEMM on the materialised weight."""
    y = torch.nn.functional.linear(x2, _dense_weight(values, plan, u, v, out_features, x2.shape[1]), bias)
    return y, None if u is None else _times_narrow(x2, v)


def _dense_backward(gy, x2, values, u, v, plan: Plan, needs_input_grad, has_bias: bool):
    """Gradients by dense GEMMs: dW = gy^T x2, then S's blocks, dU = dW V, dV = dW^T U."""
    need_x, need_values, need_bias, need_u, need_v = needs_input_grad
    grad_x = grad_values = grad_bias = grad_u = grad_v = None
    if need_x:
        grad_x = gy @ _dense_weight(values, plan, u, v, gy.shape[1], x2.shape[1])
    if need_values or need_u or need_v:
        grad_w = gy.T @ x2                                          # (out, in)
        if need_values:
            grad_values = values.new_zeros(values.shape)
            side = grad_w.T if plan.transposed else grad_w
            for g in plan.groups:
                if g.runs:
                    plan.store_grad(grad_values, _gather(side[g.r0:g.r1], g.runs, None), g)
        grad_u = grad_w @ v if need_u else None
        grad_v = grad_w.T @ u if need_v else None
    if need_bias and has_bias:
        grad_bias = gy.sum(0)
    return grad_x, grad_values, grad_bias, grad_u, grad_v


# Products of fewer multiply-adds than this take the grouped GEMMs unmeasured: the 'auto'
# dispatch sends them to the reference anyway, and an explicit backend='torch' on them is a
# request for the grouped path (its tests run there).
ROUTE_MIN_MACS = 2 ** 26
# Weights of at least this many entries (1024 x 4096) take the grouped GEMMs unmeasured: at
# budgets below 0.5 they won at every row count tried, and timing their dense GEMMs costs seconds.
ROUTE_MAX_WEIGHT = 2 ** 22
_ROUTES: dict[tuple, bool] = {}


def _row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two in [64, 4096]: decisions are made per bucket."""
    return min(max(64, 1 << max(rows - 1, 0).bit_length()), 4096)


def dense_gemm_wins(plan: Plan, rows: int, in_features: int, out_features: int, rank: int,
                    like: torch.Tensor) -> bool:
    """Whether one dense GEMM beats the grouped GEMMs for this product (measured once, cached).

    Measured on the CPU for products of at least :data:`ROUTE_MIN_MACS` multiply-adds with
    weights under :data:`ROUTE_MAX_WEIGHT` entries: forward+backward of both routes on random
    operands of this shape (rows rounded up to a power of two, at most 2048), three rounds
    interleaved, the best time of each; cached per (plan, rows bucket, rank, dtype, threads) for
    the life of the process (so a backward always takes its forward's route). Elsewhere, and
    on other devices, False.

    Args:
        plan: the layout's plan; rows: rows of x; in_features, out_features: W's shape;
        rank: r of the low-rank term (0 for none); like: a tensor with the dtype and device.

    Example:
        >>> plan = plan_for(torch.eye(4, dtype=torch.bool), 8)
        >>> dense_gemm_wins(plan, 16, 32, 32, 0, torch.zeros(1))   # too small to measure
        False
    """
    weight = in_features * out_features
    if (like.device.type != "cpu" or rows * weight < ROUTE_MIN_MACS or weight >= ROUTE_MAX_WEIGHT
            or like.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16)):
        return False
    key = (plan.signature, _row_bucket(rows), rank, like.dtype, torch.get_num_threads())
    if key not in _ROUTES:
        # at most 2048 rows timed: the grouped route's advantage grows with rows, and a
        # one-time measurement should cost well under a second on an idle core
        _ROUTES[key] = _measure_routes(plan, min(_row_bucket(rows), 2048), in_features, out_features, rank,
                                       like.dtype)
    return _ROUTES[key]


def _measure_routes(plan: Plan, rows: int, in_features: int, out_features: int, rank: int, dtype) -> bool:
    """True when the dense route's best forward+backward time beats the grouped route's."""
    gen = torch.Generator().manual_seed(0)
    nnz = sum(int((g.vidx >= 0).sum()) for g in plan.groups)
    b = plan.block_size

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    x2, gy, values, bias = rand(rows, in_features), rand(rows, out_features), rand(nnz, b, b), rand(out_features)
    u, v = (rand(out_features, rank), rand(in_features, rank)) if rank else (None, None)
    needs = (True, True, True, rank > 0, rank > 0)

    def grouped():   # threaded as in sparse_lowrank_forward/backward
        with _torch_serial(x2):
            _, z = _grouped_forward(x2, values, bias, u, v, plan, out_features)
            _grouped_backward(gy, x2, values, u, v, z, plan, needs, True)

    def dense():
        _dense_forward(x2, values, bias, u, v, plan, out_features)
        _dense_backward(gy, x2, values, u, v, plan, needs, True)

    best = {grouped: float("inf"), dense: float("inf")}
    # the measurement is no part of the caller's computation: hidden from dispatch modes such as
    # FLOP counters and profilers that are active around the call that triggered it
    with torch.no_grad(), _hidden_from_modes():
        for _ in range(3):
            for route in best:
                tick = time.perf_counter()
                route()
                best[route] = min(best[route], time.perf_counter() - tick)
    return best[dense] < best[grouped]
