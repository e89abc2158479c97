"""The keyframe graph behind the odometry gate: what the backend's poses say about a candidate loop.

Nodes are database positions. Odometry edges join consecutive keyframes with their relative backend pose
(``T_prev_new``) and the distance travelled; accepted metric loops add edges of length 0. A loop candidate
is compared with the relative pose predicted by composing edges along the SHORTEST path (metres travelled)
between the two keyframes: the odometry accumulated drift along that path only, so the allowance is
``abs + ratio * path length`` (for rotation, also a share of the angle turned along the path). Accepted loops
shorten later paths, so after a first closure the gate tightens to the drift since then, as a backend's
marginal covariance would.

:class:`PlaceLinks` is the camera-only counterpart for "same place" questions (ambiguity, temporal consistency):
it needs no poses, only which keyframes earlier accepted loops joined.
"""

from __future__ import annotations

import heapq

import numpy as np

from feature_matching_ros.geometry.se3 import inverse, rotation_angle_deg


class KeyframeGraph:
    def __init__(self) -> None:
        # neighbours[i] = [(j, T_j_i, length_m, turned_deg)]
        self._neighbours: list[list[tuple[int, np.ndarray, float, float]]] = []

    def __len__(self) -> int:
        return len(self._neighbours)

    def add_node(self, previous_pose: np.ndarray | None, pose: np.ndarray | None) -> int:
        """Append a keyframe (backend pose T_map_camera or None) joined to the previous node by odometry."""
        position = len(self._neighbours)
        self._neighbours.append([])
        if position > 0 and previous_pose is not None and pose is not None:
            T_prev_new = inverse(previous_pose) @ pose
            step = float(np.linalg.norm(T_prev_new[:3, 3]))
            turned = rotation_angle_deg(T_prev_new[:3, :3])
            self._neighbours[position - 1].append((position, inverse(T_prev_new), step, turned))
            self._neighbours[position].append((position - 1, T_prev_new, step, turned))
        return position

    def add_loop(self, match_position: int, query_position: int, T_match_query: np.ndarray) -> None:
        """A metric loop: a zero-length edge between two nodes."""
        self._neighbours[query_position].append((match_position, T_match_query, 0.0, 0.0))
        self._neighbours[match_position].append((query_position, inverse(T_match_query), 0.0, 0.0))

    def predict(self, start: int, T_start_query: np.ndarray, start_distance: float, targets: set[int]
                ) -> dict[int, tuple[np.ndarray, float, float]]:
        """Dijkstra (edge length = metres travelled) from a query attached to node ``start`` by ``T_start_query``
        (``start_distance`` metres away) to the target nodes: {node: (T_node_query, path length m, degrees turned
        along that path)}. Targets the graph cannot reach (missing poses) are absent."""
        best: dict[int, float] = {start: start_distance}
        transforms = {start: T_start_query}
        turned = {start: rotation_angle_deg(T_start_query[:3, :3])}
        heap = [(start_distance, start)]
        done: dict[int, tuple[np.ndarray, float, float]] = {}
        remaining = set(targets)
        while heap and remaining:
            distance, node = heapq.heappop(heap)
            if node in done or distance > best.get(node, np.inf):
                continue
            done[node] = (transforms[node], distance, turned[node])
            remaining.discard(node)
            for neighbour, T_neighbour_node, length, edge_turned in self._neighbours[node]:
                candidate_distance = distance + length
                if candidate_distance < best.get(neighbour, np.inf):
                    best[neighbour] = candidate_distance
                    transforms[neighbour] = T_neighbour_node @ transforms[node]
                    turned[neighbour] = turned[node] + edge_turned
                    heapq.heappush(heap, (candidate_distance, neighbour))
        return {node: done[node] for node in targets if node in done}


class PlaceLinks:
    """Which database positions show the same place, from the loops the engine accepted (any kind: metric,
    Sim3 or monocular). A place revisited a third time offers candidates from BOTH earlier visits; without
    backend poses they are far apart in the database, yet the accepted loop between them says they are one
    place, so they confirm rather than contradict each other. Look-alike places (a repeated door) are never
    joined unless a loop between them was accepted, which precision already forbids.
    """

    def __init__(self, max_hops: int = 2) -> None:
        self.max_hops = max_hops
        self._links: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._links)

    def add(self, position_a: int, position_b: int) -> None:
        self._links.append((position_a, position_b))

    def linked(self, position_a: int, position_b: int, window: int) -> bool:
        """Are two positions the same place: within ``window`` of each other, or of the two ends of an accepted
        loop, chaining at most ``max_hops`` loops?"""
        frontier, seen = [position_a], {position_a}
        for hop in range(self.max_hops + 1):
            if any(abs(position - position_b) <= window for position in frontier):
                return True
            if hop == self.max_hops:
                break
            reached = []
            for position in frontier:
                for a, b in self._links:
                    for near, far in ((a, b), (b, a)):
                        if abs(position - near) <= window and far not in seen:
                            seen.add(far)
                            reached.append(far)
            frontier = reached
        return False
