"""bench's measuring helpers: step timing of whole models, multiply-add counts against exact sums."""

import copy

import pandas as pd
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
    assert table[["matmul_ms", "sparse_fraction", "attainable_ratio"]].isna().all().all()   # not asked for


def test_step_table_reports_the_system_time_inside_steps(monkeypatch):
    """system_ms and page_faults are medians of the operating system's CPU time and page faults
    across each timed step (fake counters that advance 0.25 s and 7 faults a reading: every step
    reads each twice)."""
    from pixelfly_lab.speed import timer
    readings = iter((0.25 * i, 7 * i) for i in range(1000))
    monkeypatch.setattr(timer, "_os_counters", lambda: next(readings))
    table = time_training_steps({"a": _mlp(16), "b": _mlp(8)}, torch.randn(4, 64), steps=2, rounds=2, warmup=0)
    assert table["system_ms"].tolist() == [250.0, 250.0]
    assert table["page_faults"].tolist() == [7.0, 7.0]
    assert "ratio_without_system" in table   # (the fake 0.25 s of system time exceeds these steps: NaN)
    monkeypatch.undo()   # the real counters of this process
    system, faults = timer._os_counters()
    assert 0 <= system < 1e6 and faults >= 0


def test_ratio_without_system_takes_each_steps_system_time_out():
    """The baseline's median of (wall - system) over each model's; NaN with several threads (system
    time summed over threads) or where a model's steps were all system time."""
    from pixelfly_lab.speed.timer import _ratios_without_system
    times = {"dense": [1.0, 3.0, 2.0], "sparse": [1.0, 0.9, 1.2]}
    system = {"dense": [0.5, 0.5, 1.0], "sparse": [0.5, 0.4, 0.2]}
    got = _ratios_without_system(times, system, "dense", one_thread=True)
    assert got == {"dense": 1.0, "sparse": pytest.approx(1.0 / 0.5)}   # medians: 1.0 and 0.5
    assert all(v != v for v in _ratios_without_system(times, system, "dense", one_thread=False).values())
    all_system = _ratios_without_system({"a": [1.0], "b": [1.0]}, {"a": [0.5], "b": [1.0]}, "a", True)["b"]
    assert all_system != all_system   # NaN


def test_own_step_medians_fall_back_to_wall_time():
    """wall - system on one thread; wall time with several threads or where system time is NaN
    (no resource module), so the matmul columns stay defined there."""
    from pixelfly_lab.speed.timer import _own_medians
    times, system = {"a": [1.0, 3.0, 2.0]}, {"a": [0.5, 0.5, 1.0]}
    assert _own_medians(times, system, one_thread=True) == {"a": 1.0}
    assert _own_medians(times, system, one_thread=False) == {"a": 2.0}
    assert _own_medians(times, {"a": [float("nan")] * 3}, one_thread=True) == {"a": 2.0}
    from pixelfly_lab.speed.timer import _ratios_without_system
    unknown = _ratios_without_system({"a": [1.0], "b": [2.0]}, {"a": [float("nan")], "b": [float("nan")]}, "a", True)
    assert all(r != r for r in unknown.values())   # NaN, not the wall ratio under another name


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


@pytest.mark.parametrize("causal", [False, True])
def test_block_attention_counts_the_kept_pairs_of_its_layout(causal):
    """Against the (T, T) element mask of the layout (j <= i too when causal): D + Dv per kept pair
    forward, 3 D + 2 Dv backward, per batch and head, as scaled dot-product attention counts."""
    from pixelfly_lab.ops.attention import block_sparse_attention
    from pixelfly_lab.ops.registry import register_layout
    from pixelfly_lab.speed.timer import _MacCounter
    from pixelfly_lab.structure.masks import layout_to_mask

    torch.manual_seed(0)
    layout = torch.rand(4, 4) < 0.5
    layout |= torch.eye(4, dtype=torch.bool)
    key, b, (B, H, D, Dv) = register_layout(layout, 8), 8, (2, 3, 16, 4)
    q, k = (torch.randn(B, H, 32, D, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, 32, Dv, requires_grad=True)
    mask = layout_to_mask(layout, b)
    pairs = int((mask.tril() if causal else mask).sum())
    with _MacCounter() as forward:
        out = block_sparse_attention(q, k, v, key, b, causal=causal)
    with _MacCounter() as backward:
        out.sum().backward()
    assert forward.macs == B * H * pairs * (D + Dv)
    assert backward.macs == B * H * pairs * (3 * D + 2 * Dv)


def test_matmul_time_counts_only_the_calls_that_multiply():
    """A clock that ticks once per reading: each timed call reads it twice, so seconds = calls with
    multiply-adds (forward 2 addmm; backward dW2, the hidden layer's dX, dW1); the activation,
    the loss and the bias gradients are not timed."""
    from pixelfly_lab.speed.timer import _MacCounter

    ticks = iter(range(1000))
    model, x = _mlp(32), torch.randn(8, 64)
    with _MacCounter(lambda: next(ticks)) as meter:
        model(x).square().sum().backward()
    assert meter.seconds == 5 and meter.macs == 5 * 8 * 64 * 32
    assert meter.own_seconds == 0 and meter.own_macs == 0


def test_a_pixelfly_layer_is_timed_once_per_call_as_the_toolkits_own_op():
    """Forward and backward are one custom-op call each (what runs inside is not seen again): two
    timed calls of its own beside nn.Linear's three (addmm; dW and dX), its multiply-adds counted
    apart."""
    from pixelfly_lab.nn.layers import PixelflyLinear
    from pixelfly_lab.speed.timer import _MacCounter

    torch.manual_seed(0)
    sparse = PixelflyLinear(256, 1024, butterfly_size=8, n_factors=1, rank=4, block_size=32)
    model = nn.Sequential(nn.Linear(64, 256), sparse)
    ticks = iter(range(1000))
    x = torch.randn(512, 64)
    with _MacCounter(lambda: next(ticks)) as meter:
        model(x).sum().backward()
    assert meter.own_seconds == 2 and meter.seconds == 2 + 2
    assert meter.own_macs == 3 * 512 * sparse.weight_params and meter.macs == meter.own_macs + 2 * 512 * 64 * 256


def test_matmul_columns_put_the_sparse_ops_at_the_baselines_matmul_rate():
    from types import SimpleNamespace as Pass
    from pixelfly_lab.speed.timer import _matmul_columns

    steps = {"dense": 10.0, "sparse": 5.0}
    passes = {"dense": [Pass(seconds=8.0, own_seconds=0.0, macs=400, own_macs=0)] * 3,
              "sparse": [Pass(seconds=3.0, own_seconds=2.5, macs=150, own_macs=100)] * 3}
    got = _matmul_columns(steps, passes, "dense", "sparse")
    # the dense rate is 50 multiply-adds a second: the sparse ops' 100 would take 2 s of their 2.5;
    # the other 2.5 s of the step (0.5 of other matmuls among them) stay
    assert got == {"matmul_ms": 3000.0, "other_ms": 2000.0, "sparse_ms": 2500.0,
                   "sparse_fraction": pytest.approx(2 / 2.5), "attainable_ratio": pytest.approx(10 / 4.5)}
    base = _matmul_columns(steps, passes, "dense", "dense")
    assert base["attainable_ratio"] == 1.0 and base["sparse_ms"] == 0.0 and base["sparse_fraction"] != base["sparse_fraction"]
    assert all(v != v for v in _matmul_columns(steps, {"dense": [], "sparse": []}, "dense", "sparse").values())


def test_model_table_times_the_matmuls():
    torch.manual_seed(0)
    from pixelfly_lab.nn.layers import PixelflyLinear
    dense = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    sparse = nn.Sequential(PixelflyLinear(256, 1024, budget=0.25), nn.GELU(), PixelflyLinear(1024, 256, budget=0.25))
    table = time_training_steps({"dense": dense, "sparse": sparse}, torch.randn(256, 256), steps=1, rounds=2,
                                warmup=1, time_matmuls=True)
    assert (table["matmul_ms"] > 0).all() and table.loc[0, "sparse_ms"] == 0 and table.loc[1, "sparse_ms"] > 0
    assert table.loc[0, "attainable_ratio"] == 1.0 and table.loc[1, "attainable_ratio"] > 0
    assert table.loc[1, "sparse_fraction"] > 0


def test_step_table_refuses_bad_arguments_by_name():
    with pytest.raises(TypeError, match="models"):
        time_training_steps({"a": "not a module"}, torch.randn(2, 64))
    with pytest.raises(TypeError, match="batch"):
        time_training_steps([_mlp(8)], [[0.0] * 64])
    with pytest.raises(ValueError, match="rounds"):
        time_training_steps([_mlp(8)], torch.randn(2, 64), rounds=0)
    with pytest.raises(TypeError, match="time_matmuls"):
        time_training_steps([_mlp(8)], torch.randn(2, 64), time_matmuls="yes")


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


def _toy_table(**options):
    from pixelfly_lab.speed.bench import BenchConfig, speed_table

    config = BenchConfig(shapes=((128, 256),), rows=64, budgets=(0.25,), block_sizes=(32,), peers=(),
                         backends=("torch",), released=False, warmup=0, **{"repeats": 1, **options})
    return speed_table(config, progress=False, isolate=False)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_layer_table_rates_are_consistent_with_its_times(autocast):
    table = _toy_table(autocast=autocast, repeats=3)
    assert list(table["layer"]) == ["nn.Linear", "Pixelfly"]
    assert set(table["dtype"]) == {"float32" if autocast is None else "bfloat16 (autocast)"}
    for suffix, products in (("", 3), ("_forward", 1)):
        mode = "forward_backward" if not suffix else "forward"
        flops = 2 * products * 64 * 128 * 256
        dense_ms = table.loc[0, f"{mode}_ms"]
        # every row shows nn.Linear's rate at its shape; a row's useful rate is its budget's share of
        # the dense FLOPs over its own time; the fraction is one over the other (= speed-up / limit)
        assert table[f"dense_gflops{suffix}"].tolist() == pytest.approx([flops / (1e6 * dense_ms)] * 2)
        assert table[f"useful_gflops{suffix}"].tolist() == pytest.approx(
            (table["budget"] * flops / (1e6 * table[f"{mode}_ms"])).tolist())
        assert table[f"fraction_of_dense_rate{suffix}"].tolist() == pytest.approx(
            (table[f"useful_gflops{suffix}"] / table[f"dense_gflops{suffix}"]).tolist())
        assert table[f"fraction_of_dense_rate{suffix}"].tolist() == pytest.approx(
            table[f"fraction_of_limit_{mode}"].tolist())
    assert table.loc[0, "fraction_of_dense_rate"] == 1.0
    backward = table["forward_backward_ms"] - table["forward_ms"]   # the backward's estimate
    assert table["fraction_of_dense_rate_backward"].tolist() == pytest.approx(
        (backward[0] / backward * table["budget"]).tolist())
    # the per-round paired ratios' quartiles: nn.Linear against itself is 1 in every round; a
    # layer's band is ordered (with 3 rounds the quartiles may both equal the median)
    assert table.loc[0, "fraction_q25"] == table.loc[0, "fraction_q75"] == 1.0
    assert 0 < table.loc[1, "fraction_q25"] <= table.loc[1, "fraction_q75"]


def test_paired_quartiles_pair_rounds_and_need_two():
    """Ratios are taken round by round (a slow round for both cancels), quartiles inclusive; fewer
    than two usable rounds give NaN."""
    from pixelfly_lab.speed.layer_speed import _paired_quartiles
    assert _paired_quartiles([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 2.0)   # the same ratio each round
    assert _paired_quartiles([1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.25, 0.5, 1.0]) == (1.0, 2.0)
    assert all(v != v for v in _paired_quartiles([1.0], [1.0]))
    assert all(v != v for v in _paired_quartiles([1.0, 2.0], [0.0, 1.0]))


def test_machine_header_names_the_cpu_flags_and_load():
    from pixelfly_lab.speed.bench import machine, machine_header

    info = machine()
    assert set(info) == {"model", "flags", "load_avg", "cores"} and len(info["load_avg"]) == 3
    assert all(flag.startswith(("avx", "amx", "fma")) for flag in info["flags"].split())
    assert "load average" in machine_header() and info["model"] in machine_header()


def test_bench_command_prints_one_table_per_thread_and_row_count(tmp_path, capsys):
    import argparse

    from pixelfly_lab.speed import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "128x256", "--rows", "64", "32", "--threads", "1", "--budgets", "0.25",
                              "--block-sizes", "32", "--peers", "--backends", "torch", "--repeats", "1",
                              "--no-models", "--dtype", "bfloat16", "--out", str(tmp_path)])
    assert bench.run(args, isolate=False) == 0
    printed = capsys.readouterr().out
    assert printed.count("# CPU:") == 2 and "fraction_of_dense_rate" in printed
    saved = pd.read_csv(tmp_path / "speed.csv")
    assert sorted(saved["rows"].unique()) == [32, 64] and "useful_gflops" in saved
    assert set(saved["dtype"]) == {"bfloat16 (autocast)"} and set(saved["threads"]) == {1}


