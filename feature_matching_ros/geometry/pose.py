"""Relative pose between two calibrated views from matched keypoints.

Conventions: ``R, t`` map points from camera 0 to camera 1 (``X1 = R X0 + t``, i.e. T_1_0). Without depth
the translation is a unit direction (scale unknown); with depth in either view it is metric (PnP).
The 6x6 information matrix is the ENGINE convention of :mod:`feature_matching_ros.geometry.covariance`:
ordered (tx, ty, tz, rx, ry, rz) for a small perturbation T_1_0 <- exp([v, w]) T_1_0 on the left.
PnP: :func:`~feature_matching_ros.geometry.covariance.pnp_information`, each residual weighted by its
modelled noise (keypoint localisation in both images, depth noise growing with z^2), never more confident
than that model. Essential matrix: J^T J / sigma^2 of the Sampson errors, sigma their robust (MAD) scale
with a 1 px floor; the translation along t is unobservable (scale), and the information says so: exactly
zero along that direction.

RANSAC budget: OpenCV's USAC already stops as soon as it is ``confidence`` sure of its best model, so pairs with
many inliers cost few iterations. Pairs without a good model run to the cap; :func:`ransac_iterations` lowers
the cap from ``max_iterations`` to what finds a model with ``PoseConfig.min_inlier_ratio`` (the caller's
acceptance floor) with that confidence, so a hopeless pair costs hundreds of iterations instead of 10,000. A
best model below that floor is then reported as such ("inlier ratio ... < min_inlier_ratio"), never as a pose.
With the matcher's confidence per match (``scores``) and ``PoseConfig.sampling="confidence"`` (the default),
the essential-matrix RANSAC samples the most confident matches first (PROSAC): a good pair
finds its model in the first samples and USAC stops early. On 354 real loop candidates this made one pair's
monocular pose 3.6x faster with the same poses (benchmarks/results/keyframe_latency_gpu.md). PnP keeps uniform
sampling: it was not where verification time went, and on rendered RGB-D sequences the changed samples moved
two loops across the odometry gate's margin.

Failures are results, not exceptions: too few matches or inliers are returned with ``success=False`` and a
reason. When a homography explains the matches as well as the essential matrix (pure rotation or a single
plane), the pose comes from the homography (``method="homography"``): rotation only without parallax
(information zero on translation), else the decomposition's physically valid solution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from feature_matching_ros.config import PoseConfig
from feature_matching_ros.geometry.covariance import PIXEL_SIGMA_FLOOR_PX, pnp_information
from feature_matching_ros.geometry.se3 import exp_so3 as _exp_so3
from feature_matching_ros.geometry.se3 import invert_information, rotation_angle_deg
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
    method: str = "none"  # "essential" | "homography" | "pnp" | "sim3" | "none"
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


# Sample sizes of the minimal solvers: 5-point essential matrix, 4-point homography, P3P.
ESSENTIAL_SAMPLE, HOMOGRAPHY_SAMPLE, PNP_SAMPLE = 5, 4, 3
# All-inlier minimal samples of noisy matches do not all give the best model (local optimisation recovers most):
# the cap allows this many times the textbook count.
RANSAC_ITERATION_MARGIN = 3.0


def ransac_iterations(config: PoseConfig, sample_size: int, min_inlier_ratio: float | None = None) -> int:
    """Iteration cap of a RANSAC over minimal samples of ``sample_size``: the iterations that draw one all-inlier
    sample with probability ``config.confidence`` when the inlier ratio is ``min_inlier_ratio`` (default
    ``config.min_inlier_ratio``), log(1 - confidence) / log(1 - ratio^sample_size), times
    RANSAC_ITERATION_MARGIN, never above ``config.max_iterations``. A pair whose best model has a higher ratio
    stops earlier by USAC's own adaptive criterion; one with a lower ratio is rejected by the caller anyway."""
    ratio = config.min_inlier_ratio if min_inlier_ratio is None else min_inlier_ratio
    if ratio <= 0.0:
        return config.max_iterations
    miss = np.log1p(-min(ratio, 1.0 - 1e-9) ** sample_size)
    needed = np.log(1.0 - config.confidence) / miss
    return int(min(config.max_iterations, max(np.ceil(RANSAC_ITERATION_MARGIN * needed), 10)))


