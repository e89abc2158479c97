"""``fmr make-pairs``: image pairs with exact geometry (rendered 3D pairs + real-photo homographies)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-pairs",
        help="write training/eval image pairs (.npz with depth, K, T_1_0 or H_1_0)",
        description="Pair format and the train/eval split rule: see feature_matching_ros/scenes/pairs.py.",
    )
    parser.add_argument("out", help="output folder (pair_NNNNNN.npz + pairs.json)")
    parser.add_argument("--n", type=int, required=True, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from feature_matching_ros.scenes.pairs import generate_pairs

    print(generate_pairs(args.out, args.n, seed=args.seed, split=args.split, width=args.width, height=args.height,
                         overwrite=args.overwrite))
    return 0
