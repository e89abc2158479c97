"""The ``fmr`` command: one subcommand per module, each module owning its own arguments.

Every command module exposes ``register(subparsers)``, which adds its subparser and sets ``func``
to a callable taking the parsed ``argparse.Namespace`` and returning an exit code. Imports of the
heavy modules (torch, kornia) happen inside those callables so ``fmr --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in the order they appear in ``fmr --help``.
COMMAND_MODULES = (
    "feature_matching_ros.commands.match",
    "feature_matching_ros.commands.export_weights",
    "feature_matching_ros.commands.make_sequence",
    "feature_matching_ros.commands.import_sequence",
    "feature_matching_ros.commands.make_pairs",
    "feature_matching_ros.commands.train_codebook",
    "feature_matching_ros.commands.evaluate",
    "feature_matching_ros.commands.demo",
    "feature_matching_ros.commands.train",
    "feature_matching_ros.commands.replay",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmr", description="feature_matching_ros command line tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
