"""PixelflyAttention: the fast sparse + Performer path against the dense matrix it implies, and its layouts."""

import math

import pytest
import torch

from pixelfly_lab.nn.attention import ATTENTION_LAYOUTS, PixelflyAttention, attention_layout
from pixelfly_lab.ops.attention import block_attention_reference
from pixelfly_lab.structure.masks import layout_to_mask
from pixelfly_lab.nn.random_features import performer_features


def make(layout="pixelfly", causal=False, features=None, T=64, dim=24, heads=2, **kwargs):
    torch.manual_seed(0)
    return PixelflyAttention(dim, heads, T, budget=0.5, block_size=8, causal=causal, lowrank_features=features,
                             layout=layout, **kwargs).double()


def heads_out(attn, x, A):
    """proj(A V): the module's output from the dense matrix."""
    B, T, C = x.shape
    v = attn.v(x).view(B, T, attn.heads, C // attn.heads).transpose(1, 2)
    return attn.proj((A @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout,features,global_tokens",
                         [("pixelfly", None, 0), ("pixelfly", 0, 0), ("pixelfly", 6, 5), ("bigbird", 4, 0),
                          ("local", None, 0), ("random", 3, 0)])
def test_output_and_gradients_equal_the_dense_matrix(causal, layout, features, global_tokens):
    attn = make(layout, causal, features, global_tokens=global_tokens)
    x = torch.randn(2, 64, 24, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    A = attn.attention_matrix(x)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 2, 64, dtype=torch.float64))
    assert (A >= 0).all()
    if causal:
        assert (A.triu(1) == 0).all()
    expected = heads_out(attn, x, A)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    params = [x, attn.q.weight, attn.k.weight]
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_sparse_part_alone_is_block_sparse_softmax():
    attn = make(features=0, causal=True)
    x = torch.randn(1, 64, 24, dtype=torch.float64)
    q = attn.q(x).view(1, 64, 2, 12).transpose(1, 2)
    k = attn.k(x).view(1, 64, 2, 12).transpose(1, 2)
    eye = torch.eye(64, dtype=torch.float64).expand(1, 2, 64, 64)
    reference = block_attention_reference(q, k, eye, attn.layout, 8, causal=True)   # = the matrix itself
    torch.testing.assert_close(attn.attention_matrix(x), reference)


def test_exact_on_support_and_performer_off_it():
    # independent construction of Scatterbrain's matrix: exp(s) on the support, phi(q).phi(k) off it
    attn = make(features=5)
    x = torch.randn(1, 64, 24, dtype=torch.float64)
    q = attn.q(x).view(1, 64, 2, 12).transpose(1, 2)
    k = attn.k(x).view(1, 64, 2, 12).transpose(1, 2)
    t = math.sqrt(12)
    exact = (q @ k.transpose(-1, -2) / t).exp()
    estimate = performer_features(q, t, 5).exp() @ performer_features(k, t, 5).exp().transpose(-1, -2)
    support = layout_to_mask(attn.layout, 8)
    scores = torch.where(support, exact, estimate)
    torch.testing.assert_close(attn.attention_matrix(x), scores / scores.sum(-1, keepdim=True))


def test_full_layout_is_exact_softmax_whatever_the_features():
    attn = make(features=4, global_tokens=64)          # every block kept: nothing left to estimate
    x = torch.randn(2, 64, 24, dtype=torch.float64)
    q = attn.q(x).view(2, 64, 2, 12).transpose(1, 2)
    k = attn.k(x).view(2, 64, 2, 12).transpose(1, 2)
    torch.testing.assert_close(attn.attention_matrix(x), torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(12), -1))


def test_shorter_inputs_use_the_layout_corner():
    attn = make(causal=True, features=3)
    x = torch.randn(1, 64, 24, dtype=torch.float64)
    # causal: the first 32 outputs do not depend on later tokens, so a 32-token input gives them
    torch.testing.assert_close(attn(x[:, :32]), attn(x)[:, :32])


