"""``fmr make-sequence``: render a looping camera sequence with exact ground truth into a ROS 2 bag."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-sequence",
        help="render a looping sequence (rgb, depth, camera info, GT pose, drifting odometry) to a ROS 2 bag",
        description="Writes OUT/bag (rosbag2), OUT/loops.json ([query, match] frame index pairs) and "
        "OUT/sequence.json (metadata, loop criteria).",
    )
    parser.add_argument("out", help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--scene", choices=("office", "corridor", "street"), default="office")
    parser.add_argument("--frames", type=int, default=300, help="number of frames (default 300, 10 Hz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="storage", choices=("mcap", "sqlite3"), default="mcap",
                        help="rosbag2 storage plugin")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing sequence in OUT")
    parser.add_argument("--monocular", action="store_true",
                        help="no depth: a monocular backend's map points per frame (/slam/map_points) and odometry "
                             "whose scale drifts (random walk), for Sim3 loop closure")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from feature_matching_ros.scenes.sequence import generate_sequence

    bag = generate_sequence(args.out, scene=args.scene, frames=args.frames, seed=args.seed, storage=args.storage,
                            width=args.width, height=args.height, overwrite=args.overwrite,
                            monocular=args.monocular)
    print(bag)
    return 0
