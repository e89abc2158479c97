"""Monocular pose graph: Similarity3 nodes, Sim3 loop factors in the engine's conventions, Sim3-aligned ATE."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from feature_matching_ros.engine.records import LoopClosure
from feature_matching_ros.eval.metrics import absolute_trajectory_error

gtsam = pytest.importorskip("gtsam", reason="gtsam (requirements.txt) is not installed")

from feature_matching_ros.eval.pose_graph import (from_gtsam_similarity, optimise_sim3_pose_graph,  # noqa: E402
                                                  sim3_information_to_gtsam, to_gtsam_similarity)
from feature_matching_ros.geometry.se3 import exp_so3  # noqa: E402


def test_similarity_conversion_round_trip_and_action():
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec([0.2, -0.1, 0.4]).as_matrix()
    T[:3, 3] = [1.0, -2.0, 0.5]
    similarity = to_gtsam_similarity(1.7, T)
    point = np.array([0.3, 0.2, 2.0])
    assert np.allclose(similarity.transformFrom(point), 1.7 * T[:3, :3] @ point + T[:3, 3])
    scale, T_back = from_gtsam_similarity(similarity)
    assert scale == pytest.approx(1.7) and np.allclose(T_back, T)


def test_information_conversion_gives_the_same_cost_as_the_engine_convention():
    """A left perturbation delta of the measurement (engine order tx ty tz rx ry rz log-s) costs
    delta^T info_left delta in GTSAM's BetweenFactor<Similarity3> after the conversion."""
    rng = np.random.default_rng(0)
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec([0.3, 0.1, -0.2]).as_matrix()
    T[:3, 3] = [0.5, 1.5, -1.0]
    scale = 0.8
    A = rng.normal(size=(7, 7))
    information_left = A @ A.T + 0.5 * np.eye(7)
    model = gtsam.noiseModel.Gaussian.Information(sim3_information_to_gtsam(information_left, scale, T))
    factor = gtsam.BetweenFactorSimilarity3(0, 1, to_gtsam_similarity(scale, T), model)
    delta = 1e-4 * rng.normal(size=7)
    # Perturbed relative similarity: X -> e^sigma exp(w) (s R X + t) + v.
    dR, ds = exp_so3(delta[3:6]), np.exp(delta[6])
    T_perturbed = np.eye(4)
    T_perturbed[:3, :3], T_perturbed[:3, 3] = dR @ T[:3, :3], ds * dR @ T[:3, 3] + delta[:3]
    values = gtsam.Values()
    values.insert(0, gtsam.Similarity3())
    values.insert(1, to_gtsam_similarity(ds * scale, T_perturbed))
    assert 2 * factor.error(values) == pytest.approx(delta @ information_left @ delta, rel=1e-3)


def _square_loop(n: int = 40, side: float = 4.0) -> np.ndarray:
    """Camera poses T_map_camera around a square (optical z forward, turning at the corners)."""
    poses = []
    for k in range(n):
        s = 4 * side * k / n
        edge, along = int(s // side), s % side
        corners = np.array([[0, 0], [side, 0], [side, side], [0, side], [0, 0]], float)
        xy = corners[edge] + along / side * (corners[edge + 1] - corners[edge])
        yaw = edge * np.pi / 2
        T = np.eye(4)
        T[:3, :3] = Rotation.from_euler("z", yaw).as_matrix() @ np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0.0]])
        T[:3, 3] = [xy[0], xy[1], 1.0]
        poses.append(T)
    return np.stack(poses)


def test_sim3_loop_corrects_scale_drift_and_improves_sim3_aligned_ate():
    gt = _square_loop()
    n = len(gt)
    local_scale = np.exp(np.linspace(0.0, 0.4, n))  # the monocular map grows 50 % over the lap
    odometry = [gt[0].copy()]
    for k in range(1, n):
        step = np.linalg.inv(gt[k - 1]) @ gt[k]
        step[:3, 3] *= local_scale[k]
        odometry.append(odometry[-1] @ step)
    odometry = np.stack(odometry)
    # Loop: last keyframe (query) against the first (match), X_match = s R X_query + t in the match's units.
    T_true = np.linalg.inv(gt[0]) @ gt[-1]
    T_loop = T_true.copy()
    T_loop[:3, 3] *= local_scale[0]
    loop = LoopClosure(n - 1, 0, 0, 0, True, "ok", T_loop, local_scale[0] / local_scale[-1], False,
                       np.eye(6), 100, 100, method="sim3", information_sim3=np.eye(7) * 1e4)
    optimised, summary = optimise_sim3_pose_graph(odometry, [loop], {i: i for i in range(n)})
    before = absolute_trajectory_error(odometry, gt, with_scale=True)["rmse"]
    after = absolute_trajectory_error(optimised, gt, with_scale=True)["rmse"]
    assert summary["loop_factors_by_kind"]["sim3"] == 1 and summary["loops_skipped_without_length"] == 0
    assert summary["final_error"] < summary["initial_error"]
    assert after < 0.5 * before, (before, after)
    # The loop holds after optimisation: the last keyframe sits where the loop puts it relative to the first.
    relative = np.linalg.inv(optimised[0]) @ optimised[-1]
    assert np.linalg.norm(relative[:3, 3] - T_loop[:3, 3]) < 0.02
    assert np.linalg.norm((np.linalg.inv(odometry[0]) @ odometry[-1])[:3, 3] - T_loop[:3, 3]) > 0.5
