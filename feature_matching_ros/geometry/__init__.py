"""Relative pose from matches: essential matrix (monocular) or PnP (with depth), with degeneracy checks."""

from feature_matching_ros.geometry.pose import RelativePose, estimate_relative_pose

__all__ = ["RelativePose", "estimate_relative_pose"]
