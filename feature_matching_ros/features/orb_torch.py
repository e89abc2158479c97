"""ORB single-scale keypoints in torch, so ORB + a descriptor network runs entirely on the GPU.

It reproduces OpenCV's ORB at one pyramid level (``nlevels=1``, ``HARRIS_SCORE``, ``edgeThreshold`` and
``patchSize`` 31) step by step, on whole-image tensors instead of per-pixel loops:

1. FAST-9 on the 16-pixel Bresenham circle of radius 3: a pixel is a corner when 9 contiguous circle pixels
   are all brighter than it by more than ``fast_threshold``, or all darker. Its score is OpenCV's: the
   largest threshold at which it would still be a corner (the best 9-arc's smallest difference, minus 1).
2. FAST non-maximum suppression: a corner survives when its score beats all 8 neighbours strictly.
3. Corners closer than 31 px to the image border are dropped (room for the rotated descriptor patch).
4. The best ``2 * nfeatures`` by FAST score are retained, every corner tied with the last one included.
5. The Harris response (Sobel 3x3 gradients summed over a 7x7 block, k = 0.04, OpenCV's scaling) ranks
   them, computed with integer sums and the same float32 operations, so responses equal OpenCV's exactly.
   The best ``nfeatures`` are kept (OpenCV would also keep exact ties with the last one; this keeps
   exactly ``nfeatures``).
6. Then, as the OpenCV backend does: radius NMS, spreading over a grid, and a second candidate set of
   4x the size used when NMS leaves fewer than the budget (:mod:`feature_matching_ros.features.selection`).
7. The orientation is the intensity centroid over the circular 31-px patch (the angle of (m10, m01)).

Everything works on tensors of static shape (masks, histograms and top-k of fixed size): both candidate
sets are computed at once and the choice between them is made on the device. The one host synchronisation
left is reading the number of keypoints at the end, which is inherent in returning a variable-length set.
On CUDA the detector runs on its own stream, so it overlaps a descriptor network queued before it on the
default stream and that final synchronisation waits only for the detector's work.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from feature_matching_ros.features.base import Keypoints
from feature_matching_ros.features.classic import (ORB_CANDIDATE_FACTOR, ORB_EDGE_THRESHOLD, ORB_FAST_THRESHOLD,
                                                   ORB_PATCH_SIZE, compute_orb_descriptors)
from feature_matching_ros.features.selection import spread_over_grid, suppress_non_maxima
from feature_matching_ros.image import PreparedImage

HARRIS_BLOCK = 7  # OpenCV ORB sums gradient products over a 7x7 block
HARRIS_K = 0.04
# The 16 pixels of the radius-3 Bresenham circle as (dx, dy), in order around the circle.
FAST_CIRCLE = ((0, 3), (1, 3), (2, 2), (3, 1), (3, 0), (3, -1), (2, -2), (1, -3),
               (0, -3), (-1, -3), (-2, -2), (-3, -1), (-3, 0), (-3, 1), (-2, 2), (-1, 3))
FAST_ARC = 9


def fast_scores(gray: torch.Tensor, threshold: int) -> torch.Tensor:
    """FAST-9 corner scores of an ``(H, W)`` uint8 image: ``(H, W)`` int16, 0 where there is no corner.

    A corner's score is the largest threshold at which it is still a corner, minus one (OpenCV's
    ``cornerScore``): at least ``threshold``. The 3-pixel border, where the circle leaves the image, is 0.
    """
    image = gray.to(torch.int16)
    height, width = image.shape
    inner = image[3:height - 3, 3:width - 3]
    differences = torch.stack([inner - image[3 + dy:height - 3 + dy, 3 + dx:width - 3 + dx]
                               for dx, dy in FAST_CIRCLE])  # (16, h, w): centre minus circle pixel
    ring = torch.cat([differences, differences[:FAST_ARC - 1]])  # wrap around: arcs start at 0..15

    def arc_extreme(reduce) -> torch.Tensor:
        """reduce (min or max) over every 9-arc, by doubling windows: 2, 4, 8, then 8 + 1."""
        two = reduce(ring[:-1], ring[1:])
        four = reduce(two[:-2], two[2:])
        eight = reduce(four[:-4], four[4:])
        return reduce(eight[:16], ring[FAST_ARC - 1:FAST_ARC - 1 + 16])

    darker_arc = arc_extreme(torch.minimum).amax(0)  # > threshold: 9 contiguous pixels darker than the centre
    brighter_arc = -arc_extreme(torch.maximum).amin(0)  # > threshold: 9 contiguous pixels brighter
    best = torch.maximum(darker_arc, brighter_arc)
    scores = torch.zeros_like(image)
    scores[3:height - 3, 3:width - 3] = torch.where(best > threshold, best - 1, torch.zeros_like(best))
    return scores


def strict_local_maxima(scores: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool: the score is larger than each of its 8 neighbours (outside the image counts as 0)."""
    padded = torch.nn.functional.pad(scores, (1, 1, 1, 1))
    sides = torch.maximum(padded[:, :-2], padded[:, 2:])  # left and right neighbours, (H + 2, W)
    rows3 = torch.maximum(sides, padded[:, 1:-1])  # three horizontal neighbours
    neighbours = torch.maximum(torch.maximum(rows3[:-2], rows3[2:]), sides[1:-1])
    return scores > neighbours


