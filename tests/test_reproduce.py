"""The reproduce driver: atomic results, failures isolated, up-to-date results skipped, a report."""

import json
import subprocess
import sys
import types

import pytest

from pixelfly_lab import reproduce as rp
from pixelfly_lab.claims import Claim

CALLS = []


def _good(out, *, quick, device):
    CALLS.append("good")
    (out / "table.csv").write_text("a,b\n1,2\n")
    return [Claim("two is two", "2", True, None)]


def _bad(out, *, quick, device):
    CALLS.append("bad")
    (out / "partial.csv").write_text("half")
    raise RuntimeError("boom")


@pytest.fixture
def fake_experiments(monkeypatch):
    module = types.ModuleType("fake_experiments")
    module.good, module.bad = _good, _bad
    monkeypatch.setitem(sys.modules, "fake_experiments", module)
    monkeypatch.setattr(rp, "EXPERIMENTS", (
        rp.Experiment("good", "fake_experiments:good", "Good"),
        rp.Experiment("bad", "fake_experiments:bad", "Bad"),
        rp.Experiment("absent", "pixelfly_lab_no_such_module:f", "Absent"),
    ))
    CALLS.clear()


def test_failure_is_reported_and_does_not_lose_other_results(tmp_path, fake_experiments):
    records = rp.reproduce(tmp_path, quick=True, device="cpu")
    assert records["good"]["status"] == "ok" and records["bad"]["status"] == "failed"
    assert records["absent"]["status"] == "unavailable"
    assert (tmp_path / "good" / "table.csv").exists()
    assert not (tmp_path / "bad").exists(), "a failed experiment must leave no half result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    report = (tmp_path / "report.md").read_text()
    assert "RuntimeError: boom" in report and "two is two" in report and "held" in report
    assert "two is two" in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "good" / "claims.json").read_text())["claims"][0]["held"] is True


def test_rerun_skips_up_to_date_unless_forced(tmp_path, fake_experiments):
    rp.reproduce(tmp_path, quick=True, device="cpu")
    CALLS.clear()
    records = rp.reproduce(tmp_path, quick=True, device="cpu")
    assert records["good"]["status"] == "skipped" and CALLS == ["bad"]
    CALLS.clear()
    rp.reproduce(tmp_path, quick=False, device="cpu")  # other settings: out of date
    assert "good" in CALLS
    CALLS.clear()
    rp.reproduce(tmp_path, quick=False, device="cpu", force=True, only=["good"])
    assert CALLS == ["good"]


def test_bad_arguments(tmp_path, fake_experiments):
    with pytest.raises(ValueError, match="only"):
        rp.reproduce(tmp_path, only=["nope"])
    with pytest.raises(ValueError, match="device"):
        rp.reproduce(tmp_path, device="tpu")


def test_command_line_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "pixelfly_lab", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "reproduce" in out


def test_patterns_experiment_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pixelfly_lab", "reproduce", "--quick", "--out", str(tmp_path),
                          "--only", "patterns", "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "patterns" / "claims.json").read_text())
    assert record["status"] == "ok" and all(c["held"] for c in record["claims"])
    assert (tmp_path / "patterns" / "baselines.png").stat().st_size > 0
    assert (tmp_path / "patterns" / "baselines.pdf").stat().st_size > 0