def _below_ratio_floor(num_inliers: int, count: int, config: PoseConfig, estimator: str, sample_size: int,
                       floor: float) -> str | None:
    """Reason when a RANSAC's best model stays below the ``floor`` ratio of its ``count`` inputs: its search was
    capped there (:func:`ransac_iterations`), so the model is only "none with that ratio", never a pose."""
    if floor <= 0.0 or count == 0 or num_inliers / count >= floor:
        return None
    name = "min_inlier_ratio" if floor == config.min_inlier_ratio else "min_inlier_ratio_monocular"
    return (f"inlier ratio {num_inliers / count:.2f} < {name}={floor} ({estimator} RANSAC, "
            f"{ransac_iterations(config, sample_size, floor)} iterations at most for confidence {config.confidence})")


def _usac(threshold: float, confidence: float, max_iterations: int, ordered: bool) -> cv2.UsacParams:
    """USAC with MAGSAC++ scoring and sigma-consensus local optimisation. ``ordered``: the inputs come most
    confident first, and the sampler draws from the top of that order first (PROSAC) instead of uniformly."""
    params = cv2.UsacParams()
    params.sampler = cv2.SAMPLING_PROSAC if ordered else cv2.SAMPLING_UNIFORM
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.loMethod = cv2.LOCAL_OPTIM_SIGMA
    params.threshold = threshold
    params.confidence = confidence
    params.maxIterations = max_iterations
    return params


def _confidence_order(scores: np.ndarray | None, count: int) -> np.ndarray | None:
    """Indices of the ``count`` inputs by decreasing match confidence (stable), or None without scores."""
    if scores is None:
        return None
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(scores) != count:
        raise ValueError(f"scores has {len(scores)} entries for {count} matches")
    return np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")


