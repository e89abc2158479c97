"""``fmr export-weights DIR``: fp16 safetensors copies of the official weights (use with FMR_WEIGHTS_DIR)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from feature_matching_ros.weights import OFFICIAL_WEIGHTS

    parser = subparsers.add_parser("export-weights", help="export official weights as fp16 safetensors",
                                   description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--names", nargs="+", default=sorted(OFFICIAL_WEIGHTS), choices=sorted(OFFICIAL_WEIGHTS))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from feature_matching_ros.weights import export_official_weights

    folder = export_official_weights(args.out, args.names)
    print(f"exported {len(args.names)} weight files to {folder}; use them with FMR_WEIGHTS_DIR={folder}")
    return 0
