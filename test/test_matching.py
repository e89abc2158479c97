"""Matching accuracy on real images with ground truth: ORB + ALIKED + LightGlue vs ORB + Hamming NN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import (homography_errors, rotation_error_deg, synthetic_homography_pair, translation_angle_deg)
from feature_matching_ros.config import FeatureConfig, MatcherConfig, PipelineConfig
from feature_matching_ros.pipeline import MatchingPipeline

MAX_KEYPOINTS = 1024


def make_pipeline(detector: str, descriptor: str, matcher: str) -> MatchingPipeline:
    return MatchingPipeline(PipelineConfig(
        features=FeatureConfig(detector=detector, descriptor=descriptor, max_keypoints=MAX_KEYPOINTS, resize_max=640),
        matcher=MatcherConfig(name=matcher), device="cpu"))


@pytest.fixture(scope="module")
def orb_aliked_lightglue() -> MatchingPipeline:
    return make_pipeline("orb", "aliked", "lightglue")


@pytest.fixture(scope="module")
def orb_hamming() -> MatchingPipeline:
    return make_pipeline("orb", "native", "nn")


def homography_precision(pipeline: MatchingPipeline, pair, threshold_px: float) -> tuple[float, int]:
    features0, features1 = pipeline.extract(pair.image0), pipeline.extract(pair.image1)
    matches = pipeline.match(features0, [features1])[0].matches
    errors = homography_errors(pair.H_1_0, features0.keypoints_numpy()[matches[:, 0]],
                               features1.keypoints_numpy()[matches[:, 1]])
    correct = int((errors < threshold_px).sum())
    return correct / max(len(matches), 1), correct


def test_graf_lightglue_beats_hamming(graf, orb_aliked_lightglue, orb_hamming):
    # The dataset homography is accurate to ~1-2 px at 800x640 (estimated from our matches), hence 5 px.
    precision_lg, correct_lg = homography_precision(orb_aliked_lightglue, graf, 5.0)
    precision_nn, correct_nn = homography_precision(orb_hamming, graf, 5.0)
    assert precision_lg >= 0.85 and correct_lg >= 200
    assert precision_lg > precision_nn + 0.2
    assert correct_lg > 2 * correct_nn


@pytest.mark.parametrize("photo,seed", [("astronaut", 0), ("coffee", 1)])
def test_synthetic_homography(photo, seed, orb_aliked_lightglue, orb_hamming):
    pair = synthetic_homography_pair(photo, seed)
    precision_lg, correct_lg = homography_precision(orb_aliked_lightglue, pair, 3.0)
    precision_nn, correct_nn = homography_precision(orb_hamming, pair, 3.0)
    assert precision_lg >= 0.9 and correct_lg >= 100
    assert correct_lg > correct_nn


def test_stereo_pose_monocular(motorcycle, orb_aliked_lightglue, orb_hamming):
    result = orb_aliked_lightglue.match_pair(motorcycle.image0, motorcycle.image1, motorcycle.K0, motorcycle.K1)
    assert result.success, result.reason
    assert result.pose.method == "essential" and not result.pose.metric
    rotation_lg = rotation_error_deg(result.pose.R, motorcycle.R_1_0)
    assert rotation_lg < 0.5
    assert translation_angle_deg(result.pose.t, motorcycle.t_1_0) < 3.0
    assert result.pose.num_inliers >= 200
    # The essential matrix leaves the translation length free: no information along t.
    assert abs(result.pose.t @ result.pose.information[:3, :3] @ result.pose.t) < 1e-6 * np.abs(
        result.pose.information).max()

    baseline = orb_hamming.match_pair(motorcycle.image0, motorcycle.image1, motorcycle.K0, motorcycle.K1)
    assert result.pose.num_inliers > baseline.pose.num_inliers
    assert not baseline.success or rotation_error_deg(baseline.pose.R, motorcycle.R_1_0) > rotation_lg


def test_confidence_ordered_ransac_is_input_order_free_and_as_accurate(motorcycle, orb_aliked_lightglue):
    """The essential-matrix RANSAC samples the most confident matches first (PROSAC): the pose depends on the
    matches and their scores, not on the order the matcher listed them in, and the inliers come back in the
    caller's order; the pose is as good as with uniform sampling."""
    from dataclasses import replace

    from feature_matching_ros.config import PoseConfig
    from feature_matching_ros.geometry.pose import estimate_relative_pose

    result = orb_aliked_lightglue.match_pair(motorcycle.image0, motorcycle.image1, motorcycle.K0, motorcycle.K1)
    points0, points1 = result.matched_points()
    scores = result.scores.astype(np.float64) + np.arange(len(result.scores)) * 1e-9  # no ties
    shuffle = np.random.default_rng(0).permutation(len(scores))
    config = PoseConfig()
    ordered = estimate_relative_pose(points0, points1, motorcycle.K0, motorcycle.K1, config, scores=scores)
    shuffled = estimate_relative_pose(points0[shuffle], points1[shuffle], motorcycle.K0, motorcycle.K1, config,
                                      scores=scores[shuffle])
    uniform = estimate_relative_pose(points0, points1, motorcycle.K0, motorcycle.K1, replace(config, sampling="uniform"),
                                     scores=scores)
    assert ordered.success and shuffled.success and uniform.success
    np.testing.assert_array_equal(shuffled.inliers, ordered.inliers[shuffle])
    np.testing.assert_allclose(shuffled.R, ordered.R, atol=1e-9)
    for pose in (ordered, uniform):
        assert rotation_error_deg(pose.R, motorcycle.R_1_0) < 1.0
        assert translation_angle_deg(pose.t, motorcycle.t_1_0) < 3.0
    assert abs(ordered.num_inliers - uniform.num_inliers) <= 0.05 * uniform.num_inliers


