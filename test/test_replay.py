"""fmr replay over real DDS: a generated sequence played into relocalization_node, compared with the offline path.

A 40-frame 160x120 office sequence (``fmr make-sequence``, exact GT loops in loops.json) is replayed at the recorded
rate into the node (in-process, random ROS_DOMAIN_ID, LOCALHOST discovery) with the cpu preset on 256 keypoints and
a 1 s / 10 keyframe exclusion window (the sequence is only 4 s long), and with a keyframe queue that holds the
whole sequence, so nothing drops. ``--offline`` runs `fmr evaluate`'s engine loop (eval/loop_eval.evaluate_preset)
on the same frames, preset and overrides: the node must accept exactly the same loop pairs and report the same
precision / recall / false positives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy (ROS 2 Python client) is not installed")
pytest.importorskip("rosbags", reason="rosbags is not installed")

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["engine.retrieval.exclude_recent_seconds=1.0", "engine.retrieval.exclude_recent_count=10",
             "engine.min_inliers=15", "engine.odometry_gate=false", "engine.temporal_consistency=1",
             "pipeline.features.max_keypoints=256"]


def _fmr(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    # The repository first; the rest of the caller's path stays (it may hold the interfaces of a build elsewhere).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([sys.executable, "-m", "feature_matching_ros.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_replay_matches_offline_evaluation(tmp_path):
    try:
        import feature_matching_ros.ros  # noqa: F401
        from feature_matching_ros.msg import Keyframe  # noqa: F401
    except ImportError as error:
        pytest.skip(f"feature_matching_ros interfaces are not built (scripts/build_interfaces.sh): {error}")
    made = _fmr("make-sequence", str(tmp_path / "seq"), "--frames", "40", "--width", "160", "--height", "120")
    assert made.returncode == 0, made.stderr[-2000:]
    report = tmp_path / "report"
    replay = _fmr("replay", str(tmp_path / "seq" / "bag"), "--config", "cpu", "--rate", "1.0", "--report", str(report),
                  "--offline", *[f"--set={item}" for item in OVERRIDES])
    assert replay.returncode == 0, replay.stderr[-3000:]
    metrics = json.loads((report / "replay_metrics.json").read_text())
    assert metrics["keyframes"] == 40 and metrics["node"]["processed"] == 40 and metrics["node"]["dropped"] == 0
    assert metrics["node"]["rejected"] == {}
    assert 1 <= int(metrics["ros_domain_id"]) <= 100
    loop, offline = metrics["loop"], metrics["offline"]
    assert loop["accepted"] >= 3, metrics["node"]["loop_closures_rejected_by_reason"]  # the node published loops
    assert loop["accepted"] == metrics["node"]["loop_closures_accepted"]  # every published loop was received
    assert offline["same_accepted_pairs"], (offline["only_offline"], offline["only_replay"])
    assert offline["same_metrics"], (offline["loop"], loop)
    assert loop["queries_with_reachable_gt_loop"] > 0 and loop["recall"] is not None and loop["precision"] > 0
