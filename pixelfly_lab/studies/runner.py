"""One study run atomically, in this process or in a worker process of its own (the machinery of ``reproduce``).

:func:`run_study` runs a study into a temporary folder that replaces its final folder only when it succeeds.
:func:`run_parallel` runs the phases of :func:`pixelfly_lab.studies.reproduce.schedule` in worker processes:
fresh ``python -c`` interpreters started with ``subprocess``, never ``multiprocessing`` (spawn imports the
caller's ``__main__`` again in each worker, so a script without an ``if __name__ == "__main__":`` guard would run
again in every worker). Each worker leads a process group of its own (``start_new_session``): a terminal's Ctrl-C
reaches the parent only, which stops each worker's whole group, the worker's own children included, with SIGTERM
(the worker raises ``SystemExit``, so its finally-blocks remove its temporary folder), then SIGKILL after
:data:`STOP_SECONDS`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

__all__ = ["PRESETS", "Experiment", "study_config", "run_study", "run_parallel", "remove_temporary",
           "restore_previous", "STOP_SECONDS"]

PRESETS = ("tiny", "quick", "full")


@dataclass(frozen=True)
class Experiment:
    name: str
    module: str  # a study module: FULL, QUICK, TINY configs and run(out, config, *, device) -> list[Claim]
    title: str
    # the study times things and its claims are speed ratios: with --jobs > 1 it runs alone (see reproduce)
    timed: bool = False


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


def run_study(exp: Experiment, out: Path, stamp: dict, preset: str, device: str, jobs: int = 1) -> dict:
    """Run one study into a temporary folder and move it into place on success."""
    started = time.perf_counter()
    where = {"threads": torch.get_num_threads(), "jobs": jobs}
    tmp = Path(tempfile.mkdtemp(prefix=f".{exp.name}-tmp-", dir=out))
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


# The command a worker process runs: a fresh interpreter that imports this module, never the caller's __main__
_WORKER_CODE = "from pixelfly_lab.studies.runner import _worker_main; _worker_main()"
# Seconds a stopped worker (SIGTERM to its process group) gets to clean up before its group is killed
STOP_SECONDS = 10.0


def _worker_main() -> None:
    """A worker process's whole life (started by :func:`_start_worker`): one study, its record written to a file.

    Reads its task from ``sys.argv[1]`` (JSON: the experiment, out, stamp, preset, device, threads, jobs and the
    record's path). SIGTERM (the parent stopping the worker's process group) raises ``SystemExit``, so the study's
    finally-blocks run and :func:`run_study` removes its temporary folder. A worker that dies writes no record.
    """
    task = json.loads(sys.argv[1])

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    # Ctrl-C as in any script, whatever the parent ignored (a child of the study then inherits the default, not
    # SIG_IGN); a terminal's Ctrl-C reaches the parent only: the worker is in a session of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(task["threads"])
    exp = Experiment(**task["experiment"])
    record = run_study(exp, Path(task["out"]), task["stamp"], task["preset"], task["device"], task["jobs"])
    path = Path(task["record"])
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(record))
    partial.replace(path)  # the parent never reads half a record


def _start_worker(exp: Experiment, out: Path, stamp: dict, preset: str, device: str, threads: int, jobs: int,
                  record: Path) -> subprocess.Popen:
    """Start the worker of study ``exp``: ``python -c`` in a session (and process group) of its own.

    A plain subprocess, not ``multiprocessing``: spawn would import the caller's ``__main__`` again in every worker
    (a script without an ``if __name__ == "__main__":`` guard would run reproduce again). Its own process group:
    a terminal's Ctrl-C reaches the parent only, and :func:`_stop` stops the worker and its children together.
    """
    task = dict(experiment=dataclasses.asdict(exp), out=str(out), stamp=stamp, preset=preset, device=device,
                threads=threads, jobs=jobs, record=str(record))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),   # read by the worker's OpenMP at its start
           # the caller's import path (a study module found through sys.path, as spawn would pass it)
           "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
    return subprocess.Popen([sys.executable, "-c", _WORKER_CODE, json.dumps(task)], env=env,
                            start_new_session=True)


def _read_result(path: Path) -> dict:
    """The record a worker wrote to ``path`` (``FileNotFoundError`` when it wrote none)."""
    return json.loads(path.read_text())


def _failed(stamp: dict, threads: int, jobs: int, error: str, trace: str = "") -> dict:
    return {**stamp, "status": "failed", "seconds": 0.0, "threads": threads, "jobs": jobs, "error": error,
            "traceback": trace, "claims": []}


def _stop(running: dict, out: Path) -> None:
    """Stop every running worker with its children (SIGTERM to the group, SIGKILL after :data:`STOP_SECONDS`)."""
    try:
        for _, proc, _, _ in running.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for _, proc, _, _ in running.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:  # a second Ctrl-C too: nothing of a worker's group is left running
        for exp, proc, _, _ in running.values():
            _signal_group(proc, signal.SIGKILL)  # a child that outlived its worker goes too
            proc.wait()
            remove_temporary(out, exp.name)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)   # the worker leads its group (start_new_session)
    except (ProcessLookupError, PermissionError):   # the group is gone already
        pass


def run_parallel(phases, out: Path, stamp: dict, preset: str, device: str, jobs: int, records: dict,
                 progress: bool) -> None:
    """Run ``phases`` in worker processes, filling ``records`` ({name: record}) as each study finishes.

    Args:
        phases: lists of :class:`Experiment`, one list after another (from
            :func:`pixelfly_lab.studies.reproduce.schedule`).
        out, stamp, preset, device: as :func:`run_study` takes them.
        jobs: worker processes (and the threads of a lone study).
        records: filled in place.
        progress: a progress bar over the studies.

    A phase of one study (a timed one, or a lone other) runs on the jobs' threads, a phase of several on ``jobs``
    workers of one thread. A worker that cannot start, dies or leaves an unreadable record is that study's
    failure; the others go on.
    """
    bar = tqdm(total=sum(map(len, phases)), desc=f"reproduce ({jobs} jobs)", unit="study", disable=not progress)
    folder = Path(tempfile.mkdtemp(prefix="pixelfly-reproduce-"))   # the workers' records
    running: dict = {}  # name -> (experiment, process, record path, threads)

    def finish(exp: Experiment, record: dict) -> None:
        records[exp.name] = record
        bar.update()
        bar.write(f"[reproduce] {exp.name} {record['status']} in {record['seconds']:.0f} s"
                  + (f": {record['error']}" if record["status"] == "failed" else ""))

    try:
        for phase in phases:
            alone = len(phase) == 1   # a lone study takes every thread the jobs have
            slots, threads = (1, jobs) if alone else (jobs, 1)
            pending = list(phase)
            while pending or running:
                while pending and len(running) < slots:
                    exp = pending.pop(0)
                    path = folder / f"{exp.name}.json"
                    try:
                        proc = _start_worker(exp, out, stamp, preset, device, threads, jobs, path)
                    except Exception as err:  # noqa: BLE001 (that study failed; the others still run)
                        finish(exp, _failed(stamp, threads, jobs, f"the worker process could not start: "
                                            f"{type(err).__name__}: {err}", traceback.format_exc()))
                        continue
                    running[exp.name] = (exp, proc, path, threads)
                    bar.write(f"[reproduce] started {exp.name} ({threads} thread{'s' * (threads > 1)}"
                              f"{', alone: it times things' if exp.timed else ', alone' if alone else ''})")
                done = [name for name, (_, proc, _, _) in running.items() if proc.poll() is not None]
                if not done:
                    time.sleep(0.1)
                    continue
                for name in done:
                    exp, proc, path, threads = running.pop(name)
                    try:
                        record = _read_result(path)
                    except FileNotFoundError:  # the worker died without a record (killed, out of memory, a crash)
                        record = _failed(stamp, threads, jobs,
                                         f"worker process exited with code {proc.returncode} and no result")
                    except Exception as err:  # noqa: BLE001 (an unreadable record fails its study, not the run)
                        record = _failed(stamp, threads, jobs, f"the worker's record could not be read "
                                         f"({type(err).__name__}: {err}); it exited with code {proc.returncode}",
                                         traceback.format_exc())
                    if record["status"] == "failed":
                        remove_temporary(out, exp.name)
                    finish(exp, record)
    except BaseException:  # Ctrl-C (or a bug here): stop every worker and its children, leave no temporary folder
        _stop(running, out)
        raise
    finally:
        bar.close()
        shutil.rmtree(folder, ignore_errors=True)


def remove_temporary(out: Path, name: str) -> None:
    """Clean up after a stopped worker of study ``name`` in ``out``: its temporary folders go, its result stays.

    :func:`run_study` moves a result into place as ``name -> .name-old``, ``tmp -> name``, then removes
    ``.name-old``. A worker stopped between the two renames leaves no ``name``: the old result is restored. Only
    the folders of ``mkdtemp`` (``.name-tmp-*``) are deleted.
    """
    for path in out.glob(f".{name}-tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    restore_previous(out, name)


def restore_previous(out: Path, name: str) -> None:
    """Put ``.name-old`` back as ``name`` when ``name`` is missing; remove it when ``name`` is there."""
    old, final = out / f".{name}-old", out / name
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)
