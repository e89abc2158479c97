"""Side-by-side match visualisation: inlier matches green, outliers red (OpenCV drawing, RGB in/out)."""

from __future__ import annotations

import cv2
import numpy as np

from feature_matching_ros.image import to_rgb_uint8


def draw_matches(image0: np.ndarray, image1: np.ndarray, points0: np.ndarray, points1: np.ndarray,
                 inliers: np.ndarray, max_lines: int = 2000, header: str | None = None) -> np.ndarray:
    """Return an RGB canvas with both images side by side and one line per match (pixels of each image)."""
    left, right = to_rgb_uint8(image0), to_rgb_uint8(image1)
    height = max(left.shape[0], right.shape[0])
    canvas = np.zeros((height, left.shape[1] + right.shape[1], 3), dtype=np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1]:] = right
    offset = np.array([left.shape[1], 0.0])
    order = np.argsort(inliers, kind="stable")  # outliers first so inliers are drawn on top
    for index in order[-max_lines:]:
        colour = (0, 220, 0) if inliers[index] else (230, 0, 0)
        start = tuple(np.round(points0[index]).astype(int))
        end = tuple(np.round(points1[index] + offset).astype(int))
        cv2.line(canvas, start, end, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, start, 2, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, end, 2, colour, -1, cv2.LINE_AA)
    if header:
        cv2.putText(canvas, header, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(canvas, header, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas
