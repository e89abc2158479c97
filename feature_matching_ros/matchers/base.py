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


@dataclass
class View:
    """What a matcher may need of one image: its features (sparse matchers) and/or its gray pixels (detector-free
    matchers). features: :class:`Features` on the matcher's device or None; image: (H, W) uint8 or None."""

    features: Features | None = None
    image: np.ndarray | None = None


@dataclass
class Correspondences:
    """Matched pixels of a query (image 0) and one candidate (image 1): the one result every matcher gives the
    geometry, sparse or detector-free.

    points0, points1: (M, 2) float32 pixels of the original images; scores: (M,) float32 confidence in [0, 1];
    index0, index1: (M,) int64 keypoint indices of each match in the query's / candidate's keypoints, or None
    when the matcher matched pixels (detector-free: the points are not keypoints of either view).
    """

    points0: np.ndarray
    points1: np.ndarray
    scores: np.ndarray
    index0: np.ndarray | None = None
    index1: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.points0.shape[0])

    def subset(self, mask: np.ndarray) -> "Correspondences":
        """The correspondences where the (M,) boolean ``mask`` (or an index array) selects."""
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return Correspondences(self.points0[mask], self.points1[mask], self.scores[mask], pick(self.index0),
                               pick(self.index1))

    @staticmethod
    def from_indices(keypoints0: np.ndarray, keypoints1: np.ndarray, matches: PairMatches) -> "Correspondences":
        """Sparse matches (indices into (N0, 2) and (N1, 2) keypoints) as correspondences."""
        index0, index1 = matches.matches[:, 0], matches.matches[:, 1]
        return Correspondences(np.asarray(keypoints0, np.float32)[index0], np.asarray(keypoints1, np.float32)[index1],
                               np.asarray(matches.scores, np.float32), index0, index1)


class Matcher(Protocol):
    name: str

    def match(self, query: Features, candidates: Sequence[Features]) -> list[PairMatches]:
        """Match ``query`` against each candidate; returns one :class:`PairMatches` per candidate, in order."""
        ...
