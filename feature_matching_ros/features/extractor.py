"""The feature extractor: image -> (detector keypoints, descriptor at those keypoints) -> Features."""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch

from feature_matching_ros.config import FeatureConfig
from feature_matching_ros.features.base import Features
from feature_matching_ros.features.classic import OrbMultiScale, OrbSingleScale, Sift
from feature_matching_ros.features.learned import AlikedNetwork, DiskNetwork, XFeatNetwork
from feature_matching_ros.features.orb_torch import OrbTorch
from feature_matching_ros.image import prepare_image


class NoFeaturesError(RuntimeError):
    """Raised by callers that need features when an image yields none (textureless, black, saturated)."""


@lru_cache(maxsize=8)
def _network(name: str, device: str, precision: str, detector: str = ""):
    """One instance per (network, device, precision): the detector and descriptor roles share weights.

    SANDESC has weights per detector (features/sandesc.py), so ``detector`` is part of its key.
    """
    if name == "sandesc":
        from feature_matching_ros.features.sandesc import SandescNetwork

        return SandescNetwork(torch.device(device), precision, detector)
    networks = {"aliked": AlikedNetwork, "disk": DiskNetwork, "xfeat": XFeatNetwork}
    return networks[name](torch.device(device), precision)


class FeatureExtractor:
    """Detect with ``config.detector``, describe with ``config.descriptor_network``.

    Calling it on an ``(H, W[, C])`` numpy image returns :class:`Features` in original image pixels;
    ``last_timing_ms`` holds the time spent detecting and describing.
    """

    def __init__(self, config: FeatureConfig, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        self.detector = self._build_detector(config.detector)
        network = config.descriptor_network
        self.uses_native = network == self.detector.name or network == "orb" and config.detector.startswith("orb")
        variant = config.detector if network == "sandesc" else ""
        self.descriptor = None if self.uses_native else _network(network, str(self.device), precision, variant)
        self.descriptor_type = network
        self.last_timing_ms: dict[str, float] = {}

    def _build_detector(self, name: str):
        if name == "orb":
            backend = self.config.orb_backend
            if backend == "auto":
                backend = "torch" if self.device.type == "cuda" else "opencv"
            return (OrbTorch if backend == "torch" else OrbSingleScale)(nms_radius=self.config.nms_radius)
        if name == "orb_multiscale":
            return OrbMultiScale()
        if name == "sift":
            return Sift()
        return _network(name, str(self.device), self.precision)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, image: np.ndarray) -> Features:
        """Extract features. ``last_timing_ms``: "detect" is the detector's time, "describe" what the
        descriptor adds after it; with a CPU detector and a CUDA descriptor network the dense map is
        queued first, so the GPU works while the CPU detects and "describe" is only the remainder."""
        prepared = prepare_image(image, self.config.resize_max, self.device)
        start = time.perf_counter()
        overlap = not self.uses_native and self.device.type == "cuda"
        dense = self.descriptor.dense_map(prepared) if overlap else None
        keypoints = self.detector.detect(prepared, self.config.max_keypoints, with_descriptors=self.uses_native)
        detected = time.perf_counter()
        if self.uses_native:
            descriptors = keypoints.descriptors
        else:
            dense = dense if overlap else self.descriptor.dense_map(prepared)
            descriptors = self.descriptor.sample(dense, keypoints.xy, prepared.size)
        self._sync()
        self.last_timing_ms = {"detect": (detected - start) * 1e3, "describe": (time.perf_counter() - detected) * 1e3}
        return Features(
            keypoints=prepared.to_original(keypoints.xy),
            scores=keypoints.scores,
            descriptors=descriptors,
            image_size=prepared.original_size,
            descriptor_type=self.descriptor_type,
            scales=None if keypoints.scales is None else keypoints.scales * prepared.scale[0],
            orientations=keypoints.orientations,
        )
