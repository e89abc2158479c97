"""``fmr evaluate`` / ``fmr demo`` end to end on small rendered bags, loop-correctness rules, acceptance checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from feature_matching_ros.cli import main
from feature_matching_ros.eval.loop_eval import EvalFrame, judge_loop
from feature_matching_ros.engine import LoopClosure
from feature_matching_ros.engine.acceptance import depth_agreement, inlier_coverage


def copy_topics(source: Path, destination: Path, topics: set[str]) -> None:
    """A bag with only ``topics`` of ``source`` (raw CDR copied as is): e.g. a camera-only bag, no depth/poses."""
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer

    from feature_matching_ros.bag import convert

    with Reader(source) as reader, Writer(destination, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=convert.typestore())
                       for c in reader.connections if c.topic in topics}
        for connection, timestamp, data in reader.messages():
            if connection.id in connections:
                writer.write(connections[connection.id], timestamp, data)


@pytest.fixture(scope="module")
def small_sequence(tmp_path_factory) -> Path:
    from feature_matching_ros.scenes.sequence import generate_sequence

    directory = tmp_path_factory.mktemp("office")
    generate_sequence(directory, "office", frames=140, seed=3, width=160, height=120, progress=False)
    return directory


def test_evaluate_a_camera_only_bag_with_gt_loops_file(small_sequence, tmp_path):
    bag = tmp_path / "camera_only"
    copy_topics(small_sequence / "bag", bag, {"/camera/image_raw", "/camera/camera_info"})
    gt_file = tmp_path / "gt.json"  # not beside the bag: must come from --gt-loops
    gt_file.write_text((small_sequence / "loops.json").read_text())
    report = tmp_path / "report"
    assert main(["evaluate", str(bag), "--config", "orb_bow_nn", "--compare", "--report", str(report),
                 "--gt-loops", str(gt_file), "--keyframe-every", "2"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["gt_source"].startswith("--gt-loops") and metrics["gt_loops"] == len(json.loads(gt_file.read_text()))
    assert set(metrics["skipped"]) == {"metric_loops", "pose_errors_relocalization_ate", "odometry_gate_ate"}
    assert "skipped" in metrics["relocalization"] and "skipped" in metrics["trajectory"]
    loop = metrics["loop"]
    for key in ("precision", "recall", "false_positives", "max_recall_at_100_precision", "false_positive_list",
                "pose_error", "correctness"):
        assert key in loop
    assert loop["pose_error"]["count"] == 0  # no GT poses: no pose errors
    retrieval = metrics["retrieval"]  # this short sequence has no GT loop outside the 10 s exclusion window
    assert retrieval["queries"] == loop["queries_with_reachable_gt_loop"] == 0 and retrieval["recall@1"] is None
    assert metrics["latency_ms"]["total"]["count"] == metrics["keyframes"] == 70
    verdicts = [json.loads(line) for line in (report / "keyframes_orb_bow_nn.jsonl").read_text().splitlines()]
    candidates = [c for v in verdicts for c in v["candidates"]]
    assert candidates and all(not c["metric"] and c["drift_translation_m"] is None for c in candidates)
    assert (report / "pr_curve.png").stat().st_size > 0 and (report / "latency.png").stat().st_size > 0


def test_demo_runs_offline_on_the_cpu(small_sequence, tmp_path, capsys):
    report = tmp_path / "demo"
    assert main(["demo", "--out", str(report), "--sample-dir", str(small_sequence), "--frames", "140",
                 "--width", "160", "--height", "120", "--seed", "3", "--config", "orb_bow_nn", "--compare",
                 "--device", "cpu", "--reloc-queries", "3"]) == 0
    printed = capsys.readouterr().out
    assert "| orb_bow_nn |" in printed and "ATE before -> after" in printed
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["skipped"] == {} and "ate_before" in metrics["trajectory"]
    assert (report / "trajectory_orb_bow_nn.png").is_file()
    # TUM trajectories (evo's format) read back: one pose per keyframe, stamps of the keyframes, and the same
    # ATE as metrics.json when aligned the same way
    from feature_matching_ros.eval.metrics import absolute_trajectory_error
    from feature_matching_ros.eval.report import read_tum

    assert metrics["trajectory"]["tum"] == {"gt": "trajectory_gt.tum", "odometry": "trajectory_orb_bow_nn_odometry.tum",
                                            "optimised": "trajectory_orb_bow_nn_optimised.tum"}
    stamps_gt, gt = read_tum(report / "trajectory_gt.tum")
    keyframes = [json.loads(line) for line in (report / "keyframes_orb_bow_nn.jsonl").read_text().splitlines()]
    assert np.allclose(stamps_gt, [k["stamp_ns"] * 1e-9 for k in keyframes], atol=1e-9)
    assert np.all(np.diff(stamps_gt) > 0)
    for kind, key in (("odometry", "ate_before"), ("optimised", "ate_after")):
        stamps, poses = read_tum(report / f"trajectory_orb_bow_nn_{kind}.tum")
        assert np.array_equal(stamps, stamps_gt) and poses.shape == gt.shape
        assert np.allclose(np.einsum("nij,nkj->nik", poses[:, :3, :3], poses[:, :3, :3]), np.eye(3), atol=1e-6)
        ate = absolute_trajectory_error(poses, gt, metrics["trajectory"][key]["alignment"] == "sim3")
        assert ate["rmse"] == pytest.approx(metrics["trajectory"][key]["rmse"], rel=1e-4, abs=1e-6)


def _frame(index: int, x: float, depth: np.ndarray | None, K: np.ndarray) -> EvalFrame:
    T = np.eye(4)
    T[0, 3] = x
    return EvalFrame(index, index, np.zeros((2, 2, 3), np.uint8), K, depth, T, T)


def _loop(query: int, match: int, T_match_query: np.ndarray, metric: bool = True) -> LoopClosure:
    return LoopClosure(query, match, query, match, True, "ok", T_match_query, metric=metric)


def test_loop_correctness_rules():
    K = np.array([[100.0, 0, 80], [0, 100, 60], [0, 0, 1]])
    wall = np.full((120, 160), 4.0, np.float32)  # fronto-parallel wall 4 m ahead of every camera
    frames = {0: _frame(0, 0.0, wall, K), 50: _frame(50, 0.8, wall, K), 90: _frame(90, 30.0, wall, K)}
    true_rel = np.linalg.inv(frames[0].T_gt) @ frames[50].T_gt
    gt = {(50, 0)}
    assert judge_loop(_loop(50, 0, true_rel), frames, gt).label == "gt"
    wrong = true_rel.copy()
    wrong[0, 3] += 1.0  # one metre off: false even though the pair is a GT loop
    judgement = judge_loop(_loop(50, 0, wrong), frames, gt)
    assert not judgement.correct and judgement.label == "wrong_pose"
    assert judgement.translation_error_m == pytest.approx(1.0)
    # a correct pose outside the strict GT set counts when the views overlap (same wall, 0.8 m apart) ...
    judgement = judge_loop(_loop(50, 0, true_rel), frames, set())
    assert judgement.correct and judgement.label == "overlap" and judgement.overlap > 0.5
    # ... but not when they see nothing in common (30 m apart), nor without depth to prove the overlap
    far_rel = np.linalg.inv(frames[0].T_gt) @ frames[90].T_gt
    assert judge_loop(_loop(90, 0, far_rel), frames, set()).label == "no_overlap"
    no_depth = {k: EvalFrame(f.index, f.stamp_ns, f.image, f.K, None, f.T_gt, f.T_odom) for k, f in frames.items()}
    assert judge_loop(_loop(50, 0, true_rel), no_depth, set()).label == "not_in_gt"
    # a monocular pose (unit translation) is proved by its direction over a judged baseline (0.8 m) ...
    unit_rel = true_rel.copy()
    unit_rel[:3, 3] /= np.linalg.norm(unit_rel[:3, 3])
    assert judge_loop(_loop(50, 0, unit_rel, metric=False), no_depth, set()).label == "pose"
    # ... and the direction to a look-alike camera one period over is wrong
    sideways = unit_rel.copy()
    sideways[:3, 3] = [0.0, 0.0, 1.0]
    assert judge_loop(_loop(50, 0, sideways, metric=False), no_depth, set()).label == "wrong_pose"
    # without GT poses only the GT set decides
    no_pose = {k: EvalFrame(f.index, f.stamp_ns, f.image, f.K, None, None, None) for k, f in frames.items()}
    assert judge_loop(_loop(50, 0, wrong), no_pose, gt).correct
    assert not judge_loop(_loop(90, 0, far_rel), no_pose, gt).correct


def test_inlier_coverage_and_depth_agreement():
    rng = np.random.default_rng(0)
    spread = rng.uniform([0, 0], [320, 240], (200, 2))
    cluster = rng.uniform([10, 10], [60, 50], (200, 2))
    assert inlier_coverage(spread, (320, 240), 4) == 1.0
    assert inlier_coverage(cluster, (320, 240), 4) == pytest.approx(1 / 16)
    K = np.array([[200.0, 0, 160], [0, 200, 120], [0, 0, 1]])
    depth_query = rng.uniform(2.0, 6.0, 200)
    T_match_query = np.eye(4)
    T_match_query[:3, 3] = [0.3, 0.0, 0.5]
    rays = np.c_[(spread - K[:2, 2]) / 200.0, np.ones(200)]
    points_match = rays * depth_query[:, None] + T_match_query[:3, 3]
    depth_match = points_match[:, 2]
    assert depth_agreement(spread, depth_query, depth_match, K, T_match_query, 0.1, 0.1) == 1.0
    shifted = T_match_query.copy()
    shifted[2, 3] += 2.0  # a pose two metres off along the optical axis predicts the wrong depths
    assert depth_agreement(spread, depth_query, depth_match, K, shifted, 0.1, 0.1) < 0.2
    assert depth_agreement(spread, None, depth_match, K, T_match_query, 0.1, 0.1) is None


def test_retrieval_recall_counts_a_gt_match_among_the_first_k_candidates():
    from feature_matching_ros.engine.records import KeyframeResult
    from feature_matching_ros.eval.loop_detection import retrieval_recall

    def candidate(query: int, match: int, rank: int) -> LoopClosure:
        return LoopClosure(query, match, 0, 0, False, "test", retrieval_rank=rank)

    results = [KeyframeResult(10, 0, [candidate(10, 3, 0), candidate(10, 7, 1)], "ok"),   # GT first
               KeyframeResult(11, 0, [candidate(11, 9, 0), candidate(11, 4, 2)], "ok"),   # GT third
               KeyframeResult(12, 0, [candidate(12, 9, 0)], "ok"),                        # GT never retrieved
               KeyframeResult(13, 0, [candidate(13, 1, 0)], "ok")]                        # no reachable GT loop
    recall = retrieval_recall(results, {10: {3}, 11: {4, 5}, 12: {6}}, top_k=3)
    assert recall["queries"] == 3
    assert recall["recall@1"] == pytest.approx(1 / 3) and recall["recall@3"] == pytest.approx(2 / 3)
