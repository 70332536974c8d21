"""The Triton kernels' configs: the resource model that prunes them, the tuning lists, the
autotuned kernels.

A config (BLOCK_M, GROUP, num_warps, num_stages) is kept when its shared memory
(:func:`shared_bytes`) fits the device and its accumulator fits the registers without spilling
(:func:`config_fits`); :mod:`pixelfly_lab.ops.triton_check` checks the model against real
compiles for sm_80 and sm_90 (tests/test_triton_compile.py). Without autotuning one fixed config
is chosen (:func:`fixed_config`). Triton is imported at module level: nothing imports this
module at package import.
"""

from __future__ import annotations

import inspect
import itertools
import os

import torch
import triton

from pixelfly_lab.ops.triton_jit import dsd_kernel, sdd_kernel

__all__ = ["INTERPRET", "MAX_TILE_N", "SMEM_BY_ARCH", "shared_bytes", "config_fits", "fixed_config", "fit_args",
           "pruner", "DSD_CONFIGS", "SDD_CONFIGS", "DSD_KEY", "SDD_KEY", "dsd_tuned", "sdd_tuned"]

# Triton's CPU interpreter (numpy) runs the kernels: TRITON_INTERPRET=1, set before triton is imported
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_TILE_N = 256  # widest output tile (GROUP * b) one program computes
# Shared memory a block may use, by compute capability (CUDA's per-block opt-in maxima); used
# where torch cannot ask the device (it can: shared_memory_per_block_optin), e.g. when
# compiling for a target without one (pixelfly_lab.ops.triton_check).
SMEM_BY_ARCH = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}


