"""Sim3 from 3D-3D matches: Umeyama with scale, RANSAC with two-sided reprojection, information conventions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from feature_matching_ros.config import PoseConfig
from feature_matching_ros.geometry.se3 import rotation_angle_deg
from feature_matching_ros.geometry.sim3 import (DegenerateSim3Error, estimate_sim3, sim3_information,
                                                umeyama)

K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])


def _project(points: np.ndarray) -> np.ndarray:
    return points[:, :2] / points[:, 2:3] * 500.0 + [320, 240]


def _scene(seed: int, count: int = 200, outliers: float = 0.3, pixel_noise: float = 0.5, scale0: float = 0.8,
           scale1: float = 1.36):
    """Points seen by two cameras 1.2 m apart; each side's backend holds them in its own units (scale0, scale1
    times metres), so the true similarity has s = scale1 / scale0 = 1.7. A fraction of the pairs is wrong."""
    rng = np.random.default_rng(seed)
    R = Rotation.from_euler("xyz", [4, -12, 3], degrees=True).as_matrix()
    t = np.array([-1.0, 0.1, 0.6])
    X0 = np.c_[rng.uniform(-3, 3, count), rng.uniform(-2, 2, count), rng.uniform(3, 9, count)]
    X1 = X0 @ R.T + t
    pixels0 = _project(X0) + rng.normal(0, pixel_noise, (count, 2))
    pixels1 = _project(X1) + rng.normal(0, pixel_noise, (count, 2))
    # Monocular map points: noisy mostly along the viewing ray (depth), 1 %.
    points0 = scale0 * X0 * (1 + rng.normal(0, 0.01, (count, 1)))
    points1 = scale1 * X1 * (1 + rng.normal(0, 0.01, (count, 1)))
    wrong = rng.random(count) < outliers
    pixels1[wrong] = rng.uniform([0, 0], [640, 480], (int(wrong.sum()), 2))
    points1[wrong] = scale1 * np.c_[rng.uniform(-3, 3, wrong.sum()), rng.uniform(-2, 2, wrong.sum()),
                                    rng.uniform(3, 9, wrong.sum())]
    return points0, points1, pixels0, pixels1, R, t * scale1, scale1 / scale0, wrong


def test_umeyama_recovers_a_known_similarity_exactly_and_with_weights():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(30, 3))
    R = Rotation.from_rotvec([0.3, -0.2, 0.9]).as_matrix()
    target = 1.7 * source @ R.T + [1.0, -2.0, 0.5]
    scale, R_hat, t_hat = umeyama(source, target)
    assert scale == pytest.approx(1.7, rel=1e-12)
    assert np.allclose(R_hat, R, atol=1e-12) and np.allclose(t_hat, [1.0, -2.0, 0.5], atol=1e-12)
    # Weights: a gross outlier with zero weight changes nothing; with weight it does.
    corrupted = target.copy()
    corrupted[0] += 50.0
    weights = np.ones(30)
    weights[0] = 0.0
    assert umeyama(source, corrupted, weights)[0] == pytest.approx(1.7, rel=1e-12)
    assert abs(umeyama(source, corrupted)[0] - 1.7) > 0.05
    assert umeyama(source, target, with_scale=False)[0] == 1.0


def test_umeyama_refuses_degenerate_input_with_a_reason():
    line = np.outer(np.linspace(0, 1, 10), [1.0, 2.0, 3.0])
    with pytest.raises(DegenerateSim3Error, match="collinear"):
        umeyama(line, 2 * line)
    with pytest.raises(DegenerateSim3Error, match="at least 3"):
        umeyama(np.eye(3)[:2], np.eye(3)[:2])
    with pytest.raises(DegenerateSim3Error, match="coincide"):
        umeyama(np.ones((5, 3)), np.ones((5, 3)))
    points = np.eye(3)
    points[1, 1] = np.nan
    with pytest.raises(DegenerateSim3Error, match="NaN"):
        umeyama(points, np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        umeyama(np.zeros((4, 2)), np.zeros((4, 2)))


def test_ransac_sim3_recovers_scale_rotation_translation_among_outliers():
    points0, points1, pixels0, pixels1, R, t, scale, wrong = _scene(1)
    pose = estimate_sim3(points0, points1, pixels0, pixels1, K, K, PoseConfig())
    assert pose.success and pose.method == "sim3" and not pose.metric
    assert pose.scale == pytest.approx(scale, rel=0.01)
    assert rotation_angle_deg(pose.R.T @ R) < 0.3
    assert np.linalg.norm(pose.t - t) < 0.02 * np.linalg.norm(t)
    # Inliers: nearly all the right pairs, none of the wrong ones.
    assert (pose.inliers & wrong).sum() <= 2
    assert (pose.inliers & ~wrong).sum() >= 0.9 * (~wrong).sum()
    assert pose.median_residual_px < 1.5
    assert np.all(np.linalg.eigvalsh(pose.information_sim3) > 0)
    assert np.all(np.linalg.eigvalsh(pose.information) > 0)


def test_pairs_with_one_side_or_no_3d_are_counted_by_reprojection_and_epipolar_geometry():
    points0, points1, pixels0, pixels1, R, t, scale, wrong = _scene(2, outliers=0.0)
    points0[:60] = np.nan  # side 0 has no point: side 1's point reprojected into image 0 decides
    points1[50:100] = np.nan  # (50..59 have no 3D at all: the epipolar geometry decides)
    pose = estimate_sim3(points0, points1, pixels0, pixels1, K, K)
    assert pose.success and pose.scale == pytest.approx(scale, rel=0.01)
    assert pose.inliers[:50].mean() > 0.9 and pose.inliers[60:100].mean() > 0.9 and pose.inliers[50:60].mean() > 0.8


def test_sim3_failures_are_results_with_reasons():
    points0, points1, pixels0, pixels1, *_ = _scene(3, count=40, outliers=0.0)
    points1[10:] = np.nan
    pose = estimate_sim3(points0, points1, pixels0, pixels1, K, K)
    assert not pose.success and "too few matches with 3D on both sides: 10" in pose.reason
    assert not estimate_sim3(None, points1, pixels0, pixels1, K, K).success
    # Every 3D point on one line (a pole): no rotation about it, no scale from a single direction.
    rng = np.random.default_rng(4)
    along = rng.uniform(3, 8, 60)
    line0 = np.c_[0.2 * along, 0.1 * along, along]
    line1 = 1.7 * (line0 + [0.3, 0, 0])
    pose = estimate_sim3(line0, line1, _project(line0), _project(line1 / 1.7), K, K)
    assert not pose.success and ("degenerate" in pose.reason or "collinear" in pose.reason)


def test_information_matches_the_spread_of_repeated_estimates():
    """The 7x7 information is in the documented convention: its inverse predicts the scatter of log-scale and of
    the rotation over noise draws (within a factor of 2)."""
    log_scales, rotations, sigmas = [], [], []
    for seed in range(20):
        points0, points1, pixels0, pixels1, R, t, scale, _ = _scene(100 + seed, count=120, outliers=0.0,
                                                                    pixel_noise=1.0)
        # 3D of side 1 made consistent with the pixels (no depth noise) so that pixel noise is the only error
        pose = estimate_sim3(points0, points1, pixels0, pixels1, K, K)
        covariance = np.linalg.inv(pose.information_sim3)
        log_scales.append(np.log(pose.scale / scale))
        rotations.append(Rotation.from_matrix(pose.R @ R.T).as_rotvec())
        sigmas.append(np.sqrt(np.diag(covariance)))
    predicted = np.mean(sigmas, axis=0)
    observed_scale = np.std(log_scales)
    observed_rotation = np.std(rotations, axis=0)
    assert 0.5 < observed_scale / predicted[6] < 2.0
    assert np.all((0.4 < observed_rotation / predicted[3:6]) & (observed_rotation / predicted[3:6] < 2.5))


def test_rigid_information_marginalises_the_scale():
    rng = np.random.default_rng(5)
    A = rng.normal(size=(7, 7))
    information7 = A @ A.T + np.eye(7)
    t = np.array([1.0, 2.0, -0.5])
    rigid = sim3_information(information7, t)
    # Marginal = inverse of the covariance block in SE(3) coordinates (v' = v + sigma t).
    to_rigid = np.eye(7)
    to_rigid[:3, 6] = t
    covariance_rigid = to_rigid @ np.linalg.inv(information7) @ to_rigid.T
    assert np.allclose(np.linalg.inv(rigid), covariance_rigid[:6, :6], atol=1e-9)
