"""Similarity transforms (Sim3) between two keyframes' sparse 3D: Umeyama, 3D-3D RANSAC, refinement, information.

A monocular SLAM backend knows each keyframe's map points only up to a scale that drifts along the trajectory,
so a loop between two keyframes is a similarity, not a rigid motion (ORB-SLAM3 ``Sim3Solver``):

    X_1 = s R X_0 + t        S_1_0 = [s R, t; 0, 1]  (4x4, ``geometry.se3.similarity``)

maps side-0 camera points (side 0's units) into side-1 camera points (side 1's units). ``(R, t)`` is the rigid
pose of camera 0 in camera 1 expressed in side 1's units (camera 0's centre sits at ``t``), and ``s`` converts a
length of side 0's map into side 1's. For a metric pair s = 1 and S is the rigid T_1_0.

Inliers are decided by REPROJECTION in both images, as ORB-SLAM3 does, not by 3D distance: the backend's units
are arbitrary (no metre threshold means anything) and a monocular map point is far less certain along its
viewing ray than across it, which a pixel residual weighs correctly and a 3D distance does not. A 3D-3D pair
(both sides have a point) is an inlier when S X_0 projects within ``pnp_threshold_px`` of its match in image 1
AND S^-1 X_1 within it of its match in image 0.

Perturbations and information (7-DoF): delta = (v, w, sigma) = (tx, ty, tz, rx, ry, rz, log-scale) acts on the
LEFT, S <- exp(delta) S, i.e. X_1 -> e^sigma exp([w]x) X_1 + v (in side 1's frame and units). The 7x7
information is J^T J / sigma_px^2 of the inlier reprojection residuals (sigma_px their robust MAD scale, at
least 1 px), map points held fixed as ORB-SLAM3's OptimizeSim3 does. Its 6x6 rigid part, for consumers of
T_1_0 = [R, t] alone, is the Schur complement over log-scale after the change to SE(3) left coordinates
(v' = v + sigma t, since a scale change moves the camera centre t).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from feature_matching_ros.config import PoseConfig
from feature_matching_ros.geometry.pose import RelativePose, _information, _numeric_jacobian, _normalise
from feature_matching_ros.geometry.se3 import exp_so3, skew

# Relative size of the second singular value of a point set's spread below which its points are collinear.
_COLLINEAR_RATIO = 1e-6


class DegenerateSim3Error(ValueError):
    """The points do not determine a similarity: fewer than 3, non-finite, coincident or collinear."""


def _check_point_sets(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.ndim != 2 or source.shape[1] != 3 or source.shape != target.shape:
        raise ValueError(f"umeyama needs two (N, 3) arrays of the same shape, got {source.shape} and {target.shape}")
    if len(source) < 3:
        raise DegenerateSim3Error(f"a similarity needs at least 3 point pairs, got {len(source)}")
    if not (np.isfinite(source).all() and np.isfinite(target).all()):
        raise DegenerateSim3Error("point pairs contain NaN or infinite coordinates")
    weights = np.ones(len(source)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if len(weights) != len(source) or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be {len(source)} finite non-negative values with a positive sum")
    return source, target, weights / weights.sum()


def umeyama(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None, with_scale: bool = True,
            allow_collinear: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
    """Closed-form least-squares similarity (Umeyama 1991): (s, R, t) minimising
    sum_i w_i |target_i - (s R source_i + t)|^2 for (N, 3) point sets and optional (N,) weights >= 0.

    ``with_scale=False`` fixes s = 1 (rigid, Kabsch). Raises :class:`DegenerateSim3Error` for fewer than 3 pairs,
    non-finite points, or a source or target set that is a single point or a line (rotation about it undefined).
    ``allow_collinear=True`` returns one of the equally good rotations instead (trajectory alignment for ATE,
    where a straight drive is legitimate and any such rotation gives the same errors).
    """
    source, target, weights = _check_point_sets(source, target, weights)
    mean_source, mean_target = weights @ source, weights @ target
    centred_source, centred_target = source - mean_source, target - mean_target
    for name, centred in (() if allow_collinear else (("source", centred_source), ("target", centred_target))):
        spread = np.linalg.svd(centred * np.sqrt(weights)[:, None], compute_uv=False)
        if spread[0] <= 1e-12 * max(1.0, np.abs(source).max()):
            raise DegenerateSim3Error(f"{name} points coincide: no rotation or scale is defined")
        if spread[1] <= _COLLINEAR_RATIO * spread[0]:
            raise DegenerateSim3Error(f"{name} points are collinear: the rotation about their line is undefined")
    covariance = (centred_target * weights[:, None]).T @ centred_source
    U, D, Vt = np.linalg.svd(covariance)
    reflection = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        reflection[2, 2] = -1.0
    R = U @ reflection @ Vt
    variance_source = float(weights @ (centred_source ** 2).sum(1))
    scale = float(np.trace(np.diag(D) @ reflection) / variance_source) if with_scale else 1.0
    t = mean_target - scale * R @ mean_source
    return scale, R, t


def _batched_umeyama(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """Umeyama on (H, n, 3) minimal samples at once: (scale (H,), R (H, 3, 3), t (H, 3), valid (H,))."""
    mean_source, mean_target = source.mean(1, keepdims=True), target.mean(1, keepdims=True)
    centred_source, centred_target = source - mean_source, target - mean_target
    covariance = np.einsum("hni,hnj->hij", centred_target, centred_source) / source.shape[1]
    U, D, Vt = np.linalg.svd(covariance)
    sign = np.sign(np.linalg.det(U) * np.linalg.det(Vt))
    sign[sign == 0] = 1.0
    reflection = np.ones((len(source), 3))
    reflection[:, 2] = sign
    R = np.einsum("hij,hj,hjk->hik", U, reflection, Vt)
    variance_source = (centred_source ** 2).sum((1, 2)) / source.shape[1]
    spread_source = np.linalg.svd(centred_source, compute_uv=False)
    spread_target = np.linalg.svd(centred_target, compute_uv=False)
    valid = ((spread_source[:, 1] > 1e-3 * spread_source[:, 0]) & (spread_target[:, 1] > 1e-3 * spread_target[:, 0])
             & (variance_source > 1e-18))
    scale = np.where(valid, (D * reflection).sum(1) / np.maximum(variance_source, 1e-300), 1.0)
    t = mean_target[:, 0] - scale[:, None] * np.einsum("hij,hj->hi", R, mean_source[:, 0])
    return scale, R, t, valid & (scale > 0) & np.isfinite(scale)


def _project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(..., 3) camera points -> (..., 2) pixels; points at or behind the camera go to infinity."""
    z = points[..., 2:3]
    safe = np.where(z > 1e-12, z, np.nan)
    pixels = points[..., :2] / safe * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    return np.where(np.isfinite(pixels), pixels, np.inf)


