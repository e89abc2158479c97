"""The loop-closure / relocalization engine on real images with exact ground truth (Middlebury motorcycle)."""

from __future__ import annotations

import numpy as np
import pytest

from feature_matching_ros.config import PipelineConfig
from feature_matching_ros.eval.metrics import rotation_angle_deg
from feature_matching_ros.geometry.pose import RelativePose, invert_relative_pose, pose_from_points3d
from feature_matching_ros.pipeline import MatchingPipeline
from feature_matching_ros.presets import build_configs, get_preset, preset_names
from feature_matching_ros.engine import EngineConfig, LoopClosureEngine
from feature_matching_ros.engine.records import LoopClosure
from feature_matching_ros.retrieval import MapFormatError
from feature_matching_ros.retrieval.database import Keyframe, RetrievalConfig

SECOND = 1_000_000_000


@pytest.fixture(scope="module")
def pipeline(orb_nn_pipeline):
    return orb_nn_pipeline


def _engine(pipeline, **overrides) -> LoopClosureEngine:
    """Single-pair engine: temporal consistency off unless a test asks for it (one query per place here)."""
    overrides.setdefault("temporal_consistency", 1)
    retrieval = RetrievalConfig(top_k=3, exclude_recent_seconds=5.0, exclude_recent_count=0)
    return LoopClosureEngine(pipeline, EngineConfig(retrieval=retrieval, min_inliers=30, min_inlier_ratio=0.3,
                                                    **overrides))


def _photo(name: str) -> np.ndarray:
    import cv2
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return cv2.resize(image[..., :3], (741, 500))


def test_relocalize_with_map_depth_recovers_the_baseline(pipeline, motorcycle):
    engine = _engine(pipeline)
    T_map_left = np.eye(4)
    T_map_left[:3, 3] = [1.0, 2.0, 0.5]
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=7, T_map_camera=T_map_left,
                            depth=motorcycle.depth0)
    result = engine.relocalize(motorcycle.image1, motorcycle.K1)  # monocular query, map keyframe has depth
    assert result.success, result.reason
    assert result.match_id == 7 and result.num_inliers >= 100
    T_map_right_gt = T_map_left @ np.linalg.inv(motorcycle.T_1_0)
    assert np.linalg.norm(result.T_map_camera[:3, 3] - T_map_right_gt[:3, 3]) < 0.02  # baseline is 0.193 m
    assert rotation_angle_deg(result.T_map_camera[:3, :3].T @ T_map_right_gt[:3, :3]) < 0.5
    assert result.covariance.shape == (6, 6) and np.all(np.linalg.eigvalsh(result.covariance) > 0)
    assert np.all(np.sqrt(np.diag(result.covariance)[:3]) < 0.05)


def test_loop_closure_with_query_depth_and_reasons(pipeline, motorcycle):
    engine = _engine(pipeline)
    result = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 0, keyframe_id=0)
    assert result.reason == "database empty" and not result.candidates
    # within the 5 s exclusion window: the same place is not offered as a loop
    result = engine.process_keyframe(_photo("coffee"), motorcycle.K1, 2 * SECOND, keyframe_id=1)
    assert result.reason == "no eligible candidates outside the exclusion window"
    result = engine.process_keyframe(motorcycle.image0, motorcycle.K0, 20 * SECOND, keyframe_id=2,
                                     depth=motorcycle.depth0)
    by_id = {c.match_id: c for c in result.candidates}
    loop = by_id[0]
    assert loop.accepted and loop.reason == "ok" and loop.metric and loop.method == "pnp", loop.reason
    # T_match_query = T_right_left = T_1_0: a translation of -baseline along x
    assert np.allclose(loop.T_match_query[:3, 3], motorcycle.T_1_0[:3, 3], atol=0.02)
    assert loop.information.shape == (6, 6) and np.all(np.linalg.eigvalsh(loop.information) > 0)
    unrelated = by_id[1]
    assert not unrelated.accepted and unrelated.reason.startswith(("geometric verification failed", "too few"))
    assert len(result.accepted) == 1


def test_monocular_loop_is_not_metric_and_relocalization_refuses_it(pipeline, motorcycle):
    engine = _engine(pipeline)
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, T_map_camera=np.eye(4))
    result = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1)
    loop = result.candidates[0]
    assert loop.geometry_ok and loop.method == "essential" and not loop.metric and loop.scale == 1.0
    # direction of the translation is still right: T_left_right is a unit step along +x
    assert np.isclose(np.linalg.norm(loop.T_match_query[:3, 3]), 1.0)
    assert loop.T_match_query[0, 3] > 0.95
    reloc = engine.relocalize(motorcycle.image1, motorcycle.K1, exclude_ids={1})
    assert not reloc.success and "scale unknown" in reloc.reason


