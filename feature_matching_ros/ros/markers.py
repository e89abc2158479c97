"""rviz markers of the map: keyframe positions (spheres) and accepted loop closures (lines between keyframes).

One visualization_msgs/MarkerArray per update, in the map frame: a DELETEALL marker first (so keyframes and
loops that left the map - LoadMap, a backend's pose update - vanish), then namespace ``keyframes`` (SPHERE_LIST,
one sphere per keyframe with a pose) and ``loops`` (LINE_LIST, one segment per accepted loop whose two
keyframes have poses).
"""

from __future__ import annotations

import numpy as np
from geometry_msgs.msg import Point
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

KEYFRAME_COLOUR = ColorRGBA(r=0.2, g=0.5, b=1.0, a=1.0)
LOOP_COLOUR = ColorRGBA(r=0.1, g=0.9, b=0.2, a=1.0)


def map_markers(positions: dict[int, np.ndarray], loops: list[tuple[int, int]], frame_id: str, stamp,
                keyframe_size_m: float = 0.05) -> MarkerArray:
    """``positions``: {keyframe id: (3,) position in ``frame_id``}; ``loops``: accepted (query id, match id)."""
    clear = Marker(action=Marker.DELETEALL)
    clear.header.frame_id, clear.header.stamp = frame_id, stamp
    keyframes = Marker(ns="keyframes", id=0, type=Marker.SPHERE_LIST, action=Marker.ADD, color=KEYFRAME_COLOUR)
    keyframes.scale.x = keyframes.scale.y = keyframes.scale.z = float(keyframe_size_m)
    keyframes.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in positions.values()]
    lines = Marker(ns="loops", id=0, type=Marker.LINE_LIST, action=Marker.ADD, color=LOOP_COLOUR)
    lines.scale.x = float(keyframe_size_m) / 2
    for query_id, match_id in loops:
        if query_id in positions and match_id in positions:
            lines.points += [Point(x=float(v[0]), y=float(v[1]), z=float(v[2]))
                             for v in (positions[query_id], positions[match_id])]
    for marker in (keyframes, lines):
        marker.header.frame_id, marker.header.stamp = frame_id, stamp
        marker.pose.orientation.w = 1.0
    return MarkerArray(markers=[clear, keyframes, lines])
