"""relocalization_node: keyframes in, loop closures / matches / relocalization poses out (the engine in ROS).

Topics (relative names, remap or namespace them):
  in   keyframes (feature_matching_ros/Keyframe, reliable)   -> engine.process_keyframe: retrieval, batched
                                                                verification, acceptance; the keyframe joins the map.
                                                                A keyframe id the map already holds, re-sent with a
                                                                pose, updates that keyframe's pose (engine.update_poses:
                                                                the backend's optimised poses feed the odometry gate
                                                                and relocalization); without a pose it is rejected.
                                                                Its map_points (a monocular backend's sparse 3D)
                                                                make monocular loops Sim3s (LoopClosure.scale); a
                                                                cloud that cannot be used is rejected on its own
                                                                (rejected.map_points_*) and the keyframe goes on.
       loop_candidates (feature_matching_ros/LoopCandidates) -> engine.verify_candidates: verify keyframes the
                                                                backend names (no retrieval, same acceptance rules).
       image, camera_info (+ depth with subscribe_depth)     -> engine.relocalize (if relocalize_on_image); QoS
                                                                image_qos, time-synchronised (image_inputs.py);
                                                                image/compressed instead of image with
                                                                image_transport:=compressed (JPEG or PNG)
  out  loop_closures (LoopClosure, accepted only), loop_closures/rejected (LoopClosure, if publish_rejected),
       matches (Matches: accepted loops and relocalizations), relocalization_pose (PoseWithCovarianceStamped,
       ROS covariance convention), markers (visualization_msgs/MarkerArray: keyframes and accepted loops),
       debug/matches_image (sensor_msgs/Image, only while subscribed), /diagnostics (DiagnosticArray)
Services: match_images (MatchImages), relocalize (Relocalize), save_map (SaveMap), load_map (LoadMap): the map
is the engine's keyframe database, a directory (retrieval/persistence.py). ``map_path`` loads one at startup.
SaveMap never removes or overwrites anything it did not write. The handlers live in services.py.

Configuration: ``preset`` (presets.py) + ``pipeline.*`` / ``engine.*`` parameters, each declared with the
value the preset resolves to, so every parameter shows the configuration in use (parameters.py). Invalid
parameters stop the node at startup with the name and the allowed values.

Threading: subscription callbacks only convert and validate (cheap) and push work into the work queue
(work_queue.py): keyframes and candidate requests wait in an unbounded FIFO backlog and are never dropped;
images are bounded, newest wins, the dropped ones counted and logged. One worker thread runs the engine; with
describe_ahead, the next waiting keyframe is described (features, global descriptor; engine/describe_ahead.py)
in a second thread while the current one verifies on the host.
Services run on their own callback group and share the engine with the worker through a lock.

Bad input (unsupported encoding, undecodable compressed image, step mismatch, empty image, missing/invalid camera info, distortion it cannot
or may not undo, NaN pose, bad depth, core ImageError, unknown keyframe ids) is rejected, counted by kind
(:meth:`counters`, diagnostics) and logged (throttled per kind). Unusable map points are rejected the same way
under their reason code (``rejected.map_points_*``) while their keyframe is processed without them. Loop verdicts and relocalization failures
are counted by stable reason codes (reason_codes.py); the full reason with its values goes to the log and to
LoopClosure.reason. Diagnostics levels describe the recent window (diagnostics.py).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from feature_matching_ros.config import ConfigError
from feature_matching_ros.image import ImageError
from feature_matching_ros.msg import Keyframe, LoopCandidates, LoopClosure, Matches
from feature_matching_ros.engine import LoopClosure as LoopRecord
from feature_matching_ros.engine import Relocalization
from feature_matching_ros.engine.describe_ahead import DescribeAhead
from feature_matching_ros.retrieval.global_descriptors import CodebookError
from feature_matching_ros.retrieval.persistence import MapFormatError
from feature_matching_ros.ros import conversions as conv
from feature_matching_ros.ros import messages
from feature_matching_ros.ros.camera_model import CameraModel, Undistorter, camera_model
from feature_matching_ros.ros.diagnostics import HealthMonitor, diagnostic_array
from feature_matching_ros.ros.image_inputs import ImageInputs
from feature_matching_ros.ros.markers import map_markers
from feature_matching_ros.ros.parameters import (NODE_PARAMETERS, PARAMETERS, ParameterSpec, effective_values,
                                                 preset_override)
from feature_matching_ros.ros.reason_codes import reason_code
from feature_matching_ros.ros.services import NodeServices
from feature_matching_ros.ros.work_queue import Job, WorkQueue
from feature_matching_ros.srv import LoadMap, MatchImages, Relocalize, SaveMap

NODE_NAME = "relocalization_node"
LATENCY_WINDOW = 512  # samples per stage kept for the percentiles in diagnostics
ACCEPTED_LOOPS_SHOWN = 10_000  # accepted loops remembered for the rviz markers
_PARAMETER_TYPES = {bool: Parameter.Type.BOOL, int: Parameter.Type.INTEGER, float: Parameter.Type.DOUBLE,
                    str: Parameter.Type.STRING}
# Counter keys whose recent occurrences set diagnostics levels (diagnostics.py).
_HEALTH_EVENTS = ("rejected.", "dropped.", "errors", "map.save_", "images.stalled")


class ParameterError(RuntimeError):
    """A parameter is invalid; the message names it and the allowed values. The node does not start."""


@dataclass
class _Frame:
    """A converted camera frame (keyframe, raw image or service request), undistorted when it needed it."""

    keyframe_id: int
    stamp_ns: int
    camera_frame: str
    map_frame: str
    image: np.ndarray
    K: np.ndarray
    depth: np.ndarray | None = None
    T_map_camera: np.ndarray | None = None
    undistorted: bool = False  # the image was distorted and has been undistorted to the pinhole K
    # The backend's map points of a keyframe: ((P, 2) pixels, (P, 3) camera-frame points, backend units).
    map_points: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        arrays = [self.image, self.depth, *(self.map_points or ())]
        return sum(array.nbytes for array in arrays if array is not None)


def _describe_key(frame: _Frame) -> tuple[int, int]:
    return frame.keyframe_id, frame.stamp_ns


def _describe_arguments(frame: _Frame) -> dict[str, Any]:
    """engine.describe's arguments for a keyframe."""
    return dict(image=frame.image, K=frame.K, stamp_ns=frame.stamp_ns, keyframe_id=frame.keyframe_id,
                T_map_camera=frame.T_map_camera, depth=frame.depth, map_points=frame.map_points)


