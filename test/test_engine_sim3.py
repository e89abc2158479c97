"""Monocular Sim3 loops through the engine on real images with exact ground truth (Middlebury motorcycle).

Each keyframe gets "backend map points" the way an ORB-SLAM3 keyframe holds them: keypoints of the backend's
own detector (OpenCV ORB, 8 levels x 1.2, not the engine's keypoints) with the 3D of the GT depth at them, in
that keyframe's camera frame. The match keyframe's map is scaled by 1.7 (a monocular map's arbitrary units), so
the loop must come back as a Sim3 with s = 1.7.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from feature_matching_ros.config import PipelineConfig
from feature_matching_ros.engine import EngineConfig, LoopClosureEngine
from feature_matching_ros.eval.metrics import rotation_angle_deg
from feature_matching_ros.pipeline import MatchingPipeline
from feature_matching_ros.retrieval.database import MapPoints, RetrievalConfig

SECOND = 1_000_000_000
MAP_SCALE = 1.7


@pytest.fixture(scope="module")
def pipeline(orb_nn_pipeline):
    return orb_nn_pipeline


def _engine(pipeline) -> LoopClosureEngine:
    retrieval = RetrievalConfig(top_k=3, exclude_recent_seconds=5.0, exclude_recent_count=0)
    return LoopClosureEngine(pipeline, EngineConfig(retrieval=retrieval, min_inliers=30, min_inlier_ratio=0.3,
                                                    temporal_consistency=1))


def _right_depth(pair) -> np.ndarray:
    """GT depth of the right image: the left depth forward-warped through the exact stereo geometry (nearest
    surface wins), NaN where the right camera sees what the left does not."""
    depth0 = pair.depth0
    rows, cols = np.nonzero(depth0 > 0)
    z = depth0[rows, cols].astype(np.float64)
    K0, K1 = pair.K0, pair.K1
    x = (cols - K0[0, 2]) / K0[0, 0] * z + pair.T_1_0[0, 3]
    u = np.round(x / z * K1[0, 0] + K1[0, 2]).astype(int)
    inside = (u >= 0) & (u < depth0.shape[1])
    depth1 = np.full(depth0.shape, np.inf)
    np.minimum.at(depth1, (rows[inside], u[inside]), z[inside])
    depth1[~np.isfinite(depth1)] = np.nan
    return depth1.astype(np.float32)


def _backend_map_points(image: np.ndarray, depth: np.ndarray, K: np.ndarray, scale: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) pixels of an ORB-SLAM3-like detector's keypoints and (P, 3) their points in backend units."""
    orb = cv2.ORB_create(nfeatures=1500, scaleFactor=1.2, nlevels=8)
    keypoints = orb.detect(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), None)
    pixels = np.array([k.pt for k in keypoints], np.float64)
    z = depth[np.round(pixels[:, 1]).astype(int), np.round(pixels[:, 0]).astype(int)].astype(np.float64)
    valid = np.isfinite(z) & (z > 0)
    pixels, z = pixels[valid], z[valid]
    points = np.c_[(pixels[:, 0] - K[0, 2]) / K[0, 0] * z, (pixels[:, 1] - K[1, 2]) / K[1, 1] * z, z]
    return pixels, scale * points


def test_sim3_loop_carries_the_scale_between_two_monocular_maps(pipeline, motorcycle):
    engine = _engine(pipeline)
    left_points = _backend_map_points(motorcycle.image0, motorcycle.depth0, motorcycle.K0, MAP_SCALE)
    right_points = _backend_map_points(motorcycle.image1, _right_depth(motorcycle), motorcycle.K1, 1.0)
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, map_points=left_points)
    result = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1,
                                     map_points=right_points)
    loop = result.candidates[0]
    assert loop.accepted and loop.method == "sim3" and not loop.metric, loop.reason
    # X_left (units of 1.7 m) = s R X_right (metres) + t: s = 1.7, R = I, t = 1.7 x (+baseline along x).
    assert loop.scale == pytest.approx(MAP_SCALE, rel=0.05)
    assert rotation_angle_deg(loop.T_match_query[:3, :3]) < 1.0
    expected_t = -MAP_SCALE * motorcycle.T_1_0[:3, 3]
    assert np.linalg.norm(loop.T_match_query[:3, 3] - expected_t) < 0.05 * np.linalg.norm(expected_t)
    # Translation is observed (unlike the essential matrix): information along it, and a 7x7 with log-scale.
    direction = np.r_[expected_t / np.linalg.norm(expected_t), np.zeros(3)]
    assert direction @ loop.information @ direction > 0
    assert loop.information_sim3.shape == (7, 7) and np.all(np.linalg.eigvalsh(loop.information_sim3) > 0)
    assert loop.num_inliers >= 100 and loop.median_residual_px < 1.5
    assert loop.to_json_dict()["scale"] == pytest.approx(loop.scale)


