"""``fmr export-weights DIR [--int8]``: fp16 (or int8) safetensors copies of the official weights, for machines
without the carrier packages (use with FMR_WEIGHTS_DIR), e.g. a training host with another Python version."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from feature_matching_ros.weights import OFFICIAL_WEIGHTS

    parser = subparsers.add_parser("export-weights", help="export official weights as fp16 safetensors",
                                   description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--names", nargs="+", default=sorted(OFFICIAL_WEIGHTS), choices=sorted(OFFICIAL_WEIGHTS))
    parser.add_argument("--int8", action="store_true",
                        help="int8 per-channel weights (half of fp16; rounds the weights: training starts, not benchmarks)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from feature_matching_ros.weights import export_official_weights

    folder = export_official_weights(args.out, args.names, int8=args.int8)
    print(f"exported {len(args.names)} weight files to {folder}; use them with FMR_WEIGHTS_DIR={folder}")
    return 0
