"""The matcher interface: one query against k candidates in one call.

Loop closure verifies several retrieved candidates per keyframe, so every matcher takes a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from feature_matching_ros.features.base import Features


@dataclass
class PairMatches:
    """Matches between a query (image 0) and one candidate (image 1).

    matches: (M, 2) int64 indices into the query's and the candidate's keypoints.
    scores: (M,) float32 match confidence in [0, 1] (LightGlue probability; NN: 1 - distance ratio).
    """

    matches: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.matches.shape[0])

    @staticmethod
    def empty() -> "PairMatches":
        return PairMatches(np.zeros((0, 2), dtype=np.int64), np.zeros((0,), dtype=np.float32))


class Matcher(Protocol):
    name: str

    def match(self, query: Features, candidates: Sequence[Features]) -> list[PairMatches]:
        """Match ``query`` against each candidate; returns one :class:`PairMatches` per candidate, in order."""
        ...
