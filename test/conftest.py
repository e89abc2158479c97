"""Real images with exact ground truth, shared by the core tests.

- graf1/graf3 (Oxford affine dataset via Debian's opencv-doc, shipped in resource/samples) with the
  dataset's homography H1to3p (planar scene, strong viewpoint change).
- scikit-image's stereo_motorcycle: a rectified Middlebury pair with calibration, so the relative pose is
  exact (pure translation of one baseline along -x) and the disparity gives metric depth.
- synthetic homography warps of scikit-image photos (exact by construction).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

torch.set_num_threads(2)

SAMPLES = Path(__file__).resolve().parent.parent / "resource" / "samples"


@dataclass
class HomographyPair:
    image0: np.ndarray
    image1: np.ndarray
    H_1_0: np.ndarray  # maps pixels of image 0 to image 1


@dataclass
class StereoPair:
    image0: np.ndarray
    image1: np.ndarray
    K0: np.ndarray
    K1: np.ndarray
    depth0: np.ndarray  # metres, 0 = invalid
    R_1_0: np.ndarray
    t_1_0: np.ndarray  # metres


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def load_graf() -> HomographyPair:
    text = (SAMPLES / "H1to3p.xml").read_text()
    H = np.array(re.search(r"<data>(.*)</data>", text, re.S).group(1).split(), dtype=np.float64).reshape(3, 3)
    return HomographyPair(read_rgb(SAMPLES / "graf1.jpg"), read_rgb(SAMPLES / "graf3.jpg"), H)


def load_motorcycle() -> StereoPair:
    from skimage import data

    left, right, disparity = data.stereo_motorcycle()
    f, cx, cy, doffs, baseline = 994.978, 311.193, 254.877, 31.086, 0.193001
    K0 = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    K1 = np.array([[f, 0, cx + doffs], [0, f, cy], [0, 0, 1.0]])
    valid = np.isfinite(disparity) & (disparity > 0)
    depth = np.where(valid, f * baseline / (np.where(valid, disparity, 1.0) + doffs), 0.0).astype(np.float32)
    return StereoPair(left, right, K0, K1, depth, np.eye(3), np.array([-baseline, 0.0, 0.0]))


def synthetic_homography_pair(name: str, seed: int) -> HomographyPair:
    """Warp a scikit-image photo by a random, moderate homography (corners moved up to 15% of the size)."""
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    image = cv2.resize(image, (480, 360), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float32)
    moved = corners + rng.uniform(-0.15, 0.15, size=(4, 2)).astype(np.float32) * [w, h]
    H = cv2.getPerspectiveTransform(corners, moved.astype(np.float32))
    warped = cv2.warpPerspective(image, H, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return HomographyPair(image, warped, H)


def homography_errors(H: np.ndarray, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
    projected = cv2.perspectiveTransform(points0.reshape(1, -1, 2).astype(np.float64), H)[0]
    return np.linalg.norm(projected - points1, axis=1)


def rotation_error_deg(R_est: np.ndarray, R_gt: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R_est.T @ R_gt) - 1) / 2, -1, 1))))


def translation_angle_deg(t_est: np.ndarray, t_gt: np.ndarray) -> float:
    cosine = abs(float(t_est @ t_gt)) / (np.linalg.norm(t_est) * np.linalg.norm(t_gt))
    return float(np.degrees(np.arccos(np.clip(cosine, -1, 1))))


@pytest.fixture(scope="session")
def graf() -> HomographyPair:
    return load_graf()


@pytest.fixture(scope="session")
def motorcycle() -> StereoPair:
    return load_motorcycle()
