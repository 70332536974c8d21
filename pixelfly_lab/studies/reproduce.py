"""``python -m pixelfly_lab reproduce``: every study, its figures and tables, and a report.

Each study (see :mod:`pixelfly_lab.studies`) writes into ``OUT/<name>/`` (figures as PNG and
PDF, tables as CSV, ``claims.json`` with its claims, its config and the preset). Results are
written atomically: a study runs in a temporary folder that replaces its final folder only when
it succeeds, so a crash never leaves half a result and never destroys the previous one. A failed
study is recorded in the report and the others still run; a study module that cannot be
imported is a failure too, never a skip. A rerun skips studies whose results are up to date
(same package source, same preset and device) unless ``--force``. ``report.md`` and
``report.html`` list the paper's claims first ("k of n paper claims held"; the verdicts in the words of
:func:`pixelfly_lab.studies.claims.verdict_word`, as ``verdicts.claims_table`` and the notebooks say them),
then each study's figures beside its claims, checks and readings, with the measured numbers and the verdicts.
The paper's claims come with their statistics (effect, confidence interval, seeds, and for an
undecided one the seeds that would decide it); a family of claims counts once, its members listed;
the toolkit's speed targets (kind 'target') have their own section, never counted as failures.

``--jobs N`` (default 2 for ``--preset full`` on the CPU, 1 otherwise: on a GPU the studies would share it) runs
the studies in N worker processes (a fresh ``python -c`` interpreter per study started with ``subprocess``, each
on one torch thread with ``OMP_NUM_THREADS=1``), the longest first by each study's ``FULL_MINUTES`` (greedy
longest-first: a worker that frees up takes the longest study left). The studies that time things
(:attr:`Experiment.timed`: 'speed' and 'long_range', whose claims are speed ratios) never run beside
another worker: they run FIRST, one at a time, alone, on N threads (their timings choose their own
thread counts), and only then the others start in parallel; a lone study of any kind runs on the N threads too.
With ``--jobs 1`` every study runs in this process, one after another, on the process's threads (the
behaviour before ``--jobs``). Each record keeps its wall seconds, its thread count and the jobs of the run; the
report states the jobs. A worker that cannot start, dies or leaves an unreadable record is its study's failure.

The workers (:func:`pixelfly_lab.studies.runner.run_parallel`) are fresh interpreters, never ``multiprocessing``
processes: a script calling ``reproduce(jobs=2)`` needs no ``if __name__ == "__main__":`` guard. Ctrl-C stops
each worker with its own children (the speed study's timing child, the attention memory children), removes their
temporary folders, restores a result a worker was replacing, writes the report of what finished and raises
``KeyboardInterrupt``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pixelfly_lab.studies.report import tally, write_report
from pixelfly_lab.studies.runner import PRESETS, Experiment, restore_previous, run_parallel, run_study

__all__ = ["EXPERIMENTS", "PRESETS", "Experiment", "reproduce", "schedule", "schedule_minutes", "load_results",
           "tally", "full_time", "full_minutes", "add_arguments", "run", "CONTENTION"]


# In report order.
EXPERIMENTS = (
    Experiment("patterns", "pixelfly_lab.studies.patterns",
               "Sparsity patterns: butterfly factors, flat and block butterfly, baselines"),
    Experiment("expressiveness", "pixelfly_lab.studies.expressiveness",
               "Expressiveness: approximation error against budget"),
    Experiment("theory", "pixelfly_lab.studies.theory",
               "The theorems' numerics: flat vs residual butterfly, block butterfly, sparse + low-rank, lazy training"),
    Experiment("attention", "pixelfly_lab.studies.attention",
               "Attention across temperatures: estimators against estimators, oracles against oracles"),
    Experiment("ntk", "pixelfly_lab.studies.ntk",
               "NTK distance of sparse models to the dense model"),
    Experiment("training", "pixelfly_lab.studies.training",
               "Training parity: dense vs Pixelfly vs baselines"),
    Experiment("speed", "pixelfly_lab.studies.speed",
               "Layer speed against dense nn.Linear", timed=True),
    Experiment("long_range", "pixelfly_lab.studies.long_range",
               "Long sequences: block-sparse attention speed and ListOps (the talk's LRA row)", timed=True),
)


def _source_hash() -> str:
    """Hash of the whole package's source (subpackages included): results made by other code are out of date."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _environment(device: str) -> dict:

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "device": device, "threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _resolve_device(device: str) -> str:

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
    return device


# A worker of one thread beside another on two cores runs this much slower than alone (shared memory bandwidth
# and caches). Assumed, not measured apart: it is the factor the ntk, theory and speed estimates carried before
# (training's count, ~15% above its one-thread measurement, said the same). schedule_minutes applies it, once, to
# every phase whose studies run side by side; each study's FULL_MINUTES is its time alone on one thread.
CONTENTION = 1.25


