"""``python -m pixelfly_lab reproduce``: every experiment, its figures and tables, and a report.

Each experiment writes into ``OUT/<name>/`` (figures as PNG and PDF, tables as CSV,
``claims.json``). Results are written atomically: an experiment runs in a temporary folder that
replaces its final folder only when it succeeds, so a crash never leaves half a result and never
destroys the previous one. A failed experiment is recorded in the report and the others still
run. A rerun skips experiments whose results are up to date (same package source, same quick
flag and device) unless ``--force``. ``report.md`` and ``report.html`` put each figure beside
the claim it checks, with the measured numbers and whether the claim held.
"""

from __future__ import annotations

import hashlib
import html
import importlib
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .claims import Claim

__all__ = ["EXPERIMENTS", "Experiment", "reproduce", "load_results", "show_experiment", "add_arguments", "run"]


@dataclass(frozen=True)
class Experiment:
    name: str
    target: str  # "module:function", imported only when the experiment runs
    title: str


# In report order. Each target is ``experiment(out, *, quick, device) -> list[Claim]``.
EXPERIMENTS = (
    Experiment("patterns", "pixelfly_lab.plots:experiment_patterns",
               "Sparsity patterns: butterfly factors, flat and block butterfly, baselines"),
    Experiment("expressiveness", "pixelfly_lab.expressiveness:experiment_expressiveness",
               "Expressiveness: approximation error against budget"),
    Experiment("theory", "pixelfly_lab.expressiveness:experiment_theory",
               "The theorems' numerics: flat vs residual butterfly, sparse + low-rank"),
    Experiment("attention", "pixelfly_lab.expressiveness:experiment_attention",
               "Attention approximation across temperatures"),
    Experiment("ntk", "pixelfly_lab.ntk_study:experiment_ntk",
               "NTK distance of sparse models to the dense model"),
    Experiment("training", "pixelfly_lab.train:experiment_training",
               "Training parity: dense vs Pixelfly vs baselines"),
    Experiment("speed", "pixelfly_lab.bench:experiment_speed",
               "Layer speed against dense nn.Linear"),
)


def _source_hash() -> str:
    """Hash of the package's source: results made by other code are out of date."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "device": device, "threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _resolve_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
    return device


def _run_one(exp: Experiment, out: Path, stamp: dict, quick: bool, device: str) -> dict:
    """Run one experiment into a temporary folder and move it into place on success."""
    module_name, func_name = exp.target.split(":")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{exp.name}-", dir=out))
    try:
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # that lab is not part of this checkout
            return {**stamp, "status": "unavailable", "seconds": 0.0, "claims": [],
                    "error": f"module {module_name} is not installed"}
        claims = [c.to_dict() for c in func(tmp, quick=quick, device=device)]
        record = {**stamp, "status": "ok", "seconds": round(time.perf_counter() - started, 1),
                  "claims": claims}
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
    except Exception as err:  # one failed experiment must not lose the others' results
        shutil.rmtree(tmp, ignore_errors=True)
        return {**stamp, "status": "failed", "seconds": round(time.perf_counter() - started, 1),
                "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                "claims": []}


def reproduce(out="results", *, quick: bool = False, device: str = "auto", force: bool = False,
              only: list[str] | None = None) -> dict[str, dict]:
    """Run the experiments and write ``out/report.md`` and ``out/report.html``.

    Args:
        out: output folder (created).
        quick: the CPU-minutes version (small sizes, few seeds and epochs).
        device: 'auto' (CUDA when available), 'cpu' or 'cuda'.
        force: rerun experiments whose results are up to date.
        only: experiment names to run (default: all); the report covers all that exist.

    Returns:
        {experiment name: record} with status 'ok', 'failed' or 'skipped', seconds and claims.
    """
    from tqdm.auto import tqdm

    device = _resolve_device(device)
    names = [e.name for e in EXPERIMENTS]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown experiment(s) {unknown} in only; known: {', '.join(names)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"source": _source_hash(), "quick": quick, "device": device}
    records: dict[str, dict] = {}
    selected = [e for e in EXPERIMENTS if not only or e.name in only]
    for exp in tqdm(selected, desc="reproduce", unit="experiment"):
        previous = _load_record(out / exp.name)
        if (not force and previous and previous.get("status") == "ok"
                and all(previous.get(k) == v for k, v in stamp.items())):
            records[exp.name] = {**previous, "status": "skipped"}
            continue
        records[exp.name] = _run_one(exp, out, stamp, quick, device)
        if records[exp.name]["status"] == "failed":
            print(f"[reproduce] {exp.name} failed: {records[exp.name]['error']}", file=sys.stderr)
    for exp in EXPERIMENTS:  # the report also shows earlier results of experiments not run now
        if exp.name not in records and (rec := _load_record(out / exp.name)):
            records[exp.name] = {**rec, "status": "skipped"}
    write_report(out, records, _environment(device))
    return records


def _load_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "claims.json").read_text())
    except (OSError, ValueError):
        return None


def load_results(out="results") -> dict[str, dict]:
    """The records of every experiment found under ``out`` ({name: record}), in report order."""
    out = Path(out)
    return {e.name: rec for e in EXPERIMENTS if (rec := _load_record(out / e.name))}


def show_experiment(out, name: str) -> None:
    """Display one experiment's claims and figures in a notebook (IPython.display)."""
    from IPython.display import Image, Markdown, display

    if name not in {e.name for e in EXPERIMENTS}:
        raise ValueError(f"unknown experiment name {name!r}; known: {', '.join(e.name for e in EXPERIMENTS)}")
    record = _load_record(Path(out) / name)
    if record is None:
        display(Markdown(f"*`{name}` has no results in `{out}` yet: run `make reproduce` "
                         f"(or `python -m pixelfly_lab reproduce --only {name}`).*"))
        return
    for claim in record["claims"]:
        display(Markdown(f"**Claim:** {claim['claim']}  \n**Measured:** {claim['measured']}  \n"
                         f"**Verdict:** {_verdict(claim['held'])}"))
        if claim.get("figure"):
            display(Image(filename=str(Path(out) / name / claim["figure"])))


