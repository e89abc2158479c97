#!/usr/bin/env python3
"""Build the real-image loop-closure benchmark (docs/REAL_DATA.md) from local clones of public repositories.

    python scripts/build_real_benchmark.py \\
        --gpu-odometry CLONES/gpu_odometry --kitti-vo CLONES/Visual-Odometry-KITTI-Sequence \\
        --line3dpp CLONES/Line3Dpp --sceaux CLONES/ImageDataset_SceauxCastle \\
        --hloc CLONES/Hierarchical-Localization --monstree CLONES/dataset_monstree \\
        --opensfm CLONES/OpenSfM --superglue CLONES/SuperGluePretrainedNetwork \\
        --pyslam CLONES/pyslam --kimera CLONES/Kimera-VIO [--cache DIR] [--only NAME ...] [--overwrite] [--redo-sfm]

Nothing is downloaded: every source is a directory the user cloned. Per sequence it writes
CACHE/<name>/{bag/, loops.json, sequence.json} (plus ground_truth.tum / odometry.tum when poses are known),
readable by ``fmr evaluate CACHE/<name>/bag``, and CACHE/codebook_images.txt lists real photos from
sources that no sequence uses (for ``fmr train-codebook --images $(cat CACHE/codebook_images.txt)``).

Sequences (see SEQUENCES): tum_fr1_rpy (indoor, hand-held RGB-D, motion-capture poses), kitti_out_and_back
(vehicle, GPS/INS poses), landmarks_revisit (outdoor photo collections, structure-from-motion covisibility)
and streets_aliasing (look-alike streets, held out). Photo collections get poses and covisibility from
pycolmap (SIFT, exhaustive matching, incremental mapping, undistortion to pinhole); the structure-from-motion
models are kept in CACHE/_sfm/ and reused unless --redo-sfm.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from feature_matching_ros.bag.image_folder import (  # noqa: E402
    associate_nearest, prepare_output, read_rgb, read_tum_trajectory, resize_long_side, write_real_sequence,
    write_tum_trajectory)
from feature_matching_ros.bag.sequence import SequenceFrame  # noqa: E402
from feature_matching_ros.scenes.loops import (  # noqa: E402
    CovisibilityCriteria, LoopCriteria, ViewConeCriteria, covisibility_loops, label_loops, scale_intrinsics,
    view_cone_loops)

LOG = logging.getLogger("build_real_benchmark")
BUILDER_VERSION = 1
MAX_LONG_SIDE = 1024
FIRST_STAMP_NS = 1_700_000_000 * 1_000_000_000  # composite sequences (no capture times): keyframes at 1 Hz
ODOMETRY_SEED = 7
# The 23 of dataset_monstree's 41 photos this benchmark was built and measured with: the same photos on every
# machine keep the sequence (and numbers reported on it) identical.
MONSTREE_PHOTOS = (1025, 1027, 1028, 1029, 1036, 1037, 1038, 1040, 1041, 1042, 1044, 1046, 1047, 1048, 1049, 1050,
                   1051, 1053, 1055, 1056, 1057, 1062, 1063)


@dataclass(frozen=True)
class Source:
    option: str
    url: str
    licence: str
    required: tuple[str, ...]


SOURCES = {
    "gpu_odometry": Source(
        "--gpu-odometry", "https://github.com/jmstark/gpu_odometry",
        "images and ground truth: TUM RGB-D benchmark (freiburg1_rpy), CC BY 4.0 (Sturm et al., IROS 2012); "
        "the repository states no licence of its own",
        ("data/rgbd_assoc.txt", "data/groundtruth.txt", "data/rgb", "data/depth")),
    "kitti_vo": Source(
        "--kitti-vo", "https://github.com/dawn-mathew/Visual-Odometry-KITTI-Sequence",
        "images and poses: KITTI odometry benchmark, CC BY-NC-SA 3.0 (Geiger et al., CVPR 2012): "
        "non-commercial use only", ("KITTI_sequence_1/poses.txt", "KITTI_sequence_2/poses.txt")),
    "line3dpp": Source("--line3dpp", "https://github.com/manhofer/Line3Dpp", "MPL-2.0 (repository licence)",
                       ("testdata/img000055.jpg",)),
    "sceaux": Source("--sceaux", "https://github.com/openMVG/ImageDataset_SceauxCastle",
                     "photos (c) 2012 Pierre Moulon, published as openMVG sample data (see its Readme.txt)",
                     ("images/100_7100.JPG",)),
    "hloc": Source("--hloc", "https://github.com/cvg/Hierarchical-Localization",
                   "Apache-2.0 (repository); photos from the Image Matching Challenge PhotoTourism set (Flickr)",
                   ("datasets/sacre_coeur/mapping",)),
    "monstree": Source("--monstree", "https://github.com/alicevision/dataset_monstree",
                       "AliceVision sample dataset (no licence file; see the repository README)",
                       tuple(f"full/IMG_{n}.JPG" for n in MONSTREE_PHOTOS)),
    "opensfm": Source("--opensfm", "https://github.com/mapillary/OpenSfM", "BSD-2-Clause (repository licence)",
                      ("data/lund/images",)),
    "superglue": Source("--superglue", "https://github.com/magicleap/SuperGluePretrainedNetwork",
                        "repository: non-commercial research licence; freiburg_sequence = TUM RGB-D (CC BY 4.0), "
                        "phototourism_sample_images = Flickr photos via the Image Matching Challenge",
                        ("assets/freiburg_sequence", "assets/phototourism_sample_images")),
    "pyslam": Source("--pyslam", "https://github.com/luigifreda/pyslam",
                     "GPL-3.0 (repository); test/data photos come from public benchmarks (Oxford affine, "
                     "Middlebury, TUM)", ("test/data",)),
    "kimera": Source("--kimera", "https://github.com/MIT-SPARK/Kimera-VIO",
                     "BSD-2-Clause (repository); MicroEurocDataset = EuRoC MAV frames (ETH Zurich ASL)",
                     ("tests/data/MicroEurocDataset/mav0/cam0/data",)),
}


# --------------------------------------------------------------------------------------------- utilities
def source_record(key: str, root: Path, paths: list[str], sources: dict[str, Source] | None = None) -> dict:
    """Where a sequence's data came from: repository, commit of the local clone, licence, paths used.
    ``sources``: the registry ``key`` is looked up in (default :data:`SOURCES`)."""
    source = (sources or SOURCES)[key]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {"repository": source.url, "commit": commit, "licence": source.licence, "paths": paths}


def check_source(key: str, root: Path | None, sources: dict[str, Source] | None = None) -> Path:
    source = (sources or SOURCES)[key]
    if root is None:
        raise SystemExit(f"{source.option} is required: a local clone of {source.url}")
    root = Path(root).expanduser()
    missing = [p for p in source.required if not (root / p).exists()]
    if missing:
        raise SystemExit(f"{source.option} {root}: missing {', '.join(missing)} (expected a clone of {source.url})")
    return root


def composite_stamps(count: int) -> np.ndarray:
    """Seconds of composite sequences: one keyframe per second (the photos have no common clock)."""
    return np.arange(count, dtype=np.float64)


def to_ns(stamps_s: np.ndarray, offset_ns: int = 0) -> list[int]:
    return [offset_ns + int(round(s * 1e9)) for s in stamps_s]


# ----------------------------------------------------------------------------- structure from motion
@dataclass
class SfmView:
    name: str  # file name in the collection (before undistortion)
    image: np.ndarray  # undistorted RGB, pinhole
    K: np.ndarray
    T_model_camera: np.ndarray  # model frame, scale arbitrary
    point_ids: set[int] = field(default_factory=set)


@dataclass
class SfmCollection:
    label: str
    views: list[SfmView]  # registered views in capture (file name) order
    summary: dict


def _prepare_images(files: list[Path], folder: Path) -> list[str]:
    """Copy photos, EXIF orientation applied and long side <= MAX_LONG_SIDE, as PNG (structure from motion
    and the bag then see the same pixels)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for path in files:
        image, _, _ = resize_long_side(read_rgb(path), None, MAX_LONG_SIDE)
        name = path.stem + ".png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        names.append(name)
    return names


