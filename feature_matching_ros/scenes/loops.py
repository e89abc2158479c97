"""Ground-truth loop-closure labels from poses and depth: close in space AND seeing the same surfaces.

Distance alone labels a camera that turned around as a loop, and view overlap alone labels distant
frames that look down the same long corridor; we require both, and exclude temporally adjacent frames.
View overlap of A in B: the fraction of A's valid depth pixels whose back-projected 3D points land
inside B's image in front of B *and* agree with B's depth there (so occluded points do not count).
A pair's overlap is the minimum over both directions.

Real sequences without depth use the same rule with other evidence of overlap: ``covisibility_loops``
(shared 3D points of a structure-from-motion model) and ``view_cone_loops`` (a forward-looking vehicle
camera: close centres and nearly parallel optical axes).
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


@dataclass(frozen=True)
class CovisibilityCriteria:
    """Loop labels from a sparse reconstruction (structure from motion): two images see the same place when
    they observe enough of the same triangulated 3D points. Without depth this is the most direct evidence
    of view overlap: a shared point was matched in both images and survived bundle adjustment."""

    min_shared_points: int = 30  # |P_A & P_B| at least this
    min_overlap: float = 0.15  # min(|P_A & P_B| / |P_A|, |P_A & P_B| / |P_B|) at least this
    min_index_gap: int = 20  # |i - j| >= this ...
    min_time_gap_s: float = 10.0  # ... and |t_i - t_j| >= this: closer frames are "temporally adjacent"

    def to_dict(self) -> dict:
        return asdict(self) | {
            "overlap_definition": "P_X = ids of the 3D points image X observes in the structure-from-motion model; "
            "pair overlap = |P_A & P_B| / max(|P_A|, |P_B|) (the smaller of the two directional fractions)",
        }


def _positions(count: int, indices: np.ndarray | None) -> np.ndarray:
    positions = np.arange(count) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(positions) != count or np.any(np.diff(positions) <= 0):
        raise ValueError(f"indices must be {count} increasing sequence positions")
    return positions


def covisibility_loops(point_ids: list[set[int] | None], stamps_s: np.ndarray, criteria: CovisibilityCriteria,
                       indices: np.ndarray | None = None) -> list[tuple[int, int]]:
    """[query, match] pairs (query > match, local list positions) meeting ``criteria``.

    ``point_ids``: per frame, the 3D point ids it observes (None or empty for frames the reconstruction did
    not register: they never form loops); ``stamps_s``: (N,) frame times in seconds; ``indices``: (N,) the
    frames' positions in the whole sequence for the ``min_index_gap`` test when these frames are a subset
    of it (default 0..N-1).
    """
    stamps_s = np.asarray(stamps_s, dtype=np.float64)
    if len(stamps_s) != len(point_ids):
        raise ValueError(f"{len(point_ids)} frames of point ids but {len(stamps_s)} stamps")
    positions = _positions(len(point_ids), indices)
    pairs = []
    for query in range(len(point_ids)):
        seen_q = point_ids[query]
        if not seen_q:
            continue
        for match in range(query):
            seen_m = point_ids[match]
            if (not seen_m or positions[query] - positions[match] < criteria.min_index_gap
                    or abs(stamps_s[query] - stamps_s[match]) < criteria.min_time_gap_s):
                continue
            shared = len(seen_q & seen_m)
            if shared >= criteria.min_shared_points and shared / max(len(seen_q), len(seen_m)) >= criteria.min_overlap:
                pairs.append((query, match))
    return pairs


@dataclass(frozen=True)
class ViewConeCriteria:
    """Loop labels from ground-truth poses alone, for a camera that looks along its direction of travel
    (a vehicle on a road): close camera centres AND optical axes within ``max_axis_angle_deg`` see the same
    street ahead. Not valid for hand-held cameras that look sideways or turn in place."""

    max_distance_m: float = 5.0
    max_axis_angle_deg: float = 20.0
    min_index_gap: int = 20
    min_time_gap_s: float = 10.0

    def to_dict(self) -> dict:
        return asdict(self) | {"overlap_definition": "camera centres closer than max_distance_m and the angle "
                                                      "between the two optical (z) axes below max_axis_angle_deg"}


def view_cone_loops(poses: np.ndarray, stamps_s: np.ndarray, criteria: ViewConeCriteria,
                    indices: np.ndarray | None = None) -> list[tuple[int, int]]:
    """[query, match] pairs (query > match, local list positions) meeting ``criteria``; ``poses``: (N, 4, 4)
    T_map_camera; ``stamps_s`` and ``indices`` as in ``covisibility_loops``."""
    poses = np.asarray(poses, dtype=np.float64)
    stamps_s = np.asarray(stamps_s, dtype=np.float64)
    positions = _positions(len(poses), indices)
    centres = poses[:, :3, 3]
    axes = poses[:, :3, 2]
    cos_limit = np.cos(np.radians(criteria.max_axis_angle_deg))
    pairs = []
    for query in range(len(poses)):
        for match in range(query):
            if (positions[query] - positions[match] < criteria.min_index_gap
                    or abs(stamps_s[query] - stamps_s[match]) < criteria.min_time_gap_s):
                continue
            if (np.linalg.norm(centres[query] - centres[match]) < criteria.max_distance_m
                    and float(axes[query] @ axes[match]) >= cos_limit):
                pairs.append((query, match))
    return pairs
