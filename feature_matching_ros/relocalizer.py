"""The loop-closure and relocalization engine: keyframes in, LoopClosure / Relocalization records out.

Per keyframe: extract -> global descriptor -> top-k retrieval (recent keyframes excluded) -> ONE batched
``MatchingPipeline.match`` of the query against the k candidates -> geometric verification per candidate
-> acceptance (inlier count, inlier ratio, optional temporal consistency) -> the keyframe is inserted.

Detector-free matchers (eloftr, loftr): the features still drive retrieval, but verification matches the
stored keyframe IMAGES (kept in the map, with their depth images) and each pair's semi-dense matches become
the keypoints of two keyframe views, so everything below runs unchanged.

Geometric verification, per candidate (query = image 0, candidate = image 1, result T_match_query):
  * candidate has depth at its keypoints -> PnP (candidate 3D points -> query pixels), metric;
  * else query has depth -> PnP (query 3D points -> candidate pixels), metric;
  * else essential matrix (``estimate_relative_pose``) -> rotation + unit translation, ``metric=False``,
    ``scale=1.0``. Monocular scale: ORB-SLAM3 solves a Sim3 between the two keyframes' MAP POINTS; this
    engine stores no map points, and the backend's poses across a loop are exactly what drifted, so we do
    not invent a scale: the constraint says "scale unknown" (information zero along t) and the backend,
    which owns the map points, resolves it. Relocalization needs a metric pose, so it requires depth.
The per-keypoint depth variant of PnP (:func:`pose_from_points3d`) reuses the PnP internals of
``geometry.pose`` (USAC PnP, LM refinement, numeric Jacobian, robust information) instead of copying them.

Precision first: a false loop closure corrupts the map (the previous defaults made ATE worse after the pose
graph on the generated office sequence), so every candidate gets a reason when rejected, and acceptance
stacks principled checks rather than per-sequence thresholds (defaults in EngineConfig / presets.py):
  1. inlier count and inlier ratio;
  2. inlier spread: inliers cover >= min_inlier_coverage of a 4x4 grid in both images (a repeated poster or
     one tiled patch verifies with a tight cluster);
  3. reprojection residuals: median inlier residual <= half the PnP threshold (a forced pose spreads residuals
     over the whole RANSAC band, a right one sits at the noise level);
  4. depth consistency when both keyframes have depth: the PnP pose must predict the depth measured at the
     other keyframe's inliers (mirror-symmetric rooms give a rotated pose that sees walls at wrong depths);
  5. odometry gate along the keyframe GRAPH: the loop is compared with odometry composed along the shortest
     path (odometry edges + previously accepted loops) and may disagree by abs + ratio * path length, the
     odometry's drift model. Once one loop is closed, later ones are checked against the drift since then,
     which is what rejects the "one wallpaper tile over" poses after a long first lap;
  6. ambiguity: when two candidates at different places both pass and the weaker has >= ambiguity_ratio of the
     stronger's inliers, both are rejected (repetitive texture, no odometry to break the tie);
  7. temporal consistency (ORB-SLAM style): 3 consecutive queries must verify keyframes near the same place.
Information matrices are ordered (tx, ty, tz, rx, ry, rz) for a LEFT perturbation
T_match_query <- exp([v, w]) T_match_query (perturbation expressed in the match keyframe's frame).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from feature_matching_ros.config import ConfigError, PoseConfig, _check_choice, _check_range
from feature_matching_ros.features.base import Features
from feature_matching_ros.geometry.pose import (RelativePose, _information, _numeric_jacobian, _perturb, _pnp,
                                                _reprojection_residuals, _skew, check_intrinsics,
                                                estimate_relative_pose)
from feature_matching_ros.image import to_rgb_uint8
from feature_matching_ros.matchers.base import PairMatches
from feature_matching_ros.retrieval.database import Candidate, Keyframe, KeyframeDatabase, RetrievalConfig
from feature_matching_ros.retrieval.persistence import MapFormatError
from feature_matching_ros.retrieval.global_descriptors import (BinaryVocabulary, CodebookError, VladCodebook,
                                                               default_codebook_path, load_codebook, sha256_file)

LOG = logging.getLogger(__name__)
GLOBAL_DESCRIPTORS = ("auto", "vlad", "bow")


@dataclass
class EngineConfig:
    global_descriptor: str = "auto"  # auto: bow for binary (ORB) descriptors, vlad otherwise
    codebook: str = "default"  # path to a codebook .npz, or "default" = the shipped one for the descriptor
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    min_inliers: int = 50  # accepted loops need at least this many geometric inliers
    min_inlier_ratio: float = 0.5  # ... and inliers / matches at least this
    # ORB-SLAM style: accept only when N consecutive queries verify keyframes near the same place (1 = off).
    temporal_consistency: int = 3
    consistency_window: int = 5  # "same place": verified candidates within this many keyframes of each other
    max_loops_per_keyframe: int = 1  # accepted loops reported per query (best inlier counts first)
    store_depth: bool = True  # keep depth at keypoints for PnP when a depth image is given
    # Inlier spread: the inliers must occupy at least this fraction of a coverage_grid x coverage_grid grid in
    # BOTH images. One repeated poster or a tiled patch gives a tight cluster of (consistent) inliers.
    min_inlier_coverage: float = 0.25
    coverage_grid: int = 4
    # Depth consistency (PnP, both keyframes with depth): the PnP pose predicts the depth of every inlier in the
    # other camera; at least this fraction must agree with the depth measured there (|dz| <= rel*z + abs).
    # A pose explained by the wrong structure (mirror-symmetric room, wall one tile over) predicts wrong depths.
    min_depth_agreement: float = 0.7
    depth_tolerance_rel: float = 0.1
    depth_tolerance_abs_m: float = 0.1
    # Reprojection residuals: the median inlier residual after refinement must stay below this fraction of the
    # PnP RANSAC threshold (a correct pose sits at the noise level; a forced one spreads over the whole band).
    max_median_residual_ratio: float = 0.5
    # Ambiguity: if two candidates that pass every check put the query at places that disagree (beyond the
    # odometry allowance between them) and the weaker has >= ambiguity_ratio x the stronger's inliers, both are
    # rejected: the scene looks the same in two places (repetitive texture). 1.0 disables it.
    ambiguity_ratio: float = 0.7
    # Odometry-consistency gate (needs backend poses on both keyframes and a metric loop). The loop is compared
    # with the relative pose predicted by composing odometry (and previously accepted loops) along the SHORTEST
    # path between the two keyframes in the keyframe graph, and may disagree by at most
    # abs + ratio * (length of that path): the odometry's drift model (set it to your odometry's drift spec).
    # Accepted loops shorten the paths, so after the first closure the gate tightens to the drift since then,
    # as a backend's marginal covariance would. Repetitive textures verify with a pose one period away.
    odometry_gate: bool = True
    max_drift_abs_m: float = 0.3
    max_drift_ratio: float = 0.05
    max_drift_abs_deg: float = 5.0
    max_drift_deg_per_m: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("global_descriptor", self.global_descriptor, GLOBAL_DESCRIPTORS)
        if isinstance(self.retrieval, dict):
            known = {f.name for f in fields(RetrievalConfig)}
            unknown = set(self.retrieval) - known
            if unknown:
                raise ConfigError(f"unknown keys in engine.retrieval: {sorted(unknown)}; allowed: {sorted(known)}")
            self.retrieval = RetrievalConfig(**self.retrieval)
        _check_range("min_inliers", self.min_inliers, 5, 100_000)
        _check_range("min_inlier_ratio", self.min_inlier_ratio, 0.0, 1.0)
        _check_range("temporal_consistency", self.temporal_consistency, 1, 100)
        _check_range("consistency_window", self.consistency_window, 0, 100_000)
        _check_range("max_loops_per_keyframe", self.max_loops_per_keyframe, 1, 100)
        _check_range("min_inlier_coverage", self.min_inlier_coverage, 0.0, 1.0)
        _check_range("coverage_grid", self.coverage_grid, 1, 64)
        _check_range("min_depth_agreement", self.min_depth_agreement, 0.0, 1.0)
        _check_range("depth_tolerance_rel", self.depth_tolerance_rel, 0.0, 10.0)
        _check_range("depth_tolerance_abs_m", self.depth_tolerance_abs_m, 0.0, 1e3)
        _check_range("max_median_residual_ratio", self.max_median_residual_ratio, 0.0, 1.0)
        _check_range("ambiguity_ratio", self.ambiguity_ratio, 0.0, 1.0)
        _check_range("max_drift_abs_m", self.max_drift_abs_m, 0.0, 1e6)
        _check_range("max_drift_ratio", self.max_drift_ratio, 0.0, 100.0)
        _check_range("max_drift_abs_deg", self.max_drift_abs_deg, 0.0, 180.0)
        _check_range("max_drift_deg_per_m", self.max_drift_deg_per_m, 0.0, 180.0)
        self.min_inliers, self.temporal_consistency = int(self.min_inliers), int(self.temporal_consistency)
        self.consistency_window, self.max_loops_per_keyframe = int(self.consistency_window), int(
            self.max_loops_per_keyframe)
        self.coverage_grid = int(self.coverage_grid)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown engine keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["retrieval"] = vars(self.retrieval).copy()
        return out


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _matrix_list(matrix: np.ndarray | None) -> list | None:
    return None if matrix is None else np.asarray(matrix, float).round(9).tolist()


@dataclass
class LoopClosure:
    """One verified (or rejected) candidate. T_match_query maps query-camera points into the match camera."""

    query_id: int
    match_id: int
    query_stamp_ns: int
    match_stamp_ns: int
    accepted: bool
    reason: str
    T_match_query: np.ndarray = field(default_factory=lambda: np.eye(4))
    scale: float = 1.0  # 1.0 with metric=False: monocular, translation is a unit direction
    metric: bool = False
    information: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))  # (tx,ty,tz,rx,ry,rz), left
    num_matches: int = 0
    num_inliers: int = 0
    retrieval_score: float = 0.0
    retrieval_rank: int = 0
    method: str = "none"  # pnp | essential | none
    geometry_ok: bool = False  # passed geometric verification (before the acceptance thresholds)
    # Disagreement of the loop with the backend poses (None when a pose is missing or the loop is not metric).
    drift_translation_m: float | None = None
    drift_rotation_deg: float | None = None
    path_length_m: float | None = None
    # The matches behind a geometrically verified candidate (None otherwise), for Matches messages and debug
    # images: (M, 2) float32 pixels in the query and the match image, (M,) match scores, (M,) pose inlier mask.
    # Not part of to_json_dict.
    points_query: np.ndarray | None = field(default=None, repr=False)
    points_match: np.ndarray | None = field(default=None, repr=False)
    match_scores: np.ndarray | None = field(default=None, repr=False)
    inlier_mask: np.ndarray | None = field(default=None, repr=False)
    # Geometric checks (None when not computed: e.g. depth agreement without depth on both sides).
    inlier_coverage: float | None = None
    depth_agreement: float | None = None
    median_residual_px: float | None = None

    @property
    def inlier_ratio(self) -> float:
        return self.num_inliers / self.num_matches if self.num_matches else 0.0

    def to_json_dict(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "match_id": self.match_id, "query_stamp_ns": self.query_stamp_ns,
                "match_stamp_ns": self.match_stamp_ns, "accepted": self.accepted, "reason": self.reason,
                "T_match_query": _matrix_list(self.T_match_query), "scale": self.scale, "metric": self.metric,
                "information": _matrix_list(self.information), "num_matches": self.num_matches,
                "num_inliers": self.num_inliers, "inlier_ratio": round(self.inlier_ratio, 4),
                "retrieval_score": round(self.retrieval_score, 6), "retrieval_rank": self.retrieval_rank,
                "method": self.method, "geometry_ok": self.geometry_ok,
                "drift_translation_m": self.drift_translation_m, "drift_rotation_deg": self.drift_rotation_deg,
                "path_length_m": self.path_length_m, "inlier_coverage": _rounded(self.inlier_coverage),
                "depth_agreement": _rounded(self.depth_agreement),
                "median_residual_px": _rounded(self.median_residual_px)}


@dataclass
class KeyframeResult:
    """What processing one keyframe produced: every candidate's verdict, the accepted loops, timing (ms)."""

    keyframe_id: int
    stamp_ns: int
    candidates: list[LoopClosure]
    reason: str  # "ok" or why nothing was verified (no candidates, no keypoints, ...)
    timing_ms: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> list[LoopClosure]:
        return [c for c in self.candidates if c.accepted]

    def to_json_dict(self) -> dict[str, Any]:
        return {"keyframe_id": self.keyframe_id, "stamp_ns": self.stamp_ns, "reason": self.reason,
                "candidates": [c.to_json_dict() for c in self.candidates],
                "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()}}


@dataclass
class Relocalization:
    success: bool
    reason: str
    T_map_camera: np.ndarray | None = None
    covariance: np.ndarray | None = None  # 6x6 (tx,ty,tz,rx,ry,rz), left perturbation in the map frame
    match_id: int | None = None
    num_matches: int = 0
    num_inliers: int = 0
    candidates: list[LoopClosure] = field(default_factory=list)
    timing_ms: dict[str, float] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {"success": self.success, "reason": self.reason, "T_map_camera": _matrix_list(self.T_map_camera),
                "covariance": _matrix_list(self.covariance), "match_id": self.match_id,
                "num_matches": self.num_matches, "num_inliers": self.num_inliers,
                "candidates": [c.to_json_dict() for c in self.candidates],
                "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()}}


# ------------------------------------------------------------------------------------------------ geometry


def adjoint(T: np.ndarray) -> np.ndarray:
    """6x6 adjoint of an SE(3) transform for (translation, rotation) ordered twists."""
    R, t = T[:3, :3], T[:3, 3]
    ad = np.zeros((6, 6))
    ad[:3, :3], ad[:3, 3:], ad[3:, 3:] = R, _skew(t) @ R, R
    return ad


def invert_relative_pose(pose: RelativePose) -> RelativePose:
    """T_0_1 from T_1_0 with the information carried through the inversion (left perturbations)."""
    R, t = pose.R.T, -pose.R.T @ pose.t
    inverse = np.eye(4)
    inverse[:3, :3], inverse[:3, 3] = R, t
    # delta_01 = -Ad(T_0_1) delta_10 to first order, so delta_10 = -Ad(T_0_1)^-1 delta_01.
    jacobian = -np.linalg.inv(adjoint(inverse))
    information = jacobian.T @ pose.information @ jacobian
    return RelativePose(pose.success, pose.reason, R, t, pose.inliers, information, pose.metric, pose.method)


def pose_from_points3d(points3d: np.ndarray, pixels: np.ndarray, K: np.ndarray, config: PoseConfig) -> RelativePose:
    """T_dst_src by PnP from (M, 3) points in the source camera (NaN rows = no depth) to (M, 2) pixels of the
    destination camera with intrinsics K. The per-keypoint-depth twin of ``estimate_relative_pose``'s PnP."""
    count = len(points3d)
    valid = np.isfinite(points3d).all(1) & (points3d[:, 2] >= config.min_depth) & (points3d[:, 2] <= config.max_depth)
    if valid.sum() < config.min_matches:
        return RelativePose(False, f"too few matches with valid depth: {int(valid.sum())} < {config.min_matches}",
                            inliers=np.zeros(count, bool), method="pnp")
    solution = _pnp(points3d[valid], pixels[valid], K, config)
    if solution is None:
        return RelativePose(False, "PnP RANSAC found no pose", inliers=np.zeros(count, bool), method="pnp")
    R, t, inliers_valid = solution
    inliers = np.zeros(count, bool)
    inliers[np.flatnonzero(valid)[inliers_valid]] = True
    if inliers.sum() < config.min_inliers:
        return RelativePose(False, f"too few PnP inliers: {int(inliers.sum())} < min_inliers={config.min_inliers}",
                            inliers=inliers, method="pnp")
    obj, img = points3d[inliers], pixels[inliers].astype(np.float64)
    residuals = _reprojection_residuals(R, t, obj, img, K)
    jacobian = _numeric_jacobian(lambda d: _reprojection_residuals(*_perturb(R, t, d), obj, img, K))
    return RelativePose(True, "ok", R, t, inliers, _information(jacobian, residuals, floor=0.1), metric=True,
                        method="pnp")


def backproject(keypoints: np.ndarray, depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(M, 2) pixels + (M,) depth (NaN invalid) -> (M, 3) camera points (NaN rows where invalid)."""
    x = (keypoints[:, 0] - K[0, 2]) / K[0, 0] * depth
    y = (keypoints[:, 1] - K[1, 2]) / K[1, 1] * depth
    return np.stack([x, y, depth], 1).astype(np.float64)


def verify_pair(query: Keyframe, candidate: Keyframe, matches: np.ndarray, config: PoseConfig) -> RelativePose:
    """Geometric verification of query<->candidate matches (M, 2); returns T_match_query as a RelativePose."""
    query_pixels = query.keypoints[matches[:, 0]].astype(np.float64)
    match_pixels = candidate.keypoints[matches[:, 1]].astype(np.float64)
    if len(matches) < config.min_matches:
        return RelativePose(False, f"too few matches: {len(matches)} < min_matches={config.min_matches}",
                            inliers=np.zeros(len(matches), bool))
    if candidate.has_depth:
        points = backproject(match_pixels, candidate.depth_at_keypoints[matches[:, 1]], candidate.K)
        pose = pose_from_points3d(points, query_pixels, query.K, config)  # T_query_match
        if pose.success or not query.has_depth:
            return invert_relative_pose(pose) if pose.success else pose
    if query.has_depth:
        points = backproject(query_pixels, query.depth_at_keypoints[matches[:, 0]], query.K)
        return pose_from_points3d(points, match_pixels, candidate.K, config)  # T_match_query
    return estimate_relative_pose(query_pixels, match_pixels, query.K, candidate.K, config)


def inlier_coverage(pixels: np.ndarray, image_size: tuple[int, int], grid: int) -> float:
    """Fraction of a grid x grid partition of the image (W, H) holding at least one of the (M, 2) pixels."""
    if not len(pixels):
        return 0.0
    width, height = image_size
    cols = np.clip((pixels[:, 0] / max(width, 1) * grid).astype(int), 0, grid - 1)
    rows = np.clip((pixels[:, 1] / max(height, 1) * grid).astype(int), 0, grid - 1)
    return len(np.unique(rows * grid + cols)) / float(grid * grid)


def depth_agreement(query: Keyframe, candidate: Keyframe, matches: np.ndarray, T_match_query: np.ndarray,
                    rel_tol: float, abs_tol: float, min_points: int = 10) -> float | None:
    """Fraction of inlier matches (M', 2) whose query point, moved by T_match_query, has the depth measured at the
    candidate's keypoint (|z_pred - z| <= rel_tol * z + abs_tol). None without depth on both sides."""
    if not (query.has_depth and candidate.has_depth) or not len(matches):
        return None
    z_query = query.depth_at_keypoints[matches[:, 0]].astype(np.float64)
    z_match = candidate.depth_at_keypoints[matches[:, 1]].astype(np.float64)
    valid = np.isfinite(z_query) & np.isfinite(z_match)
    if valid.sum() < min_points:
        return None
    points = backproject(query.keypoints[matches[valid, 0]].astype(np.float64), z_query[valid], query.K)
    predicted = points @ T_match_query[:3, :3].T + T_match_query[:3, 3]
    agree = np.abs(predicted[:, 2] - z_match[valid]) <= rel_tol * z_match[valid] + abs_tol
    return float(agree.mean())


def median_reprojection_residual(query: Keyframe, candidate: Keyframe, matches: np.ndarray,
                                 T_match_query: np.ndarray) -> float | None:
    """Median reprojection residual (px) of PnP inlier matches, in the image PnP was solved in (the candidate's
    3D points into the query when the candidate has depth, else the query's points into the candidate)."""
    if candidate.has_depth:
        source, destination, T = candidate, query, np.linalg.inv(T_match_query)
        src_index, dst_index = matches[:, 1], matches[:, 0]
    elif query.has_depth:
        source, destination, T = query, candidate, T_match_query
        src_index, dst_index = matches[:, 0], matches[:, 1]
    else:
        return None
    depth = source.depth_at_keypoints[src_index].astype(np.float64)
    valid = np.isfinite(depth)
    if not valid.any():
        return None
    points = backproject(source.keypoints[src_index[valid]].astype(np.float64), depth[valid], source.K)
    residuals = _reprojection_residuals(T[:3, :3], T[:3, 3], points,
                                        destination.keypoints[dst_index[valid]].astype(np.float64), destination.K)
    return float(np.median(np.linalg.norm(residuals.reshape(-1, 2), axis=1)))


def _rotation_deg(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))


# ------------------------------------------------------------------------------------------------ engine


def _numpy_descriptors(features: Features) -> np.ndarray:
    descriptors = features.descriptors.detach().cpu()
    return descriptors.numpy() if features.is_binary else descriptors.float().numpy()


class LoopClosureEngine:
    """Loop closure + relocalization over a :class:`KeyframeDatabase`, with a :class:`MatchingPipeline`.

    Online use (the ROS node): ``process_keyframe(image, K, stamp_ns, ...)`` per backend keyframe,
    ``relocalize(image, K, ...)`` when tracking is lost, ``update_poses({id: T_map_camera})`` after the backend
    optimised, ``save_map(dir)`` / ``load_map(dir)`` for persistence.
    """

    def __init__(self, pipeline, config: EngineConfig | None = None,
                 codebook: VladCodebook | BinaryVocabulary | None = None) -> None:
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        descriptor_type = pipeline.extractor.descriptor_type
        binary = descriptor_type == "orb"
        kind = self.config.global_descriptor if self.config.global_descriptor != "auto" else ("bow" if binary else "vlad")
        if kind == "bow" and not binary:
            raise ConfigError(f"global_descriptor=bow needs binary ORB descriptors; the pipeline produces "
                              f"{descriptor_type} descriptors (use global_descriptor=vlad)")
        if kind == "vlad" and binary:
            raise ConfigError("global_descriptor=vlad needs float descriptors; ORB is binary (use bow)")
        if codebook is None:
            path = (default_codebook_path(descriptor_type) if self.config.codebook == "default"
                    else Path(self.config.codebook))
            codebook = load_codebook(path)
            self.codebook_sha256 = sha256_file(path)
        else:
            self.codebook_sha256 = "in-memory"
        if codebook.kind != kind or codebook.descriptor_type != descriptor_type:
            raise CodebookError(f"codebook is {codebook.kind} for {codebook.descriptor_type} descriptors; the engine "
                                f"needs {kind} for {descriptor_type}")
        self.codebook = codebook
        self.database = KeyframeDatabase(kind, codebook.dim, self.config.retrieval)
        self._recent_verified: deque[set[int]] = deque(maxlen=max(self.config.temporal_consistency - 1, 1))
        self._next_id = 0
        # Keyframe graph for the odometry gate, by database position: neighbours[i] = [(j, T_j_i, length_m)].
        # Odometry edges join consecutive keyframes (relative backend pose at insertion); accepted metric loops
        # add edges of length 0 (pending until the query keyframe is inserted).
        self._neighbours: list[list[tuple[int, np.ndarray, float]]] = []
        self._pending_loops: dict[int, list[tuple[int, np.ndarray]]] = {}

    # -------------------------------------------------------------------- keyframes
    def describe(self, image: np.ndarray, K: np.ndarray, stamp_ns: int, keyframe_id: int | None = None,
                 T_map_camera: np.ndarray | None = None, depth: np.ndarray | None = None
                 ) -> tuple[Keyframe, Features, dict[str, float]]:
        """Extract features and the global descriptor of an image; returns (keyframe, device features, timing)."""
        K = check_intrinsics(K)
        timing: dict[str, float] = {}
        start = time.perf_counter()
        features = self.pipeline.extract(image)
        timing["extract"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        global_descriptor = self.codebook(_numpy_descriptors(features)) if len(features) else np.zeros(
            self.codebook.dim, np.float32)
        timing["global_descriptor"] = (time.perf_counter() - start) * 1e3
        if keyframe_id is None:
            keyframe_id = self._next_id
        self._next_id = max(self._next_id, int(keyframe_id) + 1)
        keyframe = Keyframe.from_features(keyframe_id, stamp_ns, features, K, global_descriptor, T_map_camera,
                                          depth if self.config.store_depth else None)
        if self.pipeline.detector_free:
            keyframe.image = cv2.cvtColor(to_rgb_uint8(image), cv2.COLOR_RGB2GRAY)
            if depth is not None and self.config.store_depth:
                keyframe.depth_image = np.asarray(depth, np.float32).astype(np.float16)
        return keyframe, features, timing

    def process_keyframe(self, image: np.ndarray, K: np.ndarray, stamp_ns: int, keyframe_id: int | None = None,
                         T_map_camera: np.ndarray | None = None, depth: np.ndarray | None = None,
                         exclude_ids: set[int] | None = None, insert: bool = True) -> KeyframeResult:
        """Detect loops for a new keyframe, then insert it. ``exclude_ids``: covisible keyframes to skip."""
        start_total = time.perf_counter()
        keyframe, features, timing = self.describe(image, K, stamp_ns, keyframe_id, T_map_camera, depth)
        result = self.detect_loops(keyframe, features, exclude_ids, timing)
        if insert:
            self.insert(keyframe)
        result.timing_ms["total"] = (time.perf_counter() - start_total) * 1e3
        return result

    def insert(self, keyframe: Keyframe) -> None:
        position = len(self.database)
        self._neighbours.append([])
        if position > 0:
            self._add_odometry_edge(position - 1, self.database.keyframes[-1], keyframe)
        for match_position, T_match_query in self._pending_loops.pop(keyframe.id, []):
            self._neighbours[position].append((match_position, T_match_query, 0.0))
            self._neighbours[match_position].append((position, np.linalg.inv(T_match_query), 0.0))
        self._pending_loops.clear()
        self.database.add(keyframe)

    def _add_odometry_edge(self, previous_position: int, previous: Keyframe, keyframe: Keyframe) -> None:
        if previous.T_map_camera is None or keyframe.T_map_camera is None:
            return
        T_prev_new = np.linalg.inv(previous.T_map_camera) @ keyframe.T_map_camera
        step = float(np.linalg.norm(T_prev_new[:3, 3]))
        new_position = previous_position + 1
        self._neighbours[previous_position].append((new_position, np.linalg.inv(T_prev_new), step))
        self._neighbours[new_position].append((previous_position, T_prev_new, step))

    def _predict_from_graph(self, keyframe: Keyframe, targets: set[int], source_position: int | None = None
                            ) -> dict[int, tuple[np.ndarray, float]]:
        """Dijkstra (edge length = metres travelled) from the query to the target database positions:
        {position: (T_position_query predicted along the shortest path, path length m)}. A new query is attached
        to the last keyframe by its odometry step; one already in the map starts at ``source_position``.
        Targets the graph cannot reach (missing poses) are absent."""
        import heapq

        if source_position is not None:
            start, T_start_query, start_distance = source_position, np.eye(4), 0.0
        else:
            if not len(self.database) or keyframe.T_map_camera is None:
                return {}
            start = len(self.database) - 1
            last = self.database.keyframes[start]
            if last.T_map_camera is None:
                return {}
            T_start_query = np.linalg.inv(last.T_map_camera) @ keyframe.T_map_camera
            start_distance = float(np.linalg.norm(T_start_query[:3, 3]))
        best: dict[int, float] = {start: start_distance}
        transforms = {start: T_start_query}
        heap = [(start_distance, start)]
        done: dict[int, tuple[np.ndarray, float]] = {}
        remaining = set(targets)
        while heap and remaining:
            distance, node = heapq.heappop(heap)
            if node in done or distance > best.get(node, np.inf):
                continue
            done[node] = (transforms[node], distance)
            remaining.discard(node)
            for neighbour, T_neighbour_node, length in self._neighbours[node]:
                candidate_distance = distance + length
                if candidate_distance < best.get(neighbour, np.inf):
                    best[neighbour] = candidate_distance
                    transforms[neighbour] = T_neighbour_node @ transforms[node]
                    heapq.heappush(heap, (candidate_distance, neighbour))
        return {position: done[position] for position in targets if position in done}

    def _odometry_gate(self, loop: LoopClosure, prediction: tuple[np.ndarray, float] | None) -> str | None:
        """Fill the loop's drift fields from the graph prediction; return a rejection reason if the loop disagrees
        with odometry (+ earlier loops) by more than the drift allowed along the shortest path."""
        if not loop.metric or prediction is None:
            return None
        T_predicted, path_length = prediction
        loop.drift_translation_m = float(np.linalg.norm(loop.T_match_query[:3, 3] - T_predicted[:3, 3]))
        loop.drift_rotation_deg = _rotation_deg(T_predicted[:3, :3].T @ loop.T_match_query[:3, :3])
        loop.path_length_m = float(path_length)
        if not self.config.odometry_gate:
            return None
        max_translation = self.config.max_drift_abs_m + self.config.max_drift_ratio * path_length
        max_rotation = self.config.max_drift_abs_deg + self.config.max_drift_deg_per_m * path_length
        if loop.drift_translation_m > max_translation or loop.drift_rotation_deg > max_rotation:
            return (f"inconsistent with odometry: moves the keyframe {loop.drift_translation_m:.2f} m / "
                    f"{loop.drift_rotation_deg:.1f} deg over a {path_length:.1f} m graph path (allowed "
                    f"{max_translation:.2f} m / {max_rotation:.1f} deg; repetitive structure?)")
        return None

    def update_poses(self, poses: dict[int, np.ndarray]) -> None:
        """Backend-optimised poses T_map_camera by keyframe id (unknown ids are ignored)."""
        for keyframe_id, T in poses.items():
            if keyframe_id in self.database._ids:
                self.database.get(keyframe_id).T_map_camera = np.asarray(T, np.float64).reshape(4, 4)

    # -------------------------------------------------------------------- verification
    def _verify(self, keyframe: Keyframe, features: Features, candidates: list[Candidate],
                timing: dict[str, float], check_odometry: bool = True, source_position: int | None = None
                ) -> list[LoopClosure]:
        stored = [self.database.keyframes[c.position] for c in candidates]
        start = time.perf_counter()
        device = self.pipeline.device
        pairs = self._match_detector_free(keyframe, stored) if self.pipeline.detector_free else [
            (keyframe, match_kf, matches) for match_kf, matches in
            zip(stored, self.pipeline.match(features, [k.to_features(device) for k in stored]))]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timing["match"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        predictions = (self._predict_from_graph(keyframe, {c.position for c in candidates}, source_position)
                       if check_odometry else {})
        results = []
        for rank, (candidate, (query_kf, match_kf, matches)) in enumerate(zip(candidates, pairs)):
            pose = verify_pair(query_kf, match_kf, matches.matches, self.pipeline.config.pose)
            loop = LoopClosure(keyframe.id, match_kf.id, keyframe.stamp_ns, match_kf.stamp_ns, False, pose.reason,
                               pose.T_1_0, 1.0, pose.metric, pose.information, len(matches.matches),
                               pose.num_inliers, candidate.score, rank, pose.method, pose.success)
            if pose.success:
                index = matches.matches
                loop.points_query, loop.points_match = query_kf.keypoints[index[:, 0]], match_kf.keypoints[index[:, 1]]
                loop.match_scores = np.asarray(matches.scores, np.float32)
                loop.inlier_mask = np.asarray(pose.inliers, bool)
                loop.reason = (self._check_geometry(query_kf, match_kf, matches.matches[pose.inliers], loop)
                               or (self._odometry_gate(loop, predictions.get(candidate.position))
                                   if check_odometry else None)
                               or "ok")
                loop.accepted = loop.reason == "ok"
            else:
                loop.reason = f"geometric verification failed: {pose.reason}"
            results.append(loop)
        timing["verify"] = (time.perf_counter() - start) * 1e3
        return results

    def _match_detector_free(self, keyframe: Keyframe, stored: list[Keyframe]
                             ) -> list[tuple[Keyframe, Keyframe, PairMatches]]:
        """Match the keyframe's pixels against each candidate's; every pair becomes two keyframe views whose
        keypoints are that pair's matches (identity indices), so verification and checks run unchanged."""
        missing = [k.id for k in [keyframe, *stored] if k.image is None]
        if missing:
            raise MapFormatError(f"keyframes {missing[:5]} have no stored image; matcher="
                                 f"{self.pipeline.config.matcher.name} needs a map built by a detector-free preset")
        out = []
        for match_kf, dense in zip(stored, self.pipeline.match_images(keyframe.image, [k.image for k in stored])):
            identity = np.repeat(np.arange(len(dense), dtype=np.int64)[:, None], 2, axis=1)
            out.append((keyframe.at_points(dense.keypoints0), match_kf.at_points(dense.keypoints1),
                        PairMatches(identity, dense.scores)))
        return out

    def verify_candidates(self, query_id: int, candidate_ids: list[int]) -> KeyframeResult:
        """Verify candidates named from outside (a backend's covisibility search, another place recogniser)
        against a keyframe already in the map: no retrieval, no exclusion window, no temporal consistency;
        the same acceptance thresholds and odometry gate as ``process_keyframe``. KeyError: unknown id."""
        start_total = time.perf_counter()
        keyframe = self.database.get(query_id)
        candidates = [Candidate(self.database.position_of(i), i, 0.0) for i in candidate_ids]
        timing: dict[str, float] = {}
        loops = []
        if candidates:
            loops = self._verify(keyframe, keyframe.to_features(self.pipeline.device), candidates, timing,
                                 source_position=self.database.position_of(query_id))
        timing["total"] = (time.perf_counter() - start_total) * 1e3
        return KeyframeResult(keyframe.id, keyframe.stamp_ns, loops, "ok" if loops else "no candidates", timing)

    def _check_geometry(self, query: Keyframe, candidate: Keyframe, inlier_matches: np.ndarray,
                        loop: LoopClosure) -> str | None:
        """Acceptance checks on a geometrically verified pair; fills the loop's diagnostics, returns a reason."""
        config = self.config
        loop.inlier_coverage = min(
            inlier_coverage(query.keypoints[inlier_matches[:, 0]], query.image_size, config.coverage_grid),
            inlier_coverage(candidate.keypoints[inlier_matches[:, 1]], candidate.image_size, config.coverage_grid))
        if loop.method == "pnp":
            loop.depth_agreement = depth_agreement(query, candidate, inlier_matches, loop.T_match_query,
                                                   config.depth_tolerance_rel, config.depth_tolerance_abs_m)
            loop.median_residual_px = median_reprojection_residual(query, candidate, inlier_matches,
                                                                   loop.T_match_query)
        if loop.num_inliers < config.min_inliers:
            return f"too few inliers: {loop.num_inliers} < min_inliers={config.min_inliers}"
        if loop.inlier_ratio < config.min_inlier_ratio:
            return f"inlier ratio {loop.inlier_ratio:.2f} < min_inlier_ratio={config.min_inlier_ratio}"
        if loop.inlier_coverage < config.min_inlier_coverage:
            return (f"inliers clustered: cover {loop.inlier_coverage:.2f} of the {config.coverage_grid}x"
                    f"{config.coverage_grid} grid < min_inlier_coverage={config.min_inlier_coverage}")
        residual_limit = config.max_median_residual_ratio * self.pipeline.config.pose.pnp_threshold_px
        if loop.median_residual_px is not None and loop.median_residual_px > residual_limit:
            return (f"reprojection residuals too large: median {loop.median_residual_px:.2f} px > "
                    f"{residual_limit:.2f} px (max_median_residual_ratio x pnp_threshold_px)")
        if loop.depth_agreement is not None and loop.depth_agreement < config.min_depth_agreement:
            return (f"depth inconsistent: {loop.depth_agreement:.2f} of the inliers have the predicted depth < "
                    f"min_depth_agreement={config.min_depth_agreement}")
        return None

    def detect_loops(self, keyframe: Keyframe, features: Features, exclude_ids: set[int] | None = None,
                     timing: dict[str, float] | None = None) -> KeyframeResult:
        timing = timing if timing is not None else {}
        start = time.perf_counter()
        candidates = self.database.query(keyframe.global_descriptor, keyframe.stamp_ns, exclude_ids=exclude_ids)
        timing["retrieve"] = (time.perf_counter() - start) * 1e3
        if len(keyframe) == 0:
            self._remember(set())
            return KeyframeResult(keyframe.id, keyframe.stamp_ns, [], "no keypoints in the keyframe", timing)
        if not candidates:
            self._remember(set())
            reason = "database empty" if not len(self.database) else "no eligible candidates outside the exclusion window"
            return KeyframeResult(keyframe.id, keyframe.stamp_ns, [], reason, timing)
        loops = self._verify(keyframe, features, candidates, timing)
        self._reject_ambiguous(loops)
        self._apply_temporal_consistency(loops)
        accepted = sorted((c for c in loops if c.accepted), key=lambda c: -c.num_inliers)
        for extra in accepted[self.config.max_loops_per_keyframe:]:
            extra.accepted = False
            extra.reason = f"another candidate of this keyframe has more inliers (max_loops_per_keyframe=" \
                           f"{self.config.max_loops_per_keyframe})"
        self._pending_loops[keyframe.id] = [(self.database.position_of(c.match_id), c.T_match_query)
                                            for c in accepted[:self.config.max_loops_per_keyframe] if c.metric]
        return KeyframeResult(keyframe.id, keyframe.stamp_ns, loops, "ok", timing)

    def _same_place(self, a: LoopClosure, b: LoopClosure) -> bool:
        """Two verified candidates agree on where the query is: their keyframes are neighbours in the database, or
        both loops are metric and each passed the odometry gate (so both agree with the same odometry)."""
        if abs(self.database.position_of(a.match_id) - self.database.position_of(b.match_id)) <= \
                self.config.consistency_window:
            return True
        gated = self.config.odometry_gate and all(c.metric and c.drift_translation_m is not None for c in (a, b))
        return gated

    def _reject_ambiguous(self, loops: list[LoopClosure]) -> None:
        """Reject every candidate when a runner-up at another place verifies nearly as well (ambiguity_ratio)."""
        verified = sorted((c for c in loops if c.accepted), key=lambda c: -c.num_inliers)
        if len(verified) < 2 or self.config.ambiguity_ratio >= 1.0:
            return
        best = verified[0]
        rival = next((c for c in verified[1:] if c.num_inliers >= self.config.ambiguity_ratio * best.num_inliers
                      and not self._same_place(best, c)), None)
        if rival is None:
            return
        for loop in verified:
            loop.accepted = False
            loop.reason = (f"ambiguous: keyframes {best.match_id} ({best.num_inliers} inliers) and {rival.match_id} "
                           f"({rival.num_inliers}) at different places both verify (ambiguity_ratio="
                           f"{self.config.ambiguity_ratio})")

    def _apply_temporal_consistency(self, loops: list[LoopClosure]) -> None:
        """ORB-SLAM-style covisibility consistency, on keyframe order: a candidate is accepted once each of the
        previous N-1 queries verified a keyframe within ``consistency_window`` positions of it."""
        verified = {self.database.position_of(c.match_id) for c in loops if c.accepted}
        needed = self.config.temporal_consistency - 1
        if needed > 0:
            window = self.config.consistency_window
            history = list(self._recent_verified)[-needed:]
            for loop in loops:
                if not loop.accepted:
                    continue
                position = self.database.position_of(loop.match_id)
                confirmed = sum(any(abs(position - p) <= window for p in previous) for previous in history)
                if len(history) < needed or confirmed < needed:
                    loop.accepted = False
                    loop.reason = (f"awaiting temporal consistency: confirmed by {confirmed} of the previous "
                                   f"{needed} keyframes (temporal_consistency={self.config.temporal_consistency})")
        self._remember(verified)

    def _remember(self, verified_positions: set[int]) -> None:
        self._recent_verified.append(verified_positions)

    # -------------------------------------------------------------------- relocalization
    def relocalize(self, image: np.ndarray, K: np.ndarray, depth: np.ndarray | None = None,
                   stamp_ns: int = 0, exclude_ids: set[int] | None = None) -> Relocalization:
        """Pose of an image in the map frame from the best verified keyframe (most inliers), metric only."""
        start_total = time.perf_counter()
        keyframe, features, timing = self.describe(image, K, stamp_ns, -1, None, depth)
        start = time.perf_counter()
        candidates = self.database.query(keyframe.global_descriptor, exclude_ids=exclude_ids, exclude_recent=False)
        candidates = [c for c in candidates if self.database.keyframes[c.position].T_map_camera is not None]
        timing["retrieve"] = (time.perf_counter() - start) * 1e3
        if len(keyframe) == 0:
            return Relocalization(False, "no keypoints in the image", timing_ms=timing)
        if not candidates:
            return Relocalization(False, "no keyframe with a pose in the map" if len(self.database)
                                  else "map is empty", timing_ms=timing)
        loops = self._verify(keyframe, features, candidates, timing, check_odometry=False)
        timing["total"] = (time.perf_counter() - start_total) * 1e3
        for loop in loops:
            if loop.accepted and not loop.metric:
                loop.accepted = False
                loop.reason = "no depth in the image or the keyframe: translation scale unknown (monocular)"
        accepted = sorted((c for c in loops if c.accepted), key=lambda c: -c.num_inliers)
        if len(accepted) > 1:  # ambiguity: a runner-up verifying nearly as well puts the query somewhere else
            T_best = self.database.get(accepted[0].match_id).T_map_camera @ accepted[0].T_match_query
            for rival in accepted[1:]:
                if rival.num_inliers < self.config.ambiguity_ratio * accepted[0].num_inliers:
                    break
                T_rival = self.database.get(rival.match_id).T_map_camera @ rival.T_match_query
                if (np.linalg.norm(T_rival[:3, 3] - T_best[:3, 3]) > self.config.max_drift_abs_m
                        or _rotation_deg(T_rival[:3, :3].T @ T_best[:3, :3]) > self.config.max_drift_abs_deg):
                    for loop in accepted:
                        loop.accepted = False
                        loop.reason = (f"ambiguous: keyframes {accepted[0].match_id} and {rival.match_id} put the "
                                       f"image at different map poses with similar support")
                    accepted = []
                    break
        if not accepted:
            reasons = "; ".join(f"kf {c.match_id}: {c.reason}" for c in loops)
            return Relocalization(False, f"no candidate verified ({reasons})", candidates=loops, timing_ms=timing)
        best = accepted[0]
        T_map_match = self.database.get(best.match_id).T_map_camera
        T_map_query = T_map_match @ best.T_match_query
        covariance_match = _safe_inverse(best.information)
        ad = adjoint(T_map_match)
        covariance = ad @ covariance_match @ ad.T
        return Relocalization(True, "ok", T_map_query, 0.5 * (covariance + covariance.T), best.match_id,
                              best.num_matches, best.num_inliers, loops, timing)

    # -------------------------------------------------------------------- persistence
    def map_metadata(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return vars(self.pipeline.config.features).copy(), {"codebook": str(self.config.codebook),
                                                            "codebook_sha256": self.codebook_sha256}

    def save_map(self, directory: Path | str) -> Path:
        from feature_matching_ros.retrieval.persistence import save_map

        feature_config, global_info = self.map_metadata()
        return save_map(self.database, directory, feature_config, global_info)

    def load_map(self, directory: Path | str) -> dict[str, Any]:
        """Replace the database with a saved map; refuses maps of other features or another codebook."""
        from feature_matching_ros.retrieval.persistence import MapFormatError, load_map

        feature_config, global_info = self.map_metadata()
        database, manifest = load_map(directory, feature_config, self.config.retrieval)
        stored = manifest["global_descriptor"]
        if stored.get("kind") != self.database.kind or stored.get("codebook_sha256") != self.codebook_sha256:
            raise MapFormatError(f"map {directory} was indexed with {stored.get('kind')} codebook sha256 "
                                 f"{stored.get('codebook_sha256')}; the engine uses {self.database.kind} "
                                 f"{self.codebook_sha256} (global descriptors would not be comparable)")
        if self.pipeline.detector_free and any(k.image is None for k in database.keyframes):
            raise MapFormatError(f"map {directory} stores no keyframe images; matcher="
                                 f"{self.pipeline.config.matcher.name} needs a map built by a detector-free preset")
        self.database = database
        # Rebuild the odometry graph in database order (loop edges are not persisted: the backend owns them).
        self._neighbours = [[] for _ in database.keyframes]
        self._pending_loops = {}
        for position in range(1, len(database.keyframes)):
            self._add_odometry_edge(position - 1, database.keyframes[position - 1], database.keyframes[position])
        self._next_id = max((k.id for k in database.keyframes), default=-1) + 1
        return manifest


def _safe_inverse(information: np.ndarray) -> np.ndarray:
    """Covariance from information; unobservable directions get a huge variance instead of inf."""
    eigenvalues, vectors = np.linalg.eigh(0.5 * (information + information.T))
    inverse = np.where(eigenvalues > 1e-9 * max(eigenvalues.max(), 1e-12), 1.0 / np.maximum(eigenvalues, 1e-300), 1e6)
    return (vectors * inverse) @ vectors.T


def build_engine(preset: str, override: dict[str, Any] | None = None, device: str | None = None
                 ) -> LoopClosureEngine:
    """Engine + pipeline from a preset name (presets.py), e.g. ``build_engine("orb_lightglue")``."""
    from feature_matching_ros.pipeline import MatchingPipeline
    from feature_matching_ros.presets import build_configs, merge

    if device is not None:
        override = merge(override or {}, {"pipeline": {"device": device}})
    pipeline_config, engine_config = build_configs(preset, override)
    return LoopClosureEngine(MatchingPipeline(pipeline_config), engine_config)
