"""Building under ``with torch.device("meta")`` and materialising gives what building on the CPU gives.

Layers: built on meta, ``to_empty`` + ``reset_parameters`` (through ``pl.materialize``) with the
same seed equal the CPU build exactly (the init draws in the same order); what ``init='match'``
chose is remembered by ``reset_parameters``. Models: ``pl.materialize`` draws every parameter
once, in model order, so ``build_model``'s MLP and Mixer equal the CPU build exactly, and a model
with its own ``init_weights`` gets its structured layers (parts included) drawn once. The
Transformer and a Hugging Face GPT-2 (from a config, nothing downloaded; its constructor draws and
its init_weights draws again) get the same statistics as the eager model, ties restored, and
Hugging Face's ``init_weights`` works after ``sparsify``.
"""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is fetched

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pixelfly_lab as pl
from pixelfly_lab.nn.base import StructuredLinear
from pixelfly_lab.structure.masks import layout_to_mask

LAYOUT = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)

LAYERS = {
    "masked": lambda: pl.MaskedLinear(32, 32, layout_to_mask(LAYOUT, 8)),
    "blocksparse": lambda: pl.BlockSparseLinear(32, 32, LAYOUT, 8),
    "lowrank_svd": lambda: pl.LowRankLinear(32, 48, 4),
    "lowrank_kaiming": lambda: pl.LowRankLinear(32, 48, 4, init="kaiming"),
    "pixelfly_budget": lambda: pl.PixelflyLinear(256, 1024, budget=0.25),      # the failing example
    "pixelfly_gated": lambda: pl.PixelflyLinear(64, 128, butterfly_size=8, n_factors=2, rank=4, block_size=8,
                                                gating=True, lowrank_init="kaiming"),
    "monarch": lambda: pl.MonarchLinear(32, 64, 4),
    "butterfly": lambda: pl.ButterflyLinear(16, bias=True),
}


def _cpu_and_meta(build, seed=0):
    torch.manual_seed(seed)
    cpu = build()
    with torch.device("meta"):
        meta = build()
    return cpu, meta


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_built_on_meta_and_materialised_equals_the_cpu_build(name):
    cpu, meta = _cpu_and_meta(LAYERS[name])
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}, "all follow the context"
    assert meta.weight_params == cpu.weight_params and meta.budget == cpu.budget
    torch.manual_seed(0)
    pl.materialize(meta, "cpu")
    for (key, want), (key2, got) in zip(cpu.state_dict().items(), meta.state_dict().items()):
        assert key == key2 and got.device.type == "cpu"
        assert torch.equal(want, got), key                              # the same draws, in the same order
    x = torch.randn(3, cpu.in_features)
    torch.testing.assert_close(meta(x), cpu(x))


def test_building_on_meta_draws_nothing_from_the_global_rng():
    torch.manual_seed(0)
    with torch.device("meta"):
        for build in LAYERS.values():
            build()
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))            # the SVD init's host draw is skipped on meta


def test_masks_and_plans_are_host_tensors_whatever_the_ambient_device():
    with torch.device("meta"):
        layout = pl.flat_block_butterfly_layout(64, 64, 8, 2, 8)
        pattern = pl.make_pattern("bigbird", 64, 64, 0.3, block_size=8)
        plan = pl.plan_pixelfly(1024, 256, 0.25)
    assert layout.device.type == "cpu" and pattern.layout.device.type == "cpu"
    assert torch.equal(layout, pl.flat_block_butterfly_layout(64, 64, 8, 2, 8))
    assert plan == pl.plan_pixelfly(1024, 256, 0.25)


