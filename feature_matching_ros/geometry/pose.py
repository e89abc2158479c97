"""Relative pose between two calibrated views from matched keypoints.

Conventions: ``R, t`` map points from camera 0 to camera 1 (``X1 = R X0 + t``, i.e. T_1_0). Without depth
the translation is a unit direction (scale unknown); with depth in either view it is metric (PnP).
The 6x6 information matrix is ordered like ROS covariances, (tx, ty, tz, rx, ry, rz), for a small
perturbation T_1_0 <- exp([v, w]) T_1_0 on the left. It is J^T J / sigma^2 of the inlier residuals
(reprojection errors for PnP, Sampson errors for the essential matrix) with sigma their robust (MAD)
scale, so tight, numerous inliers give a confident constraint. For the essential matrix the
translation along t is unobservable (scale), and the information says so: zero along that direction.

Failures are results, not exceptions: too few matches, too few inliers, a homography explaining the
matches as well as the essential matrix (pure rotation or a single plane: the monocular pose is
ambiguous) are returned with ``success=False`` and a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from feature_matching_ros.config import PoseConfig
from feature_matching_ros.geometry.se3 import exp_so3 as _exp_so3
from feature_matching_ros.geometry.se3 import invert_information
from feature_matching_ros.geometry.se3 import skew as _skew


@dataclass
class RelativePose:
    success: bool
    reason: str
    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))
    inliers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (M,) over the matches
    information: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))
    metric: bool = False  # True when t has metric scale (PnP with depth)
    method: str = "none"  # "essential" | "pnp" | "sim3" | "none"
    # Sim3 (geometry/sim3.py): X_1 = scale R X_0 + t, t in side 1's units; 1.0 for rigid poses. information_sim3:
    # 7x7 over (tx, ty, tz, rx, ry, rz, log-scale), left perturbation; None unless method == "sim3".
    scale: float = 1.0
    information_sim3: np.ndarray | None = None
    median_residual_px: float | None = None  # median inlier reprojection error (set by Sim3)

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())

    @property
    def T_1_0(self) -> np.ndarray:
        transform = np.eye(4)
        transform[:3, :3], transform[:3, 3] = self.R, self.t
        return transform


def check_intrinsics(K: np.ndarray, name: str = "K") -> np.ndarray:
    """Validate a 3x3 pinhole matrix; raise ValueError naming the problem."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"{name} must be 3x3, got shape {K.shape}")
    if not np.isfinite(K).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"{name} has non-positive focal lengths fx={K[0, 0]}, fy={K[1, 1]}")
    return K


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return check_intrinsics(np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]))


def _robust_sigma(residuals: np.ndarray, floor: float) -> float:
    mad = np.median(np.abs(residuals - np.median(residuals))) * 1.4826
    return max(float(mad), floor)


def _numeric_jacobian(residual_fn, dimension: int = 6, step: float = 1e-6) -> np.ndarray:
    base = residual_fn(np.zeros(dimension))
    jacobian = np.empty((base.size, dimension))
    for j in range(dimension):
        delta = np.zeros(dimension)
        delta[j] = step
        jacobian[:, j] = (residual_fn(delta) - residual_fn(-delta)) / (2 * step)
    return jacobian