def test_a_camera_that_only_turned_gets_its_rotation_from_the_homography(motorcycle, orb_hamming):
    """No parallax: every essential matrix with that rotation fits, so the pose comes from the homography, also
    with the matcher's scores given (confidence-first sampling must not stop at a homography that explains only
    part of the matches, or the pair falls through to an essential matrix without depth to decide it)."""
    import cv2

    from feature_matching_ros.config import PoseConfig
    from feature_matching_ros.geometry.pose import estimate_relative_pose

    height, width = motorcycle.image0.shape[:2]
    turn = cv2.Rodrigues(np.array([0.0, np.radians(2.0), 0.0]))[0]
    turned = cv2.warpPerspective(motorcycle.image0, motorcycle.K0 @ turn @ np.linalg.inv(motorcycle.K0),
                                 (width, height))
    features0, features1 = orb_hamming.extract(motorcycle.image0), orb_hamming.extract(turned)
    found = orb_hamming.match(features0, [features1])[0]
    points0 = features0.keypoints_numpy()[found.matches[:, 0]]
    points1 = features1.keypoints_numpy()[found.matches[:, 1]]
    pose = estimate_relative_pose(points0, points1, motorcycle.K0, motorcycle.K0, PoseConfig(), scores=found.scores)
    assert pose.success and pose.method == "homography", pose.reason
    assert pose.num_inliers >= 0.8 * len(points0)
    assert rotation_error_deg(pose.R, turn) < 1.0  # ORB keypoints of pyramid levels: about a pixel
    assert np.allclose(pose.information[:3, :3], 0.0)  # no parallax: nothing known of the translation


def test_essential_decomposition_agrees_with_opencv_recover_pose(motorcycle, orb_aliked_lightglue):
    """The closed-form cheirality test picks the decomposition OpenCV's recoverPose picks, with the same points
    in front of both cameras (up to the odd point near infinity, where the two triangulations differ)."""
    import cv2

    from feature_matching_ros.geometry.pose import _normalise, _recover_pose

    result = orb_aliked_lightglue.match_pair(motorcycle.image0, motorcycle.image1, motorcycle.K0, motorcycle.K1)
    points0, points1 = result.matched_points()
    rays0, rays1 = _normalise(points0.astype(np.float64), motorcycle.K0), _normalise(points1.astype(np.float64),
                                                                                     motorcycle.K1)
    E, mask = cv2.findEssentialMat(rays0[:, :2], rays1[:, :2], np.eye(3), method=cv2.USAC_MAGSAC,
                                   threshold=1.0 / motorcycle.K0[0, 0])
    inliers = mask.ravel() > 0
    R, t, in_front = _recover_pose(E, rays0, rays1, inliers)
    _, R_cv, t_cv, front_cv = cv2.recoverPose(E, rays0[inliers, :2], rays1[inliers, :2], np.eye(3))
    np.testing.assert_allclose(R, R_cv, atol=1e-9)
    np.testing.assert_allclose(t.ravel(), t_cv.ravel(), atol=1e-9)
    assert not in_front[~inliers].any()
    assert np.mean(in_front[inliers] == (front_cv.ravel() > 0)) >= 0.99
    assert rotation_error_deg(R, motorcycle.R_1_0) < 1.0


def test_stereo_pose_with_depth_is_metric(motorcycle, orb_aliked_lightglue):
    result = orb_aliked_lightglue.match_pair(motorcycle.image0, motorcycle.image1, motorcycle.K0, motorcycle.K1,
                                             depth0=motorcycle.depth0)
    assert result.success, result.reason
    assert result.pose.method == "pnp" and result.pose.metric
    assert rotation_error_deg(result.pose.R, motorcycle.R_1_0) < 0.3
    assert np.linalg.norm(result.pose.t - motorcycle.t_1_0) < 0.01  # 1 cm on a 19.3 cm baseline
    covariance = np.linalg.inv(result.pose.information)
    assert np.all(np.linalg.eigvalsh(covariance) > 0)
    assert np.sqrt(covariance[0, 0]) < 0.01