@pytest.mark.parametrize("name", ["blocksparse", "lowrank_svd", "pixelfly_gated", "monarch", "butterfly"])
def test_reset_parameters_remembers_the_matched_scale_and_zero_bias(name):
    torch.manual_seed(1)
    layer = LAYERS[name]()
    own = layer.weight_std()
    factor = layer.match_(0.25 * own, zero_bias=True)
    assert factor == pytest.approx(0.25, rel=1e-6) and layer.weight_std() == pytest.approx(0.25 * own, rel=1e-6)
    torch.manual_seed(2)
    for m in reversed(list(layer.modules())):            # parts before the layer, as materialize does
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    fresh = LAYERS[name]()
    torch.manual_seed(2)
    for m in reversed(list(fresh.modules())):
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    # the same draws as a fresh layer's own init, times the remembered factor: exact, not statistical
    torch.testing.assert_close(layer.weight, 0.25 * fresh.weight, rtol=1e-5, atol=1e-7)
    assert torch.all(layer.bias == 0)


def test_init_project_records_what_was_asked():
    model = nn.Sequential(nn.Linear(64, 128))
    pl.sparsify(model, budget=0.5, block_size=8, init="project", lowrank_init="svd")
    assert model[0].rank > 0 and model[0].lowrank.init == "svd" and model[0].lowrank.init_scale == 1.0


def _close_stats(want: torch.Tensor, got: torch.Tensor, name: str):
    """Two independent draws of one init: constants equal; else means and standard deviations within
    5 standard errors of their difference (means: sd sqrt(2/n); stds: about sd sqrt(1/n)), + 5% for stds."""
    want, got = want.detach().double().flatten(), got.detach().double().flatten()
    if float(want.std()) == 0:
        torch.testing.assert_close(got, want, msg=name)                 # constants: ones, zeros
        return
    n, sd = want.numel(), float(want.std())
    assert abs(float(got.std()) / sd - 1) < 5 / n ** 0.5 + 0.05, (name, sd, float(got.std()))
    assert abs(float(got.mean() - want.mean())) < 5 * sd * (2 / n) ** 0.5, (name, float(want.mean()),
                                                                          float(got.mean()))


@pytest.mark.parametrize("family, data", [("mlp", "digits"), ("mixer", "digits"), ("gpt", "chars")])
def test_build_model_on_meta_materialises_as_the_cpu_build(family, data):
    """Materialised with the model's seed: the MLP and the Mixer equal the CPU build exactly (every
    parameter drawn once, in build order). The Transformer draws its position embedding before its
    blocks, materialize resets a parent after its sub-modules: the same statistics, other draws."""
    task = pl.load_data(data, **({"context": 32} if data == "chars" else {}))
    options = dict(pattern="pixelfly", budget=0.25, block_size=8, seed=3)
    cpu = pl.build_model(family, task, **options)
    with torch.device("meta"):
        meta = pl.build_model(family, task, **options)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert list(meta.report["replaced"]) == list(cpu.report["replaced"]) and cpu.report["replaced"].any()
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # no module left uninitialised
        pl.materialize(meta, "cpu")
    for (key, want), (_, got) in zip(cpu.state_dict().items(), meta.state_dict().items()):
        if want.dtype == torch.bool or family != "gpt":
            assert torch.equal(want, got), key                           # layouts and masks always exact
        else:
            _close_stats(want, got, key)
    x = task.x_train[:4]
    assert torch.isfinite(meta(x)).all()


class _InitWeights(nn.Module):
    """A model with its own init_weights (as Hugging Face's) that draws nothing, reads every
    ``.weight`` (a structured layer's too) and holds a structured layer with structured parts."""

    def __init__(self):
        super().__init__()
        self.pix = pl.PixelflyLinear(32, 64, butterfly_size=4, n_factors=2, rank=4, block_size=8)
        self.head = nn.Linear(64, 4)
        self.init_weights()

    def init_weights(self):
        for module in self.modules():
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                nn.init.constant_(module.weight, 0.01)       # a structured layer's .weight is a copy
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return self.head(self.pix(x))


