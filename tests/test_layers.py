"""Structured layers against their dense_weight(), and the nn.Module contract (dtype, state, func)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_lab.nn.layers import (BlockSparseLinear, LowRankLinear, MaskedLinear, MonarchLinear,
                                 PixelflyLinear, SparseLowRankLinear, StructuredLinear,
                                 layer_from_pattern)
from pixelfly_lab.structure.masks import flat_block_butterfly_layout, layout_to_mask
from pixelfly_lab.structure.patterns import PATTERN_NAMES, make_pattern, monarch_params, plan_pixelfly

F64 = torch.float64
IRREGULAR = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0],
                          [1, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)        # (24 out, 16 in) at b=4

BUILDERS = {
    "masked": lambda: MaskedLinear(16, 24, layout_to_mask(IRREGULAR, 4)),
    "blocksparse_torch": lambda: BlockSparseLinear(16, 24, IRREGULAR, 4, backend="torch"),
    "blocksparse_reference": lambda: BlockSparseLinear(16, 24, IRREGULAR, 4, backend="reference"),
    "lowrank": lambda: LowRankLinear(16, 24, 3),
    "sparse_lowrank": lambda: SparseLowRankLinear(16, 24, IRREGULAR, 4, rank=2),
    "pixelfly": lambda: PixelflyLinear(32, 64, butterfly_size=8, n_factors=2, rank=2, block_size=4),
    "pixelfly_contracting": lambda: PixelflyLinear(64, 32, butterfly_size=8, n_factors=1, rank=3, block_size=4,
                                                   bias=False),
    "pixelfly_budget": lambda: PixelflyLinear(64, 64, budget=0.4, block_size=4, shuffle=False),
    "pixelfly_shuffle_global": lambda: PixelflyLinear(32, 32, butterfly_size=4, n_factors=1, rank=1,
                                                      block_size=4, shuffle=True, global_size=4),
    "monarch": lambda: MonarchLinear(12, 18, 3),
}


def build(name, dtype=F64):
    torch.manual_seed(0)
    return BUILDERS[name]().to(dtype)


def _params(layer):
    return dict(layer.named_parameters())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_and_gradients_match_dense_weight(name):
    layer = build(name)
    x = torch.randn(2, 3, layer.in_features, dtype=F64, requires_grad=True)
    y = layer(x)
    y_ref = F.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(y)
    inputs = [x, *_params(layer).values()]
    for got, want in zip(torch.autograd.grad((y * probe).sum(), inputs),
                         torch.autograd.grad((y_ref * probe).sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["blocksparse_torch", "sparse_lowrank", "pixelfly_contracting", "monarch"])
def test_gradcheck(name):
    layer = build(name)
    names, values = zip(*_params(layer).items())
    x = torch.randn(2, layer.in_features, dtype=F64, requires_grad=True)

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))
    assert torch.autograd.gradcheck(f, (x, *(v.detach().clone().requires_grad_() for v in values)),
                                    fast_mode=True)


@pytest.mark.parametrize("name", ["masked", "blocksparse_torch", "pixelfly"])
def test_weight_stays_on_its_pattern_after_adamw_with_weight_decay(name):
    layer = build(name)
    support = (layout_to_mask(IRREGULAR, 4) if name != "pixelfly" else layer.sparse.mask())
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(8, layer.in_features, dtype=F64)).pow(2).mean().backward()
        optimizer.step()
    sparse_weight = layer.sparse.dense_weight() if name == "pixelfly" else layer.dense_weight()
    assert sparse_weight[~support].abs().max() == 0
    assert sparse_weight[support].abs().min() > 0
    if name == "masked":
        assert layer.weight[~layer.mask].abs().max() == 0


@pytest.mark.parametrize("in_f, out_f, nb", [(6, 9, 3), (12, 12, 3), (16, 8, 4), (24, 6, 3)])
def test_monarch_dense_weight_is_the_factor_product_with_the_authors_parameter_count(in_f, out_f, nb):
    # in < out, in == out, in > out: middle width min(in, out), as the authors' MonarchLinear
    torch.manual_seed(0)
    layer = MonarchLinear(in_f, out_f, nb, dtype=F64)
    mid = min(in_f, out_f)
    m, q, s = in_f // nb, mid // nb, out_f // nb
    assert tuple(layer.r_blocks.shape) == (nb, q, m) and tuple(layer.l_blocks.shape) == (nb, s, q)
    authors = (in_f ** 2 + out_f * in_f) // nb if in_f < out_f else (out_f * in_f + out_f ** 2) // nb
    assert layer.weight_params == monarch_params(out_f, in_f, nb) == authors
    right = torch.zeros(mid, in_f, dtype=F64)
    left = torch.zeros(out_f, mid, dtype=F64)
    for k in range(nb):
        right[k * q:(k + 1) * q, k * m:(k + 1) * m] = layer.r_blocks[k].detach()
        left[k * s:(k + 1) * s, k * q:(k + 1) * q] = layer.l_blocks[k].detach()
    p_mid = torch.zeros(mid, mid, dtype=F64)        # P^T: position d*q + c takes u[c*nb + d]
    for d in range(nb):
        for c in range(q):
            p_mid[d * q + c, c * nb + d] = 1
    p_out = torch.zeros(out_f, out_f, dtype=F64)    # P: row e of block d goes to e*nb + d
    for d in range(nb):
        for e in range(s):
            p_out[e * nb + d, d * s + e] = 1
    weight = p_out @ left @ p_mid @ right
    torch.testing.assert_close(layer.dense_weight().detach(), weight)
    x = torch.randn(5, in_f, dtype=F64)
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias.detach())


def test_lowrank_init_is_a_balanced_truncated_svd():
    torch.manual_seed(0)
    layer = LowRankLinear(40, 30, 5, dtype=F64)
    gram_u, gram_v = layer.u.T @ layer.u, layer.v.T @ layer.v
    torch.testing.assert_close(gram_u, gram_v)                      # U = A sqrt(S), V = B sqrt(S)
    torch.testing.assert_close(gram_u, torch.diag(torch.diagonal(gram_u)))
    assert torch.linalg.matrix_rank(layer.dense_weight()) == 5


def test_block_sparse_init_matches_dense_output_variance():
    torch.manual_seed(0)
    layout = torch.zeros(4, 16, dtype=torch.bool)
    layout[0, :2] = layout[1, :8] = layout[2, :16] = layout[3, 5] = True
    layer = BlockSparseLinear(256, 64, layout, 16, bias=False)
    dense = nn.Linear(256, 64, bias=False)
    x = torch.randn(4000, 256)
    with torch.no_grad():
        var = layer(x).var(0).reshape(4, 16).mean(1)
        target = dense(x).var()
    torch.testing.assert_close(var, target.expand(4), rtol=0.15, atol=0)


@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_layer_from_pattern_uses_exactly_the_pattern(name):
    pattern = make_pattern(name, 64, 32, 0.4, block_size=4, seed=1)
    torch.manual_seed(0)
    layer = layer_from_pattern(pattern, dtype=F64)
    if name == "dense":
        assert type(layer) is nn.Linear
        return
    assert isinstance(layer, StructuredLinear)
    assert layer.weight_params == pattern.params and layer.budget <= 0.4
    expected = {"lowrank": LowRankLinear, "monarch": MonarchLinear, "pixelfly": PixelflyLinear}
    if name in expected:
        assert type(layer) is expected[name]
    elif pattern.rank:
        assert type(layer) is SparseLowRankLinear
    else:
        assert type(layer) is BlockSparseLinear
    if pattern.layout is not None:
        sparse = layer if isinstance(layer, BlockSparseLinear) else layer.sparse
        assert torch.equal(sparse.layout, pattern.layout)
    x = torch.randn(3, 32, dtype=F64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


def test_pixelfly_budget_goes_through_plan_pixelfly():
    layer = PixelflyLinear(256, 128, budget=0.3, block_size=16)
    plan = plan_pixelfly(128, 256, 0.3, 16)
    assert (layer.butterfly_size, layer.n_factors, layer.rank) == (plan.butterfly_size, plan.n_factors, plan.rank)
    assert layer.budget == pytest.approx(plan.budget) and layer.budget <= 0.3
    released = PixelflyLinear(1024, 4096, butterfly_size=16, n_factors=2, rank=32, block_size=32)
    assert torch.equal(released.sparse.layout, flat_block_butterfly_layout(4096, 1024, 16, 2, 32))
    assert released.budget == pytest.approx(0.2265625)
    with pytest.raises(ValueError, match="either budget"):
        PixelflyLinear(64, 64, budget=0.3, rank=2, block_size=4)
    with pytest.raises(ValueError, match="butterfly_size"):
        PixelflyLinear(64, 64, rank=2)


def test_pixelfly_gating_is_the_released_mix():
    torch.manual_seed(0)
    layer = PixelflyLinear(32, 32, butterfly_size=4, n_factors=1, rank=2, block_size=4, gating=True).double()
    x = torch.randn(5, 32, dtype=F64)
    g = torch.sigmoid(x @ layer.gate.weight.T + layer.gate.bias)
    want = ((1 - g) * (x @ layer.sparse.dense_weight().T) + g * (x @ layer.lowrank.dense_weight().T)
            + layer.bias)
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(RuntimeError, match="gate"):
        layer.dense_weight()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_wrong_input_width_names_the_expected_width(name):
    layer = build(name)
    with pytest.raises(ValueError, match=f"in_features={layer.in_features}"):
        layer(torch.zeros(2, layer.in_features + 1, dtype=F64))


@pytest.mark.parametrize("name", ["blocksparse_torch", "pixelfly", "monarch", "lowrank", "masked"])
def test_to_dtype_state_dict_and_functional_call(name):
    layer32 = build(name, torch.float32)
    layer = build(name, F64)
    x = torch.randn(4, layer.in_features, dtype=F64)
    torch.testing.assert_close(layer32(x.float()).double(), layer(x), rtol=1e-4, atol=1e-5)
    assert all(p.dtype == torch.float32 for p in layer32.parameters())

    torch.manual_seed(123)
    other = BUILDERS[name]().to(F64)                  # same structure, other random values
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), layer(x))

    doubled = {k: 2 * v.detach() for k, v in layer.named_parameters()}
    y = torch.func.functional_call(layer, doubled, (x,))
    other.load_state_dict({**layer.state_dict(), **doubled})
    torch.testing.assert_close(y, other(x))


def test_backend_is_overridable_per_layer_and_repr_says_so():
    layer = build("pixelfly")
    x = torch.randn(3, 32, dtype=F64)
    y = layer(x)
    layer.backend = "reference"
    assert layer.sparse.backend == "reference"
    torch.testing.assert_close(layer(x), y)
    assert "backend='reference'" in repr(layer) and "butterfly_size=8" in repr(layer)
    with pytest.raises(ValueError, match="backend"):
        layer.backend = "cuda-magic"


def test_bench_table_and_figure_in_process():
    from pixelfly_lab.speed.bench import BenchConfig, plot_speed, speed_table

    config = BenchConfig(shapes=((64, 128),), rows=16, budgets=(0.5, 0.01), block_sizes=(16,),
                         peers=("monarch", "masked", "bsr"), repeats=1, warmup=0, allocator="default")
    table = speed_table(config, progress=False, isolate=False)
    dense = table[table["layer"] == "nn.Linear"].iloc[0]
    assert dense["speedup_forward_backward"] == 1.0 and dense["budget"] == 1.0
    assert {"Pixelfly released", "Pixelfly", "Monarch", "Masked dense", "torch BSR"} <= set(table["layer"])
    skipped = table["note"].str.startswith("skipped")                                # budget 0.01 cannot be met
    assert skipped.any() and table.loc[skipped, "forward_ms"].isna().all()
    assert table.loc[(table["layer"] == "torch BSR") & ~skipped, "forward_ms"].notna().all()  # forward works
    fig = plot_speed(table)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


def test_bench_command_writes_csv_and_figure(tmp_path):
    from pixelfly_lab.cli import build_parser

    args = build_parser().parse_args(["bench", "--out", str(tmp_path), "--shapes", "64x128", "--rows", "16",
                                      "--budgets", "0.5", "--block-sizes", "16", "--repeats", "1", "--peers",
                                      "--no-models"])
    assert args._run(args) == 0
    assert {"speed.csv", "speed.png", "speed.pdf"} <= {p.name for p in tmp_path.iterdir()}


# --- what each layer owns: rescale_, project_, weight_std, match_, linear_parts, .weight -----------

OWNERS = [n for n in BUILDERS if n not in ("blocksparse_reference",)] + ["butterfly"]


def build_owner(name, seed=0):
    from pixelfly_lab.nn.butterfly import ButterflyLinear
    torch.manual_seed(seed)
    return (ButterflyLinear(16, n_factors=3, bias=True) if name == "butterfly" else BUILDERS[name]()).to(F64)


@pytest.mark.parametrize("name", OWNERS)
@pytest.mark.parametrize("c", [0.3, 0.0])
def test_rescale_multiplies_the_dense_weight_and_keeps_the_bias(name, c):
    layer = build_owner(name)
    before = layer.dense_weight().detach().clone()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    layer.rescale_(c)
    torch.testing.assert_close(layer.dense_weight(), c * before, rtol=1e-12, atol=1e-14)
    assert (bias is None or torch.equal(layer.bias, bias)) and layer.init_scale == 1.0   # remembered only if asked
    weights = [p for n, p in layer.named_parameters() if n != "bias" and not n.startswith("gate")]
    if c == 0 and len(weights) > 1:   # a product: one factor zeroed, the others keep getting gradients
        assert any(p.abs().sum() > 0 for p in weights)
    with pytest.raises(ValueError, match="c must be"):
        layer.rescale_(-1.0)


@pytest.mark.parametrize("name", OWNERS)
def test_weight_std_and_match_and_the_read_only_weight(name):
    layer = build_owner(name)
    dense = layer.dense_weight().detach()
    assert layer.weight_std() == pytest.approx(dense.std().item(), rel=1e-10)
    factor = layer.match_(0.5 * layer.weight_std())
    assert factor == pytest.approx(0.5, rel=1e-10) and layer.weight_std() == pytest.approx(0.5 * dense.std().item())
    torch.testing.assert_close(layer.weight, layer.dense_weight().detach())
    if name != "masked":                                  # MaskedLinear's weight is its parameter
        layer.weight.zero_()                              # a copy: writing into it changes nothing
        assert layer.dense_weight().abs().sum() > 0 and not layer.weight.requires_grad


@pytest.mark.parametrize("name", ["masked", "blocksparse_torch", "lowrank", "monarch"])
def test_project_recovers_a_weight_that_has_the_structure(name):
    target = build_owner(name, seed=1).dense_weight().detach()
    layer = build_owner(name, seed=2)
    error = layer.project_(target)
    assert error < 1e-10
    torch.testing.assert_close(layer.dense_weight(), target, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["masked", "blocksparse_torch", "sparse_lowrank", "pixelfly"])
def test_project_on_a_support_is_the_target_there_and_sparse_plus_lowrank_is_never_worse(name):
    torch.manual_seed(3)
    layer = build_owner(name)
    target = torch.randn(layer.out_features, layer.in_features, dtype=F64)
    error = layer.project_(target)
    support = (BUILDERS["masked"]().mask if name == "masked" else
               (layer.sparse if hasattr(layer, "sparse") else layer).mask()).to(torch.bool)
    off = (target * ~support).norm() / target.norm()
    if name in ("masked", "blocksparse_torch"):        # exact oracle: W0 on the support, 0 off it
        torch.testing.assert_close(layer.dense_weight(), target * support)
        assert error == pytest.approx(off.item(), rel=1e-10)
    else:                                               # U V^T only lowers what S leaves
        assert error <= off.item() + 1e-12 and error == pytest.approx(
            ((target - layer.dense_weight()).norm() / target.norm()).item(), rel=1e-10)
    with pytest.raises(ValueError, match="shape"):
        layer.project_(target.T[:3])


def test_project_refuses_a_gated_layer_and_a_butterfly():
    gated = PixelflyLinear(32, 32, butterfly_size=4, n_factors=1, rank=2, block_size=8, gating=True)
    with pytest.raises(ValueError, match="ungated"):
        gated.project_(torch.randn(32, 32))
    with pytest.raises(NotImplementedError, match="ButterflyLinear"):
        build_owner("butterfly").project_(torch.randn(16, 16, dtype=F64))


@pytest.mark.parametrize("name", ["blocksparse_torch", "lowrank", "sparse_lowrank", "pixelfly", "pixelfly_contracting"])
def test_linear_parts_sum_to_the_dense_weight(name):
    layer = build_owner(name)
    total = torch.zeros(layer.out_features, layer.in_features, dtype=F64)
    for part in layer.linear_parts():
        if part.kind == "block_sparse":
            values = layer.get_parameter(part.names[0])
            dense = torch.zeros_like(total)
            b = part.block_size
            for k, (r, c) in enumerate(part.layout.nonzero().tolist()):   # the row-major order of the blocks
                dense[r * b:(r + 1) * b, c * b:(c + 1) * b] = values[k]
            total += dense
        else:
            u, v = (layer.get_parameter(n) for n in part.names)
            total += u @ v.T
    torch.testing.assert_close(total, layer.dense_weight())
    assert build_owner("masked").linear_parts() is None and build_owner("monarch").linear_parts() is None


@pytest.mark.parametrize("name", ["masked", "blocksparse_torch", "pixelfly", "monarch"])
def test_project_writes_every_value_of_a_layer_fresh_from_to_empty(name):
    """sparsify(init='project') builds on meta and projects: layouts and masks come back too."""
    torch.manual_seed(4)
    reference = build_owner(name)
    target = torch.randn(reference.out_features, reference.in_features, dtype=F64)
    with torch.device("meta"):
        torch.manual_seed(4)
        fresh = BUILDERS[name]().to(F64)
    fresh.to_empty(device="cpu")
    errors = []
    for layer in (reference, fresh):
        torch.manual_seed(5)                    # the randomised SVD draws its test matrix
        errors.append(layer.project_(target))
    assert errors[1] == pytest.approx(errors[0], rel=1e-9)
    for (key, want), (_, got) in zip(reference.state_dict().items(), fresh.state_dict().items()):
        if key != "bias":
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=key)
