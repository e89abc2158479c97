"""Pose-graph optimisation of odometry + loop closures with GTSAM (Levenberg-Marquardt, Huber on loops).

Shows the backend's job end to end in ``fmr evaluate``: odometry between-factors from consecutive
keyframes, loop between-factors from accepted LoopClosures with their information matrices.
GTSAM's BetweenFactor<Pose3> measures error as Logmap(measured^-1 * X_m^-1 * X_q): a RIGHT perturbation
ordered (rx, ry, rz, tx, ty, tz); the engine's information is converted by
:func:`feature_matching_ros.geometry.covariance.gtsam_information_from_left` (the conventions module).
Loops without metric scale (monocular essential matrix) carry no translation
magnitude and are left out of this metric graph (counted in the report).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feature_matching_ros.geometry.covariance import gtsam_information_from_left
from feature_matching_ros.engine.records import LoopClosure


@dataclass
class OdometryNoiseModel:
    """Per-step sigmas: translation abs + rel * step length, rotation abs + rel * step angle."""

    translation_abs_m: float = 0.005
    translation_rel: float = 0.03
    rotation_abs_rad: float = 0.002
    rotation_rel: float = 0.03


def _to_gtsam_information(information_left: np.ndarray, T: np.ndarray) -> np.ndarray:
    right = gtsam_information_from_left(information_left, T)
    # Numerical floor: a tiny isotropic information keeps GTSAM's Cholesky defined.
    return right + np.eye(6) * max(np.trace(right), 1.0) * 1e-9


def optimise_pose_graph(odometry_poses: np.ndarray, loops: list[LoopClosure], id_to_index: dict[int, int],
                        noise: OdometryNoiseModel | None = None, huber_k: float = 1.345
                        ) -> tuple[np.ndarray, dict]:
    """Returns the optimised (N, 4, 4) poses (frame of the first odometry pose) and a summary dict."""
    import gtsam

    noise = noise or OdometryNoiseModel()
    graph = gtsam.NonlinearFactorGraph()
    initial = gtsam.Values()
    n = len(odometry_poses)
    for i, T in enumerate(odometry_poses):
        initial.insert(i, gtsam.Pose3(np.asarray(T, np.float64)))
    graph.add(gtsam.PriorFactorPose3(0, gtsam.Pose3(np.asarray(odometry_poses[0], np.float64)),
                                     gtsam.noiseModel.Isotropic.Sigma(6, 1e-6)))
    for i in range(n - 1):
        relative = np.linalg.inv(odometry_poses[i]) @ odometry_poses[i + 1]
        step = float(np.linalg.norm(relative[:3, 3]))
        angle = float(np.arccos(np.clip((np.trace(relative[:3, :3]) - 1) / 2, -1, 1)))
        sigma_t = noise.translation_abs_m + noise.translation_rel * step
        sigma_r = noise.rotation_abs_rad + noise.rotation_rel * angle
        model = gtsam.noiseModel.Diagonal.Sigmas(np.r_[np.full(3, sigma_r), np.full(3, sigma_t)])
        graph.add(gtsam.BetweenFactorPose3(i, i + 1, gtsam.Pose3(relative), model))
    used, skipped = 0, 0
    for loop in loops:
        if not loop.metric or loop.query_id not in id_to_index or loop.match_id not in id_to_index:
            skipped += 1
            continue
        information = _to_gtsam_information(loop.information, loop.T_match_query)
        model = gtsam.noiseModel.Robust.Create(gtsam.noiseModel.mEstimator.Huber.Create(huber_k),
                                               gtsam.noiseModel.Gaussian.Information(information))
        graph.add(gtsam.BetweenFactorPose3(id_to_index[loop.match_id], id_to_index[loop.query_id],
                                           gtsam.Pose3(np.asarray(loop.T_match_query, np.float64)), model))
        used += 1
    params = gtsam.LevenbergMarquardtParams()
    params.setMaxIterations(100)
    optimiser = gtsam.LevenbergMarquardtOptimizer(graph, initial, params)
    result = optimiser.optimize()
    optimised = np.stack([result.atPose3(i).matrix() for i in range(n)])
    summary = {"optimizer": f"gtsam {getattr(gtsam, '__version__', '')} Levenberg-Marquardt".strip(),
               "nodes": n, "odometry_factors": n - 1, "loop_factors": used, "loops_skipped_non_metric": skipped,
               "initial_error": float(graph.error(initial)), "final_error": float(graph.error(result)),
               "iterations": int(optimiser.iterations())}
    return optimised, summary
