"""SANDESC descriptors at any detector's keypoints (``descriptor: sandesc``): dense map, then bilinear sampling.

The network (:mod:`feature_matching_ros.models.sandesc`) is trained per detector on that detector's
keypoints, so the weights are looked up per detector:

1. ``FMR_SANDESC_WEIGHTS``: a ``.safetensors`` file (used for every detector) or a folder holding
   ``sandesc_<detector>.safetensors`` files (benchmarks, freshly trained weights, experiments);
2. otherwise ``resource/sandesc/sandesc_<detector>.safetensors`` (shipped; ``orb_multiscale`` uses ORB's).

A detector without its own file falls back to the ORB-trained weights with a logged warning: the map is
dense and valid at every pixel, per-detector training only tunes it to a keypoint distribution, so
ORB-trained descriptors at SIFT or DISK keypoints are a usable default rather than an error. Without any
file a :class:`WeightsError` says how to train one (``fmr train sandesc``) and where it goes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from feature_matching_ros.image import PreparedImage
from feature_matching_ros.weights import RESOURCE_DIR, WeightsError, sha256_of

LOG = logging.getLogger(__name__)
SANDESC_DIR = RESOURCE_DIR / "sandesc"
ENV_WEIGHTS = "FMR_SANDESC_WEIGHTS"
FALLBACK_DETECTOR = "orb"
DETECTOR_ALIASES = {"orb_multiscale": "orb"}  # the same FAST corners, only more scales
# Shipped files -> sha256 (filled when trained weights ship; a listed file must match, unlisted ones load unchecked).
SHIPPED_SHA256: dict[str, str] = {
    "sandesc_orb.safetensors": "f5c5a29e292b6804c510bf44184a190d8b3435363236cb5a5733860a8b05da84",
    "sandesc_aliked.safetensors": "37a822ec62ecb8d56e2207b3c3946e93e653d6d3d4988ccc5bd36c23dac1a9f2",
}


def weights_file_name(detector: str) -> str:
    return f"sandesc_{DETECTOR_ALIASES.get(detector, detector)}.safetensors"


def sandesc_weights_path(detector: str) -> Path:
    """The weights file for ``detector`` (see the module docstring for the search order)."""
    override = os.environ.get(ENV_WEIGHTS)
    folder = SANDESC_DIR
    if override:
        path = Path(override)
        if path.is_file():
            return path
        if not path.is_dir():
            raise WeightsError(f"{ENV_WEIGHTS}={override} is neither a .safetensors file nor a folder")
        folder = path
    own = folder / weights_file_name(detector)
    if own.is_file():
        return own
    fallback = folder / weights_file_name(FALLBACK_DETECTOR)
    if fallback.is_file():
        LOG.warning("no SANDESC weights trained on %s keypoints (%s); using the ORB-trained %s", detector, own,
                    fallback.name)
        return fallback
    also = "" if own == fallback else f" (nor the ORB-trained fallback {fallback.name})"
    raise WeightsError(
        f"SANDESC weights for detector={detector} not found: {own}{also}. "
        f"Train them with `fmr train sandesc --detector {DETECTOR_ALIASES.get(detector, detector)} --train PAIRS... "
        f"--export {SANDESC_DIR}` (pairs from `fmr make-pairs`), or point {ENV_WEIGHTS} at a .safetensors file "
        "or a folder of sandesc_<detector>.safetensors files")


class SandescNetwork:
    """SANDESC as a :class:`~feature_matching_ros.features.base.DenseDescriptor` (128-d unit vectors)."""

    name = "sandesc"
    descriptor_dim = 128

    def __init__(self, device: torch.device, precision: str = "fp32", detector: str = FALLBACK_DETECTOR,
                 path: Path | str | None = None) -> None:
        from feature_matching_ros.models.sandesc import load_sandesc

        self.device, self.precision = torch.device(device), precision
        self.path = Path(path) if path is not None else sandesc_weights_path(detector)
        expected = SHIPPED_SHA256.get(self.path.name) if self.path.parent == SANDESC_DIR else None
        if expected is not None and sha256_of(self.path) != expected:
            raise WeightsError(f"sha256 mismatch for {self.path}")
        self.model, self.metadata = load_sandesc(self.path, self.device)
        self.model.to(memory_format=torch.channels_last)  # CPU 640x480: 430 ms instead of 650 ms
        self.descriptor_dim = self.model.descriptor_dim
        LOG.info("SANDESC for %s keypoints: %s (trained on %s)", detector, self.path,
                 self.metadata.get("detector", "?"))

    @torch.inference_mode()
    def dense_map(self, image: PreparedImage) -> torch.Tensor:
        """(1, 128, h, w) unit descriptors of the network-frame image; on CUDA this only queues the work."""
        from feature_matching_ros.features.learned import autocast_for

        gray = torch.from_numpy(image.gray).to(self.device, non_blocking=True)[None, None].float().div_(255.0)
        with autocast_for(self.device, self.precision):
            return self.model(gray)

    @torch.inference_mode()
    def sample(self, dense: torch.Tensor, xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear sampling at (N, 2) network-frame pixels -> (N, 128) unit vectors (``size`` = (W, H) of the map)."""
        if len(xy) == 0:
            return torch.zeros((0, self.descriptor_dim), device=self.device)
        return self.model.sample(dense, xy.float().to(dense.device)[None])[0]
