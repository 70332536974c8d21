"""Compile the Triton kernels for a GPU target on a machine without one, and check their resources.

Every kernel variant (dsd forward / input gradient with its bias and low-rank epilogue flags, sdd
weight gradient; each dtype and block size) is compiled, for every config the autotuner's pruner
keeps, by the real launchers of :mod:`pixelfly_lab.ops.triton_kernels` in ``warmup`` mode on meta
tensors, so the specialisation (dtypes, alignment, strides equal to 1) is the one a real launch
gets. Triton's compiler and the ptxas bundled in its wheel need no GPU: a stand-in driver names
the target (sm_80, sm_90). For each compiled kernel this reports the shared memory Triton
allocated and, from ``ptxas -v``, registers, stack frame and spill bytes; a config passes when it
spills nothing, has no stack frame and fits the target's shared memory
(:data:`pixelfly_lab.ops.triton_configs.SMEM_BY_ARCH`). The exit status counts the tensor-core
variants (bfloat16, float16, float32 with TF32: what backend='auto' runs); the FMA variants
(float32 without TF32, float64: exact tests, backend='triton' only) are compiled and reported, and
a few of their configs carry small stack frames (8-16 B, measured with Triton 3.7) that the
pruning model does not predict.

Run all variants (minutes; compiled kernels are cached in Triton's cache directory):

    python -m pixelfly_lab.ops.triton_check            # sm_80 and sm_90, every variant
    python -m pixelfly_lab.ops.triton_check --subset representative --arch 90

tests/test_triton_compile.py runs the representative subset. Needs Triton >= 3.3 (its
``warmup``/driver API); older Triton reports that the toolchain is unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from pixelfly_lab.ops.triton_tables import layout_tables

__all__ = ["Variant", "Resources", "variants", "compile_variant", "toolchain_problem", "target", "main"]


@dataclass(frozen=True)
class Variant:
    """One kernel variant: kernel 'dsd' or 'sdd', dtype name, precision, block size and flags."""

    kernel: str
    dtype: str
    precision: str          # 'tf32' (tensor cores; ignored for 16-bit) or 'ieee' (FMA)
    block: int
    transpose: bool = False
    bias: bool = False
    lowrank: bool = False


@dataclass(frozen=True)
class Resources:
    """What one compiled config uses."""

    variant: Variant
    arch: int
    config: str
    shared: int
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    seconds: float
    model_fits: bool = True   # what the pruning model predicted for this config
    model_shared: int = 0     # the model's shared memory bytes

    @property
    def ok(self) -> bool:
        from pixelfly_lab.ops.triton_configs import SMEM_BY_ARCH

        return (self.spill_stores == 0 and self.spill_loads == 0 and self.stack == 0
                and self.shared <= SMEM_BY_ARCH[self.arch])


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64}


def variants(subset: str = "all") -> list[Variant]:
    """Kernel variants: 'all' (every dtype, precision, block and flag set the launchers produce)
    or 'representative' (bfloat16 at blocks 64 and 128, the heaviest epilogues; float32 without
    TF32 at block 32; the goal configurations of the GPU benchmark)."""
    # dsd flag sets the launchers produce: forward (bias, low rank) x 4; input gradient, low rank or not
    dsd_flags = [(False, b, lr) for b in (False, True) for lr in (False, True)] + [(True, False, lr) for lr in (False, True)]
    if subset == "all":
        dtypes = [("bfloat16", "tf32"), ("float16", "tf32"), ("float32", "tf32"), ("float32", "ieee"),
                  ("float64", "ieee")]
        blocks = (16, 32, 64, 128)
    elif subset == "representative":
        dtypes, blocks = [("bfloat16", "tf32")], (64, 128)
        dsd_flags = [(False, True, True), (True, False, True)]
    else:
        raise ValueError(f"subset must be 'all' or 'representative', got {subset!r}")
    out = []
    for dtype, precision in dtypes:
        for block in blocks:
            out += [Variant("dsd", dtype, precision, block, t, b, lr) for t, b, lr in dsd_flags]
            out.append(Variant("sdd", dtype, precision, block))
    if subset == "representative":
        out += [Variant("dsd", "float32", "ieee", 32, False, True, True), Variant("sdd", "float32", "ieee", 32)]
    return out


def _ptxas() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.access(path, os.X_OK) else None


def toolchain_problem() -> str | None:
    """Why kernels cannot be compiled here (None when they can)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as err:
        return f"triton does not import: {err}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: kernels are interpreted, not compiled"
    if tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2]) < (3, 3):
        return f"triton {triton.__version__} < 3.3: no driver/warmup API this check can use"
    if _ptxas() is None:
        return "the ptxas bundled with triton is missing"
    return None


