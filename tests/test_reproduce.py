"""The reproduce driver and the studies: atomic results, failures isolated (a missing study module
included), up-to-date results skipped, presets, the report, and every study run at TINY."""

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from pixelfly_lab.cli import COMMANDS, main
from pixelfly_lab.studies import reproduce as rp
from pixelfly_lab.studies import runner
from pixelfly_lab.studies.claims import CLAIM_KINDS, Claim

CALLS = []


@dataclass(frozen=True)
class _Config:
    size: int


def _good_run(out, config, *, device):
    CALLS.append(("good", config.size))
    (out / "table.csv").write_text("a,b\n1,2\n")
    return [Claim("two is two (held when 2 == 2)", "2", True, None, kind="check"),
            Claim("Paper, Sec. 1: one is one (held when 1 == 1)", "1", True, None, kind="paper", effect=0.2,
                  ci=(0.1, 0.3), seeds=3,
                  members=[dict(name="pixelfly", verdict="held", effect=0.2, ci=(0.1, 0.3), seeds=3),
                           dict(name="gated", verdict="undecided", effect=0.05, ci=(-0.1, 0.2), seeds=3,
                                seeds_to_decide=9)]),
            Claim("Paper, Sec. 2: one is two (held when 1 == 2)", "1 != 2", False, None, kind="paper"),
            Claim("fast enough (held when >= 2x)", "3x", True, None, kind="target"),
            Claim("faster still (held when >= 4x)", "3x", False, None, kind="target")]


def _bad_run(out, config, *, device):
    CALLS.append(("bad", config.size))
    (out / "partial.csv").write_text("half")
    raise RuntimeError("boom")


def _study(run):
    module = types.ModuleType("fake_study")
    module.FULL, module.QUICK, module.TINY = _Config(3), _Config(2), _Config(1)
    module.run = run
    return module


@pytest.fixture
def fake_studies(monkeypatch):
    monkeypatch.setitem(sys.modules, "fake_good", _study(_good_run))
    monkeypatch.setitem(sys.modules, "fake_bad", _study(_bad_run))
    monkeypatch.setattr(rp, "EXPERIMENTS", (
        rp.Experiment("good", "fake_good", "Good"),
        rp.Experiment("bad", "fake_bad", "Bad"),
        rp.Experiment("absent", "pixelfly_lab_no_such_module", "Absent"),
    ))
    CALLS.clear()


def test_failure_is_reported_and_does_not_lose_other_results(tmp_path, fake_studies):
    records = rp.reproduce(tmp_path, preset="quick", device="cpu", progress=False)
    assert records["good"]["status"] == "ok" and records["bad"]["status"] == "failed"
    # a mistyped study module is an error, never "unavailable"
    assert records["absent"]["status"] == "failed" and "ModuleNotFoundError" in records["absent"]["error"]
    assert CALLS == [("good", 2), ("bad", 2)], "the quick preset's config reaches run()"
    assert (tmp_path / "good" / "table.csv").exists()
    assert not (tmp_path / "bad").exists(), "a failed study must leave no half result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    record = json.loads((tmp_path / "good" / "claims.json").read_text())
    assert record["preset"] == "quick" and record["config"] == {"size": 2}
    assert [c["kind"] for c in record["claims"]] == ["check", "paper", "paper", "target", "target"]


