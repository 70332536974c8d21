"""Compiled CPU kernels: C++ sources in ``pixelfly_lab/ops/csrc``, built on the user's machine.

The 'torch' path's block-sparse products and the CPU attention kernel call small GEMMs on raw
pointers through ``at::native::cpublas::brgemm`` (oneDNN's batch-reduce GEMM micro-kernels, which
PyTorch's CPU build exports): a tile of x times a group's packed blocks, written in place into
the output's columns (or into a small buffer first, see :mod:`pixelfly_lab.ops.native_linear`). On one AVX-512 core such a (64 x 96) @ (96 x 128) product ran at ~200
GFLOP/s where ``torch.mm`` on the same strided views ran at ~140 and nn.Linear's GEMM at ~170
(``bench/native_gemm_bench.py``); torch cannot call them from Python.

:func:`load` compiles a source with ``torch.utils.cpp_extension.load`` (g++ and ninja) the first
time it is asked for, into a cache folder keyed by torch's version and this CPU's instruction
flags (``-march=native``: a cache shared by two machines never hands one the other's code), and
returns the module; later calls and processes reuse the build. ``make`` builds every source at
install (:func:`main`), so tests and the first call do not wait for a
compiler. Where no compiler works, :func:`load` warns once and returns None, and the callers take
their pure-PyTorch paths (the same function, to rounding; tests hold both to the float64 reference).

Environment: ``PIXELFLY_NATIVE=0`` turns the compiled kernels off (the pure-PyTorch paths run);
``PIXELFLY_NATIVE_DIR`` overrides the cache folder (default ``~/.cache/pixelfly_lab/native``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["SOURCES", "STALE_LOCK_SECONDS", "enabled", "load", "build_folder", "main"]

SOURCES = Path(__file__).resolve().parent / "csrc"
_MODULES: dict[str, object] = {}
_LOCK = threading.Lock()


def enabled() -> bool:
    """Whether the compiled kernels may be used: not turned off by ``PIXELFLY_NATIVE=0``."""
    return os.environ.get("PIXELFLY_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_key() -> str:
    """A short hash of this CPU's model and instruction flags (what ``-march=native`` compiles for;
    x86 names them 'model name' and 'flags', ARM 'CPU implementer', 'CPU part' and 'Features')."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU implementer", "CPU part")):
                text += line
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


_CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def build_folder(name: str) -> Path:
    """Where source ``name`` is compiled: ``<cache>/torch-<version>-<cpu key>/<name>-<source key>``,
    the source key a hash of the source's bytes (and the headers beside it), the flags, the Python
    version and environment (two checkouts, versions or virtual environments never share, nor wait
    on, nor rebuild, one build)."""
    root = Path(os.environ.get("PIXELFLY_NATIVE_DIR") or Path.home() / ".cache" / "pixelfly_lab" / "native")
    version = torch.__version__.replace("+", "_")
    # the environment too (its torch headers are in the build command: ninja rebuilds when they move, and
    # two virtual environments sharing one folder would rebuild it under each other's running processes)
    headers = b"".join(header.read_bytes() for header in sorted(SOURCES.glob("*.h")))   # what the sources include
    digest = hashlib.sha1((SOURCES / f"{name}.cpp").read_bytes() + headers
                          + " ".join(_CFLAGS + [sys.version, sys.prefix, str(Path(torch.__file__).parent)]).encode())
    return root / f"torch-{version}-{_cpu_key()}" / f"{name}-{digest.hexdigest()[:10]}"


# A build lock older than this is a killed build's (torch's lock file has no owner and no timeout):
# removed, so the next load builds again instead of waiting forever. A build takes ~25 s (both: 52 s on 2 cores).
STALE_LOCK_SECONDS = 600


def load(name: str):
    """The compiled module of ``csrc/<name>.cpp``, built on first use; None when turned off or
    when it cannot be built (a warning names the reason, once per source).

    Args:
        name: a source in :data:`SOURCES` without its ``.cpp`` (e.g. ``'blocksparse_cpu'``).

    Raises:
        ValueError: no such source.
    """
    if not enabled():
        return None
    if name in _MODULES:   # built (or failed) before: no file system access per call
        return _MODULES[name]
    source = SOURCES / f"{name}.cpp"
    if not source.is_file():
        raise ValueError(f"name: no source {source.name} in {SOURCES}")
    with _LOCK:
        if name not in _MODULES:
            _MODULES[name] = _build(name, source)
        return _MODULES[name]


def _build(name: str, source: Path):
    folder = build_folder(name)
    try:
        # setuptools (absent from Python >= 3.12 virtual environments by default) and a compiler: only here
        import torch.utils.cpp_extension as cpp_extension

        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
        # ninja from the environment's own bin (requirements.txt installs it) when PATH lacks one: torch runs
        # `ninja` by name, and `.venv/bin/python` does not put `.venv/bin` on PATH
        path = os.environ.get("PATH", "")
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in path.split(os.pathsep):
            os.environ["PATH"] = path + os.pathsep + bin_dir if path else bin_dir
        with warnings.catch_warnings():   # torch's notes on compiler versions are not the user's business
            warnings.simplefilter("ignore")
            return cpp_extension.load(name=f"pixelfly_{name}", sources=[str(source)], build_directory=str(folder),
                                      extra_cflags=_CFLAGS,
                                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:   # no setuptools, compiler or ninja, a read-only home: the PyTorch paths still work
        warnings.warn(f"pixelfly_lab: the compiled CPU kernel {name!r} could not be built ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); using the pure-PyTorch "
                      f"path (slower; the same function, to rounding). Set PIXELFLY_NATIVE=0 to skip the attempt.", RuntimeWarning,
                      stacklevel=3)
        return None


def main(argv: list[str] | None = None) -> int:
    """Build every source now (``make`` runs this at install); print what was built where.
    Returns 0 even when a build fails (the PyTorch paths work without them) unless ``--strict``."""
    parser = argparse.ArgumentParser(prog="python -m pixelfly_lab.ops.native", description=main.__doc__)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a source cannot be built")
    args = parser.parse_args(argv)
    failed = 0
    for source in sorted(SOURCES.glob("*.cpp")):
        module = load(source.stem)
        failed += module is None
        print(f"native kernel {source.stem}: {'built in ' + str(build_folder(source.stem)) if module else 'NOT built'}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
