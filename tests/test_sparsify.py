"""sparsify: which layers are replaced, by what, within which budget, how they start; the model still works."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_lab.nn.layers import (BlockSparseLinear, LowRankLinear, MonarchLinear, PixelflyLinear,
                                 StructuredLinear, layer_from_pattern)
from pixelfly_lab.structure.patterns import PATTERN_NAMES, make_pattern
from pixelfly_lab._checks import check_budget
from pixelfly_lab.nn.materialize import materialize
from pixelfly_lab.nn.sparsification import linear_layers, sparsify


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


class Conv1D(nn.Module):
    """The layout of Hugging Face's transformers.pytorch_utils.Conv1D: y = x W + b, W (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


REPLACED = ["0.qkv", "0.fc1", "0.fc2", "1.qkv", "1.fc1", "1.fc2"]


@pytest.mark.parametrize("pattern", [p for p in PATTERN_NAMES if p != "dense"])
def test_every_pattern_replaces_within_budget_and_runs(pattern):
    model = make_model()
    x = torch.randn(2, 5, 64)
    report = sparsify(model, pattern, budget=0.3, block_size=8)
    assert list(report["name"]) == ["0.attn.out_proj", *REPLACED[:3], "1.attn.out_proj", *REPLACED[3:], "2"]
    replaced = report[report["replaced"]]
    assert list(replaced["name"]) == REPLACED                      # "2": 10 % 8 != 0; out_proj: read by MHA
    assert (replaced["budget"] <= 0.3).all()
    assert (replaced["params_after"] == replaced["budget"] * replaced["params_before"]).all()
    for name in replaced["name"]:
        layer = model.get_submodule(name)
        assert isinstance(layer, StructuredLinear) and layer.weight_params == report.set_index("name").loc[name, "params_after"]
    assert model(x).shape == (2, 5, 10)
    model(x).sum().backward()


def test_every_linear_layer_is_reported_with_its_reason():
    model = make_model()
    rows = sparsify(model, "pixelfly", budget=0.3, block_size=8).set_index("name")
    assert "MultiheadAttention" in rows.loc["0.attn.out_proj", "note"] and not rows.loc["0.attn.out_proj", "replaced"]
    assert rows.loc["0.attn.out_proj", "source"] == "NonDynamicallyQuantizableLinear"
    assert "not divisible by block_size=8" in rows.loc["2", "note"]
    assert (rows.loc[REPLACED, "block_size"] == 8).all() and rows["projection_error"].isna().all()


def test_include_exclude_per_layer_budgets():
    model = make_model()
    report = sparsify(model, {"*fc*": "pixelfly", "*qkv": "monarch"}, budget={"*fc1": 0.2, "*": 0.5},
                      include="0.*", exclude=["*fc2"], block_size=8)
    rows = report.set_index("name")
    assert rows.loc["0.fc1", "pattern"] == "pixelfly" and rows.loc["0.fc1", "budget"] <= 0.2
    assert rows.loc["0.qkv", "layer"] == "MonarchLinear" and rows.loc["0.qkv", "budget"] <= 0.5
    assert not rows.loc["0.fc2", "replaced"] and rows.loc["1.fc1", "note"] == "not selected"
    assert isinstance(model[0].fc1, PixelflyLinear) and isinstance(model[0].qkv, MonarchLinear)
    assert type(model[1].fc1) is nn.Linear
    assert report.attrs["budget"] < 1


def test_a_glob_that_matches_nothing_raises_naming_it():
    with pytest.raises(ValueError, match=r"include glob '\*\.mlp\.\*' matches no linear layer"):
        sparsify(make_model(), include=["0.*", "*.mlp.*"])
    with pytest.raises(ValueError, match="exclude glob 'head'"):
        sparsify(make_model(), exclude="head")


def test_shared_module_is_replaced_everywhere_and_bias_is_kept():
    shared = nn.Linear(32, 32)
    nn.init.constant_(shared.bias, 0.5)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = sparsify(model, "butterfly", budget=0.5, block_size=8)
    assert len(report) == 1 and model[0] is model[2] and isinstance(model[0], BlockSparseLinear)
    assert torch.all(model[0].bias == 0.5)


class TiedLM(nn.Module):
    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(F.gelu(self.fc(self.wte(idx))))