def test_odometry_gate_rejects_a_loop_that_contradicts_the_backend(pipeline, motorcycle):
    engine = _engine(pipeline)
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, T_map_camera=np.eye(4),
                            depth=motorcycle.depth0)
    far = np.eye(4)
    far[:3, 3] = [5.0, 0.0, 0.0]  # the backend says we are 5 m away after ~5 m of travel: the loop says 0.193 m
    result = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1, T_map_camera=far)
    loop = result.candidates[0]
    assert loop.geometry_ok and not loop.accepted and loop.reason.startswith("inconsistent with odometry"), loop.reason
    assert loop.drift_translation_m == pytest.approx(5.0 - 0.193, abs=0.02)
    # the same loop with a consistent backend pose is accepted
    engine2 = _engine(pipeline)
    engine2.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, T_map_camera=np.eye(4),
                             depth=motorcycle.depth0)
    near = np.eye(4)
    near[:3, 3] = [0.3, 0.0, 0.0]
    assert engine2.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1,
                                    T_map_camera=near).accepted


def test_thresholds_and_temporal_consistency(pipeline, motorcycle):
    strict = _engine(pipeline)
    strict.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, depth=motorcycle.depth0)
    query = dict(image=motorcycle.image1, K=motorcycle.K1, stamp_ns=20 * SECOND, keyframe_id=1, insert=False)
    loop = strict.process_keyframe(**query).candidates[0]
    assert loop.accepted and loop.num_inliers < loop.num_matches, loop.reason
    strict.config.min_inliers = loop.num_inliers + 1  # within reach of the matches, not of the inliers
    loop = strict.process_keyframe(**query).candidates[0]
    assert loop.geometry_ok and not loop.accepted and loop.reason.startswith("too few inliers")
    strict.config.min_inliers = loop.num_matches + 1  # beyond the matches: rejected before any RANSAC
    loop = strict.process_keyframe(**query).candidates[0]
    assert not loop.geometry_ok and not loop.accepted and loop.num_inliers == 0
    assert loop.reason.startswith(f"too few matches for the required support: {loop.num_matches} < "
                                  f"{loop.num_matches + 1}"), loop.reason
    # No inlier ratio reaches 1.0: the RANSAC stops at its floor and says so, the pair is rejected for it.
    strict.config.min_inliers, strict.config.min_inlier_ratio = 30, 1.0
    loop = strict.process_keyframe(motorcycle.image1, motorcycle.K1, 40 * SECOND, keyframe_id=2).candidates[0]
    assert not loop.geometry_ok and loop.reason.startswith("geometric verification failed: inlier ratio 0.")
    assert "< min_inlier_ratio=1.0 (PnP RANSAC" in loop.reason

    engine = _engine(pipeline, temporal_consistency=2)
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, depth=motorcycle.depth0)
    first = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 20 * SECOND, keyframe_id=1, insert=False)
    assert not first.accepted and first.candidates[0].reason.startswith("awaiting temporal consistency")
    second = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 21 * SECOND, keyframe_id=2, insert=False)
    assert second.accepted and second.accepted[0].match_id == 0


def test_pnp_from_points_and_inversion_are_consistent(motorcycle):
    """Per-keypoint-depth PnP on exact synthetic correspondences, and information through inversion."""
    rng = np.random.default_rng(0)
    points = np.c_[rng.uniform(-1, 1, (200, 2)), rng.uniform(2, 6, 200)]
    T = np.eye(4)
    T[:3, :3] = np.array([[0.995, -0.0998, 0], [0.0998, 0.995, 0], [0, 0, 1]])
    T[:3, :3] = np.linalg.svd(T[:3, :3])[0] @ np.linalg.svd(T[:3, :3])[2]
    T[:3, 3] = [0.2, -0.1, 0.05]
    camera = points @ T[:3, :3].T + T[:3, 3]
    pixels = camera[:, :2] / camera[:, 2:] * 500 + [320, 240] + rng.normal(0, 0.3, (200, 2))
    points[:10] = np.nan  # no depth
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    from feature_matching_ros.config import PoseConfig

    pose = pose_from_points3d(points, pixels, K, PoseConfig())
    assert pose.success and pose.metric and pose.num_inliers >= 180 and not pose.inliers[:10].any()
    assert np.allclose(pose.T_1_0, T, atol=5e-3)
    back = invert_relative_pose(invert_relative_pose(pose))
    assert np.allclose(back.T_1_0, pose.T_1_0) and np.allclose(back.information, pose.information, rtol=1e-6)
    assert isinstance(back, RelativePose)


