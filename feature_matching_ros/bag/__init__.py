"""Rosbag2 read/write helpers (rosbags, no rclpy): message <-> numpy conversions and a frame-level API.

``convert``: Image / CameraInfo / PoseStamped / Odometry <-> numpy.
``sequence``: ``SequenceBagWriter`` writes camera frames (image, depth, camera info, ground-truth pose,
odometry) on the standard topics; ``read_sequence`` iterates them back as ``SequenceFrame`` dataclasses.
"""

from feature_matching_ros.bag.sequence import (
    DEFAULT_TOPICS,
    SequenceBagWriter,
    SequenceFrame,
    SequenceTopics,
    read_raw_messages,
    read_sequence,
)

__all__ = [
    "DEFAULT_TOPICS",
    "SequenceBagWriter",
    "SequenceFrame",
    "SequenceTopics",
    "read_raw_messages",
    "read_sequence",
]
