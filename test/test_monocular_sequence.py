"""Monocular rendered sequences: backend map points in the bag, scale-drifting odometry, consistent units."""

from __future__ import annotations

import json

import numpy as np
import pytest

from feature_matching_ros.bag import convert
from feature_matching_ros.bag.sequence import SequenceBagWriter, SequenceFrame, read_sequence
from feature_matching_ros.scenes.sequence import generate_sequence, simulate_odometry


def test_map_points_round_trip_through_a_bag(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 100, (57, 2)).astype(np.float32)
    points = rng.uniform(1, 5, (57, 3)).astype(np.float32)
    with SequenceBagWriter(tmp_path / "bag") as writer:
        writer.write_frame(SequenceFrame(0, 1_000_000_000, np.zeros((8, 8), np.uint8), map_points=(pixels, points)))
        writer.write_frame(SequenceFrame(1, 1_100_000_000, np.zeros((8, 8), np.uint8)))
    frames = list(read_sequence(tmp_path / "bag"))
    assert np.array_equal(frames[0].map_points[0], pixels) and np.array_equal(frames[0].map_points[1], points)
    assert frames[1].map_points is None and frames[0].depth is None


def test_map_point_cloud_without_the_fields_is_refused():
    msg = convert.map_points_to_msg(np.zeros((2, 2)), np.ones((2, 3)), 0, "camera")
    msg.fields = msg.fields[:3]
    with pytest.raises(ValueError, match=r"lacks float32 fields \['y', 'z'\]"):
        convert.msg_to_map_points(msg)


def test_monocular_odometry_steps_are_in_the_drifting_local_scale():
    poses = np.tile(np.eye(4), (60, 1, 1))
    poses[:, 0, 3] = np.arange(60) * 0.1  # 10 cm steps along x
    T_odom, *_, local_scale = simulate_odometry(poses, np.random.default_rng(3), log_scale_walk=0.02)
    steps = np.linalg.norm(np.diff(T_odom[:, :3, 3], axis=0), axis=1)
    assert np.std(np.log(local_scale)) > 0.02  # it drifts
    # Each odometry step is 10 cm in that frame's units (up to the 2 % + 2 mm step noise).
    assert np.median(np.abs(steps / (0.1 * local_scale[1:]) - 1)) < 0.05
    metric = simulate_odometry(poses, np.random.default_rng(3))
    assert np.ptp(metric[-1]) == 0.0  # metric odometry: one constant scale bias


def test_generate_monocular_sequence_writes_map_points_in_local_units(tmp_path):
    bag = generate_sequence(tmp_path / "seq", "office", frames=10, seed=1, width=320, height=240, progress=False,
                            monocular=True)
    metadata = json.loads((tmp_path / "seq" / "sequence.json").read_text())
    local_scale = np.array(metadata["monocular"]["local_scale"])
    frames = list(read_sequence(bag))
    assert len(frames) == 10 and all(f.depth is None for f in frames)
    assert all(f.map_points is not None and len(f.map_points[0]) > 100 for f in frames)
    # Map points of frame k, divided by its local scale, lie on the rendered surfaces: the same metres as the GT
    # poses. Check through the odometry: frame 0's map point depths match a metric render of frame 0 up to noise.
    from feature_matching_ros.scenes.builders import build_scene
    from feature_matching_ros.scenes.renderer import Renderer, default_intrinsics

    K = default_intrinsics(320, 240)
    for k in (0, 9):
        depth = Renderer(build_scene("office", 1).scene).render(K, frames[k].T_map_camera, 320, 240).depth
        pixels, points = frames[k].map_points
        rendered = depth[np.round(pixels[:, 1]).astype(int), np.round(pixels[:, 0]).astype(int)]
        ratio = points[:, 2] / rendered
        assert np.median(ratio) == pytest.approx(local_scale[k], rel=0.01)
