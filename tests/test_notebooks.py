"""The notebooks: committed without outputs, a course's shape, no typed numbers, public names only, and
every notebook executes top to bottom in quick mode (PIXELFLY_QUICK=1) with every rendered check holding.

The typed-number rule (``typed_numbers``): a markdown cell may not contain a number written by hand,
because prose that states a measurement must be rendered from it (``pl.say``) or checked
(``pl.check``). Digits are allowed only in these contexts, which name things rather than measure them:
formulas (``$...$``, ``$$...$$``), code (inline and fenced: parameters as typed in code), link targets,
the "**Expected time**" line, heading numbers (``# 03 ·``, ``## 2 ·``), ordered-list markers,
notebook file names (``03_ntk.ipynb``) and "notebook 03", references to a paper's parts (Theorem 1,
Figure 2, Table 3, Section 4), citations (a name or "et al." then a year; arXiv ids), and names that
contain digits but start with a letter (GPT-2, MNIST-1D, Mixer-B/16, fp32).
"""

import ast
import json
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

import pixelfly_lab
import pixelfly_lab.studies
from pixelfly_lab.notebook import CHECK_KEY

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]

_REFERENCE = (r"\b(?:Theorem|Thm\.?|Figure|Fig\.|Table|Section|Sec\.|Eq\.|Appendix|Algorithm|[Nn]otebooks?|"
              r"theorem|figure|table|section|appendix|algorithm)s? \d+(?:\s?[.\-–,]\s?\d+)*")
_ERASE = [
    (r"```.*?```", re.S), (r"\$\$.*?\$\$", re.S), (r"\$[^$\n]*\$", 0), (r"`[^`\n]*`", 0),
    (r"\]\([^)\s]*\)", 0), (r"<[^>\n]+>", 0), (r"arXiv[: ]\d{4}\.\d{4,5}", 0),
    (r"(?:et al\.|[A-Z][A-Za-z&\-]+),? (?:19|20)\d\d[a-z]?\b", 0), (_REFERENCE, 0),
    (r"\b\d\d_\w+\.ipynb", 0), (r"\b[A-Za-z][A-Za-z_]*(?:[\-/]?\w)*", 0),
]


def typed_numbers(markdown: str) -> list[str]:
    """The numbers written in ``markdown`` outside the allowed contexts (see the module docstring)."""
    lines, expected_time = [], False
    for line in markdown.splitlines():  # the "Expected time" paragraph runs to the next blank line
        expected_time = bool(re.match(r"\s*[*_]{0,2}Expected time", line)) or (expected_time and line.strip() != "")
        if expected_time:
            continue
        line = re.sub(r"^(\s*#+\s*)\d+(\s*·)", r"\1\2", line)
        line = re.sub(r"^(\s*)\d+[.)]\s", r"\1", line)
        lines.append(line)
    text = "\n".join(lines)
    for pattern, flags in _ERASE:
        text = re.sub(pattern, " ", text, flags=flags)
    return re.findall(r"\d+(?:[.,]\d+)*", text)


def test_typed_number_rule_can_fail():
    flagged = ["Pixelfly's error was 0.12.", "two 256x256 hidden layers", "rank 8 or so", "about 1e-15",
               "| 01 | patterns |", "4.7-6.8x faster", "we trained 4000 examples for 30 epochs",
               "**Expected time:** a minute.\n\nThen 3 epochs."]
    for text in flagged:
        assert typed_numbers(text), text
    allowed = ["# 03 · The NTK", "## 2 · Expressiveness", "$y = S x + 1$", "`budget=0.25`", "1. first step",
               "[Dao, Chen et al., ICLR 2022](https://arxiv.org/abs/2112.00029)", "arXiv 2112.00029",
               "**Expected time:** about 2 minutes\nat full size on 2 cores", "see notebook 03 and 02_expressiveness.ipynb",
               "Theorem 1 and Figure 2", "GPT-2 small, Mixer-B/16, MNIST-1D, fp32", "(Roy & Vetterli 2007)",
               "$$\\frac{1}{2}$$", "```\nx = 3\n```"]
    for text in allowed:
        assert not typed_numbers(text), (text, typed_numbers(text))


