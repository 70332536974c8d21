"""The one-shot GPU scripts (bench/gpu.sh, bench/gpu_train.sh) end to end in their CPU smoke modes,
and the GPU bench's parallel precompile compiling real kernels for sm_90 without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench  # noqa: E402


def run_script(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    return subprocess.run(["bash", str(ROOT / "bench" / script), "--smoke"], env=env, capture_output=True, text=True,
                          timeout=600)


def test_gpu_bench_smoke_writes_table_log_and_short_summary(tmp_path):
    import pandas as pd

    run = run_script("gpu.sh", tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(run.stdout.encode()) < 8192 and "all checks passed" in run.stdout
    table = pd.read_csv(tmp_path / "gpu_bench.csv")
    assert set(table["shape"]) == {"toy fc", "toy proj"}
    goal = table[table.budget == 0.25]
    assert len(goal) == 2 and (goal.backend == "triton").all()
    assert (goal.err_y < 1e-4).all() and (goal.err_grad < 1e-4).all()
    assert (goal.inv_density - 1 / goal.density).abs().max() < 1e-12
    assert (tmp_path / "gpu_bench.log").read_text().startswith("gpu_bench:")


def test_gpu_train_smoke_times_both_models(tmp_path):
    import pandas as pd

    run = run_script("gpu_train.sh", tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "gpu_train.csv")
    assert list(table.model) == ["gpt2-small", "mixer-b16"]
    assert (table.pixelfly_params < table.dense_params).all()       # the MLPs were sparsified
    assert (table.speedup == table.dense_ms / table.pixelfly_ms).all()


def test_roofline_is_the_larger_of_compute_and_memory_time():
    peak, bandwidth = gpu_bench.GPUS["H200"]
    d_in, d_out, tokens = 768, 3072, 8192
    compute = 6 * tokens * d_in * d_out / peak
    memory = 2 * (3 * tokens * (d_in + d_out) + 3 * d_in * d_out) / bandwidth
    assert gpu_bench.roofline(d_in, d_out, tokens, d_in * d_out, 0, peak, bandwidth) == max(compute, memory)
    # a 4x sparser layer moves as many activations: memory bound, its limit below 4x
    sparse = gpu_bench.roofline(d_in, d_out, tokens, d_in * d_out // 4, 0, peak, bandwidth)
    assert 1 < max(compute, memory) / sparse < 4


PRECOMPILE = """
import json, sys, time
sys.path.insert(0, {bench!r})
import gpu_bench
jobs = gpu_bench.kernel_jobs([(128, 256, 64, 16, 0.5)], [("bfloat16", 16)], "bfloat16")
for job in jobs:
    job["autotune"] = False   # one config a kernel keeps the test short; the tuned list is the same code
print(json.dumps([gpu_bench.warm_job(job, 90) for job in jobs]))
"""


def test_precompile_jobs_compile_for_sm90_without_a_gpu():

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    problem = subprocess.run([sys.executable, "-c", "from pixelfly_lab.ops.triton_check import toolchain_problem as t; "
                              "print(t() or '')"], env=env, capture_output=True, text=True).stdout.strip()
    if problem:
        pytest.skip(problem)
    run = subprocess.run([sys.executable, "-c", PRECOMPILE.format(bench=str(ROOT / "bench"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads(run.stdout.strip().splitlines()[-1])) == 6   # 3 kernels of the layer, 3 of the check
