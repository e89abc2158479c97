"""Validate and normalise input images for the feature extractors.

The core accepts numpy images as a camera driver or a file reader produces them: ``(H, W)`` gray,
``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA, in uint8, uint16 or float ([0, 1] or [0, 255]).
Everything else is rejected with :class:`ImageError` naming what was wrong, so a bad frame becomes a
counted rejection instead of a crash deep inside a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
import torch

MIN_IMAGE_SIDE = 32  # below this no detector has room for its border and patch


class ImageError(ValueError):
    """The image cannot be used for matching (empty, too small, wrong type, non-finite)."""


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a supported numpy image to ``(H, W, 3)`` uint8 RGB.

    uint16 images map their full range to 8 bits (value / 257): a fixed mapping, so the brightness of a
    stream does not jump from frame to frame as a per-image normalisation would; float images are taken as [0, 1] when their maximum is <= 1, else as [0, 255].
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ImageError(f"unsupported image shape {image.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ImageError(f"empty image of shape {image.shape}")
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ImageError(f"image of {width}x{height} is too small; need at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
    if image.dtype == np.uint8:
        converted = image
    elif image.dtype == np.uint16:
        converted = np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    elif image.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(image).all():
            raise ImageError("image contains NaN or infinite values")
        scale = 255.0 if float(image.max()) <= 1.0 else 1.0
        converted = np.clip(image.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"unsupported image dtype {image.dtype}; expected uint8, uint16 or float")
    if converted.ndim == 2:
        return cv2.cvtColor(converted, cv2.COLOR_GRAY2RGB)
    if converted.shape[2] == 4:
        return cv2.cvtColor(converted, cv2.COLOR_RGBA2RGB)
    return np.ascontiguousarray(converted)


def gray_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 gray of any supported image (the checks of :func:`to_rgb_uint8`)."""
    return cv2.cvtColor(to_rgb_uint8(image), cv2.COLOR_RGB2GRAY)


@dataclass
class PreparedImage:
    """An image resized for the networks, with both the numpy and the torch views they need.

    ``scale`` maps the network frame to the original frame: with the pixel-centre convention
    x_original = (x_network + 0.5) * scale - 0.5 (see :meth:`to_original`).
    """

    rgb: np.ndarray  # (h, w, 3) uint8, network frame
    original_size: tuple[int, int]  # (W, H) of the input image
    scale: tuple[float, float]  # (sx, sy): original pixels per network pixel
    device: torch.device

    @cached_property
    def gray(self) -> np.ndarray:
        return cv2.cvtColor(self.rgb, cv2.COLOR_RGB2GRAY)

    @cached_property
    def tensor(self) -> torch.Tensor:
        """``(1, 3, h, w)`` float32 RGB in [0, 1] on the device."""
        # Frames decoded zero-copy from ROS messages or bags are read-only; torch needs a writable buffer.
        rgb = self.rgb if self.rgb.flags.writeable else self.rgb.copy()
        return torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]

    def to_original(self, xy: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 2)`` pixel coordinates from the network frame to the original frame."""
        scale = torch.tensor(self.scale, dtype=xy.dtype, device=xy.device)
        return (xy + 0.5) * scale - 0.5

    def to_network(self, xy: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 2)`` pixel coordinates from the original frame to the network frame."""
        scale = torch.tensor(self.scale, dtype=xy.dtype, device=xy.device)
        return (xy + 0.5) / scale - 0.5


def prepare_image(image: np.ndarray, resize_max: int, device: torch.device) -> PreparedImage:
    """Validate, convert to RGB uint8 and shrink so the longest side is at most ``resize_max`` (0: keep)."""
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    factor = 1.0
    if resize_max and max(height, width) > resize_max:
        factor = resize_max / max(height, width)
        size = (max(MIN_IMAGE_SIDE, round(width * factor)), max(MIN_IMAGE_SIDE, round(height * factor)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    scale = (width / rgb.shape[1], height / rgb.shape[0])
    return PreparedImage(rgb=rgb, original_size=(width, height), scale=scale, device=device)
