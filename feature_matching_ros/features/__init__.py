"""Detectors and descriptors by name, combined freely: any detector's keypoints, any descriptor network.

    extractor = FeatureExtractor(FeatureConfig(detector="orb", descriptor="aliked"), device="cpu")
    features = extractor(image)  # Features in original image pixels
"""

from feature_matching_ros.features.base import Features, Keypoints
from feature_matching_ros.features.extractor import FeatureExtractor, NoFeaturesError

__all__ = ["FeatureExtractor", "Features", "Keypoints", "NoFeaturesError"]
