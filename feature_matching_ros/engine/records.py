"""What the engine reports: one LoopClosure per verified candidate, a KeyframeResult per keyframe, a
Relocalization per query image. Plain dataclasses with numpy arrays, serialisable with ``to_json_dict``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _matrix_list(matrix: np.ndarray | None) -> list | None:
    return None if matrix is None else np.asarray(matrix, float).round(9).tolist()


@dataclass
class LoopClosure:
    """One verified (or rejected) candidate. T_match_query maps query-camera points into the match camera.

    Monocular Sim3 loops (``method="sim3"``: both keyframes had backend map points) relate the two keyframes'
    backend frames by X_match = scale * R * X_query + t with (R, t) = T_match_query: t is the query camera's
    centre in the match camera, in the MATCH keyframe's backend units, and ``scale`` converts lengths of the
    query's map into the match's. ``metric`` is False (backend units), ``information`` is the 6x6 of the rigid
    part with the scale marginalised, ``information_sim3`` the full 7x7 over (tx, ty, tz, rx, ry, rz, log scale),
    left perturbation S <- exp(delta) S (geometry/sim3.py). Metric loops have scale 1; essential-matrix loops
    have scale 1, a unit translation and information exactly zero along it.
    """

    query_id: int
    match_id: int
    query_stamp_ns: int
    match_stamp_ns: int
    accepted: bool
    reason: str
    T_match_query: np.ndarray = field(default_factory=lambda: np.eye(4))
    scale: float = 1.0  # Sim3 scale (query units -> match units); 1.0 for metric and essential-matrix loops
    metric: bool = False
    information: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))  # (tx,ty,tz,rx,ry,rz), left
    num_matches: int = 0
    num_inliers: int = 0
    retrieval_score: float = 0.0
    retrieval_rank: int = 0
    method: str = "none"  # pnp | sim3 | essential | none
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
    scene_agreement: float | None = None
    information_sim3: np.ndarray | None = None  # (7, 7) for method == "sim3", else None

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
                "median_residual_px": _rounded(self.median_residual_px),
                "scene_agreement": _rounded(self.scene_agreement),
                "information_sim3": _matrix_list(self.information_sim3)}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "LoopClosure":
        """The loop as ``to_json_dict`` wrote it (reports, keyframes_<preset>.jsonl); matches are not stored."""
        known = {"query_id", "match_id", "query_stamp_ns", "match_stamp_ns", "accepted", "reason", "scale", "metric",
                 "num_matches", "num_inliers", "retrieval_score", "retrieval_rank", "method", "geometry_ok",
                 "drift_translation_m", "drift_rotation_deg", "path_length_m", "inlier_coverage", "depth_agreement",
                 "median_residual_px", "scene_agreement"}
        loop = cls(**{k: v for k, v in data.items() if k in known})
        loop.T_match_query = np.asarray(data["T_match_query"], np.float64).reshape(4, 4)
        loop.information = np.asarray(data["information"], np.float64).reshape(6, 6)
        if data.get("information_sim3") is not None:
            loop.information_sim3 = np.asarray(data["information_sim3"], np.float64).reshape(7, 7)
        return loop


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
    covariance: np.ndarray | None = None  # 6x6, ROS PoseWithCovariance convention (geometry/covariance.py)
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
