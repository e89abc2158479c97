"""The relocalization node's parameters: names, defaults, descriptions and constraints, without rclpy.

One table serves the node (which declares every entry with a ParameterDescriptor), the launch-file and
parameter-file tests (which check that every name they use is declared), and docs/ROS.md.

Configuration = a preset + explicit overrides. ``preset`` names an entry of :mod:`feature_matching_ros.presets`
(THE single place that defines pipeline + engine values). Every key of the preset's nested dict can be
overridden by a parameter of the same path: ``pipeline.features.max_keypoints``, ``pipeline.device``,
``engine.min_inliers``, ``engine.retrieval.top_k`` ... Override parameters have no default: a parameter that
is not set leaves the preset's value alone, so a parameter file only lists what it changes. Their validation
is the core's (``presets.build_configs``), whose errors name the key and the allowed values. Node parameters
(queues, map handling, ...) are validated by their descriptor ranges / choices.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

from feature_matching_ros import config as core_config

MAP_LOAD_FAILURE = ("empty_map", "stop")


@dataclass(frozen=True)
class ParameterSpec:
    """One ROS parameter. ``default`` None: an override without default (declared by ``value_type`` only).
    ``value_range`` (inclusive) applies to int/float node parameters; ``choices`` to string node parameters."""

    name: str
    default: Any
    description: str
    read_only: bool = True
    allowed: str = ""  # human-readable constraint shown by `ros2 param describe`
    value_range: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    value_type: type | None = None  # bool | int | float | str; defaults to type(default)
    override_key: tuple[str, ...] | None = None  # path in the preset dict, for preset overrides

    @property
    def type(self) -> type:
        return self.value_type or type(self.default)


_ALLOWED: dict[str, str] = {
    "pipeline.device": ", ".join(core_config.DEVICES),
    "pipeline.precision": ", ".join(core_config.PRECISIONS),
    "pipeline.features.detector": ", ".join(core_config.DETECTORS),
    "pipeline.features.descriptor": ", ".join(core_config.DESCRIPTORS),
    "pipeline.matcher.name": ", ".join(core_config.MATCHERS),
    "pipeline.matcher.weights": "lightglue: default, official, agnostic; eloftr: default or a checkpoint path; "
                                "loftr: a checkpoint path",
    "pipeline.matcher.eloftr_mode": ", ".join(core_config.ELOFTR_MODES),
    "engine.global_descriptor": "auto, vlad, bow",
}
_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


def _override_specs() -> list[ParameterSpec]:
    """One override parameter per scalar field of PipelineConfig / EngineConfig (nested dataclasses recursed)."""
    from feature_matching_ros.engine.config import EngineConfig

    specs: list[ParameterSpec] = []

    def walk(prefix: tuple[str, ...], cls: type) -> None:
        for field in fields(cls):
            default = field.default if field.default is not MISSING else field.default_factory()  # type: ignore
            path = prefix + (field.name,)
            if is_dataclass(default):
                walk(path, type(default))
                continue
            value_type = _SCALARS.get(str(field.type).split("|")[0].strip(), type(default))
            name = ".".join(path)
            specs.append(ParameterSpec(
                name, None, f"Overrides the preset's {name} (unset: the preset's value). Validated by the core "
                f"at startup; read only.", allowed=_ALLOWED.get(name, value_type.__name__), value_type=value_type,
                override_key=path))

    walk(("pipeline",), core_config.PipelineConfig)
    walk(("engine",), EngineConfig)
    return specs


def _preset_names() -> tuple[str, ...]:
    from feature_matching_ros.presets import preset_names

    return preset_names()


NODE_PARAMETERS: list[ParameterSpec] = [
    ParameterSpec("preset", "orb_lightglue", "Pipeline + engine preset by name (feature_matching_ros/presets.py); "
                  "pipeline.* / engine.* parameters override single keys of it.", choices=_preset_names()),
    ParameterSpec("map_frame", "map", "Frame of published poses and loop closures when a keyframe names none."),
    ParameterSpec("map_path", "", "Map directory (written by the save_map service) loaded at startup; empty: "
                  "start with an empty map."),
    ParameterSpec("map_load_failure", "empty_map", "What a map_path that cannot be loaded (missing, corrupt, "
                  "other features) does: empty_map = log the error, count map.load_failed and run with an empty "
                  "map; stop = the node refuses to start.", choices=MAP_LOAD_FAILURE),
    ParameterSpec("max_keyframes", 100_000, "Keyframes kept in the map. When full, new keyframes are still "
                  "checked for loops but not inserted (counted as keyframes.not_inserted_map_full).",
                  value_range=(1, 10_000_000)),
    ParameterSpec("keyframe_queue_size", 16, "Keyframes/candidate requests waiting for the matcher; when full "
                  "the oldest is dropped and counted.", value_range=(1, 10_000)),
    ParameterSpec("image_queue_size", 2, "Images waiting for relocalization; when full the oldest is dropped "
                  "and counted (never fall behind the camera).", value_range=(1, 1_000)),
    ParameterSpec("relocalize_on_image", True, "Relocalize every image from the image topic against the map "
                  "(publishes relocalization_pose and matches).", read_only=False),
    ParameterSpec("publish_rejected", False, "Also publish rejected loop candidates (with their reason) on "
                  "loop_closures/rejected; they are always counted by reason in diagnostics.", read_only=False),
    ParameterSpec("publish_debug_image", True, "Publish debug/matches_image (only while someone subscribes).",
                  read_only=False),
    ParameterSpec("debug_image_keyframes", 200, "Keyframe images kept (newest, downscaled to "
                  "debug_image_max_width / 2) to draw debug images of loops; 0 keeps none. The map itself "
                  "stores features, not images.", value_range=(0, 100_000)),
    ParameterSpec("debug_image_max_width", 1280, "Debug image is shrunk to at most this width, pixels.",
                  value_range=(64, 8192)),
    ParameterSpec("depth_max_age_s", 0.05, "A depth image is used with an image when their stamps differ by "
                  "at most this, seconds.", read_only=False, value_range=(0.0, 10.0)),
    ParameterSpec("diagnostics_period_s", 1.0, "Period of /diagnostics, seconds.", value_range=(0.05, 60.0)),
    ParameterSpec("log_throttle_s", 5.0, "Repeated warnings of one kind are logged at most this often, "
                  "seconds (all are counted).", read_only=False, value_range=(0.0, 3600.0)),
]

PARAMETERS: list[ParameterSpec] = NODE_PARAMETERS + _override_specs()
PARAMETER_NAMES: frozenset[str] = frozenset(spec.name for spec in PARAMETERS)
SPECS: dict[str, ParameterSpec] = {spec.name: spec for spec in PARAMETERS}


def preset_override(values: dict[str, Any]) -> dict[str, Any]:
    """Nested override dict ({"pipeline": {...}, "engine": {...}}) from the override parameters that are set."""
    nested: dict[str, Any] = {}
    for spec in PARAMETERS:
        if spec.override_key is None or values.get(spec.name) is None:
            continue
        node = nested
        for key in spec.override_key[:-1]:
            node = node.setdefault(key, {})
        node[spec.override_key[-1]] = values[spec.name]
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


def markdown_table() -> str:
    """The parameter table of docs/ROS.md."""
    rows = ["| parameter | type | default | allowed | description |", "|---|---|---|---|---|"]
    for spec in PARAMETERS:
        default = "(preset)" if spec.default is None else repr(spec.default)
        allowed = ", ".join(spec.choices) if spec.choices else (
            f"[{spec.value_range[0]}, {spec.value_range[1]}]" if spec.value_range else spec.allowed)
        rows.append(f"| `{spec.name}` | {spec.type.__name__} | {default} | {allowed} | {spec.description} |")
    return "\n".join(rows)
