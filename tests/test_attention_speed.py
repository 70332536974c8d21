"""The attention speed table counts the work of the route each row takes (exact FLOP oracles, no timing asserted)."""

import pytest
import torch

from pixelfly_lab.nn.attention import MASKED_SDPA_BELOW, PixelflyAttention
from pixelfly_lab.speed.attention import attention_flops, attention_speed_table


def pairs_of(layout: torch.Tensor, b: int, causal: bool) -> float:
    """Kept (i, j) score pairs of a block layout, counted element by element (the oracle)."""
    mask = layout.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return float((torch.tril(mask) if causal else mask).sum())


@pytest.mark.parametrize("causal", [False, True])
def test_flops_count_the_route_taken(causal):
    """Masked SDPA computes all T^2 scores (causality is in its mask); the kernel only the kept ones."""
    T, b, dim, heads = 128, 16, 32, 2
    D = dim // heads
    layer = PixelflyAttention(dim, heads, T, block_size=b, causal=causal)
    assert T < MASKED_SDPA_BELOW and layer.route_at(T) == "masked_sdpa"
    projections = 4 * 2 * T * dim ** 2
    kernel = 4 * D * heads * pairs_of(layer.layout_for(T), b, causal)
    masked = 4 * D * heads * T * T
    dense = 4 * D * heads * (T * (T + 1) / 2 if causal else T * T)
    assert attention_flops(layer, T, route="kernel") == pytest.approx(kernel + projections, rel=1e-12)
    assert attention_flops(layer, T) == attention_flops(layer, T, route="masked_sdpa") == pytest.approx(
        masked + projections, rel=1e-12)                                     # None: the layer's route at T
    assert attention_flops(layer, T, projections=False) == pytest.approx(kernel, rel=1e-12)   # the kernel row
    assert attention_flops(layer, T, dense=True, route="masked_sdpa") == pytest.approx(dense + projections, rel=1e-12)
    assert kernel < masked
    with pytest.raises(ValueError, match="route"):
        attention_flops(layer, T, route="auto")


@pytest.mark.parametrize("causal", [False, True])
def test_table_rows_below_the_crossover_count_masked_sdpa_work(causal):
    """Below MASKED_SDPA_BELOW the layer row times masked SDPA: its FLOP limit is the dense twin's work over
    all T^2 scores (1 without causality, (T + 1) / 2T of the attention when causal), not the layout's."""
    T, b, dim, heads = 128, 16, 16, 2
    table = attention_speed_table((T,), dim=dim, heads=heads, block_size=b, causal=causal, repeats=1, memory=False)
    forced = attention_speed_table((T,), dim=dim, heads=heads, block_size=b, causal=causal, repeats=1, memory=False,
                                   options={"route": "kernel"})
    layer, kernel = (table[table["row"] == row].iloc[0] for row in ("layer", "kernel"))
    assert (layer["route"], kernel["route"]) == ("masked_sdpa", "kernel")
    assert layer["density"] < 1 and layer["layout_flop_limit"] > 1       # what the layout alone would allow
    if causal:
        assert layer["flop_limit"] < 1                                   # masked SDPA does more than the causal twin
    else:
        assert layer["flop_limit"] == pytest.approx(1.0, rel=1e-12)     # the same T^2 scores and projections
    assert kernel["flop_limit"] == kernel["layout_flop_limit"] > 1
    forced_layer = forced[forced["row"] == "layer"].iloc[0]
    assert forced_layer["route"] == "kernel"
    assert forced_layer["flop_limit"] == forced_layer["layout_flop_limit"] == pytest.approx(layer["layout_flop_limit"])
    for frame in (table, forced):
        torch.testing.assert_close(frame["speedup"] / frame["flop_limit"], frame["fraction_of_limit"])
    # the rate divides the work the route did: masked SDPA's all-pairs attention (x3.5) and projections (x3)
    D = dim // heads
    work = 3.5 * 4 * D * heads * T * T + 3 * 4 * 2 * T * dim ** 2
    assert layer["sparse_gflops"] == pytest.approx(work / (layer["sparse_ms"] * 1e6), rel=1e-9)