def schedule(experiments, jobs: int, minutes: dict[str, float] | None = None) -> list[list[Experiment]]:
    """The phases of a run with ``jobs`` workers: each timed study alone, then the rest longest first.

    Args:
        experiments: the studies to run.
        jobs: worker processes (1: one phase in report order, run in this process).
        minutes: {name: estimated minutes} (default: each study's FULL_MINUTES; unknown counts as 0).

    Returns:
        Phases in order: with jobs > 1 one phase per timed study (run alone, in report order), then one phase of
        the others sorted by estimated minutes, longest first (a freed worker takes the next).
    """
    experiments = list(experiments)
    if jobs == 1:
        return [experiments] if experiments else []
    minutes = full_minutes() if minutes is None else minutes
    rest = sorted((e for e in experiments if not e.timed), key=lambda e: -minutes.get(e.name, 0.0))
    return [[e] for e in experiments if e.timed] + ([rest] if rest else [])


def schedule_minutes(jobs: int, minutes: dict[str, float] | None = None, experiments=None,
                     contention: float = CONTENTION) -> float:
    """The estimated wall minutes of :func:`schedule` with ``jobs`` workers (greedy longest-first list scheduling).

    Args:
        jobs: worker processes.
        minutes: {name: minutes of the study alone on one thread} (default: each study's FULL_MINUTES).
        experiments: the studies (default: all).
        contention: the slowdown of a worker beside another (:data:`CONTENTION`), applied to every phase whose
            studies run side by side; a study alone (a timed one, a lone other, or any with ``jobs=1``) takes its
            one-thread minutes (an upper bound: alone it runs on ``jobs`` threads).

    Returns:
        Wall minutes: the phases' longest workers, summed.
    """
    minutes = full_minutes() if minutes is None else minutes
    total = 0.0
    for phase in schedule(EXPERIMENTS if experiments is None else experiments, jobs, minutes):
        side_by_side = jobs > 1 and len(phase) > 1
        free = [0.0] * (jobs if side_by_side else 1)
        for exp in phase:
            free[free.index(min(free))] += minutes.get(exp.name, 0.0)
        total += max(free) * (contention if side_by_side else 1.0)
    return total


def _default_jobs(preset: str, device: str) -> int:
    """The default --jobs: 2 for the full preset on the CPU (two cores' worth of one-thread studies), else 1 (a GPU
    would be shared by the studies; the smaller presets take minutes)."""
    return 2 if preset == "full" and device == "cpu" else 1


def reproduce(out="results", *, preset: str = "full", device: str = "auto", force: bool = False,
              only: list[str] | None = None, progress: bool = True, jobs: int | None = None) -> dict[str, dict]:
    """Run the studies and write ``out/report.md`` and ``out/report.html``.

    Args:
        out: output folder (created).
        preset: 'full' (the paper-scale run), 'quick' (CPU minutes, what ``make reproduce`` runs)
            or 'tiny' (seconds; what the tests run).
        device: 'auto' (CUDA when available), 'cpu' or 'cuda'.
        force: rerun studies whose results are up to date.
        only: study names to run (default: all); the report covers all that exist in ``out``.
        progress: a progress bar over the studies.
        jobs: worker processes (default: 2 for 'full' on the CPU, 1 otherwise, decided after ``device`` is
            resolved; see the module docstring). 1 runs every study in this process. Workers are fresh
            interpreters (never ``multiprocessing``): a script calling this needs no ``__main__`` guard.

    Returns:
        {study name: record} with status 'ok', 'failed' or 'skipped', seconds, threads, jobs, config and claims.

    Example:
        >>> records = reproduce("results", preset="tiny", only=["patterns"])   # doctest: +SKIP
    """

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    device = _resolve_device(device)
    if jobs is None:
        jobs = _default_jobs(preset, device)
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise TypeError(f"jobs must be an int, got {type(jobs).__name__}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if device == "cuda" and jobs > 1:
        raise ValueError("jobs must be 1 with device='cuda' (the studies would share one GPU)")
    names = [e.name for e in EXPERIMENTS]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown experiment(s) {unknown} in only; known: {', '.join(names)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"source": _source_hash(), "preset": preset, "device": device}
    records: dict[str, dict] = {}
    selected = [e for e in EXPERIMENTS if not only or e.name in only]
    to_run = []
    for exp in selected:
        restore_previous(out, exp.name)   # a run killed while it replaced this result
        previous = _load_record(out / exp.name)
        if (not force and previous and previous.get("status") == "ok"
                and all(previous.get(k) == v for k, v in stamp.items())):
            records[exp.name] = {**previous, "status": "skipped"}
        else:
            to_run.append(exp)
    try:
        if jobs == 1:
            for exp in tqdm(to_run, desc="reproduce", unit="study", disable=not progress):
                records[exp.name] = run_study(exp, out, stamp, preset, device)
                if records[exp.name]["status"] == "failed":
                    print(f"[reproduce] {exp.name} failed: {records[exp.name]['error']}", file=sys.stderr)
        else:
            run_parallel(schedule(to_run, jobs), out, stamp, preset, device, jobs, records, progress)
    finally:  # Ctrl-C too: the report of what finished
        for exp in EXPERIMENTS:  # the report also shows earlier results of studies not run now
            if exp.name not in records and (rec := _load_record(out / exp.name)):
                records[exp.name] = {**rec, "status": "skipped"}
        records = {e.name: records[e.name] for e in EXPERIMENTS if e.name in records}
        write_report(out, records, {**_environment(device), "jobs": jobs}, preset,
                     titles={e.name: e.title for e in EXPERIMENTS},
                     time_line=full_time(records, jobs if preset == "full" else 2))
    return records


def _load_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "claims.json").read_text())
    except (OSError, ValueError):
        return None


