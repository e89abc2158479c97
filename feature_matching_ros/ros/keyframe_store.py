"""The relocalization node's keyframe store and candidate verification (no rclpy; testable anywhere).

This is the interim back end of the node until the loop-closure engine (``feature_matching_ros.relocalizer``)
is plugged in: it keeps the keyframes it receives (bounded, by id, oldest evicted), verifies loop candidates
it is told about with ONE batched matcher call per query, and relocalizes an image against stored keyframes.
Records use the engine's field names (query_id, match_id, T_match_query, metric, information, ...), so the
node does not change when the engine replaces this module.

Geometry (query = image 0, keyframe = image 1): ``estimate_relative_pose`` gives T_1_0 = T_match_query,
metric via PnP when either side has depth, else rotation + unit translation (``metric=False``).
Relocalization: T_map_query = T_map_kf @ T_kf_query; covariance = Ad(T_map_kf) inv(information) Ad^T plus
the keyframe pose's own covariance (first order, left perturbations in the map frame).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feature_matching_ros.features.base import Features
from feature_matching_ros.geometry.pose import RelativePose, check_intrinsics, estimate_relative_pose

MAP_FORMAT_VERSION = 1


@dataclass
class StoredKeyframe:
    """One keyframe: image as received (RGB or gray), K, optional depth (metres), optional map pose."""

    id: int
    stamp_ns: int
    frame_id: str  # camera frame (image header)
    map_frame: str
    image: np.ndarray
    K: np.ndarray
    depth: np.ndarray | None = None
    T_map_camera: np.ndarray | None = None  # 4x4
    pose_covariance: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))
    features: Features | None = None


@dataclass
class VerifiedPair:
    """A verified (or rejected) pair: query (image 0) against a stored keyframe (image 1)."""

    query_id: int
    match_id: int
    query_stamp_ns: int
    match_stamp_ns: int
    accepted: bool
    reason: str
    T_match_query: np.ndarray = field(default_factory=lambda: np.eye(4))
    scale: float = 1.0
    metric: bool = False
    information: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))
    num_matches: int = 0
    num_inliers: int = 0
    retrieval_score: float = 0.0
    points_query: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # (M, 2) pixels
    points_match: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    inliers: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


@dataclass
class RelocalizationResult:
    success: bool
    reason: str
    T_map_camera: np.ndarray | None = None
    covariance: np.ndarray | None = None  # 6x6, (x, y, z, rx, ry, rz), map frame
    map_frame: str = ""
    best: VerifiedPair | None = None  # the pair the pose came from, or the best-matched pair on failure
    timing_ms: dict[str, float] = field(default_factory=dict)


class KeyframeStore:
    """Keyframes by id, at most ``capacity`` (the oldest inserted is evicted first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._keyframes: OrderedDict[int, StoredKeyframe] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keyframes)

    def __contains__(self, keyframe_id: int) -> bool:
        return keyframe_id in self._keyframes

    def get(self, keyframe_id: int) -> StoredKeyframe | None:
        return self._keyframes.get(keyframe_id)

    def ids(self) -> list[int]:
        return list(self._keyframes)

    def newest(self, count: int) -> list[StoredKeyframe]:
        return list(self._keyframes.values())[-count:][::-1]

    def insert(self, keyframe: StoredKeyframe) -> int:
        """Insert or replace; returns how many keyframes were evicted."""
        self._keyframes.pop(keyframe.id, None)
        self._keyframes[keyframe.id] = keyframe
        evicted = 0
        while len(self._keyframes) > self.capacity:
            self._keyframes.popitem(last=False)
            evicted += 1
        return evicted

    def save(self, path: Path | str) -> Path:
        """Write images, depth, K, poses and ids to one compressed .npz (no pickle); features are recomputed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"format_version": np.array(MAP_FORMAT_VERSION),
                                         "ids": np.array(self.ids(), dtype=np.uint64)}
        for index, keyframe in enumerate(self._keyframes.values()):
            prefix = f"kf{index}_"
            arrays[prefix + "image"] = np.ascontiguousarray(keyframe.image)
            arrays[prefix + "K"] = keyframe.K
            arrays[prefix + "meta"] = np.array([keyframe.stamp_ns], dtype=np.int64)
            arrays[prefix + "frames"] = np.array([keyframe.frame_id, keyframe.map_frame])
            arrays[prefix + "pose_covariance"] = keyframe.pose_covariance
            if keyframe.depth is not None:
                arrays[prefix + "depth"] = keyframe.depth
            if keyframe.T_map_camera is not None:
                arrays[prefix + "T_map_camera"] = keyframe.T_map_camera
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        return path

    @staticmethod
    def load(path: Path | str, capacity: int) -> list[StoredKeyframe]:
        """Read keyframes saved by :meth:`save` (without features). Raises ValueError on a bad file."""
        with np.load(Path(path), allow_pickle=False) as data:
            version = int(data["format_version"]) if "format_version" in data else -1
            if version != MAP_FORMAT_VERSION:
                raise ValueError(f"{path} is not a keyframe map of format {MAP_FORMAT_VERSION} (found {version})")
            keyframes = []
            for index, keyframe_id in enumerate(data["ids"].tolist()):
                prefix = f"kf{index}_"
                frames = data[prefix + "frames"].tolist()
                keyframes.append(StoredKeyframe(
                    int(keyframe_id), int(data[prefix + "meta"][0]), str(frames[0]), str(frames[1]),
                    data[prefix + "image"], check_intrinsics(data[prefix + "K"]),
                    data[prefix + "depth"] if prefix + "depth" in data else None,
                    data[prefix + "T_map_camera"] if prefix + "T_map_camera" in data else None,
                    data[prefix + "pose_covariance"]))
        if len(keyframes) > capacity:
            keyframes = keyframes[-capacity:]
        return keyframes


def verify_candidates(pipeline, query: StoredKeyframe, candidates: list[StoredKeyframe], batch_size: int,
                      timing: dict[str, float] | None = None) -> list[VerifiedPair]:
    """Match ``query`` against each candidate (batched) and estimate T_match_query for each."""
    timing = timing if timing is not None else {}
    results: list[VerifiedPair] = []
    start = time.perf_counter()
    all_matches = []
    for first in range(0, len(candidates), batch_size):
        chunk = candidates[first:first + batch_size]
        all_matches += pipeline.match(query.features, [c.features for c in chunk])
    timing["match"] = timing.get("match", 0.0) + (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    query_points = query.features.keypoints_numpy()
    for candidate, matches in zip(candidates, all_matches):
        points_query = query_points[matches.matches[:, 0]]
        points_match = candidate.features.keypoints_numpy()[matches.matches[:, 1]]
        pose = estimate_relative_pose(points_query, points_match, query.K, candidate.K, pipeline.config.pose,
                                      depth0=query.depth, depth1=candidate.depth)
        results.append(_pair_from_pose(query, candidate, pose, points_query, points_match, matches.scores))
    timing["pose"] = timing.get("pose", 0.0) + (time.perf_counter() - start) * 1e3
    return results


def _pair_from_pose(query: StoredKeyframe, candidate: StoredKeyframe, pose: RelativePose, points_query: np.ndarray,
                    points_match: np.ndarray, scores: np.ndarray) -> VerifiedPair:
    inliers = pose.inliers if len(pose.inliers) == len(points_query) else np.zeros(len(points_query), bool)
    return VerifiedPair(query.id, candidate.id, query.stamp_ns, candidate.stamp_ns, pose.success, pose.reason,
                        pose.T_1_0, 1.0, pose.metric, pose.information, len(points_query), int(inliers.sum()),
                        0.0, points_query.astype(np.float32), points_match.astype(np.float32),
                        np.asarray(scores, np.float32), inliers)


def adjoint(T: np.ndarray) -> np.ndarray:
    """6x6 adjoint of an SE(3) transform for (translation, rotation) ordered twists."""
    R, t = T[:3, :3], T[:3, 3]
    skew = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    result = np.zeros((6, 6))
    result[:3, :3], result[:3, 3:], result[3:, 3:] = R, skew @ R, R
    return result


def covariance_from_information(information: np.ndarray, unobservable_variance: float = 1e6) -> np.ndarray:
    """Pseudo-inverse that gives unobservable directions a huge variance instead of infinity."""
    eigenvalues, vectors = np.linalg.eigh(0.5 * (information + information.T))
    floor = 1e-9 * max(float(eigenvalues.max()), 1e-12)
    inverse = np.where(eigenvalues > floor, 1.0 / np.maximum(eigenvalues, 1e-300), unobservable_variance)
    return (vectors * inverse) @ vectors.T


def relocalize(pipeline, query: StoredKeyframe, store: KeyframeStore, max_keyframes: int, top_k: int,
               batch_size: int) -> RelocalizationResult:
    """Pose of ``query`` (features extracted) in the map from the stored keyframe with the most inliers."""
    timing: dict[str, float] = {}
    posed = [k for k in store.newest(len(store)) if k.T_map_camera is not None and k.features is not None]
    if not len(store):
        return RelocalizationResult(False, "no keyframes received yet", timing_ms=timing)
    if not posed:
        return RelocalizationResult(False, "no stored keyframe has a pose", timing_ms=timing)
    if len(query.features) == 0:
        return RelocalizationResult(False, "no keypoints in the image", timing_ms=timing)
    posed = posed[:max_keyframes]
    start = time.perf_counter()
    counts = []
    all_matches = []
    for first in range(0, len(posed), batch_size):
        all_matches += pipeline.match(query.features, [k.features for k in posed[first:first + batch_size]])
    counts = [len(m) for m in all_matches]
    timing["match"] = (time.perf_counter() - start) * 1e3
    ranked = np.argsort(counts, kind="stable")[::-1][:top_k]
    start = time.perf_counter()
    pairs: list[VerifiedPair] = []
    query_points = query.features.keypoints_numpy()
    for index in ranked:
        keyframe, matches = posed[index], all_matches[index]
        points_query = query_points[matches.matches[:, 0]]
        points_match = keyframe.features.keypoints_numpy()[matches.matches[:, 1]]
        pose = estimate_relative_pose(points_query, points_match, query.K, keyframe.K, pipeline.config.pose,
                                      depth0=query.depth, depth1=keyframe.depth)
        pair = _pair_from_pose(query, keyframe, pose, points_query, points_match, matches.scores)
        if pair.accepted and not pair.metric:
            pair.accepted = False
            pair.reason = ("scale unknown: neither the image nor the keyframe has depth (monocular relative pose "
                           "has a unit translation)")
        pairs.append(pair)
    timing["pose"] = (time.perf_counter() - start) * 1e3
    accepted = sorted((p for p in pairs if p.accepted), key=lambda p: -p.num_inliers)
    if not accepted:
        best = max(pairs, key=lambda p: p.num_inliers)
        reasons = "; ".join(f"keyframe {p.match_id}: {p.reason}" for p in pairs)
        return RelocalizationResult(False, f"no keyframe verified ({reasons})", best=best, timing_ms=timing)
    best = accepted[0]
    keyframe = store.get(best.match_id)
    T_map_query = keyframe.T_map_camera @ best.T_match_query
    ad = adjoint(keyframe.T_map_camera)
    covariance = ad @ covariance_from_information(best.information) @ ad.T + keyframe.pose_covariance
    return RelocalizationResult(True, "ok", T_map_query, 0.5 * (covariance + covariance.T), keyframe.map_frame,
                                best, timing)
