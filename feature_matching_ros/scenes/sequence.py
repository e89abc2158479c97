"""Rendered camera sequences with exact ground truth, written as a ROS 2 bag plus loop labels.

``generate_sequence(out_dir, scene, frames, seed, ...)`` writes
  out_dir/bag/           rosbag2 (mcap or sqlite3), topics in ``feature_matching_ros.bag.sequence``
  out_dir/loops.json     [[query_index, match_index], ...], 0-based image-topic indices, query > match
  out_dir/sequence.json  metadata: scene, seed, frames, intrinsics, rate, loop criteria, odometry model ...
Everything derives from the seed through numpy's counter-based SeedSequence streams, and the renderer
is single-threaded numpy, so the same seed gives byte-identical messages (on the same numpy build).

What is simulated on top of the exact render: a per-frame exposure gain (smooth random walk, as an
auto-exposure does), Gaussian read noise of ``NOISE_SIGMA_DN`` before 8-bit rounding, and odometry
that integrates noisy relative motions with a scale error and a yaw-rate bias about gravity, so its
drift grows with distance. Depth is the exact, noise-free render depth.

``monocular=True`` writes what a monocular SLAM backend (ORB-SLAM3 style) would hand over instead of depth:
no depth topic; per frame its keyframe map points (``/slam/map_points``: the keypoints of its own detector,
OpenCV ORB 8 levels x 1.2, that observe a map point, with that point in the camera frame) in the backend's
units; and odometry whose SCALE DRIFTS: the local scale lambda_k (backend units per metre) follows a
log-normal random walk, odometry steps and the frame's map points are both in lambda_k units. So a loop
between frames q and m relates the two maps by the similarity scale lambda_m / lambda_q
(``sequence.json`` lists lambda per frame as ``monocular.local_scale``). Map points have a relative depth
noise along their ray and a few gross outliers, as triangulated points do.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from scipy.spatial.transform import Rotation

from feature_matching_ros.bag.sequence import DEFAULT_TOPICS, STORAGE_FORMATS, SequenceBagWriter, SequenceFrame
from feature_matching_ros.scenes.builders import SCENE_KINDS, build_scene
from feature_matching_ros.scenes.loops import LoopCriteria, label_loops, scale_intrinsics
from feature_matching_ros.scenes.renderer import Renderer, default_intrinsics
from feature_matching_ros.scenes.trajectory import _smooth_noise, default_lap_plan, make_trajectory

LOG = logging.getLogger(__name__)
GENERATOR_VERSION = 1
RATE_HZ = 10.0
FIRST_STAMP_NS = 1_700_000_000 * 1_000_000_000
NOISE_SIGMA_DN = 1.0
LOOP_DEPTH_STEP = 4  # loop labels use depth[::4, ::4]


@dataclass(frozen=True)
class OdometryNoise:
    """Per-step noise: sigma = abs + rel * |motion|; biases are drawn once per sequence."""

    translation_rel: float = 0.02
    translation_abs_m: float = 0.002
    rotation_rel: float = 0.02
    rotation_abs_rad: float = 0.0015
    scale_bias_max: float = 0.02  # |scale error| up to 2 %
    yaw_bias_rad_per_m_max: float = 0.012  # gyro-like yaw drift per metre travelled
    yaw_bias_rad_per_frame_max: float = 0.0008


@dataclass(frozen=True)
class MonocularBackend:
    """What the simulated monocular backend holds (``generate_sequence(monocular=True)``)."""

    log_scale_walk_per_frame: float = 0.01  # sigma of the per-frame change of log lambda (scale drift)
    keypoints: int = 1000  # its detector: OpenCV ORB, 8 levels x 1.2 (ORB-SLAM3's defaults at VGA)
    map_point_fraction: float = 0.7  # keypoints that observe a map point
    depth_noise_rel: float = 0.01  # sigma of a map point's depth along its ray, relative
    outlier_fraction: float = 0.02  # map points with a grossly wrong depth (x 0.5 .. 2)


def simulate_odometry(poses: np.ndarray, rng: np.random.Generator, noise: OdometryNoise = OdometryNoise(),
                      dt: float = 1.0 / RATE_HZ, log_scale_walk: float = 0.0):
    """Dead-reckoned T_odom_camera (odom = map at frame 0) plus velocities and accumulated covariances.

    Returns (T_odom (N,4,4), linear velocity (N,3), angular velocity (N,3), pose covariance (N,6,6),
    twist covariance (N,6,6), local scale (N,)); velocities are in the camera frame. The local scale lambda_k
    (odometry units per metre around frame k) is the constant scale bias, times exp of a random walk of sigma
    ``log_scale_walk`` per frame when the odometry is monocular (0: metric, constant).
    """
    n = len(poses)
    scale = 1.0 + rng.uniform(-noise.scale_bias_max, noise.scale_bias_max)
    local_scale = np.full(n, scale)
    if log_scale_walk > 0:
        walk_rng = np.random.default_rng(rng.integers(2**63))  # separate stream: metric odometry is unchanged
        local_scale = scale * np.exp(np.r_[0.0, np.cumsum(walk_rng.normal(0.0, log_scale_walk, n - 1))])
    yaw_per_m = rng.uniform(-1.0, 1.0) * noise.yaw_bias_rad_per_m_max
    yaw_per_frame = rng.uniform(-1.0, 1.0) * noise.yaw_bias_rad_per_frame_max
    T_odom = np.zeros_like(poses)
    T_odom[0] = poses[0]
    lin = np.zeros((n, 3))
    ang = np.zeros((n, 3))
    pose_cov = np.zeros((n, 6, 6))
    twist_cov = np.zeros((n, 6, 6))
    accumulated = np.zeros(6)
    for k in range(1, n):
        rel = np.linalg.inv(poses[k - 1]) @ poses[k]
        step = float(np.linalg.norm(rel[:3, 3]))
        angle = float(np.linalg.norm(Rotation.from_matrix(rel[:3, :3]).as_rotvec()))
        sigma_t = noise.translation_abs_m + noise.translation_rel * step
        sigma_r = noise.rotation_abs_rad + noise.rotation_rel * angle
        R_noise = Rotation.from_rotvec(rng.normal(0.0, sigma_r, 3)).as_matrix()
        # Yaw bias about gravity, expressed in the previous (estimated) camera frame.
        up_in_camera = T_odom[k - 1][:3, :3].T @ np.array([0.0, 0.0, 1.0])
        R_bias = Rotation.from_rotvec(up_in_camera * (yaw_per_m * step + yaw_per_frame)).as_matrix()
        noisy = np.eye(4)
        noisy[:3, :3] = R_bias @ rel[:3, :3] @ R_noise
        noisy[:3, 3] = rel[:3, 3] * local_scale[k] + rng.normal(0.0, sigma_t, 3)
        T_odom[k] = T_odom[k - 1] @ noisy
        lin[k] = noisy[:3, 3] / dt
        ang[k] = Rotation.from_matrix(noisy[:3, :3]).as_rotvec() / dt
        step_var = np.r_[np.full(3, sigma_t**2), np.full(3, sigma_r**2)]
        accumulated += step_var
        pose_cov[k] = np.diag(accumulated)
        twist_cov[k] = np.diag(step_var / dt**2)
    lin[0], ang[0] = lin[1], ang[1]
    return T_odom, lin, ang, pose_cov, twist_cov, local_scale


def backend_map_points(image: np.ndarray, depth: np.ndarray, K: np.ndarray, local_scale: float,
                       rng: np.random.Generator, backend: MonocularBackend = MonocularBackend()
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A monocular backend's map points for one rendered frame: ((P, 2) keypoint pixels, (P, 3) camera-frame
    points in backend units = local_scale x metres), from its own ORB keypoints and the exact depth, with the
    noise and outliers of ``backend``."""
    import cv2

    orb = cv2.ORB_create(nfeatures=backend.keypoints, scaleFactor=1.2, nlevels=8)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    pixels = np.array([k.pt for k in orb.detect(gray, None)], np.float64).reshape(-1, 2)
    height, width = depth.shape
    z = depth[np.clip(np.round(pixels[:, 1]).astype(int), 0, height - 1),
              np.clip(np.round(pixels[:, 0]).astype(int), 0, width - 1)].astype(np.float64)
    keep = np.isfinite(z) & (z > 0) & (rng.random(len(z)) < backend.map_point_fraction)
    pixels, z = pixels[keep], z[keep]
    z = z * (1.0 + rng.normal(0.0, backend.depth_noise_rel, len(z)))
    wrong = rng.random(len(z)) < backend.outlier_fraction
    z[wrong] *= np.exp(rng.uniform(np.log(0.5), np.log(2.0), int(wrong.sum())))
    points = np.c_[(pixels[:, 0] - K[0, 2]) / K[0, 0] * z, (pixels[:, 1] - K[1, 2]) / K[1, 1] * z, z]
    return pixels.astype(np.float32), (local_scale * points).astype(np.float32)