@pytest.mark.parametrize("name", ATTENTION_LAYOUTS)
def test_layouts_stay_within_budget_and_keep_the_diagonal(name):
    layout, m = attention_layout(name, 256, 0.25, 16, lowrank_features=None if name == "pixelfly" else 4)
    assert layout.shape == (16, 16)
    assert layout.diagonal().all()
    assert layout.float().mean().item() + 2 * m / 256 <= 0.25 + 1e-12
    with_global, _ = attention_layout(name, 256, 0.25, 16, lowrank_features=m, global_tokens=20)
    assert with_global[:2].all() and with_global[:, :2].all() and (with_global | ~layout).all()


def test_pixelfly_layout_is_a_flat_block_butterfly():
    layout, m = attention_layout("pixelfly", 1024, 0.25, 32)
    assert m > 0
    # every row keeps the same number of blocks and the layout is symmetric (r XOR c structure)
    assert len(set(layout.sum(1).tolist())) == 1 and torch.equal(layout, layout.T)


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout must be one of"):
        PixelflyAttention(16, 2, 32, layout="strided", block_size=8)
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        PixelflyAttention(16, 2, 36, block_size=8)
    with pytest.raises(ValueError, match="divisible by heads"):
        PixelflyAttention(16, 3, 32, block_size=8)
    with pytest.raises(ValueError, match="lowrank_features"):
        PixelflyAttention(16, 2, 32, block_size=8, budget=0.25, lowrank_features=4)
    with pytest.raises(ValueError, match="global_tokens"):
        PixelflyAttention(16, 2, 32, block_size=8, global_tokens=40)
    attn = PixelflyAttention(16, 2, 32, block_size=8, budget=0.5)
    with pytest.raises(ValueError, match="sequence length 40"):
        attn(torch.randn(1, 40, 16))


@pytest.mark.parametrize("name,attention", [("vit", "pixelfly"), ("gpt", "bigbird"), ("vit", "local")])
def test_build_model_with_sparse_attention_trains_a_step(name, attention):
    from pixelfly_lab.training.data import make_listops
    from pixelfly_lab.training.models import build_model

    data = make_listops(n_train=16, n_test=4, max_len=64, seed=0)
    model = build_model(name, data, attention=attention, attention_budget=0.5, pattern="pixelfly", budget=0.5)
    attns = [block.attn for block in model.blocks]
    assert all(isinstance(a, PixelflyAttention) and a.layout_name == attention for a in attns)
    assert all(a.causal == (name == "gpt") for a in attns)
    loss = torch.nn.functional.cross_entropy(model(data.x_train), data.y_train)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attns[0].parameters())
    with pytest.raises(ValueError, match="needs a Transformer"):
        build_model("mlp", make_listops(n_train=4, n_test=4, max_len=16), attention="pixelfly")
    with pytest.raises(ValueError, match="attention must be one of"):
        build_model(name, data, attention="performer")


def test_train_with_attention_option(tmp_path):
    from pixelfly_lab.training.loop import TrainConfig, train

    with pytest.raises(ValueError, match="attention"):
        TrainConfig(attention="performer")
    result = train(TrainConfig(model="vit", data="listops", attention="pixelfly", data_options={"max_len": 64},
                               model_options={"attention_budget": 0.5},
                               max_train=32, max_test=16, epochs=1, batch_size=16, out=str(tmp_path),
                               progress=False, track_rank=False))
    assert isinstance(result.model.blocks[0].attn, PixelflyAttention)
    assert 0.0 <= result.summary["test_accuracy"] <= 1.0


def test_sparse_only_layer_compiles_without_graph_break():
    # the sparse part is one registered op; random features (features > 0) draw their projection
    # with a torch.Generator inside the call, which torch.compile(fullgraph=True) does not trace
    attn = PixelflyAttention(32, 2, 64, block_size=8, budget=0.5, lowrank_features=0)
    x = torch.randn(2, 64, 32)
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), attn(x))