def reconstruct(label: str, files: list[Path], work: Path, single_camera: bool, redo: bool) -> SfmCollection:
    """pycolmap SIFT + exhaustive matching + incremental mapping (largest model), undistorted to PINHOLE.
    The model in ``work`` is reused unless ``redo`` (or it is incomplete)."""
    import pycolmap

    undistorted = work / "undistorted"
    if redo and work.exists():
        shutil.rmtree(work)
    if not (undistorted / "sparse").is_dir():
        if work.exists():
            shutil.rmtree(work)
        images = work / "images"
        _prepare_images(files, images)
        database = work / "database.db"
        started = time.perf_counter()
        extraction = pycolmap.FeatureExtractionOptions()
        extraction.num_threads = 2
        extraction.max_image_size = MAX_LONG_SIDE
        extraction.sift.max_num_features = 4096
        pycolmap.extract_features(database, images, camera_mode=pycolmap.CameraMode.SINGLE if single_camera
                                  else pycolmap.CameraMode.PER_IMAGE,
                                  reader_options=pycolmap.ImageReaderOptions(camera_model="SIMPLE_RADIAL"),
                                  extraction_options=extraction, device=pycolmap.Device.cpu)
        matching = pycolmap.FeatureMatchingOptions()
        matching.num_threads = 2
        pycolmap.match_exhaustive(database, matching_options=matching, device=pycolmap.Device.cpu)
        mapping = pycolmap.IncrementalPipelineOptions()
        mapping.num_threads = 2
        mapping.mapper.random_seed = 0
        # Street and facade walks move forward with small angles between neighbours: the default initial-pair
        # test (16 deg triangulation angle, little forward motion) rejects every pair of such collections.
        mapping.mapper.init_min_tri_angle = 4.0
        mapping.mapper.init_max_forward_motion = 0.999
        mapping.mapper.init_min_num_inliers = 50
        models = pycolmap.incremental_mapping(database, images, work / "sparse", options=mapping)
        if not models:
            raise RuntimeError(f"{label}: structure from motion registered no model")
        best = max(models, key=lambda k: models[k].num_reg_images())
        pycolmap.undistort_images(undistorted, work / "sparse" / str(best), images)
        LOG.info("%s: structure from motion %.0f s", label, time.perf_counter() - started)
    model = pycolmap.Reconstruction(undistorted / "sparse")
    views = []
    for image_id in model.reg_image_ids():
        image = model.images[image_id]
        camera = model.cameras[image.camera_id]
        T_camera_model = np.eye(4)
        T_camera_model[:3] = image.cam_from_world().matrix()
        points = {int(image.points2D[i].point3D_id) for i in image.get_observation_point2D_idxs()}
        # Undistortion can grow the image a little past MAX_LONG_SIDE.
        pixels, K, _ = resize_long_side(read_rgb(undistorted / "images" / image.name), camera.calibration_matrix(),
                                        MAX_LONG_SIDE)
        views.append(SfmView(image.name, pixels, K, np.linalg.inv(T_camera_model), points))
    views.sort(key=lambda v: v.name)
    summary = {"input_images": len(files), "registered": len(views), "points3D": model.num_points3D(),
               "mean_reprojection_error_px": round(model.compute_mean_reprojection_error(), 3),
               "not_registered": sorted({p.stem + ".png" for p in files} - {v.name for v in views}),
               "method": "pycolmap 4.2.1: SIFT (4096/image, long side <= 1024), exhaustive matching, incremental "
                         "mapping (largest model), undistortion to PINHOLE; "
                         + ("one camera for the collection" if single_camera else "one camera per photo")}
    LOG.info("%s: %d/%d photos registered, %d points", label, len(views), len(files), model.num_points3D())
    return SfmCollection(label, views, summary)


def split_passes(items: list, passes: int = 2) -> list[list]:
    """Interleave one capture into ``passes`` passes: pass p takes items p, p + passes, ... The second pass
    then revisits the places of the first from viewpoints one capture step away."""
    return [items[p::passes] for p in range(passes)]


# ------------------------------------------------------------------------------------------ sequences
def build_tum_fr1_rpy(root: Path, out: Path, overwrite: bool) -> dict:
    """TUM RGB-D freiburg1_rpy: hand-held Kinect turning about its roll/pitch/yaw axes over a desk.

    Every 3rd RGB-D pair (10 Hz), undistorted with the dataset's published freiburg1 calibration (depth,
    registered to the colour camera by the sensor, through the same map with nearest sampling), motion-capture
    ground truth associated by nearest stamp (<= 10 ms), loops from ground truth + depth overlap, drifting
    odometry on /odom.
    """
    import cv2

    from feature_matching_ros.scenes.sequence import OdometryNoise, simulate_odometry

    K_distorted = np.array([[517.306408, 0.0, 318.643040], [0.0, 516.469215, 255.313989], [0.0, 0.0, 1.0]])
    distortion = np.array([0.262383, -0.953104, -0.005358, 0.002628, 1.163314])
    data = root / "data"
    all_pairs = [line.split() for line in (data / "rgbd_assoc.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    pairs = all_pairs[::3]
    gt_stamps, gt_poses = read_tum_trajectory(data / "groundtruth.txt")
    rgb_stamps = np.array([float(p[0]) for p in pairs])
    nearest = associate_nearest(rgb_stamps, gt_stamps, 0.01)
    keep = [i for i in range(len(pairs)) if nearest[i] >= 0]
    # alpha = 0: the undistorted image holds valid pixels only (no black curved border for detectors to fire on).
    K, _ = cv2.getOptimalNewCameraMatrix(K_distorted, distortion, (640, 480), 0.0)
    map_x, map_y = cv2.initUndistortRectifyMap(K_distorted, distortion, None, K, (640, 480), cv2.CV_32FC1)
    images, depths, poses, stamps = [], [], [], []
    for i in keep:
        rgb = read_rgb(data / pairs[i][1])
        raw = cv2.imread(str(data / pairs[i][3]), cv2.IMREAD_UNCHANGED)
        if raw is None or raw.dtype != np.uint16:
            raise ValueError(f"{data / pairs[i][3]}: expected a 16-bit depth PNG")
        depth = np.where(raw > 0, raw.astype(np.float32) / 5000.0, np.nan).astype(np.float32)
        images.append(cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR))
        depths.append(cv2.remap(depth, map_x, map_y, cv2.INTER_NEAREST, borderValue=np.nan))
        poses.append(gt_poses[nearest[i]])
        stamps.append(rgb_stamps[i])
    poses = np.stack(poses)
    stamps = np.asarray(stamps)
    criteria = LoopCriteria(distance_m=1.0, min_overlap=0.3, min_index_gap=50)
    step = 4
    loops = label_loops(poses, [d[::step, ::step] for d in depths], scale_intrinsics(K, step), criteria, stride=2)
    noise = OdometryNoise()
    dt = float(np.median(np.diff(stamps)))
    T_odom, lin, ang, pose_cov, twist_cov, _ = simulate_odometry(poses, np.random.default_rng(ODOMETRY_SEED), noise, dt)
    stamps_ns = to_ns(stamps)
    frames = (SequenceFrame(k, stamps_ns[k], images[k], depths[k], K, poses[k], T_odom[k], lin[k], ang[k])
              for k in range(len(images)))
    prepare_output(out, overwrite)
    metadata = {
        "name": "tum_fr1_rpy", "kind": "indoor", "split": "dev", "builder_version": BUILDER_VERSION,
        "sources": [source_record("gpu_odometry", root, ["data/rgb", "data/depth", "data/rgbd_assoc.txt",
                                                         "data/groundtruth.txt"])],
        "description": "TUM RGB-D freiburg1_rpy: hand-held Kinect at a desk, rotating about roll, pitch and yaw "
                       "and returning to earlier views (little translation).",
        "frames_used": f"every 3rd of the {len(all_pairs)} RGB-D pairs of rgbd_assoc.txt (10 Hz), "
                       f"{len(pairs) - len(keep)} dropped without ground truth within 10 ms",
        "stamps": "original capture times (TUM)", "K": K, "distortion": "none: undistorted from the TUM freiburg1 "
        "calibration (fx fy cx cy 517.306 516.469 318.643 255.314, k1 k2 p1 p2 k3 = "
        + " ".join(f"{v:g}" for v in distortion) + ") to the pinhole K above (OpenCV optimal new matrix, alpha 0: "
        "valid pixels only)",
        "depth": "32FC1 metres (TUM 16-bit / 5000, 0 -> NaN), same undistortion map, nearest sampling",
        "poses": "motion capture ground truth (TUM groundtruth.txt, nearest stamp), T_map_camera, metric",
        "loops": {"method": "scenes.loops.label_loops on ground-truth poses + depth (every 4th pixel)",
                  "criteria": criteria.to_dict()},
        "odometry": {"topic": "/odom", "model": "scenes.sequence.simulate_odometry (noisy relative motions, "
                     "scale error, gyro-like yaw bias about map z)", "parameters": noise.__dict__,
                     "seed": ODOMETRY_SEED, "odom_frame_equals_map_at_frame": 0},
    }
    metadata = write_real_sequence(out, frames, metadata, [list(p) for p in loops], odom_pose_covariances=pose_cov,
                                   odom_twist_covariances=twist_cov)
    write_tum_trajectory(out / "ground_truth.tum", stamps, poses)
    write_tum_trajectory(out / "odometry.tum", stamps, T_odom)
    return metadata


def _kitti_drive(root: Path, name: str) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Image files, K (3x3, left grey camera) and poses T_world_camera (N, 4, 4) of one KITTI snippet."""
    folder = root / name
    P0 = np.array([float(v) for v in (folder / "calib.txt").read_text().split("\n")[0].split()[-12:]]).reshape(3, 4)
    files = sorted((folder / "image_l").glob("*.png"))
    rows = [np.array([float(v) for v in line.split()]).reshape(3, 4)
            for line in (folder / "poses.txt").read_text().splitlines() if line.strip()]
    if len(rows) != len(files):
        raise ValueError(f"{folder}: {len(files)} images but {len(rows)} poses")
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3] = np.stack(rows)
    return files, P0[:, :3].copy(), poses


def _out_and_back(count: int, step: int) -> list[int]:
    """Frame order of a drive there and back: every ``step``-th frame forward, then the frames half a step
    later in reverse (the camera, still looking forward, backs along the same street)."""
    forward = list(range(0, count, step))
    back = list(range(step // 2, count, step))[::-1]
    return forward + back


def build_kitti_out_and_back(root: Path, out: Path, overwrite: bool) -> dict:
    """KITTI (sequence 00-02 calibration) snippet, driven forward then backed along the same street."""
    from feature_matching_ros.scenes.sequence import OdometryNoise, simulate_odometry

    files, K_full, poses_all = _kitti_drive(root, "KITTI_sequence_2")
    order = _out_and_back(len(files), 2)
    images, Ks = [], []
    for i in order:
        image, K, _ = resize_long_side(read_rgb(files[i]), K_full, MAX_LONG_SIDE)
        images.append(image)
        Ks.append(K)
    poses = poses_all[order]
    stamps = composite_stamps(len(order))
    criteria = ViewConeCriteria(max_distance_m=5.0, max_axis_angle_deg=20.0, min_index_gap=10, min_time_gap_s=10.0)
    loops = view_cone_loops(poses, stamps, criteria)
    noise = OdometryNoise()
    # KITTI's world frame has y down; simulate_odometry's yaw bias turns about map z, so rotate the world
    # to z up for the simulation and back (the bias then acts about gravity as a gyro's would).
    R_up = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1.0]])
    T_odom_up, lin, ang, pose_cov, twist_cov, _ = simulate_odometry(R_up @ poses, np.random.default_rng(ODOMETRY_SEED),
                                                                noise, 1.0)
    T_odom = np.linalg.inv(R_up) @ T_odom_up
    stamps_ns = to_ns(stamps, FIRST_STAMP_NS)
    frames = (SequenceFrame(k, stamps_ns[k], images[k], None, Ks[k], poses[k], T_odom[k], lin[k], ang[k])
              for k in range(len(order)))
    prepare_output(out, overwrite)
    metadata = {
        "name": "kitti_out_and_back", "kind": "outdoor", "split": "dev", "builder_version": BUILDER_VERSION,
        "sources": [source_record("kitti_vo", root, ["KITTI_sequence_2"])],
        "description": "KITTI odometry snippet (51 frames, suburban street with a turn, grey left camera, "
                       "sequence 00-02 calibration). Forward pass on even frames, then the odd frames in reverse: "
                       "the camera backs along the same street and revisits every place about one capture "
                       "step (~0.5-1 m) from the forward pass, same day and light.",
        "revisit_construction": "assembled from one real pass (frame order "
                                f"{order[:3]}...{order[-3:]}); the return pass is real images, real poses, "
                                "but not a second drive: easier than a real revisit (no change of light, cars)",
        "frame_order_in_source": order,
        "stamps": "synthetic: one keyframe per second (the source ships no times; the real capture is 10 Hz, "
                  "every 2nd frame used, 5 s each way). At real times no revisit would lie outside the "
                  "engine's 10 s recency window", "K": Ks[0],
        "poses": "KITTI ground truth (GPS/INS), T_map_camera of the left grey camera, metric, map = camera at "
                 "source frame 0 (x right, y down, z forward)",
        "loops": {"method": "scenes.loops.view_cone_loops on ground-truth poses", "criteria": criteria.to_dict()},
        "odometry": {"topic": "/odom", "model": "scenes.sequence.simulate_odometry in a z-up copy of the map",
                     "parameters": noise.__dict__, "seed": ODOMETRY_SEED, "odom_frame_equals_map_at_frame": 0},
    }
    metadata = write_real_sequence(out, frames, metadata, [list(p) for p in loops], odom_pose_covariances=pose_cov,
                                   odom_twist_covariances=twist_cov)
    write_tum_trajectory(out / "ground_truth.tum", stamps, poses)
    write_tum_trajectory(out / "odometry.tum", stamps, T_odom)
    return metadata


def _composite(name: str, kind: str, split: str, description: str, segments: list[tuple[str, list]],
               labellers: dict[str, Callable], sources: list[dict], notes: dict, out: Path, overwrite: bool) -> dict:
    """Concatenate segments (label, list of (image, K, payload)) at 1 Hz; loops labelled within each source.

    ``labellers[source label](local_positions, payloads, stamps)`` returns loop pairs between frames of that
    source (positions in the composite), so that no loop is ever claimed between different places.
    """
    images, Ks, owners, payloads = [], [], [], []
    layout = []
    for label, items in segments:
        layout.append({"segment": label, "first_index": len(images), "frames": len(items)})
        for image, K, payload in items:
            images.append(image)
            Ks.append(K)
            owners.append(label.split(":")[0])
            payloads.append(payload)
    stamps = composite_stamps(len(images))
    loops: list[tuple[int, int]] = []
    criteria = {}
    for source, labeller in labellers.items():
        positions = [i for i, owner in enumerate(owners) if owner == source]
        pairs, criterion = labeller(positions, [payloads[i] for i in positions], stamps[positions])
        loops += [(positions[q], positions[m]) for q, m in pairs]
        criteria[source] = criterion
    stamps_ns = to_ns(stamps, FIRST_STAMP_NS)
    frames = (SequenceFrame(k, stamps_ns[k], images[k], None, Ks[k]) for k in range(len(images)))
    prepare_output(out, overwrite)
    metadata = {
        "name": name, "kind": kind, "split": split, "builder_version": BUILDER_VERSION, "sources": sources,
        "description": description, "segments": layout,
        "stamps": "synthetic: one keyframe per second (photos of different collections share no clock)",
        "poses": "none published: the collections have no common frame and structure-from-motion scale is "
                 "arbitrary, so fmr evaluate judges loops by the GT loop set alone (no ATE, no relocalization)",
        "loops": {"method": "labelled within each source only (different sources are different places)",
                  "criteria": criteria},
    } | notes
    return write_real_sequence(out, frames, metadata, [list(p) for p in loops])


def _covisibility_labeller(criteria: CovisibilityCriteria):
    def label(positions, views, stamps):
        local = covisibility_loops([v.point_ids for v in views], stamps, criteria, positions)
        return local, criteria.to_dict() | {"evidence": "pycolmap 3D points"}
    return label


def _view_cone_labeller(criteria: ViewConeCriteria):
    def label(positions, poses, stamps):
        return view_cone_loops(np.stack(poses), stamps, criteria, positions), criteria.to_dict() | {
            "evidence": "KITTI ground-truth poses"}
    return label


def build_landmarks_revisit(roots: dict[str, Path], out: Path, work: Path, redo_sfm: bool) -> dict:
    collections = {
        "line3dpp": ("brick_building", sorted((roots["line3dpp"] / "testdata").glob("img*.jpg")), True),
        "sceaux": ("sceaux_castle", sorted((roots["sceaux"] / "images").glob("*.JPG")), True),
        "hloc": ("sacre_coeur", sorted((roots["hloc"] / "datasets/sacre_coeur/mapping").glob("*.jpg")), False),
        "monstree": ("tree", [roots["monstree"] / "full" / f"IMG_{n}.JPG" for n in MONSTREE_PHOTOS], True),
    }
    models = {key: reconstruct(label, files, work / label, single, redo_sfm)
              for key, (label, files, single) in collections.items()}
    passes = {key: split_passes(model.views) for key, model in models.items()}
    segments = [(f"{key}:{collections[key][0]} pass {p + 1}", [(v.image, v.K, v) for v in passes[key][p]])
                for p in range(2) for key in collections]
    criteria = CovisibilityCriteria(min_index_gap=10, min_time_gap_s=10.0)
    labellers = {key: _covisibility_labeller(criteria) for key in collections}
    sources = [source_record(key, roots[key], [str(f.relative_to(roots[key])) for f in collections[key][1]])
               for key in collections]
    return _composite(
        "landmarks_revisit", "multiview", "dev",
        "Four outdoor photo collections (brick building facade, Sceaux castle, Sacre-Coeur from tourists' photos, "
        "a tree trunk walked around). Each collection is split into two interleaved passes; the route visits "
        "all four places, then all four again, so every second-pass photo revisits its collection's first pass "
        "from a viewpoint one photo away (Sacre-Coeur: other cameras, days and seasons).",
        segments, labellers, sources,
        {"revisit_construction": "photos of one capture split into passes (even / odd positions by file name)",
         "structure_from_motion": {models[k].label: models[k].summary for k in models}}, out, True)


def build_streets_aliasing(roots: dict[str, Path], out: Path, work: Path, redo_sfm: bool) -> dict:
    lund = reconstruct("lund_streets", sorted((roots["opensfm"] / "data/lund/images").glob("*.jpg")),
                       work / "lund_streets", True, redo_sfm)
    files, K_full, poses_all = _kitti_drive(roots["kitti_vo"], "KITTI_sequence_1")
    order = _out_and_back(len(files), 2)
    kitti = []
    for i in order:
        image, K, _ = resize_long_side(read_rgb(files[i]), K_full, MAX_LONG_SIDE)
        kitti.append((image, K, poses_all[i]))
    half = len(order) // 2 + 1
    lund_a, lund_b = split_passes(lund.views)
    segments = [("opensfm:lund pass 1", [(v.image, v.K, v) for v in lund_a]),
                ("kitti_vo:drive forward", kitti[:half]),
                ("opensfm:lund pass 2 (reversed)", [(v.image, v.K, v) for v in lund_b[::-1]]),
                ("kitti_vo:drive back", kitti[half:])]
    labellers = {"opensfm": _covisibility_labeller(CovisibilityCriteria(min_index_gap=10, min_time_gap_s=10.0)),
                 "kitti_vo": _view_cone_labeller(ViewConeCriteria(max_distance_m=5.0, max_axis_angle_deg=20.0,
                                                                  min_index_gap=10, min_time_gap_s=10.0))}
    sources = [source_record("opensfm", roots["opensfm"], ["data/lund/images"]),
               source_record("kitti_vo", roots["kitti_vo"], ["KITTI_sequence_1"])]
    return _composite(
        "streets_aliasing", "aliasing", "heldout",
        "Look-alike streets: a walk through Lund's row-house streets (one-storey houses, cobbles, the same "
        "facade rhythm on every street) and a KITTI suburban drive, each visited twice. Streets of the same "
        "town look alike, so most retrieval candidates are wrong places; true loops exist only between the two "
        "passes of the same street.",
        segments, labellers, sources,
        {"revisit_construction": "Lund photos split into two interleaved passes (second pass walked in reverse); "
                                 "KITTI_sequence_1 (sequence 04-12 calibration) driven forward on even frames and "
                                 "backed on odd frames", "kitti_frame_order_in_source": order,
         "structure_from_motion": {"lund_streets": lund.summary}}, out, True)


def write_codebook_images(roots: dict[str, Path], cache: Path) -> dict:
    """Real photos from sources no sequence uses, resized and copied to CACHE/codebook/, listed one per line."""
    import cv2

    picks = {
        "superglue": [*sorted((roots["superglue"] / "assets/freiburg_sequence").glob("*.png")),
                      *sorted((roots["superglue"] / "assets/phototourism_sample_images").glob("*.jpg"))],
        "pyslam": [p for p in sorted((roots["pyslam"] / "test/data").rglob("*"))
                   if p.suffix.lower() in (".png", ".jpg", ".ppm") and not p.name.startswith("kitti")],
        "kimera": sorted((roots["kimera"] / "tests/data/MicroEurocDataset/mav0/cam0/data").glob("*.png"))[::3],
    }
    folder = cache / "codebook"
    if folder.exists():
        shutil.rmtree(folder)
    listed, record = [], {}
    for key, files in picks.items():
        (folder / key).mkdir(parents=True, exist_ok=True)
        for path in files:
            image, _, _ = resize_long_side(read_rgb(path), None, MAX_LONG_SIDE)
            target = folder / key / (path.parent.name + "_" + path.stem + ".png")
            cv2.imwrite(str(target), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            listed.append(str(target.resolve()))
        record[key] = source_record(key, roots[key], sorted({str(p.parent.relative_to(roots[key])) for p in files}))
        record[key]["images"] = len(files)
    (cache / "codebook_images.txt").write_text("\n".join(listed) + "\n")
    card = {"images": len(listed), "sources": record,
            "disjoint_from": "every sequence: none of these repositories feeds a sequence, and pyslam's KITTI frames "
                             "are left out because the KITTI snippets are in two sequences"}
    (cache / "codebook_images.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


# ----------------------------------------------------------------------------------------------- main
SEQUENCES = ("tum_fr1_rpy", "kitti_out_and_back", "landmarks_revisit", "streets_aliasing", "codebook")
NEEDS = {"tum_fr1_rpy": ("gpu_odometry",), "kitti_out_and_back": ("kitti_vo",),
         "landmarks_revisit": ("line3dpp", "sceaux", "hloc", "monstree"), "streets_aliasing": ("opensfm", "kitti_vo"),
         "codebook": ("superglue", "pyslam", "kimera")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, source in SOURCES.items():
        parser.add_argument(source.option, dest=key, type=Path, help=f"local clone of {source.url}")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/feature_matching_ros/real"),
                        help="output directory, outside the repository (default ~/.cache/feature_matching_ros/real)")
    parser.add_argument("--only", nargs="+", choices=SEQUENCES, help="build only these (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild existing sequences")
    parser.add_argument("--redo-sfm", action="store_true",
                        help="recompute the structure-from-motion models in CACHE/_sfm (default: reuse them)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pycolmap",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cache = args.cache.expanduser().resolve()
    if REPO_ROOT in cache.parents or cache == REPO_ROOT:
        raise SystemExit(f"--cache {cache} is inside the repository; data stays outside it")
    wanted = args.only or list(SEQUENCES)
    roots = {key: check_source(key, getattr(args, key)) for name in wanted for key in NEEDS[name]}
    cache.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in wanted:
        started = time.perf_counter()
        out = cache / name
        if name != "codebook" and (out / "sequence.json").is_file() and not args.overwrite:
            LOG.info("%s exists (use --overwrite to rebuild)", out)
            summary[name] = json.loads((out / "sequence.json").read_text())
            continue
        if name == "tum_fr1_rpy":
            summary[name] = build_tum_fr1_rpy(roots["gpu_odometry"], out, True)
        elif name == "kitti_out_and_back":
            summary[name] = build_kitti_out_and_back(roots["kitti_vo"], out, True)
        elif name == "landmarks_revisit":
            summary[name] = build_landmarks_revisit(roots, out, cache / "_sfm", args.redo_sfm)
        elif name == "streets_aliasing":
            summary[name] = build_streets_aliasing(roots, out, cache / "_sfm", args.redo_sfm)
        else:
            summary[name] = write_codebook_images(roots, cache)
        LOG.info("%s done in %.0f s", name, time.perf_counter() - started)
    for name, meta in summary.items():
        if name == "codebook":
            print(f"codebook_images.txt: {meta['images']} images")
        else:
            print(f"{name}: kind={meta['kind']} split={meta['split']} frames={meta['frames']} "
                  f"sizes={meta['image_sizes_wxh']} gt_loop_queries={meta['gt_loop_queries']} "
                  f"pairs={meta['gt_loop_pairs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
