"""The `hetero-moe` command, one module per group of subcommands: `serve`, `generate`, `chat` and
`batch` (run), `rules check` (rules), `plan` and `profile` (tune), `bench ...` (bench)."""

from __future__ import annotations

import argparse
import logging
import sys

from hetero_moe.arch import ModelError
from hetero_moe.cli import bench, rules, run, serve, tune
from hetero_moe.engine.request import ContextLengthError
from hetero_moe.inject.injector import InjectError
from hetero_moe.inject.rules import RulesError
from hetero_moe.loader.checkpoint import CheckpointError

# Mistakes in what the user gave us: reported in one line, exit code 2.
USER_ERRORS = (
    RulesError,
    InjectError,
    ModelError,
    CheckpointError,
    ContextLengthError,
    ValueError,
    OSError,
    ImportError,
)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetero-moe", description="MoE inference: routed experts on the CPU.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and details to stderr")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    for module in (rules, tune, bench, run, serve):
        module.add_parsers(sub)
    return p
