"""The matching pipeline: extract -> match (batched) -> relative pose, with per-stage timing.

This is the one object the CLI, the ROS nodes, the loop-closure engine and the benchmarks build
from a :class:`PipelineConfig`; models load once per pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from feature_matching_ros.config import ConfigError, PipelineConfig
from feature_matching_ros.features import FeatureExtractor, Features
from feature_matching_ros.image import gray_uint8
from feature_matching_ros.geometry.pose import RelativePose, check_intrinsics, estimate_relative_pose
from feature_matching_ros.matchers import PairMatches, build_matcher
from feature_matching_ros.matchers.base import Correspondences, View
from feature_matching_ros.matchers.dense import DenseMatches

LOG = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' requested but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(device)


GPU_HOST_THREADS = 4


def limit_host_threads_for_gpu(device: torch.device) -> None:
    """With the networks on the GPU, cap the CPU thread pools (OpenBLAS, OpenMP of torch and faiss).

    Measured on a 16-core H200 host: after numpy/faiss work (global descriptor, retrieval) their idle
    pools spin-wait, and the batched matching stage that follows alternated between 10 ms and 130 ms;
    with every pool at 4 threads it stays at ~10 ms. OpenCV's pool (ORB, RANSAC) is separate and untouched.
    """
    if device.type != "cuda":
        return
    try:
        import faiss  # noqa: F401  (load the retrieval database's OpenMP runtime now, so the limit covers it)
    except ImportError:  # matching alone needs no faiss (minimal installs); retrieval imports it itself
        pass
    from threadpoolctl import threadpool_limits

    LOG.info("CUDA pipeline: limiting CPU thread pools to %d threads", GPU_HOST_THREADS)
    threadpool_limits(limits=GPU_HOST_THREADS)
    torch.set_num_threads(min(torch.get_num_threads(), GPU_HOST_THREADS))


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is fp16 on CUDA and fp32 on CPU (CPU half precision is slow or unsupported in places)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


@dataclass
class PairResult:
    """Everything ``fmr match`` reports for one image pair (pixels of the original images)."""

    keypoints0: np.ndarray  # (N0, 2)
    keypoints1: np.ndarray  # (N1, 2)
    matches: np.ndarray  # (M, 2) indices
    scores: np.ndarray  # (M,)
    pose: RelativePose
    timing_ms: dict[str, float] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.pose.success

    @property
    def reason(self) -> str:
        return self.pose.reason

    def matched_points(self) -> tuple[np.ndarray, np.ndarray]:
        return self.keypoints0[self.matches[:, 0]], self.keypoints1[self.matches[:, 1]]

    def to_json_dict(self) -> dict[str, Any]:
        inliers = self.pose.inliers if len(self.pose.inliers) == len(self.matches) else np.zeros(len(self.matches), bool)
        return {
            "success": bool(self.pose.success),
            "reason": self.pose.reason,
            "method": self.pose.method,
            "metric_scale": bool(self.pose.metric),
            "num_keypoints0": int(len(self.keypoints0)),
            "num_keypoints1": int(len(self.keypoints1)),
            "num_matches": int(len(self.matches)),
            "num_inliers": int(inliers.sum()),
            "keypoints0": np.round(self.keypoints0, 3).tolist(),
            "keypoints1": np.round(self.keypoints1, 3).tolist(),
            "matches": self.matches.tolist(),
            "scores": np.round(self.scores.astype(float), 4).tolist(),
            "inliers": inliers.astype(bool).tolist(),
            "R": self.pose.R.tolist(),
            "t": self.pose.t.tolist(),
            "information": self.pose.information.tolist(),
            "timing_ms": {k: round(v, 3) for k, v in self.timing_ms.items()},
        }


class MatchingPipeline:
    """Extract, match, pose. ``correspond`` is the one matching call for every matcher: views in (features for
    sparse matchers, gray pixels for detector-free ones, as ``needs_images`` says), :class:`Correspondences` out."""

    def __init__(self, config: PipelineConfig | None = None) -> None:
        self.config = config or PipelineConfig()
        self.device = resolve_device(self.config.device)
        self.precision = resolve_precision(self.config.precision, self.device)
        limit_host_threads_for_gpu(self.device)
        # Detector-free matchers (eloftr, loftr) match images; the extractor then only serves retrieval.
        self.extractor = FeatureExtractor(self.config.features, self.device, self.precision)
        self.needs_images = self.config.detector_free
        if self.needs_images:
            from feature_matching_ros.matchers.dense import build_dense_matcher

            self.dense_matcher = build_dense_matcher(self.config.matcher, self.config.features.resize_max,
                                                     self.device, self.precision)
        else:
            self.matcher = build_matcher(self.config.matcher, self.extractor.descriptor_type, self.device,
                                         self.precision)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def extract(self, image: np.ndarray) -> Features:
        return self.extractor(image)

    def match(self, query: Features, candidates: Sequence[Features]) -> list[PairMatches]:
        """Sparse matchers: keypoint indices of one query against k candidates."""
        if self.needs_images:
            raise TypeError(f"matcher={self.config.matcher.name} is detector-free: use match_images")
        return self.matcher.match(query, candidates)

    def match_images(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[DenseMatches]:
        """Detector-free matching of one image against k images (pixels of the original images)."""
        if not self.needs_images:
            raise TypeError(f"matcher={self.config.matcher.name} matches features: use extract + match")
        return self.dense_matcher.match_images(query, candidates)

    def correspond(self, query: View, candidates: Sequence[View]) -> list[Correspondences]:
        """Match one query view against k candidate views (one batched call); one result per candidate."""
        if self.needs_images:
            missing = [i for i, view in enumerate([query, *candidates]) if view.image is None]
            if missing:
                raise ValueError(f"matcher={self.config.matcher.name} matches pixels: views {missing} have no image")
            return [Correspondences(dense.keypoints0, dense.keypoints1, dense.scores)
                    for dense in self.match_images(query.image, [view.image for view in candidates])]
        if query.features is None or any(view.features is None for view in candidates):
            raise ValueError(f"matcher={self.config.matcher.name} matches features: every view needs features")
        keypoints0 = query.features.keypoints_numpy()
        return [Correspondences.from_indices(keypoints0, view.features.keypoints_numpy(), matches)
                for view, matches in zip(candidates, self.match(query.features, [v.features for v in candidates]))]

    def view(self, image: np.ndarray) -> View:
        """What ``correspond`` needs of an image: its gray pixels or its extracted features."""
        if self.needs_images:
            return View(image=gray_uint8(image))
        return View(features=self.extract(image))

    def match_pair(self, image0: np.ndarray, image1: np.ndarray, K0: np.ndarray, K1: np.ndarray,
                   depth0: np.ndarray | None = None, depth1: np.ndarray | None = None) -> PairResult:
        """Match two images and estimate T_1_0. Bad images raise :class:`ImageError`; bad K raise ValueError."""
        K0, K1 = check_intrinsics(K0, "K0"), check_intrinsics(K1, "K1")
        for name, depth, image in (("depth0", depth0, image0), ("depth1", depth1, image1)):
            if depth is not None and np.asarray(depth).shape[:2] != np.asarray(image).shape[:2]:
                raise ValueError(f"{name} of shape {np.asarray(depth).shape[:2]} does not match its image "
                                 f"{np.asarray(image).shape[:2]}")
        timing: dict[str, float] = {}
        empty_points = np.zeros((0, 2), np.float32)
        try:
            views = []
            for index, image in enumerate((image0, image1)):
                views.append(self.view(image))
                if views[-1].features is not None:
                    timing.update({f"{k}{index}": v for k, v in self.extractor.last_timing_ms.items()})
                    if len(views[-1].features) == 0:
                        keypoints = [v.features.keypoints_numpy() for v in views] + [empty_points]
                        return PairResult(keypoints[0], keypoints[1], np.zeros((0, 2), np.int64),
                                          np.zeros(0, np.float32),
                                          RelativePose(False, f"no keypoints in image {index} (textureless or "
                                                       "blank?)"), timing)
            start = time.perf_counter()
            correspondences = self.correspond(views[0], [views[1]])[0]
            self._sync()
            timing["match"] = (time.perf_counter() - start) * 1e3
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            LOG.error("GPU out of memory while matching (%s); lower max_keypoints or resize_max, or use device=cpu",
                      self.config.matcher.name)
            return PairResult(empty_points, empty_points, np.zeros((0, 2), np.int64), np.zeros(0, np.float32),
                              RelativePose(False, "GPU out of memory"), timing)
        start = time.perf_counter()
        pose = estimate_relative_pose(correspondences.points0, correspondences.points1, K0, K1, self.config.pose,
                                      depth0=depth0, depth1=depth1, scores=correspondences.scores)
        timing["pose"] = (time.perf_counter() - start) * 1e3
        if correspondences.index0 is None:  # detector-free: the matched pixels are the keypoints
            keypoints0, keypoints1 = correspondences.points0, correspondences.points1
            matches = np.repeat(np.arange(len(correspondences), dtype=np.int64)[:, None], 2, axis=1)
        else:
            keypoints0, keypoints1 = views[0].features.keypoints_numpy(), views[1].features.keypoints_numpy()
            matches = np.stack([correspondences.index0, correspondences.index1], 1)
        return PairResult(keypoints0, keypoints1, matches, correspondences.scores, pose, timing)
