"""feature_matching_ros: visual loop closure and relocalization for ROS 2.

The core library (everything except :mod:`feature_matching_ros.ros`) never imports rclpy, so the same
code runs in the ROS nodes, in ``fmr evaluate`` over a bag, and in the training scripts.
"""

__version__ = "0.1.0"
