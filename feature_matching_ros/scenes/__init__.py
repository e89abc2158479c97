"""Rendered scenes with exact ground truth: renderer, scene builders, trajectories, loop labels, sequences,
training pairs and the README sample. Pure numpy/OpenCV; never imports rclpy."""
