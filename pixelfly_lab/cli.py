"""Command line: ``python -m pixelfly_lab <command>``.

Each command lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, so importing it stays cheap. The ``reproduce``
command is the studies' driver (:mod:`pixelfly_lab.studies.reproduce`).
"""

from __future__ import annotations

import argparse
import importlib

# command -> (module, one-line help)
COMMANDS = {
    "reproduce": ("pixelfly_lab.studies.reproduce", "the paper's studies: every figure, table and claim, and a report"),
    "bench": ("pixelfly_lab.speed.bench", "layer speed: sparse layers against dense nn.Linear"),
    "train": ("pixelfly_lab.training.command", "train a small sparse model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pixelfly_lab",
        description="pixelfly_lab: a lab bench for Pixelated Butterfly sparse training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)  # a missing command module is an error, never skipped
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)
