"""Monocular keyframes with the backend's map points close Sim3 loops through relocalization_node over real DDS.

Data: a 40-frame 320x240 monocular office sequence from ``fmr make-sequence --monocular``'s generator
(scenes/sequence.py): no depth; per frame the backend's map points (/slam/map_points: the keypoints of an
ORB-SLAM3-like detector with their points in the camera frame) in the local units lambda_k of a scale-drifting
monocular map (sequence.json ``monocular.local_scale``). The map of the first frames (index < SPLIT) is moreover
MAP_SCALE x larger, as when a monocular map is later merged with one initialised at another scale; so a loop
q -> m relates the two keyframes' maps by s = (MAP_SCALE if m < SPLIT else 1) lambda_m / lambda_q (X_match =
s R X_query + t), which the LoopClosure message must carry to 5 %.

The keyframes travel the way ``fmr replay`` sends a bag (commands/replay.py ``replay_frames``: the bag's frames
as Keyframe messages with the map points inside, the node in-process on a random ROS_DOMAIN_ID with LOCALHOST
discovery, every published LoopClosure received over DDS). One more keyframe carries map points with a NaN:
its map points are rejected under their reason code (rejected.map_points_not_finite) and the keyframe itself is
still processed. Five keyframes in all, 256 keypoints: well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 Python client) is not installed")
pytest.importorskip("rosbags", reason="rosbags is not installed")
import feature_matching_ros.ros  # noqa: E402,F401  (merges the generated interfaces into the package)

try:
    from feature_matching_ros.msg import Keyframe, LoopClosure
except ImportError as error:  # pragma: no cover - depends on the build
    pytest.skip(f"feature_matching_ros interfaces are not built (scripts/build_interfaces.sh): {error}",
                allow_module_level=True)
if not hasattr(Keyframe(), "map_points") or not hasattr(LoopClosure(), "information_sim3"):
    pytest.skip("the built interfaces predate Keyframe.map_points / LoopClosure.information_sim3: rebuild them "
                "(scripts/build_interfaces.sh)", allow_module_level=True)

from feature_matching_ros.bag import SequenceTopics  # noqa: E402
from feature_matching_ros.commands.replay import replay_frames  # noqa: E402
from feature_matching_ros.eval.loop_eval import load_frames  # noqa: E402
from feature_matching_ros.eval.metrics import rotation_angle_deg  # noqa: E402
from feature_matching_ros.scenes.sequence import generate_sequence  # noqa: E402

MAP_SCALE = 1.6
SPLIT = 10
# Two places seen twice: frames 4 and 8 (first pass, MAP_SCALE x map) again from 16 and 20 (loops.json pairs).
KEYFRAMES = (4, 8, 16, 20)
BAD_KEYFRAME = 24
PARAMETERS = {"preset": "cpu", "pipeline.device": "cpu", "pipeline.features.max_keypoints": 256,
              "pipeline.features.resize_max": 320, "engine.min_inliers": 20, "engine.temporal_consistency": 1,
              "engine.retrieval.exclude_recent_seconds": 0.5, "engine.retrieval.exclude_recent_count": 0,
              "log_throttle_s": 0.0}


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    out = tmp_path_factory.mktemp("monocular")
    bag = generate_sequence(out / "seq", "office", frames=40, seed=0, width=320, height=240, progress=False,
                            monocular=True)
    metadata = json.loads((out / "seq" / "sequence.json").read_text())
    frames = {f.index: f for f in load_frames(bag, SequenceTopics(), 1, None, None)}
    return frames, np.array(metadata["monocular"]["local_scale"])


def _units(index: int) -> float:
    return MAP_SCALE if index < SPLIT else 1.0


def test_monocular_keyframes_with_map_points_close_sim3_loops_over_dds(sequence):
    frames, local_scale = sequence
    published = []
    for index in KEYFRAMES:
        pixels, points = frames[index].map_points
        published.append(replace(frames[index], map_points=(pixels, points * _units(index))))
    pixels, points = frames[BAD_KEYFRAME].map_points
    broken = points.copy()
    broken[7] = np.nan  # one point a backend lost track of
    published.append(replace(frames[BAD_KEYFRAME], map_points=(pixels, broken)))

    os.environ["ROS_DOMAIN_ID"] = str(random.randint(1, 100))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    replay = replay_frames(published, PARAMETERS, rate=1.0, pose_source="odom", drain_timeout_s=300.0)

    counters = replay["counters"]
    # Every keyframe was processed, the bad one too; only its map points were refused, under their reason code.
    assert counters["keyframes_processed"] == len(published), counters
    assert counters.get("keyframes.with_map_points") == len(KEYFRAMES), counters
    assert counters.get("rejected.map_points_not_finite") == 1, counters
    assert not [k for k in counters if k.startswith("rejected.") and k != "rejected.map_points_not_finite"], counters

    loops = [loop for loop in replay["loops"] if loop["accepted"]]
    assert loops, counters  # at least one of 16 -> 4, 20 -> 8 is closed
    for loop in loops:
        q, m = loop["query_id"], loop["match_id"]
        assert q in KEYFRAMES and m in KEYFRAMES, loop  # the keyframe without map points closes no Sim3 loop
        assert loop["method"] == "sim3" and not loop["metric_scale"], loop
        expected = _units(m) * local_scale[m] / (_units(q) * local_scale[q])
        assert loop["scale"] == pytest.approx(expected, rel=0.05), (q, m, loop["scale"], expected)
        # The rigid part agrees with the ground truth: rotation, and the translation in the match keyframe's units.
        T_true = np.linalg.inv(frames[m].T_gt) @ frames[q].T_gt
        T_loop = loop["T_match_query"]
        assert rotation_angle_deg(T_loop[:3, :3].T @ T_true[:3, :3]) < 2.0, loop
        t_expected = _units(m) * local_scale[m] * T_true[:3, 3]
        assert np.linalg.norm(T_loop[:3, 3] - t_expected) < 0.15 * np.linalg.norm(t_expected) + 0.05, (
            T_loop[:3, 3], t_expected)
        # The backend gets the similarity's 7x7 information (scale observed) and the rigid part's 6x6.
        information_sim3 = loop["information_sim3"]
        assert np.allclose(information_sim3, information_sim3.T) and np.linalg.eigvalsh(information_sim3).min() > 0
        assert np.linalg.eigvalsh(loop["information"]).min() > 0  # Sim3 translation is observed, unlike E