def test_report_lists_paper_claims_first_with_their_count(tmp_path, fake_studies):
    rp.reproduce(tmp_path, preset="tiny", device="cpu", progress=False)
    report = (tmp_path / "report.md").read_text()
    assert "Preset of this run: `tiny`" in report and "Seeds" in report and "pass rule" in report
    assert "2 distinct paper claims (1 of them families, members listed): 1 held, 1 did not hold, 0 undecided (0 of " \
           "them not measured on this machine, e.g. GPU claims on a CPU); " \
           "1 of 1 checks held; 1 of 2 speed targets met" in report
    assert "failed studies: bad, absent" in report and "RuntimeError: boom" in report
    paper_section, rest = report.split("## Paper claims", 1)[1].split("## Good", 1)
    paper_section, targets = paper_section.split("## Speed targets of the toolkit", 1)
    assert "**target met** (good)" in targets and "**target missed** (good)" in targets
    assert "fast enough" not in paper_section
    assert "one is one" in paper_section and "one is two" in paper_section and "two is two" not in paper_section
    assert "**held** (good)" in paper_section and "**did not hold** (good)" in paper_section
    assert "preset tiny" in rest and "two is two" in rest and "Config: `size=1`" in rest
    assert "1 held, 1 did not hold" in (tmp_path / "report.html").read_text()
    # a family counts once, its members and the seeds that would decide an undecided claim are printed
    assert "member pixelfly: held (effect +0.2" in report and "~9 seeds would decide it" in report
    assert "member gated: undecided" in report


def test_report_and_claims_table_say_the_same_words(tmp_path, fake_studies):
    from pixelfly_lab.studies.claims import VERDICT_WORDS
    from pixelfly_lab.studies.verdicts import VERDICTS, claims_table

    rp.reproduce(tmp_path, preset="tiny", device="cpu", progress=False)
    report = (tmp_path / "report.md").read_text()
    table = claims_table(tmp_path)
    assert VERDICTS == VERDICT_WORDS and set(table.verdict) <= set(VERDICT_WORDS)
    for row in table.itertuples():  # each claim's verdict word is the one the report prints for it
        if row.kind != "info":
            assert f"**{row.verdict}** (good): {row.claim}" in report or f"verdict: {row.verdict}" in report, row
    # the command's last line counts from the same tally as the report
    count = rp.tally(rp.load_results(tmp_path))
    assert (count["held"], count["refuted"], count["undecided"], count["met"]) == (1, 1, 0, 1)
    assert count["families"] == 1 and count["checks_held"] == 1 and len(count["targets"]) == 2


def test_rerun_skips_up_to_date_unless_forced(tmp_path, fake_studies):
    rp.reproduce(tmp_path, preset="quick", device="cpu", progress=False)
    CALLS.clear()
    records = rp.reproduce(tmp_path, preset="quick", device="cpu", progress=False)
    assert records["good"]["status"] == "skipped" and CALLS == [("bad", 2)]
    CALLS.clear()
    rp.reproduce(tmp_path, preset="full", device="cpu", progress=False, jobs=1)  # another preset: out of date
    assert ("good", 3) in CALLS
    CALLS.clear()
    rp.reproduce(tmp_path, preset="full", device="cpu", force=True, only=["good"], progress=False, jobs=1)
    assert CALLS == [("good", 3)]


def test_bad_arguments(tmp_path, fake_studies):
    with pytest.raises(ValueError, match="only"):
        rp.reproduce(tmp_path, only=["nope"])
    with pytest.raises(ValueError, match="device"):
        rp.reproduce(tmp_path, device="tpu")
    with pytest.raises(ValueError, match="preset"):
        rp.reproduce(tmp_path, preset="medium")
    with pytest.raises(ValueError, match="kind"):
        Claim("x", "y", True, kind="paper claim")
    with pytest.raises(ValueError, match="info"):
        Claim("x", "y", True, kind="info")


