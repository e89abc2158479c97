"""ORB single-scale in torch against OpenCV's ORB on real photos: every stage (FAST, Harris, candidates,
NMS + grid, orientation), the shared selection functions against brute-force definitions, and matching
accuracy with ALIKED descriptors + LightGlue on graf1/graf3 against the OpenCV backend."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from conftest import homography_errors
from feature_matching_ros.config import ConfigError, FeatureConfig, MatcherConfig, PipelineConfig
from feature_matching_ros.devdata import keypoint_agreement
from feature_matching_ros.features import FeatureExtractor
from feature_matching_ros.features.classic import OrbSingleScale, single_scale_orb
from feature_matching_ros.features.orb_torch import (OrbTorch, fast_scores, harris_responses,
                                                     intensity_centroid_angles, strict_local_maxima)
from feature_matching_ros.features.selection import GRID_CELLS, spread_over_grid, suppress_non_maxima
from feature_matching_ros.image import prepare_image
from feature_matching_ros.pipeline import MatchingPipeline


def _gray(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.cvtColor(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)


@pytest.fixture(scope="module")
def photos(graf) -> dict[str, np.ndarray]:
    """Small gray photos with different textures: graffiti (two views), a face, a cluttered kitchen."""
    from skimage import data

    return {"graf1": _gray(graf.image0, (400, 320)), "graf3": _gray(graf.image1, (400, 320)),
            "astronaut": _gray(data.astronaut(), (320, 320)), "coffee": _gray(data.coffee(), (360, 240))}


@pytest.mark.parametrize("threshold", [10, 20])
def test_fast_corners_and_scores_equal_opencv(photos, threshold):
    for name, gray in photos.items():
        scores = fast_scores(torch.from_numpy(gray), threshold)
        corners = strict_local_maxima(scores)
        reference = cv2.FastFeatureDetector_create(threshold, True).detect(gray)
        reference_xy = np.array([kp.pt for kp in reference]).astype(int)
        rows, cols = torch.nonzero(corners, as_tuple=True)
        assert set(zip(cols.tolist(), rows.tolist())) == set(map(tuple, reference_xy.tolist())), name
        reference_scores = np.array([kp.response for kp in reference])
        np.testing.assert_array_equal(scores.numpy()[reference_xy[:, 1], reference_xy[:, 0]], reference_scores)


def test_harris_and_orientation_equal_opencv_orb(photos):
    for name, gray in photos.items():
        reference = single_scale_orb(600).detect(gray, None)
        xy = np.array([kp.pt for kp in reference]).astype(int)
        harris = harris_responses(torch.from_numpy(gray)).numpy()[xy[:, 1], xy[:, 0]]
        np.testing.assert_array_equal(harris, np.array([kp.response for kp in reference], np.float32), err_msg=name)
        angles = intensity_centroid_angles(torch.from_numpy(gray), torch.from_numpy(xy)).numpy()
        difference = np.angle(np.exp(1j * (angles - np.deg2rad([kp.angle for kp in reference]))))
        assert np.degrees(np.abs(difference)).max() < 0.05, name  # OpenCV's fastAtan2 is accurate to ~0.01 deg


@pytest.mark.parametrize("nfeatures", [300, 900])
def test_candidates_before_nms_repeat_opencv(photos, nfeatures):
    detector = OrbTorch()
    for name, gray in photos.items():
        reference = cv2.KeyPoint_convert(single_scale_orb(nfeatures).detect(gray, None))
        xy, _, valid = detector.candidate_sets(torch.from_numpy(gray), (nfeatures,))
        candidates = xy[0][valid[0]].numpy()
        repeatability, _ = keypoint_agreement(reference, candidates, tolerance_px=0.0)
        assert repeatability >= 0.99 and abs(len(candidates) - len(reference)) <= 0.01 * len(reference), name


@pytest.mark.parametrize("max_keypoints,radius", [(256, 4), (128, 8), (512, 3)])
def test_keypoints_after_nms_and_grid_agree_with_opencv_backend(photos, max_keypoints, radius):
    for name, gray in photos.items():
        image = prepare_image(gray, 0, torch.device("cpu"))
        reference = OrbSingleScale(nms_radius=radius).detect(image, max_keypoints, with_descriptors=False)
        ours = OrbTorch(nms_radius=radius).detect(image, max_keypoints, with_descriptors=False)
        repeatability, angle_deg = keypoint_agreement(reference.xy.numpy(), ours.xy.numpy(),
                                                      reference.orientations.numpy(), ours.orientations.numpy())
        assert repeatability >= 0.98 and abs(len(ours) - len(reference)) <= 0.02 * len(reference), name
        assert angle_deg < 0.1, name
        assert (ours.scales == 31).all() and torch.all(ours.scores[:-1] >= ours.scores[1:])


def test_native_descriptors_at_torch_keypoints_equal_opencv(photos):
    image = prepare_image(photos["graf1"], 0, torch.device("cpu"))
    reference = OrbSingleScale().detect(image, 256, with_descriptors=True)
    ours = OrbTorch().detect(image, 256, with_descriptors=True)
    assert torch.equal(ours.xy, reference.xy)
    assert ours.descriptors.dtype == torch.uint8 and ours.descriptors.shape == (len(ours), 32)
    equal_bits = 1 - np.unpackbits((ours.descriptors ^ reference.descriptors).numpy()).mean()
    assert equal_bits > 0.999  # orientations differ by < 0.01 deg: a sample point may round the other way


def _brute_force_nms(xy: np.ndarray, valid: np.ndarray, radius: int) -> np.ndarray:
    """Definition: valid, and no earlier (stronger) valid candidate in the open disk of ``radius`` around it."""
    pixels = np.floor(xy + 0.5)
    keep = np.zeros(len(xy), bool)
    for i in np.flatnonzero(valid):
        earlier = np.flatnonzero(valid[:i])
        keep[i] = not np.any(np.sum((pixels[earlier] - pixels[i]) ** 2, axis=1) < radius ** 2)
    return keep


def test_suppress_non_maxima_matches_its_definition():
    rng = np.random.default_rng(3)
    size = (64, 48)
    for radius in (1, 2, 4, 5, 7):  # 5: (3, 4) lies exactly on the circle, outside the open disk
        xy = rng.uniform(0, 1, (2, 300, 2)) * (np.array(size) - 1)
        xy[:, 250:] = xy[:, :50]  # repeated pixels: only the first can survive
        valid = rng.uniform(size=(2, 300)) > 0.1
        keep = suppress_non_maxima(torch.as_tensor(xy, dtype=torch.float32), torch.as_tensor(valid), radius, size)
        for row in range(2):
            expected = _brute_force_nms(xy[row].astype(np.float32), valid[row], radius)
            np.testing.assert_array_equal(keep[row].numpy(), expected, err_msg=f"radius {radius}")
    keep = suppress_non_maxima(torch.tensor([[[10.0, 10], [12, 10], [30, 30]]]), torch.ones(1, 3, dtype=torch.bool),
                               4, (64, 64))
    assert keep.tolist() == [[True, False, True]]


def test_spread_over_grid_is_round_robin_over_cells():
    rng = np.random.default_rng(5)
    size = (160, 120)
    xy = rng.uniform(0, 1, (400, 2)) * size
    xy[:200] = rng.uniform(0, 0.2, (200, 2)) * size  # the stronger half crowds one corner
    xy = xy.astype(np.float32)
    valid = rng.uniform(size=400) > 0.2
    cols, rows = GRID_CELLS
    cells = (xy[:, 1] * rows / size[1]).astype(int) * cols + (xy[:, 0] * cols / size[0]).astype(int)
    rounds: dict[int, list[int]] = {}
    for index in np.flatnonzero(valid):
        rounds.setdefault(int(cells[index]), []).append(int(index))
    expected = sorted((rank, index) for members in rounds.values() for rank, index in enumerate(members))
    for count in (50, 150, 1000):
        chosen, picked = spread_over_grid(torch.from_numpy(xy)[None], torch.as_tensor(valid)[None],
                                          size, count)
        selection = chosen[0][picked[0]].tolist()
        assert selection == sorted(index for _, index in expected[:count])  # strongest first
        assert len(selection) == min(count, valid.sum())


@pytest.mark.parametrize("backend", ["opencv", "torch"])
def test_images_without_corners_give_no_keypoints(backend):
    flat = np.full((120, 160), 90, np.uint8)
    narrow = (np.random.default_rng(0).uniform(size=(60, 300)) * 255).astype(np.uint8)  # no room for the border
    extractor = FeatureExtractor(FeatureConfig(detector="orb", descriptor="native", max_keypoints=64,
                                               orb_backend=backend))
    for image in (flat, narrow):
        features = extractor(image)
        assert len(features) == 0 and features.descriptors.shape == (0, 32)


def test_orb_backend_is_validated():
    with pytest.raises(ConfigError, match="orb_backend"):
        FeatureConfig(orb_backend="gpu")
    assert isinstance(FeatureExtractor(FeatureConfig(descriptor="native"), "cpu").detector, OrbSingleScale)
    assert isinstance(FeatureExtractor(FeatureConfig(descriptor="native", orb_backend="torch"), "cpu").detector,
                      OrbTorch)


def _graf_precision(graf, backend: str) -> tuple[float, int]:
    pipeline = MatchingPipeline(PipelineConfig(
        features=FeatureConfig(detector="orb", descriptor="aliked", max_keypoints=512, resize_max=640,
                               orb_backend=backend), matcher=MatcherConfig(name="lightglue"), device="cpu"))
    features0, features1 = pipeline.extract(graf.image0), pipeline.extract(graf.image1)
    matches = pipeline.match(features0, [features1])[0].matches
    errors = homography_errors(graf.H_1_0, features0.keypoints_numpy()[matches[:, 0]],
                               features1.keypoints_numpy()[matches[:, 1]])
    return float((errors < 5.0).mean()), int((errors < 5.0).sum())


def test_graf_matching_with_torch_orb_as_accurate_as_opencv(graf):
    precision_torch, correct_torch = _graf_precision(graf, "torch")
    precision_opencv, correct_opencv = _graf_precision(graf, "opencv")
    assert precision_torch >= 0.85 and correct_torch >= 100
    assert precision_torch >= precision_opencv - 0.02
    assert correct_torch >= 0.95 * correct_opencv


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keypoints_equal_cpu(photos):
    """Eager on the first calls, then (a repeated image size) replayed from a CUDA graph: the same keypoints as
    on the CPU every time, and keypoints handed out earlier are not overwritten by later replays."""
    from feature_matching_ros.matchers.lightglue import REPEATED_SHAPE_CALLS

    cuda_orb = OrbTorch()
    for name, gray in photos.items():
        cpu = OrbTorch().detect(prepare_image(gray, 0, torch.device("cpu")), 256, with_descriptors=False)
        results = [cuda_orb.detect(prepare_image(gray, 0, torch.device("cuda")), 256, with_descriptors=False)
                   for _ in range(REPEATED_SHAPE_CALLS + 1)]
        for cuda in results:
            assert torch.equal(cuda.xy.cpu(), cpu.xy) and torch.equal(cuda.scores.cpu(), cpu.scores), name
            assert torch.allclose(cuda.orientations.cpu(), cpu.orientations, atol=1e-5), name
    assert any(cache.graphs for cache in cuda_orb._graphs.values()), "no repeated size was captured"