def harris_responses(gray: torch.Tensor) -> torch.Tensor:
    """OpenCV ORB's Harris response at every pixel of an ``(H, W)`` uint8 image: ``(H, W)`` float32.

    Sobel 3x3 gradients, products summed (unweighted) over the 7x7 block centred on the pixel, all in
    integers; then ``(a*b - c^2 - k*(a+b)^2) * scale^4`` with OpenCV's float32 operations in OpenCV's order,
    scale = 1 / (4 * 7 * 255), so the responses equal OpenCV's. Pixels within 4 of the border are 0.
    """
    image = gray.to(torch.int32)
    height, width = image.shape
    above, middle, below = image[:-2], image[1:-1], image[2:]
    gx = (2 * (middle[:, 2:] - middle[:, :-2]) + (above[:, 2:] - above[:, :-2]) + (below[:, 2:] - below[:, :-2]))
    gy = (2 * (below[:, 1:-1] - above[:, 1:-1]) + (below[:, :-2] - above[:, :-2]) + (below[:, 2:] - above[:, 2:]))
    products = torch.stack([gx * gx, gy * gy, gx * gy])  # (3, H - 2, W - 2)

    def box7(values: torch.Tensor, dim: int) -> torch.Tensor:
        """Sums of 7 consecutive entries along ``dim``, built from sums of 2 and 4: 7 = 4 + 2 + 1."""
        length = values.shape[dim] - 6
        two = values.narrow(dim, 0, length + 5) + values.narrow(dim, 1, length + 5)
        four = two.narrow(dim, 0, length) + two.narrow(dim, 2, length)
        return four + two.narrow(dim, 4, length) + values.narrow(dim, 6, length)

    sums = box7(box7(products, 1), 2).float()  # exact: integers converted once, as OpenCV's (float)a
    a, b, c = sums[0], sums[1], sums[2]
    scale = np.float32(1.0) / (np.float32(4 * HARRIS_BLOCK) * np.float32(255.0))
    scale_4 = float(scale * scale * scale * scale)  # float32 products, as OpenCV computes scale_sq_sq
    trace = a + b
    response = ((a * b - c * c) - (HARRIS_K * trace) * trace) * scale_4
    margin = 1 + HARRIS_BLOCK // 2
    full = torch.zeros(height, width, dtype=torch.float32, device=gray.device)
    full[margin:height - margin, margin:width - margin] = response
    return full


@lru_cache(maxsize=4)
def orientation_patch(patch_size: int = ORB_PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(P,) dx and (P,) dy of the circular patch ORB measures the intensity centroid over.

    Row v spans |u| <= u_max(v), with OpenCV's rounding of the circle and its symmetrisation (the rows
    near the diagonal are chosen so the patch is symmetric under swapping x and y).
    """
    half = patch_size // 2
    u_max = [0] * (half + 2)
    v_limit = math.floor(half * math.sqrt(2.0) / 2 + 1)
    v_diagonal = math.ceil(half * math.sqrt(2.0) / 2)
    for v in range(v_limit + 1):
        u_max[v] = round(math.sqrt(half * half - v * v))
    v0 = 0
    for v in range(half, v_diagonal - 1, -1):
        while u_max[v0] == u_max[v0 + 1]:
            v0 += 1
        u_max[v] = v0
        v0 += 1
    dx, dy = [], []
    for v in range(-half, half + 1):
        width = u_max[abs(v)]
        dx.extend(range(-width, width + 1))
        dy.extend([v] * (2 * width + 1))
    return np.array(dx), np.array(dy)


@lru_cache(maxsize=16)
def _orientation_kernel(row_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat offsets (P,) of the orientation patch in an image of rows of ``row_length`` and its (P, 2)
    (dx, dy) weights, cached per device: copying them from the host in the hot path would synchronise."""
    dx, dy = orientation_patch()
    weights = torch.as_tensor(np.stack([dx, dy], axis=1), dtype=torch.float32)
    return torch.as_tensor(dy * row_length + dx).to(device), weights.to(device)


