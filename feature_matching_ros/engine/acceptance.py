"""Acceptance checks on a geometrically verified pair: is this pose a loop the backend may trust?

Each check returns a rejection reason (text with the values) or None. They stack principled tests rather
than per-sequence thresholds; the thresholds live in :class:`EngineConfig`.
"""

from __future__ import annotations

import numpy as np

from feature_matching_ros.geometry.pose import _reprojection_residuals, backproject


def inlier_coverage(pixels: np.ndarray, image_size: tuple[int, int], grid: int) -> float:
    """Fraction of a grid x grid partition of the image (W, H) holding at least one of the (M, 2) pixels."""
    if not len(pixels):
        return 0.0
    width, height = image_size
    cols = np.clip((pixels[:, 0] / max(width, 1) * grid).astype(int), 0, grid - 1)
    rows = np.clip((pixels[:, 1] / max(height, 1) * grid).astype(int), 0, grid - 1)
    return len(np.unique(rows * grid + cols)) / float(grid * grid)


def depth_agreement(query_pixels: np.ndarray, depth_query: np.ndarray | None, depth_match: np.ndarray | None,
                    K_query: np.ndarray, T_match_query: np.ndarray, rel_tol: float, abs_tol: float,
                    min_points: int = 10) -> float | None:
    """Fraction of inlier matches whose query point ((M, 2) pixels, (M,) depth), moved by T_match_query, has the
    depth measured at the match ((M,) depth): |z_pred - z| <= rel_tol * z + abs_tol. None without enough depth
    on both sides."""
    if depth_query is None or depth_match is None or not len(query_pixels):
        return None
    valid = np.isfinite(depth_query) & np.isfinite(depth_match)
    if valid.sum() < min_points:
        return None
    points = backproject(query_pixels[valid].astype(np.float64), depth_query[valid].astype(np.float64), K_query)
    predicted = points @ T_match_query[:3, :3].T + T_match_query[:3, 3]
    z_match = depth_match[valid].astype(np.float64)
    return float((np.abs(predicted[:, 2] - z_match) <= rel_tol * z_match + abs_tol).mean())


def median_reprojection_residual(source_pixels: np.ndarray, source_depth: np.ndarray | None, K_source: np.ndarray,
                                 destination_pixels: np.ndarray, K_destination: np.ndarray,
                                 T_destination_source: np.ndarray) -> float | None:
    """Median reprojection residual (px) of inlier matches: the source's 3D points ((M, 2) pixels + (M,) depth)
    projected into the destination image. None without depth."""
    if source_depth is None:
        return None
    valid = np.isfinite(source_depth)
    if not valid.any():
        return None
    points = backproject(source_pixels[valid].astype(np.float64), source_depth[valid].astype(np.float64), K_source)
    residuals = _reprojection_residuals(T_destination_source[:3, :3], T_destination_source[:3, 3], points,
                                        destination_pixels[valid].astype(np.float64), K_destination)
    return float(np.median(np.linalg.norm(residuals.reshape(-1, 2), axis=1)))


def scene_depth_agreement(query_pixels: np.ndarray, query_depth: np.ndarray, K_query: np.ndarray,
                          match_pixels: np.ndarray, match_depth: np.ndarray, K_match: np.ndarray,
                          match_size: tuple[int, int], T_match_query: np.ndarray, rel_tol: float, abs_tol: float,
                          radius_px: float, min_points: int = 20) -> float | None:
    """Does the WHOLE scene agree with the pose, not only the inliers? RGB-D keyframes only.

    Every query keypoint with depth ((N, 2) pixels, (N,) metres, NaN invalid) is moved into the match camera by
    T_match_query; of those landing inside the match image (W, H) next to a match keypoint with depth (within
    ``radius_px``; (M, 2) pixels, (M,) metres), the fraction whose predicted depth agrees with one such
    neighbour (|dz| <= rel_tol z + abs_tol). A repeated poster or a wall one tile over verifies with inliers
    that all agree, while the furniture around them lands at the wrong depth. None without enough depth.
    """
    from scipy.spatial import cKDTree

    valid_query = np.isfinite(query_depth)
    valid_match = np.isfinite(match_depth)
    if valid_query.sum() < min_points or valid_match.sum() < min_points:
        return None
    points = backproject(query_pixels[valid_query].astype(np.float64), query_depth[valid_query].astype(np.float64),
                         K_query) @ T_match_query[:3, :3].T + T_match_query[:3, 3]
    in_front = points[:, 2] > 1e-3
    points = points[in_front]
    projected = points[:, :2] / points[:, 2:3] * [K_match[0, 0], K_match[1, 1]] + [K_match[0, 2], K_match[1, 2]]
    width, height = match_size
    inside = (projected[:, 0] >= 0) & (projected[:, 0] <= width - 1) & (projected[:, 1] >= 0) & \
        (projected[:, 1] <= height - 1)
    if inside.sum() < min_points:
        return None
    tree = cKDTree(match_pixels[valid_match].astype(np.float64))
    neighbours = tree.query_ball_point(projected[inside], r=radius_px)
    depths = match_depth[valid_match].astype(np.float64)
    agree, judged = 0, 0
    for predicted_z, near in zip(points[inside, 2], neighbours):
        if not near:
            continue
        judged += 1
        z = depths[near]
        agree += bool(np.any(np.abs(predicted_z - z) <= rel_tol * z + abs_tol))
    return agree / judged if judged >= min_points else None
