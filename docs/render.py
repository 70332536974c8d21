"""Render executed notebooks to docs/<name>.html, all linking one stylesheet, docs/style.css.

nbconvert's lab template embeds its whole stylesheet in every page (~0.27 MB: JupyterLab's CSS,
its light theme, the code-highlighting rules). Here each notebook is rendered with that template
(through ``docs/page.html.j2``, which leaves out the Mermaid loader), the ``<style>`` elements of
the page head, the same in every page, are written once to ``style.css`` beside the pages, and
each page links it instead. The pages' bodies (outputs, figures, tables) are nbconvert's, as is.

Usage (``make docs`` executes the notebooks into build/docs first; ``make docs-html`` only renders):

    python docs/render.py --out docs build/docs/*.ipynb

Pages already rendered with the plain lab template (``.html`` arguments) are restyled the same way,
their Mermaid loader removed: the result is what page.html.j2 renders from the same outputs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

HEAD_STYLE = re.compile(r"<style[^>]*>(.*?)</style>\s*", re.S)
# the lab template's Mermaid loader (a module script and its <style>), which page.html.j2 leaves out
MERMAID = re.compile(r'<script type="module">\s*document\.addEventListener\("DOMContentLoaded".*?'
                     r"<!-- End of mermaid configuration -->", re.S)
LINK = '<link rel="stylesheet" href="style.css"/>\n'


def render(notebook: Path) -> str:
    """The notebook (already executed) as one HTML page: nbconvert's lab template via page.html.j2."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file=str(Path(__file__).with_name("page.html.j2")))
    page, _ = exporter.from_filename(str(notebook))
    return page


def split_head_styles(page: str) -> tuple[str, list[str]]:
    """(the page with its head's <style> elements replaced by one link to style.css, their CSS)."""
    head_end = page.index("</head>")
    head, rest = page[:head_end], page[head_end:]
    styles = [m.group(1) for m in HEAD_STYLE.finditer(head)]
    if not styles:
        raise ValueError("the page head holds no <style> element: not a page of nbconvert's lab template")
    first = HEAD_STYLE.search(head).start()
    return head[:first] + LINK + HEAD_STYLE.sub("", head[first:]) + rest, styles


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="executed .ipynb notebooks (or lab-template .html pages)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder of the pages and style.css")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pages, shared = {}, None
    for path in args.inputs:
        if path.suffix == ".html":      # titled by the notebook's name, as render() titles it
            page = MERMAID.sub("", path.read_text(encoding="utf-8"), count=1)
            page = re.sub(r"<title>.*?</title>", f"<title>{path.stem}</title>", page, count=1, flags=re.S)
        else:
            page = render(path)
        pages[path.stem], styles = split_head_styles(page)
        if shared is None:
            shared = styles
        elif styles != shared:
            raise SystemExit(f"{path}: its head styles differ from {args.inputs[0]}'s; render every page with "
                             "the same nbconvert and template")
    css = "\n".join(style.strip() + "\n" for style in shared)
    (args.out / "style.css").write_text("/* nbconvert's lab template stylesheet, shared by every page here; "
                                        "written by docs/render.py */\n" + css, encoding="utf-8")
    for name, page in pages.items():
        (args.out / f"{name}.html").write_text(page, encoding="utf-8")
    print(f"{len(pages)} page(s) and style.css ({len(css) / 1e6:.2f} MB) in {args.out}")


if __name__ == "__main__":
    main()