def intensity_centroid_angles(gray: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """ORB orientation in radians, [0, 2 pi), at ``(..., 2)`` integer pixel positions of ``(H, W)`` gray.

    The angle of the patch's first moments (m10, m01) around the keypoint, x right y down. Positions must
    be at least ``ORB_PATCH_SIZE // 2`` from the border (ORB's edge threshold guarantees it).
    """
    offsets, weights = _orientation_kernel(gray.shape[1], gray.device)
    centre = xy[..., 1].long() * gray.shape[1] + xy[..., 0].long()
    patches = gray.reshape(-1)[(centre[..., None] + offsets).clamp(0, gray.numel() - 1)].float()
    moments = patches @ weights  # (..., 2) = (m10, m01), exact: integer sums below 2^24
    return torch.remainder(torch.atan2(moments[..., 1], moments[..., 0]), 2 * math.pi)


def _retain_by_fast_score(scores: torch.Tensor, corners: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """(S, H, W) bool: for each count, the corners whose FAST score reaches the count-th best (ties kept).

    FAST scores are small integers, so the count-th best score comes from a histogram instead of a sort.
    """
    values = torch.where(corners, scores, torch.zeros_like(scores)).reshape(-1).long()
    histogram = torch.zeros(256, dtype=torch.int32, device=scores.device)
    histogram.scatter_add_(0, values, corners.reshape(-1).int())
    at_least = histogram.flip(0).cumsum(0).flip(0)  # corners scoring >= s, for s = 0..255
    # The largest s with at least ``count`` corners scoring >= s; -1 (keep all) when there are fewer.
    floor = torch.stack([(at_least >= count).sum() - 1 for count in counts])
    return corners[None] & (scores[None] >= floor[:, None, None])


class OrbTorch:
    """ORB single-scale keypoints in torch (module docstring); the counterpart of ``classic.OrbSingleScale``.

    Runs on the device of the :class:`PreparedImage`; native ORB descriptors, when asked for, are computed
    by OpenCV at these keypoints (which needs them on the host).
    """

    name = "orb"

    def __init__(self, nms_radius: int = 4, candidate_factor: int = ORB_CANDIDATE_FACTOR,
                 fast_threshold: int = ORB_FAST_THRESHOLD) -> None:
        self.nms_radius = nms_radius
        self.candidate_factor = candidate_factor
        self.fast_threshold = fast_threshold
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # Per keypoint budget, the fixed-shape steps replayed from CUDA graphs (a camera stream repeats one image
        # size; the ~300 small kernels are launch-bound on a large GPU).
        self._graphs: dict[int, Any] = {}

    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        device = image.device
        if device.type != "cuda":
            keypoints = self.keypoints(torch.from_numpy(image.gray), max_keypoints)  # eager
        else:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            stream = self._streams[device]
            with torch.cuda.stream(stream):
                gray = torch.from_numpy(image.gray).to(device)  # uploaded on this stream: no wait for others
                # Replayed from a CUDA graph once the image size repeats; synchronises this stream only.
                keypoints = self._trimmed(*self._graph_for(max_keypoints)(gray))
            current = torch.cuda.current_stream(device)
            for tensor in (keypoints.xy, keypoints.scores, keypoints.scales, keypoints.orientations):
                tensor.record_stream(current)  # memory stays reserved until the default stream used it
        if with_descriptors:
            keypoints = compute_orb_descriptors(image.gray, keypoints, self.fast_threshold)
        return keypoints

    def candidate_sets(self, gray: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """OpenCV ORB's candidates (``ORB_create(nfeatures=size).detect``) for each size, before any NMS.

        gray: (H, W) uint8. Returns xy (S, K, 2) float pixels, responses (S, K) Harris, valid (S, K) bool,
        K = max(sizes) (at most H * W), each set strongest first and padded with invalid entries.
        """
        height, width = gray.shape
        scores = fast_scores(gray, self.fast_threshold)
        corners = strict_local_maxima(scores)
        inside = torch.zeros_like(corners)
        inside[ORB_EDGE_THRESHOLD:height - ORB_EDGE_THRESHOLD, ORB_EDGE_THRESHOLD:width - ORB_EDGE_THRESHOLD] = True
        corners &= inside
        pools = _retain_by_fast_score(scores, corners, tuple(2 * size for size in sizes))
        harris = harris_responses(gray).reshape(-1)
        ranked = torch.where(pools.reshape(len(sizes), -1), harris, torch.full_like(harris, -math.inf))
        responses, pixels = torch.topk(ranked, min(max(sizes), height * width), dim=1)
        # Equal responses in pixel order, so the result does not depend on how topk orders ties.
        pixels, by_pixel = pixels.sort(dim=1)
        responses, by_response = responses.gather(1, by_pixel).sort(dim=1, descending=True, stable=True)
        pixels = pixels.gather(1, by_response)
        valid = torch.isfinite(responses)
        for row, size in enumerate(sizes):
            valid[row, size:] = False
        xy = torch.stack([pixels % width, pixels // width], dim=-1).float()
        return xy, responses, valid

    def _graph_for(self, max_keypoints: int):
        """The CudaGraphCache of :meth:`_fixed_shape_keypoints` for this keypoint budget."""
        if max_keypoints not in self._graphs:
            from feature_matching_ros.matchers.lightglue import REPEATED_SHAPE_CALLS, CudaGraphCache

            self._graphs[max_keypoints] = CudaGraphCache(
                lambda gray: self._fixed_shape_keypoints(gray, max_keypoints), max_graphs=4,
                capture_after=REPEATED_SHAPE_CALLS)
        return self._graphs[max_keypoints]

    def keypoints(self, gray: torch.Tensor, max_keypoints: int) -> Keypoints:
        """Keypoints of an ``(H, W)`` uint8 image on its device (module docstring, steps 1-7), eagerly."""
        return self._trimmed(*self._fixed_shape_keypoints(gray, max_keypoints))

    @staticmethod
    def _trimmed(xy: torch.Tensor, responses: torch.Tensor, angles: torch.Tensor, picked: torch.Tensor) -> Keypoints:
        """The keypoints that exist, as tensors of their own (a graph's outputs are overwritten by its next replay)."""
        count = int(picked.sum())  # the one synchronisation: how many keypoints there are
        xy, responses, angles = xy[:count].clone(), responses[:count].clone(), angles[:count].clone()
        return Keypoints(xy=xy, scores=responses, scales=torch.full_like(responses, float(ORB_PATCH_SIZE)),
                         orientations=angles)

    def _fixed_shape_keypoints(self, gray: torch.Tensor, max_keypoints: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-7 without any host synchronisation: (max_keypoints, 2) xy, responses and angles, best first,
        and the (max_keypoints,) mask of those that exist."""
        height, width = gray.shape
        # Two candidate sets, as the OpenCV backend's first try and its retry with 4x more candidates.
        sizes = (max_keypoints * self.candidate_factor, max_keypoints * self.candidate_factor * 4)
        xy, responses, valid = self.candidate_sets(gray, sizes)
        keep = suppress_non_maxima(xy, valid, self.nms_radius, (width, height))
        # The retry happens when the first set leaves fewer than the budget after NMS although the
        # detector had more corners to give (it filled the set).
        use_first = (keep[0].sum() >= max_keypoints) | (valid[0].sum() < sizes[0])
        pick = lambda rows: torch.where(use_first, rows[0], rows[1])  # noqa: E731
        xy, keep, responses = pick(xy), pick(keep), pick(responses)
        chosen, picked = spread_over_grid(xy[None], keep[None], (width, height), max_keypoints)
        chosen, picked = chosen[0], picked[0]
        xy, responses = xy[chosen], responses[chosen]
        return xy, responses, intensity_centroid_angles(gray, xy), picked