def _smem_limit(device: torch.device) -> int:
    """Bytes of shared memory a program may use on ``device`` (or the active Triton target)."""
    if INTERPRET:  # numpy executes the kernels: no shared memory to run out of
        return max(SMEM_BY_ARCH.values())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        optin = getattr(props, "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
        arch = 10 * props.major + props.minor
    else:
        try:
            arch = triton.runtime.driver.active.get_current_target().arch
        except Exception:  # the interpreter: no target; the smallest limit of the table's GPUs
            arch = 86
    return SMEM_BY_ARCH.get(arch, min(SMEM_BY_ARCH.values()))


def shared_bytes(kernel: str, block: int, group: int, block_m: int, stages: int, size: int,
                  lowrank: bool = False, block_r: int = 64) -> int:
    """Model of the shared memory of a config: ``stages`` buffers of the pipelined tiles.

    dsd per stage: a (BLOCK_M x b) input tile + a (b x GROUP*b) weight tile; the fused low-rank
    epilogue's loop is pipelined too, with (BLOCK_M x BLOCK_R) + (BLOCK_R x GROUP*b) tiles, in the
    same buffers (the larger of the two loops counts). sdd per stage: (BLOCK_M x GROUP*b) of g +
    (BLOCK_M x b) of x. Fitted to Triton 3.7's allocation at sm_80 and sm_90, where it is exact
    for the pipelined loops and an upper bound otherwise; pixelfly_lab.ops.triton_check checks it
    against real compiles (tests/test_triton_compile.py).
    """
    width = group * block
    if kernel == "dsd":
        per_stage = block_m * block + block * width
        if lowrank:
            per_stage = max(per_stage, block_m * block_r + block_r * width)
    else:
        per_stage = block_m * (width + block)
    return stages * per_stage * size


def _acc_per_thread(kernel: str, block: int, group: int, block_m: int, warps: int) -> int:
    """Accumulator elements each thread holds in registers."""
    width = group * block
    return (block_m * width if kernel == "dsd" else width * block) // (32 * warps)


# Register model: the accumulator elements a thread may hold with no spill (255 registers a
# thread; the rest hold addresses, operand fragments and the pipeline's state). Measured with
# pixelfly_lab.ops.triton_check (Triton 3.7, sm_90): tensor-core dots (16-bit inputs, TF32) use
# ~120-160 registers at 64 accumulator floats a thread and 220-252 at 128, at the edge (the
# review of issue 12, with another Triton, saw those spill, the fused low-rank epilogue adding
# ~750 B), so 64 is the limit; FMA dots (float32 without TF32) keep their operands in registers
# too: 128-206 registers at 16-32 floats; float64 takes two registers an element: 8 (at 16, the
# fused low-rank epilogue used 254 registers and spilled 120 B). The FMA path ('auto' never takes
# it) also shows small stack frames (8-16 B) in some configs at any accumulator size, which no
# count of this kind predicts: pixelfly_lab.ops.triton_check reports them apart.
# At sm_80 (mma.sync: operand fragments live in registers too) 4-warp programs reached 255
# registers and spilled at 64 accumulator floats (16-bit) and from 32 with TF32 (fp32 operands
# take twice the registers; small stack frames even at 16), so 4-warp programs keep 32 (16-bit)
# and TF32 needs 8 warps.
def _max_acc(precision: str, size: int, lowrank: bool, warps: int = 8) -> int:
    if size == 8:
        return 8
    if precision == "ieee":
        return 32
    if size == 4:      # TF32 tensor cores
        return 32 if warps >= 8 else 0
    return 64 if warps >= 8 else 32


def config_fits(kernel: str, block: int, group: int, block_m: int, warps: int, stages: int, size: int, *,
          precision: str = "tf32", lowrank: bool = False, block_r: int = 64,
          smem_limit: int = min(SMEM_BY_ARCH.values()), registers: bool = True) -> bool:
    """Whether a config fits: shared memory within ``smem_limit`` and (``registers``) no register
    spill, by the models above; under the interpreter (numpy: no registers, no shared memory) only
    the tile width counts."""
    if INTERPRET:
        return group * block <= MAX_TILE_N
    return (group * block <= MAX_TILE_N
            and shared_bytes(kernel, block, group, block_m, stages, size, lowrank, block_r) <= smem_limit
            and (not registers
                 or _acc_per_thread(kernel, block, group, block_m, warps) <= _max_acc(precision, size, lowrank, warps)))


def fixed_config(kernel: str, block: int, size: int, max_group: int = 1, **fit) -> dict:
    """The config when not autotuning: the widest group, then the tallest tile and deepest pipeline that fit.

    Where no config is spill-free (float64 at block 128: its accumulator alone is 64 registers a
    thread at 8 warps), the smallest tile that fits shared memory: spills cost speed, not
    correctness, and float64 runs only for exact tests.
    """
    for registers, order in ((True, ((64, 32, 16), (3, 2, 1), (4, 8))), (False, ((16, 32, 64), (1, 2, 3), (8, 4)))):
        for group in (max_group, *[g for g in (8, 4, 2, 1) if g < max_group]) if registers else (1,):
            for block_m, stages, warps in itertools.product(*order):
                if config_fits(kernel, block, group, block_m, warps, stages, size, registers=registers, **fit):
                    return dict(BLOCK_M=block_m, GROUP=group, num_warps=warps, num_stages=stages)
    raise ValueError(f"no {kernel} kernel config fits block size {block} with {size}-byte elements on this "
                     "GPU (registers, shared memory); use a smaller block or backend='torch'")


def fit_args(kernel: str, named_args: dict, meta: dict) -> dict:
    """The config_fits keywords of one launch: precision, fused low rank, the device's shared memory."""
    tensor = named_args["a_ptr" if kernel == "dsd" else "g_ptr"]
    return dict(precision=meta["PRECISION"], lowrank=bool(meta.get("HAS_LOWRANK", False)),
                block_r=meta.get("BLOCK_R", 64), smem_limit=_smem_limit(tensor.device))


def pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        """Keep the configs that fit (and whose group the layout allows); at least the fixed config."""
        block = kwargs["BLOCK"]
        size = named_args["a_ptr" if kernel == "dsd" else "g_ptr"].element_size()
        max_group = min(named_args["MAX_GROUP"], max(1, MAX_TILE_N // block))
        fit = fit_args(kernel, named_args, kwargs)
        kept = [c for c in configs if c.kwargs["GROUP"] <= max_group
                and config_fits(kernel, block, c.kwargs["GROUP"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages, size, **fit)]
        if not kept:
            fixed = fixed_config(kernel, block, size, max_group, **fit)
            kept = [triton.Config({k: v for k, v in fixed.items() if k in ("BLOCK_M", "GROUP")},
                                  num_warps=fixed["num_warps"], num_stages=fixed["num_stages"])]
        return kept
    return prune


def _autotune_options() -> dict:
    """Short benchmark runs (2 + 10 ms a config, against triton's default 25 + 100) keep the first
    call of a new shape to about a second beyond compiling; Triton < 3.2 takes warmup/rep instead."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        return dict(do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=2, rep=10, quantiles=quantiles))
    return dict(warmup=2, rep=10)


# (BLOCK_M, GROUP, num_warps, num_stages); few enough that tuning a new shape costs seconds of compiling.
DSD_CONFIGS = [triton.Config({"BLOCK_M": bm, "GROUP": g}, num_warps=w, num_stages=st)
               for bm, g, w, st in ((64, 1, 4, 3), (64, 1, 4, 4), (128, 1, 4, 3), (128, 1, 8, 3),
                                    (64, 2, 4, 3), (128, 2, 8, 3), (64, 4, 8, 3), (128, 4, 8, 3),
                                    (64, 8, 8, 3))]
SDD_CONFIGS = [triton.Config({"BLOCK_M": bm, "GROUP": g}, num_warps=w, num_stages=st)
               for bm, g, w, st in ((32, 1, 4, 3), (64, 1, 4, 3), (64, 1, 8, 3), (128, 1, 8, 3),
                                    (64, 2, 8, 3), (64, 4, 8, 3), (128, 4, 8, 3))]
# Autotune keys: every argument that changes the compiled kernel or its best config (the
# constexprs included; Triton adds the tensors' dtypes itself), plus the rounded row count.
DSD_KEY = ["M_KEY", "N_OUT", "MAX_FANIN", "MAX_GROUP", "RANK", "BLOCK", "BLOCK_R", "HAS_BIAS", "HAS_LOWRANK",
           "TRANSPOSE", "PRECISION"]
SDD_KEY = ["M_KEY", "NNZ", "CHUNK", "MAX_GROUP", "BLOCK", "PRECISION"]
dsd_tuned = triton.autotune(DSD_CONFIGS, key=DSD_KEY, prune_configs_by={"early_config_prune": pruner("dsd")},
                             **_autotune_options())(dsd_kernel)
sdd_tuned = triton.autotune(SDD_CONFIGS, key=SDD_KEY, prune_configs_by={"early_config_prune": pruner("sdd")},
                             **_autotune_options())(sdd_kernel)
