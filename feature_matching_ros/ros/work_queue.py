"""The node's work queue: map work is never dropped, camera images are (newest wins). No ROS types.

Map work (keyframes and candidate requests from the backend) is map data: losing a keyframe loses a place. It
waits in an unbounded first-in first-out backlog; the node reports the backlog and its size in diagnostics
and warns above ``keyframe_backlog_warn`` (a matcher slower than the keyframe rate for a long time is a
deployment problem to see, not to hide by dropping). Images for relocalization are only useful while fresh:
their queue is bounded and a full queue drops its OLDEST image, which the caller counts and logs.
Map work is served before images.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class Job:
    kind: str  # "keyframe" | "candidates" | "image"
    payload: Any
    received: float  # time.monotonic() at the callback
    nbytes: int = 0  # memory held by the payload (images), for the backlog report


class WorkQueue:
    """Unbounded map backlog + bounded newest-wins image queue, one consumer (thread safe)."""

    def __init__(self, image_capacity: int) -> None:
        if image_capacity < 1:
            raise ValueError(f"image_capacity must be >= 1, got {image_capacity}")
        self.image_capacity = int(image_capacity)
        self._map: deque[Job] = deque()
        self._images: deque[Job] = deque()
        self._map_bytes = 0
        self._condition = threading.Condition()
        self._stopping = False

    def push_map(self, job: Job) -> int:
        """Append map work (never dropped); returns the backlog length after it."""
        with self._condition:
            self._map.append(job)
            self._map_bytes += job.nbytes
            self._condition.notify()
            return len(self._map)

    def push_image(self, job: Job) -> int:
        """Append an image; returns how many older images were dropped to make room (0 or more)."""
        with self._condition:
            dropped = 0
            while len(self._images) >= self.image_capacity:
                self._images.popleft()
                dropped += 1
            self._images.append(job)
            self._condition.notify()
            return dropped

    def next(self, poll_s: float = 0.5) -> Job | None:
        """The next job (map work first), blocking; None once :meth:`stop` was called."""
        with self._condition:
            while not self._stopping and not self._map and not self._images:
                self._condition.wait(poll_s)
            if self._stopping:
                return None
            if self._map:
                job = self._map.popleft()
                self._map_bytes -= job.nbytes
                return job
            return self._images.popleft()

    def peek_map(self) -> Job | None:
        """The next map job without taking it (the worker prepares it while finishing the current one), or None."""
        with self._condition:
            return self._map[0] if self._map else None

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def sizes(self) -> dict[str, int]:
        """{"map": waiting map jobs, "map_bytes": their image bytes, "images": waiting images}."""
        with self._condition:
            return {"map": len(self._map), "map_bytes": self._map_bytes, "images": len(self._images)}

    def oldest_map_age_s(self) -> float:
        with self._condition:
            return time.monotonic() - self._map[0].received if self._map else 0.0