def _cells(path: Path, kind: str) -> list[tuple[int, str]]:
    return [(i, "".join(c["source"]) if isinstance(c["source"], list) else c["source"])
            for i, c in enumerate(json.loads(path.read_text())["cells"]) if c["cell_type"] == kind]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    assert not any(cell.get("outputs") for cell in cells if cell["cell_type"] == "code"), \
        f"{path.name} is committed with outputs; clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_markdown_has_no_typed_numbers(path):
    found = {i: typed_numbers(src) for i, src in _cells(path, "markdown")}
    found = {i: numbers for i, numbers in found.items() if numbers}
    assert not found, (f"{path.name}: numbers typed in markdown cells {found}: render them from the "
                       "computation (pl.say) or check them (pl.check)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_course_shape(path):
    """Opens with what it teaches, what it assumes and its expected time; ends with what we learned."""
    markdown, code = _cells(path, "markdown"), _cells(path, "code")
    opening = markdown[0][1] if markdown else ""
    for needed in ("teaches", "ssumes", "Expected time"):
        assert needed in opening, f"{path.name}: the first cell does not say '{needed}'"
    assert code and "pl.learned(" in code[-1][1], f"{path.name}: the last code cell is not pl.learned(...)"


def _public_use_problems(source: str) -> list[str]:
    """Imports of pixelfly_lab submodules (other than studies) and non-public attributes of pl / studies."""
    source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    tree = ast.parse(source)
    public = {"pixelfly_lab": set(pixelfly_lab.__all__) | {"__version__"},
              "pixelfly_lab.studies": set(pixelfly_lab.studies.__all__)}
    aliases, problems = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pixelfly_lab"):
                    if alias.name not in public:
                        problems.append(f"import {alias.name}")
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pixelfly_lab"):
            names = [alias.name for alias in node.names]
            if node.module == "pixelfly_lab" and "studies" in names:
                aliases[next(a.asname or a.name for a in node.names if a.name == "studies")] = "pixelfly_lab.studies"
                names.remove("studies")
            if node.module not in public or set(names) - public[node.module]:
                problems.append(f"from {node.module} import {', '.join(names)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if module == "pixelfly_lab" and node.attr == "studies":
                continue
            if node.attr not in public[module]:
                problems.append(f"{node.value.id}.{node.attr}")
    return problems


def test_public_name_rule_can_fail():
    assert _public_use_problems("from pixelfly_lab.nn.layers import PixelflyLinear")
    assert _public_use_problems("import pixelfly_lab.structure.pictures")
    assert _public_use_problems("import pixelfly_lab as pl\npl.structure.pictures.show_mask(m)")
    assert _public_use_problems("import pixelfly_lab.studies as studies\nstudies.reproduce_private_thing()")
    assert not _public_use_problems("import pixelfly_lab as pl\nimport pixelfly_lab.studies as studies\n"
                                    "pl.show_mask(pl.flat_butterfly_mask(8, 2))\nstudies.ntk_study")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_uses_public_names_only(path):
    problems = [p for _, src in _cells(path, "code") for p in _public_use_problems(src)]
    assert not problems, f"{path.name} uses non-public names: {problems}"


def failed_checks(notebook) -> list[str]:
    """The texts of rendered checks (pl.check) that did not hold in an executed notebook."""
    return ["".join(out.get("data", {}).get("text/markdown", ""))
            for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.get("metadata", {}).get(CHECK_KEY) is False]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes_and_its_checks_hold(path, monkeypatch):
    monkeypatch.setenv("PIXELFLY_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell fails
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    assert not failed_checks(notebook), f"{path.name}: checks that did not hold: {failed_checks(notebook)}"


def test_a_failed_check_is_found_in_an_executed_notebook(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import pixelfly_lab as pl\npl.check(1 < 2, 'one is below two', 'one is not below two')\n"
        "pl.check(3 < 2, 'three is below two', 'three is not below two')")])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    assert failed_checks(notebook) == ["✘ **Check does NOT hold:** three is not below two"]


def test_prose_helpers_reject_bad_input():
    with pytest.raises(TypeError, match="holds"):
        pixelfly_lab.check(True, 1, "no")
    with pytest.raises(TypeError, match="text"):
        pixelfly_lab.say(0.5)
    with pytest.raises(ValueError, match="points"):
        pixelfly_lab.learned([])
    assert pixelfly_lab.pick(2 > 1, "above", "below") == "above"


def test_start_here_maps_every_notebook_and_keeps_the_glossary():
    opening = "".join(src for _, src in _cells(NOTEBOOKS[0], "markdown"))
    assert NOTEBOOKS[0].name == "00_start_here.ipynb"
    assert not [p.name for p in NOTEBOOKS if p.name not in opening], "00's map misses a notebook"
    assert "## Glossary" in opening


def test_claims_table_spells_the_verdicts_and_lists_each_figure_once(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pixelfly_lab.studies import claims_table, study_figures

    folder = tmp_path / "theory"
    folder.mkdir()
    plt.imsave(folder / "fig.png", [[0.0, 1.0], [1.0, 0.0]])
    claims = [dict(claim="a", measured="1", held=True, figure="fig.png", kind="paper"),
              dict(claim="b", measured="2", held=False, figure="fig.png", kind="paper"),
              dict(claim="c", measured="3", held=None, figure=None, kind="paper"),
              dict(claim="d", measured="4", held=None, figure=None, kind="info"),
              dict(claim="e", measured="5", held=False, figure=None, kind="target")]
    (folder / "claims.json").write_text(json.dumps({"preset": "tiny", "claims": claims}))
    table = claims_table(tmp_path)
    assert table.verdict.tolist() == ["held", "did not hold", "undecided", "reading", "target missed"]
    assert study_figures(tmp_path, "theory") == [folder / "fig.png"]
    assert claims_table(tmp_path / "nothing").empty
    with pytest.raises(ValueError, match="name"):
        study_figures(tmp_path, "no such study")
