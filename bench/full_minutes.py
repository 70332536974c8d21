"""Time a scaled part of one study's FULL config on ONE torch thread (how FULL_MINUTES are measured).

`reproduce --jobs N` runs each study in a worker of one thread, so each study's FULL_MINUTES is its
one-thread time alone (reproduce's CONTENTION adds the cost of a worker beside another, once, for all).
A whole FULL run is too long to measure per change, so this runs ``run()`` of one study on a scaled
FULL config (fewer seeds; see VARIANTS) and prints wall and CPU seconds (its own
and its child processes') with the load average; the study's config comment extrapolates to FULL.
On a shared machine the CPU seconds are the measure (the wall clock waits for other processes).

    OMP_NUM_THREADS=1 .venv/bin/python bench/full_minutes.py ntk s2t1 [--out times.jsonl]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def _tasks(full, seeds, chars_seeds):
    """The training study's FULL with every task's seeds replaced (the character GPT's apart)."""
    return replace(full, tasks=tuple(replace(t, seeds=chars_seeds if t.data == "chars" else seeds)
                                     for t in full.tasks))


# (study, label) -> scaled FULL config
VARIANTS = {
    ("ntk", "s2t1"): lambda F: replace(F, seeds=(0, 1), train_seeds=1),
    ("ntk", "s3t1"): lambda F: replace(F, seeds=(0, 1, 2), train_seeds=1),
    ("training", "m2c1"): lambda F: _tasks(F, (0, 1), (0,)),
    ("training", "m3c1"): lambda F: _tasks(F, (0, 1, 2), (0,)),
    ("theory", "s1"): lambda F: replace(F, ntk_seeds=1, sweep_seeds=1),
    ("theory", "s2"): lambda F: replace(F, ntk_seeds=2, sweep_seeds=2),
    ("attention", "s1"): lambda F: replace(F, seeds=1),
    ("attention", "s2"): lambda F: replace(F, seeds=2),
    ("long_range", "s1"): lambda F: replace(F, seeds=(0,)),
    ("long_range", "s2"): lambda F: replace(F, seeds=(0, 1)),
    ("speed", "grid1"): lambda F: replace(F, shapes=((1024, 4096),), models=(), butterfly_repeats=3),
    ("speed", "models"): lambda F: replace(F, shapes=((512, 2048),), budgets=(0.1,), block_sizes=(32,), repeats=1,
                                           claim_repeats=1, compare_allocator=False, butterfly_repeats=2),
    ("patterns", "full"): lambda F: F,
    # the measurement expressiveness.py cites: 1 network of each model (2 matrices each), 1 reading seed
    ("expressiveness", "n1s1"): lambda F: replace(F, seeds=1, networks=replace(F.networks, networks=1)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("label", help="the scaled config: " + ", ".join(f"{s} {v}" for s, v in VARIANTS))
    parser.add_argument("--out", default=None, help="append the JSON line to this file too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = importlib.import_module(f"pixelfly_lab.studies.{args.study}")
    config = VARIANTS[(args.study, args.label)](module.FULL)
    load, started, cpu = os.getloadavg(), time.perf_counter(), time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    error = None
    with tempfile.TemporaryDirectory() as folder:
        try:
            module.run(Path(folder), config, device="cpu")
        except Exception as err:  # noqa: BLE001 (a claim that needs more seeds may fail; the time still counts)
            error = f"{type(err).__name__}: {err}"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = dict(study=args.study, label=args.label, wall_s=round(time.perf_counter() - started, 1),
                  cpu_s=round(time.process_time() - cpu, 1),
                  children_cpu_s=round(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime, 1),
                  load_before=[round(x, 1) for x in load], load_after=[round(x, 1) for x in os.getloadavg()],
                  error=error, when=time.strftime("%Y-%m-%d %H:%M"))
    print(json.dumps(record))
    if args.out:
        with open(args.out, "a") as file:
            file.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