def test_map_persistence_through_the_engine(tmp_path, pipeline, motorcycle):
    engine = _engine(pipeline)
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=3, T_map_camera=np.eye(4),
                            depth=motorcycle.depth0)
    engine.save_map(tmp_path / "map")
    fresh = _engine(pipeline)
    manifest = fresh.load_map(tmp_path / "map")
    assert manifest["counts"]["keyframes"] == 1
    assert fresh.relocalize(motorcycle.image1, motorcycle.K1).success
    other = MatchingPipeline(PipelineConfig.from_dict({"features": {"detector": "orb", "descriptor": "native",
                                                                    "max_keypoints": 512, "resize_max": 0},
                                                       "matcher": {"name": "nn"}, "device": "cpu"}))
    with pytest.raises(MapFormatError, match="max_keypoints"):
        _engine(other).load_map(tmp_path / "map")


def test_presets_build_and_validate():
    from feature_matching_ros.config import ConfigError

    assert {"orb_lightglue", "aliked_lightglue", "cpu", "orb_bow_nn"} <= set(preset_names())
    for name in preset_names():
        pipeline_config, engine_config = build_configs(name)
        assert engine_config.min_inliers >= 5 and pipeline_config.features.max_keypoints > 0
    with pytest.raises(ConfigError, match="preset='nope'"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="unknown engine keys"):
        build_configs("cpu", {"engine": {"min_inlier": 3}})
    with pytest.raises(ConfigError, match="min_inlier_ratio"):
        build_configs("cpu", {"engine": {"min_inlier_ratio": 2.0}})


def _pose(x: float, y: float, yaw_deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("y", yaw_deg, degrees=True).as_matrix()
    T[:3, 3] = [x, y, 0.0]
    return T


def test_graph_prediction_composes_odometry_and_accepted_loops(pipeline):
    """The odometry gate's prediction along the keyframe graph equals the backend's relative pose with the metres
    travelled and the degrees turned along the path, and an accepted loop becomes a zero-length, zero-turn shortcut
    (drift is measured since the last closure)."""
    engine = _engine(pipeline)
    dim = engine.codebook.dim
    poses = [_pose(0, 0, 0), _pose(1, 0, 20), _pose(2, 1, 60), _pose(2, 2, 120), _pose(1, 3, 170)]
    for i, T in enumerate(poses):
        engine.insert(Keyframe(i, i * SECOND, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8),
                               np.zeros(0, np.float16), (640, 480), "orb", np.eye(3), np.ones(dim, np.float32), T))
    query = Keyframe(9, 9 * SECOND, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8),
                     np.zeros(0, np.float16), (640, 480), "orb", np.eye(3), np.ones(dim, np.float32),
                     _pose(0.5, 3.5, 200))
    predicted = engine._predict_from_graph(query, {0, 2})
    for position in (0, 2):
        assert np.allclose(predicted[position][0], np.linalg.inv(poses[position]) @ query.T_map_camera)
    path_to_0 = predicted[0][1]
    assert path_to_0 == pytest.approx(sum(np.linalg.norm(poses[i + 1][:3, 3] - poses[i][:3, 3]) for i in range(4))
                                      + np.linalg.norm(query.T_map_camera[:3, 3] - poses[4][:3, 3]))
    assert predicted[0][2] == pytest.approx(200.0)  # yaw 0 -> 20 -> 60 -> 120 -> 170 -> 200 deg
    # keyframe 5 closes a loop to keyframe 0 (measured pose = backend's): the query's path to 0 now goes through it
    loop = LoopClosure(5, 0, 5 * SECOND, 0, True, "ok", np.linalg.inv(poses[0]) @ _pose(0.2, 0.1, 10), 1.0, True)
    engine._pending_loops[5] = [(0, loop)]
    engine.insert(Keyframe(5, 5 * SECOND, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8),
                           np.zeros(0, np.float16), (640, 480), "orb", np.eye(3), np.ones(dim, np.float32),
                           _pose(0.2, 0.1, 10)))
    query.T_map_camera = _pose(0.3, 0.1, 15)
    T_pred, path, turned = engine._predict_from_graph(query, {0})[0]
    assert path == pytest.approx(0.1, abs=1e-6)
    assert turned == pytest.approx(5.0)
    assert np.allclose(T_pred, np.linalg.inv(poses[0]) @ query.T_map_camera)