def test_gpt_case_swaps_in_pixelfly_attention_and_mlps():
    from pixelfly_lab.nn.attention import PixelflyAttention
    from pixelfly_lab.nn.layers import PixelflyLinear
    from pixelfly_lab.speed.model_speed import _model_pair

    case = ModelCase("GPT, 1 block", "gpt", batch=1, depth=1, dim=192, context=128, block_size=16,
                     attention="pixelfly")
    dense, sparse, batch, _ = _model_pair(case, seed=0)
    assert isinstance(sparse.blocks[0].attn, PixelflyAttention) and sparse.blocks[0].attn.causal
    assert not isinstance(dense.blocks[0].attn, PixelflyAttention)
    assert isinstance(sparse.blocks[0].mlp.fc1, PixelflyLinear) and batch.shape == (1, 128)


def test_stream_bench_times_both_settings_and_restores_the_threshold():
    """bench/stream_bench.py at a toy size: four rows (two dtypes x two configurations), every
    median positive, and STREAM_BYTES as shipped afterwards; bad arguments named."""
    import importlib.util
    from pathlib import Path

    from pixelfly_lab.ops import native_linear
    path = Path(__file__).resolve().parent.parent / "bench" / "stream_bench.py"
    spec = importlib.util.spec_from_file_location("stream_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = native_linear.STREAM_BYTES
    rows = module.compare(rows=4, rounds=1)
    assert [(r["dtype"], r["layer"]) for r in rows] == [
        ("float32", "released"), ("float32", "budget 0.1"),
        ("bfloat16 (autocast)", "released"), ("bfloat16 (autocast)", "budget 0.1")]
    assert all(r[f"{m}_{s}"] > 0 for r in rows for m in module.MODES for s in ("on", "off"))
    assert native_linear.STREAM_BYTES == shipped
    with pytest.raises(ValueError, match="--rows"):
        module.main(["--rows", "0"])


def test_gemm_bench_ceiling_times_the_forward_and_backward_as_run_and_in_cache(monkeypatch):
    """bench/native_gemm_bench.py --ceiling at a toy size: both configurations, the forward as run
    and narrow (also through the gathered tables bfloat16 takes), positive rates against one dense
    rate; the narrow table keeps every product and moves output 0's slices inside [0, N); the
    backward's parts as run and with gy folded (only operand 0's columns move), the shipped tables
    restored; bad arguments named."""
    import importlib.util
    from pathlib import Path

    from pixelfly_lab.ops import native, native_linear
    if native.load("blocksparse_cpu") is None:
        pytest.skip("the compiled kernel cannot be built here")
    path = Path(__file__).resolve().parent.parent / "bench" / "native_gemm_bench.py"
    spec = importlib.util.spec_from_file_location("native_gemm_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (native_linear.product_tables, native_linear.new_output)
    rows = module.ceiling(rows=4, rounds=1, dtype=torch.float32)
    assert [(r["layer"], r["output"].split()[0]) for r in rows] == [
        ("released", "4096"), ("released", "narrow"), ("budget 0.1", "4096"), ("budget 0.1", "narrow")]
    assert all(r["useful_gflops"] > 0 and r["of_mm"] > 0 and r["of_linear"] > 0 for r in rows)
    assert len({(r["mm_gflops"], r["linear_gflops"]) for r in rows}) == 1
    assert all(r["of_mm"] == pytest.approx(r["useful_gflops"] / r["mm_gflops"]) for r in rows)
    assert (native_linear.product_tables, native_linear.new_output) == shipped
    shipped_gathered, narrowed = native_linear.gathered_products, []
    monkeypatch.setattr(native_linear, "GATHERED", (torch.float32,))   # the gathered forward, on any CPU
    monkeypatch.setattr(module, "_narrow", lambda t, real=module._narrow: narrowed.append(len(t)) or real(t))
    assert len(module.ceiling(rows=4, rounds=1, dtype=torch.float32)) == 4
    assert native_linear.gathered_products is shipped_gathered and len(narrowed) == 4   # 2 widths + 2 gathered
    monkeypatch.undo()
    table = torch.tensor([(0, 0, 4, 0, 0, 8, 8, 16, 0, 0), (1, 0, 2, 1, 0, 8, 8, 0, 0, 1), (0, 0, 4, 0, 0, 8, 8, 8, 1, 0)])
    moved, width = module._narrow(table)
    assert width == 8 and moved[:, 7].tolist() == [0, 0, 0] and torch.equal(moved[:, :7], table[:, :7])
    shipped_grams, shipped_stages = native_linear.gram_table, native_linear._stages
    backward = module.backward_ceiling(rows=4, rounds=1, dtype=torch.float32)
    assert [(r["layer"], r["part"], r["gy"].split()[0]) for r in backward] == [
        (layer, part, gy) for layer in ("released", "budget 0.1") for part in ("dX", "grams", "both")
        for gy in ("as", "in")]
    assert all(r["useful_gflops"] > 0 and r["of_mm"] == pytest.approx(r["useful_gflops"] / r["mm_gflops"])
               for r in backward)
    assert (native_linear.product_tables, native_linear.gram_table, native_linear._stages) == (
        shipped[0], shipped_grams, shipped_stages)
    grams = torch.tensor([(0, 0, 32, 0, 300, 128, 0, 0, 0), (1, 0, 5, 1, 700, 256, 1, 0, 0)])
    folded = module._fold(grams, 4, 3)   # gy (B operand 0) read at column 300 % 256; operand 1 untouched
    assert folded[:, 4].tolist() == [44, 700] and torch.equal(folded[:, :4], grams[:, :4])
    curve = module.k_curve(rows=4, rounds=1, dtype=torch.float32, ks=(32, 64))
    assert [r["K"] for r in curve] == [32, 64] and all(r["gflops"] > 0 for r in curve)
    with pytest.raises(ValueError, match="--rows"):
        module.main(["--ceiling", "--rows", "0"])