def _in_input_order(mask: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """A RANSAC inlier mask over confidence-ordered inputs, back in the callers' order."""
    mask = mask.ravel().astype(bool)
    if order is None:
        return mask
    unordered = np.empty_like(mask)
    unordered[order] = mask
    return unordered


def _pnp(points3d: np.ndarray, pixels: np.ndarray, K: np.ndarray, config: PoseConfig
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """RANSAC (USAC_MAGSAC, uniform sampling) PnP then Levenberg-Marquardt refinement on inliers. Returns R, t,
    inlier mask."""
    params = _usac(config.pnp_threshold_px, config.confidence, ransac_iterations(config, PNP_SAMPLE), ordered=False)
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
    scores: np.ndarray | None = None,
) -> RelativePose:
    """Pose T_1_0 from matched pixels ``keypoints0[i] <-> keypoints1[i]`` (both (M, 2)); ``scores``: (M,) match
    confidence (RANSAC samples the most confident first), or None.

    With ``depth0`` (metres, aligned with image 0) PnP solves for T_1_0 directly; with only ``depth1``
    it solves T_0_1 and inverts. Without depth: essential matrix (USAC_MAGSAC) + cheirality (_recover_pose).
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
    if config.sampling != "confidence":
        scores = None
    if depth0 is not None or depth1 is not None:
        return _pose_with_depth(keypoints0, keypoints1, K0, K1, config, depth0, depth1)
    return _pose_essential(keypoints0, keypoints1, K0, K1, config, scores)


def backproject(pixels: np.ndarray, depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(M, 2) pixels + (M,) depth (metres, NaN invalid) -> (M, 3) camera points (NaN rows where invalid)."""
    x = (pixels[:, 0] - K[0, 2]) / K[0, 0] * depth
    y = (pixels[:, 1] - K[1, 2]) / K[1, 1] * depth
    return np.stack([x, y, depth], 1).astype(np.float64)


def pose_from_points3d(points3d: np.ndarray, pixels: np.ndarray, K: np.ndarray, config: PoseConfig,
                       K_source: np.ndarray | None = None) -> RelativePose:
    """T_dst_src by PnP from (M, 3) points in the source camera (NaN rows = no depth) to (M, 2) pixels of the
    destination camera with intrinsics K; inliers index the M rows. ``K_source`` (the camera the points were
    lifted in) lets the information model the keypoint noise of both images."""
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
    low_ratio = _below_ratio_floor(int(inliers.sum()), int(valid.sum()), config, "PnP", PNP_SAMPLE,
                                   config.min_inlier_ratio)
    if low_ratio:
        return RelativePose(False, low_ratio, inliers=inliers, method="pnp")
    information = pnp_information(R, t, points3d[inliers], pixels[inliers].astype(np.float64), K, K_source=K_source)
    return RelativePose(True, "ok", R, t, inliers, information, metric=True, method="pnp")


def invert_relative_pose(pose: RelativePose) -> RelativePose:
    """T_0_1 from T_1_0, with the information carried through the inversion (left perturbations)."""
    if not pose.success:
        return pose
    if pose.method == "sim3":
        raise ValueError("invert_relative_pose inverts rigid poses; invert a Sim3 with its scale")
    inverse_T, information = invert_information(pose.T_1_0, pose.information)
    return RelativePose(pose.success, pose.reason, inverse_T[:3, :3], inverse_T[:3, 3], pose.inliers, information,
                        pose.metric, pose.method)


def _pose_with_depth(keypoints0, keypoints1, K0, K1, config, depth0, depth1) -> RelativePose:
    """PnP from the view with depth; with only depth1 it solves T_0_1 and inverts."""
    if depth0 is not None:
        points3d, valid = lift_to_3d(keypoints0, np.asarray(depth0), K0, config)
        points3d[~valid] = np.nan
        return pose_from_points3d(points3d, keypoints1, K1, config, K_source=K0)
    points3d, valid = lift_to_3d(keypoints1, np.asarray(depth1), K1, config)
    points3d[~valid] = np.nan
    return invert_relative_pose(pose_from_points3d(points3d, keypoints0, K0, config, K_source=K1))


def _pose_essential(keypoints0, keypoints1, K0, K1, config, scores=None) -> RelativePose:
    count = len(keypoints0)
    rays0, rays1 = _normalise(keypoints0, K0), _normalise(keypoints1, K1)
    mean_focal = float(np.mean([K0[0, 0], K0[1, 1], K1[0, 0], K1[1, 1]]))
    threshold = config.ransac_threshold_px / mean_focal
    order = _confidence_order(scores, count)
    sorted0, sorted1 = (rays0[:, :2], rays1[:, :2]) if order is None else (rays0[order, :2], rays1[order, :2])
    params = _usac(threshold, config.confidence,
                   ransac_iterations(config, ESSENTIAL_SAMPLE, config.min_inlier_ratio_monocular), order is not None)
    E, mask = cv2.findEssentialMat(sorted0, sorted1, np.eye(3), np.eye(3), None, None, params)
    if E is None or mask is None or E.shape != (3, 3):
        return RelativePose(False, "essential matrix estimation failed", inliers=np.zeros(count, dtype=bool))
    e_inliers = _in_input_order(mask, order)
    if e_inliers.sum() < config.min_inliers:
        return RelativePose(False, f"too few essential-matrix inliers: {int(e_inliers.sum())} < "
                            f"min_inliers={config.min_inliers}", inliers=e_inliers, method="essential")
    low_ratio = _below_ratio_floor(int(e_inliers.sum()), count, config, "essential-matrix", ESSENTIAL_SAMPLE,
                                   config.min_inlier_ratio_monocular)
    if low_ratio:
        return RelativePose(False, low_ratio, inliers=e_inliers, method="essential")
    # Degeneracy: if a homography explains (nearly) as many matches, the scene is a plane or the camera only
    # rotated; the essential matrix is then ill-posed, and the homography gives the pose instead (the rotation
    # always; the translation direction only when there is parallax). For loop closure these pairs matter:
    # revisits from nearly the same spot have little parallax, and corridors and facades are planes.
    # The homography matters once it explains homography_ratio of the essential inliers: that ratio of the matches
    # is its search floor, so a pair with parallax stops looking for a homography after a few hundred samples.
    # Uniform sampling here: OpenCV's PROSAC stops early on a homography with fewer inliers when the matches
    # are all near one (a camera that only turned: 420 instead of 587 of 612 matches on a 2-degree turn), and
    # this search is cheap either way (1.3 ms median on real loop candidates).
    homography_floor = config.homography_ratio * float(e_inliers.sum()) / count
    H, h_mask = cv2.findHomography(rays0[:, :2], rays1[:, :2], _usac(
        threshold * 2.0, config.confidence, ransac_iterations(config, HOMOGRAPHY_SAMPLE, homography_floor), False))
    if H is not None and h_mask is not None:
        h_inliers = h_mask.ravel().astype(bool)
        if h_inliers.sum() >= config.homography_ratio * int(e_inliers.sum()):
            R_essential = _recover_pose(E, rays0, rays1, e_inliers)[0]
            return _pose_homography(H, h_inliers, rays0, rays1, mean_focal, config, R_essential)
    R, t, inliers = _recover_pose(E, rays0, rays1, e_inliers)
    if inliers.sum() < config.min_inliers:
        return RelativePose(False, f"too few inliers in front of both cameras: {int(inliers.sum())}",
                            inliers=inliers, method="essential")
    t = t.ravel() / max(np.linalg.norm(t), 1e-12)
    information = _direction_information(R, t, rays0[inliers], rays1[inliers], mean_focal)
    return RelativePose(True, "ok", R, t, inliers, information, metric=False, method="essential")


# Triangulated points farther than this many baselines count as at infinity, in front of neither camera (the
# distance OpenCV's recoverPose uses): they cannot tell the decompositions apart.
_AT_INFINITY_BASELINES = 50.0


def _recover_pose(E: np.ndarray, rays0: np.ndarray, rays1: np.ndarray, inliers: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decomposition (R, unit t) of E that puts the most inliers in front of both cameras, and those inliers
    (a mask over all rays): OpenCV's recoverPose decision, with the depths of each ray pair in closed form.

    recoverPose triangulates every point with an SVD for each of the four decompositions: about 4 ms for 600
    inliers, a third of a keyframe's verification. For unit rays x0, x1 and X1 = d0 R x0 + t = d1 x1, the depths
    follow from two cross products, vectorised over all points and decompositions.
    """
    R_a, R_b, t = cv2.decomposeEssentialMat(E)
    t = t.ravel() / max(np.linalg.norm(t), 1e-12)
    index = np.flatnonzero(inliers)
    x0, x1 = rays0[index], rays1[index]
    best = None
    for R, translation in ((R_a, t), (R_b, t), (R_a, -t), (R_b, -t)):
        rotated = x0 @ R.T  # R x0
        normal = np.cross(x1, rotated)  # x1 x R x0
        squared = np.einsum("ij,ij->i", normal, normal) + 1e-300
        depth0 = -np.einsum("ij,ij->i", np.cross(x1, translation), normal) / squared
        depth1 = np.einsum("ij,ij->i", np.cross(rotated, translation), -normal) / squared
        z0 = depth0 * x0[:, 2]
        z1 = depth1 * x1[:, 2]
        in_front = (z0 > 0) & (z0 < _AT_INFINITY_BASELINES) & (z1 > 0) & (z1 < _AT_INFINITY_BASELINES)
        if best is None or in_front.sum() > best[2].sum():
            best = (R, translation, in_front)
    R, translation, in_front = best
    mask = np.zeros(len(rays0), dtype=bool)
    mask[index[in_front]] = True
    return R, translation.reshape(3, 1), mask


def _direction_information(R: np.ndarray, t: np.ndarray, rays0: np.ndarray, rays1: np.ndarray,
                           mean_focal: float) -> np.ndarray:
    """Information of a monocular pose (unit t) from the Sampson residuals of its inlier rays, exactly zero along
    t: Sampson residuals ignore the length of t, and the direction is projected out for numerical hygiene."""
    residuals = _sampson_residuals(R, t, rays0, rays1)
    jacobian = _numeric_jacobian(lambda d: _sampson_residuals(*_perturb(R, t, d), rays0, rays1))
    information = _information(jacobian, residuals, floor=PIXEL_SIGMA_FLOOR_PX / mean_focal)
    projector = np.eye(6)
    projector[:3, :3] -= np.outer(t, t)
    return projector.T @ information @ projector


_HOMOGRAPHY_TIE_DEG = 1.0  # the chosen decomposition's rotation must be this much closer to the essential one


def _transfer_residuals(R: np.ndarray, rays0: np.ndarray, rays1: np.ndarray) -> np.ndarray:
    """Rotation-only transfer error in normalised image units: project R x0 and compare with x1."""
    rotated = rays0 @ R.T
    return (rotated[:, :2] / rotated[:, 2:3] - rays1[:, :2] / rays1[:, 2:3]).ravel()


def _pose_homography(H: np.ndarray, inliers: np.ndarray, rays0: np.ndarray, rays1: np.ndarray, mean_focal: float,
                     config: PoseConfig, R_essential: np.ndarray) -> RelativePose:
    """Pose of a degenerate pair from its homography (normalised coordinates), ``method="homography"``.

    Pure rotation (singular values of H all equal): R is H projected onto SO(3), t = 0, and the information is
    zero on all of translation (unobservable without parallax). A plane: the decomposition into (R, t, n)
    keeps the solutions that put the inlier points in front of both cameras; two usually remain, explaining the
    points equally well, and the one whose rotation is closest to the essential matrix's breaks the tie (real
    scenes are rarely exactly planar). It must be clearly closer (``_HOMOGRAPHY_TIE_DEG``) or the pair is refused
    as ambiguous. The information is that of the essential-matrix residuals, zero along t (scale).
    """
    if inliers.sum() < config.min_inliers:
        return RelativePose(False, f"too few homography inliers: {int(inliers.sum())} < min_inliers="
                            f"{config.min_inliers}", inliers=inliers, method="homography")
    r0, r1 = rays0[inliers], rays1[inliers]
    H = H / np.cbrt(np.linalg.det(H))
    singular = np.linalg.svd(H, compute_uv=False)
    if singular[0] / singular[2] < 1.05:  # no parallax: the camera only rotated
        u, _, vt = np.linalg.svd(H)
        R = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
        residuals = _transfer_residuals(R, r0, r1)
        jacobian = _numeric_jacobian(lambda d: _transfer_residuals(_perturb(R, np.zeros(3), d)[0], r0, r1))
        information = _information(jacobian, residuals, floor=PIXEL_SIGMA_FLOOR_PX / mean_focal)
        information[:3, :], information[:, :3] = 0.0, 0.0
        return RelativePose(True, "ok", R, np.zeros(3), inliers, information, metric=False, method="homography")
    _, rotations, translations, normals = cv2.decomposeHomographyMat(H, np.eye(3))
    visible = cv2.filterHomographyDecompByVisibleRefpoints(
        rotations, normals, r0[:, None, :2].astype(np.float32), r1[:, None, :2].astype(np.float32))
    options = range(len(rotations)) if visible is None else visible.ravel()
    ranked = sorted((rotation_angle_deg(rotations[i].T @ R_essential), i) for i in options
                    if np.linalg.norm(translations[i]) > 1e-9)
    if not ranked:
        return RelativePose(False, "degenerate: planar scene whose homography has no valid decomposition",
                            inliers=inliers, method="homography")
    if len(ranked) > 1 and ranked[1][0] - ranked[0][0] < _HOMOGRAPHY_TIE_DEG:
        return RelativePose(False, "degenerate: planar scene with two equally valid poses (homography "
                            "decomposition ambiguous)", inliers=inliers, method="homography")
    R, t = rotations[ranked[0][1]], translations[ranked[0][1]].ravel()
    t = t / np.linalg.norm(t)
    information = _direction_information(R, t, r0, r1, mean_focal)
    return RelativePose(True, "ok", R, t, inliers, information, metric=False, method="homography")