def test_a_tied_weight_stays_dense_and_asking_for_it_raises():
    model = TiedLM()
    rows = sparsify(model, "pixelfly", budget=0.5, block_size=8).set_index("name")
    assert rows.loc["lm_head", "note"].startswith("tied to wte") and not rows.loc["lm_head", "replaced"]
    assert model.lm_head.weight is model.wte.weight and rows.loc["fc", "replaced"]
    with pytest.raises(ValueError, match="'lm_head'.*tied to 'wte'"):
        sparsify(TiedLM(), "pixelfly", budget=0.5, block_size=8, include=["fc", "lm_head"])


def test_frozen_mode_dtype_and_device_are_kept():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 32)).double()
    model[0].requires_grad_(False)
    model[1].bias.requires_grad_(False)
    model.eval()
    model[2].train()
    sparsify(model, "pixelfly", budget=0.5, block_size=8)
    assert all(isinstance(m, PixelflyLinear) for m in model)
    assert not any(p.requires_grad for p in model[0].parameters())
    assert model[1].sparse.values.requires_grad and not model[1].bias.requires_grad
    assert all(p.requires_grad for p in model[2].parameters())
    assert [m.training for m in model] == [False, False, True] and not model[0].sparse.training
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert model(torch.randn(3, 32, dtype=torch.float64)).dtype == torch.float64


