"""Named presets: ONE place that defines pipeline + engine configurations by name.

``fmr evaluate --config NAME``, the benchmarks and the ROS node's parameter files (config/*.yaml) all
resolve a name here, so a preset means the same thing everywhere. Each preset is a nested dict with
two sections: ``pipeline`` (for :meth:`PipelineConfig.from_dict`) and ``engine`` (for
:meth:`feature_matching_ros.engine.EngineConfig.from_dict`); a YAML file may override any key.

  orb_lightglue     ORB single-scale + ALIKED descriptors at ORB points + LightGlue; VLAD(ALIKED) retrieval.
  aliked_lightglue  ALIKED keypoints and descriptors + LightGlue; VLAD(ALIKED) retrieval.
  cpu               for a robot without a GPU: ORB single-scale at 512 keypoints described by XFeat (its backbone
                    sampled at ORB's points) + XFeat's LighterGlue; VLAD(XFeat) retrieval, images <= 640 px,
                    3 candidates. 2x ORB bag-of-words per keyframe on 2 cores (keyframe_latency_cpu.md).
  xfeat_lightglue   XFeat keypoints and descriptors (a network built for CPUs) + its LighterGlue; VLAD(XFeat)
                    retrieval, 3 candidates, images <= 640 px: XFeat's own keypoints, 1024 of them.
  eloftr            detector-free: Efficient LoFTR verifies retrieved keyframes on their stored images (semi-dense
                    matches); retrieval as orb_lightglue. Keyframes keep their pixels (~0.9 MB per VGA keyframe).
  orb_bow_nn        baseline, the ORB-SLAM way: ORB + bag of binary words + Hamming mutual NN with ratio test.
"""

from __future__ import annotations

import copy
from typing import Any

_VLAD_ENGINE = {"global_descriptor": "vlad", "codebook": "default",
                "retrieval": {"top_k": 5, "exclude_recent_seconds": 10.0, "exclude_recent_count": 20}}

PRESETS: dict[str, dict[str, Any]] = {
    "orb_lightglue": {
        "pipeline": {"features": {"detector": "orb", "descriptor": "aliked", "max_keypoints": 1024},
                     "matcher": {"name": "lightglue", "depth_confidence": 0.95, "width_confidence": -1}},
        "engine": _VLAD_ENGINE,
    },
    "aliked_lightglue": {
        "pipeline": {"features": {"detector": "aliked", "descriptor": "aliked", "max_keypoints": 1024},
                     "matcher": {"name": "lightglue", "depth_confidence": 0.95, "width_confidence": -1}},
        "engine": _VLAD_ENGINE,
    },
    # On a CPU the descriptor network and the matcher are the whole cost: XFeat's backbone (built for CPUs) and its
    # 6-layer, 96-d LighterGlue instead of ALIKED's and LightGlue's 9 layers of 256-d, at ORB's single-scale points.
    "cpu": {
        "pipeline": {"features": {"detector": "orb", "descriptor": "xfeat", "max_keypoints": 512,
                                  "resize_max": 640},
                     "matcher": {"name": "lightglue", "depth_confidence": 0.95, "width_confidence": 0.99},
                     "device": "cpu"},
        "engine": _VLAD_ENGINE | {"retrieval": {"top_k": 3, "exclude_recent_seconds": 10.0,
                                                "exclude_recent_count": 20}},
    },
    "xfeat_lightglue": {
        "pipeline": {"features": {"detector": "xfeat", "descriptor": "native", "max_keypoints": 1024,
                                  "resize_max": 640},
                     "matcher": {"name": "lightglue", "depth_confidence": 0.95, "width_confidence": 0.99}},
        "engine": _VLAD_ENGINE | {"retrieval": {"top_k": 3, "exclude_recent_seconds": 10.0,
                                                "exclude_recent_count": 20}},
    },
    "eloftr": {
        "pipeline": {"features": {"detector": "orb", "descriptor": "aliked", "max_keypoints": 1024,
                                  "resize_max": 640},
                     "matcher": {"name": "eloftr", "weights": "default", "eloftr_mode": "full",
                                 "coarse_threshold": 0.2}},
        # Semi-dense matches are many and correlated: capacity is the coarse-cell count (4800 for VGA), 2 % of it.
        "engine": _VLAD_ENGINE | {"min_inlier_fraction": 0.02},
    },
    "orb_bow_nn": {
        "pipeline": {"features": {"detector": "orb", "descriptor": "native", "max_keypoints": 1024},
                     "matcher": {"name": "nn", "ratio_test": 0.8, "max_hamming": 64}},
        "engine": {"global_descriptor": "bow", "codebook": "default",
                   "retrieval": {"top_k": 5, "exclude_recent_seconds": 10.0, "exclude_recent_count": 20}},
    },
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of the named preset's nested dict ({"pipeline": ..., "engine": ...})."""
    if name not in PRESETS:
        from feature_matching_ros.config import ConfigError

        raise ConfigError(f"preset={name!r} is not valid; allowed values: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (override wins) for YAML / CLI overrides on top of a preset."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_configs(name: str, override: dict[str, Any] | None = None):
    """(PipelineConfig, EngineConfig) for a preset name, with optional nested overrides."""
    from feature_matching_ros.config import PipelineConfig
    from feature_matching_ros.engine.config import EngineConfig

    preset = merge(get_preset(name), override or {})
    unknown = set(preset) - {"pipeline", "engine"}
    if unknown:
        from feature_matching_ros.config import ConfigError

        raise ConfigError(f"unknown preset sections {sorted(unknown)}; allowed: pipeline, engine")
    return PipelineConfig.from_dict(preset["pipeline"]), EngineConfig.from_dict(preset["engine"])