class _TargetDriver:
    """Stands in for Triton's CUDA driver: names the target (one 'device' per arch), launches nothing."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("meta")


@contextlib.contextmanager
def target(arch: int):
    """Compile (warmup) for sm_``arch`` in this block, with no GPU: Triton's driver swapped for a stand-in."""
    from triton.runtime import driver

    saved = getattr(driver, "_active", None)
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = saved


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_resources(ptx: str, arch: int) -> tuple[int, int, int, int]:
    """(registers, stack bytes, spill store bytes, spill load bytes) of a PTX kernel, from ``ptxas -v``."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        run = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = run.stderr + run.stdout
    regs = re.search(r"Used (\d+) registers", log)
    frame = _PTXAS_LINE.search(log)
    if regs is None or frame is None:
        raise RuntimeError(f"unexpected ptxas output: {log[-500:]}")
    return int(regs.group(1)), int(frame.group(1)), int(frame.group(2)), int(frame.group(3))


def _operands(v: Variant, rows: int = 4096):
    """Meta operands shaped like a flat block butterfly layer whose rows repeat in runs of 8
    (every GROUP a config may use is allowed)."""
    dtype = _DTYPES[v.dtype]
    base = torch.eye(4, dtype=torch.bool) | torch.eye(4, dtype=torch.bool).roll(1, 1)
    layout = base.repeat_interleave(8, 0).repeat_interleave(8, 1)     # (32, 32) blocks
    tables = layout_tables(layout, "meta")
    R, C = layout.shape
    meta = dict(device="meta", dtype=dtype)
    return tables, dict(x=torch.empty(rows, C * v.block, **meta), gy=torch.empty(rows, R * v.block, **meta),
                        values=torch.empty(tables.nnz, v.block, v.block, **meta),
                        bias=torch.empty(max(R, C) * v.block, **meta), rank=64)


def compile_variant(v: Variant, arch: int, every_config: bool = False) -> list[Resources]:
    """Compile the configs the pruner keeps for variant ``v`` at sm_``arch`` (and the fixed config
    used without autotuning); their resources. ``every_config``: compile every config of the tuning
    list instead (calibrating the pruning model: :attr:`Resources.model_fits` against the compile)."""
    from pixelfly_lab.ops import triton_configs, triton_kernels as tk

    tables, ops = _operands(v)
    # the precision the variant asks for; every_config: the configs the model would prune too
    options = dict(warmup=True, precision=v.precision, prune=not every_config)
    compiled = {}
    with target(arch):
        for autotune in (None, False):              # the tuned configs, then the fixed one
            started = time.perf_counter()
            if v.kernel == "sdd":
                pairs = tk.sdd_matmul(ops["gy"], ops["x"], tables, v.block, split=1, autotune=autotune, **options)
            else:
                a = ops["gy"] if v.transpose else ops["x"]
                n_out = (tables.shape[1] if v.transpose else tables.shape[0]) * v.block
                lowrank = None
                if v.lowrank:
                    lowrank = (torch.empty(a.shape[0], ops["rank"], device="meta", dtype=a.dtype),
                               torch.empty(n_out, ops["rank"], device="meta", dtype=a.dtype))
                pairs = tk.dsd_matmul(a, ops["values"], tables, transpose=v.transpose,
                                      bias=ops["bias"][:n_out] if v.bias else None, lowrank=lowrank,
                                      autotune=autotune, **options)
            seconds = (time.perf_counter() - started) / max(len(pairs), 1)
            for config, kernel in pairs:
                compiled.setdefault(tuple(sorted(config.items())), (config, kernel, seconds))
    out = []
    for config, kernel, seconds in compiled.values():
        regs, stack, stores, loads = ptxas_resources(kernel.asm["ptx"], arch)
        fits = triton_configs.config_fits(v.kernel, v.block, config["GROUP"], config["BLOCK_M"],
                                          config["num_warps"], config["num_stages"], _DTYPES[v.dtype].itemsize,
                                          precision=v.precision, lowrank=v.lowrank,
                                          smem_limit=triton_configs.SMEM_BY_ARCH[arch])
        shared = triton_configs.shared_bytes(v.kernel, v.block, config["GROUP"], config["BLOCK_M"],
                                             config["num_stages"], _DTYPES[v.dtype].itemsize, v.lowrank)
        name = " ".join(f"{k}={config[k]}" for k in ("BLOCK_M", "GROUP", "num_warps", "num_stages"))
        out.append(Resources(v, arch, name, int(kernel.metadata.shared), regs, stack, stores, loads, seconds,
                             fits, shared))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile every Triton kernel variant for sm_80/sm_90 and check "
                                            "spills, stack and shared memory (no GPU needed).")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--subset", default="all", choices=["all", "representative"])
    p.add_argument("--json", action="store_true", help="one JSON object a line, for tests")
    p.add_argument("--every-config", action="store_true",
                   help="compile every tuning config, not only those the pruning model keeps (calibration)")
    args = p.parse_args(argv)
    problem = toolchain_problem()
    if problem:
        print(json.dumps({"skip": problem}) if args.json else f"skipped: {problem}")
        return 0
    started, bad, count, fma_issues = time.perf_counter(), 0, 0, []
    for arch in args.arch:
        for v in variants(args.subset):
            for r in compile_variant(v, arch, args.every_config):
                count += 1
                if r.model_fits and not r.ok and v.precision == "tf32":   # kept by the model: must fit
                    bad += 1
                elif r.model_fits and not r.ok:
                    fma_issues.append(r.stack + r.spill_stores)
                if args.json:
                    print(json.dumps(dict(asdict(r), ok=r.ok)), flush=True)
                elif not r.ok or os.environ.get("VERBOSE"):
                    print(f"{'ok ' if r.ok else 'BAD'} model {'keeps ' if r.model_fits else 'prunes'} sm_{arch} {v.kernel} {v.dtype}/{v.precision} b{v.block} "
                          f"T{int(v.transpose)} bias{int(v.bias)} lr{int(v.lowrank)} {r.config}: shared {r.shared} "
                          f"regs {r.registers} stack {r.stack} spills {r.spill_stores}/{r.spill_loads}", flush=True)
    if not args.json:
        print(f"{count} kernels compiled, {bad} tensor-core configs over budget; FMA path: {len(fma_issues)} kept "
              f"configs with a stack frame or spills (at most {max(fma_issues, default=0)} B); "
              f"{time.perf_counter() - started:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