def test_bfloat16_model_stays_bfloat16():
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    sparsify(model, "pixelfly", budget=0.5, block_size=16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_meta_model_sparsifies_and_materialises():
    with torch.device("meta"):
        model = make_model()
    report = sparsify(model, "pixelfly", budget=0.3, block_size=8)
    assert list(report[report["replaced"]]["name"]) == REPLACED
    assert "materialize" in report.set_index("name").loc["0.fc1", "note"]
    assert {p.device.type for p in model.parameters()} == {"meta"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # every module's init is reached
        materialize(model, "cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    y = model(torch.randn(2, 5, 64))
    assert torch.isfinite(y).all()
    layer = model[0].fc1
    reference = layer_from_pattern(make_pattern("pixelfly", 256, 64, 0.3, block_size=8))
    assert torch.equal(layer.sparse.layout, reference.sparse.layout)   # the structure survived to_empty
    assert 0 < layer.dense_weight().std() < 1
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


@pytest.mark.parametrize("budget", [np.float32(0.25), np.float64(0.25), Fraction(1, 4), 0.25])
def test_any_real_number_is_a_budget(budget):
    model = nn.Sequential(nn.Linear(64, 64))
    report = sparsify(model, "pixelfly", budget=budget, block_size=8)
    assert report["replaced"].item() and report["budget"].item() <= 0.25


@pytest.mark.parametrize("budget", [1, 1.0, np.float32(1.0), Fraction(1, 1)])
def test_budget_of_one_leaves_layers_dense(budget):
    model = nn.Sequential(nn.Linear(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # asked for dense: no "replaced too few" warning
        report = sparsify(model, "pixelfly", budget=budget, block_size=8)
    assert not report["replaced"].item() and report["note"].item() == "budget=1: dense"
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("budget, error", [(1.5, ValueError), (Fraction(3, 2), ValueError), (0, ValueError),
                                           (float("nan"), ValueError), (True, TypeError), ("0.5", TypeError),
                                           ({"*": 2.0}, ValueError)])
def test_budget_outside_zero_one_is_refused_by_the_one_budget_rule(budget, error):
    """sparsify and every layer take a budget through pixelfly_lab._checks.check_budget: (0, 1]."""
    with pytest.raises(error, match="budget"):
        sparsify(nn.Sequential(nn.Linear(64, 64)), budget=budget)
    with pytest.raises(error, match="budget"):
        check_budget(budget if not isinstance(budget, dict) else 2.0)


def test_sparsify_twice_leaves_structured_layers_and_says_so():
    model = make_model()
    sparsify(model, "pixelfly", budget=0.3, block_size=8)
    before = [model.get_submodule(name) for name in REPLACED]
    with pytest.warns(UserWarning, match="already structured"):
        rows = sparsify(model, "pixelfly", budget=0.1, block_size=8).set_index("name")
    assert [model.get_submodule(name) for name in REPLACED] == before
    assert (rows.loc[REPLACED, "pattern"] == "structured").all() and not rows.loc[REPLACED, "replaced"].any()
    assert rows.loc["0.fc1", "note"].startswith("already structured")
    assert rows.loc["0.fc1", "params_after"] == model[0].fc1.weight_params


def test_block_size_auto_takes_the_largest_block_dividing_both_sizes():
    model = nn.Sequential(nn.Linear(196, 384), nn.GELU(), nn.Linear(384, 196), nn.Linear(256, 512))
    with pytest.warns(UserWarning, match="replaced 0 of the 1"):
        fixed = sparsify(nn.Sequential(nn.Linear(196, 384)), budget=0.3, block_size=32).set_index("name")
    assert "not divisible by block_size=32" in fixed.loc["0", "note"]
    # 196 = 4 * 49 admits butterfly sizes 2 and 4 only, so a flat butterfly needs budget > 0.5 there
    rows = sparsify(model, "pixelfly", budget=0.6, block_size="auto").set_index("name")
    assert rows["replaced"].all() and list(rows["block_size"]) == [4, 4, 32]
    assert model[0].sparse.block_size == 4 and model[:3](torch.randn(2, 196)).shape == (2, 196)
    odd = sparsify(nn.Sequential(nn.Linear(6, 10)), block_size="auto")
    assert not odd["replaced"].item() and "no block" in odd["note"].item()


def test_init_match_gives_the_replaced_std_and_kaiming_is_the_layers_own():
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128), nn.Linear(128, 128))
    for layer, std in zip(model, (0.02, 0.05, 0.0)):
        nn.init.normal_(layer.weight, std=std)
    sparsify(model, {"0": "pixelfly", "1": "monarch", "2": "lowrank"}, budget=0.3, block_size=16)
    for layer, std in zip(model, (0.02, 0.05)):
        assert abs(layer.dense_weight().std().item() / std - 1) < 0.03  # normal_ samples: std within 3%
    assert torch.all(model[2].dense_weight() == 0)
    assert torch.any(model[2].v != 0)  # a zero target zeroes one factor only: gradients still flow

    dense = nn.Sequential(nn.Linear(128, 256))
    torch.manual_seed(3)
    sparsify(dense, "pixelfly", budget=0.3, block_size=16, init="kaiming")
    torch.manual_seed(3)
    reference = layer_from_pattern(make_pattern("pixelfly", 256, 128, 0.3, block_size=16))
    torch.testing.assert_close(dense[0].dense_weight(), reference.dense_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("zero_bias", [False, True])
def test_match_layer_takes_the_replaced_std_and_bias_in_either_orientation(zero_bias):
    """match_layer_ (sparsify's and materialize's one 'match' step): nn.Linear and Conv1D ((in, out))."""
    torch.manual_seed(0)
    for replaced in (nn.Linear(64, 128), Conv1D(128, 64)):
        nn.init.normal_(replaced.weight, std=0.03)
        if zero_bias:
            nn.init.zeros_(replaced.bias)
        layer = layer_from_pattern(make_pattern("pixelfly", 128, 64, 0.3, block_size=8))
        before = layer.weight_std()
        factor = layer.match_layer_(replaced)
        assert factor == pytest.approx(float(replaced.weight.std()) / before, rel=1e-6)
        assert layer.weight_std() == pytest.approx(float(replaced.weight.std()), rel=1e-5)
        assert torch.equal(layer.bias, replaced.bias) and layer.zero_bias == zero_bias
        assert layer.init_scale == 1.0 and layer.sparse.init_scale == pytest.approx(factor)  # remembered


def test_init_project_is_the_projection_of_the_weight():
    torch.manual_seed(0)
    a, b = torch.randn(128, 8), torch.randn(8, 64)
    decaying = a @ b + 0.01 * torch.randn(128, 64)                  # rank 8 plus a little noise
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(64, 128))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(decaying)
    rows = sparsify(model, {"0": "butterfly", "1": "lowrank", "2": "pixelfly"}, budget=0.3, block_size=8,
                    init="project").set_index("name")
    mask = model[0].mask()
    torch.testing.assert_close(model[0].dense_weight(), decaying * mask)          # exact: S = W0 on the support
    sparse_alone = (torch.linalg.norm(decaying * ~mask) / torch.linalg.norm(decaying)).item()
    assert rows.loc["0", "projection_error"] == pytest.approx(sparse_alone, rel=1e-5)
    s = torch.linalg.svdvals(decaying.double())
    eckart_young = (s[model[1].rank:].norm() / s.norm()).item()
    assert rows.loc["1", "projection_error"] == pytest.approx(eckart_young, rel=0.05, abs=1e-4)
    pixelfly = model[2]
    recomputed = (torch.linalg.norm(decaying - pixelfly.dense_weight()) / torch.linalg.norm(decaying)).item()
    assert rows.loc["2", "projection_error"] == pytest.approx(recomputed, rel=1e-4)
    assert recomputed < (torch.linalg.norm(decaying * ~pixelfly.sparse.mask()) / torch.linalg.norm(decaying)).item()


def test_conv1d_layers_are_recognised_and_replaced_in_their_orientation():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(64, 32), nn.GELU(), Conv1D(32, 64))
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    assert [name for name, _ in linear_layers(model)] == ["0", "2"]
    rows = sparsify(model, "butterfly", budget=0.5, block_size=8, init="project").set_index("name")
    assert list(rows["source"]) == ["Conv1D", "Conv1D"] and rows.loc["0", "shape"] == (64, 32)
    layer = model[0]
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ (weight * layer.mask().T) + bias)
    assert model(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_transformer_encoder_fast_path_keeps_working_in_eval():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True),
                                    num_layers=2, enable_nested_tensor=False)
    rows = sparsify(encoder, "pixelfly", budget=0.5, block_size=16).set_index("name")
    assert rows.loc[["layers.0.linear1", "layers.1.linear2"], "replaced"].all()
    assert "fast path" in rows.loc["layers.0.linear1", "note"]
    assert "MultiheadAttention" in rows.loc["layers.0.self_attn.out_proj", "note"]
    x = torch.randn(2, 7, 64)
    train_out = encoder(x)
    encoder.eval()
    with torch.no_grad():
        eval_out = encoder(x)
    torch.testing.assert_close(eval_out, train_out.detach())


