"""Ground-truth loop-closure labels from poses and depth: close in space AND seeing the same surfaces.

Distance alone labels a camera that turned around as a loop, and view overlap alone labels distant
frames that look down the same long corridor; we require both, and exclude temporally adjacent frames.
View overlap of A in B: the fraction of A's valid depth pixels whose back-projected 3D points land
inside B's image in front of B *and* agree with B's depth there (so occluded points do not count).
A pair's overlap is the minimum over both directions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LoopCriteria:
    distance_m: float  # camera centres closer than this
    min_overlap: float = 0.3  # min(overlap(A in B), overlap(B in A)) at least this
    min_index_gap: int = 30  # |i - j| >= this, i.e. frames closer in time are "temporally adjacent"
    depth_tolerance_rel: float = 0.05  # depth agreement for the overlap test: |z - z_B| <= rel * z + abs
    depth_tolerance_abs_m: float = 0.05

    def to_dict(self) -> dict:
        return asdict(self) | {
            "overlap_definition": "fraction of A's valid depth pixels whose back-projected points project into B "
            "with z > 0 and |z - depth_B| <= rel*z + abs; pair overlap = min over both directions",
        }


def scale_intrinsics(K: np.ndarray, step: int) -> np.ndarray:
    """Intrinsics of ``image[::step, ::step]`` (pixel-centre convention: pixel step*i becomes i)."""
    K_scaled = np.asarray(K, dtype=np.float64).copy()
    K_scaled[:2] /= step
    return K_scaled


def view_overlap(depth_a: np.ndarray, K_a: np.ndarray, T_map_a: np.ndarray, depth_b: np.ndarray, K_b: np.ndarray,
                 T_map_b: np.ndarray, rel_tol: float = 0.05, abs_tol: float = 0.05, stride: int = 1) -> float:
    """Fraction of A's valid depth pixels (sampled every ``stride``) visible in B with consistent depth."""
    rows, cols = np.mgrid[0:depth_a.shape[0]:stride, 0:depth_a.shape[1]:stride]
    z = depth_a[rows, cols]
    valid = np.isfinite(z) & (z > 0)
    if not valid.any():
        return 0.0
    pixels = np.stack([cols[valid], rows[valid], np.ones(valid.sum())], 0).astype(np.float64)
    points_a = np.linalg.inv(K_a) @ pixels * z[valid]
    T_b_a = np.linalg.inv(T_map_b) @ T_map_a
    points_b = T_b_a[:3, :3] @ points_a + T_b_a[:3, 3:4]
    z_b = points_b[2]
    in_front = z_b > 1e-6
    proj = K_b @ points_b[:, in_front]
    u = np.rint(proj[0] / proj[2]).astype(np.int64)
    v = np.rint(proj[1] / proj[2]).astype(np.int64)
    inside = (u >= 0) & (u < depth_b.shape[1]) & (v >= 0) & (v < depth_b.shape[0])
    seen = depth_b[v[inside], u[inside]]
    z_seen = z_b[in_front][inside]
    consistent = np.isfinite(seen) & (np.abs(seen - z_seen) <= rel_tol * z_seen + abs_tol)
    return float(consistent.sum()) / float(valid.sum())


def label_loops(poses: np.ndarray, depths: list[np.ndarray], K: np.ndarray, criteria: LoopCriteria,
                stride: int = 2) -> list[tuple[int, int]]:
    """[query, match] pairs (query > match) meeting ``criteria``.

    ``poses``: (N, 4, 4) T_map_camera; ``depths``: N depth images (any common resolution) matching ``K``.
    """
    poses = np.asarray(poses)
    centres = poses[:, :3, 3]
    distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    pairs = []
    for query in range(len(poses)):
        for match in range(0, query - criteria.min_index_gap + 1):
            if distances[query, match] >= criteria.distance_m:
                continue
            overlap_qm = view_overlap(depths[query], K, poses[query], depths[match], K, poses[match],
                                      criteria.depth_tolerance_rel, criteria.depth_tolerance_abs_m, stride)
            if overlap_qm < criteria.min_overlap:
                continue
            overlap_mq = view_overlap(depths[match], K, poses[match], depths[query], K, poses[query],
                                      criteria.depth_tolerance_rel, criteria.depth_tolerance_abs_m, stride)
            if overlap_mq >= criteria.min_overlap:
                pairs.append((query, match))
    return pairs
