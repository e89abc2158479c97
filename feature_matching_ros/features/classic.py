"""OpenCV detectors: ORB at a single scale with spatial NMS, classic multi-scale ORB, and SIFT.

Single-scale ORB with NMS exists because attention matchers (LightGlue) degrade badly when keypoints
crowd together, as multi-scale pyramids and missing NMS produce (arXiv 2602.08430: MegaDepth-1500
AUC@5 45.7 single-scale vs 21.2 multi-scale). SIFT uses OpenCV's implementation (Lowe's reference
algorithm, fast on CPU); its descriptors are RootSIFT-normalised so nearest-neighbour matching can
use dot products like the learned descriptors.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from feature_matching_ros.features.base import Keypoints
from feature_matching_ros.features.selection import spread_over_grid, suppress_non_maxima
from feature_matching_ros.image import PreparedImage

ORB_EDGE_THRESHOLD = 31  # no corners nearer the border: room for the rotated 31-px descriptor patch
ORB_PATCH_SIZE = 31
ORB_FAST_THRESHOLD = 10
ORB_CANDIDATE_FACTOR = 3  # ORB candidates per requested keypoint before NMS (x4 when NMS leaves too few)


def single_scale_orb(nfeatures: int, fast_threshold: int = ORB_FAST_THRESHOLD):
    """OpenCV ORB at one pyramid level with Harris ranking, as both ORB single-scale backends define it."""
    return cv2.ORB_create(nfeatures=nfeatures, nlevels=1, edgeThreshold=ORB_EDGE_THRESHOLD, patchSize=ORB_PATCH_SIZE,
                          fastThreshold=fast_threshold, scoreType=cv2.ORB_HARRIS_SCORE)


def _keypoints_from_cv(cv_keypoints, descriptors: np.ndarray | None, device: torch.device) -> Keypoints:
    xy = cv2.KeyPoint_convert(cv_keypoints).astype(np.float32).reshape(-1, 2) if cv_keypoints else np.zeros((0, 2), np.float32)
    as_tensor = lambda a, dtype=torch.float32: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
    return Keypoints(
        xy=as_tensor(xy),
        scores=as_tensor(np.array([kp.response for kp in cv_keypoints], dtype=np.float32)),
        scales=as_tensor(np.array([kp.size for kp in cv_keypoints], dtype=np.float32)),
        orientations=as_tensor(np.deg2rad(np.array([kp.angle for kp in cv_keypoints], dtype=np.float32))),
        descriptors=None if descriptors is None else as_tensor(descriptors, torch.uint8 if descriptors.dtype == np.uint8
                                                               else torch.float32),
    )


class OrbSingleScale:
    """ORB keypoints at one scale (nlevels=1) by OpenCV on the host, NMS with ``nms_radius``, spread over the
    image. :class:`~feature_matching_ros.features.orb_torch.OrbTorch` computes the same keypoints in torch."""

    name = "orb"

    def __init__(self, nms_radius: int = 4, candidate_factor: int = ORB_CANDIDATE_FACTOR,
                 fast_threshold: int = ORB_FAST_THRESHOLD) -> None:
        self.nms_radius = nms_radius
        self.candidate_factor = candidate_factor
        self.fast_threshold = fast_threshold

    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        # NMS removes an image- and radius-dependent share of the candidates: start with a few times the
        # budget and ask for more only when the survivors fall short (large radius, very dense corners).
        for factor in (self.candidate_factor, 4 * self.candidate_factor):
            orb = single_scale_orb(max_keypoints * factor, self.fast_threshold)
            candidates = orb.detect(image.gray, None)
            if not candidates:
                return _keypoints_from_cv([], np.zeros((0, 32), np.uint8) if with_descriptors else None, image.device)
            scores = np.array([kp.response for kp in candidates], dtype=np.float32)
            ranked = np.argsort(-scores, kind="stable")
            xy = torch.from_numpy(cv2.KeyPoint_convert(candidates).astype(np.float32)[ranked])[None]
            kept = suppress_non_maxima(xy, torch.ones(1, len(ranked), dtype=torch.bool), self.nms_radius, image.size)
            if int(kept.sum()) >= max_keypoints or len(candidates) < max_keypoints * factor:
                break  # enough survivors, or the detector has no more corners to give
        chosen, picked = spread_over_grid(xy, kept, image.size, max_keypoints)
        selected = [candidates[i] for i in ranked[chosen[0][picked[0]].numpy()]]
        descriptors = None
        if with_descriptors:
            selected, descriptors = _compute_keeping_order(orb, image.gray, selected)
        return _keypoints_from_cv(selected, descriptors, image.device)


def compute_orb_descriptors(gray: np.ndarray, keypoints: Keypoints, fast_threshold: int = ORB_FAST_THRESHOLD) -> Keypoints:
    """``keypoints`` (ORB single-scale, on any device) with OpenCV's ORB descriptors (N, 32) uint8 computed at
    their positions and orientations on the ``(H, W)`` uint8 ``gray``; keypoints it cannot describe are dropped."""
    xy = keypoints.xy.cpu().numpy()
    angles = np.rad2deg(keypoints.orientations.cpu().numpy())
    responses = keypoints.scores.cpu().numpy()
    cv_keypoints = [cv2.KeyPoint(float(x), float(y), float(ORB_PATCH_SIZE), float(angle), float(response), 0, index)
                    for index, ((x, y), angle, response) in enumerate(zip(xy, angles, responses))]
    orb = single_scale_orb(max(len(cv_keypoints), 1), fast_threshold)
    described, descriptors = _compute_keeping_order(orb, gray, cv_keypoints)
    index = torch.as_tensor([kp.class_id for kp in described], dtype=torch.long, device=keypoints.xy.device)
    result = keypoints.subset(index)
    result.descriptors = torch.as_tensor(descriptors, device=keypoints.xy.device)
    return result


class OrbMultiScale:
    """The classic 8-level ORB (scale factor 1.2), kept for comparison; no NMS across levels."""

    name = "orb_multiscale"

    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        orb = cv2.ORB_create(nfeatures=max_keypoints, nlevels=8, scaleFactor=1.2, fastThreshold=10)
        keypoints = orb.detect(image.gray, None)
        keypoints = sorted(keypoints, key=lambda kp: -kp.response)[:max_keypoints]
        descriptors = np.zeros((0, 32), np.uint8) if with_descriptors else None
        if with_descriptors and keypoints:
            keypoints, descriptors = _compute_keeping_order(orb, image.gray, keypoints)
        return _keypoints_from_cv(keypoints, descriptors, image.device)


def _compute_keeping_order(extractor, gray: np.ndarray, keypoints: list) -> tuple[list, np.ndarray]:
    """Run ``compute`` and drop the keypoints it drops (near borders) while keeping their order."""
    for index, kp in enumerate(keypoints):
        kp.class_id = index
    computed, descriptors = extractor.compute(gray, keypoints)
    if descriptors is None:
        return [], np.zeros((0, extractor.descriptorSize()), dtype=np.uint8)
    order = np.argsort([kp.class_id for kp in computed], kind="stable")
    return [computed[i] for i in order], descriptors[order]


class Sift:
    """OpenCV SIFT; duplicate locations (one per orientation) are merged, RootSIFT descriptors."""

    name = "sift"

    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        sift = cv2.SIFT_create(nfeatures=max_keypoints)
        keypoints = sift.detect(image.gray, None)
        # SIFT repeats a location once per dominant orientation; identical positions confuse attention matchers.
        unique: dict[tuple[int, int], cv2.KeyPoint] = {}
        for kp in sorted(keypoints, key=lambda k: -k.response):
            unique.setdefault((round(kp.pt[0] * 2), round(kp.pt[1] * 2)), kp)
        keypoints = list(unique.values())[:max_keypoints]
        descriptors = None
        if with_descriptors and keypoints:
            keypoints, raw = _compute_keeping_order(sift, image.gray, keypoints)
            raw = raw / np.maximum(np.abs(raw).sum(1, keepdims=True), 1e-8)  # RootSIFT: L1, sqrt -> unit L2
            descriptors = np.sqrt(raw).astype(np.float32)
        elif with_descriptors:
            descriptors = np.zeros((0, 128), dtype=np.float32)
        return _keypoints_from_cv(keypoints, descriptors, image.device)
