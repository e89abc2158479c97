"""Fixtures with real images and exact ground truth (see feature_matching_ros.devdata)."""

from __future__ import annotations

import pytest
import torch

from feature_matching_ros.devdata import (SAMPLES, HomographyPair, PosePair, homography_errors,  # noqa: F401
                                          load_graf, load_motorcycle, rotation_error_deg,
                                          synthetic_homography_pair, translation_angle_deg)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def graf() -> HomographyPair:
    return load_graf()


@pytest.fixture(scope="session")
def motorcycle() -> PosePair:
    return load_motorcycle()
