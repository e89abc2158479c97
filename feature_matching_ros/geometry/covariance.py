"""Covariance and information conventions in one place, and a PnP information that models its noise.

A 6-DoF uncertainty means nothing without saying which perturbation of the pose it describes. Three
conventions meet in this package (``T_a_b = (R, p)`` maps points from b to a; ``[x]`` is the skew matrix):

ENGINE (``RelativePose.information``, ``LoopClosure.information``, the LoopClosure message's ``information``)
    LEFT perturbation ordered (translation, rotation): ``T_a_b <- exp([v, w]) T_a_b`` with ``v, w`` in frame a
    (for a loop's ``T_match_query``: the match keyframe's camera frame). The twist translation ``v`` is not a
    position change: the position moves by ``v + w x p``.

ROS ``geometry_msgs/PoseWithCovariance`` (``relocalization_pose``)
    position perturbed additively in the parent frame, rotation about the fixed parent axes, ordered
    (x, y, z, rot x, rot y, rot z): ``p <- p + dp``, ``R <- exp(dtheta) R``. Position uncertainty does not depend
    on where the parent frame's origin is. From ENGINE: ``dp = v + w x p = v - [p] w``, ``dtheta = w``.

GTSAM ``Pose3`` (``BetweenFactorPose3`` noise models, ``Marginals``)
    RIGHT perturbation ordered (rotation, translation): ``T <- T exp([w_b, v_b])``, body frame. Since
    ``T exp(xi_b) = exp(Ad_T xi_b) T``, ENGINE xi = Ad_T xi_b, so ``information_b = Ad_T^T information Ad_T``
    with the blocks swapped.

All functions are first order (small perturbations), symmetric in, symmetric out. ``Ad_T`` for (t, r) ordered
twists is ``[[R, [p] R], [0, R]]``.

PnP information (:func:`pnp_information`): the pose of a destination camera from 3D points measured in a source
camera (pixel + depth) and their pixels in the destination. Every inlier's reprojection residual has the
covariance of its noise sources, propagated to the destination image:
  * keypoint localisation in the destination image, ``pixel_sigma_px`` per axis;
  * keypoint localisation in the source image, moving the back-projected point sideways by ``sigma_px z / f``;
  * depth noise along the source ray, ``sigma_z = depth_sigma_abs_m + depth_sigma_quadratic_per_m * z^2``
    (the structured-light / stereo model: disparity noise grows as z^2; the defaults are close to a Kinect-class
    sensor, Nguyen et al. 2012: 1.5 mm + 1.9 mm/m^2 * z^2, i.e. ~2 cm at 3 m, ~5 cm at 5 m; for a stereo pair
    ``b = sigma_disparity / (f * baseline)``).
The information is the sum of ``J_i^T C_i^-1 J_i``; when the refined residuals are larger than this model
predicts (robust scale of the whitened residuals > 1) the information is scaled down by that excess, never up:
the data may show more noise than modelled, never less (RANSAC inliers are truncated at the threshold, so
small residuals prove nothing). Why a 1 px floor on keypoint noise: FAST/ORB corners are found on integer
pixels (0.29 px rms from rounding alone), detector repeatability across viewpoints is ~0.5-1 px, calibration
leaves 0.2-0.5 px rms, and depth is read at the nearest pixel; 1 px per axis is what these add up to, and the
previous 0.1 px made a 500-inlier loop look ~10x more certain than its real error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feature_matching_ros.geometry.se3 import adjoint, skew  # noqa: F401  (re-exported: conventions live here)

# Variance given to a direction the information does not constrain (e.g. the monocular translation scale) when
# a covariance must be reported: large, finite (ROS consumers reject inf/NaN), and obviously "unknown".
UNOBSERVED_VARIANCE = 1e6
# Per-axis keypoint localisation noise floor in pixels (see the module docstring for why 1 px).
PIXEL_SIGMA_FLOOR_PX = 1.0


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return 0.5 * (matrix + matrix.T)


def _swap_blocks(matrix: np.ndarray) -> np.ndarray:
    """(t, r) <-> (r, t) ordering of a 6x6 matrix."""
    order = [3, 4, 5, 0, 1, 2]
    return matrix[np.ix_(order, order)]


# ------------------------------------------------------------------------------------------ ENGINE <-> ROS
def left_to_ros_jacobian(T_parent_child: np.ndarray) -> np.ndarray:
    """6x6 J with (dp, dtheta) = J (v, w): ENGINE left twist of T_parent_child -> ROS pose perturbation."""
    jacobian = np.eye(6)
    jacobian[:3, 3:] = -skew(T_parent_child[:3, 3])
    return jacobian


def ros_covariance_from_left(covariance_left: np.ndarray, T_parent_child: np.ndarray) -> np.ndarray:
    """ROS PoseWithCovariance covariance of T_parent_child from its ENGINE (left, (t, r)) covariance."""
    jacobian = left_to_ros_jacobian(T_parent_child)
    return _symmetric(jacobian @ np.asarray(covariance_left, np.float64) @ jacobian.T)


def left_covariance_from_ros(covariance_ros: np.ndarray, T_parent_child: np.ndarray) -> np.ndarray:
    """ENGINE (left, (t, r)) covariance of T_parent_child from a ROS PoseWithCovariance covariance."""
    inverse = np.linalg.inv(left_to_ros_jacobian(T_parent_child))
    return _symmetric(inverse @ np.asarray(covariance_ros, np.float64) @ inverse.T)


# ------------------------------------------------------------------------------------------ ENGINE <-> GTSAM
def gtsam_information_from_left(information_left: np.ndarray, T: np.ndarray) -> np.ndarray:
    """GTSAM Pose3 information (right perturbation, (rot, trans)) of T from ENGINE (left, (t, r)) information."""
    ad = adjoint(T)
    return _symmetric(_swap_blocks(ad.T @ np.asarray(information_left, np.float64) @ ad))


def left_information_from_gtsam(information_gtsam: np.ndarray, T: np.ndarray) -> np.ndarray:
    """ENGINE (left, (t, r)) information of T from GTSAM Pose3 information (right, (rot, trans))."""
    inverse = np.linalg.inv(adjoint(T))
    return _symmetric(inverse.T @ _swap_blocks(np.asarray(information_gtsam, np.float64)) @ inverse)


# ------------------------------------------------------------------------------------------ information <-> covariance
def covariance_from_information(information: np.ndarray, relative_floor: float = 1e-9) -> np.ndarray:
    """Covariance from a (possibly singular) information matrix: directions whose information is below
    ``relative_floor`` x the largest eigenvalue get UNOBSERVED_VARIANCE instead of an infinite variance."""
    eigenvalues, vectors = np.linalg.eigh(_symmetric(np.asarray(information, np.float64)))
    largest = max(float(eigenvalues.max()), 1e-300)
    observed = eigenvalues > relative_floor * largest
    variances = np.where(observed, 1.0 / np.where(observed, eigenvalues, 1.0), UNOBSERVED_VARIANCE)
    return _symmetric((vectors * variances) @ vectors.T)


def relocalization_covariance(T_map_match: np.ndarray, T_match_query: np.ndarray,
                              information_match_query: np.ndarray) -> np.ndarray:
    """ROS PoseWithCovariance covariance of T_map_query = T_map_match T_match_query, from the loop's ENGINE
    information on T_match_query (the map keyframe's pose taken as exact). Only the query-to-keyframe lever
    arm enters, so the same local uncertainty gives the same sigma at the origin and 100 m away from it."""
    covariance_match = covariance_from_information(information_match_query)
    ad = adjoint(T_map_match)  # T_map_match exp(xi) T_match_query = exp(Ad xi) T_map_query
    covariance_map_left = ad @ covariance_match @ ad.T
    return ros_covariance_from_left(covariance_map_left, T_map_match @ T_match_query)


# ------------------------------------------------------------------------------------------ PnP information
@dataclass(frozen=True)
class PnPNoiseModel:
    """Noise of one PnP correspondence (see the module docstring): pixels per axis, depth sigma a + b z^2."""

    pixel_sigma_px: float = PIXEL_SIGMA_FLOOR_PX
    depth_sigma_abs_m: float = 0.0015
    depth_sigma_quadratic_per_m: float = 0.0019

    def depth_sigma(self, z: np.ndarray) -> np.ndarray:
        return self.depth_sigma_abs_m + self.depth_sigma_quadratic_per_m * np.square(z)


def pnp_residual_covariances(R: np.ndarray, t: np.ndarray, points3d: np.ndarray, K: np.ndarray,
                             noise: PnPNoiseModel, K_source: np.ndarray | None = None) -> np.ndarray:
    """(M, 2, 2) predicted covariance of each reprojection residual (pixels^2) in the destination image.

    ``points3d`` (M, 3): points in the SOURCE camera (back-projected pixel + depth); ``R, t``: T_dst_src;
    ``K`` the destination intrinsics, ``K_source`` the source's (default ``K``)."""
    K_source = K if K_source is None else K_source
    points = np.asarray(points3d, np.float64)
    z_source = points[:, 2]
    ray = points / z_source[:, None]  # d X / d z
    sigma_px = noise.pixel_sigma_px
    covariance_source = (np.square(noise.depth_sigma(z_source))[:, None, None] * ray[:, :, None] * ray[:, None, :])
    lateral = np.square(sigma_px * z_source)
    covariance_source[:, 0, 0] += lateral / K_source[0, 0] ** 2
    covariance_source[:, 1, 1] += lateral / K_source[1, 1] ** 2
    camera = points @ R.T + t
    projection = _projection_jacobian(camera, K)  # (M, 2, 3)
    moved = projection @ R  # d residual / d X_source
    covariance = moved @ covariance_source @ moved.transpose(0, 2, 1)
    covariance[:, 0, 0] += sigma_px**2
    covariance[:, 1, 1] += sigma_px**2
    return covariance


def _projection_jacobian(camera: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(M, 2, 3) d pixel / d camera point for (M, 3) points in front of the camera."""
    x, y, z = camera[:, 0], camera[:, 1], camera[:, 2]
    jacobian = np.zeros((len(camera), 2, 3))
    jacobian[:, 0, 0] = K[0, 0] / z
    jacobian[:, 0, 2] = -K[0, 0] * x / z**2
    jacobian[:, 1, 1] = K[1, 1] / z
    jacobian[:, 1, 2] = -K[1, 1] * y / z**2
    return jacobian


def pnp_pose_jacobian(R: np.ndarray, t: np.ndarray, points3d: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(M, 2, 6) d reprojection residual / d ENGINE twist (left, (t, r)) of T_dst_src = (R, t)."""
    camera = np.asarray(points3d, np.float64) @ R.T + t
    projection = _projection_jacobian(camera, K)
    # exp([v, w]) X = X + v + w x X = X + v - [X] w
    twist = np.zeros((len(camera), 3, 6))
    twist[:, :, :3] = np.eye(3)
    twist[:, 0, 4], twist[:, 0, 5] = camera[:, 2], -camera[:, 1]
    twist[:, 1, 3], twist[:, 1, 5] = -camera[:, 2], camera[:, 0]
    twist[:, 2, 3], twist[:, 2, 4] = camera[:, 1], -camera[:, 0]
    return projection @ twist


def pnp_information(R: np.ndarray, t: np.ndarray, points3d: np.ndarray, pixels: np.ndarray, K: np.ndarray,
                    noise: PnPNoiseModel | None = None, K_source: np.ndarray | None = None) -> np.ndarray:
    """6x6 ENGINE information (left, (t, r)) of T_dst_src = (R, t) from PnP inliers.

    ``points3d`` (M, 3) in the source camera, ``pixels`` (M, 2) in the destination image (intrinsics ``K``).
    Sum of J_i^T C_i^-1 J_i with C_i from :func:`pnp_residual_covariances`, divided by the squared robust scale
    of the whitened residuals when that exceeds 1 (more noise than modelled)."""
    noise = noise or PnPNoiseModel()
    points = np.asarray(points3d, np.float64)
    if not len(points):
        return np.zeros((6, 6))
    covariances = pnp_residual_covariances(R, t, points, K, noise, K_source)
    weights = np.linalg.inv(covariances)  # (M, 2, 2)
    jacobians = pnp_pose_jacobian(R, t, points, K)
    information = np.einsum("mai,mab,mbj->ij", jacobians, weights, jacobians)
    camera = points @ R.T + t
    residuals = camera[:, :2] / camera[:, 2:3] * [K[0, 0], K[1, 1]] + [K[0, 2], K[1, 2]] - np.asarray(pixels)
    whitened = np.einsum("mab,mb->ma", np.linalg.cholesky(weights).transpose(0, 2, 1), residuals)
    excess = 1.4826 * float(np.median(np.abs(whitened))) if whitened.size else 0.0
    return _symmetric(information / max(excess, 1.0) ** 2)
