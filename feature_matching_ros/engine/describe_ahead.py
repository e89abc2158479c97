"""Keyframes back to back: the next keyframe is described while the current one verifies.

A keyframe's work falls in two halves on different hardware: extraction and the global descriptor run on the
networks' device, verification (RANSAC, PnP, the acceptance checks) on the host. When keyframes queue up (a
backend sending a burst after a relocalisation or a map merge, a bag replayed faster than real time),
:class:`DescribeAhead` describes the next keyframe in a background thread while the engine verifies the current
one, so the device and the host work at the same time. The engine's model lock gives the networks to one caller
at a time, and describe() does not read the database, so every result equals the one-by-one result.

Measured on a backlog (benchmarks/keyframe_latency.py): no gain with a GPU (0.99-1.01x the one-by-one rate
with orb_lightglue, 0.84x with aliked_lightglue) and a loss on 2 CPU cores (0.57-0.77x). Both halves are mostly
Python work (kernel launches, numpy, the checks) under one interpreter lock, and RANSAC is a few ms; the node
therefore leaves it off unless asked (parameter describe_ahead). It can pay where extraction is dominated by GPU
kernels rather than Python.

Written here because the overlap is between our own engine stages; a generic executor would not know which
half may run ahead.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Hashable

from feature_matching_ros.engine.engine import Described, LoopClosureEngine


class DescribeAhead:
    """Runs ``engine.describe`` for keyframes that are waiting, one at a time, in one background thread.

    Start the next keyframe from ``process_keyframe(..., after_matching=...)`` of the current one: the networks
    are then free (its candidates are matched) and the host verifies while the device describes.

    ``start(key, **describe_arguments)`` begins describing; ``take(key)`` returns the result (waiting for it if
    needed; exceptions such as ImageError are raised there, in the caller's thread) or None when ``key`` was not
    started. A started keyframe that is never taken is dropped by the next ``start``.
    """

    def __init__(self, engine: LoopClosureEngine) -> None:
        self._engine = engine
        self._executor: ThreadPoolExecutor | None = None
        self._key: Hashable | None = None
        self._future: Future | None = None

    def start(self, key: Hashable, **describe_arguments: Any) -> None:
        if self._future is not None and self._key == key:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="describe_ahead")
        self._key = key
        self._future = self._executor.submit(self._engine.describe, **describe_arguments)

    def take(self, key: Hashable) -> Described | None:
        if self._future is None or self._key != key:
            return None
        future, self._future, self._key = self._future, None, None
        return future.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._future, self._key = None, None
