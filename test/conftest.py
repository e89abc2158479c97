"""Fixtures with real images and exact ground truth (see feature_matching_ros.devdata)."""

from __future__ import annotations

import pytest
import torch

import numpy as np

from feature_matching_ros.devdata import (SAMPLES, HomographyPair, PosePair, homography_errors,  # noqa: F401
                                          load_graf, load_motorcycle, synthetic_homography_pair)
from feature_matching_ros.eval.metrics import relative_pose_error_deg, rotation_angle_deg

torch.set_num_threads(2)


def rotation_error_deg(R_est: np.ndarray, R_gt: np.ndarray) -> float:
    return rotation_angle_deg(R_est.T @ R_gt)


def translation_angle_deg(t_est: np.ndarray, t_gt: np.ndarray) -> float:
    T_est, T_gt = np.eye(4), np.eye(4)
    T_est[:3, 3], T_gt[:3, 3] = t_est, t_gt
    return relative_pose_error_deg(T_est, T_gt)[1]


@pytest.fixture(scope="session")
def graf() -> HomographyPair:
    return load_graf()


@pytest.fixture(scope="session")
def motorcycle() -> PosePair:
    return load_motorcycle()


@pytest.fixture(scope="session")
def orb_nn_pipeline():
    """ORB keypoints, native descriptors, mutual nearest neighbours, on the CPU: the engine tests' cheap pipeline."""
    from feature_matching_ros.config import PipelineConfig
    from feature_matching_ros.pipeline import MatchingPipeline

    config = PipelineConfig.from_dict({"features": {"detector": "orb", "descriptor": "native", "max_keypoints": 1024,
                                                    "resize_max": 0},
                                       "matcher": {"name": "nn", "ratio_test": 0.8}, "device": "cpu"})
    return MatchingPipeline(config)
