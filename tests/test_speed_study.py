"""The speed study's paper claim (pixelfly_lab.studies.speed): Pixelfly trains faster than butterfly at equal parameters."""

import pandas as pd
import pytest
import torch

from pixelfly_lab.nn.butterfly import ButterflyLinear
from pixelfly_lab.nn.layers import PixelflyLinear
from pixelfly_lab.studies import speed as study


def test_butterfly_pair_has_equal_parameters():
    for n in (64, 1024):
        models = study._butterfly_pair(n, depth=2)
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
        assert counts["butterfly"] == counts["pixelfly"]                     # exactly, at these sizes
        assert isinstance(models["butterfly"][0], ButterflyLinear) and isinstance(models["pixelfly"][2], PixelflyLinear)
        assert len(models["pixelfly"]) == 3                                 # layer, GELU, layer
    assert models["pixelfly"](torch.randn(4, 1024)).shape == models["butterfly"](torch.randn(4, 1024)).shape


@pytest.mark.parametrize("ratio, spread, expected", [
    (8.0, 0.05, True),        # clearly faster
    (0.5, 0.05, False),       # clearly slower: refuted
    (1.0, 0.5, None),         # as fast, noisy: undecided
])
def test_butterfly_claim_is_decided_from_paired_repeats(monkeypatch, tmp_path, ratio, spread, expected):
    calls = []

    def fake(models, batch, *, steps, warmup, rounds, threads):
        assert threads == 1 and rounds == 1
        calls.append(list(models))
        wobble = 1 + spread * (len(calls) % 3 - 1)
        times = {"butterfly": 100.0 * wobble, "pixelfly": 100.0 / ratio}
        return pd.DataFrame([dict(model=name, step_ms=times[name], load_avg=1.0) for name in models])

    monkeypatch.setattr(study, "time_training_steps", fake)
    config = study.SpeedConfig(butterfly_n=64, butterfly_rows=8, butterfly_repeats=6)
    claim = study.butterfly_claim(config, tmp_path)
    assert claim.held is expected and claim.kind == "paper" and claim.seeds == 6
    assert calls[0] == ["butterfly", "pixelfly"] and calls[1] == ["pixelfly", "butterfly"]   # interleaved
    assert "abstract" in claim.claim and "parameters 1664 vs 1664" in claim.measured
    assert (tmp_path / "pixelfly_vs_butterfly.csv").is_file()
