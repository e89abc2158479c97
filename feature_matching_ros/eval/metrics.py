"""Evaluation metrics: relative pose AUC, loop-closure precision/recall, Umeyama alignment and ATE.

Protocols (MODELS.md): pose error = max(rotation angle, translation direction angle with
min(theta, 180 - theta)); AUC@t by the trapezoid rule over the sorted error recall curve, failures are
infinite. ATE: RMSE of position errors after Umeyama alignment (SE3, or Sim3 for monocular), as evo does
(evo's ``umeyama_alignment``; ``geometry.sim3.umeyama`` rather than depending on evo's plotting stack).
Loop closure: precision/recall over queries with the threshold swept on the verified
candidate's inlier count; max recall at 100 % precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def rotation_angle_deg(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def relative_pose_error_deg(T_est: np.ndarray, T_gt: np.ndarray) -> tuple[float, float]:
    """(rotation error, translation direction error) in degrees; direction error symmetric in sign as in
    the protocol (min(theta, 180 - theta)) and 0 when both translations are ~0."""
    rotation_error = rotation_angle_deg(T_est[:3, :3].T @ T_gt[:3, :3])
    t_est, t_gt = T_est[:3, 3], T_gt[:3, 3]
    norms = np.linalg.norm(t_est) * np.linalg.norm(t_gt)
    if norms < 1e-12:
        return rotation_error, 0.0
    angle = float(np.degrees(np.arccos(np.clip(t_est @ t_gt / norms, -1.0, 1.0))))
    return rotation_error, min(angle, 180.0 - angle)


def pose_auc(errors: np.ndarray | list[float], thresholds: tuple[float, ...] = (5.0, 10.0, 20.0)) -> dict[str, float]:
    """AUC (in %) of the error recall curve up to each threshold; inf/NaN errors are failures."""
    errors = np.nan_to_num(np.asarray(errors, np.float64), nan=np.inf)
    out = {}
    if not len(errors):
        return {f"auc@{int(t)}": 0.0 for t in thresholds}
    order = np.sort(errors)
    recall = (np.arange(len(order)) + 1) / len(order)
    order = np.r_[0.0, order]
    recall = np.r_[0.0, recall]
    for threshold in thresholds:
        last = np.searchsorted(order, threshold)
        x = np.r_[order[:last], threshold]
        y = np.r_[recall[:last], recall[last - 1]]
        out[f"auc@{int(threshold)}"] = float(np.trapezoid(y, x) / threshold * 100.0)
    return out


@dataclass
class PrecisionRecall:
    thresholds: list[float]
    precision: list[float]
    recall: list[float]
    max_recall_at_100_precision: float
    threshold_at_max_recall_100: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def precision_recall_curve(scores: np.ndarray, correct: np.ndarray, num_positive_queries: int,
                           positive: np.ndarray | None = None) -> PrecisionRecall:
    """Per-query detections: ``scores[i]`` (e.g. inliers of the query's best verified candidate, -inf if none),
    ``correct[i]`` whether that candidate is a true loop. A threshold s predicts the queries with score >= s;
    recall = true positives among the ``positive`` queries (default: all) / ``num_positive_queries`` (queries
    that have at least one true loop), so a correct detection outside the positive set never pushes recall > 1."""
    scores = np.asarray(scores, np.float64)
    correct = np.asarray(correct, bool)
    positive = np.ones(len(correct), bool) if positive is None else np.asarray(positive, bool)
    finite = np.isfinite(scores)
    thresholds = np.unique(scores[finite])[::-1]  # descending
    precision, recall = [], []
    best_recall, best_threshold = 0.0, None
    for threshold in thresholds:
        predicted = finite & (scores >= threshold)
        tp = int((predicted & correct).sum())
        p = tp / max(int(predicted.sum()), 1)
        r = int((predicted & correct & positive).sum()) / num_positive_queries if num_positive_queries else 0.0
        precision.append(p)
        recall.append(r)
        if p == 1.0 and r >= best_recall:
            best_recall, best_threshold = r, float(threshold)
    return PrecisionRecall(thresholds.tolist(), precision, recall, best_recall, best_threshold)


def umeyama_alignment(source: np.ndarray, target: np.ndarray, with_scale: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares similarity (R, t, s) with target ~ s R source + t, for (N, 3) point sets (Umeyama 1991;
    ``geometry.sim3.umeyama``, collinear trajectories allowed)."""
    from feature_matching_ros.geometry.sim3 import umeyama

    scale, R, t = umeyama(source, target, with_scale=with_scale, allow_collinear=True)
    return R, t, scale


def absolute_trajectory_error(estimated: np.ndarray, ground_truth: np.ndarray, with_scale: bool = False
                              ) -> dict[str, float]:
    """ATE on positions of (N, 4, 4) poses after Umeyama alignment of estimated onto ground truth."""
    est, gt = np.asarray(estimated)[:, :3, 3], np.asarray(ground_truth)[:, :3, 3]
    R, t, scale = umeyama_alignment(est, gt, with_scale)
    aligned = scale * est @ R.T + t
    errors = np.linalg.norm(aligned - gt, axis=1)
    return {"rmse": float(np.sqrt(np.mean(errors ** 2))), "mean": float(errors.mean()),
            "median": float(np.median(errors)), "max": float(errors.max()), "scale": scale,
            "alignment": "sim3" if with_scale else "se3"}


def percentiles(values: list[float] | np.ndarray) -> dict[str, float]:
    values = np.asarray(values, np.float64)
    if not len(values):
        return {"count": 0}
    return {"count": int(len(values)), "mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max())}
