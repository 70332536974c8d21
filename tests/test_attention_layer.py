"""PixelflyAttention: the fast sparse + Performer path against the dense matrix it implies, and its layouts."""

import math

import pytest
import torch

from pixelfly_lab.nn.attention import ATTENTION_LAYOUTS, PixelflyAttention, attention_layout, connected_layout
from pixelfly_lab.ops.attention import block_attention_reference
from pixelfly_lab.structure.connectivity import block_connectivity, spanning_butterfly_layout
from pixelfly_lab.structure.masks import layout_to_mask
from pixelfly_lab.nn.random_features import performer_features


def make(layout="pixelfly", causal=False, features=None, T=64, dim=24, heads=2, budget=0.5, **kwargs):
    torch.manual_seed(0)
    return PixelflyAttention(dim, heads, T, budget=budget, block_size=8, causal=causal, lowrank_features=features,
                             layout=layout, **kwargs).double()


def heads_out(attn, x, A):
    """proj(A V): the module's output from the dense matrix."""
    B, T, C = x.shape
    v = attn.v(x).view(B, T, attn.heads, C // attn.heads).transpose(1, 2)
    return attn.proj((A @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout,features,global_tokens",
                         [("pixelfly", None, 0), ("pixelfly", 0, 0), ("pixelfly", 6, 5), ("bigbird", 4, 0),
                          ("local", None, 0), ("random", 3, 0), ("connected", None, 0), ("connected", 3, 9)])
def test_output_and_gradients_equal_the_dense_matrix(causal, layout, features, global_tokens):
    attn = make(layout, causal, features, global_tokens=global_tokens, budget=None if layout == "connected" else 0.5)
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


@pytest.mark.parametrize("name", ["connected", "pixelfly"])
def test_shorter_inputs_plan_their_own_layout_and_density_says_so(name):
    attn = make(name, causal=True, features=0 if name == "connected" else 3, budget=0.5, T=128)
    x = torch.randn(1, 128, 24, dtype=torch.float64)
    attn(x)
    assert attn.density == pytest.approx(attn.density_at(128))
    short = attn(x[:, :64])
    expected_layout, _ = attention_layout(name, 64, 0.5, 8, lowrank_features=attn.features, causal=True)
    assert torch.equal(attn.layout_for(64), expected_layout) and not torch.equal(expected_layout, attn.layout[:8, :8])
    assert attn.density == pytest.approx(expected_layout.float().mean().item() + 2 * attn.features / 64)
    torch.testing.assert_close(short, heads_out(attn, x[:, :64], attn.attention_matrix(x[:, :64])))


def test_shorter_input_below_the_floor_uses_the_smallest_connected_layout():
    attn = make("connected", budget=0.3, T=256)                 # R = 32: floor 6/32 <= 0.3
    attn(torch.randn(1, 32, 24, dtype=torch.float64))           # R = 4: floor 3/4 > 0.3
    assert torch.equal(attn.layout_for(32), spanning_butterfly_layout(4))
    assert attn.density == 0.75


@pytest.mark.parametrize("name", ATTENTION_LAYOUTS)
def test_layouts_stay_within_budget_and_keep_the_diagonal(name):
    layout, m = attention_layout(name, 256, 0.5, 16, lowrank_features=None if name == "pixelfly" else 4)
    assert layout.shape == (16, 16)
    assert layout.diagonal().all()
    assert layout.float().mean().item() + 2 * m / 256 <= 0.5 + 1e-12
    with_global, _ = attention_layout(name, 256, 0.5, 16, lowrank_features=m, global_tokens=20)
    assert with_global[:2].all() and with_global[:, :2].all() and (with_global | ~layout).all()


@pytest.mark.parametrize("causal", [False, True])
def test_connected_layout_links_every_pair_at_every_length_and_budget(causal):
    """The budget rule: the spanning butterfly floor, then the widest band that fits; connected always."""
    for n_blocks in range(1, 41):
        hops = max(1, math.ceil(math.log2(n_blocks)))
        reachable = (n_blocks + 1) / (2 * n_blocks) if causal else 1.0       # causal: pairs with c <= r
        floor = spanning_butterfly_layout(n_blocks, causal)
        floor_density = floor.float().mean().item()
        for budget in (None, 0.05, 0.1, 0.25, 0.5, 1.0):
            if budget is not None and budget < floor_density:
                with pytest.raises(ValueError, match="below the connected layout's floor"):
                    connected_layout(8 * n_blocks, 8, budget, causal=causal)
                continue
            layout, band = connected_layout(8 * n_blocks, 8, budget, causal=causal)
            effective = torch.tril(layout) if causal else layout
            linked = block_connectivity(effective, hops=hops)["linked_fraction"].item()
            assert linked == pytest.approx(reachable), (n_blocks, budget)
            assert (layout | ~floor).all() and layout.diagonal().all()
            assert layout.sum(1).max() <= 1 + hops + 2 * band
            if budget is None:
                assert torch.equal(layout, floor)
            else:
                assert layout.float().mean().item() <= budget + 1e-12
                wider = spanning_butterfly_layout(n_blocks, causal, band + 1)
                assert band + 1 >= n_blocks or wider.float().mean().item() > budget   # the widest band that fits


def test_paper_layout_is_not_connected_and_the_default_is():
    paper = PixelflyAttention(64, 2, 1024, budget=0.25, block_size=32, layout="pixelfly")
    default = PixelflyAttention(64, 2, 1024, block_size=32)
    assert block_connectivity(paper.layout, hops=8)["linked_fraction"].item() <= 0.25   # 4 diagonal groups
    assert block_connectivity(default.layout, hops=5)["linked_fraction"].item() == 1.0
    assert default.features == 0 and default.layout_name == "connected"
    assert "butterfly strides 1..16 + band 0" in repr(default) and "features=0" in repr(default)
    assert default.density == pytest.approx(6 / 32)


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
        PixelflyAttention(16, 2, 32, block_size=8, budget=0.25, lowrank_features=4, layout="pixelfly")
    with pytest.raises(ValueError, match="global_tokens"):
        PixelflyAttention(16, 2, 32, block_size=8, global_tokens=40)
    with pytest.raises(ValueError, match="budget=0.5 is below the connected layout's floor 0.75"):
        PixelflyAttention(16, 2, 32, block_size=8, budget=0.5)


@pytest.mark.parametrize("features", [0, 3])
def test_bad_inputs_get_named_errors(features):
    attn = PixelflyAttention(16, 2, 32, block_size=8, lowrank_features=features)
    cases = [(torch.randn(1, 0, 16), "T=0"), (torch.randn(1, 32, 12), "width dim=16"),
             (torch.randn(1, 20, 16), "not a multiple of block_size=8"),
             (torch.randn(1, 40, 16), "above the built length seq_len=32"), (torch.randn(32, 16), "shape \\(B, T, dim\\)")]
    for x, message in cases:
        with pytest.raises(ValueError, match=message):
            attn(x)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout,features", [("connected", 0), ("connected", 4), ("pixelfly", None)])
def test_nan_in_one_example_never_reaches_another(causal, layout, features):
    attn = make(layout, causal, features, budget=None if layout == "connected" else 0.5)
    x = torch.randn(3, 64, 24, dtype=torch.float64)
    alone = attn(x[1:])
    x[0, 5, 3] = float("nan")
    out = attn(x)
    assert torch.isnan(out[0]).any()
    torch.testing.assert_close(out[1:], alone, rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("features", [0, 4])
def test_layer_with_features_compiles_fullgraph_and_features_are_a_buffer(features):
    attn = PixelflyAttention(32, 2, 64, block_size=8, lowrank_features=features)
    x = torch.randn(2, 64, 32)
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), attn(x))
    assert ("feature_weights" in attn.state_dict()) and attn.feature_weights.shape == (features, 16)
    if features:
        before = attn(x)
        attn.redraw_features(seed=7)
        assert not torch.allclose(attn(x), before)
        attn.redraw_features(seed=0)
        torch.testing.assert_close(attn(x), before)


def test_training_steps_plan_once_and_read_nothing_from_the_host(monkeypatch):
    """Registered at construction; one plan per (layer, causal, device) over many steps; meta tensors
    (no values: any host read raises) run forward and backward, as on a GPU with no sync."""
    from pixelfly_lab.ops import attention as ops_attention
    from pixelfly_lab.ops.registry import registered_count

    builds = []
    real = ops_attention.build_attention_plan
    monkeypatch.setattr(ops_attention, "build_attention_plan", lambda *a: builds.append(a[1:]) or real(*a))
    layers = [PixelflyAttention(24, 2, 96, block_size=8, causal=True, lowrank_features=f, seed=11 + f)
              for f in (0, 3)]
    registered = registered_count()
    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    after_step = []
    for _ in range(4):
        x = torch.randn(2, 96, 24)
        loss = sum(layer(x).square().mean() for layer in layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step.append(len(builds))
    assert registered_count() == registered                      # nothing registered per call
    keys = {layer.layout_key(96) for layer in layers}            # equal layouts share a key
    # at most one plan per distinct layout (forward, backward and the feature discount share it), none per step
    assert after_step[0] <= len(keys) and after_step == after_step[:1] * 4
    for layer in layers:
        meta = layer.to("meta")
        x = torch.empty(2, 96, 24, device="meta", requires_grad=True)
        y = meta(x)
        grads = torch.autograd.grad(y.sum(), [x, *meta.parameters()])
        assert y.is_meta and all(g.is_meta for g in grads)


def test_sparse_only_layer_compiles_without_graph_break():
    # the sparse part is one registered op; random features (features > 0) draw their projection
    # with a torch.Generator inside the call, which torch.compile(fullgraph=True) does not trace
    attn = PixelflyAttention(32, 2, 64, block_size=8, budget=0.5, lowrank_features=0)
    x = torch.randn(2, 64, 32)
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), attn(x))


def test_error_against_dense_is_zero_on_a_full_layout_and_matches_a_direct_computation():
    attn = make("connected", causal=True, features=0, budget=None)
    q, k = torch.randn(2, 1, 2, 64, 12, dtype=torch.float64).unbind(0)
    A = attn.attention_weights(q, k)
    dense = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(12)).masked_fill(
        ~torch.ones(64, 64, dtype=torch.bool).tril(), float("-inf")), -1)
    assert attn.error_against_dense(q, k) == pytest.approx(((A - dense).norm() / dense.norm()).item())
    full = make("pixelfly", features=3, global_tokens=64)
    assert full.error_against_dense(q, k) < 1e-12
    with pytest.raises(ValueError, match="q and k"):
        attn.attention_weights(q[..., :5], k)


def test_built_on_meta_then_materialised_equals_the_cpu_build():
    import pixelfly_lab as pl

    torch.manual_seed(3)
    reference = PixelflyAttention(24, 2, 64, block_size=8, lowrank_features=3, seed=5)
    torch.manual_seed(3)
    with torch.device("meta"):
        layer = PixelflyAttention(24, 2, 64, block_size=8, lowrank_features=3, seed=5)
    assert layer.q.weight.is_meta
    pl.materialize(layer)
    x = torch.randn(2, 64, 24)
    torch.testing.assert_close(layer(x), reference(x))
    assert torch.equal(layer.layout, reference.layout) and torch.equal(layer.feature_weights, reference.feature_weights)


def test_build_model_connected_budget_below_the_floor_warns_and_uses_the_floor():
    import warnings

    from pixelfly_lab.training.data import make_listops
    from pixelfly_lab.training.models import build_model

    data = make_listops(n_train=8, n_test=4, max_len=64, seed=0)
    floor = connected_layout(64, 16, causal=True)[0]          # 1-3 blocks of a 4 x 4 grid: 0.5625 > 0.25
    with pytest.warns(UserWarning, match="below the connected layout's floor"):
        model = build_model("gpt", data, attention="connected", attention_budget=0.25)
    assert all(torch.equal(block.attn.layout, floor) for block in model.blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # at or above the floor: planned, no warning
        wide = build_model("gpt", data, attention="connected", attention_budget=0.9)
        build_model("gpt", data, attention="pixelfly", attention_budget=0.25)
    assert wide.blocks[0].attn.layout.sum() > floor.sum()
    with pytest.raises(ValueError, match="budget"):
        build_model("gpt", data, attention="connected", attention_budget=0.0)


def test_sdpa_twin_shares_the_projections_and_is_dense_softmax():
    from pixelfly_lab.speed.attention import SDPAAttention
    from pixelfly_lab.training.models import Attention

    for causal in (False, True):
        layer = make("connected", causal=causal, budget=None)
        twin = SDPAAttention(layer)
        assert type(twin).forward is Attention.forward and twin.q is layer.q and twin.proj is layer.proj
        x = torch.randn(2, 64, 24, dtype=torch.float64)
        B, T, C = x.shape
        q, k = (p(x).view(B, T, 2, C // 2).transpose(1, 2) for p in (layer.q, layer.k))
        scores = q @ k.transpose(-1, -2) / math.sqrt(C // 2)
        if causal:
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(twin(x), heads_out(layer, x, torch.softmax(scores, -1)), rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="layer"):
        SDPAAttention(torch.nn.Linear(2, 2))


def test_speed_table_kernel_lengths_and_dense_gemm_rate():
    from pixelfly_lab.speed.attention import attention_speed_table, dense_gemm_gflops

    assert dense_gemm_gflops(32, 16, repeats=1) > 0
    table = attention_speed_table((64,), dim=16, heads=2, block_size=16, causal=False, repeats=1, memory=False,
                                  kernel_lengths=(128,))
    assert list(zip(table["T"], table["row"])) == [(64, "layer"), (64, "kernel"), (128, "kernel")]
    assert (table["dense_gemm_gflops"] > 0).all() and table["dense_gemm_gflops"].nunique() == 1
    assert (table["sparse_gflops"] > 0).all()
    torch.testing.assert_close(table["speedup"] / table["flop_limit"], table["fraction_of_limit"])


def test_kernel_flops_leave_the_features_out_and_the_layer_counts_them():
    from pixelfly_lab.speed.attention import attention_flops

    # the connected layout at budget=None is its floor with or without features: one layout, two layers
    plain, featured = (PixelflyAttention(64, 2, 256, block_size=16, lowrank_features=m) for m in (0, 8))
    assert torch.equal(plain.layout_for(256), featured.layout_for(256))
    kernel = [attention_flops(layer, 256, projections=False) for layer in (plain, featured)]
    whole = [attention_flops(layer, 256, route="kernel") for layer in (plain, featured)]   # both on the kernel
    pairs = plain.layout_for(256).sum().item() * 16 * 16
    assert kernel[0] == kernel[1] == 4 * 32 * pairs * 2   # 4 D per kept pair and head; the kernel has no features
    assert whole[1] - whole[0] > 0                         # the layer pays for its features


def test_layer_error_table_is_zero_at_full_budget_and_equals_the_layer_on_each_kind():
    from pixelfly_lab.studies.estimators import attention_kinds, layer_error_table, trained_queries_keys

    q, k = trained_queries_keys(32, steps=2, batch_size=4)
    assert q.shape == k.shape == (2, 2, 32, 32) and q.dtype == torch.float64 and torch.isfinite(q).all()
    inputs = {"random": attention_kinds(32, head_dim=8, trained_steps=1)["random"], "trained": (q, k, True)}
    variants = {"bigbird": {"layout": "bigbird"}, "local": {"layout": "local"}}
    table = layer_error_table(inputs, variants, (1.0, 3.0), budget=0.5, block_size=8)
    assert len(table) == 2 * 2 * 2 and (table.error > 0).all()
    for kind, (qq, kk, causal) in inputs.items():
        T, D = qq.shape[2], qq.shape[3]
        layer = PixelflyAttention(2 * D, 2, T, budget=0.5, block_size=8, causal=causal, layout="local").double()
        row = table[(table.kind == kind) & (table.variant == "local") & (table.temperature == 3.0)]
        assert row.error.item() == pytest.approx(layer.error_against_dense(qq / 3.0, kk), rel=1e-12)
    full = layer_error_table(inputs, {"connected": {}}, (0.5, 2.0), budget=1.0, block_size=8)
    assert (full.error < 1e-12).all()                 # the oracle: a full layout is softmax itself


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout,budget", [("connected", None), ("pixelfly", 0.5), ("bigbird", 0.5)])
def test_masked_sdpa_route_equals_the_kernel_route(causal, layout, budget):
    """The short-sequence route (one SDPA call, the layout's boolean mask) gives the kernel's values and
    gradients, at the built length and a shorter one (its own layout)."""
    kernel = make(layout, causal, 0, budget=budget, route="kernel")
    sdpa = make(layout, causal, 0, budget=budget, route="masked_sdpa")
    sdpa.load_state_dict(kernel.state_dict())
    for T in (64, 32):
        assert kernel.route_at(T) == "kernel" and sdpa.route_at(T) == "masked_sdpa"
        x = torch.randn(2, T, 24, dtype=torch.float64, requires_grad=True)
        out_kernel, out_sdpa = kernel(x), sdpa(x)
        torch.testing.assert_close(out_sdpa, out_kernel, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(out_kernel)
        for a, b in zip(torch.autograd.grad(out_sdpa, [x, *sdpa.parameters()], grad),
                        torch.autograd.grad(out_kernel, [x, *kernel.parameters()], grad)):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_auto_route_switches_at_the_crossover_and_the_repr_says_which():
    from pixelfly_lab.nn.attention import MASKED_SDPA_BELOW, MASKED_SDPA_BELOW_PYTORCH, masked_sdpa_below
    from pixelfly_lab.ops import native

    T = masked_sdpa_below()
    assert T == (MASKED_SDPA_BELOW if native.load("attention_cpu") is not None else MASKED_SDPA_BELOW_PYTORCH)
    attn = PixelflyAttention(32, 2, 2 * T, block_size=32)
    assert attn.route_at(T - 32) == "masked_sdpa" and attn.route_at(T) == "kernel"
    assert "route=kernel (auto: masked SDPA on the CPU below" in repr(attn)
    short = PixelflyAttention(32, 2, T // 2, block_size=32)
    assert "route=masked_sdpa" in repr(short)
    featured = PixelflyAttention(32, 2, 64, block_size=8, lowrank_features=3)
    assert featured.route_at(64) == "kernel" and "route=kernel" in repr(featured)     # features need the kernel's lse
    with pytest.raises(ValueError, match="route"):
        PixelflyAttention(32, 2, 64, block_size=8, lowrank_features=3, route="masked_sdpa")
    with pytest.raises(ValueError, match="route"):
        PixelflyAttention(32, 2, 64, block_size=8, route="dense")


def test_masked_sdpa_route_compiles_fullgraph_and_runs_on_meta():
    attn = PixelflyAttention(32, 2, 64, block_size=8, route="masked_sdpa")
    x = torch.randn(2, 64, 32)
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), attn(x))
    meta = attn.to("meta")
    y = meta(torch.empty(2, 64, 32, device="meta"))
    assert y.is_meta and y.shape == (2, 64, 32)


def test_auto_route_takes_masked_sdpa_on_the_cpu_only():
    """The crossover was measured on a CPU: other devices (CUDA: Triton) keep the kernel at every T."""
    attn = PixelflyAttention(32, 2, 64, block_size=8)
    assert attn.route_at(64) == attn.route_at(64, "cpu") == attn.route_at(64, torch.device("cpu")) == "masked_sdpa"
    assert attn.route_at(64, "cuda") == attn.route_at(64, "meta") == "kernel"
    assert attn.to("meta").route_at(64) == "kernel"                 # None: the parameters' device
    fixed = PixelflyAttention(32, 2, 64, block_size=8, route="masked_sdpa")
    assert fixed.route_at(64, "cuda") == "masked_sdpa"             # a fixed route is kept everywhere
    if torch.cuda.is_available():
        gpu = PixelflyAttention(32, 2, 64, block_size=8, device="cuda")
        assert gpu.route_at(64) == "kernel" and "route=kernel" in repr(gpu)


@pytest.mark.parametrize("features", [0, 3])
def test_layer_saved_before_routes_existed_loads_and_runs(features, other_process_registry):
    """A pickle without ``route`` (saved before routes existed) gets 'auto'; its registry keys were another
    process's, so the layout is registered again; a state dict carries no route and loads as it did."""
    import pickle

    attn = make("connected", features=features, budget=None)
    x = torch.randn(2, 64, 24, dtype=torch.float64)
    want, want_short, density = attn(x), attn(x[:, :32]), attn.density_at(64)
    old = pickle.loads(pickle.dumps(attn))
    del old.__dict__["route"], old.__dict__["_last_len"]             # what such a pickle holds
    data = pickle.dumps(old)
    # a process whose registry holds other layouts: the old key would name another layout (or none)
    registry = other_process_registry
    registry.register_layout(torch.ones(4, 4, dtype=torch.bool), 8)
    copy = pickle.loads(data)
    assert copy.route == "auto" and copy.density == density and "route=" in repr(copy)
    assert registry.registered_layout(copy.layout_key(64)).layout.equal(attn.layout)
    torch.testing.assert_close(copy(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(copy(x[:, :32]), want_short, rtol=1e-12, atol=1e-12)     # shorter: planned again
    fresh = make("connected", features=features, budget=None, route="kernel")
    state = attn.state_dict()
    assert not any("route" in name for name in state)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), want, rtol=1e-12, atol=1e-12)
