"""ROS 2 shell of feature_matching_ros: message conversions and nodes (the only rclpy importers).

Modules here are thin: they convert messages, read parameters and call the core. ``parameters`` and
``keyframe_store`` import neither rclpy nor message packages, so tests and tools can use them anywhere.
"""