def test_quick_is_an_alias_of_preset_quick(tmp_path, fake_studies):
    assert main(["reproduce", "--quick", "--only", "good", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert CALLS == [("good", 2)]
    CALLS.clear()
    assert main(["reproduce", "--preset", "tiny", "--only", "good", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert CALLS == [("good", 1)]
    with pytest.raises(SystemExit, match="alias"):
        main(["reproduce", "--quick", "--preset", "full", "--out", str(tmp_path)])
    assert main(["reproduce", "--preset", "tiny", "--only", "bad", "--device", "cpu", "--out", str(tmp_path)]) == 1


def test_every_command_module_and_study_imports():
    """A mistyped command module or study target is caught here, not skipped at run time."""
    for module_name, _ in COMMANDS.values():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), module_name
    assert len({e.name for e in rp.EXPERIMENTS}) == len(rp.EXPERIMENTS)
    for exp in rp.EXPERIMENTS:
        module = importlib.import_module(exp.module)
        assert callable(module.run), exp.module
        configs = [getattr(module, preset.upper()) for preset in rp.PRESETS]
        for config in configs:
            assert dataclasses.is_dataclass(config) and type(config).__dataclass_params__.frozen, exp.module
        assert configs[0] != configs[1] != configs[2] != configs[0], f"{exp.module}: FULL, QUICK and TINY should differ"


def test_command_line_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pixelfly_lab", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("name", [e.name for e in rp.EXPERIMENTS])
def test_every_study_at_tiny(tmp_path, name):
    """Each study through the driver ``reproduce`` uses: claims with figures and verdicts, files written."""
    records = rp.reproduce(tmp_path, preset="tiny", device="cpu", only=[name], progress=False)
    record = records[name]
    assert record["status"] == "ok", record.get("traceback")
    folder = tmp_path / name
    assert record["claims"], "a study returns at least one claim"
    for claim in record["claims"]:
        assert claim["kind"] in CLAIM_KINDS and claim["claim"] and claim["measured"], claim
        if claim["kind"] == "info":
            assert claim["held"] is None, claim
        else:
            # a speed target states its threshold in its own words ("rises from each length to the next")
            assert "held when" in claim["claim"].lower() or claim["kind"] == "target", \
                f"the pass rule belongs in the claim's text: {claim['claim']}"
            # a verdict, or a stated reason why this run cannot give one (a GPU claim on the CPU,
            # a spread over one seed): never a silent None
            undecided = ("undecided" in (claim["claim"] + claim["measured"]).lower()
                         or claim["measured"].lower().startswith("not measured"))
            assert type(claim["held"]) is bool or (claim["held"] is None and undecided), f"no verdict: {claim}"
        if claim["figure"]:
            assert (folder / claim["figure"]).stat().st_size > 1000
            assert (folder / claim["figure"]).with_suffix(".pdf").is_file()
        if claim["table"]:
            assert (folder / claim["table"]).stat().st_size > 0
    assert any(c["figure"] for c in record["claims"]), "every study draws at least one figure"
    report = (tmp_path / "report.md").read_text()
    assert f"(`{name}`): ok" in report and "preset tiny" in report


def test_reproduce_command_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pixelfly_lab", "reproduce", "--preset", "tiny", "--out",
                          str(tmp_path), "--only", "patterns", "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "patterns" / "claims.json").read_text())
    assert record["status"] == "ok" and record["preset"] == "tiny" and all(c["held"] for c in record["claims"])
    assert (tmp_path / "patterns" / "baselines.png").stat().st_size > 0
    assert (tmp_path / "patterns" / "baselines.pdf").stat().st_size > 0
    assert "distinct paper claims" in out.stdout


def test_report_says_how_long_full_takes(tmp_path, fake_studies, monkeypatch):
    monkeypatch.setattr(sys.modules["fake_bad"], "FULL_MINUTES", 3, raising=False)
    monkeypatch.setattr(sys.modules["fake_good"], "FULL_MINUTES", 4, raising=False)
    rp.reproduce(tmp_path, preset="tiny", device="cpu", progress=False)
    report = (tmp_path / "report.md").read_text()
    # per study its one-thread estimate, the schedule's wall time with 2 jobs (4 and 3 side by side: 4, x 1.25 for
    # a worker beside another), the rest
    assert ("The full preset (`--preset full`) on 2 CPU cores with --jobs 2 ("
            "the others on 2 workers of one thread, longest first, each 1.25x its time alone beside another): about 5 "
            "minutes of wall clock for the studies with a time; estimated alone on one thread (each study's "
            "FULL_MINUTES; its config comment says which parts of FULL were timed at one thread on a shared machine, "
            "bench/full_minutes.py): good 4.0, bad 3.0 min; no time for absent.") in report
    assert "Preset of this run: `tiny`, jobs 1." in report
    # a full run's own times count as measured and replace the estimate in the schedule
    # (20 minutes beside another worker: 16 alone, the schedule's factor applied once: 16 x 1.25 beside bad's 3)
    records = {"good": {"preset": "full", "status": "ok", "seconds": 1200.0, "jobs": 2, "threads": 1}}
    assert "measured in this run: good 20.0 min" in rp.full_time(records)
    assert "about 20 minutes of wall clock" in rp.full_time(records)
    assert "about 19 minutes of wall clock" in rp.full_time(records, jobs=1)
    alone = {"good": {**records["good"], "threads": 2}}   # a lone study on the jobs' threads: not divided
    assert "about 25 minutes of wall clock" in rp.full_time(alone)


def test_schedule_runs_timed_studies_alone_then_longest_first():
    exps = [rp.Experiment("a", "m", "A"), rp.Experiment("t", "m", "T", timed=True), rp.Experiment("b", "m", "B"),
            rp.Experiment("c", "m", "C"), rp.Experiment("u", "m", "U", timed=True)]
    minutes = {"a": 1.0, "b": 5.0, "c": 3.0, "t": 2.0, "u": 1.0}
    phases = rp.schedule(exps, 2, minutes)
    assert [[e.name for e in phase] for phase in phases] == [["t"], ["u"], ["b", "c", "a"]]
    assert rp.schedule(exps, 1, minutes) == [exps]
    # alone: 2 + 1; then b on one worker (5), c + a on the other (4): 5, x CONTENTION (two workers side by side)
    assert rp.schedule_minutes(2, minutes, exps, contention=1.0) == 8.0
    assert rp.schedule_minutes(2, minutes, exps) == 3.0 + 5.0 * rp.CONTENTION and rp.CONTENTION > 1
    assert rp.schedule_minutes(1, minutes, exps) == 12.0                 # one after another: nobody beside
    assert rp.schedule_minutes(2, minutes, exps[:1]) == 1.0              # a lone study: nobody beside either


FAKE_STUDY = """
import json, os, subprocess, time
from dataclasses import dataclass
from pathlib import Path
import torch
from pixelfly_lab.studies.claims import Claim

@dataclass(frozen=True)
class Config:
    size: int

FULL, QUICK, TINY = Config(3), Config(2), Config(1)
FULL_MINUTES = {minutes}

def run(out, config, *, device):
    started = time.time()
    behaviour = {behaviour!r}
    if behaviour == "raise":
        raise RuntimeError("boom")
    if behaviour == "crash":
        os._exit(3)
    if behaviour == "sleep":   # a child process of the study's own, as the speed study's timing child
        child = subprocess.Popen(["sleep", "60"])
        Path({spans!r}).mkdir(exist_ok=True)
        Path({spans!r}, "{name}.part").write_text(str(child.pid))
        os.replace(Path({spans!r}, "{name}.part"), Path({spans!r}, "{name}.pid"))
        child.wait()
    time.sleep(0.3)
    g = torch.Generator().manual_seed(config.size)
    value = float(torch.randn(64, generator=g, dtype=torch.float64).sum())
    (out / "table.csv").write_text(f"value,{{value}}")
    spans = Path({spans!r})
    spans.mkdir(exist_ok=True)
    (spans / "{name}.json").write_text(json.dumps([started, time.time(), torch.get_num_threads(),
                                                   os.environ.get("OMP_NUM_THREADS")]))
    return [Claim(f"{name}: the sum is finite (held when finite)", f"{{value:.6f}}", True, None, kind="check")]
"""


def _study_files(tmp_path, monkeypatch, kinds: dict) -> Path:
    """Study modules in files ({name: (behaviour, FULL_MINUTES)}; a worker imports them by name) as EXPERIMENTS; the
    folder where they write their spans."""
    code = tmp_path / "code"
    code.mkdir()
    spans = tmp_path / "spans"
    for name, (behaviour, minutes) in kinds.items():
        (code / f"fake_{name}.py").write_text(FAKE_STUDY.format(behaviour=behaviour, minutes=minutes, name=name,
                                                                spans=str(spans)))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setattr(rp, "EXPERIMENTS", tuple(
        rp.Experiment(name, f"fake_{name}", name, timed=name == "det_timed") for name in kinds))
    return spans


@pytest.fixture
def spawned_studies(tmp_path, monkeypatch):
    """A deterministic study, a timed one and one whose worker process dies (a study that raises is the in-process
    path's failure, tested above)."""
    return _study_files(tmp_path, monkeypatch, {"det_a": ("ok", 2), "det_timed": ("ok", 1), "det_crash": ("crash", 1)})


def test_jobs_match_the_sequential_run_and_isolate_failures(tmp_path, spawned_studies):
    # in-process: not the crashing study (it would end this process)
    sequential = rp.reproduce(tmp_path / "seq", preset="tiny", device="cpu", progress=False,
                              only=["det_a", "det_timed"])
    parallel = rp.reproduce(tmp_path / "par", preset="tiny", device="cpu", progress=False, jobs=2)
    assert list(parallel) == ["det_a", "det_timed", "det_crash"]
    for name in ("det_a", "det_timed"):
        assert parallel[name]["status"] == "ok", parallel[name].get("traceback")
        assert parallel[name]["claims"] == sequential[name]["claims"], name
        assert (tmp_path / "par" / name / "table.csv").read_text() == (tmp_path / "seq" / name / "table.csv").read_text()
        assert parallel[name]["jobs"] == 2 and sequential[name]["jobs"] == 1
    assert parallel["det_crash"]["status"] == "failed" and "exited with code 3" in parallel["det_crash"]["error"]
    assert not [p for p in (tmp_path / "par").iterdir() if p.name.startswith(".")], "temporary folders left behind"
    # workers of one thread (OMP_NUM_THREADS=1 too); the timed study alone on the jobs' threads, before the others
    spans = {p.stem: json.loads(p.read_text()) for p in spawned_studies.glob("*.json")}
    assert spans["det_a"][2:] == [1, "1"] and spans["det_timed"][2:] == [2, "2"]
    assert parallel["det_a"]["threads"] == 1 and parallel["det_timed"]["threads"] == 2
    assert spans["det_timed"][1] <= spans["det_a"][0], "the timed study ran beside another"
    report = (tmp_path / "par" / "report.md").read_text()
    assert "jobs 2 (worker processes of one thread" in report and "failed studies: det_crash" in report
    # up to date: nothing reruns
    again = rp.reproduce(tmp_path / "par", preset="tiny", device="cpu", progress=False, jobs=2, only=["det_a"])
    assert again["det_a"]["status"] == "skipped"


def test_jobs_argument(tmp_path, fake_studies):
    with pytest.raises(ValueError, match="jobs"):
        rp.reproduce(tmp_path, preset="tiny", jobs=0)
    with pytest.raises(TypeError, match="jobs"):
        rp.reproduce(tmp_path, preset="tiny", jobs=1.5)


def test_default_jobs_follow_the_resolved_device(tmp_path, fake_studies, monkeypatch):
    # a plain `reproduce` (preset full, device auto) on a GPU machine: one job, not an error
    monkeypatch.setattr(rp, "_resolve_device", lambda device: "cuda")
    records = rp.reproduce(tmp_path, only=["good"], progress=False)
    assert records["good"]["status"] == "ok" and records["good"]["device"] == "cuda"
    assert records["good"]["jobs"] == 1 and "jobs 1." in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="jobs must be 1"):   # asked for explicitly: still refused
        rp.reproduce(tmp_path, only=["good"], progress=False, jobs=2)
    assert rp._default_jobs("full", "cpu") == 2
    assert rp._default_jobs("full", "cuda") == rp._default_jobs("quick", "cpu") == 1


def test_a_script_without_a_main_guard_runs_once(tmp_path, spawned_studies):
    # a worker is a fresh interpreter: it never imports the caller's script again (multiprocessing's spawn would,
    # and the script would call reproduce again in every worker)
    script = tmp_path / "user_script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(tmp_path / 'code')!r})\n"
                      "from pixelfly_lab.studies import reproduce as rp\n"
                      "rp.EXPERIMENTS = (rp.Experiment('det_a', 'fake_det_a', 'A'),)\n"
                      "print('the script ran')\n"
                      f"records = rp.reproduce({str(tmp_path / 'out')!r}, preset='tiny', device='cpu', "
                      "progress=False, jobs=2)\n"
                      "print('status', records['det_a']['status'], records['det_a']['threads'])\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("the script ran") == 1, result.stdout
    assert "status ok 2" in result.stdout, result.stdout + result.stderr   # a lone study: the jobs' threads


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_interrupt_stops_each_worker_with_its_children(tmp_path, monkeypatch):
    spans = _study_files(tmp_path, monkeypatch, {"det_sleep": ("sleep", 1)})
    pid_file, out = spans / "det_sleep.pid", tmp_path / "out"
    seen, finished = {}, threading.Event()

    def ctrl_c():  # once the study's child runs: what it ignores, then Ctrl-C to this process
        while not finished.is_set():
            if pid_file.exists():
                status = Path(f"/proc/{int(pid_file.read_text())}/status").read_text()
                seen["ignored"] = int(status.split("SigIgn:")[1].split()[0], 16)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # a background pytest may ignore SIGINT
    thread = threading.Thread(target=ctrl_c, daemon=True)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            rp.reproduce(out, preset="tiny", device="cpu", progress=False, jobs=2)
    finally:
        finished.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)
    assert not seen["ignored"] & (1 << (signal.SIGINT - 1)), "the study's child inherited an ignored SIGINT"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child), "the study's child outlived its stopped worker"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    assert (out / "report.md").exists() and not (out / "det_sleep").exists()


