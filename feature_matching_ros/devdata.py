"""Development pairs with exact ground truth, shared by the tests and the benchmarks.

- graf1/graf3 (Oxford affine dataset via Debian's opencv-doc, shipped in resource/samples) with the
  dataset's homography H1to3p (planar scene, strong viewpoint change). The homography is accurate to
  about 1-2 px at 800x640 (our matches fit their own homography 1.3 px away on average), so
  correctness thresholds on graf use 5 px.
- scikit-image's stereo_motorcycle: a rectified Middlebury pair with calibration (f, cx, cy, doffs,
  baseline), so the relative pose is exact (a pure translation by one baseline along -x) and the
  disparity gives metric depth.
- synthetic homography warps of scikit-image photos (exact by construction).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SAMPLES = Path(__file__).resolve().parent.parent / "resource" / "samples"


@dataclass
class HomographyPair:
    name: str
    image0: np.ndarray  # RGB uint8
    image1: np.ndarray
    H_1_0: np.ndarray  # maps pixels of image 0 to image 1


@dataclass
class PosePair:
    name: str
    image0: np.ndarray
    image1: np.ndarray
    K0: np.ndarray
    K1: np.ndarray
    T_1_0: np.ndarray  # 4x4, metres
    depth0: np.ndarray | None = None  # metres, 0 or NaN = invalid
    depth1: np.ndarray | None = None

    @property
    def R_1_0(self) -> np.ndarray:
        return self.T_1_0[:3, :3]

    @property
    def t_1_0(self) -> np.ndarray:
        return self.T_1_0[:3, 3]


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_graf() -> HomographyPair:
    text = (SAMPLES / "H1to3p.xml").read_text()  # OpenCV 5's FileStorage cannot read this old file
    H = np.array(re.search(r"<data>(.*)</data>", text, re.S).group(1).split(), dtype=np.float64).reshape(3, 3)
    return HomographyPair("graf1-3", read_rgb(SAMPLES / "graf1.jpg"), read_rgb(SAMPLES / "graf3.jpg"), H)


def load_motorcycle() -> PosePair:
    from skimage import data

    left, right, disparity = data.stereo_motorcycle()
    f, cx, cy, doffs, baseline = 994.978, 311.193, 254.877, 31.086, 0.193001
    K0 = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    K1 = np.array([[f, 0, cx + doffs], [0, f, cy], [0, 0, 1.0]])
    valid = np.isfinite(disparity) & (disparity > 0)
    depth = np.where(valid, f * baseline / (np.where(valid, disparity, 1.0) + doffs), 0.0).astype(np.float32)
    T_1_0 = np.eye(4)
    T_1_0[0, 3] = -baseline
    return PosePair("motorcycle", left, right, K0, K1, T_1_0, depth0=depth)


def synthetic_homography_pair(photo: str, seed: int, size: tuple[int, int] = (480, 360),
                              strength: float = 0.15) -> HomographyPair:
    """Warp a scikit-image photo by a random homography (corners moved up to ``strength`` of the size)."""
    from skimage import data

    image = getattr(data, photo)()
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    image = cv2.resize(image[:, :, :3], size, interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(seed)
    width, height = size
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float32)
    moved = corners + rng.uniform(-strength, strength, size=(4, 2)).astype(np.float32) * [width, height]
    H = cv2.getPerspectiveTransform(corners, moved.astype(np.float32))
    warped = cv2.warpPerspective(image, H, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return HomographyPair(f"{photo}-H{seed}", image, warped, H)


def homography_errors(H: np.ndarray, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
    """Transfer error (px) of matched points under the ground-truth homography."""
    if len(points0) == 0:
        return np.zeros(0)
    projected = cv2.perspectiveTransform(points0.reshape(1, -1, 2).astype(np.float64), H)[0]
    return np.linalg.norm(projected - points1, axis=1)


def reprojection_errors(pair: PosePair, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
    """Error (px) of matches under exact depth + pose; NaN where image 0 has no valid depth.

    Without depth, the symmetric epipolar distance (px) is used instead (never NaN).
    """
    if pair.depth0 is None:
        return symmetric_epipolar_errors(pair, points0, points1)
    depth = pair.depth0
    cols = np.clip(np.round(points0[:, 0]).astype(int), 0, depth.shape[1] - 1)
    rows = np.clip(np.round(points0[:, 1]).astype(int), 0, depth.shape[0] - 1)
    z = depth[rows, cols].astype(np.float64)
    valid = np.isfinite(z) & (z > 0)
    K0, K1 = pair.K0, pair.K1
    X = np.stack([(points0[:, 0] - K0[0, 2]) / K0[0, 0] * z, (points0[:, 1] - K0[1, 2]) / K0[1, 1] * z, z], 1)
    X1 = X @ pair.R_1_0.T + pair.t_1_0
    projected = X1[:, :2] / np.where(X1[:, 2:] > 1e-6, X1[:, 2:], np.nan) * [K1[0, 0], K1[1, 1]] + [K1[0, 2], K1[1, 2]]
    errors = np.linalg.norm(projected - points1, axis=1)
    return np.where(valid, errors, np.nan)


def symmetric_epipolar_errors(pair: PosePair, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
    t = pair.t_1_0
    skew = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    F = np.linalg.inv(pair.K1).T @ skew @ pair.R_1_0 @ np.linalg.inv(pair.K0)
    h0 = np.c_[points0, np.ones(len(points0))]
    h1 = np.c_[points1, np.ones(len(points1))]
    lines1, lines0 = h0 @ F.T, h1 @ F
    numerator = np.abs(np.sum(h1 * lines1, axis=1))
    return 0.5 * numerator * (1 / np.hypot(lines1[:, 0], lines1[:, 1]) + 1 / np.hypot(lines0[:, 0], lines0[:, 1]))


def keypoint_agreement(reference_xy: np.ndarray, xy: np.ndarray, reference_angles: np.ndarray | None = None,
                       angles: np.ndarray | None = None, tolerance_px: float = 1.0) -> tuple[float, float]:
    """How well keypoints ``xy`` (M, 2) reproduce ``reference_xy`` (N, 2), both pixels of one image.

    Returns (repeatability, median angle difference in degrees): the fraction of reference keypoints with a
    keypoint within ``tolerance_px``, and over those, the median absolute difference between the reference
    orientation and its nearest keypoint's (radians in, NaN without angles or without repeated keypoints).
    """
    if len(reference_xy) == 0:
        return 1.0, float("nan")
    if len(xy) == 0:
        return 0.0, float("nan")
    distances = np.linalg.norm(reference_xy[:, None, :] - xy[None, :, :], axis=2)
    nearest = distances.argmin(1)
    repeated = distances[np.arange(len(reference_xy)), nearest] <= tolerance_px
    if reference_angles is None or angles is None or not repeated.any():
        return float(repeated.mean()), float("nan")
    difference = np.angle(np.exp(1j * (reference_angles[repeated] - angles[nearest[repeated]])))
    return float(repeated.mean()), float(np.degrees(np.median(np.abs(difference))))
