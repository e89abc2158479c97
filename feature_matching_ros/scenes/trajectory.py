"""Camera trajectories that revisit places: laps around a scene's rounded-rectangle route.

A trajectory is a list of *pieces*: laps (forward or reverse, each on its own lane with its own yaw
offset, blended smoothly from the previous lap) and in-place turnarounds between a forward and a reverse
lap. Frames are spread over the pieces by path length with a smoothly varying speed, and the camera
gets a small handheld wobble (yaw, pitch, roll). Everything is drawn from the seed.

Frames: map is z up; the camera pose is the optical frame (x right, y down, z forward), ``T_map_camera``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from feature_matching_ros.scenes.builders import SceneLayout

# Optical frame axes expressed in a body frame that has x forward, y left, z up.
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
TURN_COST_M = 3.0  # a turnaround "costs" as many frames as this much travel


class RoundedRectangle:
    """Arc-length parameterised rounded rectangle centred at the origin, counter-clockwise."""

    def __init__(self, half_x: float, half_y: float, radius: float):
        if not (0 < radius <= min(half_x, half_y)):
            raise ValueError("corner radius must be in (0, min(half sizes)]")
        self.hx, self.hy, self.r = half_x, half_y, radius
        sx, sy = 2 * (half_x - radius), 2 * (half_y - radius)
        arc = np.pi / 2 * radius
        # Pieces in order, starting at the middle of the bottom edge going +x.
        self._pieces = [("line", sx / 2, (0.0, -half_y), (1.0, 0.0)),
                        ("arc", arc, (half_x - radius, -half_y + radius), -np.pi / 2),
                        ("line", sy, (half_x, -half_y + radius), (0.0, 1.0)),
                        ("arc", arc, (half_x - radius, half_y - radius), 0.0),
                        ("line", sx, (half_x - radius, half_y), (-1.0, 0.0)),
                        ("arc", arc, (-half_x + radius, half_y - radius), np.pi / 2),
                        ("line", sy, (-half_x, half_y - radius), (0.0, -1.0)),
                        ("arc", arc, (-half_x + radius, -half_y + radius), np.pi),
                        ("line", sx / 2, (-half_x + radius, -half_y), (1.0, 0.0))]
        self.length = float(sum(p[1] for p in self._pieces))

    def evaluate(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points (N, 2) and unit tangents (N, 2) at arc lengths s (wrapped to one lap)."""
        s = np.mod(np.asarray(s, float), self.length)
        points = np.zeros((s.size, 2))
        tangents = np.zeros((s.size, 2))
        start = 0.0
        for kind, length, anchor, extra in self._pieces:
            sel = (s >= start) & (s < start + length) if length > 0 else np.zeros_like(s, bool)
            local = s[sel] - start
            if kind == "line":
                points[sel] = np.asarray(anchor) + local[:, None] * np.asarray(extra)
                tangents[sel] = extra
            else:
                angle = extra + local / self.r
                points[sel] = np.asarray(anchor) + self.r * np.stack([np.cos(angle), np.sin(angle)], 1)
                tangents[sel] = np.stack([-np.sin(angle), np.cos(angle)], 1)
            start += length
        return points, tangents


@dataclass(frozen=True)
class Lap:
    direction: int  # +1 counter-clockwise, -1 clockwise
    lane_offset_m: float  # + = towards the outside of the ring
    yaw_offset_rad: float
    fraction: float = 1.0  # of a full lap


def default_lap_plan(layout: SceneLayout, rng: np.random.Generator) -> list[Lap]:
    """Forward lap, forward lap on another lane looking sideways, then a reverse lap (after a turnaround)."""
    lane = layout.lane_half_width
    return [
        Lap(+1, rng.uniform(-0.2, 0.2) * lane, 0.0),
        Lap(+1, rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0) * lane, rng.choice([-1.0, 1.0]) * np.radians(
            rng.uniform(10, 25))),
        Lap(-1, rng.uniform(-1.0, 1.0) * lane, np.radians(rng.uniform(-10, 10)), fraction=1.0),
    ]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _smooth_noise(rng: np.random.Generator, n: int, correlation_frames: float) -> np.ndarray:
    """Zero-mean, unit-ish amplitude, smooth random signal (sum of a few random sinusoids)."""
    t = np.arange(n, dtype=float)
    out = np.zeros(n)
    for _ in range(4):
        period = correlation_frames * rng.uniform(1.0, 4.0)
        out += np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)) / 2.0
    return out