def load_results(out="results") -> dict[str, dict]:
    """The records of every study found under ``out`` ({name: record}), in report order."""
    out = Path(out)
    return {e.name: rec for e in EXPERIMENTS if (rec := _load_record(out / e.name))}


def full_time(records: dict[str, dict] | None = None, jobs: int = 2) -> str:
    """How long the full preset takes on 2 CPU cores with ``jobs`` workers, from each study's 1-thread minutes.

    Args:
        records: this run's records; those of preset 'full' count as measured (their 'seconds' replace the
            estimate in the schedule; a study that ran in a worker of one thread beside another is divided by
            :data:`CONTENTION` first, since the schedule applies it again).
        jobs: the worker processes of the schedule (:func:`schedule_minutes`).

    Returns:
        One sentence for the report: the schedule's wall minutes, then per study its minutes (measured in this
        run, or its FULL_MINUTES estimate), and the studies without either.
    """
    names = [e.name for e in EXPERIMENTS]
    measured = {name: rec for name, rec in (records or {}).items()
                if rec.get("preset") == "full" and rec.get("status") in ("ok", "skipped") and "seconds" in rec}
    this_run = {name: rec["seconds"] / 60 for name, rec in measured.items()}
    alone = {name: minutes / (CONTENTION if measured[name].get("jobs", 1) > 1 and measured[name].get("threads") == 1
                              else 1.0) for name, minutes in this_run.items()}
    estimates = {name: m for name, m in full_minutes().items() if name not in this_run}
    missing = [n for n in names if n not in this_run and n not in estimates]
    wall = schedule_minutes(jobs, {**estimates, **alone})
    timed = [e.name for e in EXPERIMENTS if e.timed]

    def listed(minutes):
        return ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()) + " min"

    parts = ([f"measured in this run: {listed(this_run)}"] if this_run else []) + (
        [f"estimated alone on one thread (each study's FULL_MINUTES; its config comment says which parts of FULL "
         f"were timed at one thread on a shared machine, bench/full_minutes.py): {listed(estimates)}"] if estimates
        else []) + (
        [f"no time for {', '.join(missing)}"] if missing else [])
    how = (f"with --jobs {jobs} (" + (f"{', '.join(timed)} alone first, then " if timed else "")
           + f"the others on {jobs} workers of one thread, longest first, each {CONTENTION:g}x its time alone "
             f"beside another)" if jobs > 1
           else "with --jobs 1 (one study after another)")
    return (f"The full preset (`--preset full`) on 2 CPU cores {how}: about {wall:.0f} minutes of wall clock"
            + (" for the studies with a time" if missing else "") + "; " + "; ".join(parts) + ".")


def full_minutes() -> dict[str, float]:
    """Each study's FULL_MINUTES (its module's estimate of its full preset on ONE thread), where it states one."""
    minutes = {}
    for exp in EXPERIMENTS:
        try:
            module = importlib.import_module(exp.module)
        except Exception:  # noqa: BLE001 (the run records import failures; the estimate is a reading)
            continue
        if isinstance(getattr(module, "FULL_MINUTES", None), (int, float)):
            minutes[exp.name] = float(module.FULL_MINUTES)
    return minutes


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="tiny (seconds), quick (CPU minutes, what `make reproduce` runs) or full "
                             "(the paper-scale run; the default)")
    parser.add_argument("--quick", action="store_true", help="alias of --preset quick")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when available (GPU claims need it)")
    parser.add_argument("--force", action="store_true", help="rerun studies that are up to date")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="worker processes of one thread each (default: 2 for --preset full on the CPU, 1 "
                             "otherwise); the studies that time things run alone first")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these studies: " + ", ".join(e.name for e in EXPERIMENTS))


def run(args) -> int:
    if args.quick and args.preset not in (None, "quick"):
        raise SystemExit(f"--quick is an alias of --preset quick; it contradicts --preset {args.preset}")
    preset = "quick" if args.quick else (args.preset or "full")
    try:
        records = reproduce(args.out, preset=preset, device=args.device, force=args.force, only=args.only,
                            jobs=args.jobs)
    except KeyboardInterrupt:
        print(f"[reproduce] interrupted: the studies that finished are in {Path(args.out) / 'report.md'}",
              file=sys.stderr)
        return 130
    count = tally(records)
    failed = count["failed"]
    print(f"report: {Path(args.out) / 'report.md'} (preset {preset}; {len(records) - len(failed)} ok or up to date, "
          f"{len(failed)} failed; {len(count['paper'])} distinct paper claims: {count['held']} held, "
          f"{count['refuted']} did not hold, {count['undecided']} undecided)")
    return 1 if failed else 0
