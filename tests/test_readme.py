"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_lists_every_notebook_and_how_to_render_them():
    root = Path(__file__).parent.parent
    text = (root / "README.md").read_text()
    missing = [p.name for p in sorted((root / "notebooks").glob("*.ipynb")) if p.name not in text]
    assert not missing, f"notebooks missing from the README: {missing}"
    assert "make docs" in text and "docs:" in (root / "Makefile").read_text()
