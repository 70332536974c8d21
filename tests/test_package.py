"""The package's shape: the tier map and its import rules (no upward or peer import, no circle, no
import of the package __init__ from inside, no private name across modules, no monkeypatching,
function-local imports only for optional dependencies), the module-size rule, and a built wheel
that carries every subpackage."""

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


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _all_modules()


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
                   "pixelfly_lab/studies/claims.py", "pixelfly_lab/_checks.py", "pixelfly_lab/cli.py",
                   "pixelfly_lab/ops/csrc/blocksparse_cpu.cpp", "pixelfly_lab/ops/csrc/attention_cpu.cpp",
                   "pixelfly_lab/ops/csrc/transpose16.h"):   # compiled (the header: both sources include it)
        assert module in names, module
    assert not [n for n in names if n.startswith(("tests/", "notebooks/"))]
    assert "pixelfly_lab/reproduce.py" not in names, "the driver moved to pixelfly_lab/studies/"


# ---------------------------------------------------------------------------------------------
# The tier map (arXiv 2112.00029 is the paper; the map is this repository's own architecture):
# each module imports only from tiers below it, or from its own group without a circle.
# ---------------------------------------------------------------------------------------------

TIER_MAP = {
    "pixelfly_lab._checks": 0, "pixelfly_lab._tf32": 0, "pixelfly_lab.threads": 0, "pixelfly_lab._version": 0,
    "pixelfly_lab.outputs": 0, "pixelfly_lab.notebook": 0,          # small utilities (model outputs, notebook prose,
    "pixelfly_lab._compile": 0,                                       # a torch.compile hint)
    "pixelfly_lab.structure": 1,
    "pixelfly_lab.ops": 2,
    "pixelfly_lab.nn": 3,
    "pixelfly_lab.approx": 4, "pixelfly_lab.ntk": 4, "pixelfly_lab.training": 4,   # peers: never each other
    "pixelfly_lab.speed": 5,
    "pixelfly_lab.studies": 6,
    "pixelfly_lab.cli": 7, "pixelfly_lab.__main__": 7, "pixelfly_lab": 7,
}
BASE, TOP = "pixelfly_lab._base", "pixelfly_lab._top"   # tier 0's modules form one group, the top tier another

# Function-local imports are allowed only for these (each optional or slow to import, needed by a
# few functions): triton (GPU only, loaded on first CUDA use), matplotlib (figures), transformers
# (Hugging Face models), IPython and ipywidgets (notebooks), sklearn (the digits data set; a second
# to import), scipy, mnist1d (a data set generator), torch.distributed (absent from some torch
# builds), torch.utils.cpp_extension (imports setuptools, 0.1 s; only a build of the compiled CPU kernels
# needs it). A module of this package that imports one of them at its top (the Triton kernels) is
# itself optional and may be imported lazily. The top tier (cli) dispatches lazily by design.
OPTIONAL = ("triton", "matplotlib", "transformers", "IPython", "ipywidgets", "sklearn", "scipy", "mnist1d",
            "torch.distributed", "torch.utils.cpp_extension")


def _group(module: str) -> tuple[int, str] | None:
    """(tier, group) of a module of the package by its longest prefix in TIER_MAP; None if unmapped."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):   # the package itself ("pixelfly_lab") only by its exact name
        prefix = ".".join(parts[:end])
        if prefix in TIER_MAP:
            tier = TIER_MAP[prefix]
            return tier, {0: BASE, 7: TOP}.get(tier, prefix)
    return (7, TOP) if module == "pixelfly_lab" else None


def _is_optional(name: str) -> bool:
    return any(name == o or name.startswith(o + ".") for o in OPTIONAL)


def _bindings_and_imports(tree: ast.Module, modules: set[str]):
    """Walk one module: every import as (node, target module, names, inside a function), and the
    local names bound to a module of the package (``import a.b as m``, ``from a import b``)."""
    records, bound = [], {}

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    records.append((child, alias.name, [], in_function))
                    if alias.asname and alias.name in modules:
                        bound[alias.asname] = alias.name
                    elif not alias.asname:
                        bound.setdefault(alias.name.split(".")[0], alias.name.split(".")[0])
            elif isinstance(child, ast.ImportFrom):
                target = ("." * child.level) + (child.module or "")
                names = [alias.name for alias in child.names]
                records.append((child, target, names, in_function))
                for alias in child.names:
                    if f"{target}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{target}.{alias.name}"
            visit(child, inner)

    visit(tree, False)
    return records, bound


def _resolve(node, bound: dict[str, str], modules: set[str]) -> tuple[str, list[str]] | None:
    """For ``m.a.b``: (the package module it names, the attributes after it), or None."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in bound:
        return None
    path, rest = bound[node.id], chain[::-1]
    while rest and f"{path}.{rest[0]}" in modules:
        path = f"{path}.{rest.pop(0)}"
    return (path, rest) if path in modules else None


