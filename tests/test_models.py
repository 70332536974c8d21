"""Models: shapes for every (model, data kind), slow references for patches and attention, seeds, errors."""

import math

import pytest
import torch

from pixelfly_lab.training.data import load_data, make_listops, make_mnist1d, make_teacher
from pixelfly_lab.training.rank import layer_weights
from pixelfly_lab.training.models import (MODEL_NAMES, SPARSIFY_WHERE, Attention, build_model, count_params, default_patch,
                                 patchify)


@pytest.fixture(scope="module")
def datasets():
    return {
        "digits": load_data("digits", max_train=16, max_test=8),
        "mnist1d": make_mnist1d(n_train=16, n_test=8),
        "teacher": make_teacher(n_train=16, n_test=8, d_in=32, d_out=3),
        "listops": make_listops(n_train=16, n_test=8, max_len=32),
        "chars": load_data("chars", context=16, max_train=16, max_test=8),
    }


# (model, data) -> output shape for a batch of 4; absent pairs must be refused
SUPPORTED = {
    ("mlp", "digits"): (4, 10), ("mlp", "mnist1d"): (4, 10), ("mlp", "teacher"): (4, 3),
    ("mixer", "digits"): (4, 10), ("mixer", "mnist1d"): (4, 10), ("mixer", "teacher"): (4, 3),
    ("vit", "digits"): (4, 10), ("vit", "mnist1d"): (4, 10), ("vit", "teacher"): (4, 3), ("vit", "listops"): (4, 10),
    ("gpt", "listops"): (4, 10), ("gpt", "chars"): (4, 16, 76),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("data_name", ["digits", "mnist1d", "teacher", "listops", "chars"])
def test_output_shapes_and_refusals(datasets, name, data_name):
    data = datasets[data_name]
    if (name, data_name) not in SUPPORTED:
        with pytest.raises(ValueError, match=f"model '{name}'"):
            build_model(name, data)
        return
    model = build_model(name, data)
    assert model(data.x_train[:4]).shape == SUPPORTED[name, data_name]
    assert model.family == name and model.dense_params == count_params(model)


def test_patchify_against_explicit_indexing():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    p = 4
    tokens = patchify(image, p)
    assert tokens.shape == (2, 2 * 3, 3 * p * p)
    for i in range(2):
        for j in range(3):
            for c in range(3):
                for a in range(p):
                    for b in range(p):
                        assert tokens[1, i * 3 + j, c * p * p + a * p + b] == image[1, c, i * p + a, j * p + b]
    signal = torch.randn(2, 2, 12, dtype=torch.float64)
    tokens = patchify(signal, 3)
    assert tokens.shape == (2, 4, 6)
    assert tokens[1, 2, 1 * 3 + 2] == signal[1, 1, 2 * 3 + 2]
    assert torch.equal(patchify(signal[:, 0], 3), patchify(signal[:, :1], 3))  # features == one channel


def test_default_patch():
    assert default_patch((1, 8, 8)) == 2
    assert default_patch((1, 40)) == 4
    assert default_patch((3, 32, 32)) == 4
    assert default_patch((64,)) == 4


@pytest.mark.parametrize("causal", [False, True])
def test_attention_against_slow_reference(causal):
    torch.manual_seed(0)
    attn = Attention(dim=12, heads=3, causal=causal).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)

    def reference(x):
        B, T, C = x.shape
        out = torch.zeros(B, T, C, dtype=x.dtype)
        q, k, v = attn.q(x), attn.k(x), attn.v(x)
        hs = C // 3
        for h in range(3):
            sl = slice(h * hs, (h + 1) * hs)
            scores = q[:, :, sl] @ k[:, :, sl].transpose(1, 2) / math.sqrt(hs)
            if causal:
                scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out = out + torch.nn.functional.pad(torch.softmax(scores, -1) @ v[:, :, sl], (sl.start, C - sl.stop))
        return attn.proj(out)

    fast, slow = attn(x), reference(x)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, attn.q.weight])
    g_slow = torch.autograd.grad(slow.square().sum(), [x, attn.q.weight])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gpt_is_causal(datasets):
    model = build_model("gpt", datasets["chars"]).double()
    x = datasets["chars"].x_train[:2].clone()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 76  # change only the future
    torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10], rtol=0, atol=0)
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


