"""Intrinsics from sensor_msgs/CameraInfo, and what to do with distorted images: never silently wrong.

The core works with pinhole intrinsics K on undistorted pixels. CameraInfo describes two kinds of topic:
  * raw images (``image_raw``): intrinsics ``k`` with distortion ``d`` under ``distortion_model``;
  * rectified / undistorted images (``image_rect``): their projection ``p`` (3x4; its left 3x3 is the
    pinhole K of the rectified image; ``d`` describes the RAW image and no longer applies).
``use_rectified_intrinsics`` selects ``p``. With ``k`` and a non-zero ``d`` the image is distorted: the node
either undistorts it (and its depth) to the pinhole camera ``k`` before matching (:class:`Undistorter`, maps
cached per camera) or rejects it (``distorted_images: reject``, counted as ``rejected.distorted_image``).
Undistorting the image rather than the keypoints keeps every pixel the core sees -- keypoints, stored
keyframes, Matches messages, debug images, depth lookups -- in one consistent pinhole camera.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from feature_matching_ros.ros.conversions import ConversionError

# distortion_model -> accepted coefficient counts (OpenCV's orders)
SUPPORTED_DISTORTION = {"plumb_bob": (4, 5, 8, 12, 14), "rational_polynomial": (8, 12, 14), "equidistant": (4,)}
_CACHED_CAMERAS = 8


@dataclass(frozen=True)
class Distortion:
    model: str
    coefficients: tuple[float, ...]


@dataclass
class CameraModel:
    K: np.ndarray  # 3x3 pinhole intrinsics of the pixels the core will see
    distortion: Distortion | None  # None: the image is already pinhole (d zero, or rectified intrinsics)


def _check_pinhole(K: np.ndarray, what: str) -> np.ndarray:
    if not np.any(K):
        raise ConversionError("missing_camera_info", f"camera info has an all-zero {what} (missing calibration)")
    if not np.isfinite(K).all():
        raise ConversionError("invalid_camera_info", f"camera info {what} contains NaN or infinite values")
    if K[0, 0] <= 0 or K[1, 1] <= 0 or K[2, 2] != 1.0 or K[2, 0] or K[2, 1]:
        raise ConversionError("invalid_camera_info", f"camera info {what} is not a pinhole matrix: fx={K[0, 0]}, "
                              f"fy={K[1, 1]}, last row {K[2].tolist()}")
    return K


def camera_model(info, image_shape: tuple[int, ...] | None = None, use_rectified: bool = False) -> CameraModel:
    """CameraInfo -> :class:`CameraModel`; raises ConversionError (missing/invalid camera info, size mismatch,
    unsupported distortion)."""
    if image_shape is not None and info.width and info.height and (info.height, info.width) != tuple(image_shape[:2]):
        raise ConversionError("camera_info_size_mismatch", f"camera info is for {info.width}x{info.height} but the "
                              f"image is {image_shape[1]}x{image_shape[0]}")
    if use_rectified:
        P = np.asarray(info.p, dtype=np.float64).reshape(3, 4)
        return CameraModel(_check_pinhole(P[:, :3].copy(), "P"), None)
    K = _check_pinhole(np.asarray(info.k, dtype=np.float64).reshape(3, 3), "K")
    d = np.asarray(info.d, dtype=np.float64).ravel()
    if not np.isfinite(d).all():
        raise ConversionError("invalid_camera_info", "camera info d contains NaN or infinite values")
    if not d.size or not np.any(d):
        return CameraModel(K, None)
    model = info.distortion_model
    if model not in SUPPORTED_DISTORTION or d.size not in SUPPORTED_DISTORTION[model]:
        raise ConversionError("unsupported_distortion", f"camera info distortion_model {model!r} with {d.size} "
                              f"non-zero coefficients is not supported (supported: " + ", ".join(
                                  f"{m} {c}" for m, c in SUPPORTED_DISTORTION.items()) + "); publish a rectified "
                              "topic and set use_rectified_intrinsics:=true")
    return CameraModel(K, Distortion(model, tuple(float(v) for v in d)))


class Undistorter:
    """Undistort images to the pinhole camera K of their CameraModel, with remap tables cached per camera."""

    def __init__(self) -> None:
        self._maps: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _tables(self, model: CameraModel, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        key = (model.distortion, model.K.tobytes(), size)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        coefficients = np.array(model.distortion.coefficients)
        if model.distortion.model == "equidistant":
            tables = cv2.fisheye.initUndistortRectifyMap(model.K, coefficients, np.eye(3), model.K, size,
                                                         cv2.CV_32FC1)
        else:
            tables = cv2.initUndistortRectifyMap(model.K, coefficients, None, model.K, size, cv2.CV_32FC1)
        self._maps[key] = tables
        while len(self._maps) > _CACHED_CAMERAS:
            self._maps.popitem(last=False)
        return tables

    def undistort(self, image: np.ndarray, model: CameraModel, nearest: bool = False) -> np.ndarray:
        """``image`` (H, W[, C]) seen through ``model``'s distortion -> the same view through the pinhole K.
        ``nearest`` for depth (no blending across depth edges; 0 = invalid where no source pixel exists)."""
        if model.distortion is None:
            return image
        map_x, map_y = self._tables(model, (image.shape[1], image.shape[0]))
        return cv2.remap(image, map_x, map_y, cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
