"""Bad input gives a clear error or an empty, explained result; never a crash or a silent wrong answer."""

from __future__ import annotations

import numpy as np
import pytest

from feature_matching_ros.config import ConfigError, FeatureConfig, MatcherConfig, PipelineConfig, PoseConfig
from feature_matching_ros.geometry.pose import estimate_relative_pose
from feature_matching_ros.image import ImageError, to_rgb_uint8
from feature_matching_ros.pipeline import MatchingPipeline

K = np.array([[500.0, 0, 160], [0, 500.0, 120], [0, 0, 1]])


@pytest.fixture(scope="module")
def pipeline() -> MatchingPipeline:
    return MatchingPipeline(PipelineConfig(
        features=FeatureConfig(detector="orb", descriptor="aliked", max_keypoints=256, resize_max=320),
        device="cpu"))


@pytest.fixture(scope="module")
def textured(graf) -> np.ndarray:
    return graf.image0[:240, :320]


@pytest.mark.parametrize("image,message", [
    (np.zeros((0, 0), np.uint8), "empty"),
    (np.zeros((1, 1), np.uint8), "too small"),
    (np.zeros((240, 320, 2), np.uint8), "unsupported image shape"),
    (np.zeros((240, 320), np.int32), "unsupported image dtype"),
    (np.full((240, 320), np.nan, np.float32), "NaN"),
    ("not an image", "numpy array"),
])
def test_invalid_images_raise_clear_errors(pipeline, textured, image, message):
    with pytest.raises(ImageError, match=message):
        pipeline.match_pair(image, textured, K, K)


def test_uniform_image_gives_explained_empty_result(pipeline, textured):
    result = pipeline.match_pair(np.full((240, 320), 128, np.uint8), textured, K, K)
    assert not result.success
    assert "no keypoints in image 0" in result.reason
    assert len(result.matches) == 0


def test_sixteen_bit_and_colour_inputs_match_like_eight_bit_gray(pipeline, textured):
    gray = textured.mean(axis=2).astype(np.uint8)
    sixteen = gray.astype(np.uint16) * 257
    assert np.abs(to_rgb_uint8(sixteen).astype(int) - to_rgb_uint8(gray).astype(int)).max() <= 1
    rgba = np.dstack([textured, np.full(gray.shape, 255, np.uint8)])
    for variant in (sixteen, rgba, textured.astype(np.float32) / 255.0, gray[:, :, None]):
        result = pipeline.match_pair(variant, textured, K, K)
        assert len(result.matches) > 50


@pytest.mark.parametrize("bad_K,message", [
    (np.full((3, 3), np.nan), "NaN"),
    (np.eye(2), "3x3"),
    (np.diag([-500.0, 500.0, 1.0]), "non-positive"),
])
def test_invalid_intrinsics_raise(pipeline, textured, bad_K, message):
    with pytest.raises(ValueError, match=message):
        pipeline.match_pair(textured, textured, bad_K, K)


def test_depth_of_wrong_shape_is_rejected(pipeline, textured):
    with pytest.raises(ValueError, match="does not match"):
        pipeline.match_pair(textured, textured, K, K, depth0=np.ones((10, 10), np.float32))


@pytest.mark.parametrize("factory,message", [
    (lambda: FeatureConfig(detector="superpoint"), "detector='superpoint' is not valid; allowed values: orb"),
    (lambda: FeatureConfig(descriptor="hardnet"), "descriptor='hardnet'"),
    (lambda: FeatureConfig(max_keypoints=0), "max_keypoints"),
    (lambda: MatcherConfig(name="superglue"), "matcher='superglue'"),
    (lambda: MatcherConfig(filter_threshold=float("nan")), "filter_threshold"),
    (lambda: PipelineConfig(device="tpu"), "device='tpu'"),
    (lambda: PipelineConfig(features=FeatureConfig(detector="sift", descriptor="native")), "no weights for sift"),
    (lambda: PipelineConfig.from_dict({"features": {"detectr": "orb"}}), "unknown keys in features"),
    (lambda: PoseConfig(min_depth=5.0, max_depth=1.0), "max_depth"),
])
def test_invalid_configuration_names_key_and_allowed_values(factory, message):
    with pytest.raises(ConfigError, match=message):
        factory()