def tier_violations(sources: dict[str, str]) -> list[str]:
    """Every breach of the package's import rules in ``sources`` ({module name: source text}).

    Rules: (unmapped) every module has a tier; (relative) imports are absolute; (upward) an import
    goes to a lower tier or the module's own group, never up and never to a peer of its tier;
    (circle) no import circle, lazy imports included; (package) nothing imports the package
    ``__init__`` (``import pixelfly_lab``, ``from pixelfly_lab import name``); (private) no
    ``from x import _y``, ``x._y`` on a module of the package, and no private attribute another
    module defines read on an object (``layer._key``), ``self``/``cls`` excepted; (monkeypatch) no
    assignment to, setattr on or patch of another module of the package; (lazy) function-local
    imports only for :data:`OPTIONAL` (and the top tier). Returns one line per breach.
    """
    modules = set(sources)
    trees = {name: ast.parse(text) for name, text in sources.items()}
    walked = {name: _bindings_and_imports(tree, modules) for name, tree in trees.items()}
    optional_modules = {name for name, (records, _) in walked.items()
                        if any(_is_optional(target) and not lazy for _, target, _, lazy in records)}
    # private names each module defines: top-level and class-level defs and assignments, self._x = ...
    defines: dict[str, set[str]] = {}
    for name, tree in trees.items():
        found = defines.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                found.add(node.id)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("register_buffer",
                                                                                      "register_parameter"):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    found.add(node.args[0].value)
        defines[name] = {n for n in found if n.startswith("_") and not n.startswith("__")}
    private_owner: dict[str, set[str]] = {}
    for name, names in defines.items():
        for n in names:
            private_owner.setdefault(n, set()).add(name)

    out, graph = [], {name: set() for name in modules}
    for name in sorted(modules):
        place = _group(name)
        if place is None:
            out.append(f"unmapped: {name} has no tier in TIER_MAP")
            continue
        tier, group = place
        records, bound = walked[name]
        for node, target, names, lazy in records:
            where = f"{name}:{node.lineno}"
            if target.startswith("."):
                out.append(f"relative: {where} imports {target!r}; use absolute imports")
                continue
            if lazy and tier < 7 and not (_is_optional(target) or target in optional_modules
                                          or any(f"{target}.{n}" in optional_modules for n in names)):
                out.append(f"lazy: {where} imports {target} inside a function (only OPTIONAL may be lazy)")
            if not (target == "pixelfly_lab" or target.startswith("pixelfly_lab.")):
                continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if target == "pixelfly_lab" and (not names or len(submodules) < len(names)):
                out.append(f"package: {where} imports the package __init__ (import from the defining module)")
            for n in names:
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in modules:
                    out.append(f"private: {where} from {target} import {n}")
            for dest in (submodules or ([target] if target != "pixelfly_lab" else [])):
                other = _group(dest)
                if dest == name or other is None:
                    continue
                graph[name].add(dest) if dest in modules else None
                if other[0] > tier or (other[0] == tier and other[1] != group):
                    kind = "upward" if other[0] > tier else "peer"
                    out.append(f"{kind}: {where} ({group}, tier {tier}) imports {dest} "
                               f"({other[1]}, tier {other[0]})")
        for node in ast.walk(trees[name]):
            # x._y on a module of the package
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                resolved = _resolve(node.value, bound, modules)
                if resolved is not None and not resolved[1] and resolved[0] != name:
                    out.append(f"private: {name}:{node.lineno} reads {resolved[0]}.{node.attr}")
                elif (resolved is None and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                      and node.attr in private_owner and name not in private_owner[node.attr]):
                    owners = ", ".join(sorted(private_owner[node.attr]))
                    out.append(f"private: {name}:{node.lineno} reads .{node.attr}, private to {owners}")
            # monkeypatching: assignment to / deletion of a module's attribute, setattr(module, ...), patch('pixelfly_lab...')
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute):
                    resolved = _resolve(t.value, bound, modules)
                    if resolved is not None and not resolved[1] and resolved[0] != name:
                        out.append(f"monkeypatch: {name}:{node.lineno} sets {resolved[0]}.{t.attr}")
            if isinstance(node, ast.Call) and node.args:
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                first = node.args[0]
                if func in ("setattr", "delattr", "patch", "object"):
                    resolved = _resolve(first, bound, modules)
                    text = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""
                    if (resolved is not None and not resolved[1] and resolved[0] != name) or \
                            text.startswith("pixelfly_lab."):
                        out.append(f"monkeypatch: {name}:{node.lineno} {func}() on "
                                   f"{resolved[0] if resolved else text}")
    out += ["circle: " + " -> ".join(c) for c in _cycles(graph)]
    return out


def _package_sources() -> dict[str, str]:
    return {name: path.read_text() for name, path in MODULES.items()}


def test_tier_rules_hold():
    found = tier_violations(_package_sources())
    assert not found, "tier rules broken:\n" + "\n".join(sorted(found))


def test_tier_map_covers_the_package():
    """Every module has a tier, and the map names no folder that is gone."""
    assert all(_group(name) is not None for name in MODULES), [n for n in MODULES if _group(n) is None]
    assert all(any(m == key or m.startswith(key + ".") for m in MODULES) for key in TIER_MAP)


