"""The reproduce driver and the studies: atomic results, failures isolated (a missing study module
included), up-to-date results skipped, presets, the report, and every study run at TINY."""

import dataclasses
import importlib
import json
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest

from pixelfly_lab.cli import COMMANDS, main
from pixelfly_lab.studies import reproduce as rp
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
    rp.reproduce(tmp_path, preset="full", device="cpu", progress=False)  # another preset: out of date
    assert ("good", 3) in CALLS
    CALLS.clear()
    rp.reproduce(tmp_path, preset="full", device="cpu", force=True, only=["good"], progress=False)
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
    monkeypatch.setattr(rp, "MEASURED_FULL", {"run": "commit x, 2 cores", "minutes": {"good": 2.0, "other": 9.0}})
    monkeypatch.setattr(sys.modules["fake_bad"], "FULL_MINUTES", 3, raising=False)
    rp.reproduce(tmp_path, preset="tiny", device="cpu", progress=False)
    report = (tmp_path / "report.md").read_text()
    # measured where known (studies not in the report's list left out), the estimate elsewhere, the total
    assert ("The full preset (`--preset full`) on 2 CPU cores: at least about 5 minutes in all for the studies with a "
            "time; measured (commit x, 2 cores): good 2.0 min; estimated (each study's FULL_MINUTES, from QUICK's "
            "times; a lower bound where the study says so): bad 3 min; "
            "no time for absent.") in report
    # a full run's own times count as measured
    records = {"good": {"preset": "full", "status": "ok", "seconds": 600.0}}
    assert "measured in this run: good 10.0 min" in rp.full_time(records)
    assert "at least about 13 minutes" in rp.full_time(records)
    # an older measurement below the study's current estimate gives way to the estimate (a lower bound stays one)
    monkeypatch.setattr(sys.modules["fake_good"], "FULL_MINUTES", 4, raising=False)
    assert "estimated (each study's FULL_MINUTES, from QUICK's times; a lower bound where the study says so): good 4, bad 3 min" \
        in rp.full_time()
