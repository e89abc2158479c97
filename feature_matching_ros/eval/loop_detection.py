"""Loop-detection metrics from accepted (query, match) pairs: precision, recall, false positives.

Used by ``fmr replay`` on the LoopClosure messages the node published, with the definitions of
``fmr evaluate`` (:func:`feature_matching_ros.eval.loop_eval.evaluate_preset`, "loop" section):
  * each accepted loop is judged by ``loop_eval.judge_loop`` (the same function evaluate uses: a wrong relative
    pose is false; a correct one is true if in the GT set or, with GT poses and depth, the views overlap);
  * precision over queries with an accepted loop (a query counts as correct when one of its accepted loops is
    correct); None when nothing was accepted;
  * recall over queries with at least one ground-truth loop the engine could report at all (match already in
    the map and outside the retrieval exclusion window: ``exclude_recent_count`` positions and
    ``exclude_recent_seconds``);
  * every accepted pair that is not a ground-truth pair is a false positive.
Pairs and frames are in image-topic indices (keyframe id = frame index, as both commands use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class AcceptedLoop:
    """What the metrics need of one accepted loop (a LoopClosure message or an engine record)."""

    query_id: int
    match_id: int
    T_match_query: np.ndarray  # 4x4
    metric: bool
    num_inliers: int
    num_matches: int


def reachable_loops(frames, gt: set[tuple[int, int]], retrieval) -> dict[int, set[int]]:
    """GT matches each query could be given by retrieval (``frames``: EvalFrame list in keyframe order)."""
    positions = {f.index: i for i, f in enumerate(frames)}
    reachable: dict[int, set[int]] = {}
    for q, m in gt:
        if q in positions and m in positions:
            pq, pm = positions[q], positions[m]
            in_time = abs(frames[pq].stamp_ns - frames[pm].stamp_ns) >= retrieval.exclude_recent_seconds * 1e9
            if pm < pq - retrieval.exclude_recent_count and in_time:
                reachable.setdefault(q, set()).add(m)
    return reachable


def retrieval_recall(results, reachable: dict[int, set[int]], top_k: int) -> dict[str, Any]:
    """Is a true loop among the retrieved candidates? Over the queries with a reachable GT loop, the fraction
    whose candidates (KeyframeResult.candidates, ``retrieval_rank`` 0-based) include a GT match within the first
    k, for k = 1 .. top_k (the engine verifies top_k candidates, so recall@top_k bounds the loop recall)."""
    best_rank: dict[int, int] = {}
    for result in results:
        matches = reachable.get(result.keyframe_id)
        if not matches:
            continue
        ranks = [c.retrieval_rank for c in result.candidates if c.match_id in matches]
        best_rank[result.keyframe_id] = min(ranks, default=top_k)
    queries = len(reachable)
    recall = {f"recall@{k}": (sum(rank < k for rank in best_rank.values()) / queries if queries else None)
              for k in sorted({1, min(3, top_k), top_k})}
    return {"queries": queries, "top_k": top_k, **recall,
            "note": "queries with a reachable GT loop whose top-k retrieved keyframes include a GT match"}


def detection_metrics(accepted: list[AcceptedLoop], frames, gt: set[tuple[int, int]], retrieval) -> dict[str, Any]:
    """Precision / recall / false positives of the accepted loops (image-topic indices = keyframe ids)."""
    from feature_matching_ros.eval.loop_eval import judge_loop

    frames_by_index = {f.index: f for f in frames}
    reachable = reachable_loops(frames, gt, retrieval)
    overlap_cache: dict[tuple[int, int], float] = {}
    false_positives, correct_queries, labels = [], set(), {}
    for loop in accepted:
        judgement = judge_loop(loop, frames_by_index, gt, overlap_cache)
        labels[judgement.label] = labels.get(judgement.label, 0) + 1
        if judgement.correct:
            correct_queries.add(loop.query_id)
            continue
        fq, fm = frames_by_index[loop.query_id], frames_by_index[loop.match_id]
        distance = (float(np.linalg.norm(fq.T_gt[:3, 3] - fm.T_gt[:3, 3]))
                    if fq.T_gt is not None and fm.T_gt is not None else None)
        false_positives.append({"query_index": loop.query_id, "match_index": loop.match_id,
                                "num_inliers": loop.num_inliers,
                                "inlier_ratio": round(loop.num_inliers / max(loop.num_matches, 1), 3),
                                "gt_distance_m": distance, "why": judgement.label,
                                "translation_error_m": judgement.translation_error_m,
                                "rotation_error_deg": judgement.rotation_error_deg, "overlap": judgement.overlap,
                                "in_gt_set": (loop.query_id, loop.match_id) in gt})
    detected_queries = {loop.query_id for loop in accepted}
    return {
        "precision": len(correct_queries) / len(detected_queries) if detected_queries else None,
        "precision_note": "over queries with an accepted loop; None when nothing was accepted",
        "recall": len(correct_queries & set(reachable)) / len(reachable) if reachable else None,
        "recall_note": "over queries with at least one GT loop outside the engine's exclusion window",
        "accepted": len(accepted), "true_positives": len(accepted) - len(false_positives),
        "false_positives": len(false_positives), "false_positive_list": false_positives, "accepted_labels": labels,
        "queries_with_gt_loop": len({q for q, _ in gt if q in frames_by_index}),
        "queries_with_reachable_gt_loop": len(reachable),
        "accepted_pairs": sorted([loop.query_id, loop.match_id] for loop in accepted),
    }
