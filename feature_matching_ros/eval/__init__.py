"""Offline evaluation: metrics (pose AUC, precision/recall, ATE), pose graph, and runs over rosbags."""