def test_replaced_layers_match_their_dense_weight_on_real_activations():
    model = make_model()
    sparsify(model, "pixelfly", budget=0.3, block_size=8)
    seen = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o: seen.append((m, i[0], o)))
             for n in REPLACED]
    model(torch.randn(2, 5, 64))
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(REPLACED)
    for layer, x, y in seen:
        torch.testing.assert_close(y, F.linear(x, layer.dense_weight(), layer.bias))


def test_too_small_or_too_tight_stays_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(64, 64))
    with pytest.warns(UserWarning, match="replaced 0 of the 2"):
        report = sparsify(model, "pixelfly", budget=0.05, block_size=16).set_index("name")
    assert not report.loc["0", "replaced"] and "budget" in report.loc["0", "note"]
    assert linear_layers(model)[0][0] == "0"


def test_progress_bar_is_shown_when_asked(capsys):
    sparsify(nn.Sequential(nn.Linear(64, 64)), budget=0.5, block_size=8, progress=True)
    assert "sparsify" in capsys.readouterr().err


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown pattern"):
        sparsify(make_model(), "sparse-ish")
    for bad in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            sparsify(make_model(), budget=bad)
    with pytest.raises(TypeError, match="budget"):
        sparsify(make_model(), budget="0.25")
    with pytest.raises(TypeError, match="wrap it"):
        sparsify(nn.Linear(64, 64))
    with pytest.raises(TypeError, match="include"):
        sparsify(make_model(), include=[3])
    with pytest.raises(ValueError, match="init"):
        sparsify(make_model(), init="xavier")
    with pytest.raises(ValueError, match="block_size"):
        sparsify(make_model(), block_size=0)
    with pytest.raises(TypeError, match="block_size"):
        sparsify(make_model(), block_size="big")


def test_gating_and_lowrank_init_reach_the_layers():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    nn.init.normal_(model[0].weight, std=0.02)
    sparsify(model, "pixelfly", budget=0.4, block_size=16, gating=True, lowrank_init="kaiming")
    assert all(layer.gate is not None for layer in model)
    both = model[0].sparse.dense_weight() + model[0].lowrank.dense_weight()
    assert abs(both.std().item() / 0.02 - 1) < 0.03        # 'match' measures a gated layer's S + U V^T
    assert model(torch.randn(3, 64)).shape == (3, 64)
    with pytest.raises(ValueError, match="gating=False"):
        sparsify(nn.Sequential(nn.Linear(64, 64)), gating=True, init="project")
    with pytest.raises(ValueError, match="lowrank_init"):
        sparsify(nn.Sequential(nn.Linear(64, 64)), lowrank_init="orthogonal")


@pytest.mark.parametrize("rank_budget", [0.3, 0.6])
def test_weight_std_from_the_factors_equals_the_dense_std(rank_budget):
    torch.manual_seed(0)
    layer = PixelflyLinear(64, 128, budget=rank_budget, block_size=8, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3)                                     # a nonzero mean, to check the centring
    assert layer.rank > 0
    assert layer.weight_std() == pytest.approx(layer.dense_weight().std().item(), rel=1e-10)


def test_build_model_where_a_family_glob_matches_nothing_still_builds():
    from pixelfly_lab.training.data import load_data
    from pixelfly_lab.training.models import build_model
    model = build_model("mlp", load_data("digits"), depth=1, pattern="pixelfly", budget=0.25)
    assert not model.report["replaced"].any()        # no hidden-to-hidden layer at depth 1
    assert set(model.report["note"]) == {"not selected"}