def camera_pose(position_xyz: np.ndarray, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """T_map_camera for a camera at position looking along yaw (map z up), pitch > 0 looks down."""
    R_map_body = Rotation.from_euler("ZYX", [yaw, pitch, roll]).as_matrix()
    T = np.eye(4)
    T[:3, :3] = R_map_body @ R_BODY_OPTICAL
    T[:3, 3] = position_xyz
    return T


def make_trajectory(layout: SceneLayout, n_frames: int, rng: np.random.Generator,
                    laps: list[Lap] | None = None) -> np.ndarray:
    """(n_frames, 4, 4) poses T_map_camera following ``laps`` (default: ``default_lap_plan``)."""
    if n_frames < 2:
        raise ValueError("need at least 2 frames")
    route = RoundedRectangle(*layout.route_half_size, layout.corner_radius)
    laps = laps if laps is not None else default_lap_plan(layout, rng)
    for lap in laps:
        if abs(lap.lane_offset_m) >= layout.corner_radius:
            raise ValueError("lane offset must stay inside the corner radius")
    # Pieces on a common "cost" axis (metres travelled, turns counted as TURN_COST_M).
    pieces = []
    for index, lap in enumerate(laps):
        if index > 0 and lap.direction != laps[index - 1].direction:
            pieces.append(("turn", TURN_COST_M, index))
        pieces.append(("lap", lap.fraction * route.length, index))
    total_cost = sum(p[1] for p in pieces)
    speed = 1.0 + 0.25 * _smooth_noise(rng, n_frames, 25.0)
    cost = np.concatenate([[0.0], np.cumsum(speed[:-1])])
    cost *= total_cost / cost[-1]

    s0 = rng.uniform(0, route.length)
    arc = np.zeros(n_frames)  # position along the route (unwrapped)
    offset = np.zeros(n_frames)
    heading_extra = np.zeros(n_frames)  # added to the travel heading (yaw offsets, turnaround)
    travel_dir = np.ones(n_frames)
    piece_start, s_cursor = 0.0, s0
    previous = Lap(laps[0].direction, laps[0].lane_offset_m, laps[0].yaw_offset_rad)
    for kind, piece_cost, lap_index in pieces:
        lap = laps[lap_index]
        sel = (cost >= piece_start) & ((cost < piece_start + piece_cost) | (piece_start + piece_cost >= total_cost))
        local = cost[sel] - piece_start
        if kind == "turn":
            # Rotate in place by 180 degrees (from the previous lap's heading to the next one's).
            arc[sel] = s_cursor
            offset[sel] = previous.lane_offset_m
            travel_dir[sel] = previous.direction
            heading_extra[sel] = previous.yaw_offset_rad + _smoothstep(local / piece_cost) * (
                np.pi + lap.yaw_offset_rad - previous.yaw_offset_rad)
        else:
            blend = _smoothstep(local / (0.2 * route.length))  # change lane and gaze over the first 20 %
            arc[sel] = s_cursor + lap.direction * local
            offset[sel] = previous.lane_offset_m + blend * (lap.lane_offset_m - previous.lane_offset_m)
            travel_dir[sel] = lap.direction
            previous_yaw = previous.yaw_offset_rad if previous.direction == lap.direction else lap.yaw_offset_rad
            heading_extra[sel] = previous_yaw + blend * (lap.yaw_offset_rad - previous_yaw)
            s_cursor += lap.direction * piece_cost
            previous = lap
        piece_start += piece_cost

    points, tangents = route.evaluate(arc)
    outward = np.stack([tangents[:, 1], -tangents[:, 0]], 1)  # right of a counter-clockwise route = outside
    xy = points + offset[:, None] * outward
    travel_heading = np.arctan2(tangents[:, 1], tangents[:, 0]) + np.where(travel_dir > 0, 0.0, np.pi)
    yaw = travel_heading + heading_extra + np.radians(4.0) * _smooth_noise(rng, n_frames, 30.0)
    pitch = np.radians(2.0) + np.radians(3.0) * _smooth_noise(rng, n_frames, 40.0)
    roll = np.radians(1.5) * _smooth_noise(rng, n_frames, 35.0)
    height = layout.camera_height + 0.05 * _smooth_noise(rng, n_frames, 20.0)
    return np.stack([camera_pose(np.array([x, y, h]), a, p, r)
                     for (x, y), h, a, p, r in zip(xy, height, yaw, pitch, roll)])
