"""The node's health for /diagnostics, with the semantics of diagnostic_updater: a level describes NOW.

Levels come from what happened in a recent window (``diagnostics_window_s``), not from lifetime totals, so a
node recovers to OK once the trouble is over:
  * map:        ERROR while the map asked for at startup (map_path) could not be loaded and no map has loaded
                since (the node runs with an empty map); ERROR for a LoadMap request that failed within the
                window (the previous map stays, so it is an event, not a state); a successful load clears both
                at once. A refused or failed SaveMap within the window: WARN.
  * inputs:     WARN when inputs were rejected within the window (by kind) or images stalled while camera_info
                kept arriving.
  * processing: ERROR for processing errors within the window; WARN when the keyframe backlog exceeds
                keyframe_backlog_warn.
The first status ("<node>: relocalization") summarises them (the worst level and its messages) and carries
every lifetime counter, the latency percentiles and the queue depths as key/values; one status per concern
follows. Everything but :meth:`HealthMonitor.statuses` is free of ROS types, for tests and tools.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

OK, WARN, ERROR = 0, 1, 2
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}
_MAX_EVENTS = 100_000  # bound on remembered events: a flood of rejections must not grow memory


@dataclass
class Concern:
    """One diagnostics status: a level, a one-line message and key/values."""

    name: str
    level: int = OK
    message: str = "ok"
    values: dict[str, str] = field(default_factory=dict)


class RecentEvents:
    """Timestamped event keys; counts over the last ``window_s`` seconds (thread safe)."""

    def __init__(self, window_s: float, clock=time.monotonic) -> None:
        self.window_s = float(window_s)
        self._clock = clock
        self._events: deque[tuple[float, str]] = deque(maxlen=_MAX_EVENTS)
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        with self._lock:
            self._events.append((self._clock(), key))

    def counts(self, prefix: str = "") -> Counter[str]:
        """{key: occurrences within the window} for keys starting with ``prefix``."""
        horizon = self._clock() - self.window_s
        with self._lock:
            while self._events and self._events[0][0] < horizon:
                self._events.popleft()
            return Counter(key for _, key in self._events if key.startswith(prefix))


class HealthMonitor:
    """Map state + recent events -> the concerns above. Events are the node's counter keys."""

    def __init__(self, window_s: float, clock=time.monotonic) -> None:
        self.recent = RecentEvents(window_s, clock)
        self._clock = clock
        self._startup_map_failure: str | None = None
        self._last_load_failure: tuple[float, str] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ events
    def event(self, key: str) -> None:
        self.recent.add(key)

    def startup_map_failed(self, message: str) -> None:
        with self._lock:
            self._startup_map_failure = message

    def map_load_failed(self, message: str) -> None:
        self.recent.add("map.load_failed")
        with self._lock:
            self._last_load_failure = (self._clock(), message)

    def map_loaded(self) -> None:
        with self._lock:
            self._startup_map_failure = None
            self._last_load_failure = None

    # ------------------------------------------------------------------ levels
    def map_concern(self, keyframes: int) -> Concern:
        concern = Concern("map", message=f"{keyframes} keyframes")
        with self._lock:
            startup, last = self._startup_map_failure, self._last_load_failure
        if startup is not None:
            concern.level, concern.message = ERROR, f"running with an empty map: {startup}"
        elif last is not None and self._clock() - last[0] <= self.recent.window_s:
            concern.level, concern.message = ERROR, f"last load_map failed (the previous map stays): {last[1]}"
        else:
            saves = self.recent.counts("map.save_")
            if saves:
                concern.level = WARN
                concern.message = f"{sum(saves.values())} save_map requests refused or failed recently"
        concern.values["map_keyframes"] = str(keyframes)
        return concern

    def inputs_concern(self) -> Concern:
        concern = Concern("inputs")
        rejected = self.recent.counts("rejected.")
        stalled = self.recent.counts("images.stalled")
        dropped = self.recent.counts("dropped.images")
        parts = []
        if rejected:
            parts.append(f"{sum(rejected.values())} inputs rejected in the last {self.recent.window_s:g} s ("
                         + ", ".join(f"{key[len('rejected.'):]} {n}" for key, n in rejected.most_common(4)) + ")")
        if stalled:
            parts.append("images stopped arriving while camera_info arrives (image_qos?)")
        if parts:
            concern.level, concern.message = WARN, "; ".join(parts)
        concern.values = {f"recent.{key}": str(n) for key, n in (rejected + dropped + stalled).items()}
        return concern

    def processing_concern(self, backlog: int, backlog_warn: int) -> Concern:
        concern = Concern("processing")
        errors = self.recent.counts("errors")
        if errors:
            concern.level = ERROR
            concern.message = f"{sum(errors.values())} processing errors in the last {self.recent.window_s:g} s"
        elif backlog > backlog_warn:
            concern.level = WARN
            concern.message = (f"{backlog} keyframes waiting (> keyframe_backlog_warn={backlog_warn}): the matcher "
                               "is slower than the keyframe rate; none are dropped")
        concern.values = {"keyframe_backlog": str(backlog)}
        return concern

    @staticmethod
    def summary(concerns: list[Concern], headline: str) -> Concern:
        level = max((c.level for c in concerns), default=OK)
        troubled = [f"{c.name}: {c.message}" for c in concerns if c.level > OK and c.level == level]
        return Concern("relocalization", level, "; ".join(troubled) if troubled else headline)


def diagnostic_array(node_name: str, hardware_id: str, summary: Concern, concerns: list[Concern],
                     summary_values: dict[str, str], stamp):
    """DiagnosticArray: the summary (with every counter) first, then one status per concern."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    statuses = []
    for concern, values in [(summary, summary_values)] + [(c, c.values) for c in concerns]:
        statuses.append(DiagnosticStatus(
            level=bytes([concern.level]), name=f"{node_name}: {concern.name}", message=concern.message,
            hardware_id=hardware_id, values=[KeyValue(key=k, value=v) for k, v in values.items()]))
    array = DiagnosticArray(status=statuses)
    array.header.stamp = stamp
    return array
