"""bench's measuring helpers: step timing of whole models, multiply-add counts against exact sums."""

import copy

import pytest
import torch
from torch import nn

from pixelfly_lab.speed.bench import ModelCase, _plain_ratio_ticks, model_speed_table, time_training_steps


def _mlp(hidden):
    return nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 64))


def test_step_table_counts_matmul_macs_exactly_and_names_the_baseline():
    torch.manual_seed(0)
    wide, narrow = _mlp(256), _mlp(128)
    table = time_training_steps({"wide": wide, "narrow": narrow, "copy": copy.deepcopy(wide)},
                                torch.randn(32, 64), steps=1, rounds=2, warmup=0)
    assert list(table["model"]) == ["wide", "narrow", "copy"]
    # forward: two products; backward: both weight gradients and the hidden layer's dX (the
    # batch needs no gradient): 5 products of 32 x 64 x hidden
    assert table["gmacs"].tolist() == pytest.approx([5 * 32 * 64 * 256 / 1e9, 5 * 32 * 64 * 128 / 1e9,
                                                     5 * 32 * 64 * 256 / 1e9], rel=0, abs=0)
    assert table["flop_limit"].tolist() == [1.0, 2.0, 1.0]
    assert table.loc[0, "ratio"] == 1.0 and (table["step_ms"] > 0).all()
    assert table["fraction_of_limit"].tolist() == pytest.approx((table["ratio"] / table["flop_limit"]).tolist())
    assert table.loc[1, "params"] == 2 * 64 * 128 + 128 + 64


def test_attention_macs_count_both_products_and_halve_causal():
    class Attend(nn.Module):
        def __init__(self, causal):
            super().__init__()
            self.causal, self.scale = causal, nn.Parameter(torch.ones(()))

        def forward(self, x):   # (B, heads, T, d); only the attention's products are matmuls
            q = x * self.scale
            return nn.functional.scaled_dot_product_attention(q, q, q, is_causal=self.causal)

    x = torch.randn(2, 3, 16, 8)
    table = time_training_steps({"full": Attend(False), "causal": Attend(True)}, x, steps=1, rounds=1, warmup=0)
    full = (2 + 5) * 2 * 3 * 16 * 16 * 8    # forward QK^T and PV; backward with the recompute
    assert table["gmacs"].tolist() == pytest.approx([full / 1e9, full / 2e9], rel=0, abs=0)


def test_step_table_refuses_bad_arguments_by_name():
    with pytest.raises(TypeError, match="models"):
        time_training_steps({"a": "not a module"}, torch.randn(2, 64))
    with pytest.raises(TypeError, match="batch"):
        time_training_steps([_mlp(8)], [[0.0] * 64])
    with pytest.raises(ValueError, match="rounds"):
        time_training_steps([_mlp(8)], torch.randn(2, 64), rounds=0)


def test_model_table_times_a_one_block_mixer_against_its_sparsified_copy():
    case = ModelCase("Mixer, 1 block of width 256", "mixer", batch=4, depth=1, dim=256)
    table = model_speed_table([case], rounds=1, progress=False)
    assert list(table["model"]) == ["dense", "pixelfly"] and set(table["case"]) == {case.name}
    dense, sparse = table.iloc[0], table.iloc[1]
    assert dense["budget"] == 1.0 and sparse["budget"] == 0.25
    assert sparse["params"] < dense["params"] and 1.5 < sparse["flop_limit"] < 4


def test_ratio_ticks_read_as_plain_ratios():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0.1, 0.5], [0.7, 9.0])
    ax.set_yscale("log")
    _plain_ratio_ticks(ax.yaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert {"1x", "2x", "4x", "8x"} <= set(labels)
    plt.close(fig)


def test_pixelfly_layers_count_their_stored_entries_per_product():
    from pixelfly_lab.nn.layers import PixelflyLinear

    torch.manual_seed(0)
    dense = nn.Linear(256, 1024)
    sparse = PixelflyLinear(256, 1024, butterfly_size=8, n_factors=1, rank=4, block_size=32)
    # 512 * 256 * 1024 multiply-adds: above the reference cut-off; dX too, so 3 products each
    x = torch.randn(512, 256, requires_grad=True)
    table = time_training_steps({"dense": dense, "sparse": sparse}, x, steps=1, rounds=1, warmup=0)
    stored = sparse.weight_params       # blocks + U + V: what one row costs per product
    assert table["gmacs"].tolist() == pytest.approx([3 * 512 * 256 * 1024 / 1e9, 3 * 512 * stored / 1e9], rel=1e-12)
    assert table.loc[1, "flop_limit"] == pytest.approx(1 / sparse.budget)
