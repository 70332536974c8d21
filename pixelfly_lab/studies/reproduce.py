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

``--jobs N`` (default 2 for ``--preset full``, 1 otherwise) runs the studies in N worker processes
(``multiprocessing`` spawn, a fresh process per study, each on one torch thread with
``OMP_NUM_THREADS=1``), the longest first by each study's ``FULL_MINUTES`` (greedy longest-first:
a worker that frees up takes the longest study left). The studies that time things
(:attr:`Experiment.timed`: 'speed' and 'long_range', whose claims are speed ratios) never run beside
another worker: they run FIRST, one at a time, alone, on N threads (their timings choose their own
thread counts), and only then the others start in parallel. With ``--jobs 1`` every study runs in
this process, one after another, on the process's threads (the behaviour before ``--jobs``). Each
record keeps its wall seconds, its thread count and the jobs of the run; the report states the jobs.
Ctrl-C stops the workers, removes their temporary folders, writes the report of what finished and
raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import multiprocessing
import os
import platform
import signal
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pixelfly_lab.studies.report import tally, write_report

__all__ = ["EXPERIMENTS", "PRESETS", "Experiment", "reproduce", "schedule", "schedule_minutes", "load_results",
           "tally", "full_time", "full_minutes", "add_arguments", "run"]

PRESETS = ("tiny", "quick", "full")


@dataclass(frozen=True)
class Experiment:
    name: str
    module: str  # a study module: FULL, QUICK, TINY configs and run(out, config, *, device) -> list[Claim]
    title: str
    # the study times things and its claims are speed ratios: with --jobs > 1 it runs alone (see the module docstring)
    timed: bool = False


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