@pytest.mark.parametrize("shape", [(128, 64), (64, 128), (64, 64)])
def test_init_project_recovers_a_weight_that_already_has_the_structure(shape):
    from pixelfly_lab.structure.projections import monarch_dense
    out_f, in_f = shape
    model = nn.Sequential(nn.Linear(in_f, out_f))
    planned = make_pattern("monarch", out_f, in_f, 0.3, block_size=8)
    mid, nb = min(shape), planned.nblocks
    torch.manual_seed(0)
    target = monarch_dense(torch.randn(nb, out_f // nb, mid // nb), torch.randn(nb, mid // nb, in_f // nb))
    with torch.no_grad():
        model[0].weight.copy_(target)
    rows = sparsify(model, "monarch", budget=0.3, block_size=8, init="project")
    assert isinstance(model[0], MonarchLinear) and model[0].nblocks == nb
    assert rows["projection_error"].item() < 1e-5
    torch.testing.assert_close(model[0].dense_weight(), target, rtol=1e-4, atol=1e-5)


def test_a_parametrized_linear_is_listed_and_left_alone():
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).T

    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    parametrize.register_parametrization(model[1], "weight", Symmetric())
    rows = sparsify(model, "pixelfly", budget=0.5, block_size=8).set_index("name")
    assert rows.loc["0", "replaced"] and not rows.loc["1", "replaced"]
    assert "parametrize" in rows.loc["1", "note"]


def test_sparsify_never_imports_transformers():
    import subprocess
    import sys
    code = ("import sys, torch; from pixelfly_lab.nn.sparsification import sparsify; "
            "sparsify(torch.nn.Sequential(torch.nn.Linear(32, 32)), block_size=8); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_lazy_linear_is_left_until_it_has_a_shape():
    model = nn.Sequential(nn.LazyLinear(32), nn.Linear(32, 32))
    rows = sparsify(model, "pixelfly", budget=0.5, block_size=8).set_index("name")
    assert "forward pass" in rows.loc["0", "note"] and rows.loc["1", "replaced"]
    model(torch.randn(2, 16))                          # now an nn.Linear(16, 32)
    again = sparsify(model, "pixelfly", budget=0.5, block_size=8, include="0").set_index("name")
    assert again.loc["0", "replaced"]


# --- no silent no-ops (issue 22): one warning with the count and reasons; NaN weights named -------

def test_a_model_without_linear_layers_warns_that_nothing_was_replaced():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Conv1d(8, 8, 3))
    with pytest.warns(UserWarning, match="no linear layer"):
        report = sparsify(model)
    assert report.empty


@pytest.mark.parametrize("options, why", [
    (dict(budget=0.001), "too small"),                       # no plan fits the budget
    (dict(block_size=24), "not divisible by block_size=24"),  # a fixed block that divides nothing
])
def test_replacing_nothing_warns_once_with_the_count_and_first_reasons(options, why):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sparsify(model, **{"budget": 0.25, **options})
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "replaced 0 of the 2" in messages[0] and why in messages[0], messages
    assert not report["replaced"].any()


def test_fewer_than_half_warns_and_half_or_more_does_not():
    def mlp():
        return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))

    with pytest.warns(UserWarning, match=r"replaced 1 of the 4 .*3 stay dense, e.g. 1: budget=0.001"):
        sparsify(mlp(), budget={"0": 0.25, "*": 0.001}, block_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = sparsify(mlp(), budget=0.25, block_size=16)   # 3 of 4 (the 10-wide head stays dense)
    assert report["replaced"].sum() == 3


def test_block_size_auto_is_the_default_and_covers_a_small_mlp():
    """A fixed block 32 leaves a 64-wide MLP dense at budget 0.25 (with a warning); 'auto' replaces all."""
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Linear(64, 64))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = sparsify(mlp(), budget=0.25)
    assert report["replaced"].all() and set(report["block_size"]) <= {32, 16, 8, 4}
    with pytest.warns(UserWarning, match="replaced 0 of the 3"):
        fixed = sparsify(mlp(), budget=0.25, block_size=32)
    assert not fixed["replaced"].any()


@pytest.mark.parametrize("init", ["match", "project", "kaiming"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise_naming_the_layer(init, bad):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[3, 5] = bad
    with pytest.raises(ValueError, match=r"layer '2' has 1 non-finite entry"):
        sparsify(model, budget=0.5, block_size=8, init=init)
