"""The loop-closure and relocalization engine: keyframes in, LoopClosure / Relocalization records out.

Per keyframe: extract -> global descriptor -> top-k retrieval (recent keyframes excluded) -> ONE batched
``MatchingPipeline.match`` of the query against the k candidates -> geometric verification per candidate
-> acceptance (inlier count, inlier ratio, optional temporal consistency) -> the keyframe is inserted.

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

Precision first: a false loop closure corrupts the map, so every candidate gets a reason when rejected
and the defaults (presets.py) are tuned to zero false positives on the generated sequences.
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

import numpy as np
import torch

from feature_matching_ros.config import ConfigError, PoseConfig, _check_choice, _check_range
from feature_matching_ros.features.base import Features
from feature_matching_ros.geometry.pose import (RelativePose, _information, _numeric_jacobian, _perturb, _pnp,
                                                _reprojection_residuals, _skew, check_intrinsics,
                                                estimate_relative_pose)
from feature_matching_ros.retrieval.database import Candidate, Keyframe, KeyframeDatabase, RetrievalConfig
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
    temporal_consistency: int = 1  # accept only when N consecutive queries verify the same place (1 = off)
    consistency_window: int = 5  # "same place": verified candidates within this many keyframes of each other
    max_loops_per_keyframe: int = 1  # accepted loops reported per query (best inlier counts first)
    store_depth: bool = True  # keep depth at keypoints for PnP when a depth image is given
    # Odometry-consistency gate (needs backend poses on both keyframes and a metric loop): the loop may move the
    # query by at most abs + ratio * path length travelled since the match. Repetitive textures (tiled walls,
    # identical posters) pass geometric verification with a pose one period away; real drift is a few %.
    odometry_gate: bool = True
    max_drift_abs_m: float = 0.3
    max_drift_ratio: float = 0.05
    max_drift_abs_deg: float = 10.0
    max_drift_deg_per_m: float = 2.0

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
        _check_range("max_drift_abs_m", self.max_drift_abs_m, 0.0, 1e6)
        _check_range("max_drift_ratio", self.max_drift_ratio, 0.0, 100.0)
        _check_range("max_drift_abs_deg", self.max_drift_abs_deg, 0.0, 180.0)
        _check_range("max_drift_deg_per_m", self.max_drift_deg_per_m, 0.0, 180.0)
        self.min_inliers, self.temporal_consistency = int(self.min_inliers), int(self.temporal_consistency)
        self.consistency_window, self.max_loops_per_keyframe = int(self.consistency_window), int(
            self.max_loops_per_keyframe)

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
                "path_length_m": self.path_length_m}


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
        self._path_length: list[float] = []  # cumulative backend path length at each database position (m)

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
        self._path_length.append(self._path_length_to(keyframe))
        self.database.add(keyframe)

    def _path_length_to(self, keyframe: Keyframe) -> float:
        """Cumulative backend path length at ``keyframe`` if it were appended now (0 without poses)."""
        if not self._path_length:
            return 0.0
        last = self.database.keyframes[-1]
        step = 0.0
        if last.T_map_camera is not None and keyframe.T_map_camera is not None:
            step = float(np.linalg.norm(keyframe.T_map_camera[:3, 3] - last.T_map_camera[:3, 3]))
        return self._path_length[-1] + step

    def _path_length_to_position(self, position: int) -> float:
        if position == 0:
            return 0.0
        a, b = self.database.keyframes[position - 1], self.database.keyframes[position]
        step = 0.0
        if a.T_map_camera is not None and b.T_map_camera is not None:
            step = float(np.linalg.norm(b.T_map_camera[:3, 3] - a.T_map_camera[:3, 3]))
        return self._path_length[position - 1] + step

    def _odometry_gate(self, keyframe: Keyframe, loop: LoopClosure) -> str | None:
        """Fill the loop's drift fields; return a rejection reason if it disagrees too much with odometry."""
        match = self.database.get(loop.match_id)
        if not loop.metric or keyframe.T_map_camera is None or match.T_map_camera is None:
            return None
        predicted = match.T_map_camera @ loop.T_match_query
        discrepancy = np.linalg.inv(keyframe.T_map_camera) @ predicted
        loop.drift_translation_m = float(np.linalg.norm(predicted[:3, 3] - keyframe.T_map_camera[:3, 3]))
        loop.drift_rotation_deg = float(np.degrees(np.arccos(np.clip((np.trace(discrepancy[:3, :3]) - 1) / 2, -1, 1))))
        loop.path_length_m = self._path_length_to(keyframe) - self._path_length[self.database.position_of(match.id)]
        if not self.config.odometry_gate:
            return None
        max_translation = self.config.max_drift_abs_m + self.config.max_drift_ratio * loop.path_length_m
        max_rotation = self.config.max_drift_abs_deg + self.config.max_drift_deg_per_m * loop.path_length_m
        if loop.drift_translation_m > max_translation or loop.drift_rotation_deg > max_rotation:
            return (f"inconsistent with odometry: moves the keyframe {loop.drift_translation_m:.2f} m / "
                    f"{loop.drift_rotation_deg:.1f} deg after {loop.path_length_m:.1f} m of travel (allowed "
                    f"{max_translation:.2f} m / {max_rotation:.1f} deg; repetitive structure?)")
        return None

    def update_poses(self, poses: dict[int, np.ndarray]) -> None:
        """Backend-optimised poses T_map_camera by keyframe id (unknown ids are ignored)."""
        for keyframe_id, T in poses.items():
            if keyframe_id in self.database._ids:
                self.database.get(keyframe_id).T_map_camera = np.asarray(T, np.float64).reshape(4, 4)

    # -------------------------------------------------------------------- verification
    def _verify(self, keyframe: Keyframe, features: Features, candidates: list[Candidate],
                timing: dict[str, float], check_odometry: bool = True) -> list[LoopClosure]:
        stored = [self.database.keyframes[c.position] for c in candidates]
        start = time.perf_counter()
        device = self.pipeline.device
        all_matches = self.pipeline.match(features, [k.to_features(device) for k in stored])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timing["match"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        results = []
        for rank, (candidate, match_kf, matches) in enumerate(zip(candidates, stored, all_matches)):
            pose = verify_pair(keyframe, match_kf, matches.matches, self.pipeline.config.pose)
            loop = LoopClosure(keyframe.id, match_kf.id, keyframe.stamp_ns, match_kf.stamp_ns, False, pose.reason,
                               pose.T_1_0, 1.0, pose.metric, pose.information, len(matches.matches),
                               pose.num_inliers, candidate.score, rank, pose.method, pose.success)
            if pose.success:
                pairs = matches.matches
                loop.points_query, loop.points_match = keyframe.keypoints[pairs[:, 0]], match_kf.keypoints[pairs[:, 1]]
                loop.match_scores = np.asarray(matches.scores, np.float32)
                loop.inlier_mask = np.asarray(pose.inliers, bool)
                if loop.num_inliers < self.config.min_inliers:
                    loop.reason = f"too few inliers: {loop.num_inliers} < min_inliers={self.config.min_inliers}"
                elif loop.inlier_ratio < self.config.min_inlier_ratio:
                    loop.reason = (f"inlier ratio {loop.inlier_ratio:.2f} < min_inlier_ratio="
                                   f"{self.config.min_inlier_ratio}")
                elif check_odometry and (gate := self._odometry_gate(keyframe, loop)):
                    loop.reason = gate
                else:
                    loop.accepted, loop.reason = True, "ok"
            else:
                loop.reason = f"geometric verification failed: {pose.reason}"
            results.append(loop)
        timing["verify"] = (time.perf_counter() - start) * 1e3
        return results

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
            loops = self._verify(keyframe, keyframe.to_features(self.pipeline.device), candidates, timing)
        timing["total"] = (time.perf_counter() - start_total) * 1e3
        return KeyframeResult(keyframe.id, keyframe.stamp_ns, loops, "ok" if loops else "no candidates", timing)

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
        self._apply_temporal_consistency(loops)
        accepted = sorted((c for c in loops if c.accepted), key=lambda c: -c.num_inliers)
        for extra in accepted[self.config.max_loops_per_keyframe:]:
            extra.accepted = False
            extra.reason = f"another candidate of this keyframe has more inliers (max_loops_per_keyframe=" \
                           f"{self.config.max_loops_per_keyframe})"
        return KeyframeResult(keyframe.id, keyframe.stamp_ns, loops, "ok", timing)

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
        self.database = database
        self._path_length = []
        for keyframe in database.keyframes:  # rebuild the path bookkeeping in database order
            self._path_length.append(self._path_length_to_position(len(self._path_length)))
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
