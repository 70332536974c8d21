"""Prose rendered from computed values, for notebooks that state no number they do not compute.

A notebook sentence that reports a measurement, a comparison or what a figure shows is printed by
code from the values it is about, with its wording chosen by those values; a sentence the notebook
asserts whatever the numbers is followed by :func:`check`, which says whether it held this time.
Executed outputs carry machine-readable metadata (``{"pixelfly_check": True/False}``) so that
``tests/test_notebooks.py`` can fail on a check that did not hold.

Example (in a notebook cell):
    >>> import pixelfly_lab as pl
    >>> error, other = 0.12, 0.30
    >>> pl.say(f"Pixelfly's error {error:.2f} is {pl.pick(error < other, 'below', 'not below')} "
    ...        f"low-rank's {other:.2f}.")                                        # doctest: +SKIP
    >>> pl.check(error < other, "Pixelfly beat low-rank here.", "Pixelfly did not beat low-rank here.")  # doctest: +SKIP

IPython is imported only inside the functions (outside a notebook the text is printed).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["say", "pick", "check", "learned", "CHECK_KEY"]

# The key of the output metadata that records a check's outcome (read by tests/test_notebooks.py).
CHECK_KEY = "pixelfly_check"


def _show(text: str, metadata: dict | None = None) -> None:
    """Display ``text`` as Markdown in IPython (with ``metadata``), else print it."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # IPython is optional: plain Python prints the text
        print(text)
        return
    if get_ipython() is None:
        print(text)
        return
    display(Markdown(text), metadata=metadata or {})


def say(text: str) -> None:
    """Render a sentence built from computed values (an f-string) as Markdown.

    Args:
        text: Markdown text; numbers in it come from the computation (f-string fields).

    Returns:
        None. In IPython the text is displayed as Markdown, elsewhere printed.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    _show(text)


def pick(condition, if_true: str, if_false: str) -> str:
    """The wording that fits: ``if_true`` when ``condition`` holds, else ``if_false``.

    Args:
        condition: a bool (or a 0-d tensor / numpy bool) computed from the results.
        if_true: words for when it holds, e.g. "beat".
        if_false: words for when it does not, e.g. "did not beat".

    Returns:
        One of the two strings.
    """
    if not isinstance(if_true, str):
        raise TypeError(f"if_true must be a str, got {type(if_true).__name__}")
    if not isinstance(if_false, str):
        raise TypeError(f"if_false must be a str, got {type(if_false).__name__}")
    return if_true if bool(condition) else if_false


def check(condition, holds: str, fails: str) -> None:
    """Check a statement against this run's numbers and say which of two texts is true.

    The displayed text starts with "Check holds:" or "Check does NOT hold:" and its output metadata
    records the outcome under :data:`CHECK_KEY`, so an executed notebook can be searched for checks
    that failed.

    Args:
        condition: a bool (or 0-d tensor / numpy bool) computed from the results.
        holds: the sentence that is true when ``condition`` holds.
        fails: the sentence that is true when it does not (say what was measured instead).

    Returns:
        None (so that a check ending a cell prints nothing more); the outcome is in the displayed text.
    """
    if not isinstance(holds, str):
        raise TypeError(f"holds must be a str, got {type(holds).__name__}")
    if not isinstance(fails, str):
        raise TypeError(f"fails must be a str, got {type(fails).__name__}")
    held = bool(condition)
    text = f"✔ **Check holds:** {holds}" if held else f"✘ **Check does NOT hold:** {fails}"
    _show(text, {CHECK_KEY: held})


def learned(points: Iterable[str], title: str = "What we learned") -> None:
    """Render a notebook's closing summary: a heading and one bullet per point (each from the results).

    Args:
        points: sentences, each an f-string of this notebook's computed values.
        title: the heading.

    Returns:
        None.
    """
    if isinstance(points, str) or not isinstance(points, Iterable):
        raise TypeError(f"points must be an iterable of str, got {type(points).__name__}")
    items = list(points)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError("points must be a non-empty iterable of str")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    _show("\n".join([f"## {title}", ""] + [f"* {p}" for p in items]))
