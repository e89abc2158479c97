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
