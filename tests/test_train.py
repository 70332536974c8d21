"""Training: schedule, outputs, determinism, exact resume, two-process torchrun, command line, errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pixelfly_lab.cli import main
from pixelfly_lab.train import CHECKPOINT, TrainConfig, lr_at, train

HAS_SPARSIFY = importlib.util.find_spec("pixelfly_lab.sparsify") is not None
# teacher regression: no data files, no scikit-learn, 4 steps per epoch
TINY = dict(model="mlp", data="teacher", max_train=128, max_test=64, batch_size=32, epochs=3, lr=1e-2,
            progress=False, device="cpu")


def _params(path: Path) -> dict:
    return torch.load(path / CHECKPOINT, weights_only=True)["model"]


def _same_history(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns="step_time"), b.drop(columns="step_time"), check_exact=True)


def test_schedule_warmup_then_cosine():
    config = TrainConfig(lr=1.0, warmup=0.1, min_lr=0.1)
    lrs = [lr_at(step, 100, config) for step in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, config) == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 45 / 90)).item()))


def test_outputs_and_determinism(tmp_path):
    a = train(TrainConfig(**TINY, out=str(tmp_path / "a")))
    b = train(TrainConfig(**TINY, out=str(tmp_path / "b")))
    for name in ("history.csv", "ranks.csv", "summary.json", CHECKPOINT):
        assert (tmp_path / "a" / name).is_file()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary files left
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    for key in ("test_mse", "params", "dense_params", "density", "seconds", "examples_per_second", "world_size",
                "config", "versions", "device", "completed"):
        assert key in summary, key
    assert summary["completed"] and summary["world_size"] == 1 and summary["density"] == 1.0
    assert summary["steps"] == 12 and summary["config"]["data"] == "teacher"
    history = pd.read_csv(tmp_path / "a" / "history.csv")
    assert (history.event == "step").sum() == 12 and (history.event == "eval").sum() == 3
    assert set(pd.read_csv(tmp_path / "a" / "ranks.csv").layer) == {"layers.0", "layers.1"}
    _same_history(a.history, b.history)
    assert a.summary["rank_fingerprints"] == b.summary["rank_fingerprints"]
    c = train(TrainConfig(**{**TINY, "seed": 1}, out=str(tmp_path / "c")))
    assert c.summary["rank_fingerprints"] != a.summary["rank_fingerprints"]
    assert a.history.train_loss.iloc[-1] < a.history.train_loss.iloc[0]  # it learns


@pytest.mark.parametrize("stop_at", [4, 6])  # at an epoch's end, and inside an epoch
def test_resume_equals_uninterrupted(tmp_path, stop_at):
    whole = train(TrainConfig(**TINY, out=str(tmp_path / "whole")))
    first = train(TrainConfig(**TINY, out=str(tmp_path / "parts"), max_steps=stop_at))
    assert not first.summary["completed"] and first.summary["steps"] == stop_at
    rest = train(TrainConfig(**TINY, out=str(tmp_path / "parts"), resume=True))
    assert rest.summary["completed"]
    for key, value in _params(tmp_path / "whole").items():
        assert torch.equal(value, _params(tmp_path / "parts")[key]), key
    _same_history(whole.history, rest.history)
    _same_history(pd.read_csv(tmp_path / "whole" / "history.csv"), pd.read_csv(tmp_path / "parts" / "history.csv"))


def test_resume_refuses_other_config_and_corrupt_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(**TINY, out=out, max_steps=2))
    with pytest.raises(ValueError, match="config changed.*lr"):
        train(TrainConfig(**{**TINY, "lr": 0.5}, out=out, resume=True))
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        train(TrainConfig(**TINY, out=out, resume=True))


def test_two_process_torchrun_matches_one_process(tmp_path):
    args = ["--model", "mlp", "--data", "teacher", "--max-train", "128", "--max-test", "64", "--batch-size", "32",
            "--epochs", "2", "--lr", "1e-2", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "pixelfly_lab", "train", *args, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["completed"]
    assert summary["ranks_agree"] and len(summary["rank_fingerprints"]) == 2
    # each rank took half of every global batch; averaged gradients = the one-process full batch
    train(TrainConfig(**TINY | {"epochs": 2}, out=str(tmp_path / "one")))
    for key, value in _params(tmp_path / "one").items():
        torch.testing.assert_close(_params(tmp_path / "ddp")[key], value, rtol=1e-4, atol=1e-5)


def test_command_line(tmp_path, capsys):
    code = main(["train", "--model", "mlp", "--data", "teacher", "--max-train", "64", "--max-test", "32",
                 "--batch-size", "32", "--epochs", "1", "--out", str(tmp_path / "cli"), "--no-progress"])
    assert code == 0 and "test_mse" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["config"]["epochs"] == 1
    for bad in (["--model", "cnn"], ["--data", "imagenet"], ["--pattern", "swiss"]):
        with pytest.raises(SystemExit):
            main(["train", *bad])


def test_bad_config():
    for field, value, message in [("model", "cnn", "unknown model"), ("data", "imagenet", "unknown data"),
                                  ("pattern", "swiss", "unknown pattern"), ("budget", 0.0, "budget"),
                                  ("budget", 1.5, "budget"), ("epochs", 0, "epochs"), ("lr", -1.0, "lr"),
                                  ("device", "tpu", "unknown device"), ("warmup", 2.0, "warmup")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="data_dir"):
        TrainConfig(data="cifar10")
    with pytest.raises(ValueError, match="batch_size=64 exceeds"):
        train(TrainConfig(**{**TINY, "max_train": 10, "batch_size": 64}))


def test_missing_cifar_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        train(TrainConfig(**{**TINY, "data": "cifar10"}, data_dir=str(tmp_path / "nowhere"), out=str(tmp_path)))


@pytest.mark.skipif(not HAS_SPARSIFY, reason="pixelfly_lab.sparsify is not in this checkout")
def test_sparse_training_and_resume(tmp_path):
    config = {**TINY, "pattern": "pixelfly", "budget": 0.25}
    whole = train(TrainConfig(**config, out=str(tmp_path / "whole")))
    assert whole.summary["density"] < 0.6 and whole.summary["sparsified_layers"] == 2
    assert whole.ranks.effective_rank.notna().all()
    train(TrainConfig(**config, out=str(tmp_path / "parts"), max_steps=5))
    train(TrainConfig(**config, out=str(tmp_path / "parts"), resume=True))
    for key, value in _params(tmp_path / "whole").items():
        assert torch.equal(value, _params(tmp_path / "parts")[key]), key
