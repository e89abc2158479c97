"""Detectors and descriptors: every combination runs, ORB single-scale honours NMS and spreads out,
resized extraction maps keypoints back to the original pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from feature_matching_ros.config import DESCRIPTORS, DETECTORS, FeatureConfig
from feature_matching_ros.features import FeatureExtractor
from feature_matching_ros.features.learned import XFeatNetwork
from feature_matching_ros.image import prepare_image


@pytest.fixture(scope="module")
def small_image(graf) -> np.ndarray:
    return cv2.resize(graf.image0, (320, 256), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("descriptor", DESCRIPTORS)
def test_every_detector_descriptor_combination(detector, descriptor, small_image):
    extractor = FeatureExtractor(FeatureConfig(detector=detector, descriptor=descriptor, max_keypoints=128))
    features = extractor(small_image)
    assert 20 <= len(features) <= 128
    assert features.keypoints.shape == (len(features), 2)
    assert features.descriptors.shape[0] == len(features)
    xy = features.keypoints_numpy()
    assert (xy >= -0.5).all() and (xy[:, 0] <= 320 - 0.5).all() and (xy[:, 1] <= 256 - 0.5).all()
    if features.is_binary:
        assert features.descriptor_type == "orb" and features.descriptors.shape[1] == 32
    else:
        norms = torch.linalg.norm(features.descriptors.float(), dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    if detector in ("orb", "orb_multiscale", "sift"):
        assert features.scales is not None and features.orientations is not None


def test_orb_single_scale_nms_and_spread(graf):
    radius = 8
    extractor = FeatureExtractor(FeatureConfig(detector="orb", descriptor="native", max_keypoints=512,
                                               nms_radius=radius, resize_max=0))
    xy = extractor(graf.image0).keypoints_numpy()
    assert len(xy) == 512
    distances = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(len(xy)) * 1e9
    assert distances.min() >= radius
    # Spread: every cell of a 4 x 4 grid over the textured image receives keypoints.
    cells = (np.floor(xy[:, 0] / 200).astype(int), np.floor(xy[:, 1] / 160).astype(int))
    assert len(set(zip(*cells))) == 16

    multiscale = FeatureExtractor(FeatureConfig(detector="orb_multiscale", descriptor="native", max_keypoints=512,
                                                resize_max=0))(graf.image0).keypoints_numpy()
    crowded = np.linalg.norm(multiscale[:, None] - multiscale[None], axis=2) + np.eye(len(multiscale)) * 1e9
    assert (crowded.min(1) < 2).sum() > 10  # the pyramid stacks keypoints on the same spots


def test_resized_extraction_maps_back_to_original_pixels(graf):
    """Keypoints found on a downscaled copy land on the same scene points as at full resolution."""
    full = FeatureExtractor(FeatureConfig(detector="sift", descriptor="native", max_keypoints=300, resize_max=0))
    half = FeatureExtractor(FeatureConfig(detector="sift", descriptor="native", max_keypoints=300, resize_max=400))
    xy_full = full(graf.image0).keypoints_numpy()
    features_half = half(graf.image0)
    assert features_half.image_size == (800, 640)
    xy_half = features_half.keypoints_numpy()
    nearest = np.linalg.norm(xy_half[:, None] - xy_full[None], axis=2).min(1)
    assert np.median(nearest) < 1.5  # sub-pixel at the coarse scale, not offset by half a pixel or the scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_aliked_dense_map_replayed_from_a_cuda_graph_equals_eager(graf):
    """A repeated image size is replayed from a captured CUDA graph: the descriptors at ORB keypoints are those of
    the eager network, and a new size (eager until it repeats) does not disturb the captured one."""
    from feature_matching_ros.matchers.lightglue import REPEATED_SHAPE_CALLS

    extractor = FeatureExtractor(FeatureConfig(detector="orb", descriptor="aliked", max_keypoints=512), "cuda")
    image = graf.image0
    eager = extractor(image)
    other = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2))
    for _ in range(REPEATED_SHAPE_CALLS + 1):
        replayed = extractor(image)
        extractor(other)
    assert extractor.descriptor._graphs.graphs, "the repeated size was not captured"
    assert torch.equal(replayed.keypoints, eager.keypoints)
    assert torch.allclose(replayed.descriptors, eager.descriptors, atol=1e-3)



def test_xfeat_descriptors_sampled_at_its_own_keypoints_equal_its_native_ones(graf):
    """XFeat as a descriptor of any detector: sampled at XFeat's own keypoints, at a size that is not a multiple of
    32 (XFeat resizes internally), the descriptors are XFeat's native ones, so its LighterGlue sees what it knows."""
    network = XFeatNetwork(torch.device("cpu"))
    prepared = prepare_image(cv2.resize(graf.image0, (600, 450), interpolation=cv2.INTER_AREA), 0, torch.device("cpu"))
    native = network.detect(prepared, 256, with_descriptors=True)
    sampled = network.sample(network.dense_map(prepared), native.xy, prepared.size)
    assert len(native.xy) == 256
    assert (native.descriptors * sampled).sum(dim=1).min() > 0.999
