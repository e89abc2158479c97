"""Ground-truth match labels for keypoints of any detector, as glue-factory defines them.

Written here (no library exposes glue-factory's labelling without its whole training stack):
- depth + pose: project keypoints both ways with exact (or MegaDepth) depth; a projection counts only
  when it lands in the other image with a consistent depth there (not occluded). Positive = mutual
  nearest neighbour under d_ij = max(reprojection 0->1, reprojection 1->0) with d_ij < ``pos_px`` (3 px);
  unmatched = valid depth and min reprojection > ``neg_px`` (5 px); everything else ignored.
- homography: the same with the homography both ways, 3 px / 3 px.

Labels: matches0 (N0,) int64: j >= 0 the positive partner in image 1, -1 unmatched (dustbin target),
-2 ignored; matches1 (N1,) likewise. Tensors on any device (torch only).
"""

from __future__ import annotations

import torch

UNMATCHED = -1
IGNORE = -2


def _project_homography(H: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(3, 3) homography applied to (N, 2) pixels -> (N, 2); points behind (w <= 0) become inf."""
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], 1) @ H.T
    w = homogeneous[:, 2:]
    out = homogeneous[:, :2] / w.clamp_min(1e-12)
    return torch.where(w > 1e-12, out, torch.full_like(out, float("inf")))


def _labels_from_distances(distance: torch.Tensor, near: torch.Tensor, valid0: torch.Tensor, valid1: torch.Tensor,
                           pos_px: float, neg_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """distance (N0, N1) for positives (inf where undefined), near (N0, N1) for the unmatched test."""
    n0, n1 = distance.shape
    matches0 = torch.full((n0,), IGNORE, dtype=torch.long, device=distance.device)
    matches1 = torch.full((n1,), IGNORE, dtype=torch.long, device=distance.device)
    if n0 == 0 or n1 == 0:
        matches0[valid0] = UNMATCHED
        matches1[valid1] = UNMATCHED
        return matches0, matches1
    min0, arg0 = distance.min(1)
    min1, arg1 = distance.min(0)
    mutual = arg1[arg0] == torch.arange(n0, device=distance.device)
    positive0 = mutual & (min0 < pos_px)
    unmatched0 = valid0 & (near.min(1).values > neg_px) & ~positive0
    unmatched1 = valid1 & (near.min(0).values > neg_px)
    matches0[unmatched0] = UNMATCHED
    matches1[unmatched1] = UNMATCHED
    rows = torch.nonzero(positive0)[:, 0]
    matches0[rows] = arg0[rows]
    matches1[arg0[rows]] = rows
    return matches0, matches1


def homography_labels(kpts0: torch.Tensor, kpts1: torch.Tensor, H_1_0: torch.Tensor, pos_px: float = 3.0,
                      neg_px: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels for kpts0 (N0, 2), kpts1 (N1, 2) pixels under H_1_0 (3, 3) mapping image 0 to image 1."""
    H = H_1_0.to(torch.float64)
    p0, p1 = kpts0.to(torch.float64), kpts1.to(torch.float64)
    d01 = torch.cdist(_project_homography(H, p0).nan_to_num(posinf=1e9, neginf=1e9), p1)
    d10 = torch.cdist(p0, _project_homography(torch.linalg.inv(H), p1).nan_to_num(posinf=1e9, neginf=1e9))
    distance = torch.maximum(d01, d10)
    valid0 = torch.ones(len(p0), dtype=torch.bool, device=p0.device)
    valid1 = torch.ones(len(p1), dtype=torch.bool, device=p1.device)
    return _labels_from_distances(distance, distance, valid0, valid1, pos_px, neg_px)


def sample_depth(depth: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Depth (H, W) at (N, 2) pixels, nearest pixel; NaN outside the image or where depth <= 0 / NaN."""
    height, width = depth.shape
    cols, rows = torch.round(points[:, 0]).long(), torch.round(points[:, 1]).long()
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height) & torch.isfinite(points).all(1)
    values = torch.full((len(points),), float("nan"), dtype=depth.dtype, device=depth.device)
    values[inside] = depth[rows[inside], cols[inside]]
    return torch.where(values > 0, values, torch.full_like(values, float("nan")))


def _warp(points: torch.Tensor, depth_a: torch.Tensor, K_a: torch.Tensor, K_b: torch.Tensor, T_b_a: torch.Tensor,
          depth_b: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels of image a -> pixels of image b. Returns (projected (N, 2), has_depth (N,), visible (N,))."""
    z = sample_depth(depth_a, points)
    has_depth = torch.isfinite(z)
    rays = torch.cat([points, torch.ones_like(points[:, :1])], 1) @ torch.linalg.inv(K_a).T
    X_b = (rays * z[:, None]) @ T_b_a[:3, :3].T + T_b_a[:3, 3]
    in_front = X_b[:, 2] > 1e-6
    uv = (X_b @ K_b.T)[:, :2] / X_b[:, 2:].clamp_min(1e-6)
    z_b = sample_depth(depth_b, uv)
    visible = has_depth & in_front & torch.isfinite(z_b) & ((z_b - X_b[:, 2]).abs() < tolerance * X_b[:, 2])
    return torch.where(visible[:, None], uv, torch.full_like(uv, 1e9)), has_depth, visible


def depth_labels(kpts0: torch.Tensor, kpts1: torch.Tensor, depth0: torch.Tensor, depth1: torch.Tensor,
                 K0: torch.Tensor, K1: torch.Tensor, T_1_0: torch.Tensor, pos_px: float = 3.0, neg_px: float = 5.0,
                 depth_tolerance: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from depth (H, W) metres (NaN or <= 0 invalid), intrinsics K (3, 3) and T_1_0 (4, 4).

    A projection is visible when the depth found in the other image agrees within ``depth_tolerance``
    (relative); an occluded or out-of-view keypoint with valid depth has no partner and is unmatched.
    """
    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    p0, p1 = f64(kpts0), f64(kpts1)
    T_1_0 = f64(T_1_0)
    proj0, has0, _ = _warp(p0, f64(depth0), f64(K0), f64(K1), T_1_0, f64(depth1), depth_tolerance)
    proj1, has1, _ = _warp(p1, f64(depth1), f64(K1), f64(K0), torch.linalg.inv(T_1_0), f64(depth0), depth_tolerance)
    d01 = torch.cdist(proj0, p1)  # (N0, N1), ~1e9 where kpt0 is not visible in image 1
    d10 = torch.cdist(p0, proj1)
    distance = torch.maximum(d01, d10)
    near = torch.minimum(d01, d10)
    return _labels_from_distances(distance, near, has0, has1, pos_px, neg_px)
