"""The relocalization node's parameters: names, defaults, descriptions and constraints, without rclpy.

One table serves the node (which declares every entry with a ParameterDescriptor), the launch-file and
parameter-file tests (which check that every name they use is declared), and docs/ROS.md.

Configuration = a preset + explicit overrides. ``preset`` names an entry of :mod:`feature_matching_ros.presets`
(THE single place that defines pipeline + engine values). Every key of the preset's nested dict can be
overridden by a parameter of the same path: ``pipeline.features.max_keypoints``, ``pipeline.device``,
``engine.min_inliers``, ``engine.retrieval.top_k`` ... The node declares each override parameter with the
value the selected preset resolves to (:func:`effective_values`), so ``ros2 param get`` / ``ros2 param dump`` /
GetParameters show the configuration actually in use; a value given in a parameter file or with ``-p``
replaces it. Their validation is the core's (``presets.build_configs``), whose errors name the key and the
allowed values. Node parameters (queues, map handling, ...) are validated by their descriptor ranges / choices.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

from feature_matching_ros import config as core_config

MAP_LOAD_FAILURE = ("empty_map", "stop")
IMAGE_QOS = ("sensor_data", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")
DISTORTED_IMAGES = ("undistort", "reject")


@dataclass(frozen=True)
class ParameterSpec:
    """One ROS parameter. ``default`` None: a preset override, declared with the preset's resolved value.
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
    "pipeline.pose.sampling": ", ".join(core_config.RANSAC_SAMPLING),
    "pipeline.features.detector": ", ".join(core_config.DETECTORS),
    "pipeline.features.descriptor": ", ".join(core_config.DESCRIPTORS),
    "pipeline.features.orb_backend": ", ".join(core_config.ORB_BACKENDS),
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
                name, None, f"The preset's {name}, unless set here (parameter file, -p). Validated by the core "
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
    ParameterSpec("keyframe_backlog_warn", 100, "Keyframes and candidate requests are never dropped: they wait "
                  "in an unbounded first-in first-out backlog (keyframes are map data). Above this many waiting, "
                  "diagnostics warn (the matcher is slower than the backend's keyframe rate).",
                  value_range=(1, 1_000_000)),
    ParameterSpec("describe_ahead", False, "While a keyframe verifies on the host (RANSAC, checks), describe the "
                  "next waiting keyframe (features, global descriptor) in a second thread; results are the same. "
                  "Off by default: measured on a backlog of keyframes, it drained no faster with a GPU "
                  "(0.84-1.01x) and slower on 2 CPU cores (0.57-0.77x), because both halves are mostly Python "
                  "work under one interpreter lock; it can pay where extraction is dominated by GPU kernels "
                  "rather than Python (benchmarks/keyframe_latency.py prints both rates)."),
    ParameterSpec("image_queue_size", 2, "Images waiting for relocalization; when full the oldest is dropped, "
                  "counted and logged (never fall behind the camera).", value_range=(1, 1_000)),
    ParameterSpec("image_qos", "sensor_data", "QoS of the image, camera_info and depth subscriptions: "
                  "sensor_data (best effort, ROS convention for sensor consumers; connects to best-effort and "
                  "reliable publishers) or reliable (only reliable publishers). Caveat: over best effort, large "
                  "images (640x480 and up) with default Fast DDS settings are often lost in fragments and never "
                  "arrive; with a reliable camera publisher choose reliable.", choices=IMAGE_QOS),
    ParameterSpec("image_transport", "raw", "How camera images arrive: raw (sensor_msgs/Image on image) or "
                  "compressed (sensor_msgs/CompressedImage, JPEG or PNG, on image/compressed: image_transport's "
                  "naming, what a camera driver's compressed republisher sends over a thin link). Depth is always "
                  "raw (compressedDepth is refused).", choices=IMAGE_TRANSPORTS),
    ParameterSpec("image_stall_warn_s", 3.0, "Warn (log, counter images.stalled, diagnostics) when camera_info "
                  "keeps arriving but no image has for this long, seconds (see image_qos); 0 disables.",
                  value_range=(0.0, 3600.0)),
    ParameterSpec("use_rectified_intrinsics", False, "Take the intrinsics from CameraInfo.p (the projection of a "
                  "rectified or undistorted topic such as image_rect) and ignore d; false: from k and d."),
    ParameterSpec("distorted_images", "undistort", "Images whose CameraInfo.d is non-zero (with "
                  "use_rectified_intrinsics false): undistort = undistort the image (and depth) with k and d "
                  "before matching (plumb_bob, rational_polynomial, equidistant), so keypoints, Matches pixels "
                  "and poses refer to the undistorted image with intrinsics k; reject = refuse them, counted as "
                  "rejected.distorted_image.", choices=DISTORTED_IMAGES),
    ParameterSpec("subscribe_depth", False, "Relocalize images from the image topic with the depth topic: paired "
                  "by time stamp (message_filters ApproximateTimeSynchronizer on a ROS install, slop "
                  "depth_max_age_s; otherwise the nearest depth within depth_max_age_s). False: no depth "
                  "subscription."),
    ParameterSpec("sync_queue_size", 10, "Messages per topic the time synchroniser keeps while waiting for a "
                  "matching set.", value_range=(1, 1_000)),
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
    ParameterSpec("depth_max_age_s", 0.05, "Image, camera_info and depth stamps may differ by at most this to be "
                  "used together, seconds (the time synchroniser's slop).", value_range=(0.0, 10.0)),
    ParameterSpec("diagnostics_period_s", 1.0, "Period of /diagnostics, seconds.", value_range=(0.05, 60.0)),
    ParameterSpec("diagnostics_window_s", 10.0, "Diagnostics levels reflect events of this recent window, seconds: "
                  "rejections -> WARN, processing errors or a failed map load -> ERROR; back to OK once the window "
                  "holds none (a map_path that failed at startup stays ERROR until a map loads).",
                  value_range=(0.1, 3600.0)),
    ParameterSpec("markers_period_s", 1.0, "Period of the rviz markers (visualization_msgs/MarkerArray on "
                  "'markers': keyframe positions and accepted loops; only while subscribed), seconds; 0 disables.",
                  value_range=(0.0, 3600.0)),
    ParameterSpec("log_throttle_s", 5.0, "Repeated warnings of one kind are logged at most this often, "
                  "seconds (all are counted).", read_only=False, value_range=(0.0, 3600.0)),
]