def _perturb(R: np.ndarray, t: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left perturbation exp([v, w]) * (R, t), first order in v (enough for a Jacobian)."""
    dR = _exp_so3(delta[3:])
    return dR @ R, dR @ t + delta[:3]


def lift_to_3d(keypoints: np.ndarray, depth: np.ndarray, K: np.ndarray, config: PoseConfig) -> tuple[np.ndarray, np.ndarray]:
    """Back-project (N, 2) pixels with a depth image (metres): (N, 3) points and a validity mask.

    Depth is read at the nearest pixel; 0, NaN or values outside [min_depth, max_depth] are invalid.
    """
    height, width = depth.shape[:2]
    cols = np.clip(np.round(keypoints[:, 0]).astype(int), 0, width - 1)
    rows = np.clip(np.round(keypoints[:, 1]).astype(int), 0, height - 1)
    z = depth[rows, cols].astype(np.float64)
    valid = np.isfinite(z) & (z >= config.min_depth) & (z <= config.max_depth)
    z = np.where(valid, z, 0.0)
    x = (keypoints[:, 0] - K[0, 2]) / K[0, 0] * z
    y = (keypoints[:, 1] - K[1, 2]) / K[1, 1] * z
    return np.stack([x, y, z], 1), valid


def _pnp(points3d: np.ndarray, pixels: np.ndarray, K: np.ndarray, config: PoseConfig
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """RANSAC (USAC_MAGSAC) PnP then Levenberg-Marquardt refinement on inliers. Returns R, t, inlier mask."""
    params = cv2.UsacParams()
    params.sampler = cv2.SAMPLING_UNIFORM
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.loMethod = cv2.LOCAL_OPTIM_SIGMA
    params.threshold = config.pnp_threshold_px
    params.confidence = config.confidence
    params.maxIterations = config.max_iterations
    ok, _, rvec, tvec, inlier_idx = cv2.solvePnPRansac(points3d.astype(np.float64), pixels.astype(np.float64), K,
                                                       None, params=params)
    if not ok or inlier_idx is None or len(inlier_idx) < 4:
        return None
    inliers = np.zeros(len(points3d), dtype=bool)
    inliers[inlier_idx.ravel()] = True
    rvec, tvec = cv2.solvePnPRefineLM(points3d[inliers], pixels[inliers].astype(np.float64), K, None, rvec, tvec)
    return cv2.Rodrigues(rvec)[0], tvec.ravel(), inliers


def _reprojection_residuals(R, t, points3d, pixels, K) -> np.ndarray:
    camera = points3d @ R.T + t
    projected = camera[:, :2] / camera[:, 2:3] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]]
    return (projected - pixels).ravel()


def _sampson_residuals(R, t, rays0, rays1) -> np.ndarray:
    """Sampson distances in normalised image units; scale of t is irrelevant (direction only)."""
    E = _skew(t / max(np.linalg.norm(t), 1e-12)) @ R
    Ex0 = rays0 @ E.T
    Etx1 = rays1 @ E
    numerator = np.sum(rays1 * Ex0, axis=1)
    denominator = np.sqrt(Ex0[:, 0] ** 2 + Ex0[:, 1] ** 2 + Etx1[:, 0] ** 2 + Etx1[:, 1] ** 2) + 1e-12
    return numerator / denominator


def _normalise(pixels: np.ndarray, K: np.ndarray) -> np.ndarray:
    rays = np.ones((len(pixels), 3))
    rays[:, 0] = (pixels[:, 0] - K[0, 2]) / K[0, 0]
    rays[:, 1] = (pixels[:, 1] - K[1, 2]) / K[1, 1]
    return rays


def _information(jacobian: np.ndarray, residuals: np.ndarray, floor: float) -> np.ndarray:
    sigma = _robust_sigma(residuals, floor)
    information = jacobian.T @ jacobian / sigma**2
    return 0.5 * (information + information.T)


def estimate_relative_pose(
    keypoints0: np.ndarray,
    keypoints1: np.ndarray,
    K0: np.ndarray,
    K1: np.ndarray,
    config: PoseConfig | None = None,
    depth0: np.ndarray | None = None,
    depth1: np.ndarray | None = None,
) -> RelativePose:
    """Pose T_1_0 from matched pixels ``keypoints0[i] <-> keypoints1[i]`` (both (M, 2)).

    With ``depth0`` (metres, aligned with image 0) PnP solves for T_1_0 directly; with only ``depth1``
    it solves T_0_1 and inverts. Without depth: essential matrix (USAC_MAGSAC) + cheirality (recoverPose).
    """
    config = config or PoseConfig()
    K0, K1 = check_intrinsics(K0, "K0"), check_intrinsics(K1, "K1")
    keypoints0 = np.asarray(keypoints0, dtype=np.float64).reshape(-1, 2)
    keypoints1 = np.asarray(keypoints1, dtype=np.float64).reshape(-1, 2)
    count = len(keypoints0)
    if count != len(keypoints1):
        raise ValueError(f"keypoint arrays differ in length: {count} vs {len(keypoints1)}")
    if not (np.isfinite(keypoints0).all() and np.isfinite(keypoints1).all()):
        raise ValueError("keypoints contain NaN or infinite values")
    if count < config.min_matches:
        return RelativePose(False, f"too few matches: {count} < min_matches={config.min_matches}",
                            inliers=np.zeros(count, dtype=bool))
    if depth0 is not None or depth1 is not None:
        return _pose_with_depth(keypoints0, keypoints1, K0, K1, config, depth0, depth1)
    return _pose_essential(keypoints0, keypoints1, K0, K1, config)


def backproject(pixels: np.ndarray, depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(M, 2) pixels + (M,) depth (metres, NaN invalid) -> (M, 3) camera points (NaN rows where invalid)."""
    x = (pixels[:, 0] - K[0, 2]) / K[0, 0] * depth
    y = (pixels[:, 1] - K[1, 2]) / K[1, 1] * depth
    return np.stack([x, y, depth], 1).astype(np.float64)


def pose_from_points3d(points3d: np.ndarray, pixels: np.ndarray, K: np.ndarray, config: PoseConfig) -> RelativePose:
    """T_dst_src by PnP from (M, 3) points in the source camera (NaN rows = no depth) to (M, 2) pixels of the
    destination camera with intrinsics K; inliers index the M rows."""
    count = len(points3d)
    valid = np.isfinite(points3d).all(1) & (points3d[:, 2] >= config.min_depth) & (points3d[:, 2] <= config.max_depth)
    if valid.sum() < config.min_matches:
        return RelativePose(False, f"too few matches with valid depth: {int(valid.sum())} < {config.min_matches}",
                            inliers=np.zeros(count, bool), method="pnp")
    solution = _pnp(points3d[valid], pixels[valid], K, config)
    if solution is None:
        return RelativePose(False, "PnP RANSAC found no pose", inliers=np.zeros(count, bool), method="pnp")
    R, t, inliers_valid = solution
    inliers = np.zeros(count, bool)
    inliers[np.flatnonzero(valid)[inliers_valid]] = True
    if inliers.sum() < config.min_inliers:
        return RelativePose(False, f"too few PnP inliers: {int(inliers.sum())} < min_inliers={config.min_inliers}",
                            inliers=inliers, method="pnp")
    obj, img = points3d[inliers], pixels[inliers].astype(np.float64)
    residuals = _reprojection_residuals(R, t, obj, img, K)
    jacobian = _numeric_jacobian(lambda d: _reprojection_residuals(*_perturb(R, t, d), obj, img, K))
    return RelativePose(True, "ok", R, t, inliers, _information(jacobian, residuals, floor=0.1), metric=True,
                        method="pnp")


def invert_relative_pose(pose: RelativePose) -> RelativePose:
    """T_0_1 from T_1_0, with the information carried through the inversion (left perturbations)."""
    if not pose.success:
        return pose
    inverse_T, information = invert_information(pose.T_1_0, pose.information)
    if pose.method == "sim3":
        raise ValueError("invert_relative_pose inverts rigid poses; invert a Sim3 with its scale")
    return RelativePose(pose.success, pose.reason, inverse_T[:3, :3], inverse_T[:3, 3], pose.inliers, information,
                        pose.metric, pose.method)


def _pose_with_depth(keypoints0, keypoints1, K0, K1, config, depth0, depth1) -> RelativePose:
    """PnP from the view with depth; with only depth1 it solves T_0_1 and inverts."""
    if depth0 is not None:
        points3d, valid = lift_to_3d(keypoints0, np.asarray(depth0), K0, config)
        points3d[~valid] = np.nan
        return pose_from_points3d(points3d, keypoints1, K1, config)
    points3d, valid = lift_to_3d(keypoints1, np.asarray(depth1), K1, config)
    points3d[~valid] = np.nan
    return invert_relative_pose(pose_from_points3d(points3d, keypoints0, K0, config))


def _pose_essential(keypoints0, keypoints1, K0, K1, config) -> RelativePose:
    count = len(keypoints0)
    rays0, rays1 = _normalise(keypoints0, K0), _normalise(keypoints1, K1)
    mean_focal = float(np.mean([K0[0, 0], K0[1, 1], K1[0, 0], K1[1, 1]]))
    threshold = config.ransac_threshold_px / mean_focal
    E, mask = cv2.findEssentialMat(rays0[:, :2], rays1[:, :2], np.eye(3), method=cv2.USAC_MAGSAC,
                                   prob=config.confidence, threshold=threshold, maxIters=config.max_iterations)
    if E is None or mask is None or E.shape != (3, 3):
        return RelativePose(False, "essential matrix estimation failed", inliers=np.zeros(count, dtype=bool))
    e_inliers = mask.ravel().astype(bool)
    if e_inliers.sum() < config.min_inliers:
        return RelativePose(False, f"too few essential-matrix inliers: {int(e_inliers.sum())} < "
                            f"min_inliers={config.min_inliers}", inliers=e_inliers, method="essential")
    # Degeneracy: if a homography explains (nearly) as many matches, the scene is a plane or the camera only
    # rotated; the essential matrix is then ill-posed and its pose should not be trusted.
    H, h_mask = cv2.findHomography(rays0[:, :2], rays1[:, :2], cv2.USAC_MAGSAC, threshold * 2.0,
                                   maxIters=config.max_iterations, confidence=config.confidence)
    if H is not None and h_mask is not None:
        h_inliers = int(h_mask.sum())
        if h_inliers >= config.homography_ratio * int(e_inliers.sum()):
            singular = np.linalg.svd(H / np.cbrt(np.linalg.det(H)), compute_uv=False)
            kind = "pure rotation (no parallax)" if singular[0] / singular[2] < 1.05 else "planar scene"
            return RelativePose(False, f"degenerate: {kind}; homography explains {h_inliers} of "
                                f"{int(e_inliers.sum())} essential inliers, monocular pose is ambiguous",
                                inliers=e_inliers, method="essential")
    _, R, t, pose_mask = cv2.recoverPose(E, rays0[:, :2], rays1[:, :2], np.eye(3), mask=mask.copy())
    inliers = e_inliers & (pose_mask.ravel() > 0)
    if inliers.sum() < config.min_inliers:
        return RelativePose(False, f"too few inliers in front of both cameras: {int(inliers.sum())}",
                            inliers=inliers, method="essential")
    t = t.ravel() / max(np.linalg.norm(t), 1e-12)
    r0, r1 = rays0[inliers], rays1[inliers]
    residuals = _sampson_residuals(R, t, r0, r1)
    jacobian = _numeric_jacobian(lambda d: _sampson_residuals(*_perturb(R, t, d), r0, r1))
    information = _information(jacobian, residuals, floor=0.1 / mean_focal)
    # Sampson residuals ignore the length of t: project that direction out explicitly for numerical hygiene.
    projector = np.eye(6)
    projector[:3, :3] -= np.outer(t, t)
    information = projector.T @ information @ projector
    return RelativePose(True, "ok", R, t, inliers, information, metric=False, method="essential")