def _apply(scale: float, R: np.ndarray, t: np.ndarray, points: np.ndarray) -> np.ndarray:
    return scale * points @ R.T + t


def _apply_inverse(scale: float, R: np.ndarray, t: np.ndarray, points: np.ndarray) -> np.ndarray:
    return (points - t) @ R / scale


def _perturb(scale: float, R: np.ndarray, t: np.ndarray, delta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """exp(delta) S with delta = (v, w, sigma) on the left: X -> e^sigma exp([w]x) (s R X + t) + v."""
    dR, ds = exp_so3(delta[3:6]), float(np.exp(delta[6]))
    return ds * scale, dR @ R, ds * dR @ t + delta[:3]


class _Residuals:
    """Pixel residuals of a Sim3 against the matches: both images for 3D-3D pairs, one image where only one side
    has a point (side 0's point into image 1, side 1's point into image 0)."""

    def __init__(self, points0, points1, pixels0, pixels1, K0, K1, both, only0, only1) -> None:
        self.points0, self.points1, self.pixels0, self.pixels1 = points0, points1, pixels0, pixels1
        self.K0, self.K1 = K0, K1
        self.both, self.only0, self.only1 = both, only0, only1

    def errors(self, scale, R, t) -> tuple[np.ndarray, np.ndarray]:
        """(M,) reprojection error (px) of side 0's points in image 1 and of side 1's points in image 0
        (inf where that side has no point)."""
        count = len(self.pixels0)
        into1, into0 = np.full(count, np.inf), np.full(count, np.inf)
        has0, has1 = self.both | self.only0, self.both | self.only1
        into1[has0] = np.linalg.norm(_project(_apply(scale, R, t, self.points0[has0]), self.K1)
                                     - self.pixels1[has0], axis=1)
        into0[has1] = np.linalg.norm(_project(_apply_inverse(scale, R, t, self.points1[has1]), self.K0)
                                     - self.pixels0[has1], axis=1)
        return np.nan_to_num(into1, nan=np.inf), np.nan_to_num(into0, nan=np.inf)

    def vector(self, scale, R, t, use: np.ndarray) -> np.ndarray:
        """Stacked (x, y) residuals of the pairs selected by the (M,) mask ``use``."""
        has0, has1 = (self.both | self.only0) & use, (self.both | self.only1) & use
        into1 = _project(_apply(scale, R, t, self.points0[has0]), self.K1) - self.pixels1[has0]
        into0 = _project(_apply_inverse(scale, R, t, self.points1[has1]), self.K0) - self.pixels0[has1]
        residuals = np.concatenate([into1.ravel(), into0.ravel()])
        return np.where(np.isfinite(residuals), residuals, 1e3)  # behind a camera: a large, finite penalty


def _ransac(residuals: _Residuals, threshold: float, config: PoseConfig, rng: np.random.Generator
            ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray] | None:
    """Minimal 3-point hypotheses on the 3D-3D pairs, batched; best by 3D-3D inlier count (two-sided)."""
    pairs = np.flatnonzero(residuals.both)
    source, target = residuals.points0[pairs], residuals.points1[pairs]
    best = None
    best_count, needed, drawn, batch = 0, config.max_iterations, 0, 256
    log_failure = np.log(1.0 - config.confidence)
    while drawn < min(needed, config.max_iterations):
        samples = np.argsort(rng.random((batch, len(pairs))), axis=1)[:, :3]
        drawn += batch
        scale, R, t, valid = _batched_umeyama(source[samples], target[samples])
        if not valid.any():
            continue
        scale, R, t = scale[valid], R[valid], t[valid]
        into1 = _project(scale[:, None, None] * np.einsum("hij,nj->hni", R, source) + t[:, None], residuals.K1)
        into0 = _project(np.einsum("hji,hnj->hni", R, target[None] - t[:, None]) / scale[:, None, None], residuals.K0)
        ok = ((np.linalg.norm(into1 - residuals.pixels1[pairs], axis=2) < threshold)
              & (np.linalg.norm(into0 - residuals.pixels0[pairs], axis=2) < threshold))
        counts = ok.sum(1)
        winner = int(np.argmax(counts))
        if counts[winner] > best_count:
            best_count = int(counts[winner])
            best = (float(scale[winner]), R[winner], t[winner], pairs[ok[winner]])
            ratio = best_count / len(pairs)
            needed = int(np.ceil(log_failure / np.log(max(1.0 - ratio ** 3, 1e-12)))) if ratio < 1.0 else 0
    return best


def _refine(residuals: _Residuals, scale: float, R: np.ndarray, t: np.ndarray, use: np.ndarray, threshold: float
            ) -> tuple[float, np.ndarray, np.ndarray]:
    """Robust (Huber at the inlier threshold) least squares of the selected pixel residuals over the 7-DoF left
    perturbation, as ORB-SLAM3's OptimizeSim3 (map points held fixed)."""
    solution = least_squares(lambda delta: residuals.vector(*_perturb(scale, R, t, delta), use), np.zeros(7),
                             loss="huber", f_scale=threshold, method="trf", x_scale="jac", max_nfev=50)
    return _perturb(scale, R, t, solution.x)


def sim3_information(information7: np.ndarray, t: np.ndarray) -> np.ndarray:
    """6x6 information of the rigid part T_1_0 = [R, t] (SE(3) left perturbation, (tx, ty, tz, rx, ry, rz)) from
    the 7x7 Sim3 information (module docstring), with the scale marginalised (Schur complement)."""
    # SE(3) left coordinates of the same motion: v' = v + sigma t, w' = w, sigma' = sigma.
    to_rigid = np.eye(7)
    to_rigid[:3, 6] = t
    from_rigid = np.linalg.inv(to_rigid)
    rigid = from_rigid.T @ information7 @ from_rigid
    if rigid[6, 6] <= 1e-12 * max(np.trace(rigid), 1e-12):
        return 0.5 * (rigid[:6, :6] + rigid[:6, :6].T)
    marginal = rigid[:6, :6] - np.outer(rigid[:6, 6], rigid[6, :6]) / rigid[6, 6]
    return 0.5 * (marginal + marginal.T)


def _valid_points(points: np.ndarray | None, count: int) -> tuple[np.ndarray, np.ndarray]:
    if points is None:
        return np.full((count, 3), np.nan), np.zeros(count, bool)
    points = np.asarray(points, np.float64).reshape(count, 3)
    return points, np.isfinite(points).all(1) & (points[:, 2] > 0)


def estimate_sim3(points0: np.ndarray | None, points1: np.ndarray | None, pixels0: np.ndarray, pixels1: np.ndarray,
                  K0: np.ndarray, K1: np.ndarray, config: PoseConfig | None = None, seed: int = 0) -> RelativePose:
    """S_1_0 from M matches ``pixels0[i] <-> pixels1[i]`` ((M, 2) px) and each side's camera-frame points at them
    ((M, 3) in that side's units, NaN rows = no point; either array may be None).

    RANSAC (3-point Umeyama) on the pairs with a point on both sides, then robust refinement on the inliers (plus
    the one-sided reprojections of pairs with a point on one side only), re-scoring twice. The returned
    :class:`RelativePose` has ``R, t`` (T_1_0 in side 1's units), ``scale`` s, ``method="sim3"``, ``metric=False``,
    the (M,) inlier mask over all matches (pairs without any point count as inliers when their Sampson error
    under the Sim3's epipolar geometry is below ``ransac_threshold_px``), ``information_sim3`` (7x7) and
    ``information`` (6x6 rigid part, scale marginalised; see the module docstring). Failures (too few 3D-3D
    pairs or inliers, degenerate structure) come back with ``success=False`` and a reason.
    """
    config = config or PoseConfig()
    pixels0 = np.asarray(pixels0, np.float64).reshape(-1, 2)
    pixels1 = np.asarray(pixels1, np.float64).reshape(-1, 2)
    count = len(pixels0)
    if len(pixels1) != count:
        raise ValueError(f"pixel arrays differ in length: {count} vs {len(pixels1)}")
    points0, valid0 = _valid_points(points0, count)
    points1, valid1 = _valid_points(points1, count)
    both = valid0 & valid1
    no_inliers = np.zeros(count, bool)
    needed = max(3, config.min_inliers)
    if both.sum() < needed:
        return RelativePose(False, f"too few matches with 3D on both sides: {int(both.sum())} < {needed}",
                            inliers=no_inliers, method="sim3")
    residuals = _Residuals(points0, points1, pixels0, pixels1, K0, K1, both, valid0 & ~valid1, valid1 & ~valid0)
    threshold = config.pnp_threshold_px
    hypothesis = _ransac(residuals, threshold, config, np.random.default_rng(seed))
    if hypothesis is None:
        return RelativePose(False, "Sim3 RANSAC: every sample was degenerate (collinear or coincident points)",
                            inliers=no_inliers, method="sim3")
    scale, R, t, _ = hypothesis
    for _ in range(2):
        into1, into0 = residuals.errors(scale, R, t)
        use = (both & (into1 < threshold) & (into0 < threshold)) | (residuals.only0 & (into1 < threshold)) \
            | (residuals.only1 & (into0 < threshold))
        if (use & both).sum() < needed:
            break
        scale, R, t = _refine(residuals, scale, R, t, use, threshold)
    into1, into0 = residuals.errors(scale, R, t)
    inliers3d = both & (into1 < threshold) & (into0 < threshold)
    one_sided = (residuals.only0 & (into1 < threshold)) | (residuals.only1 & (into0 < threshold))
    if inliers3d.sum() < needed:
        return RelativePose(False, f"too few Sim3 inliers with 3D on both sides: {int(inliers3d.sum())} < {needed}",
                            inliers=inliers3d | one_sided, method="sim3")
    try:  # the consensus itself may be a line of points (a pole, an edge): scale and roll are then unobservable
        umeyama(points0[inliers3d], points1[inliers3d])
    except DegenerateSim3Error as error:
        return RelativePose(False, f"Sim3 inliers are degenerate: {error}", inliers=inliers3d, method="sim3")
    used = inliers3d | one_sided
    vector = residuals.vector(scale, R, t, used)
    jacobian = _numeric_jacobian(lambda delta: residuals.vector(*_perturb(scale, R, t, delta), used), dimension=7)
    # 1 px floor: keypoint localisation (integer FAST corners, repeatability across views, calibration) is never
    # better than that, and the map points' own noise only shows through these residuals.
    information7 = _information(jacobian, vector, floor=1.0)
    epipolar = _epipolar_inliers(R, t, pixels0, pixels1, K0, K1, config) & ~(valid0 | valid1)
    errors = np.concatenate([into1[inliers3d | (residuals.only0 & one_sided)],
                             into0[inliers3d | (residuals.only1 & one_sided)]])
    pose = RelativePose(True, "ok", R, t, used | epipolar, sim3_information(information7, t), metric=False,
                        method="sim3", scale=scale, information_sim3=information7,
                        median_residual_px=float(np.median(errors)))
    return pose


def _epipolar_inliers(R, t, pixels0, pixels1, K0, K1, config: PoseConfig) -> np.ndarray:
    """Matches consistent with the epipolar geometry of (R, t): Sampson error below ``ransac_threshold_px``."""
    norm = np.linalg.norm(t)
    if norm < 1e-12:  # no baseline: a pure rotation maps rays onto rays
        rays1 = _normalise(pixels0, K0) @ R.T
        projected = rays1[:, :2] / rays1[:, 2:3] * [K1[0, 0], K1[1, 1]] + [K1[0, 2], K1[1, 2]]
        return (rays1[:, 2] > 0) & (np.linalg.norm(projected - pixels1, axis=1) < config.ransac_threshold_px)
    rays0, rays1 = _normalise(pixels0, K0), _normalise(pixels1, K1)
    E = skew(t / norm) @ R
    Ex0, Etx1 = rays0 @ E.T, rays1 @ E
    sampson = np.abs(np.sum(rays1 * Ex0, 1)) / (np.sqrt(Ex0[:, 0] ** 2 + Ex0[:, 1] ** 2 + Etx1[:, 0] ** 2
                                                        + Etx1[:, 1] ** 2) + 1e-12)
    mean_focal = float(np.mean([K0[0, 0], K0[1, 1], K1[0, 0], K1[1, 1]]))
    return sampson * mean_focal < config.ransac_threshold_px
