"""Evaluation metrics against hand-checked small cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from feature_matching_ros.eval.metrics import (absolute_trajectory_error, pose_auc, precision_recall_curve,
                                               relative_pose_error_deg, umeyama_alignment)


def test_pose_auc_hand_computed():
    # errors 1 and 3 deg out of 2 pairs, threshold 5: recall steps 0 ->0.5 at 1 deg, ->1 at 3 deg.
    # area = trapezoids: [0,1]: (0+0.5)/2*1 = 0.25 ; [1,3]: (0.5+1)/2*2 = 1.5 ; [3,5]: 1*2 = 2 ; total 3.75 / 5 = 75 %
    # (the protocol's curve interpolates linearly between sorted errors)
    assert pose_auc([1.0, 3.0], (5.0,))["auc@5"] == pytest.approx(75.0)
    # a failure (inf) caps recall at 0.5: [0,1]: (0+0.5)/2 = 0.25 ; [1,5]: 0.5*4 = 2 ; 2.25 / 5 = 45 %
    assert pose_auc([1.0, np.inf], (5.0,))["auc@5"] == pytest.approx(45.0)
    assert pose_auc([0.0, 0.0], (10.0,))["auc@10"] == pytest.approx(100.0)
    assert pose_auc([], (5.0,))["auc@5"] == 0.0


def test_relative_pose_error_sign_ambiguity_and_rotation():
    T_gt = np.eye(4)
    T_gt[:3, 3] = [1, 0, 0]
    T_est = np.eye(4)
    T_est[:3, :3] = Rotation.from_euler("z", 3, degrees=True).as_matrix()
    T_est[:3, 3] = [-2, 0, 0]  # opposite direction: min(180, 0) = 0 by the protocol
    r, t = relative_pose_error_deg(T_est, T_gt)
    assert r == pytest.approx(3.0) and t == pytest.approx(0.0, abs=1e-6)
    T_est[:3, 3] = [1, 1, 0]
    assert relative_pose_error_deg(T_est, T_gt)[1] == pytest.approx(45.0)


def test_precision_recall_sweep_hand_checked():
    # 5 queries; 4 have a reachable GT loop. Best candidates: scores and correctness.
    scores = np.array([100, 80, 60, 40, -np.inf])
    correct = np.array([True, False, True, True, False])
    curve = precision_recall_curve(scores, correct, num_positive_queries=4)
    assert curve.thresholds == [100, 80, 60, 40]
    assert curve.precision == pytest.approx([1.0, 0.5, 2 / 3, 0.75])
    assert curve.recall == pytest.approx([0.25, 0.25, 0.5, 0.75])
    assert curve.max_recall_at_100_precision == pytest.approx(0.25)
    assert curve.threshold_at_max_recall_100 == 100


def _random_trajectory(n=50, seed=0):
    rng = np.random.default_rng(seed)
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, 3] = np.cumsum(rng.normal(0, 1, (n, 3)), 0)
    poses[:, :3, :3] = Rotation.from_rotvec(rng.normal(0, 0.3, (n, 3))).as_matrix()
    return poses


def test_umeyama_recovers_a_known_similarity():
    gt = _random_trajectory()
    R = Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix()
    t, s = np.array([1.0, -2.0, 3.0]), 2.5
    estimated = gt.copy()
    estimated[:, :3, 3] = (gt[:, :3, 3] - t) @ R / s  # so that gt = s R est + t
    R_hat, t_hat, s_hat = umeyama_alignment(estimated[:, :3, 3], gt[:, :3, 3], with_scale=True)
    assert np.allclose(R_hat, R, atol=1e-9) and np.allclose(t_hat, t, atol=1e-9) and s_hat == pytest.approx(s)
    ate = absolute_trajectory_error(estimated, gt, with_scale=True)
    assert ate["rmse"] < 1e-9 and ate["scale"] == pytest.approx(2.5)
    # SE3 alignment cannot undo the scale: error stays large
    assert absolute_trajectory_error(estimated, gt, with_scale=False)["rmse"] > 1.0


def test_ate_of_a_known_offset():
    gt = _random_trajectory()
    estimated = gt.copy()
    estimated[::2, 0, 3] += 0.1  # alternate +0.1 / 0 along x: after alignment the best shift is 0.05
    ate = absolute_trajectory_error(estimated, gt)
    assert ate["rmse"] == pytest.approx(0.05, abs=2e-3)


def test_recall_counts_only_positive_queries():
    from feature_matching_ros.eval.metrics import precision_recall_curve

    # three correct detections, but only one query has a reachable GT loop: recall is 1, never 3
    curve = precision_recall_curve(np.array([10.0, 9.0, 8.0]), np.array([True, True, True]), 1,
                                   np.array([False, True, False]))
    assert curve.max_recall_at_100_precision == 1.0 and max(curve.recall) == 1.0 and curve.precision == [1.0] * 3