def _check_args(scene: str, frames: int, width: int, height: int, storage: str) -> None:
    if scene not in SCENE_KINDS:
        raise ValueError(f"unknown scene {scene!r}; choose one of {', '.join(SCENE_KINDS)}")
    if frames < 10:
        raise ValueError(f"--frames must be at least 10 (got {frames})")
    if width < 32 or height < 24:
        raise ValueError(f"image size {width}x{height} is too small (min 32x24)")
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGE_FORMATS)}")


@dataclass
class SequencePlan:
    """Everything of a sequence but its pixels, derived from (scene, frames, seed, size): trajectory (N, 4, 4)
    T_map_camera, odometry (N, 4, 4) and its velocities / covariances, exposure gains (N,), laps, K (3, 3)."""

    scene: str
    seed: int
    width: int
    height: int
    layout: object
    laps: list
    poses: np.ndarray
    T_odom: np.ndarray
    linear_velocity: np.ndarray
    angular_velocity: np.ndarray
    pose_covariance: np.ndarray
    twist_covariance: np.ndarray
    exposure: np.ndarray
    K: np.ndarray
    local_scale: np.ndarray  # (N,) odometry scale per frame (1.0 unless the monocular scale drifts)


def plan_sequence(scene: str, frames: int, seed: int, width: int = 640, height: int = 480,
                  log_scale_walk: float = 0.0) -> SequencePlan:
    layout = build_scene(scene, seed)
    trajectory_rng = np.random.default_rng([int(seed), 1])
    laps = default_lap_plan(layout, trajectory_rng)
    poses = make_trajectory(layout, frames, trajectory_rng, laps)
    T_odom, lin, ang, pose_cov, twist_cov, local_scale = simulate_odometry(
        poses, np.random.default_rng([int(seed), 2]), log_scale_walk=log_scale_walk)
    exposure = np.exp(0.12 * _smooth_noise(np.random.default_rng([int(seed), 3]), frames, 60.0))
    return SequencePlan(scene, int(seed), width, height, layout, laps, poses, T_odom, lin, ang, pose_cov, twist_cov,
                        exposure, default_intrinsics(width, height), local_scale)


