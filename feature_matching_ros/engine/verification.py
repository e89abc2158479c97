"""Geometric verification of one query <-> candidate pair: the relative pose T_match_query from correspondences.

Per pair (query = image 0, candidate = image 1), the first that applies:
  * candidate has depth at its matched points -> PnP (candidate 3D points -> query pixels), metric, inverted;
  * else the query has depth -> PnP (query 3D points -> candidate pixels), metric;
  * else BOTH keyframes have backend map points (monocular SLAM, ``Keyframe.map_points``) at enough matches ->
    Sim3 from the 3D-3D matches (geometry/sim3.py): rotation, translation in the MATCH keyframe's backend units,
    and the scale s between the two keyframes' maps (X_match = s R X_query + t), ``metric=False``, information
    along the translation (the map points fix its length). A Sim3 without consensus rejects the pair; one whose
    own information leaves the scale uncertain beyond ``sim3_max_scale_sigma`` falls through to:
  * else essential matrix -> rotation + unit translation, ``metric=False``, information exactly zero along the
    translation (its length is unobservable).
Depth wins over map points: depth is metric, a monocular map's units are not.

The k candidates of one keyframe are independent: :class:`VerificationPool` verifies them in parallel threads.
The work is mostly OpenCV's (RANSAC, PnP), which releases the GIL, and every estimator seeds its own
random generator per call, so a verdict never depends on the thread that computed it or on the others.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import numpy as np

from feature_matching_ros.config import PoseConfig
from feature_matching_ros.geometry.pose import (RelativePose, backproject, estimate_relative_pose,
                                                invert_relative_pose, pose_from_points3d)
from feature_matching_ros.geometry.sim3 import estimate_sim3
from feature_matching_ros.matchers.base import Correspondences


def _has_depth(depth: np.ndarray | None) -> bool:
    return depth is not None and bool(np.isfinite(depth).any())


def _scale_sigma(pose: RelativePose) -> float:
    """1-sigma of a Sim3's log-scale from its 7x7 information (inf when the scale is unobservable)."""
    try:
        return float(np.sqrt(max(np.linalg.inv(pose.information_sim3)[6, 6], 0.0)))
    except np.linalg.LinAlgError:
        return float("inf")


def verify_pair(correspondences: Correspondences, depth_query: np.ndarray | None, depth_match: np.ndarray | None,
                K_query: np.ndarray, K_match: np.ndarray, config: PoseConfig,
                points3d_query: np.ndarray | None = None, points3d_match: np.ndarray | None = None) -> RelativePose:
    """T_match_query (as a RelativePose, inliers over the M correspondences) from (M,) depths at the matched
    points of each side (metres, NaN invalid, or None) or, without depth, (M, 3) backend map points at them
    (camera frame, each keyframe's own backend units, NaN rows = none, or None)."""
    query_pixels = correspondences.points0.astype(np.float64)
    match_pixels = correspondences.points1.astype(np.float64)
    if len(correspondences) < config.min_matches:
        return RelativePose(False, f"too few matches: {len(correspondences)} < min_matches={config.min_matches}",
                            inliers=np.zeros(len(correspondences), bool))
    if _has_depth(depth_match):
        pose = pose_from_points3d(backproject(match_pixels, depth_match, K_match), query_pixels, K_query, config,
                                  K_source=K_match)
        if pose.success or not _has_depth(depth_query):
            return invert_relative_pose(pose)
    if _has_depth(depth_query):
        return pose_from_points3d(backproject(query_pixels, depth_query, K_query), match_pixels, K_match, config,
                                  K_source=K_query)
    if points3d_query is not None and points3d_match is not None:
        # Too few matches with a map point on both sides says nothing against the pair: the essential matrix
        # still verifies it. With enough of them, a Sim3 without consensus is a rejection.
        paired = int((np.isfinite(points3d_query).all(1) & np.isfinite(points3d_match).all(1)).sum())
        if paired >= max(3, config.min_inliers):
            pose = estimate_sim3(points3d_query, points3d_match, query_pixels, match_pixels, K_query, K_match, config)
            if not pose.success or _scale_sigma(pose) <= config.sim3_max_scale_sigma:
                return pose
    return estimate_relative_pose(query_pixels, match_pixels, K_query, K_match, config, scores=correspondences.scores)


T = TypeVar("T")
AUTO_MAX_THREADS = 4  # "auto": at most this many verification threads (a keyframe has ~5 candidates)


class VerificationPool:
    """Maps a function over a keyframe's candidates in up to ``threads`` threads, results in candidate order.

    ``threads`` 0 = auto: half the CPU cores, at most AUTO_MAX_THREADS, at least 1 (the other half stays with the
    SLAM backend and the networks' host threads; on 2 cores verification stays in the calling thread, where
    benchmarks/verification.py found no reliable gain from a second thread). 1 runs in the calling thread. The
    threads start on first use and live as long as the pool (the engine's). Exceptions propagate as in a loop.
    """

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads if threads > 0 else max(1, min(AUTO_MAX_THREADS, (os.cpu_count() or 1) // 2))
        self._executor: ThreadPoolExecutor | None = None

    def map(self, function: Callable[[int], T], items: range) -> list[T]:
        if self.threads <= 1 or len(items) <= 1:
            return [function(item) for item in items]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="verification")
        return list(self._executor.map(function, items))
