"""What decides this machine's GEMM rate, printed above every speed table: CPU model, flags, load.

Speed targets are fractions of the same machine's dense rate (arXiv 2112.00029's speed-ups are
GPU figures; CPUs of one kind differ): every table names the CPU, its avx2/avx512/amx/fma flags
and the load average it was measured under. Tested in tests/test_bench.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["machine", "machine_header", "load_average"]

_FLAGS = ("avx2", "avx512", "amx", "fma")   # flag prefixes that decide a CPU's GEMM rate


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (NaN where the platform has none, e.g. Windows).

    Example:
        >>> len(load_average())
        3
    """
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def machine() -> dict:
    """What decides this machine's GEMM rate: CPU model, the vector/matrix flags, load, threads.

    Returns:
        {'model': lscpu's model name, 'flags': the avx2/avx512*/amx_*/fma flags (space-separated),
        'load_avg': the 1-, 5- and 15-minute load averages, 'cores': CPUs torch sees}.
    """
    model, flags = "unknown", []
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    if not text and Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name",) and model == "unknown":
            model = value.strip()
        elif name == "flags" and not flags:
            flags = [f for f in value.split() if f.startswith(_FLAGS)]
    return {"model": model, "flags": " ".join(flags), "load_avg": tuple(round(v, 2) for v in load_average()),
            "cores": os.cpu_count()}


def machine_header() -> str:
    """One line naming the CPU, its GEMM-relevant flags and the load, printed above every table."""
    info = machine()
    load = ", ".join(f"{v:.2f}" for v in info["load_avg"])
    return (f"# CPU: {info['model']} ({info['cores']} CPUs); flags: {info['flags'] or 'none of avx2/avx512/amx'}; "
            f"load average {load}")
