"""Pose-graph optimisation of odometry + loop closures with GTSAM (Levenberg-Marquardt, Huber on loops).

Shows the backend's job end to end in ``fmr evaluate``: odometry between-factors from consecutive
keyframes, loop between-factors from accepted LoopClosures with their information matrices.

Metric odometry (``optimise_pose_graph``): Pose3 nodes. GTSAM's BetweenFactor<Pose3> measures error as
Logmap(measured^-1 * X_m^-1 * X_q): a RIGHT perturbation ordered (rx, ry, rz, tx, ty, tz). The engine's
information is converted by :func:`feature_matching_ros.geometry.covariance.gtsam_information_from_left`
(the conventions module). Loops without metric scale are left out of this metric graph (counted in the report).

Monocular odometry, whose scale drifts (``optimise_sim3_pose_graph``): Similarity3 nodes S_map_camera, as
ORB-SLAM3's essential graph. Odometry steps are Sim3 measurements with scale 1 and a log-scale sigma per step
(the drift the graph may redistribute); Sim3 loops are BetweenFactor<Similarity3> with their 7x7 information.
Essential-matrix loops are left out (counted): they say nothing about length or scale, and the only check on
them is rotation, so a look-alike place one corridor over would pull the graph (measured: a false essential loop
doubled the ATE of a rendered corridor). GTSAM's Similarity3 is (R, t_g, s) acting as p -> s (R p + t_g), so the engine's
X_match = s R X_query + t is Similarity3(R, t / s, s); its tangent is (rx, ry, rz, tx, ty, tz, log s), equal to
first order to the engine's left coordinates (tx, ty, tz, rx, ry, rz, log s) reordered; the left information goes
right through GTSAM's own Similarity3.AdjointMap (S exp(d) = exp(Ad d) S).
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
    # Monocular odometry only: sigma of the log-scale change per keyframe step (scale drift, Sim3 graph).
    log_scale_per_step: float = 0.01


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
        sigma_r, sigma_t = _odometry_sigmas(relative, noise)
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


def _odometry_sigmas(relative: np.ndarray, noise: OdometryNoiseModel) -> tuple[float, float]:
    step = float(np.linalg.norm(relative[:3, 3]))
    angle = float(np.arccos(np.clip((np.trace(relative[:3, :3]) - 1) / 2, -1, 1)))
    return noise.rotation_abs_rad + noise.rotation_rel * angle, noise.translation_abs_m + noise.translation_rel * step


def to_gtsam_similarity(scale: float, T: np.ndarray):
    """gtsam.Similarity3 of X -> scale R X + t for the rigid 4x4 T = [R, t]."""
    import gtsam

    return gtsam.Similarity3(gtsam.Rot3(np.asarray(T[:3, :3], np.float64)), np.asarray(T[:3, 3], np.float64) / scale,
                             float(scale))


def from_gtsam_similarity(similarity) -> tuple[float, np.ndarray]:
    """(scale, rigid 4x4 [R, t]) of a gtsam.Similarity3, in the engine's convention X -> scale R X + t."""
    matrix = similarity.matrix()
    matrix = matrix / matrix[3, 3]  # [R, t_g; 0, 1/s] -> [s R, s t_g; 0, 1]
    scale = float(similarity.scale())
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = matrix[:3, :3] / scale, matrix[:3, 3]
    return scale, T


def sim3_information_to_gtsam(information_left: np.ndarray, scale: float, T: np.ndarray) -> np.ndarray:
    """The engine's 7x7 left information over (tx, ty, tz, rx, ry, rz, log s) of X -> scale R X + t -> the
    right information in GTSAM's Similarity3 tangent order (rx, ry, rz, tx, ty, tz, log s)."""
    order = [3, 4, 5, 0, 1, 2, 6]
    left = np.asarray(information_left, np.float64)[np.ix_(order, order)]
    ad = to_gtsam_similarity(scale, T).AdjointMap()
    right = ad.T @ left @ ad
    right = 0.5 * (right + right.T)
    return right + np.eye(7) * max(np.trace(right), 1.0) * 1e-9


