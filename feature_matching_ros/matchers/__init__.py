"""Matchers behind one batched interface: ``match(query, candidates) -> list[PairMatches]``."""

from __future__ import annotations

import torch

from feature_matching_ros.config import MatcherConfig
from feature_matching_ros.matchers.base import Matcher, PairMatches


def build_matcher(config: MatcherConfig, descriptor_type: str, device: str | torch.device = "cpu",
                  precision: str = "fp32") -> Matcher:
    if config.name == "lightglue":
        from feature_matching_ros.matchers.lightglue import LightGlueMatcher

        return LightGlueMatcher(descriptor_type, config, device, precision)
    from feature_matching_ros.matchers.nn import NearestNeighbourMatcher

    return NearestNeighbourMatcher(config)


__all__ = ["Matcher", "PairMatches", "build_matcher"]