def test_seed_decides_weights_and_leaves_global_rng(datasets):
    state = torch.get_rng_state()
    a, b = build_model("mixer", datasets["digits"], seed=1), build_model("mixer", datasets["digits"], seed=1)
    c = build_model("mixer", datasets["digits"], seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_size_presets_and_overrides(datasets):
    small = build_model("vit", datasets["digits"], size="small")
    assert len(small.blocks) == 4 and small.head.in_features == 128
    custom = build_model("mlp", datasets["digits"], dim=32, depth=3)
    assert len(custom.layers) == 3 and custom.layers[0].out_features == 128


def test_bad_input(datasets):
    data = datasets["digits"]
    with pytest.raises(ValueError, match="unknown model name 'cnn'"):
        build_model("cnn", data)
    with pytest.raises(ValueError, match="unknown pattern name 'swiss'"):
        build_model("mlp", data, pattern="swiss")
    with pytest.raises(ValueError, match="unknown size"):
        build_model("mlp", data, size="huge")
    for budget in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget"):
            build_model("mlp", data, pattern="pixelfly", budget=budget)
    with pytest.raises(TypeError, match="budget"):
        build_model("mlp", data, pattern="pixelfly", budget="half")
    with pytest.raises(TypeError, match="unknown model option"):
        build_model("mlp", data, width=3)
    with pytest.raises(ValueError, match="patch=3"):
        build_model("mixer", data, patch=3)


@pytest.mark.parametrize("name, data_name", [("mlp", "digits"), ("mixer", "digits"), ("vit", "digits"),
                                             ("gpt", "chars")])
def test_sparsified_where_the_paper_does(datasets, name, data_name):
    import fnmatch

    data = datasets[data_name]
    dense = build_model(name, data, seed=3).double()
    sparse = build_model(name, data, pattern="pixelfly", budget=0.25, block_size=16, seed=3).double()
    replaced = set(sparse.report.name[sparse.report.replaced])
    expected = {n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)
                and any(fnmatch.fnmatchcase(n, p) for p in SPARSIFY_WHERE[name])
                and m.in_features % 16 == 0 and m.out_features % 16 == 0}
    assert replaced == expected and all(hasattr(sparse.get_submodule(n), "dense_weight") for n in replaced)
    assert count_params(sparse) < sparse.dense_params == count_params(dense)
    assert set(layer_weights(sparse, SPARSIFY_WHERE[name])) == expected  # whole layers, not their parts
    for n in replaced:  # each replaced layer keeps the budget
        assert sparse.get_submodule(n).budget <= 0.25 + 1e-12
    # oracle: the dense model carrying the sparse layers' dense weights computes the same outputs
    oracle = build_model(name, data, seed=3).double()
    oracle.load_state_dict({k: v for k, v in sparse.state_dict().items() if k in oracle.state_dict()}, strict=False)
    with torch.no_grad():
        for n in replaced:
            oracle.get_submodule(n).weight.copy_(sparse.get_submodule(n).dense_weight())
            oracle.get_submodule(n).bias.copy_(sparse.get_submodule(n).bias)
    x = data.x_train[:4] if data.kind == "tokens" else data.x_train[:4].double()
    torch.testing.assert_close(sparse(x), oracle(x), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- rank.py: oracles with known spectra


def test_effective_and_stable_rank_oracles():
    from pixelfly_lab.training.rank import effective_rank, singular_values, stable_rank

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    assert effective_rank(q) == pytest.approx(16.0, rel=1e-12) and stable_rank(q) == pytest.approx(16.0)
    u, v = torch.randn(16, 1, dtype=torch.float64), torch.randn(1, 10, dtype=torch.float64)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6) and stable_rank(u @ v) == pytest.approx(1.0)
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # p = (1/2, 1/4, 1/8, 1/8)
    entropy = 0.5 * math.log(2) + 0.25 * math.log(4) + 2 * 0.125 * math.log(8)
    assert effective_rank(s) == pytest.approx(math.exp(entropy)) and stable_rank(s) == pytest.approx(22 / 16)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    torch.testing.assert_close(singular_values(torch.diag(torch.tensor([1.0, 3.0, 2.0]))),
                               torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.ones(3))


def test_weight_ranks_use_the_dense_weight(datasets):
    from pixelfly_lab.training.rank import weight_ranks, weight_spectra

    model = build_model("mlp", datasets["digits"], pattern="lowrank", budget=0.25)
    table = weight_ranks(model).set_index("layer")
    assert list(table.index) == ["layers.0", "layers.1", "head"]
    rank = model.layers[1].rank
    s = torch.linalg.svdvals(model.layers[1].dense_weight().double())
    assert (s[rank:] < 1e-5 * s[0]).all()  # a rank-r weight: the oracle for the dense_weight path
    assert table.loc["layers.1", "effective_rank"] <= rank + 1e-3
    spectra = weight_spectra(model, ["layers.1"])
    assert len(spectra) == 256 and spectra.normalised.iloc[0] == 1.0