PARAMETERS: list[ParameterSpec] = NODE_PARAMETERS + _override_specs()
PARAMETER_NAMES: frozenset[str] = frozenset(spec.name for spec in PARAMETERS)
SPECS: dict[str, ParameterSpec] = {spec.name: spec for spec in PARAMETERS}


def effective_values(preset: str, override: dict[str, Any] | None = None) -> dict[str, Any]:
    """{override parameter name: value} of the configuration ``preset`` (+ nested ``override``) resolves to,
    every pipeline.* / engine.* parameter included, each cast to its declared type. Raises ConfigError."""
    from feature_matching_ros.presets import build_configs

    pipeline, engine = build_configs(preset, override)
    roots = {"pipeline": pipeline, "engine": engine}
    values: dict[str, Any] = {}
    for spec in PARAMETERS:
        if spec.override_key is None:
            continue
        value: Any = roots[spec.override_key[0]]
        for key in spec.override_key[1:]:
            value = value[key] if isinstance(value, dict) else getattr(value, key)
        values[spec.name] = spec.type(value)
    return values


def preset_override(values: dict[str, Any], preset_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nested override dict ({"pipeline": {...}, "engine": {...}}) from the override parameters that are set
    and, when ``preset_values`` (:func:`effective_values` of the preset) is given, differ from the preset."""
    nested: dict[str, Any] = {}
    for spec in PARAMETERS:
        if spec.override_key is None or values.get(spec.name) is None:
            continue
        if preset_values is not None and preset_values.get(spec.name) == values[spec.name]:
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