def study_config(exp: Experiment, preset: str):
    """The study module of ``exp`` and its config for ``preset`` (an import error propagates)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    module = importlib.import_module(exp.module)
    return module, getattr(module, preset.upper())


def _jsonable(config) -> dict:
    if dataclasses.is_dataclass(config):
        return json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return {"config": repr(config)}


def _run_one(exp: Experiment, out: Path, stamp: dict, preset: str, device: str, jobs: int = 1) -> dict:
    """Run one study into a temporary folder and move it into place on success."""
    started = time.perf_counter()
    where = {"threads": torch.get_num_threads(), "jobs": jobs}
    tmp = Path(tempfile.mkdtemp(prefix=f".{exp.name}-", dir=out))
    try:
        module, config = study_config(exp, preset)
        claims = [c.to_dict() for c in module.run(tmp, config, device=device)]
        record = {**stamp, "status": "ok", "seconds": round(time.perf_counter() - started, 1), **where,
                  "config": _jsonable(config), "claims": claims}
        (tmp / "claims.json").write_text(json.dumps(record, indent=2))
        final = out / exp.name
        if final.exists():
            old = out / f".{exp.name}-old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        return record
    except Exception as err:  # one failed study must not lose the others' results
        shutil.rmtree(tmp, ignore_errors=True)
        return {**stamp, "status": "failed", "seconds": round(time.perf_counter() - started, 1), **where,
                "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                "claims": []}
    except BaseException:  # Ctrl-C: no half result left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _worker(conn, exp: Experiment, out: str, stamp: dict, preset: str, device: str, threads: int,
            jobs: int) -> None:
    """A worker process's whole life: one study on ``threads`` torch threads, its record sent to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops its workers
    torch.set_num_threads(threads)
    try:
        record = _run_one(exp, Path(out), stamp, preset, device, jobs)
    except BaseException as err:  # noqa: BLE001 (anything that escapes _run_one is the worker's failure)
        record = {**stamp, "status": "failed", "seconds": 0.0, "threads": threads, "jobs": jobs,
                  "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(), "claims": []}
    conn.send(record)
    conn.close()


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


def schedule_minutes(jobs: int, minutes: dict[str, float] | None = None, experiments=None) -> float:
    """The estimated wall minutes of :func:`schedule` with ``jobs`` workers (greedy longest-first list scheduling).

    Each study takes its 1-thread estimate (FULL_MINUTES); a timed study alone takes its estimate too (an upper
    bound: it runs on ``jobs`` threads).
    """
    minutes = full_minutes() if minutes is None else minutes
    total = 0.0
    for phase in schedule(EXPERIMENTS if experiments is None else experiments, jobs, minutes):
        free = [0.0] * (jobs if len(phase) > 1 else 1)
        for exp in phase:
            free[free.index(min(free))] += minutes.get(exp.name, 0.0)
        total += max(free)
    return total


def _run_parallel(phases, out: Path, stamp: dict, preset: str, device: str, jobs: int, records: dict,
                  progress: bool) -> None:
    """Run ``phases`` (from :func:`schedule`) in spawned worker processes, filling ``records`` as they finish."""
    context = multiprocessing.get_context("spawn")
    bar = tqdm(total=sum(map(len, phases)), desc=f"reproduce ({jobs} jobs)", unit="study", disable=not progress)
    running: dict = {}  # connection -> (experiment, process)
    try:
        for phase in phases:
            alone = len(phase) == 1 and phase[0].timed
            slots, threads = (1, jobs) if alone else (jobs, 1)
            pending = list(phase)
            while pending or running:
                while pending and len(running) < slots:
                    exp = pending.pop(0)
                    parent, child = context.Pipe(duplex=False)
                    saved = os.environ.get("OMP_NUM_THREADS")
                    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the child's OpenMP at its start
                    try:
                        proc = context.Process(target=_worker, name=f"reproduce-{exp.name}", daemon=True,
                                               args=(child, exp, str(out), stamp, preset, device, threads, jobs))
                        proc.start()
                    finally:
                        if saved is None:
                            os.environ.pop("OMP_NUM_THREADS", None)
                        else:
                            os.environ["OMP_NUM_THREADS"] = saved
                    child.close()
                    running[parent] = (exp, proc)
                    bar.write(f"[reproduce] started {exp.name} ({threads} thread{'s' * (threads > 1)}"
                              f"{', alone: it times things' if alone else ''})")
                ready = wait([*running, *(proc.sentinel for _, proc in running.values())])
                for conn in list(running):
                    exp, proc = running[conn]
                    if conn not in ready and proc.sentinel not in ready:
                        continue
                    try:
                        record = conn.recv()
                    except EOFError:  # the worker died without a record (killed, out of memory, a crash)
                        proc.join()
                        record = {**stamp, "status": "failed", "seconds": 0.0, "threads": threads, "jobs": jobs,
                                  "error": f"worker process exited with code {proc.exitcode} and no result",
                                  "traceback": "", "claims": []}
                        _remove_temporary(out, exp.name)
                    proc.join()
                    conn.close()
                    del running[conn]
                    records[exp.name] = record
                    bar.update()
                    bar.write(f"[reproduce] {exp.name} {record['status']} in {record['seconds']:.0f} s"
                              + (f": {record['error']}" if record["status"] == "failed" else ""))
    except BaseException:  # Ctrl-C (or a bug here): stop every worker, leave no temporary folder
        for conn, (exp, proc) in running.items():
            proc.terminate()
        for conn, (exp, proc) in running.items():
            proc.join()
            conn.close()
            _remove_temporary(out, exp.name)
        raise
    finally:
        bar.close()


def _remove_temporary(out: Path, name: str) -> None:
    """Remove the temporary folders a stopped worker of study ``name`` left in ``out``."""
    for path in out.glob(f".{name}-*"):
        shutil.rmtree(path, ignore_errors=True)


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
        jobs: worker processes (default: 2 for 'full', 1 otherwise; see the module docstring). 1 runs every
            study in this process.

    Returns:
        {study name: record} with status 'ok', 'failed' or 'skipped', seconds, threads, jobs, config and claims.

    Example:
        >>> records = reproduce("results", preset="tiny", only=["patterns"])   # doctest: +SKIP
    """

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if jobs is None:
        jobs = 2 if preset == "full" else 1
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise TypeError(f"jobs must be an int, got {type(jobs).__name__}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    device = _resolve_device(device)
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
        previous = _load_record(out / exp.name)
        if (not force and previous and previous.get("status") == "ok"
                and all(previous.get(k) == v for k, v in stamp.items())):
            records[exp.name] = {**previous, "status": "skipped"}
        else:
            to_run.append(exp)
    try:
        if jobs == 1:
            for exp in tqdm(to_run, desc="reproduce", unit="study", disable=not progress):
                records[exp.name] = _run_one(exp, out, stamp, preset, device)
                if records[exp.name]["status"] == "failed":
                    print(f"[reproduce] {exp.name} failed: {records[exp.name]['error']}", file=sys.stderr)
        else:
            _run_parallel(schedule(to_run, jobs), out, stamp, preset, device, jobs, records, progress)
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
            estimate in the schedule).
        jobs: the worker processes of the schedule (:func:`schedule_minutes`).

    Returns:
        One sentence for the report: the schedule's wall minutes, then per study its minutes (measured in this
        run, or its FULL_MINUTES estimate), and the studies without either.
    """
    names = [e.name for e in EXPERIMENTS]
    this_run = {name: rec["seconds"] / 60 for name, rec in (records or {}).items()
                if rec.get("preset") == "full" and rec.get("status") in ("ok", "skipped") and "seconds" in rec}
    estimates = {name: m for name, m in full_minutes().items() if name not in this_run}
    missing = [n for n in names if n not in this_run and n not in estimates]
    wall = schedule_minutes(jobs, {**estimates, **this_run})
    timed = [e.name for e in EXPERIMENTS if e.timed]

    def listed(minutes, digits):
        return ", ".join(f"{k} {v:.{digits}f}" for k, v in minutes.items()) + " min"

    parts = ([f"measured in this run: {listed(this_run, 1)}"] if this_run else []) + (
        [f"estimated on one thread (each study's FULL_MINUTES; its config comment says which parts of FULL were "
         f"timed at one thread on a shared machine, bench/full_minutes.py): {listed(estimates, 0)}"] if estimates
        else []) + (
        [f"no time for {', '.join(missing)}"] if missing else [])
    how = (f"with --jobs {jobs} (" + (f"{', '.join(timed)} alone first, then " if timed else "")
           + f"the others on {jobs} workers of one thread, longest first)" if jobs > 1
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
                        help="worker processes of one thread each (default: 2 for --preset full, 1 otherwise); the "
                             "studies that time things run alone first")
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
