"""Real image sequences into the sequence bag format: image folders, TUM trajectories, intrinsics.

A real sequence directory has the layout ``fmr make-sequence`` writes and ``fmr evaluate`` reads:
  DIR/bag/           rosbag2 (``feature_matching_ros.bag.sequence`` topics)
  DIR/loops.json     [[query_index, match_index], ...], 0-based image indices, query > match (optional)
  DIR/sequence.json  where the images and poses came from and how the loops were labelled

Conventions: poses are ``T_map_camera`` of the optical frame (x right, y down, z forward); a TUM trajectory
line is ``stamp tx ty tz qx qy qz qw`` with the same meaning (camera position and orientation in the map).
Intrinsics follow the pixel-centre convention (pixel (0, 0) is the centre of the top-left pixel), so
resizing by ``s`` maps x to s * (x + 0.5) - 0.5.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from feature_matching_ros.bag.sequence import STORAGE_FORMATS, SequenceBagWriter, SequenceFrame

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".bmp")
_STAMP_NAME = re.compile(r"^\d+(\.\d+)?$")


def pose_from_tum(values: Iterable[float]) -> np.ndarray:
    """4x4 T_map_camera from ``tx ty tz qx qy qz qw`` (Hamilton quaternion, scalar last)."""
    from scipy.spatial.transform import Rotation

    tx, ty, tz, qx, qy, qz, qw = (float(v) for v in values)
    quaternion = np.array([qx, qy, qz, qw])
    norm = float(np.linalg.norm(quaternion))
    if not np.isfinite(norm) or abs(norm - 1.0) > 1e-2:
        raise ValueError(f"quaternion ({qx}, {qy}, {qz}, {qw}) is not a unit quaternion (norm {norm:.4f})")
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(quaternion / norm).as_matrix()
    T[:3, 3] = (tx, ty, tz)
    return T


def read_tum_trajectory(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """Stamps (N,) in seconds and T_map_camera (N, 4, 4) from a TUM trajectory file, sorted by stamp.

    Comment lines (``#``) and blank lines are skipped; any other malformed line is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trajectory file at {path}")
    stamps, poses = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 8:
            raise ValueError(f"{path}:{number}: expected 'stamp tx ty tz qx qy qz qw' (8 numbers), got {len(fields)}")
        try:
            values = [float(v) for v in fields]
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        if not all(np.isfinite(values)):
            raise ValueError(f"{path}:{number}: non-finite value")
        try:
            poses.append(pose_from_tum(values[1:]))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        stamps.append(values[0])
    if not stamps:
        raise ValueError(f"{path} holds no poses")
    order = np.argsort(stamps, kind="stable")
    return np.asarray(stamps)[order], np.stack(poses)[order]


def write_tum_trajectory(path: Path | str, stamps_s: np.ndarray, poses: np.ndarray) -> None:
    """Write T_map_camera poses (N, 4, 4) as a TUM trajectory (what evo reads)."""
    from scipy.spatial.transform import Rotation

    lines = ["# timestamp tx ty tz qx qy qz qw (T_map_camera, optical frame)"]
    for stamp, T in zip(stamps_s, poses):
        q = Rotation.from_matrix(T[:3, :3]).as_quat()
        lines.append(f"{stamp:.6f} " + " ".join(f"{v:.9f}" for v in (*T[:3, 3], *q)))
    Path(path).write_text("\n".join(lines) + "\n")


def associate_nearest(query_stamps: np.ndarray, reference_stamps: np.ndarray, max_dt: float) -> np.ndarray:
    """For each query stamp, the index of the nearest reference stamp within ``max_dt`` seconds, else -1.

    ``reference_stamps`` must be sorted ascending.
    """
    reference = np.asarray(reference_stamps, dtype=np.float64)
    query = np.asarray(query_stamps, dtype=np.float64)
    right = np.clip(np.searchsorted(reference, query), 1, len(reference) - 1) if len(reference) > 1 else \
        np.zeros(len(query), dtype=np.int64)
    left = np.maximum(right - 1, 0)
    nearest = np.where(np.abs(reference[left] - query) <= np.abs(reference[right] - query), left, right)
    return np.where(np.abs(reference[nearest] - query) <= max_dt, nearest, -1)


def parse_intrinsics(text: str) -> np.ndarray:
    """3x3 K from ``fx,fy,cx,cy`` (pixels)."""
    try:
        fx, fy, cx, cy = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--K must be 'fx,fy,cx,cy' (four numbers), got {text!r}") from None
    if not (fx > 0 and fy > 0 and np.isfinite([cx, cy]).all()):
        raise ValueError(f"--K needs positive focal lengths and finite principal point, got {text!r}")
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def list_images(directory: Path | str) -> list[Path]:
    """Image files of a directory (not recursive), sorted by name (numerically when names are stamps)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no image directory at {directory}")
    files = [p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise ValueError(f"{directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if all(_STAMP_NAME.match(p.stem) for p in files):
        return sorted(files, key=lambda p: float(p.stem))
    return sorted(files)


def stamps_from_names(files: list[Path]) -> np.ndarray | None:
    """Seconds parsed from file names like ``1305031102.175304.png`` (TUM), or None if any name is not a stamp.

    Integer names of 16 digits or more are read as nanoseconds (EuRoC); shorter integers are frame numbers,
    not stamps (KITTI ``000042.png``), so they give None.
    """
    stamps = []
    for path in files:
        stem = path.stem
        if not _STAMP_NAME.match(stem):
            return None
        if "." in stem:
            stamps.append(float(stem))
        elif len(stem) >= 16:
            stamps.append(int(stem) * 1e-9)
        else:
            return None
    return np.asarray(stamps)


def read_rgb(path: Path | str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied (what a viewer shows); grey images become 3-channel."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_long_side(image: np.ndarray, K: np.ndarray | None, max_long_side: int,
                     depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Downscale so that max(H, W) <= ``max_long_side`` (never upscale); K and depth follow.

    Image uses area interpolation; depth (metres, NaN invalid) uses nearest so no depth is invented between
    surfaces. Returns (image, K, depth).
    """
    import cv2

    height, width = image.shape[:2]
    scale = min(1.0, max_long_side / max(height, width))
    if scale >= 1.0:
        return image, None if K is None else np.asarray(K, dtype=np.float64).copy(), depth
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    sx, sy = size[0] / width, size[1] / height
    K_scaled = None
    if K is not None:
        K_scaled = np.asarray(K, dtype=np.float64).copy()
        K_scaled[0, 0] *= sx
        K_scaled[1, 1] *= sy
        K_scaled[0, 1] *= sx
        K_scaled[0, 2] = sx * (K_scaled[0, 2] + 0.5) - 0.5
        K_scaled[1, 2] = sy * (K_scaled[1, 2] + 0.5) - 0.5
    depth_resized = None if depth is None else cv2.resize(depth, size, interpolation=cv2.INTER_NEAREST)
    return resized, K_scaled, depth_resized


def prepare_output(out_dir: Path | str, overwrite: bool) -> Path:
    """Create ``out_dir`` for a sequence; an existing non-empty one needs ``overwrite`` (then its sequence
    files are replaced, other files are left alone)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty (use --overwrite)")
        for name in ("bag", "loops.json", "sequence.json", "ground_truth.tum", "odometry.tum"):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def check_loops(loops: Iterable[Iterable[int]], frame_count: int) -> list[list[int]]:
    """Validated [[query, match], ...]: integer indices inside the sequence with query > match."""
    if not isinstance(loops, (list, tuple)):
        raise ValueError(f"loops must be a list of [query_index, match_index] pairs, got {type(loops).__name__}")
    checked = []
    for number, pair in enumerate(loops):
        pair = list(pair) if isinstance(pair, (list, tuple)) else [pair]
        if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
            raise ValueError(f"loop #{number}: expected [query_index, match_index] integers, got {pair!r}")
        query, match = int(pair[0]), int(pair[1])
        if not 0 <= match < query < frame_count:
            raise ValueError(f"loop #{number} [{query}, {match}]: need 0 <= match < query < {frame_count} frames")
        checked.append((query, match))
    return [list(pair) for pair in sorted(set(checked))]


def write_real_sequence(out_dir: Path | str, frames: Iterable[SequenceFrame], metadata: dict,
                        loops: list[list[int]] | None = None, storage: str = "mcap",
                        odom_pose_covariances: np.ndarray | None = None,
                        odom_twist_covariances: np.ndarray | None = None, image_format: str = "raw") -> dict:
    """Write DIR/bag (+ loops.json, sequence.json) from frames in order; ``out_dir`` must be prepared.
    ``image_format``: "raw" (sensor_msgs/Image), "jpeg" or "png" (sensor_msgs/CompressedImage, see
    SequenceBagWriter).

    Frames must have strictly increasing stamps and consecutive indices from 0. Every frame must carry K;
    ground-truth poses and odometry are all-or-nothing (a bag with poses on some frames only would make
    ``fmr evaluate`` skip them anyway, so it is refused here). Returns the metadata written, completed with
    the frame count, image sizes and the number of loop pairs and queries.
    """
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGE_FORMATS)}")
    out_dir = Path(out_dir)
    sizes: dict[str, int] = {}
    count, last_stamp, has_pose, has_odom, has_depth = 0, None, set(), set(), set()
    with SequenceBagWriter(out_dir / "bag", storage, image_format=image_format) as writer:
        for frame in frames:
            if frame.index != count:
                raise ValueError(f"frame indices must run 0, 1, 2, ...: got {frame.index} at position {count}")
            if last_stamp is not None and frame.stamp_ns <= last_stamp:
                raise ValueError(f"frame {frame.index}: stamp {frame.stamp_ns} ns is not after {last_stamp} ns")
            if frame.K is None:
                raise ValueError(f"frame {frame.index} has no intrinsics K")
            has_pose.add(frame.T_map_camera is not None)
            has_odom.add(frame.T_odom_camera is not None)
            has_depth.add(frame.depth is not None)
            if len(has_pose) > 1 or len(has_odom) > 1:
                raise ValueError(f"frame {frame.index}: ground-truth poses / odometry must be on every frame or none")
            covariance = None if odom_pose_covariances is None else odom_pose_covariances[count]
            twist = None if odom_twist_covariances is None else odom_twist_covariances[count]
            writer.write_frame(frame, covariance, twist)
            key = f"{frame.image.shape[1]}x{frame.image.shape[0]}"
            sizes[key] = sizes.get(key, 0) + 1
            last_stamp = frame.stamp_ns
            count += 1
    if count == 0:
        raise ValueError("no frames to write")
    loops = check_loops(loops or [], count)
    (out_dir / "loops.json").write_text(json.dumps(loops) + "\n")
    metadata = dict(metadata) | {
        "frames": count, "image_sizes_wxh": sizes, "storage": storage, "image_format": image_format, "bag": "bag",
        "topics_present": {"ground_truth_pose": has_pose == {True}, "odometry": has_odom == {True},
                           "depth": True in has_depth},
        "gt_loop_pairs": len(loops), "gt_loop_queries": len({q for q, _ in loops}),
    }
    (out_dir / "sequence.json").write_text(json.dumps(metadata, indent=1, default=_json_default) + "\n")
    return metadata


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