def optimise_sim3_pose_graph(odometry_poses: np.ndarray, loops: list[LoopClosure], id_to_index: dict[int, int],
                             noise: OdometryNoiseModel | None = None, huber_k: float = 1.345
                             ) -> tuple[np.ndarray, dict]:
    """Monocular pose graph (module docstring). Returns the optimised (N, 4, 4) rigid poses T_map_camera (camera
    centres and orientations of the Sim3 nodes, in the frame and units of the first odometry pose), the per-node
    scale (N,) (how much each keyframe's map was rescaled) in the summary, and a summary dict."""
    import gtsam

    noise = noise or OdometryNoiseModel()
    graph = gtsam.NonlinearFactorGraph()
    initial = gtsam.Values()
    n = len(odometry_poses)
    for i, T in enumerate(odometry_poses):
        initial.insert(i, to_gtsam_similarity(1.0, np.asarray(T, np.float64)))
    graph.add(gtsam.PriorFactorSimilarity3(0, to_gtsam_similarity(1.0, odometry_poses[0]),
                                           gtsam.noiseModel.Isotropic.Sigma(7, 1e-6)))
    for i in range(n - 1):
        relative = np.linalg.inv(odometry_poses[i]) @ odometry_poses[i + 1]
        sigma_r, sigma_t = _odometry_sigmas(relative, noise)
        model = gtsam.noiseModel.Diagonal.Sigmas(np.r_[np.full(3, sigma_r), np.full(3, sigma_t),
                                                       noise.log_scale_per_step])
        graph.add(gtsam.BetweenFactorSimilarity3(i, i + 1, to_gtsam_similarity(1.0, relative), model))
    counts = {"sim3": 0, "metric": 0, "without_length": 0, "unknown_keyframes": 0}
    for loop in loops:
        if loop.query_id not in id_to_index or loop.match_id not in id_to_index:
            counts["unknown_keyframes"] += 1
            continue
        match, query = id_to_index[loop.match_id], id_to_index[loop.query_id]
        T = np.asarray(loop.T_match_query, np.float64).copy()
        if loop.method == "sim3" and loop.information_sim3 is not None:
            scale, information = loop.scale, loop.information_sim3
            counts["sim3"] += 1
        elif loop.metric:  # a metric loop fixes the relative scale too
            scale, information = 1.0, np.zeros((7, 7))
            information[:6, :6] = loop.information
            information[6, 6] = 1.0 / 1e-3 ** 2
            counts["metric"] += 1
        else:  # essential matrix: no length, no scale; see the module docstring
            counts["without_length"] += 1
            continue
        model = gtsam.noiseModel.Robust.Create(gtsam.noiseModel.mEstimator.Huber.Create(huber_k),
                                               gtsam.noiseModel.Gaussian.Information(
                                                   sim3_information_to_gtsam(information, scale, T)))
        graph.add(gtsam.BetweenFactorSimilarity3(match, query, to_gtsam_similarity(scale, T), model))
    params = gtsam.LevenbergMarquardtParams()
    params.setMaxIterations(100)
    optimiser = gtsam.LevenbergMarquardtOptimizer(graph, initial, params)
    result = optimiser.optimize()
    parts = [from_gtsam_similarity(result.atSimilarity3(i)) for i in range(n)]
    optimised = np.stack([T for _, T in parts])
    summary = {"optimizer": f"gtsam {getattr(gtsam, '__version__', '')} Levenberg-Marquardt, Similarity3 nodes".strip(),
               "nodes": n, "odometry_factors": n - 1,
               "loop_factors": counts["sim3"] + counts["metric"],
               "loop_factors_by_kind": {"sim3": counts["sim3"], "metric": counts["metric"]},
               "loops_skipped_without_length": counts["without_length"],
               "loops_skipped_unknown_keyframes": counts["unknown_keyframes"],
               "node_scale": {"min": float(min(s for s, _ in parts)), "max": float(max(s for s, _ in parts))},
               "initial_error": float(graph.error(initial)), "final_error": float(graph.error(result)),
               "iterations": int(optimiser.iterations())}
    return optimised, summary
