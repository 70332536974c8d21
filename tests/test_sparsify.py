"""sparsify: which layers are replaced, by what, within which budget; the model still works."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_lab.layers import BlockSparseLinear, MonarchLinear, PixelflyLinear, StructuredLinear
from pixelfly_lab.patterns import PATTERN_NAMES
from pixelfly_lab.sparsify import linear_layers, sparsify


class Block(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.qkv = nn.Linear(width, 3 * width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0] + self.qkv(x)[..., : x.shape[-1]]
        return x + self.fc2(F.gelu(self.fc1(x)))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(64, 10))


@pytest.mark.parametrize("pattern", [p for p in PATTERN_NAMES if p != "dense"])
def test_every_pattern_replaces_within_budget_and_runs(pattern):
    model = make_model()
    x = torch.randn(2, 5, 64)
    report = sparsify(model, pattern, budget=0.3, block_size=8)
    assert list(report["name"]) == ["0.qkv", "0.fc1", "0.fc2", "1.qkv", "1.fc1", "1.fc2", "2"]
    replaced = report[report["replaced"]]
    assert len(replaced) == 6 and not report.loc[report["name"] == "2", "replaced"].item()  # 10 % 8 != 0
    assert (replaced["budget"] <= 0.3).all()
    assert (replaced["params_after"] == replaced["budget"] * replaced["params_before"]).all()
    for name in replaced["name"]:
        layer = model.get_submodule(name)
        assert isinstance(layer, StructuredLinear) and layer.weight_params == report.set_index("name").loc[name, "params_after"]
    assert model(x).shape == (2, 5, 10)
    model(x).sum().backward()


def test_include_exclude_per_layer_budgets_and_the_attention_out_proj_is_left_alone():
    model = make_model()
    report = sparsify(model, {"*fc*": "pixelfly", "*qkv": "monarch"}, budget={"*fc1": 0.2, "*": 0.5},
                      include="0.*", exclude=["*fc2"], block_size=8)
    rows = report.set_index("name")
    assert rows.loc["0.fc1", "pattern"] == "pixelfly" and rows.loc["0.fc1", "budget"] <= 0.2
    assert rows.loc["0.qkv", "layer"] == "MonarchLinear" and rows.loc["0.qkv", "budget"] <= 0.5
    assert not rows.loc["0.fc2", "replaced"] and not rows.loc["1.fc1", "replaced"]
    assert isinstance(model[0].fc1, PixelflyLinear) and isinstance(model[0].qkv, MonarchLinear)
    assert type(model[0].attn.out_proj) is not nn.Linear and type(model[1].fc1) is nn.Linear
    assert report.attrs["budget"] < 1


def test_tied_layers_are_replaced_everywhere_and_bias_is_kept():
    shared = nn.Linear(32, 32)
    nn.init.constant_(shared.bias, 0.5)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = sparsify(model, "butterfly", budget=0.5, block_size=8)
    assert len(report) == 1 and model[0] is model[2] and isinstance(model[0], BlockSparseLinear)
    assert torch.all(model[0].bias == 0.5)


def test_too_small_or_too_tight_stays_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(64, 64))
    report = sparsify(model, "pixelfly", budget=0.05, block_size=16).set_index("name")
    assert not report.loc["0", "replaced"] and "budget" in report.loc["0", "note"]
    assert linear_layers(model)[0][0] == "0"


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown pattern"):
        sparsify(make_model(), "sparse-ish")
    with pytest.raises(ValueError, match="budget"):
        sparsify(make_model(), budget=1.5)
    with pytest.raises(TypeError, match="wrap it"):
        sparsify(nn.Linear(64, 64))
    with pytest.raises(TypeError, match="include"):
        sparsify(make_model(), include=[3])
