"""Real sequences as compressed camera-only bags: what a robot records, and a tenth of the size to move around.

    python benchmarks/compress_sequences.py --cache ~/.cache/feature_matching_ros/real --out OUT \
        [--sequences tum_fr1_rpy kitti_out_and_back landmarks_revisit] [--quality 90]

Each sequence of the cache (scripts/build_real_benchmark.py) is rewritten as OUT/<name>/{bag, loops.json,
sequence.json}: images as sensor_msgs/CompressedImage JPEG on /camera/image_raw/compressed, camera info and
ground-truth poses kept, depth and odometry dropped (the camera-only setting of
``loop_closure_real.py --monocular --no-odometry``). ``loop_closure_real.py --cache OUT`` then runs on it.
JPEG re-encoding is lossy: results on OUT are for JPEG input, reported as such.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from feature_matching_ros.bag import SequenceTopics, read_sequence
from feature_matching_ros.bag.sequence import SequenceBagWriter


def compress_sequence(source: Path, destination: Path, quality: int) -> int:
    """Rewrite one sequence directory camera-only with JPEG images; returns the frame count."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    count = 0
    with SequenceBagWriter(destination / "bag", "mcap", image_format="jpeg", jpeg_quality=quality) as writer:
        for frame in read_sequence(source / "bag", SequenceTopics()):
            writer.write_frame(replace(frame, depth=None, T_odom_camera=None, odom_linear_velocity=None,
                                       odom_angular_velocity=None))
            count += 1
    metadata = json.loads((source / "sequence.json").read_text())
    metadata["image_format"] = f"jpeg quality {quality}; camera only (depth and odometry dropped)"
    metadata["topics_present"] = dict(metadata.get("topics_present", {}), depth=False, odometry=False)
    (destination / "sequence.json").write_text(json.dumps(metadata, indent=1) + "\n")
    shutil.copy(source / "loops.json", destination / "loops.json")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/feature_matching_ros/real")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sequences", nargs="+", default=["tum_fr1_rpy", "kitti_out_and_back", "landmarks_revisit"])
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (image_transport's default is 95)")
    args = parser.parse_args()
    for name in args.sequences:
        if not (args.cache / name / "bag").exists():
            raise SystemExit(f"no sequence {name} in {args.cache} (scripts/build_real_benchmark.py builds it)")
        count = compress_sequence(args.cache / name, args.out / name, args.quality)
        size = sum(f.stat().st_size for f in (args.out / name / "bag").rglob("*") if f.is_file())
        print(f"{name}: {count} frames, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
