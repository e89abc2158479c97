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
    """Indices of keypoints that are the strongest within ``radius`` pixels (greedy, strongest first).

    xy: (N, 2) pixel coordinates; scores: (N,); size: (W, H). Returns indices sorted by descending score.
    """
    order = np.argsort(-scores, kind="stable")
    if radius <= 0 or len(order) == 0:
        return order
    # Occupancy grid with cells smaller than the radius: only neighbouring cells need distance checks.
    cell = max(1.0, radius / np.sqrt(2.0))
    grid_w, grid_h = int(np.ceil(size[0] / cell)) + 1, int(np.ceil(size[1] / cell)) + 1
    owner = -np.ones((grid_h, grid_w), dtype=np.int64)
    reach = int(np.ceil(radius / cell))
    cells = np.clip((xy / cell).astype(np.int64), 0, [grid_w - 1, grid_h - 1])
    kept = []
    radius_sq = float(radius) ** 2
    for index in order:
        cx, cy = cells[index]
        window = owner[max(0, cy - reach): cy + reach + 1, max(0, cx - reach): cx + reach + 1]
        neighbours = window[window >= 0]
        if neighbours.size and (((xy[neighbours] - xy[index]) ** 2).sum(1) < radius_sq).any():
            continue
        owner[cy, cx] = index
        kept.append(index)
    return np.asarray(kept, dtype=np.int64)


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
    xy = np.array([kp.pt for kp in cv_keypoints], dtype=np.float32).reshape(-1, 2)
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

    def __init__(self, nms_radius: int = 4, candidate_factor: int = 4, fast_threshold: int = 10) -> None:
        self.nms_radius = nms_radius
        self.candidate_factor = candidate_factor
        self.fast_threshold = fast_threshold

    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        orb = cv2.ORB_create(nfeatures=max_keypoints * self.candidate_factor, nlevels=1, edgeThreshold=31,
                             patchSize=31, fastThreshold=self.fast_threshold, scoreType=cv2.ORB_HARRIS_SCORE)
        candidates = orb.detect(image.gray, None)
        if not candidates:
            return _keypoints_from_cv([], None, image.device)
        xy = np.array([kp.pt for kp in candidates], dtype=np.float32)
        scores = np.array([kp.response for kp in candidates], dtype=np.float32)
        kept = non_maximum_suppression(xy, scores, self.nms_radius, image.size)
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
        descriptors = None
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
