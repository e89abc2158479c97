"""Data types shared by detectors, descriptors and matchers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from feature_matching_ros.image import PreparedImage


@dataclass
class Keypoints:
    """Detector output in the network frame of a :class:`PreparedImage`.

    xy: (N, 2) float32, pixels, x right y down, (0, 0) = centre of the top-left pixel.
    scores: (N,) float32, detector response (higher is stronger).
    scales: (N,) float32 keypoint diameter in pixels, or None where the detector has none.
    orientations: (N,) float32 radians, or None.
    descriptors: (N, D) the detector's own (native) descriptors, or None when not computed.
    """

    xy: torch.Tensor
    scores: torch.Tensor
    scales: torch.Tensor | None = None
    orientations: torch.Tensor | None = None
    descriptors: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def subset(self, index: torch.Tensor) -> "Keypoints":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Keypoints(pick(self.xy), pick(self.scores), pick(self.scales), pick(self.orientations),
                         pick(self.descriptors))


@dataclass
class Features:
    """Keypoints and descriptors of one image, in ORIGINAL image pixels, tensors on the compute device.

    keypoints: (N, 2) float32 pixels; scores: (N,); descriptors: (N, D) float32 L2-normalised,
    or (N, 32) uint8 for binary (ORB) descriptors; image_size: (W, H) of the original image.
    descriptor_type names what computed the descriptors ("aliked", "disk", "orb", "sift", "xfeat").
    """

    keypoints: torch.Tensor
    scores: torch.Tensor
    descriptors: torch.Tensor
    image_size: tuple[int, int]
    descriptor_type: str
    scales: torch.Tensor | None = None
    orientations: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def is_binary(self) -> bool:
        return self.descriptors.dtype == torch.uint8

    def to(self, device: torch.device | str) -> "Features":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Features(move(self.keypoints), move(self.scores), move(self.descriptors), self.image_size,
                        self.descriptor_type, move(self.scales), move(self.orientations))

    def keypoints_numpy(self) -> np.ndarray:
        return self.keypoints.detach().float().cpu().numpy()


class Detector(Protocol):
    """Finds keypoints; may also compute its native descriptors when asked."""

    name: str

    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints: ...


class DenseDescriptor(Protocol):
    """Describes arbitrary keypoints by sampling a descriptor network at them, in two steps so the
    network can run on the GPU while a CPU detector works on the same image."""

    name: str

    def dense_map(self, image: PreparedImage) -> torch.Tensor: ...

    def sample(self, dense: torch.Tensor, xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor: ...