@pytest.mark.parametrize("method,metric,accepted", [("pnp", True, True), ("essential", False, False)])
def test_odometry_gate_allows_rotation_drift_for_the_angle_turned_where_translation_is_checked(
        pipeline, method, metric, accepted):
    """A hand-held camera that turned 360 deg over 1 m: its odometry may have drifted 7 deg in rotation. A metric loop
    that disagrees by 7 deg (translation right) passes (5 + 0.5 x 1 + 0.02 x 360 = 12.7 deg allowed); an
    essential-matrix loop, gated on rotation alone, keeps the distance-only allowance (5.5 deg) and is rejected."""
    engine = _engine(pipeline)
    T_predicted = _pose(0.5, 0.0, 0.0)
    loop = LoopClosure(9, 0, 9 * SECOND, 0, False, "", T_predicted @ _pose(0.0, 0.0, 7.0), 1.0, metric,
                       method=method)
    reason = engine._odometry_gate(loop, (T_predicted, 1.0, 360.0))
    assert (reason is None) == accepted, reason
    assert loop.drift_rotation_deg == pytest.approx(7.0)


def _crop(image: np.ndarray, shift: int) -> np.ndarray:
    """Another view of the same place: a shifted, slightly zoomed crop at the same size."""
    import cv2

    h, w = image.shape[:2]
    return cv2.resize(image[shift:h - shift // 2, shift:w - shift // 2], (w, h))


def test_cheap_verification_keeps_every_decision(pipeline, motorcycle):
    """The support pre-check, the RANSAC floor and verification threads change no accepted loop and no pose on real
    images, only the reasons of rejections (pre-check, floor); candidates rejected before RANSAC fail a full
    verification too. Map: the motorcycle's left view (with depth) and five photos; queries: the right view and
    crops of two photos, each against five candidates (mostly other places)."""
    from feature_matching_ros.engine.verification import verify_pair
    from feature_matching_ros.matchers.base import View
    from feature_matching_ros.ros.reason_codes import ReasonCode, reason_code

    photos = ("astronaut", "coffee", "chelsea", "rocket", "brick")

    def run(**overrides):
        retrieval = RetrievalConfig(top_k=5, exclude_recent_seconds=5.0, exclude_recent_count=0)
        engine = LoopClosureEngine(pipeline, EngineConfig(retrieval=retrieval, min_inliers=30, min_inlier_ratio=0.3,
                                                          temporal_consistency=1, **overrides))
        engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, keyframe_id=0, depth=motorcycle.depth0)
        for i, name in enumerate(photos, start=1):
            engine.process_keyframe(_photo(name), motorcycle.K0, i * SECOND, keyframe_id=i)
        queries = [(motorcycle.image1, 100), (_crop(_photo("coffee"), 30), 101), (_crop(_photo("chelsea"), 40), 102)]
        loops = [c for image, t in queries for c in engine.process_keyframe(image, motorcycle.K1, t * SECOND,
                                                                            insert=False).candidates]
        return engine, loops

    _, full = run(verification_threads=1, ransac_floor=False)
    engine, cheap = run(verification_threads=3)  # the defaults: RANSAC floor on
    assert [(c.query_id, c.match_id) for c in full] == [(c.query_id, c.match_id) for c in cheap] and len(full) == 15
    assert sum(c.accepted for c in cheap) >= 3  # the three true loops
    for a, b in zip(full, cheap):
        assert a.accepted == b.accepted, (a.match_id, a.reason, b.reason)
        if a.accepted:
            assert np.allclose(a.T_match_query, b.T_match_query, atol=1e-9) and a.num_inliers == b.num_inliers
        elif reason_code(a.reason) != reason_code(b.reason):
            assert reason_code(b.reason) == ReasonCode.LOW_INLIER_RATIO, (a.reason, b.reason)
    early = [c for c in cheap if reason_code(c.reason) == ReasonCode.SUPPORT_OUT_OF_REACH]
    assert len(early) >= 3, [c.reason for c in cheap]
    for loop in early:  # full verification (no floor, no pre-check) of the same matches rejects them too
        query = pipeline.extract({100: motorcycle.image1, 101: _crop(_photo("coffee"), 30),
                                  102: _crop(_photo("chelsea"), 40)}[loop.query_stamp_ns // SECOND])
        match = engine.database.get(loop.match_id)
        correspondences = pipeline.correspond(View(features=query), [View(features=match.to_features())])[0]
        assert len(correspondences) == loop.num_matches
        required = max(30, int(np.ceil(0.05 * min(len(query), len(match)))))
        assert loop.num_matches < required
        pose = verify_pair(correspondences, None, match.depth_at(correspondences.points1, correspondences.index1),
                           motorcycle.K1, match.K, pipeline.config.pose)
        assert not pose.success or pose.num_inliers < required


def test_describe_ahead_gives_the_one_by_one_results(pipeline, motorcycle):
    """Each next keyframe described in a background thread while the current one verifies (DescribeAhead, the
    node's backlog path) gives exactly the loops, reasons and poses of processing the keyframes one by one."""
    from feature_matching_ros.engine.describe_ahead import DescribeAhead

    keyframes = [(motorcycle.image0, motorcycle.depth0)] + [(_photo(n), None) for n in ("astronaut", "coffee", "chelsea")]
    keyframes += [(motorcycle.image1, None), (_crop(_photo("coffee"), 30), None), (_crop(_photo("chelsea"), 40), None)]

    def arguments(index: int) -> dict:
        image, depth = keyframes[index]
        return dict(image=image, K=motorcycle.K0, stamp_ns=index * 10 * SECOND, keyframe_id=index, depth=depth)

    one_by_one = _engine(pipeline)
    expected = [one_by_one.process_keyframe(**arguments(i)) for i in range(len(keyframes))]
    engine = _engine(pipeline)
    ahead = DescribeAhead(engine)
    results = []
    for index in range(len(keyframes)):
        described = ahead.take(index)
        assert (described is None) == (index == 0)
        following = (lambda n=index + 1: ahead.start(n, **arguments(n))) if index + 1 < len(keyframes) else None
        results.append(engine.process_keyframe(**arguments(index), described=described, after_matching=following))
    ahead.close()
    assert sum(c.accepted for r in expected for c in r.candidates) >= 3
    for a, b in zip(expected, results):
        assert [(c.match_id, c.accepted, c.reason, c.num_inliers) for c in a.candidates] == \
            [(c.match_id, c.accepted, c.reason, c.num_inliers) for c in b.candidates]
        for ca, cb in zip(a.candidates, b.candidates):
            assert np.allclose(ca.T_match_query, cb.T_match_query, atol=1e-9)


def test_two_keyframes_of_one_stretch_are_one_place_not_an_ambiguity(pipeline, motorcycle):
    """A hand-held camera lingers and turns a little: two keyframes seconds apart see the same scene, and a later
    visit verifies against both nearly as well. Retrieval never compared the two (recency exclusion) and they
    verify against each other, so they are one place and the loop is accepted. The same two views far apart in
    time stay ambiguous: without the backend's covisibility they could be two look-alike places."""
    import cv2

    height, width = motorcycle.image0.shape[:2]
    turn = cv2.Rodrigues(np.array([0.0, np.radians(2.0), 0.0]))[0]
    H = motorcycle.K0 @ turn @ np.linalg.inv(motorcycle.K0)
    turned = cv2.warpPerspective(motorcycle.image0, H, (width, height))
    verdicts = {}
    for gap_s in (2, 30):
        engine = _engine(pipeline, consistency_window=0)  # as if other keyframes lay between the two
        for keyframe_id, (image, stamp_ns) in enumerate(((motorcycle.image0, 0), (turned, gap_s * SECOND))):
            keyframe, _, _ = engine.describe(image, motorcycle.K0, stamp_ns, keyframe_id)
            engine.insert(keyframe)  # no loop detection between the two: only the query below compares them
        result = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 100 * SECOND, keyframe_id=2,
                                         insert=False)
        verified = sorted((c for c in result.candidates if c.geometry_ok), key=lambda c: -c.num_inliers)
        assert len(verified) == 2 and verified[1].num_inliers >= 0.7 * verified[0].num_inliers, \
            [(c.match_id, c.num_inliers, c.reason) for c in result.candidates]
        verdicts[gap_s] = result
    assert [c.match_id for c in verdicts[2].accepted] == [max(verified, key=lambda c: c.num_inliers).match_id]
    assert not verdicts[30].accepted
    assert all(c.reason.startswith("ambiguous") for c in verdicts[30].candidates)
