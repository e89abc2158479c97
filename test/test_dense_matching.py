"""Detector-free matchers (Efficient LoFTR, LoFTR) behind the pipeline and the loop-closure engine.

Accuracy of our shipped Efficient LoFTR weights is pinned on pairs with ground truth; the plumbing tests
(weights from a path, padding, map persistence of keyframe images, clear errors) use a checkpoint written
here so they do not depend on the shipped weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feature_matching_ros.config import ConfigError, FeatureConfig, MatcherConfig, PipelineConfig
from feature_matching_ros.devdata import homography_errors, load_motorcycle, reprojection_errors, \
    synthetic_homography_pair
from feature_matching_ros.pipeline import MatchingPipeline
from feature_matching_ros.weights import WeightsError

RETRIEVAL_ONLY = FeatureConfig(detector="orb", descriptor="native", max_keypoints=256, resize_max=320)


def _pipeline(matcher: MatcherConfig, features: FeatureConfig = RETRIEVAL_ONLY) -> MatchingPipeline:
    return MatchingPipeline(PipelineConfig(features=features, matcher=matcher, device="cpu"))


@pytest.fixture(scope="module")
def random_eloftr_checkpoint(tmp_path_factory):
    """An Efficient LoFTR checkpoint in the official Lightning layout, random weights (plumbing only)."""
    from feature_matching_ros.models.efficient_loftr import EfficientLoFTR

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eloftr") / "random.ckpt"
    state = {f"matcher.{k}": v for k, v in EfficientLoFTR().state_dict().items()}
    torch.save({"state_dict": state, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def random_loftr_checkpoint(tmp_path_factory):
    from kornia.feature import LoFTR

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("loftr") / "random.ckpt"
    torch.save({"state_dict": {f"matcher.{k}": v for k, v in LoFTR(pretrained=None).state_dict().items()}}, path)
    return path


def test_config_validates_dense_matchers():
    assert PipelineConfig(matcher=MatcherConfig(name="eloftr")).detector_free
    assert not PipelineConfig().detector_free
    with pytest.raises(ConfigError, match="eloftr_mode"):
        MatcherConfig(name="eloftr", eloftr_mode="fast")
    with pytest.raises(ConfigError, match="weights='x.ckpt'"):
        MatcherConfig(name="lightglue", weights="x.ckpt")
    with pytest.raises(ConfigError, match="coarse_threshold"):
        MatcherConfig(name="eloftr", coarse_threshold=1.5)


def test_missing_or_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        _pipeline(MatcherConfig(name="eloftr", weights=str(tmp_path / "none.ckpt")))
    with pytest.raises(WeightsError, match="needs weights=PATH"):
        _pipeline(MatcherConfig(name="loftr"))
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"matcher.backbone.nope": torch.zeros(1)}}, bad)
    with pytest.raises(WeightsError):
        _pipeline(MatcherConfig(name="eloftr", weights=str(bad)))
    with pytest.raises(WeightsError):
        _pipeline(MatcherConfig(name="loftr", weights=str(bad)))


@pytest.mark.parametrize("name", ["eloftr", "loftr"])
def test_any_image_size_maps_back_inside_the_original_images(name, random_eloftr_checkpoint, random_loftr_checkpoint):
    """Sizes that are not stride multiples are padded; every returned match lies inside both original images,
    and a keypoint matcher method (match) is refused with a clear message."""
    checkpoint = random_eloftr_checkpoint if name == "eloftr" else random_loftr_checkpoint
    pipeline = _pipeline(MatcherConfig(name=name, weights=str(checkpoint), coarse_threshold=0.0))
    pair = synthetic_homography_pair("astronaut", 0, size=(150, 110))
    other = np.ascontiguousarray(pair.image1[:100, :140])
    results = pipeline.match_images(pair.image0, [pair.image1, other])
    assert len(results) == 2
    for result, image in zip(results, (pair.image1, other)):
        assert result.keypoints0.shape == result.keypoints1.shape and result.keypoints0.dtype == np.float32
        assert len(result) > 0  # threshold 0: some mutual nearest neighbours always exist
        for points, (height, width) in ((result.keypoints0, pair.image0.shape[:2]), (result.keypoints1, image.shape[:2])):
            assert (points >= -0.5).all() and (points[:, 0] <= width - 0.5).all() and (points[:, 1] <= height - 0.5).all()
        assert ((result.scores >= 0) & (result.scores <= 1)).all()
    with pytest.raises(TypeError, match="detector-free"):
        pipeline.match(pipeline.extract(pair.image0), [pipeline.extract(pair.image1)])


def test_engine_keeps_keyframe_images_for_dense_verification_and_persists_them(random_eloftr_checkpoint, tmp_path):
    """A detector-free engine stores each keyframe's gray image and depth image, matches images on
    verification, and its map round-trips them; a keypoint map is refused with a clear error."""
    from feature_matching_ros.presets import build_configs
    from feature_matching_ros.engine import LoopClosureEngine
    from feature_matching_ros.retrieval.persistence import MapFormatError

    motorcycle = load_motorcycle()
    override = {"pipeline": {"features": {"detector": "orb", "descriptor": "aliked", "max_keypoints": 256,
                                          "resize_max": 320},
                             "matcher": {"weights": str(random_eloftr_checkpoint)}, "device": "cpu"},
                "engine": {"retrieval": {"exclude_recent_seconds": 0.0, "exclude_recent_count": 0},
                           "temporal_consistency": 1}}
    pipeline_config, engine_config = build_configs("eloftr", override)
    engine = LoopClosureEngine(MatchingPipeline(pipeline_config), engine_config)
    depth0 = motorcycle.depth0
    engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0, depth=depth0, T_map_camera=np.eye(4))
    result = engine.process_keyframe(motorcycle.image1, motorcycle.K1, 10 ** 9, T_map_camera=np.eye(4))
    assert result.reason == "ok" and len(result.candidates) == 1  # verified (rejected or not: random weights)
    assert result.candidates[0].num_matches > 0 and "match" in result.timing_ms
    stored = engine.database.keyframes[0]
    assert stored.image.shape == motorcycle.image0.shape[:2] and stored.image.dtype == np.uint8
    assert stored.depth_image.dtype == np.float16 and stored.depth_image.shape == depth0.shape
    engine.save_map(tmp_path / "map")
    loaded = LoopClosureEngine(MatchingPipeline(pipeline_config), engine_config)
    loaded.load_map(tmp_path / "map")
    assert np.array_equal(loaded.database.keyframes[0].image, stored.image)
    np.testing.assert_array_equal(loaded.database.keyframes[0].depth_image, stored.depth_image)
    assert loaded.database.keyframes[1].depth_image is None

    keypoint_config, _ = build_configs("cpu", {"pipeline": {"features": override["pipeline"]["features"]}})
    keypoint_engine = LoopClosureEngine(MatchingPipeline(keypoint_config), engine_config)
    keypoint_engine.process_keyframe(motorcycle.image0, motorcycle.K0, 0)
    keypoint_engine.save_map(tmp_path / "keypoint_map")
    with pytest.raises(MapFormatError, match="no keyframe images"):
        loaded.load_map(tmp_path / "keypoint_map")


def test_trained_eloftr_matches_a_held_out_homography():
    """Our synthetic-trained weights on a homography of a photo excluded from training (astronaut)."""
    pipeline = _pipeline(MatcherConfig(name="eloftr"), FeatureConfig(detector="orb", descriptor="native",
                                                                     resize_max=480))
    pair = synthetic_homography_pair("astronaut", 0)
    result = pipeline.match_images(pair.image0, [pair.image1])[0]
    errors = homography_errors(pair.H_1_0, result.keypoints0, result.keypoints1)
    assert len(result) >= 200
    assert np.mean(errors < 3.0) >= 0.8, f"precision@3px {np.mean(errors < 3.0):.2f} on {len(result)} matches"


def test_trained_eloftr_relative_pose_on_middlebury():
    """Real stereo pair with ground truth (Middlebury motorcycle): semi-dense matches through the same pose code."""
    from feature_matching_ros.eval.metrics import relative_pose_error_deg

    pair = load_motorcycle()
    pipeline = _pipeline(MatcherConfig(name="eloftr"), FeatureConfig(detector="orb", descriptor="native",
                                                                     resize_max=640))
    result = pipeline.match_pair(pair.image0, pair.image1, pair.K0, pair.K1)
    assert result.success, result.reason
    errors = reprojection_errors(pair, *result.matched_points())
    known = np.isfinite(errors)
    rotation_error, translation_error = relative_pose_error_deg(result.pose.T_1_0, pair.T_1_0)
    assert np.mean(errors[known] < 3.0) >= 0.6
    assert rotation_error < 2.0 and translation_error < 10.0, (rotation_error, translation_error)
