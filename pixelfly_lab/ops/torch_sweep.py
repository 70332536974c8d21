"""Row sweeps of the 'torch' path: rows of x in cache-sized chunks, shared among worker threads.

:func:`sweep` runs a body over row chunks (:data:`CHUNK_ROWS`, or :data:`CHUNK_ROWS_16BIT` for
16-bit inputs) on :func:`sweep_workers` Python threads that each run torch single-threaded (the
GEMMs release the GIL and overlap); :func:`torch_serial` keeps the work around a sweep
single-threaded too, so that OpenMP threads left spinning do not take a worker's core. Used by
:mod:`pixelfly_lab.ops.torch_grouped`; tested in tests/test_torch_kernels.py.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from pixelfly_lab.threads import num_threads

__all__ = ["CHUNK_ROWS", "CHUNK_ROWS_16BIT", "MIN_ROWS_PER_WORKER", "row_chunks", "torch_serial", "sweep_workers",
           "sweep"]

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


def row_chunks(n: int, parts: int = 1, limit: int | None = None):
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


_CALLER = threading.local()      # .threads: the caller's torch thread count inside torch_serial


@contextmanager
def torch_serial(like: torch.Tensor):
    """Run the enclosed grouped product with torch single-threaded; its sweeps still use the
    caller's thread count of workers (:func:`sweep_workers`).

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


def sweep_workers(n_rows: int, like: torch.Tensor) -> int:
    """Threads for a sweep over n_rows: torch's intra-op thread count (the caller's, inside
    :func:`torch_serial`), with enough rows each; one for tensors off the CPU (CUDA streams are
    per thread)."""
    if like.device.type != "cpu":
        return 1
    threads = getattr(_CALLER, "threads", None) or torch.get_num_threads()
    return max(1, min(threads, n_rows // MIN_ROWS_PER_WORKER))


def sweep(n_rows: int, body, workers: int, like: torch.Tensor | None = None) -> None:
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
    chunks = row_chunks(n_rows, workers, CHUNK_ROWS_16BIT if sixteen else None)
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
    with num_threads(1):
        for future in [pool.submit(work, k) for k in range(workers)]:
            future.result()