_STUB = {"pixelfly_lab": "", "pixelfly_lab._checks": "def check_int(): pass\n_RULE = 1\n",
         "pixelfly_lab.structure": "", "pixelfly_lab.structure.masks": "def mask(): pass\n",
         "pixelfly_lab.ops": "", "pixelfly_lab.ops.matmul": "def matmul(): pass\n_TABLE = {}\n",
         "pixelfly_lab.ops.triton_kernels": "import triton\ndef kernel(): pass\n",
         "pixelfly_lab.nn": "", "pixelfly_lab.ntk": "", "pixelfly_lab.training": "",
         "pixelfly_lab.speed": "", "pixelfly_lab.speed.timer": "def time_steps(): pass\n",
         "pixelfly_lab.nn.layers": "class Layer:\n    def __init__(self):\n        self._key = 1\n"}

# (rule, a module and its source): each alone must be rejected, naming that rule.
BAD_CASES = [
    ("upward", "pixelfly_lab.nn.bad", "from pixelfly_lab.speed.timer import time_steps\n"),
    ("upward", "pixelfly_lab.structure.bad", "def f():\n    from pixelfly_lab.ops.matmul import matmul\n"),
    ("upward", "pixelfly_lab.threads", "import pixelfly_lab.nn.layers\n"),
    ("peer", "pixelfly_lab.ntk.bad", "from pixelfly_lab.training import models\n"),
    ("package", "pixelfly_lab.nn.bad", "import pixelfly_lab\n"),
    ("package", "pixelfly_lab.nn.bad", "from pixelfly_lab import make_pattern\n"),
    ("relative", "pixelfly_lab.nn.bad", "from .layers import Layer\n"),
    ("private", "pixelfly_lab.nn.bad", "from pixelfly_lab._checks import _RULE\n"),
    ("private", "pixelfly_lab.nn.bad", "from pixelfly_lab.ops import matmul\nx = matmul._TABLE\n"),
    ("private", "pixelfly_lab.nn.bad", "import pixelfly_lab.ops.matmul as mm\nx = mm._TABLE\n"),
    ("private", "pixelfly_lab.ntk.bad", "def f(layer):\n    return layer._key\n"),
    ("monkeypatch", "pixelfly_lab.nn.bad", "from pixelfly_lab.ops import matmul\nmatmul.matmul = None\n"),
    ("monkeypatch", "pixelfly_lab.nn.bad", "import pixelfly_lab.ops.matmul as mm\nsetattr(mm, 'matmul', None)\n"),
    ("monkeypatch", "pixelfly_lab.nn.bad", "from unittest import mock\nmock.patch('pixelfly_lab.ops.matmul.matmul')\n"),
    ("lazy", "pixelfly_lab.nn.bad", "def f():\n    import pandas\n"),
    ("lazy", "pixelfly_lab.nn.bad", "def f():\n    from pixelfly_lab.ops.matmul import matmul\n"),
    ("circle", "pixelfly_lab.ops.bad", "from pixelfly_lab.ops.loop import x\n"),
    ("unmapped", "pixelfly_lab.newtier.bad", "x = 1\n"),
]


def test_tier_rules_reject_each_bad_case():
    """Each case breaks one rule; the checker names it. The stubs alone are clean."""
    assert tier_violations(_STUB) == []
    for rule, name, source in BAD_CASES:
        extra = {"pixelfly_lab.ops.loop": "from pixelfly_lab.ops.bad import y\n"} if rule == "circle" else {}
        found = tier_violations({**_STUB, **extra, name: source})
        assert any(line.startswith(rule + ":") for line in found), (rule, source, found)


def test_tier_rules_accept_good_cases():
    """What the rules allow: downward, within a group, lazy optional imports, self._x, a private
    module (``from pixelfly_lab import _checks``)."""
    good = {
        "pixelfly_lab.nn.good": ("from pixelfly_lab.ops.matmul import matmul\nfrom pixelfly_lab.nn.layers import Layer\n"
                                 "from pixelfly_lab import _checks\n"
                                 "def f():\n    import matplotlib.pyplot as plt\n"
                                 "    from pixelfly_lab.ops import triton_kernels\n"
                                 "class L(Layer):\n    def g(self):\n        return self._key\n"),
    }
    assert tier_violations({**_STUB, **good}) == []


# One concept per module: none over ~450 lines.
MAX_LINES = 450


def oversized(sizes: dict[str, int], limit: int = MAX_LINES) -> list[str]:
    """The modules of ``sizes`` ({name: lines}) over ``limit`` lines."""
    return [f"{name}: {n} lines" for name, n in sorted(sizes.items()) if n > limit]


def test_no_module_over_the_size_limit():
    assert oversized({"a": MAX_LINES + 1}) == ["a: 451 lines"] and not oversized({"a": MAX_LINES}), "the rule can fail"
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    over = oversized(sizes)
    assert not over, "split by concept:\n" + "\n".join(over)