class _LatencyStats:
    """Per-stage latency samples (ms) in bounded windows; percentiles for diagnostics."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, milliseconds: float) -> None:
        with self._lock:
            self._samples.setdefault(stage, deque(maxlen=LATENCY_WINDOW)).append(float(milliseconds))

    def add_all(self, timing_ms: dict[str, float]) -> None:
        for stage, milliseconds in timing_ms.items():
            self.add(stage, milliseconds)

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            snapshot = {stage: np.array(values) for stage, values in self._samples.items() if values}
        return {stage: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                        "max": float(v.max()), "n": float(len(v))} for stage, v in snapshot.items()}


class RelocalizationNode(NodeServices, Node):
    """Thin shell: messages -> numpy -> LoopClosureEngine -> messages."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self._counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._last_log: dict[str, float] = {}
        self._latency = _LatencyStats()
        self._worker: threading.Thread | None = None
        try:
            values, override = self._declare_parameters()
            self.health = HealthMonitor(values["diagnostics_window_s"])
            self.engine = self._build_engine(values["preset"], override)
            self._load_startup_map(values)
        except ParameterError:
            super().destroy_node()  # release the rcl node: the caller never gets this object
            raise
        self.preset: str = values["preset"]
        self.map_frame: str = values["map_frame"]
        self._max_keyframes: int = values["max_keyframes"]
        self._backlog_warn: int = values["keyframe_backlog_warn"]
        self._use_rectified: bool = values["use_rectified_intrinsics"]
        self._distorted_images: str = values["distorted_images"]
        self._stall_s: float = values["image_stall_warn_s"]
        self._undistorter = Undistorter()
        self._undistort_lock = threading.Lock()
        self._engine_lock = threading.Lock()
        self._queue = WorkQueue(values["image_queue_size"])
        self._describe_ahead = DescribeAhead(self.engine)
        self._describe_ahead_on: bool = values["describe_ahead"]
        # Camera frame per keyframe id (Matches.frame_id1), a bounded cache of downscaled keyframe images for
        # debug images (the map stores features, not images) and the accepted loops for the rviz markers.
        self._camera_frames: OrderedDict[int, str] = OrderedDict()
        self._debug_images: OrderedDict[int, tuple[np.ndarray, float]] = OrderedDict()
        self._debug_image_keyframes: int = values["debug_image_keyframes"]
        self._accepted_loops: deque[tuple[int, int]] = deque(maxlen=ACCEPTED_LOOPS_SHOWN)
        self._stalled = False

        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        # Map work: KEEP_ALL so DDS holds what the callback has not taken yet (never dropped at the reader).
        map_inputs = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
        self.loop_closure_pub = self.create_publisher(LoopClosure, "loop_closures", reliable)
        self.rejected_pub = self.create_publisher(LoopClosure, "loop_closures/rejected", reliable)
        self.matches_pub = self.create_publisher(Matches, "matches", reliable)
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, "relocalization_pose", reliable)
        self.markers_pub = self.create_publisher(MarkerArray, "markers", QoSProfile(depth=1))
        self.debug_image_pub = self.create_publisher(Image, "debug/matches_image", QoSProfile(depth=1))
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))

        self.create_subscription(Keyframe, "keyframes", self._on_keyframe, map_inputs)
        self.create_subscription(LoopCandidates, "loop_candidates", self._on_candidates, map_inputs)
        self.camera = ImageInputs(self, self._on_camera_set, values["image_qos"], values["subscribe_depth"],
                                  values["depth_max_age_s"], values["sync_queue_size"], self._count,
                                  callback_group=MutuallyExclusiveCallbackGroup(),
                                  image_transport=values["image_transport"])

        services = MutuallyExclusiveCallbackGroup()
        self.create_service(MatchImages, "match_images", self._on_match_images, callback_group=services)
        self.create_service(Relocalize, "relocalize", self._on_relocalize, callback_group=services)
        self.create_service(SaveMap, "save_map", self._on_save_map, callback_group=services)
        self.create_service(LoadMap, "load_map", self._on_load_map, callback_group=services)

        self.create_timer(values["diagnostics_period_s"], self._publish_diagnostics)
        if values["markers_period_s"] > 0:
            self.create_timer(values["markers_period_s"], self._publish_markers)
        self._worker = threading.Thread(target=self._work, name="relocalization_worker", daemon=True)
        self._worker.start()
        pipeline = self.engine.pipeline.config
        self.get_logger().info(
            f"ready: preset {self.preset} ({pipeline.features.detector}+{pipeline.features.descriptor} / "
            f"{pipeline.matcher.name}, {pipeline.features.max_keypoints} keypoints, {self.engine.database.kind} "
            f"retrieval top {self.engine.config.retrieval.top_k}) on {self.engine.pipeline.device}; "
            f"map: {len(self.engine.database)} keyframes; camera sync: {self.camera.synchroniser}")

    # ------------------------------------------------------------------ parameters and startup
    def _declare(self, spec: ParameterSpec, default: Any) -> Any:
        try:
            value = self.declare_parameter(spec.name, default, self._descriptor(spec)).value
        except Exception as error:  # rclpy raises several types (range, type mismatch, read-only)
            raise ParameterError(f"invalid parameter {spec.name!r}: {error}; allowed: "
                                 f"{self._allowed_text(spec)} ({spec.type.__name__})") from error
        if spec.choices and value not in spec.choices:
            raise ParameterError(f"invalid parameter {spec.name!r}: {value!r}; allowed values: "
                                 f"{', '.join(spec.choices)}")
        return value

    def _declare_parameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Node parameters, then every pipeline.* / engine.* parameter with the value the preset resolves to
        (a parameter file or -p replaces it). Returns (all values, nested override of the preset)."""
        values = {spec.name: self._declare(spec, spec.default) for spec in NODE_PARAMETERS}
        try:
            preset_values = effective_values(values["preset"])
        except (ConfigError, CodebookError) as error:
            raise ParameterError(f"invalid parameter 'preset' ({values['preset']!r}): {error}") from error
        for spec in PARAMETERS:
            if spec.override_key is not None:
                values[spec.name] = self._declare(spec, preset_values[spec.name])
        return values, preset_override(values, preset_values)

    @staticmethod
    def _allowed_text(spec: ParameterSpec) -> str:
        if spec.choices:
            return ", ".join(spec.choices)
        if spec.value_range:
            return f"[{spec.value_range[0]}, {spec.value_range[1]}]"
        return spec.allowed or spec.type.__name__

    @staticmethod
    def _descriptor(spec: ParameterSpec) -> ParameterDescriptor:
        descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only,
                                         type=_PARAMETER_TYPES[spec.type].value,
                                         additional_constraints=RelocalizationNode._allowed_text(spec))
        if spec.value_range is not None:
            low, high = spec.value_range
            if spec.type is int:
                descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=0)]
            else:
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high),
                                                                      step=0.0)]
        return descriptor

    @staticmethod
    def _build_engine(preset: str, override: dict[str, Any]):
        from feature_matching_ros.engine import build_engine

        try:
            return build_engine(preset, override)
        except (ConfigError, CodebookError, TypeError) as error:
            raise ParameterError(f"invalid parameter (preset {preset!r} with overrides {override}): "
                                 f"{error}") from error

    def _load_startup_map(self, values: dict[str, Any]) -> None:
        path = values["map_path"]
        if not path:
            return
        try:
            manifest = self.engine.load_map(path)
        except (MapFormatError, OSError, ValueError, KeyError) as error:
            message = f"cannot load map_path {path!r}: {type(error).__name__}: {error}"
            if values["map_load_failure"] == "stop":
                raise ParameterError(f"{message} (map_load_failure=stop)") from error
            self._count("map.load_failed")
            self.health.startup_map_failed(message)
            self.get_logger().error(f"{message}; running with an EMPTY map (map_load_failure=empty_map)")
            return
        self._count("map.loaded")
        self.get_logger().info(f"loaded {len(self.engine.database)} keyframes from {path} "
                               f"(format {manifest.get('format_version')})")

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    # ------------------------------------------------------------------ counters and logging
    def _count(self, key: str, amount: int = 1) -> None:
        with self._counter_lock:
            self._counters[key] += amount
        if key.startswith(_HEALTH_EVENTS):
            self.health.event(key)

    def counters(self) -> dict[str, int]:
        """Snapshot of every counter (received, processed, dropped, rejected.<kind>, ...)."""
        with self._counter_lock:
            return dict(self._counters)

    def latency_summary(self) -> dict[str, dict[str, float]]:
        return self._latency.summary()

    def _reject(self, kind: str, message: str) -> None:
        self._count(f"rejected.{kind}")
        self._warn(kind, f"rejected ({kind}, {self.counters().get(f'rejected.{kind}', 0)} so far): {message}")

    def _warn(self, kind: str, message: str) -> None:
        """A warning logged at most every log_throttle_s per kind (the caller counts it)."""
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= self._param("log_throttle_s"):
            self._last_log[kind] = now
            self.get_logger().warning(message)

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            job = self._queue.next()
            if job is None:
                return
            self._latency.add("queue_wait", (time.monotonic() - job.received) * 1e3)
            try:
                if job.kind == "image":
                    self._process_image(job.payload)
                elif job.kind == "keyframe":
                    self._process_keyframe(job.payload)
                else:
                    self._process_candidates(job.payload)
            except ImageError as error:
                self._reject("image_error", str(error))
            except Exception as error:  # a bug or a backend failure must not kill the worker
                self._count("errors")
                self.get_logger().error(f"processing failed: {type(error).__name__}: {error}")
            self._latency.add("total", (time.monotonic() - job.received) * 1e3)

    def stop(self) -> None:
        """Stop and join the worker thread (call before destroy_node / rclpy.shutdown)."""
        if self._worker is None:
            return
        self._queue.stop()
        if self._worker.is_alive():
            self._worker.join(timeout=30.0)
        self._describe_ahead.close()

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()

    def _push_map_work(self, job: Job) -> None:
        backlog = self._queue.push_map(job)
        if backlog > self._backlog_warn:
            self._warn("keyframe_backlog", f"{backlog} keyframes/candidate requests waiting (> keyframe_backlog_warn="
                       f"{self._backlog_warn}): the matcher is slower than the keyframe rate; none are dropped")

    # ------------------------------------------------------------------ conversions shared by topics and services
    def _camera(self, info: CameraInfo, image: np.ndarray) -> CameraModel:
        model = camera_model(info, image.shape, self._use_rectified)
        if model.distortion is not None and self._distorted_images == "reject":
            raise conv.ConversionError(
                "distorted_image", f"camera info d={list(model.distortion.coefficients)} "
                f"({model.distortion.model}) is non-zero: the image is distorted (distorted_images=reject; set "
                "distorted_images:=undistort, or use_rectified_intrinsics:=true with a rectified topic)")
        return model

    def _undistort(self, image: np.ndarray, model: CameraModel, nearest: bool = False) -> np.ndarray:
        if model.distortion is None:
            return image
        with self._undistort_lock:
            return self._undistorter.undistort(image, model, nearest)

    def _frame(self, keyframe_id: int, header: Header, image_msg: Image, info: CameraInfo,
               depth_msg: Image | None, map_frame: str) -> _Frame:
        """Convert, validate and undistort; raises conv.ConversionError (kind + message). Arrays are copies."""
        start = time.perf_counter()
        image = conv.camera_image_to_numpy(image_msg)
        model = self._camera(info, image)
        depth = None
        if depth_msg is not None:
            try:
                depth = conv.depth_to_metres(depth_msg)
            except conv.ConversionError as error:
                raise conv.ConversionError("bad_depth", str(error)) from error
            if depth is not None and depth.shape != image.shape[:2]:
                raise conv.ConversionError("bad_depth", f"depth {depth.shape[1]}x{depth.shape[0]} does not match "
                                           f"the image {image.shape[1]}x{image.shape[0]}")
            depth = None if depth is None else self._undistort(np.array(depth), model, nearest=True)
        if model.distortion is not None:
            image = self._undistort(image, model)
            self._count("images.undistorted")
        self._latency.add("convert", (time.perf_counter() - start) * 1e3)
        return _Frame(int(keyframe_id), header.stamp.sec * 1_000_000_000 + header.stamp.nanosec,
                      image_msg.header.frame_id or header.frame_id, map_frame or self.map_frame, image, model.K, depth,
                      undistorted=model.distortion is not None)

    # ------------------------------------------------------------------ keyframes and loop closures
    def _on_keyframe(self, msg: Keyframe) -> None:
        self._count("keyframes_received")
        try:
            frame = self._frame(msg.id, msg.header, msg.image, msg.camera_info, msg.depth, msg.header.frame_id)
            covariance = conv.covariance_6x6(msg.pose.covariance)
            if covariance[0, 0] != -1.0:  # -1 marks an unknown pose (sensor_msgs convention)
                frame.T_map_camera = conv.pose_to_matrix(msg.pose.pose, "keyframe pose")
        except conv.ConversionError as error:
            self._reject(error.kind, f"keyframe {msg.id}: {error}")
            return
        frame.map_points = self._map_points(msg, frame)
        self._push_map_work(Job("keyframe", frame, time.monotonic(), frame.nbytes))

    def _map_points(self, msg: Keyframe, frame: _Frame) -> tuple[np.ndarray, np.ndarray] | None:
        """The keyframe's backend map points, or None: absent, or rejected (counted by reason code and logged; the
        keyframe is still processed, as a monocular keyframe without them)."""
        height, width = frame.image.shape[:2]
        try:
            converted = conv.cloud_to_map_points(msg.map_points, width, height, drop_outside=frame.undistorted)
        except conv.ConversionError as error:
            self._reject(error.kind, f"keyframe {msg.id}: map points ignored, the keyframe is processed without "
                         f"them: {error}")
            return None
        if converted is None:
            return None
        pixels, points, outside = converted
        if outside:
            self._count("map_points.outside_undistorted_image", outside)
        self._count("keyframes.with_map_points")
        return pixels, points

    def _in_map(self, keyframe_id: int) -> bool:
        try:
            self.engine.database.position_of(keyframe_id)
            return True
        except KeyError:
            return False

    def _process_keyframe(self, frame: _Frame) -> None:
        with self._engine_lock:
            if self._in_map(frame.keyframe_id):
                if frame.T_map_camera is None:
                    self._reject("duplicate_keyframe", f"keyframe {frame.keyframe_id} is already in the map and "
                                 "was re-sent without a pose (a re-sent keyframe only updates its pose)")
                    return
                self.engine.update_poses({frame.keyframe_id: frame.T_map_camera})
                self._count("keyframes.pose_updates")
                return
        described = self._describe_ahead.take(_describe_key(frame))
        if described is None:
            described = self.engine.describe(**_describe_arguments(frame))
        else:
            self._count("keyframes.described_ahead")
        with self._engine_lock:
            insert = len(self.engine.database) < self._max_keyframes
            result = self.engine.process_keyframe(frame.image, frame.K, frame.stamp_ns, keyframe_id=frame.keyframe_id,
                                                  T_map_camera=frame.T_map_camera, depth=frame.depth, insert=insert,
                                                  map_points=frame.map_points, described=described,
                                                  after_matching=self._describe_next_keyframe)
        self._latency.add_all({f"keyframe.{k}": v for k, v in result.timing_ms.items()})
        self._count("keyframes_processed")
        if insert:
            self._count("keyframes_stored")
            self._remember_keyframe(frame)
        else:
            self._count("keyframes.not_inserted_map_full")
            self._warn("map_full", f"map holds max_keyframes={self._max_keyframes}: keyframe {frame.keyframe_id} "
                       "was checked for loops but not inserted")
        self._publish_loops(result.candidates, frame)

    def _describe_next_keyframe(self) -> None:
        """Start describing the next waiting keyframe while this one verifies (DescribeAhead): called by the engine
        once the current keyframe's candidates are matched and the networks are free."""
        waiting = self._queue.peek_map() if self._describe_ahead_on else None
        if waiting is not None and waiting.kind == "keyframe":
            self._describe_ahead.start(_describe_key(waiting.payload), **_describe_arguments(waiting.payload))

    def _remember_keyframe(self, frame: _Frame) -> None:
        self._camera_frames[frame.keyframe_id] = frame.camera_frame
        while len(self._camera_frames) > 100_000:
            self._camera_frames.popitem(last=False)
        if self._debug_image_keyframes and self._param("publish_debug_image"):
            self._debug_images[frame.keyframe_id] = self._thumbnail(frame.image)
            while len(self._debug_images) > self._debug_image_keyframes:
                self._debug_images.popitem(last=False)

    def _thumbnail(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """(image shrunk to at most half the debug image width, scale factor)."""
        scale = min(1.0, self._param("debug_image_max_width") / 2 / image.shape[1])
        if scale < 1.0:
            import cv2

            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return image, scale

    def _on_candidates(self, msg: LoopCandidates) -> None:
        self._count("candidate_requests_received")
        self._push_map_work(Job("candidates", (int(msg.query_id), [int(i) for i in msg.candidate_ids]),
                                time.monotonic()))

    def _process_candidates(self, request: tuple[int, list[int]]) -> None:
        query_id, candidate_ids = request
        with self._engine_lock:
            if not self._in_map(query_id):
                self._reject("unknown_keyframe", f"loop candidates for keyframe {query_id}, which is not in the map")
                return
            known = []
            for candidate_id in candidate_ids:
                if candidate_id == query_id or not self._in_map(candidate_id):
                    self._reject("unknown_keyframe", f"candidate {candidate_id} of keyframe {query_id} is not in "
                                 "the map (or is the query itself)")
                else:
                    known.append(candidate_id)
            if not known:
                return
            result = self.engine.verify_candidates(query_id, known)
        self._latency.add_all({f"candidates.{k}": v for k, v in result.timing_ms.items()})
        self._publish_loops(result.candidates, None)

    def _publish_loops(self, loops: list[LoopRecord], query: _Frame | None) -> None:
        """Accepted loops -> loop_closures + matches + debug image; rejected ones are counted by reason code,
        logged at debug level with the full reason and, with publish_rejected, published on
        loop_closures/rejected."""
        publish_rejected = self._param("publish_rejected")
        map_frame = query.map_frame if query is not None else self.map_frame
        for loop in loops:
            if not loop.accepted:
                self._count(f"loop_closures.rejected.{reason_code(loop.reason).value}")
                self.get_logger().debug(f"loop {loop.query_id}->{loop.match_id} rejected: {loop.reason}")
                if publish_rejected:
                    self.rejected_pub.publish(messages.loop_msg(loop, map_frame, self.get_clock().now().to_msg()))
                continue
            self._count("loop_closures.accepted")
            self._accepted_loops.append((int(loop.query_id), int(loop.match_id)))
            msg = messages.loop_msg(loop, map_frame, self.get_clock().now().to_msg())
            self.loop_closure_pub.publish(msg)
            header = Header(stamp=msg.query_stamp, frame_id=self._camera_frames.get(loop.query_id, ""))
            self.matches_pub.publish(messages.matches_msg(loop, header, header.frame_id,
                                                          self._camera_frames.get(loop.match_id, "")))
            self._publish_debug_image(query.image if query is not None else self._debug_images.get(loop.query_id),
                                      loop, header)

    # ------------------------------------------------------------------ camera images -> relocalization
    def _on_camera_set(self, image: Image, info: CameraInfo | None, depth: Image | None) -> None:
        received = time.monotonic()
        self._count("images_received")
        if not self._param("relocalize_on_image"):
            return
        if info is None:
            self._reject("missing_camera_info", "image received before any camera_info")
            return
        try:
            frame = self._frame(0, image.header, image, info, depth, "")
        except conv.ConversionError as error:
            self._reject(error.kind, str(error))
            return
        dropped = self._queue.push_image(Job("image", frame, received, frame.nbytes))
        if dropped:
            self._count("dropped.images", dropped)
            self._warn("dropped_images", f"dropped {self.counters().get('dropped.images', 0)} camera images so far: "
                       f"the matcher is slower than the camera (image_queue_size={self._queue.image_capacity}, "
                       "newest wins)")

    def _process_image(self, frame: _Frame) -> None:
        result = self._relocalize(frame)
        self._count("images_processed")
        header = Header(stamp=messages.stamp(frame.stamp_ns), frame_id=frame.camera_frame)
        best = messages.best_candidate(result)
        self.matches_pub.publish(messages.matches_msg(best, header, frame.camera_frame,
                                                      self._camera_frames.get(best.match_id, "") if best else ""))
        if best is not None:
            self._publish_debug_image(frame.image, best, header)
        if result.success:
            self.pose_pub.publish(messages.pose_msg(result, header, self.map_frame))

    def _relocalize(self, frame: _Frame) -> Relocalization:
        with self._engine_lock:
            result = self.engine.relocalize(frame.image, frame.K, frame.depth, frame.stamp_ns)
        self._latency.add_all({f"relocalize.{k}": v for k, v in result.timing_ms.items()})
        if result.success:
            self._count("relocalization.succeeded")
        else:
            self._count(f"relocalization.failed.{reason_code(result.reason).value}")
            self.get_logger().debug(f"relocalization failed: {result.reason}")
        return result

    # ------------------------------------------------------------------ outputs
    def _publish_debug_image(self, query: np.ndarray | tuple[np.ndarray, float] | None, loop: LoopRecord,
                             header: Header) -> None:
        """Query (full image, or a cached (thumbnail, scale)) next to the match keyframe's cached thumbnail."""
        if not self._param("publish_debug_image") or self.debug_image_pub.get_subscription_count() == 0:
            return
        match = self._debug_images.get(loop.match_id)
        if query is None or match is None or loop.points_query is None:
            self._count("debug_image.skipped_no_keyframe_image")
            return
        from feature_matching_ros.viz import draw_matches

        query_image, query_scale = query if isinstance(query, tuple) else self._thumbnail(query)
        match_image, match_scale = match
        # pixel-centre convention: x' = (x + 0.5) * s - 0.5
        canvas = draw_matches(query_image, match_image, (loop.points_query + 0.5) * query_scale - 0.5,
                              (loop.points_match + 0.5) * match_scale - 0.5, loop.inlier_mask,
                              header=f"{loop.query_id}->{loop.match_id} {loop.num_inliers}/{loop.num_matches} "
                                     f"inliers: {loop.reason}"[:80])
        self.debug_image_pub.publish(conv.numpy_to_image(canvas, "rgb8", header))

    def _publish_markers(self) -> None:
        if self.markers_pub.get_subscription_count() == 0:
            return
        with self._engine_lock:
            positions = {k.id: k.T_map_camera[:3, 3].copy() for k in self.engine.database.keyframes
                         if k.T_map_camera is not None}
            loops = list(self._accepted_loops)
        self.markers_pub.publish(map_markers(positions, loops, self.map_frame, self.get_clock().now().to_msg()))

    def _check_camera_stall(self) -> None:
        stalled = self._param("relocalize_on_image") and self.camera.stalled(self._stall_s)
        if stalled and not self._stalled:
            self._count("images.stalled")
        if stalled:
            self.health.event("images.stalled")
            self._warn("images_stalled", f"camera_info arrives but no image has for {self._stall_s:g} s: with "
                       "image_qos=sensor_data, large best-effort images are often lost by DDS (set "
                       "image_qos:=reliable for a reliable publisher), or the image topic is wrong")
        self._stalled = stalled

    def _publish_diagnostics(self) -> None:
        self._check_camera_stall()
        counters = self.counters()
        latency = self._latency.summary()
        queue = self._queue.sizes()
        keyframes = len(self.engine.database)
        concerns = [self.health.map_concern(keyframes), self.health.inputs_concern(),
                    self.health.processing_concern(queue["map"], self._backlog_warn)]
        summary = self.health.summary(concerns, f"{keyframes} keyframes in the map; "
                                                f"{counters.get('loop_closures.accepted', 0)} loops accepted")
        values = {"preset": self.preset, "map_keyframes": str(keyframes), "camera_sync": self.camera.synchroniser}
        values |= {key: str(value) for key, value in sorted(counters.items())}
        for stage, stats in sorted(latency.items()):
            values |= {f"latency_ms.{stage}.{name}": f"{value:.2f}" for name, value in stats.items()}
        values |= {"queue.images": str(queue["images"]), "queue.map": str(queue["map"]),
                   "queue.map_mbytes": f"{queue['map_bytes'] / 1e6:.1f}",
                   "queue.map_oldest_s": f"{self._queue.oldest_map_age_s():.2f}"}
        self.diagnostics_pub.publish(diagnostic_array(self.get_name(), str(self.engine.pipeline.device), summary,
                                                      concerns, values, self.get_clock().now().to_msg()))


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    try:
        node = RelocalizationNode()
    except ParameterError as error:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
