"""Run the loop-closure engine offline over a rosbag and measure it (``fmr evaluate``).

No DDS: frames come from the bag reader (``feature_matching_ros.bag.read_sequence``) and go straight into
:class:`LoopClosureEngine`, keyframe by keyframe, with the backend pose of each keyframe taken from the
odometry topic (what a SLAM frontend would hand over). What is measured, per preset:
  * loop closure: precision / recall at the preset's thresholds, the PR curve swept over the inlier count of
    each query's best geometrically verified candidate, max recall at 100 % precision, every false positive;
  * relative pose error of accepted true loops and AUC@5/10/20 (MODELS.md protocol);
  * relocalization: images of revisits relocalized against the map (poses = ground truth) with the query's
    own time neighbourhood excluded; success rate and pose errors;
  * latency per stage (percentiles);
  * ATE RMSE of odometry before and after a GTSAM pose graph with the accepted loops: SE3 graph and SE3
    alignment with depth; monocular (no depth) a Sim3 graph with the Sim3 loops (from backend map points;
    essential-matrix loops carry no length and stay out) and Sim3 alignment.
Which detections count as correct (``judge_loop``; also written to metrics.json "loop.correctness"):
the GT loop set (loops.json / --gt-loops) is strict: pairs closer than the scene's loop distance with
view overlap >= 0.3. A verified loop between two frames farther apart that still see the same surfaces is a
correct loop for a backend if its relative pose is right, so when GT poses are known:
  * WRONG POSE -> always false, in the GT set or not: metric loops with translation error > 0.5 m or
    rotation error > 5 deg; monocular loops with rotation error > 5 deg, or a translation direction error
    > 10 deg when the true baseline is >= 0.5 m (shorter baselines leave the direction undefined);
  * correct pose and in the GT set -> true;
  * correct pose, not in the GT set, and view overlap >= 0.1 in both directions (depth-checked, the GT
    labeller's definition with a lower bound: "they see a common surface") -> true ("overlap");
  * correct MONOCULAR pose, not in the GT set, no depth, baseline >= 0.5 m so that the translation direction
    was judged -> true ("pose"): rotation within 5 deg and direction within 10 deg of a baseline of metres is
    geometry that only a view of common structure produces (a look-alike place one period over gives the
    direction to the wrong camera);
  * otherwise (correct pose but no depth to prove overlap and no judged direction, or no overlap) -> false.
Without GT poses only the GT set decides. The thresholds are fixed here, never taken from a run.
Ground truth loops: ``--gt-loops`` JSON ([query_index, match_index] pairs, 0-based image indices), else
``loops.json`` next to the bag directory (written by ``fmr make-sequence``), else derived from poses and
depth (distance + view overlap, ``scenes.loops.label_loops``). Missing inputs skip what needs them, and
metrics.json says what was skipped and why. Frames are held in memory (fine for the generated sequences;
a long 640x480 bag needs ~1 MB per keyframe).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from feature_matching_ros.eval.metrics import (absolute_trajectory_error, percentiles, pose_auc,
                                               precision_recall_curve, relative_pose_error_deg, rotation_angle_deg)

LOG = logging.getLogger("fmr.evaluate")


@dataclass
class EvalFrame:
    index: int
    stamp_ns: int
    image: np.ndarray
    K: np.ndarray
    depth: np.ndarray | None
    T_gt: np.ndarray | None
    T_odom: np.ndarray | None
    map_points: tuple[np.ndarray, np.ndarray] | None = None  # backend (pixels (P, 2), camera points (P, 3))


def load_frames(bag: Path, topics, keyframe_every: int, max_frames: int | None, default_K: np.ndarray | None
                ) -> list[EvalFrame]:
    from feature_matching_ros.bag import read_sequence

    frames = []
    for frame in read_sequence(bag, topics):
        if max_frames is not None and frame.index >= max_frames:
            break
        if frame.index % keyframe_every:
            continue
        K = frame.K if frame.K is not None else default_K
        if K is None:
            raise ValueError(f"frame {frame.index} has no camera info on {topics.camera_info} and no --K was given")
        frames.append(EvalFrame(frame.index, frame.stamp_ns, frame.image, K, frame.depth, frame.T_map_camera,
                                frame.T_odom_camera, frame.map_points))
    if not frames:
        raise ValueError(f"no frames read from {bag} on {topics.image}")
    return frames


def ground_truth_loops(frames: list[EvalFrame], bag: Path, gt_file: Path | None) -> tuple[set[tuple[int, int]], str]:
    """GT loop pairs (query_index, match_index) in image-topic indices, and where they came from."""
    for path, label in ((gt_file, "--gt-loops"), (bag.parent / "loops.json", "loops.json beside the bag")):
        if path is not None and Path(path).is_file():
            pairs = json.loads(Path(path).read_text())
            return {(int(q), int(m)) for q, m in pairs}, f"{label}: {path}"
    if all(f.T_gt is not None and f.depth is not None for f in frames):
        from feature_matching_ros.scenes.loops import LoopCriteria, label_loops

        criteria = LoopCriteria(distance_m=1.5)
        poses = np.stack([f.T_gt for f in frames])
        local = label_loops(poses, [f.depth for f in frames], frames[0].K, criteria, stride=4)
        return ({(frames[q].index, frames[m].index) for q, m in local},
                f"poses + depth: {criteria.to_dict()} (min_index_gap in keyframes)")
    return set(), "none: no --gt-loops, no loops.json, and no poses+depth in the bag"


def _relative_gt(frames_by_index: dict[int, EvalFrame], query: int, match: int) -> np.ndarray | None:
    q, m = frames_by_index[query], frames_by_index[match]
    if q.T_gt is None or m.T_gt is None:
        return None
    return np.linalg.inv(m.T_gt) @ q.T_gt


@dataclass(frozen=True)
class LoopJudgement:
    correct: bool
    label: str  # gt | overlap | pose | wrong_pose | not_in_gt | no_overlap
    translation_error_m: float | None = None
    rotation_error_deg: float | None = None
    direction_error_deg: float | None = None
    overlap: float | None = None


CORRECTNESS = {"max_translation_error_m": 0.5, "max_rotation_error_deg": 5.0,
               "max_direction_error_deg": 10.0, "direction_judged_above_baseline_m": 0.5, "min_overlap": 0.1,
               "definition": "see feature_matching_ros/eval/loop_eval.py docstring: a wrong relative pose is "
                             "always false; a correct pose is true if in the GT set or (GT poses and depth) the "
                             "two views overlap >= min_overlap in both directions, or (monocular, no depth) the "
                             "translation direction of a baseline >= direction_judged_above_baseline_m is right too; "
                             "without GT poses only the GT set decides"}


def judge_loop(loop, frames_by_index: dict[int, EvalFrame], gt: set[tuple[int, int]],
               overlap_cache: dict[tuple[int, int], float] | None = None) -> LoopJudgement:
    """Is an accepted (or best) loop a correct detection? Rules in the module docstring / ``CORRECTNESS``."""
    in_gt = (loop.query_id, loop.match_id) in gt
    T_gt = _relative_gt(frames_by_index, loop.query_id, loop.match_id)
    if T_gt is None:
        return LoopJudgement(in_gt, "gt" if in_gt else "not_in_gt")
    rotation_error, direction_error = relative_pose_error_deg(loop.T_match_query, T_gt)
    translation_error = float(np.linalg.norm(loop.T_match_query[:3, 3] - T_gt[:3, 3])) if loop.metric else None
    baseline = float(np.linalg.norm(T_gt[:3, 3]))
    if loop.metric:
        wrong = translation_error > CORRECTNESS["max_translation_error_m"]
    else:
        wrong = (baseline >= CORRECTNESS["direction_judged_above_baseline_m"]
                 and direction_error > CORRECTNESS["max_direction_error_deg"])
    wrong = wrong or rotation_error > CORRECTNESS["max_rotation_error_deg"]
    errors = {"translation_error_m": translation_error, "rotation_error_deg": rotation_error,
              "direction_error_deg": direction_error}
    if wrong:
        return LoopJudgement(False, "wrong_pose", **errors)
    if in_gt:
        return LoopJudgement(True, "gt", **errors)
    q, m = frames_by_index[loop.query_id], frames_by_index[loop.match_id]
    if q.depth is None or m.depth is None:
        direction_judged = baseline >= CORRECTNESS["direction_judged_above_baseline_m"]
        if not loop.metric and direction_judged:
            return LoopJudgement(True, "pose", **errors)
        return LoopJudgement(False, "not_in_gt", **errors)
    key = (loop.query_id, loop.match_id)
    if overlap_cache is None or key not in overlap_cache:
        from feature_matching_ros.scenes.loops import scale_intrinsics, view_overlap

        step = 4
        K = scale_intrinsics(q.K, step)
        a, b = q.depth[::step, ::step], m.depth[::step, ::step]
        value = min(view_overlap(a, K, q.T_gt, b, K, m.T_gt, stride=2), view_overlap(b, K, m.T_gt, a, K, q.T_gt, stride=2))
        if overlap_cache is None:
            return LoopJudgement(value >= CORRECTNESS["min_overlap"], "overlap" if value >= CORRECTNESS["min_overlap"]
                                 else "no_overlap", overlap=value, **errors)
        overlap_cache[key] = value
    value = overlap_cache[key]
    ok = value >= CORRECTNESS["min_overlap"]
    return LoopJudgement(ok, "overlap" if ok else "no_overlap", overlap=value, **errors)


def evaluate_preset(preset: str, frames: list[EvalFrame], gt: set[tuple[int, int]], device: str,
                    reloc_queries: int, override: dict[str, Any] | None = None) -> dict[str, Any]:
    from feature_matching_ros.engine import build_engine

    engine = build_engine(preset, override, device=device)
    frames_by_index = {f.index: f for f in frames}
    results = []
    start = time.perf_counter()
    for number, frame in enumerate(frames):
        results.append(engine.process_keyframe(frame.image, frame.K, frame.stamp_ns, keyframe_id=frame.index,
                                               T_map_camera=frame.T_odom, depth=frame.depth,
                                               map_points=frame.map_points))
        if (number + 1) % 25 == 0:
            LOG.info("[%s] %d/%d keyframes, %.0f ms/keyframe", preset, number + 1, len(frames),
                     (time.perf_counter() - start) / (number + 1) * 1e3)
    # Which GT loops could the engine report at all (match already in the map and outside the exclusion window)?
    from feature_matching_ros.eval.loop_detection import reachable_loops

    positions = {f.index: i for i, f in enumerate(frames)}
    reachable = reachable_loops(frames, gt, engine.config.retrieval)
    gt_queries = {q for q, _ in gt if q in positions}
    # PR sweep: per query, the best candidate passing every check except the inlier count (the swept score).
    overlap_cache: dict[tuple[int, int], float] = {}
    scores, correct = [], []
    accepted, false_positives, judgements = [], [], {}
    threshold_reasons = ("ok", "too few inliers", "awaiting temporal consistency", "another candidate")
    for result in results:
        verified = [c for c in result.candidates if c.geometry_ok and c.reason.startswith(threshold_reasons)]
        best = max(verified, key=lambda c: c.num_inliers, default=None)
        scores.append(best.num_inliers if best else -np.inf)
        correct.append(bool(best) and judge_loop(best, frames_by_index, gt, overlap_cache).correct)
        for loop in result.accepted:
            accepted.append(loop)
            judgement = judge_loop(loop, frames_by_index, gt, overlap_cache)
            judgements[(loop.query_id, loop.match_id)] = judgement
            if not judgement.correct:
                q, m = frames_by_index[loop.query_id], frames_by_index[loop.match_id]
                distance = (float(np.linalg.norm(q.T_gt[:3, 3] - m.T_gt[:3, 3]))
                            if q.T_gt is not None and m.T_gt is not None else None)
                false_positives.append({"query_index": loop.query_id, "match_index": loop.match_id,
                                        "num_inliers": loop.num_inliers, "inlier_ratio": round(loop.inlier_ratio, 3),
                                        "gt_distance_m": distance, "method": loop.method, "why": judgement.label,
                                        "translation_error_m": judgement.translation_error_m,
                                        "rotation_error_deg": judgement.rotation_error_deg,
                                        "overlap": judgement.overlap, "in_gt_set": (loop.query_id, loop.match_id) in gt})
    true_positive_queries = {l.query_id for l in accepted if judgements[(l.query_id, l.match_id)].correct}
    detected_queries = {l.query_id for l in accepted}
    curve = precision_recall_curve(np.array(scores), np.array(correct), len(reachable),
                                   np.array([r.keyframe_id in reachable for r in results]))
    labels: dict[str, int] = {}
    for judgement in judgements.values():
        labels[judgement.label] = labels.get(judgement.label, 0) + 1
    # Relative pose errors of accepted correct loops (AUC: every accepted loop, wrong ones included).
    errors, rotation_errors, translation_errors_m = [], [], []
    for loop in accepted:
        T_gt = _relative_gt(frames_by_index, loop.query_id, loop.match_id)
        if T_gt is None:
            continue
        r_err, t_err = relative_pose_error_deg(loop.T_match_query, T_gt)
        errors.append(max(r_err, t_err))
        rotation_errors.append(r_err)
        if loop.metric:
            translation_errors_m.append(float(np.linalg.norm(loop.T_match_query[:3, 3] - T_gt[:3, 3])))
    rejection_reasons: dict[str, int] = {}
    for result in results:
        for c in result.candidates:
            if not c.accepted:
                key = c.reason.split(":")[0]
                rejection_reasons[key] = rejection_reasons.get(key, 0) + 1
    latency = {stage: percentiles([r.timing_ms[stage] for r in results if stage in r.timing_ms])
               for stage in ("extract", "global_descriptor", "retrieve", "match", "verify", "total")}
    metrics: dict[str, Any] = {
        "preset": preset,
        "pipeline": engine.pipeline.config.to_dict(),
        "engine": engine.config.to_dict(),
        "keyframes": len(frames),
        "loop": {
            "precision": len(true_positive_queries) / len(detected_queries) if detected_queries else None,
            "precision_note": "over queries with an accepted loop; None when nothing was accepted",
            "recall": len(true_positive_queries & set(reachable)) / len(reachable) if reachable else None,
            "recall_note": "over queries with at least one GT loop outside the engine's exclusion window",
            "accepted": len(accepted), "true_positives": len(accepted) - len(false_positives),
            "false_positives": len(false_positives), "false_positive_list": false_positives,
            "accepted_labels": labels, "correctness": CORRECTNESS,
            "queries_with_gt_loop": len(gt_queries), "queries_with_reachable_gt_loop": len(reachable),
            "max_recall_at_100_precision": curve.max_recall_at_100_precision,
            "inlier_threshold_at_max_recall_100": curve.threshold_at_max_recall_100,
            "pr_curve": curve.to_dict(),
            "rejection_reasons": rejection_reasons,
            "pose_error": {"count": len(errors), "over": "every accepted loop with GT poses (max of rotation and "
                           "translation-direction error, deg)", **pose_auc(errors),
                           "rotation_deg": percentiles(rotation_errors),
                           "translation_m": percentiles(translation_errors_m)},
        },
        "latency_ms": latency,
    }
    from feature_matching_ros.eval.loop_detection import retrieval_recall

    metrics["retrieval"] = retrieval_recall(results, reachable, engine.config.retrieval.top_k)
    metrics["relocalization"] = _evaluate_relocalization(engine, frames, reachable, reloc_queries)
    metrics["trajectory"] = _evaluate_trajectory(frames, accepted)
    metrics["_results"] = results  # removed before writing; used for plots
    return metrics


def _evaluate_relocalization(engine, frames: list[EvalFrame], reachable: dict[int, set[int]], count: int
                             ) -> dict[str, Any]:
    if not count:
        return {"skipped": "--reloc-queries 0"}
    if any(f.T_gt is None for f in frames):
        return {"skipped": "no ground-truth poses in the bag: relocalization accuracy cannot be measured"}
    if all(f.depth is None for f in frames):
        return {"skipped": "no depth: relocalization needs a metric pose (monocular maps cannot relocalize)"}
    engine.update_poses({f.index: f.T_gt for f in frames})  # the map's poses are ground truth here
    queries = sorted(reachable)
    if not queries:
        return {"skipped": "no revisits (GT loops) to relocalize"}
    picks = [queries[i] for i in np.linspace(0, len(queries) - 1, min(count, len(queries))).astype(int)]
    frames_by_index = {f.index: f for f in frames}
    window_ns = engine.config.retrieval.exclude_recent_seconds * 1e9
    successes, correct, position_errors, rotation_errors, latency = 0, 0, [], [], []
    failures: dict[str, int] = {}
    for index in picks:
        frame = frames_by_index[index]
        exclude = {f.index for f in frames if abs(f.stamp_ns - frame.stamp_ns) < window_ns}
        result = engine.relocalize(frame.image, frame.K, frame.depth, frame.stamp_ns, exclude_ids=exclude)
        latency.append(result.timing_ms.get("total", np.nan))
        if not result.success:
            key = result.reason.split("(")[0].strip()
            failures[key] = failures.get(key, 0) + 1
            continue
        successes += 1
        position_error = float(np.linalg.norm(result.T_map_camera[:3, 3] - frame.T_gt[:3, 3]))
        rotation_error = rotation_angle_deg(result.T_map_camera[:3, :3].T @ frame.T_gt[:3, :3])
        position_errors.append(position_error)
        rotation_errors.append(rotation_error)
        correct += position_error < 0.25 and rotation_error < 5.0
    return {"queries": len(picks), "success_rate": successes / len(picks),
            "correct_rate": correct / len(picks), "correct_definition": "position error < 0.25 m and rotation < 5 deg",
            "position_error_m": percentiles(position_errors), "rotation_error_deg": percentiles(rotation_errors),
            "failure_reasons": failures, "latency_ms": percentiles([v for v in latency if np.isfinite(v)]),
            "protocol": "revisit frames relocalized against the full map (GT keyframe poses), keyframes within "
                        "the exclusion window of the query (itself included) excluded"}


def _evaluate_trajectory(frames: list[EvalFrame], accepted) -> dict[str, Any]:
    """ATE of the odometry before and after a pose graph with the accepted loops (``trajectory_metrics``)."""
    if any(f.T_odom is None for f in frames):
        return {"skipped": "no odometry in the bag (--odom-topic)"}
    if any(f.T_gt is None for f in frames):
        return {"skipped": "no ground-truth poses in the bag (--pose-topic)"}
    return trajectory_metrics(np.stack([f.T_odom for f in frames]), np.stack([f.T_gt for f in frames]), accepted,
                              {f.index: i for i, f in enumerate(frames)}, all(f.depth is None for f in frames))


def trajectory_metrics(odometry: np.ndarray, gt: np.ndarray, accepted, id_to_index: dict[int, int],
                       monocular: bool) -> dict[str, Any]:
    """ATE RMSE of (N, 4, 4) odometry poses against (N, 4, 4) GT before and after a GTSAM pose graph with the
    accepted loops (keyframe ids -> row by ``id_to_index``). Monocular runs (the odometry's scale is arbitrary
    and drifts) use the Sim3 graph and Sim3-aligned ATE, as evo does for monocular trajectories; metric runs the
    SE3 graph and SE3 alignment. Without gtsam the ATE before is still measured and the graph is reported as
    skipped."""
    from feature_matching_ros.eval.pose_graph import optimise_pose_graph, optimise_sim3_pose_graph

    before = absolute_trajectory_error(odometry, gt, monocular)
    optimise = optimise_sim3_pose_graph if monocular else optimise_pose_graph
    try:
        optimised, summary = optimise(odometry, accepted, id_to_index)
    except ImportError as error:
        return {"ate_before": before, "pose_graph_skipped": f"gtsam not installed ({error})",
                "_poses": {"gt": gt, "odometry": odometry}}
    return {"ate_before": before, "ate_after": absolute_trajectory_error(optimised, gt, monocular),
            "pose_graph": summary, "_poses": {"gt": gt, "odometry": odometry, "optimised": optimised}}