def test_pose_failures_are_reported_not_raised():
    rng = np.random.default_rng(3)
    few = rng.uniform(0, 300, (8, 2))
    result = estimate_relative_pose(few, few + 1, K, K)
    assert not result.success and "too few matches" in result.reason

    points = np.c_[rng.uniform(-2, 2, 150), rng.uniform(-1.5, 1.5, 150), rng.uniform(4, 9, 150)]
    project = lambda X: X[:, :2] / X[:, 2:] * 500 + [160, 120]  # noqa: E731
    rotation = np.array([[0.995, -0.0998, 0], [0.0998, 0.995, 0], [0, 0, 1.0]])
    # Degenerate for the essential matrix: the homography gives the pose (rotation only without parallax).
    pure_rotation = estimate_relative_pose(project(points), project(points @ rotation.T), K, K)
    assert pure_rotation.success and pure_rotation.method == "homography", pure_rotation.reason
    assert np.degrees(np.arccos((np.trace(pure_rotation.R.T @ rotation) - 1) / 2)) < 0.5  # GT is orthonormal to 1e-5
    assert np.allclose(pure_rotation.t, 0) and np.allclose(pure_rotation.information[:3], 0)
    assert np.linalg.eigvalsh(pure_rotation.information[3:, 3:]).min() > 0

    plane = np.c_[points[:, :2], np.full(150, 6.0)]
    moved = plane @ rotation.T + [0.4, 0.1, 0.2]
    planar = estimate_relative_pose(project(plane), project(moved), K, K)
    assert planar.success and planar.method == "homography", planar.reason
    assert np.degrees(np.arccos(np.clip((np.trace(planar.R.T @ rotation) - 1) / 2, -1, 1))) < 0.5
    direction = np.array([0.4, 0.1, 0.2]) / np.linalg.norm([0.4, 0.1, 0.2])
    assert np.degrees(np.arccos(np.clip(planar.t @ direction, -1, 1))) < 2.0
    assert abs(direction @ planar.information[:3, :3] @ direction) < 1e-6 * np.trace(planar.information)

    # With depth the same planar scene is not degenerate: PnP gives the metric pose.
    depth = np.zeros((240, 320), np.float32)
    pixels = np.round(project(plane)).astype(int)
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < 320) & (pixels[:, 1] >= 0) & (pixels[:, 1] < 240)
    depth[pixels[inside, 1], pixels[inside, 0]] = 6.0
    lifted = np.c_[(pixels - [160, 120]) / 500 * 6.0, np.full(len(pixels), 6.0)]
    metric = estimate_relative_pose(pixels[inside], project(lifted @ rotation.T + [0.4, 0.1, 0.2])[inside], K, K,
                                    depth0=depth)
    assert metric.success and metric.metric
    assert np.allclose(metric.t, [0.4, 0.1, 0.2], atol=1e-3)

    with pytest.raises(ValueError, match="NaN"):
        estimate_relative_pose(np.full((20, 2), np.nan), np.zeros((20, 2)), K, K)


@pytest.mark.parametrize("int8", [False, True])
def test_exported_official_weights_load_through_fmr_weights_dir(tmp_path, monkeypatch, int8):
    """`fmr export-weights [--int8]` copies are tied to the pinned source and load in its place; a tampered copy is
    refused by its sha256."""
    from feature_matching_ros.cli import main
    from feature_matching_ros.weights import WeightsError, load_official_state_dict

    original = load_official_state_dict("aliked_n16")
    assert main(["export-weights", str(tmp_path), "--names", "aliked_n16"] + (["--int8"] if int8 else [])) == 0
    monkeypatch.setenv("FMR_WEIGHTS_DIR", str(tmp_path))
    exported = load_official_state_dict("aliked_n16")
    assert set(exported) == set(original)
    for key, value in original.items():
        if value.is_floating_point() and value.numel():
            scale = float(value.abs().max()) or 1.0
            assert float((exported[key] - value).abs().max()) <= (0.005 if int8 else 0.001) * scale, key
    weights_file = next(tmp_path.glob("aliked_n16*.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[:-8] + b"tampered")
    with pytest.raises(WeightsError, match="sha256"):
        load_official_state_dict("aliked_n16")