def test_without_map_points_on_both_sides_the_loop_stays_an_essential_matrix(pipeline, motorcycle):
    engine = _engine(pipeline)
    left_points = _backend_map_points(motorcycle.image0, motorcycle.depth0, motorcycle.K0, MAP_SCALE)
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, map_points=left_points)
    loop = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1).candidates[0]
    assert loop.geometry_ok and loop.method == "essential" and loop.scale == 1.0 and loop.information_sim3 is None
    # "scale unknown" is exact: no information along the unit translation.
    t = loop.T_match_query[:3, 3]
    along = np.r_[t, np.zeros(3)]
    assert abs(along @ loop.information @ along) <= 1e-9 * np.trace(loop.information)
    assert np.allclose(loop.information @ along, 0.0, atol=1e-9 * np.trace(loop.information))


def test_map_points_survive_the_map_round_trip(tmp_path, pipeline, motorcycle):
    engine = _engine(pipeline)
    pixels, points = _backend_map_points(motorcycle.image0, motorcycle.depth0, motorcycle.K0, MAP_SCALE)
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, map_points=(pixels, points))
    engine.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1)  # none for this one
    engine.save_map(tmp_path / "map")
    fresh = _engine(pipeline)
    fresh.load_map(tmp_path / "map")
    stored = fresh.database.get(0).map_points
    assert np.allclose(stored.pixels, pixels, atol=1e-3) and np.allclose(stored.points, points, rtol=1e-6)
    assert fresh.database.get(1).map_points is None
    # A map written without map points has none of their files (maps from before them load unchanged).
    plain = _engine(pipeline)
    plain.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0)
    plain.save_map(tmp_path / "plain")
    assert not (tmp_path / "plain" / "map_points.npy").exists()
    fresh.load_map(tmp_path / "plain")
    assert fresh.database.get(0).map_points is None


def test_map_points_association_and_bad_input():
    points = MapPoints.from_backend(np.array([[10.0, 10.0], [20.0, 10.0], [np.nan, 1.0], [30.0, 5.0]]),
                                    np.array([[0, 0, 1.0], [0, 0, 2.0], [0, 0, 3.0], [0, 0, -1.0]]))
    assert len(points) == 2  # the NaN pixel and the point behind the camera carry no 3D
    found = points.at(np.array([[10.5, 10.0], [11.0, 10.0], [20.0, 12.5], [19.0, 10.5]]), radius_px=2.0)
    # The first backend point goes to its nearest query only; the third query is 2.5 px away (outside).
    assert found[0, 2] == 1.0 and np.isnan(found[1]).all() and np.isnan(found[2]).all() and found[3, 2] == 2.0
    with pytest.raises(ValueError, match=r"\(P, 3\)"):
        MapPoints.from_backend(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="3 map point pixels but 2"):
        MapPoints.from_backend(np.zeros((3, 2)), np.zeros((2, 3)))


def test_odometry_gate_checks_sim3_loops_up_to_the_scale_drift_they_measure(pipeline, motorcycle):
    """The backend's poses are in its drifting units: between the match's (1.7 per metre here) and the query's
    (1 per metre), so an odometry baseline anywhere between 0.193 and 0.328 agrees with the loop; 3 units does not."""
    left_points = _backend_map_points(motorcycle.image0, motorcycle.depth0, motorcycle.K0, MAP_SCALE)
    right_points = _backend_map_points(motorcycle.image1, _right_depth(motorcycle), motorcycle.K1, 1.0)
    verdicts = {}
    for baseline in (0.193, MAP_SCALE * 0.193, 3.0):
        engine = _engine(pipeline)
        engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, T_map_camera=np.eye(4),
                                map_points=left_points)
        T_map_right = np.eye(4)
        T_map_right[0, 3] = baseline
        loop = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1,
                                       T_map_camera=T_map_right, map_points=right_points).candidates[0]
        assert loop.method == "sim3" and loop.drift_translation_m is not None
        verdicts[baseline] = (loop.accepted, loop.reason)
    assert verdicts[0.193][0] and verdicts[MAP_SCALE * 0.193][0], verdicts
    assert not verdicts[3.0][0] and verdicts[3.0][1].startswith("inconsistent with odometry"), verdicts


def test_a_sim3_that_does_not_measure_the_scale_falls_back_to_the_essential_matrix(motorcycle):
    """With a scale-certainty demand no Sim3 meets, the same pair is verified as monocular: essential matrix."""
    config = PipelineConfig.from_dict({"features": {"detector": "orb", "descriptor": "native", "max_keypoints": 1024,
                                                    "resize_max": 0},
                                       "matcher": {"name": "nn", "ratio_test": 0.8}, "device": "cpu",
                                       "pose": {"sim3_max_scale_sigma": 1e-9}})
    engine = _engine(MatchingPipeline(config))
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0,
                            map_points=_backend_map_points(motorcycle.image0, motorcycle.depth0, motorcycle.K0, 1.7))
    loop = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1, map_points=(
        _backend_map_points(motorcycle.image1, _right_depth(motorcycle), motorcycle.K1, 1.0))).candidates[0]
    assert loop.geometry_ok and loop.method == "essential" and loop.scale == 1.0, loop.reason