def test_batch_matches_single_pairs(graf, orb_aliked_lightglue):
    """One query against several candidates in one padded call (the GPU path) finds the matches of each pair
    alone (kornia's forward, with point pruning); on the CPU, match() takes the pairs one by one."""
    pipeline = orb_aliked_lightglue
    query = pipeline.extract(graf.image0)
    candidate = pipeline.extract(graf.image1)
    smaller = pipeline.extract(graf.image1[:400, :500])  # fewer keypoints: exercises the padding
    with torch.inference_mode():
        batched = pipeline.matcher._match_batch(query, [candidate, smaller, candidate])
    singles = [pipeline.match(query, [features])[0] for features in (candidate, smaller, candidate)]
    for single, result in zip(singles, batched):
        shared = {tuple(m) for m in single.matches} & {tuple(m) for m in result.matches}
        # Early exit is decided for the whole batch and pruning only alone: a few matches may differ.
        assert len(shared) >= 0.9 * max(len(single), len(result))
    assert {tuple(m) for m in batched[0].matches} == {tuple(m) for m in batched[2].matches}
    together = pipeline.match(query, [candidate, smaller, candidate])  # CPU: exactly the single pairs
    for single, result in zip(singles, together):
        np.testing.assert_array_equal(result.matches, single.matches)


def test_shipped_agnostic_lightglue_matches_a_held_out_homography():
    """Our detector-agnostic fine-tune (resource/lightglue, int8-packed, sha256 pinned) loads and matches ORB
    keypoints described by ALIKED on a photo excluded from its training data."""
    pipeline = MatchingPipeline(PipelineConfig(
        features=FeatureConfig(detector="orb", descriptor="aliked", max_keypoints=512, resize_max=480),
        matcher=MatcherConfig(weights="agnostic"), device="cpu"))
    pair = synthetic_homography_pair("coffee", 1)
    features0, features1 = pipeline.extract(pair.image0), pipeline.extract(pair.image1)
    matches = pipeline.match(features0, [features1])[0].matches
    errors = homography_errors(pair.H_1_0, features0.keypoints_numpy()[matches[:, 0]],
                               features1.keypoints_numpy()[matches[:, 1]])
    assert len(matches) >= 200 and np.mean(errors < 3.0) >= 0.85, (len(matches), float(np.mean(errors < 3.0)))


def _first(features, count: int):
    """The ``count`` strongest keypoints of real features (keeps the test's batch cheap on a CPU)."""
    from feature_matching_ros.features.base import Features

    order = torch.argsort(features.scores, descending=True)[:count]
    return Features(features.keypoints[order], features.scores[order], features.descriptors[order],
                    features.image_size, features.descriptor_type)


def test_graph_shapes_give_the_matches_of_exact_shapes(graf, orb_aliked_lightglue):
    """CUDA graphs run LightGlue on bucketed shapes (batch and keypoint padding, masked out) through the same stages
    as eager; on the CPU's arithmetic the padding must not change the matches, and early exit must stop both at
    the same layer. Candidates of different sizes, 9 of them so the batch itself is padded (9 -> 10)."""
    from feature_matching_ros.matchers.lightglue import batch_bucket, keypoint_bucket

    assert [batch_bucket(b) for b in (1, 5, 8, 9, 11, 16, 17, 32, 33)] == [1, 5, 8, 10, 12, 16, 20, 32, 40]
    assert [keypoint_bucket(n) for n in (1, 256, 257, 1024)] == [256, 256, 512, 1024]
    matcher = orb_aliked_lightglue.matcher
    query = _first(orb_aliked_lightglue.extract(graf.image0), 150)
    other = orb_aliked_lightglue.extract(graf.image1)
    candidates = [_first(other, count) for count in (150, 60, 130, 150, 45, 150, 100, 75, 150)]
    exact = matcher._padded_inputs(query, candidates)
    bucketed = matcher._padded_inputs(query, candidates, bucketed=True)
    assert tuple(exact.tensors[3].shape[:2]) == (9, 150) and tuple(bucketed.tensors[3].shape[:2]) == (10, 256)
    assert not exact.masked0 and exact.masked1 and bucketed.masked0 and bucketed.masked1
    assert not bucketed.tensors[2][9].any() and not bucketed.tensors[5][9].any()  # the padded pair is all invalid
    visited, outputs = {"exact": [], "bucketed": []}, {}
    for name, batch in (("exact", exact), ("bucketed", bucketed)):
        def run(stage, compute, log=visited[name]):
            log.append(stage)
            return compute()

        with torch.inference_mode():
            outputs[name] = matcher._staged_forward(run, batch.tensors, True, batch.masked0, batch.masked1)
    assert visited["exact"] == visited["bucketed"]  # early exit stops both at the same layer
    assert visited["exact"][0] == ("inputs",) and visited["exact"][-1] == ("head", visited["exact"][-2][1])
    matches_exact, matches_bucketed = outputs["exact"][0], outputs["bucketed"][0][:9, :150]
    assert (matches_exact > -1).sum() > 150  # real matches, not an all-unmatched agreement
    agree = (matches_exact == matches_bucketed).float().mean().item()
    assert agree >= 0.995, agree