def test_a_worker_that_cannot_start_or_report_fails_its_study_only(tmp_path, spawned_studies, monkeypatch):
    start, read = runner._start_worker, runner._read_result

    def start_or_fail(exp, *args):
        if exp.name == "det_crash":
            raise OSError("no process for you")
        return start(exp, *args)

    def read_or_fail(path):
        if path.stem == "det_timed":
            raise RuntimeError("a garbled record")
        return read(path)

    monkeypatch.setattr(runner, "_start_worker", start_or_fail)
    monkeypatch.setattr(runner, "_read_result", read_or_fail)
    records = rp.reproduce(tmp_path, preset="tiny", device="cpu", progress=False, jobs=2)
    assert records["det_a"]["status"] == "ok", records["det_a"].get("traceback")
    assert records["det_crash"]["status"] == "failed"
    assert "could not start: OSError: no process for you" in records["det_crash"]["error"]
    assert records["det_timed"]["status"] == "failed"
    assert "RuntimeError: a garbled record" in records["det_timed"]["error"]
    assert "failed studies: det_timed, det_crash" in (tmp_path / "report.md").read_text()


def test_a_result_caught_between_its_renames_is_restored(tmp_path, fake_studies):
    # remove_temporary deletes the mkdtemp folders only; `.name-old` is the previous result
    out = tmp_path / "out"
    rp.reproduce(out, preset="quick", device="cpu", progress=False, only=["good"])
    (out / "good").rename(out / ".good-old")                # stopped after name -> .name-old ...
    (out / ".good-tmp-x1y2z3").mkdir()                      # ... before tmp -> name
    runner.remove_temporary(out, "good")
    assert (out / "good" / "claims.json").exists() and not (out / ".good-tmp-x1y2z3").exists()
    assert not (out / ".good-old").exists()
    (out / ".good-old").mkdir()                             # stopped after both renames: the stale copy goes
    runner.remove_temporary(out, "good")
    assert (out / "good" / "claims.json").exists() and not (out / ".good-old").exists()
    # a run killed between the renames (nothing cleaned up) is restored by the next run, and is up to date
    (out / "good").rename(out / ".good-old")
    CALLS.clear()
    records = rp.reproduce(out, preset="quick", device="cpu", progress=False, only=["good"])
    assert records["good"]["status"] == "skipped" and CALLS == []
