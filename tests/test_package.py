"""The package's shape: no import circles, the library never imports the studies, no private name
crosses a module boundary, and a built wheel carries every subpackage."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pixelfly_lab

ROOT = Path(pixelfly_lab.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ("pixelfly_lab",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth (lazy ones too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [alias.name for alias in node.names]
            found.append((target, names))
            # `from . import x` / `from .studies import ntk` import submodules
            found += [(f"{target}.{n}", []) for n in names if f"{target}.{n}" in _all_modules()]
    return found


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _all_modules()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {target for target, _ in _imports(path) if target in MODULES and target != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(1000, 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    """The oracle for the test below: a two-module and a three-module circle are both found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = _graph()
    assert "pixelfly_lab.studies.reproduce" in graph and graph["pixelfly_lab.studies.ntk"], "the walk sees the studies"
    # the package __init__ re-exports the library: edges into it are not circles of the modules' logic
    graph = {m: {t for t in targets if t != "pixelfly_lab"} for m, targets in graph.items()}
    circles = _cycles(graph)
    edges = [f"{a} imports {b}" for circle in circles for a in circle for b in sorted(graph[a]) if b in circle]
    assert not circles, "import circles (lazy imports count):\n" + "\n".join(edges)


def test_library_never_imports_studies():
    for name, path in MODULES.items():
        if name.startswith("pixelfly_lab.studies"):
            continue
        bad = [t for t, _ in _imports(path) if t and t.startswith("pixelfly_lab.studies")]
        assert not bad, f"{name} imports {bad}: the library must not depend on the studies"


def test_no_private_name_imported_across_modules():
    """A helper another module needs is public (or lives in _checks), never `from .x import _y`."""
    offenders = []
    for name, path in MODULES.items():
        for target, names in _imports(path):
            if target and target.startswith("pixelfly_lab") and target != name:
                # a private module (``from . import _checks``) is the package's own; a private name is not
                offenders += [f"{name}: from {target} import {n}" for n in names
                              if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in MODULES]
    assert not offenders, "\n".join(offenders)


def test_wheel_contains_the_studies(tmp_path):
    """A non-editable install gets every subpackage: build the wheel offline and look inside."""
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources, and a stale
    # build/lib would leak deleted modules into later wheels
    source = tmp_path / "source"
    shutil.copytree(ROOT, source / "pixelfly_lab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT.parent / name, source / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    wheel, = (tmp_path / "dist").glob("pixelfly_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("pixelfly_lab/studies/__init__.py", "pixelfly_lab/studies/reproduce.py",
                   "pixelfly_lab/studies/claims.py", "pixelfly_lab/_checks.py", "pixelfly_lab/cli.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith(("tests/", "notebooks/"))]
    assert "pixelfly_lab/reproduce.py" not in names, "the driver moved to pixelfly_lab/studies/"
