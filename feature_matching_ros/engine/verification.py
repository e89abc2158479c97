"""Geometric verification of one query <-> candidate pair: the relative pose T_match_query from correspondences.

Per pair (query = image 0, candidate = image 1):
  * candidate has depth at its matched points -> PnP (candidate 3D points -> query pixels), metric, inverted;
  * else the query has depth -> PnP (query 3D points -> candidate pixels), metric;
  * else essential matrix -> rotation + unit translation, ``metric=False`` (scale unknown).
"""

from __future__ import annotations

import numpy as np

from feature_matching_ros.config import PoseConfig
from feature_matching_ros.geometry.pose import (RelativePose, backproject, estimate_relative_pose,
                                                invert_relative_pose, pose_from_points3d)
from feature_matching_ros.matchers.base import Correspondences


def _has_depth(depth: np.ndarray | None) -> bool:
    return depth is not None and bool(np.isfinite(depth).any())


def verify_pair(correspondences: Correspondences, depth_query: np.ndarray | None, depth_match: np.ndarray | None,
                K_query: np.ndarray, K_match: np.ndarray, config: PoseConfig) -> RelativePose:
    """T_match_query (as a RelativePose, inliers over the M correspondences) from (M,) depths at the matched
    points of each side (metres, NaN invalid, or None)."""
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
    return estimate_relative_pose(query_pixels, match_pixels, K_query, K_match, config)
