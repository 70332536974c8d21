"""The Triton kernels compiled for real GPU targets on a machine without a GPU.

Triton's compiler and the ptxas in its wheel compile for sm_80 and sm_90 without a device
(:mod:`pixelfly_lab.ops.triton_check`, run in a subprocess: it swaps Triton's driver for a stand-in
that names the target, and needs TRITON_INTERPRET unset). Every config the autotuner's pruning
model keeps, and the fixed config used without tuning, must compile with no register spill, no
stack frame and shared memory within the target's limit (the FMA path of float32 without TF32,
which backend='auto' never takes, may carry a small stack frame: at most 64 B here, 8-16 B
measured); the model's shared-memory count must bound Triton's.

Scope: this test compiles the representative subset (bfloat16 at blocks 64 and 128 with the
heaviest epilogues, float32 without TF32 at block 32, for sm_80 and sm_90: 71 kernels; about two
minutes the first time on the team's loaded 2-core machine, 10-40 s with Triton's cache warm).
Every variant (5 dtype/precision pairs x 4 blocks x 7 kernel flag sets x every kept config, for
sm_80 and sm_90: about 1600 kernels, tens of minutes cold) is checked by
``python -m pixelfly_lab.ops.triton_check`` (exit status 1 on a violation). Skipped, with the reason,
only where the toolchain is missing (no triton, Triton < 3.3, no bundled ptxas).
"""

import json
import os
import subprocess
import sys

import pytest


def run_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "pixelfly_lab.ops.triton_check", "--json", *args], env=env,
                         capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if rows and "skip" in rows[0]:
        pytest.skip(rows[0]["skip"])
    return run, rows


def test_kept_configs_compile_without_spills_within_shared_memory():
    run, rows = run_check("--subset", "representative", "--arch", "80", "90")
    assert rows, run.stderr[-2000:]
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["variant"]["kernel"] for r in rows} == {"dsd", "sdd"}
    for r in rows:
        # tensor-core variants: no spill, no stack frame, shared memory within the limit; the FMA
        # variant (float32 without TF32) may carry a small stack frame (see triton_check), no more
        tensor_cores = r["variant"]["precision"] == "tf32"
        assert r["ok"] if tensor_cores else r["stack"] + r["spill_stores"] <= 64, r
        assert r["model_fits"], r                # only what the model keeps was compiled
        assert r["shared"] <= r["model_shared"], r
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


EVERY_CONFIG = """
import json
from pixelfly_lab.ops.triton_check import Variant, compile_variant, toolchain_problem
if toolchain_problem():
    print(json.dumps({"skip": toolchain_problem()}))
else:
    for r in compile_variant(Variant("sdd", "bfloat16", "tf32", 64), 90, every_config=True):
        print(json.dumps({"config": r.config, "ok": r.ok, "model_fits": r.model_fits, "shared": r.shared}))
"""


def test_the_model_prunes_a_config_that_overflows_shared_memory():
    """Every tuning config of the bf16 block-64 weight-gradient kernel at sm_90, the model bypassed:
    (BLOCK_M 128, GROUP 4) needs 240 KB of shared memory (> 227 KB), so the list holds a bad config,
    and the model must keep none of the bad ones."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", EVERY_CONFIG], env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if rows and "skip" in rows[0]:
        pytest.skip(rows[0]["skip"])
    assert run.returncode == 0 and rows, run.stderr[-2000:]
    bad = [r for r in rows if not r["ok"]]
    assert bad, "expected a config over the shared-memory limit among the tuning list"
    assert not any(r["model_fits"] for r in bad), bad