def test_materialize_with_init_weights_resets_each_structured_part_once():
    """Every parameter drawn once, in model order: the structured layer (its parts first) equals the
    CPU build's exactly; resetting its parts again (as before) would draw other values."""
    torch.manual_seed(0)
    cpu = _InitWeights()
    with torch.device("meta"):
        meta = _InitWeights()
    calls = {}
    for name, module in meta.named_modules():
        if isinstance(module, StructuredLinear):
            reset = module.reset_parameters
            module.reset_parameters = lambda name=name, reset=reset: (calls.update({name: calls.get(name, 0) + 1}),
                                                                      reset())[1]
    torch.manual_seed(0)
    pl.materialize(meta, "cpu")
    assert calls == {"pix": 1, "pix.sparse": 1, "pix.lowrank": 1}
    for (key, want), (key2, got) in zip(cpu.state_dict().items(), meta.state_dict().items()):
        assert key == key2 and torch.equal(want, got), key


def test_materialize_warns_when_a_module_has_no_init():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.warns(UserWarning, match=r"no reset_parameters.*'1'"):
        pl.materialize(model, "cpu")
    with pytest.raises(TypeError, match="model"):
        pl.materialize("not a model")


def test_pixelfly_attention_builds_on_meta():
    kw = dict(budget=0.5, block_size=8)
    torch.manual_seed(0)
    cpu = pl.PixelflyAttention(64, 2, 128, **kw)
    with torch.device("meta"):
        meta = pl.PixelflyAttention(64, 2, 128, **kw)
    torch.manual_seed(0)
    pl.materialize(meta, "cpu")
    for (key, want), (_, got) in zip(cpu.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(want, got), key


# --- Hugging Face GPT-2 (transformers is a test requirement only) ---------------------------------

transformers = pytest.importorskip("transformers")


def _gpt2(device=None):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=65, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    with torch.device(device or "cpu"):
        return transformers.GPT2LMHeadModel(config)


def test_hf_gpt2_built_on_meta_sparsified_materialised_matches_the_eager_model():
    torch.manual_seed(0)
    eager = _gpt2()
    pl.sparsify(eager, budget=0.25)
    meta = _gpt2("meta")
    report = pl.sparsify(meta, budget=0.25)
    assert report["replaced"].sum() == 8 and "materialize" in report.loc[0, "note"]
    torch.manual_seed(1)
    pl.materialize(meta, "cpu")
    assert meta.lm_head.weight is meta.transformer.wte.weight, "the tie to_empty breaks is restored"
    eager_params, meta_params = dict(eager.named_parameters()), dict(meta.named_parameters())
    assert eager_params.keys() == meta_params.keys()
    for key, want in eager_params.items():
        _close_stats(want, meta_params[key], key)
    c_proj = meta.transformer.h[0].mlp.c_proj                     # GPT-2's scaled residual init: 0.02/sqrt(2 n_layer)
    assert c_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)
    assert torch.all(c_proj.bias == 0) and c_proj.zero_bias and c_proj.deferred_match is None
    ids = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(meta(input_ids=ids, labels=ids).loss)


def test_hf_gpt2_sparsified_on_meta_with_kaiming_init_materialises():
    """init='kaiming' leaves the structured layers in the model during init_weights, which reads
    GPT-2's c_proj.weight: the layouts are written back first (was: IndexError on to_empty's garbage)."""
    meta = _gpt2("meta")
    pl.sparsify(meta, budget=0.25, init="kaiming")
    torch.manual_seed(0)
    pl.materialize(meta, "cpu")
    c_fc = meta.transformer.h[0].mlp.c_fc
    assert c_fc.sparse.init_scale == 1.0 and 0 < c_fc.weight_std() < 1          # its own init, not matched
    ids = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(meta(input_ids=ids, labels=ids).loss)


def test_hf_init_weights_works_after_sparsify_and_keeps_the_structured_layers():
    torch.manual_seed(0)
    model = _gpt2()
    pl.sparsify(model, budget=0.25)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, StructuredLinear)}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in layers.items()}
    model.init_weights()                     # was: AttributeError 'PixelflyLinear' has no attribute 'weight'
    model.post_init()
    for name, m in layers.items():
        for key, value in m.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.to_empty(device="cpu")             # after to_empty too: runs (pl.materialize re-initialises all)
    model.init_weights()