def _verdict(held) -> str:
    return {True: "held", False: "did NOT hold", None: "informational"}[held]


def write_report(out: Path, records: dict[str, dict], env: dict) -> None:
    """Write report.md and report.html (atomically) from the experiments' records."""
    titles = {e.name: e.title for e in EXPERIMENTS}
    md = ["# pixelfly_lab reproduction report", "",
          "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    body = [f"<h1>pixelfly_lab reproduction report</h1><p>Environment: "
            f"{html.escape(', '.join(f'{k} {v}' for k, v in env.items()))}</p>"]
    for name, rec in records.items():
        head = f"{titles.get(name, name)} (`{name}`): {rec['status']}, {rec.get('seconds', 0)} s"
        md += [f"## {head}", ""]
        body.append(f"<h2>{html.escape(head)}</h2>")
        if rec.get("error"):
            md += [f"**Failed:** `{rec['error']}`", ""]
            body.append(f"<p><b>Failed:</b> <code>{html.escape(rec['error'])}</code></p>")
        for claim in rec.get("claims", []):
            verdict = _verdict(claim.get("held"))
            md += [f"- **Claim:** {claim['claim']}", f"  - measured: {claim['measured']}",
                   f"  - verdict: {verdict}"]
            body.append(f"<p><b>Claim:</b> {html.escape(claim['claim'])}<br>measured: "
                        f"{html.escape(claim['measured'])}<br>verdict: <b>{verdict}</b></p>")
            if claim.get("figure"):
                md += ["", f"  ![{claim['figure']}]({name}/{claim['figure']})"]
                body.append(f'<img src="{name}/{html.escape(claim["figure"])}" style="max-width:900px">')
        md.append("")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pixelfly_lab report</title>"
            "</head><body style='font-family:sans-serif;max-width:960px;margin:auto'>"
            + "\n".join(body) + "</body></html>")
    for file, text in (("report.md", "\n".join(md)), ("report.html", page)):
        tmp = out / f".{file}.tmp"
        tmp.write_text(text)
        tmp.replace(out / file)


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="CPU-minutes version: small sizes, few seeds and epochs")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--force", action="store_true", help="rerun experiments that are up to date")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these experiments: " + ", ".join(e.name for e in EXPERIMENTS))


def run(args) -> int:
    records = reproduce(args.out, quick=args.quick, device=args.device, force=args.force,
                        only=args.only)
    failed = [name for name, rec in records.items() if rec["status"] == "failed"]
    print(f"report: {Path(args.out) / 'report.md'} ({len(records) - len(failed)} ok or up to date, "
          f"{len(failed)} failed)")
    return 1 if failed else 0
