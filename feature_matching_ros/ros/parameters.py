"""The relocalization node's parameters: names, defaults, descriptions and constraints, without rclpy.

One table serves the node (which declares every entry with a ParameterDescriptor), the launch-file and
preset tests (which check that every name they use is declared), and the docs. Pipeline parameters
(``device``, ``precision``, ``features.*``, ``matcher.*``, ``pose.*``) mirror the core dataclasses in
:mod:`feature_matching_ros.config`: their defaults come from there and their validation is the core's
``PipelineConfig.from_dict`` (not repeated here); the descriptors only describe the allowed values.
Node parameters (queues, store size, ...) are validated by their descriptor ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from feature_matching_ros import config as core_config


@dataclass(frozen=True)
class ParameterSpec:
    """One ROS parameter. ``value_range`` (inclusive) applies to int/float node parameters."""

    name: str
    default: Any
    description: str
    read_only: bool = True
    allowed: str = ""  # human-readable constraint shown by `ros2 param describe`
    value_range: tuple[float, float] | None = None
    pipeline_key: tuple[str, ...] | None = None  # path in PipelineConfig.from_dict's dict, if a pipeline parameter


_PIPELINE_DESCRIPTIONS: dict[str, dict[str, tuple[str, str]]] = {
    "": {
        "device": ("Compute device for the networks (auto picks CUDA when available).",
                   ", ".join(core_config.DEVICES)),
        "precision": ("Network precision.", ", ".join(core_config.PRECISIONS)),
    },
    "features": {
        "detector": ("Keypoint detector.", ", ".join(core_config.DETECTORS)),
        "descriptor": ("Descriptor computed at the detector's keypoints (native = the detector's own).",
                       ", ".join(core_config.DESCRIPTORS)),
        "max_keypoints": ("Maximum keypoints per image.", "[1, 100000]"),
        "nms_radius": ("Minimum distance between ORB single-scale keypoints, pixels.", "[0, 64]"),
        "resize_max": ("Longest image side fed to the networks; 0 keeps the input size. Keypoints are "
                       "reported in the pixels of the received image.", "[0, 8192]"),
    },
    "matcher": {
        "name": ("Matcher.", ", ".join(core_config.MATCHERS)),
        "weights": ("LightGlue weights.", ", ".join(core_config.LIGHTGLUE_WEIGHTS)),
        "filter_threshold": ("LightGlue match confidence threshold.", "[0, 1]"),
        "depth_confidence": ("LightGlue early-exit confidence; -1 disables.", "-1 or [0, 1]"),
        "width_confidence": ("LightGlue point-pruning confidence (single pairs); -1 disables.", "-1 or [0, 1]"),
        "ratio_test": ("Nearest-neighbour ratio test; 1.0 disables.", "[0, 1]"),
        "max_hamming": ("Nearest-neighbour: maximum Hamming distance of binary matches, bits.", "[0, 256]"),
    },
    "pose": {
        "ransac_threshold_px": ("Essential matrix: Sampson error threshold, pixels.", "[0.01, 50]"),
        "pnp_threshold_px": ("PnP: reprojection error threshold, pixels.", "[0.01, 50]"),
        "confidence": ("RANSAC confidence.", "[0.5, 0.999999]"),
        "max_iterations": ("RANSAC iterations.", "[10, 1000000]"),
        "min_matches": ("Fewer matches than this: no pose.", "[5, 100000]"),
        "min_inliers": ("Fewer inliers than this: pose rejected.", "[5, 100000]"),
        "homography_ratio": ("Homography/essential inlier ratio above which a monocular pose is degenerate.",
                             "[0, 1]"),
        "min_depth": ("Depth below this is invalid, metres.", "[0, 1e6]"),
        "max_depth": ("Depth above this is invalid, metres.", "[min_depth, 1e9]"),
    },
}

_SECTION_CLASSES = {"features": core_config.FeatureConfig, "matcher": core_config.MatcherConfig,
                    "pose": core_config.PoseConfig}


def _pipeline_specs() -> list[ParameterSpec]:
    specs: list[ParameterSpec] = []
    top = core_config.PipelineConfig()
    for key in ("device", "precision"):
        description, allowed = _PIPELINE_DESCRIPTIONS[""][key]
        specs.append(ParameterSpec(key, getattr(top, key), description, allowed=allowed, pipeline_key=(key,)))
    for section, section_cls in _SECTION_CLASSES.items():
        defaults = section_cls()
        for field in fields(section_cls):
            description, allowed = _PIPELINE_DESCRIPTIONS[section].get(field.name, (field.name, ""))
            specs.append(ParameterSpec(f"{section}.{field.name}", getattr(defaults, field.name),
                                       description + " Validated by the core at startup; read only.",
                                       allowed=allowed, pipeline_key=(section, field.name)))
    return specs


NODE_PARAMETERS: list[ParameterSpec] = [
    ParameterSpec("map_frame", "map", "Frame of published poses when a keyframe names none.", read_only=True),
    ParameterSpec("keyframe_store_size", 200, "Keyframes kept (oldest evicted first); bounds memory.",
                  value_range=(1, 100_000)),
    ParameterSpec("keyframe_queue_size", 16, "Keyframes/candidate requests waiting for the matcher; when full "
                  "the oldest is dropped and counted.", value_range=(1, 10_000)),
    ParameterSpec("image_queue_size", 2, "Images waiting for relocalization; when full the oldest is dropped "
                  "and counted (never fall behind the camera).", value_range=(1, 1_000)),
    ParameterSpec("relocalize_on_image", True, "Relocalize every image from the image topic against the "
                  "keyframes (publishes relocalization_pose and matches).", read_only=False),
    ParameterSpec("relocalization_max_keyframes", 16, "Relocalization matches the image against at most this "
                  "many keyframes (newest first) until place recognition provides candidates.",
                  read_only=False, value_range=(1, 10_000)),
    ParameterSpec("relocalization_top_k", 3, "Keyframes with the most matches that get a geometric check.",
                  read_only=False, value_range=(1, 100)),
    ParameterSpec("match_batch_size", 8, "Candidates matched against a query in one batched matcher call.",
                  value_range=(1, 256)),
    ParameterSpec("publish_debug_image", True, "Publish debug/matches_image (only while someone subscribes).",
                  read_only=False),
    ParameterSpec("debug_image_max_width", 1280, "Debug image is shrunk to at most this width, pixels.",
                  read_only=False, value_range=(64, 8192)),
    ParameterSpec("depth_max_age_s", 0.05, "A depth image is used with an image when their stamps differ by "
                  "at most this, seconds.", read_only=False, value_range=(0.0, 10.0)),
    ParameterSpec("diagnostics_period_s", 1.0, "Period of /diagnostics, seconds.", value_range=(0.05, 60.0)),
    ParameterSpec("log_throttle_s", 5.0, "Repeated warnings of one kind are logged at most this often, "
                  "seconds (all are counted).", read_only=False, value_range=(0.0, 3600.0)),
]

PARAMETERS: list[ParameterSpec] = _pipeline_specs() + NODE_PARAMETERS
PARAMETER_NAMES: frozenset[str] = frozenset(spec.name for spec in PARAMETERS)


def pipeline_dict(values: dict[str, Any]) -> dict[str, Any]:
    """Nest flat parameter values (``features.detector`` ...) into the dict ``PipelineConfig.from_dict`` takes."""
    nested: dict[str, Any] = {}
    for spec in PARAMETERS:
        if spec.pipeline_key is None or spec.name not in values:
            continue
        if len(spec.pipeline_key) == 1:
            nested[spec.pipeline_key[0]] = values[spec.name]
        else:
            nested.setdefault(spec.pipeline_key[0], {})[spec.pipeline_key[1]] = values[spec.name]
    return nested


def flatten_parameter_file(data: dict[str, Any]) -> dict[str, Any]:
    """Flat parameter names -> values of one ``ros__parameters`` block of a ROS 2 parameter file."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            else:
                flat[name] = value

    walk("", data)
    return flat
