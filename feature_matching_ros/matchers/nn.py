"""Mutual nearest-neighbour matching with Lowe's ratio test: L2 for float, Hamming for binary descriptors.

Float descriptors are L2-normalised by the extractors, so the distance follows from one matrix product.
Binary (ORB) descriptors are unpacked to bits so the exact Hamming distance matrix is two matrix
products (integer counts <= 256 are exact in float32) and runs on the same device as everything else.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from feature_matching_ros.config import MatcherConfig
from feature_matching_ros.features.base import Features
from feature_matching_ros.matchers.base import PairMatches


def unpack_bits(descriptors: torch.Tensor) -> torch.Tensor:
    """(N, B) uint8 -> (N, 8B) float32 of 0/1."""
    shifts = torch.arange(8, device=descriptors.device, dtype=torch.uint8)
    return ((descriptors[:, :, None] >> shifts) & 1).flatten(1).float()


def hamming_distances(desc0: torch.Tensor, desc1: torch.Tensor) -> torch.Tensor:
    """(M, B) x (N, B) uint8 -> (M, N) float32 bit distances."""
    bits0, bits1 = unpack_bits(desc0), unpack_bits(desc1)
    return bits0 @ (1.0 - bits1).t() + (1.0 - bits0) @ bits1.t()


def l2_distances(desc0: torch.Tensor, desc1: torch.Tensor) -> torch.Tensor:
    """(M, D) x (N, D) unit vectors -> (M, N) Euclidean distances."""
    return (2.0 - 2.0 * desc0.float() @ desc1.float().t()).clamp_min(0.0).sqrt()


def mutual_nearest_neighbours(distances: torch.Tensor, ratio: float, max_distance: float) -> PairMatches:
    """Mutual NN with ratio test on an (M, N) distance matrix; score = 1 - d1/d2 (0 without a second NN)."""
    m, n = distances.shape
    if m == 0 or n == 0:
        return PairMatches.empty()
    k = min(2, n)
    best, index = distances.topk(k, dim=1, largest=False)
    reverse = distances.argmin(dim=0)
    rows = torch.arange(m, device=distances.device)
    keep = (reverse[index[:, 0]] == rows) & (best[:, 0] <= max_distance)
    if k == 2:
        ratios = best[:, 0] / best[:, 1].clamp_min(1e-6)
        keep &= ratios <= ratio
        scores = 1.0 - ratios
    else:
        scores = torch.ones(m, device=distances.device)
    matches = torch.stack([rows[keep], index[keep, 0]], 1)
    return PairMatches(matches.cpu().numpy().astype(np.int64), scores[keep].float().cpu().numpy())


class NearestNeighbourMatcher:
    name = "nn"

    def __init__(self, config: MatcherConfig) -> None:
        self.config = config

    @torch.inference_mode()
    def match(self, query: Features, candidates: Sequence[Features]) -> list[PairMatches]:
        results = []
        for candidate in candidates:
            if query.is_binary != candidate.is_binary:
                raise ValueError("cannot match binary against float descriptors")
            if query.is_binary:
                distances = hamming_distances(query.descriptors, candidate.descriptors)
                max_distance = float(self.config.max_hamming)
            else:
                distances = l2_distances(query.descriptors, candidate.descriptors)
                max_distance = float("inf")
            results.append(mutual_nearest_neighbours(distances, self.config.ratio_test, max_distance))
        return results
