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
from feature_matching_ros.image import PreparedImage

GRID_CELLS = (8, 6)  # columns x rows of the spreading grid for ORB single-scale


def non_maximum_suppression(xy: np.ndarray, scores: np.ndarray, radius: int, size: tuple[int, int]) -> np.ndarray:
    """Indices of keypoints that are the strongest within ``radius`` pixels, sorted by descending score.

    xy: (N, 2) pixel coordinates; scores: (N,); size: (W, H). A keypoint survives when its score is the
    maximum of a disk of ``radius`` around it on a score image (a max-filter, as SuperPoint-style NMS):
    survivors at integer pixels (ORB's single-scale FAST corners) are therefore at least ``radius`` apart.
    One dilation replaces a per-point loop (~1 ms vs ~30 ms for 4096 candidates); ties are broken by the
    stable sort, so survivors are strictly ranked.
    """
    order = np.argsort(-scores, kind="stable")
    if radius <= 0 or len(order) == 0:
        return order
    width, height = size
    cols = np.clip(np.round(xy[order, 0]).astype(np.int64), 0, width - 1)
    rows = np.clip(np.round(xy[order, 1]).astype(np.int64), 0, height - 1)
    # Rank instead of raw score: unique, positive (empty pixels are 0) and exact in float32, where Harris
    # responses of neighbouring corners can differ by less than float32 resolution.
    shifted = np.arange(len(order), 0, -1, dtype=np.float32)
    score_image = np.zeros((height, width), dtype=np.float32)
    first_at_pixel = np.unique(rows * width + cols, return_index=True)[1]
    score_image[rows[first_at_pixel], cols[first_at_pixel]] = shifted[first_at_pixel]
    offsets = np.arange(-radius, radius + 1)
    kernel = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) < radius**2).astype(np.uint8)  # disk, d < radius
    local_max = cv2.dilate(score_image, kernel)
    is_first = np.zeros(len(order), dtype=bool)
    is_first[first_at_pixel] = True
    keep = is_first & (shifted >= local_max[rows, cols])
    return order[keep]


def spread_over_grid(xy: np.ndarray, scores: np.ndarray, size: tuple[int, int], count: int) -> np.ndarray:
    """Pick ``count`` indices spread over a grid: every cell's best first, then every cell's second, ...

    This keeps strong keypoints while preventing one textured region from taking the whole budget.
    """
    if len(xy) <= count:
        return np.argsort(-scores, kind="stable")
    cols, rows = GRID_CELLS
    cell_index = (np.clip((xy[:, 1] * rows / size[1]).astype(int), 0, rows - 1) * cols
                  + np.clip((xy[:, 0] * cols / size[0]).astype(int), 0, cols - 1))
    order = np.lexsort((-scores, cell_index))  # by cell, strongest first within a cell
    sorted_cells = cell_index[order]
    first_of_cell = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank_in_cell = np.arange(len(order)) - first_of_cell
    selection = order[np.lexsort((-scores[order], rank_in_cell))][:count]
    return selection[np.argsort(-scores[selection], kind="stable")]


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
    """ORB keypoints at one scale (nlevels=1), NMS with ``nms_radius``, spread over the image."""

    name = "orb"

    def __init__(self, nms_radius: int = 4, candidate_factor: int = 3, fast_threshold: int = 10) -> None:
        self.nms_radius = nms_radius
        self.candidate_factor = candidate_factor
        self.fast_threshold = fast_threshold

    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        # NMS removes an image- and radius-dependent share of the candidates: start with a few times the
        # budget and ask for more only when the survivors fall short (large radius, very dense corners).
        for factor in (self.candidate_factor, 4 * self.candidate_factor):
            orb = cv2.ORB_create(nfeatures=max_keypoints * factor, nlevels=1, edgeThreshold=31, patchSize=31,
                                 fastThreshold=self.fast_threshold, scoreType=cv2.ORB_HARRIS_SCORE)
            candidates = orb.detect(image.gray, None)
            if not candidates:
                return _keypoints_from_cv([], np.zeros((0, 32), np.uint8) if with_descriptors else None, image.device)
            xy = cv2.KeyPoint_convert(candidates).astype(np.float32)
            scores = np.array([kp.response for kp in candidates], dtype=np.float32)
            kept = non_maximum_suppression(xy, scores, self.nms_radius, image.size)
            if len(kept) >= max_keypoints or len(candidates) < max_keypoints * factor:
                break  # enough survivors, or the detector has no more corners to give
        kept = kept[spread_over_grid(xy[kept], scores[kept], image.size, max_keypoints)]
        selected = [candidates[i] for i in kept]
        descriptors = None
        if with_descriptors:
            selected, descriptors = _compute_keeping_order(orb, image.gray, selected)
        return _keypoints_from_cv(selected, descriptors, image.device)


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
