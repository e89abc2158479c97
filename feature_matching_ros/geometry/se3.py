"""SE(3) and Sim(3) helpers, with the conventions written once.

Transforms are 4x4 homogeneous matrices; ``T_a_b`` maps points from frame b to frame a (``X_a = T_a_b X_b``).
Twists and perturbation vectors are ordered (translation, rotation) = (tx, ty, tz, rx, ry, rz), like ROS
covariances. A LEFT perturbation is ``T <- exp([v, w]) T`` (expressed in the frame T maps INTO); the adjoint
moves a right (local) perturbation to the left one: ``T exp(d) = exp(Ad_T d) T``.

A similarity ``S = [s R, t; 0, 1]`` maps ``X -> s R X + t`` (monocular loops: the scale between two keyframes'
maps). It is stored as a 4x4 matrix too; :func:`similarity_parts` splits it.
"""

from __future__ import annotations

import cv2
import numpy as np


def skew(v: np.ndarray) -> np.ndarray:
    """3x3 cross-product matrix: ``skew(a) @ b == np.cross(a, b)``."""
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def exp_so3(w: np.ndarray) -> np.ndarray:
    """Rotation matrix of the rotation vector ``w`` (axis * angle, radians)."""
    return cv2.Rodrigues(np.asarray(w, dtype=np.float64).reshape(3, 1))[0]


def transform(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = R, np.asarray(t, np.float64).reshape(3)
    return out


def inverse(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform (exact, no general matrix inversion)."""
    R, t = T[:3, :3], T[:3, 3]
    return transform(R.T, -R.T @ t)


def adjoint(T: np.ndarray) -> np.ndarray:
    """6x6 adjoint of an SE(3) transform for (translation, rotation) ordered twists."""
    R, t = T[:3, :3], T[:3, 3]
    ad = np.zeros((6, 6))
    ad[:3, :3], ad[:3, 3:], ad[3:, 3:] = R, skew(t) @ R, R
    return ad


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a rotation matrix in degrees, in [0, 180]."""
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def invert_information(T: np.ndarray, information: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T^-1, information of T^-1) for a left-perturbation information of T.

    delta(T^-1) = -Ad(T^-1) delta(T) to first order, so delta(T) = -Ad(T^-1)^-1 delta(T^-1) = -Ad(T) delta(T^-1).
    """
    inverse_T = inverse(T)
    jacobian = -adjoint(T)
    return inverse_T, jacobian.T @ information @ jacobian


def similarity(scale: float, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4x4 matrix of the similarity X -> scale R X + t."""
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = scale * np.asarray(R, np.float64), np.asarray(t, np.float64).reshape(3)
    return out


def similarity_parts(S: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, R, t) of a 4x4 similarity matrix."""
    scale = float(np.cbrt(np.linalg.det(S[:3, :3])))
    return scale, S[:3, :3] / scale, S[:3, 3].copy()