def render_frames(plan: SequencePlan, indices: Iterable[int] | None = None) -> Iterator[SequenceFrame]:
    """The frames ``generate_sequence`` writes for this plan (default: all, in order), rendered on demand: same
    images (exposure and noise streams per frame index), depth, GT pose and odometry as in the bag."""
    renderer = Renderer(plan.layout.scene)
    for k in (range(len(plan.poses)) if indices is None else indices):
        result = renderer.render(plan.K, plan.poses[k], plan.width, plan.height, exposure=float(plan.exposure[k]))
        noise_rng = np.random.default_rng([plan.seed, 4, k])
        noisy = result.rgb * 255.0 + noise_rng.normal(0.0, NOISE_SIGMA_DN, result.rgb.shape).astype(np.float32)
        image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        stamp = FIRST_STAMP_NS + round(k * 1e9 / RATE_HZ)
        yield SequenceFrame(k, stamp, image, result.depth, plan.K, plan.poses[k], plan.T_odom[k],
                            plan.linear_velocity[k], plan.angular_velocity[k])


def generate_sequence(out_dir: Path | str, scene: str = "office", frames: int = 300, seed: int = 0,
                      storage: str = "mcap", width: int = 640, height: int = 480, overwrite: bool = False,
                      progress: bool = True, monocular: bool = False) -> Path:
    """Render a looping sequence and write bag + loops.json + sequence.json into ``out_dir``.

    ``monocular``: no depth topic; backend map points and scale-drifting odometry instead (module docstring).
    Returns the bag directory. Raises FileExistsError if ``out_dir`` is not empty (unless ``overwrite``).
    """
    _check_args(scene, frames, width, height, storage)
    from feature_matching_ros.bag.image_folder import prepare_output

    out_dir = prepare_output(out_dir, overwrite)

    backend = MonocularBackend()
    plan = plan_sequence(scene, frames, seed, width, height,
                         log_scale_walk=backend.log_scale_walk_per_frame if monocular else 0.0)
    layout, poses, K, exposure, laps = plan.layout, plan.poses, plan.K, plan.exposure, plan.laps
    local_scale = plan.local_scale
    coarse_depths = []
    bag_path = out_dir / "bag"
    started = time.perf_counter()
    with SequenceBagWriter(bag_path, storage) as writer:
        for frame in render_frames(plan):
            k = frame.index
            coarse_depths.append(frame.depth[::LOOP_DEPTH_STEP, ::LOOP_DEPTH_STEP].copy())
            if monocular:
                frame.map_points = backend_map_points(frame.image, frame.depth, K, float(local_scale[k]),
                                                      np.random.default_rng([int(seed), 5, k]), backend)
                frame.depth = None
            writer.write_frame(frame, plan.pose_covariance[k], plan.twist_covariance[k])
            if progress and (k % 50 == 49 or k == frames - 1):
                LOG.info("rendered %d/%d frames (%.0f ms/frame)", k + 1, frames,
                         1000 * (time.perf_counter() - started) / (k + 1))

    criteria = LoopCriteria(distance_m=layout.loop_distance_m, min_index_gap=max(10, round(0.1 * frames)))
    loops = label_loops(poses, coarse_depths, scale_intrinsics(K, LOOP_DEPTH_STEP), criteria)
    (out_dir / "loops.json").write_text(json.dumps([list(p) for p in loops]) + "\n")
    metadata = {
        "generator": "feature_matching_ros.scenes.sequence", "generator_version": GENERATOR_VERSION,
        "scene": scene, "seed": int(seed), "frames": frames, "width": width, "height": height,
        "rate_hz": RATE_HZ, "first_stamp_ns": FIRST_STAMP_NS, "storage": storage, "bag": "bag",
        "K": K.tolist(), "distortion": "none",
        "topics": asdict(DEFAULT_TOPICS),
        "depth": ("none (monocular): backend map points on /slam/map_points instead" if monocular else
                  "32FC1 metres along the optical axis (z), exact render depth; NaN = no surface (sky)"),
        "poses": "ground truth T_map_camera of the optical frame (x right, y down, z forward), map z up",
        "odometry": asdict(OdometryNoise()) | {"odom_frame_equals_map_at_frame": 0},
        "image_noise_sigma_dn": NOISE_SIGMA_DN, "exposure_gain": [round(float(e), 6) for e in exposure],
        "laps": [asdict(lap) | {"direction": int(lap.direction)} for lap in laps],
        "loop_criteria": criteria.to_dict() | {"depth_subsampling": LOOP_DEPTH_STEP, "overlap_stride": 2},
        "loop_pairs": len(loops),
    }
    if monocular:
        metadata["monocular"] = asdict(backend) | {
            "local_scale": [round(float(v), 9) for v in local_scale],
            "local_scale_definition": "backend units per metre around each frame: odometry steps and that frame's "
                                      "map points are in these units; a loop q -> m has Sim3 scale "
                                      "local_scale[m] / local_scale[q]"}
    (out_dir / "sequence.json").write_text(json.dumps(metadata, indent=1, default=float) + "\n")
    LOG.info("wrote %s: %d frames, %d loop pairs, %.1f s", bag_path, frames, len(loops),
             time.perf_counter() - started)
    return bag_path


def load_loops(sequence_dir: Path | str) -> list[tuple[int, int]]:
    return [tuple(p) for p in json.loads((Path(sequence_dir) / "loops.json").read_text())]


def load_sequence_metadata(sequence_dir: Path | str) -> dict:
    return json.loads((Path(sequence_dir) / "sequence.json").read_text())
