"""``fmr import-sequence``: a folder of real camera images (+ TUM poses) into the sequence bag format.

    fmr import-sequence IMAGES_DIR --K fx,fy,cx,cy --out OUT [--poses poses.tum] [--loops loops.json]
        [--rate 10] [--max-long-side 1024] [--max-dt 0.02] [--format mcap] [--image-format raw] [--overwrite]

Writes OUT/bag (rosbag2: /camera/image_raw, /camera/camera_info, /ground_truth/pose when --poses is given),
OUT/loops.json (from --loops, validated; empty without) and OUT/sequence.json, the layout ``fmr evaluate
OUT/bag`` reads (loops.json beside the bag is picked up without --gt-loops). ``--image-format jpeg`` (or png)
stores the images as sensor_msgs/CompressedImage on /camera/image_raw/compressed, as robots record them: a
tenth of the size for JPEG, read back the same way by every command.

Image times: file names that are stamps (``1305031102.175304.png`` seconds, or 16+ digit integers in
nanoseconds) give the frame times, and poses are associated to them by nearest stamp within --max-dt
seconds; images without a pose are left out (and counted). Other names (``000042.png``) are ordered by name
and need --rate; then a pose file must have exactly one pose per image, in the same order. Poses are TUM
lines ``stamp tx ty tz qx qy qz qw`` giving T_map_camera of the optical frame (x right, y down, z forward).
Images are expected undistorted (pinhole --K); a long side above --max-long-side is downscaled and K with it.
Loop indices refer to the images as written (after any left out for missing poses).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

LOG = logging.getLogger("fmr.import_sequence")


def register(subparsers) -> None:
    parser = subparsers.add_parser("import-sequence", help="write a folder of real images (+ TUM poses) as a bag",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, help="directory of images (png, jpg, ...)")
    parser.add_argument("--K", required=True, help="pinhole intrinsics fx,fy,cx,cy in pixels of the given images")
    parser.add_argument("--out", type=Path, required=True, help="output sequence directory (bag/ is written in it)")
    parser.add_argument("--poses", type=Path, help="TUM trajectory: stamp tx ty tz qx qy qz qw (T_map_camera)")
    parser.add_argument("--loops", type=Path, help="JSON [[query_index, match_index], ...] to copy (validated)")
    parser.add_argument("--rate", type=float, help="frame rate in Hz when file names are not stamps")
    parser.add_argument("--max-dt", type=float, default=0.02, help="pose association tolerance in seconds")
    parser.add_argument("--max-long-side", type=int, default=1024, help="downscale larger images (0 = never)")
    parser.add_argument("--format", dest="storage", choices=("mcap", "sqlite3"), default="mcap")
    parser.add_argument("--image-format", choices=("raw", "jpeg", "png"), default="raw",
                        help="raw sensor_msgs/Image, or CompressedImage (jpeg: lossy, png: lossless)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing sequence in OUT")
    parser.set_defaults(func=run)


def import_sequence(images_dir: Path, K_text: str, out: Path, poses_path: Path | None = None,
                    loops_path: Path | None = None, rate_hz: float | None = None, max_dt: float = 0.02,
                    max_long_side: int = 1024, storage: str = "mcap", overwrite: bool = False,
                    image_format: str = "raw") -> dict:
    """Import and return the written sequence metadata (module docstring for the rules)."""
    import numpy as np

    from feature_matching_ros.bag.image_folder import (associate_nearest, check_loops, list_images,
                                                       parse_intrinsics, prepare_output, read_rgb,
                                                       read_tum_trajectory, resize_long_side, stamps_from_names,
                                                       write_real_sequence)
    from feature_matching_ros.bag.sequence import SequenceFrame

    K = parse_intrinsics(K_text)
    if max_dt <= 0:
        raise ValueError(f"--max-dt must be positive, got {max_dt}")
    if max_long_side < 0:
        raise ValueError(f"--max-long-side must be >= 0, got {max_long_side}")
    files = list_images(images_dir)
    stamps = stamps_from_names(files)
    if stamps is None:
        if rate_hz is None or not rate_hz > 0:
            raise ValueError(f"image names in {images_dir} are not stamps (e.g. {files[0].name}): give --rate HZ")
        stamps = np.arange(len(files)) / rate_hz
        stamp_source = f"file order at {rate_hz:g} Hz"
    else:
        if np.any(np.diff(stamps) <= 0):
            raise ValueError(f"two images in {images_dir} have the same stamp")
        stamp_source = "file names"
    poses, skipped = None, 0
    keep = list(range(len(files)))
    if poses_path is not None:
        pose_stamps, pose_matrices = read_tum_trajectory(poses_path)
        if stamp_source == "file names":
            nearest = associate_nearest(stamps, pose_stamps, max_dt)
            keep = [i for i in range(len(files)) if nearest[i] >= 0]
            skipped = len(files) - len(keep)
            if not keep:
                raise ValueError(f"no image of {images_dir} has a pose in {poses_path} within {max_dt} s")
            poses = pose_matrices[nearest[keep]]
        else:
            if len(pose_stamps) != len(files):
                raise ValueError(f"{poses_path} has {len(pose_stamps)} poses for {len(files)} images; without stamps "
                                 "in the image names the pose file needs exactly one pose per image")
            poses = pose_matrices
            stamps = pose_stamps - pose_stamps[0]
            stamp_source = f"pose file ({poses_path.name}), relative to its first stamp"
    loops = []
    if loops_path is not None:
        try:
            loops = check_loops(json.loads(Path(loops_path).read_text()), len(keep))
        except json.JSONDecodeError as error:
            raise ValueError(f"{loops_path} is not JSON: {error}") from None
        except ValueError as error:
            raise ValueError(f"{loops_path}: {error}") from None
    out = prepare_output(out, overwrite)
    first_ns = int(round(stamps[keep[0]] * 1e9)) if stamp_source == "file names" else 0
    offset_ns = 0 if first_ns > 0 else 1_700_000_000 * 1_000_000_000  # bags need positive stamps

    def frames():
        for position, i in enumerate(keep):
            image = read_rgb(files[i])
            K_frame = K
            if max_long_side:
                image, K_frame, _ = resize_long_side(image, K, max_long_side)
            yield SequenceFrame(position, offset_ns + int(round(stamps[i] * 1e9)), image, None, K_frame,
                                None if poses is None else poses[position])

    metadata = {
        "name": out.name, "kind": "imported", "images": str(images_dir), "stamps": stamp_source,
        "K_given": K, "poses": str(poses_path) if poses_path else "none",
        "images_without_pose_left_out": skipped, "loops": str(loops_path) if loops_path else "none",
    }
    written = write_real_sequence(out, frames(), metadata, loops, storage, image_format=image_format)
    LOG.info("wrote %s: %d frames (%d left out without pose), %d loop pairs", out / "bag", written["frames"],
             skipped, written["gt_loop_pairs"])
    return written


def run(args: argparse.Namespace) -> int:
    try:
        import_sequence(args.images, args.K, args.out, args.poses, args.loops, args.rate, args.max_dt,
                        args.max_long_side, args.storage, args.overwrite, args.image_format)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"fmr import-sequence: {error}") from None
    print(args.out / "bag")
    return 0
