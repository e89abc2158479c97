"""relocalization_node: keyframes in, loop closures / matches / relocalization poses out (the engine in ROS).

Topics (relative names, remap or namespace them):
  in   keyframes (feature_matching_ros/Keyframe, reliable)   -> engine.process_keyframe: retrieval, batched
                                                                verification, acceptance; the keyframe joins the map.
                                                                A keyframe id the map already holds, re-sent with a
                                                                pose, updates that keyframe's pose (engine.update_poses:
                                                                the backend's optimised poses feed the odometry gate
                                                                and relocalization); without a pose it is rejected.
       loop_candidates (feature_matching_ros/LoopCandidates) -> engine.verify_candidates: verify keyframes the
                                                                backend names (no retrieval, same acceptance rules).
       image, camera_info, depth (sensor-data QoS)           -> engine.relocalize (if relocalize_on_image)
  out  loop_closures (LoopClosure, accepted only), loop_closures/rejected (LoopClosure, if publish_rejected),
       matches (Matches: accepted loops and relocalizations), relocalization_pose (PoseWithCovarianceStamped),
       debug/matches_image (sensor_msgs/Image, only while subscribed), /diagnostics (DiagnosticArray)
Services: match_images (MatchImages), relocalize (Relocalize), save_map (SaveMap), load_map (LoadMap): the map
is the engine's keyframe database, a directory (retrieval/persistence.py). ``map_path`` loads one at startup.

Configuration: ``preset`` (presets.py) + ``pipeline.*`` / ``engine.*`` overrides, built by
``presets.build_configs`` (see parameters.py). Invalid parameters stop the node at startup with the name and
the allowed values.

Threading: subscription callbacks only convert and validate (cheap) and push work into two bounded queues
(map work: keyframes and candidate requests, FIFO; images: newest wins); one worker thread runs the engine.
A full queue drops its OLDEST entry and counts it, so the node never falls behind the camera. Services run on
their own callback group and share the engine with the worker through a lock.

Bad input (unsupported encoding, step mismatch, empty image, missing/invalid camera info, NaN pose, bad depth,
core ImageError, unknown keyframe ids) is rejected, counted by kind (diagnostics, :meth:`counters`) and logged
(throttled per kind). Rejected loop candidates are counted by reason (``loop_closures.rejected.<reason>``).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from feature_matching_ros.config import ConfigError
from feature_matching_ros.image import ImageError
from feature_matching_ros.msg import Keyframe, LoopCandidates, LoopClosure, Matches
from feature_matching_ros.relocalizer import LoopClosure as LoopRecord
from feature_matching_ros.relocalizer import Relocalization
from feature_matching_ros.retrieval.global_descriptors import CodebookError
from feature_matching_ros.retrieval.persistence import MapFormatError, MapTargetError
from feature_matching_ros.ros import conversions as conv
from feature_matching_ros.ros.parameters import PARAMETERS, ParameterSpec, preset_override
from feature_matching_ros.srv import LoadMap, MatchImages, Relocalize, SaveMap

NODE_NAME = "relocalization_node"
LATENCY_WINDOW = 512  # samples per stage kept for the percentiles in diagnostics
_PARAMETER_TYPES = {bool: Parameter.Type.BOOL, int: Parameter.Type.INTEGER, float: Parameter.Type.DOUBLE,
                    str: Parameter.Type.STRING}


class ParameterError(RuntimeError):
    """A parameter is invalid; the message names it and the allowed values. The node does not start."""


@dataclass
class _Frame:
    """A converted camera frame (keyframe, raw image or service request)."""

    keyframe_id: int
    stamp_ns: int
    camera_frame: str
    map_frame: str
    image: np.ndarray
    K: np.ndarray
    depth: np.ndarray | None = None
    T_map_camera: np.ndarray | None = None


@dataclass
class _Job:
    kind: str  # "keyframe" | "candidates" | "image"
    payload: Any
    received: float  # time.monotonic() at the callback


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


def _short_reason(reason: str) -> str:
    """Stable counter key from a core reason ("too few inliers: 3 < 15" -> "too_few_inliers")."""
    head = reason.split(":")[0].split("(")[0].strip().lower()
    return "_".join(head.replace(";", " ").replace(",", " ").split())[:48] or "unknown"


class RelocalizationNode(Node):
    """Thin shell: messages -> numpy -> LoopClosureEngine -> messages."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self._counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._last_log: dict[str, float] = {}
        self._latency = _LatencyStats()
        self._worker: threading.Thread | None = None
        try:
            values = self._declare_parameters()
            self.engine = self._build_engine(values)
            self._load_startup_map(values)
        except ParameterError:
            super().destroy_node()  # release the rcl node: the caller never gets this object
            raise
        self.preset: str = values["preset"]
        self.map_frame: str = values["map_frame"]
        self._max_keyframes: int = values["max_keyframes"]
        self._engine_lock = threading.Lock()
        # Camera frame per keyframe id (Matches.frame_id1) and a bounded cache of downscaled keyframe images
        # for debug images: the map stores features, not images.
        self._camera_frames: OrderedDict[int, str] = OrderedDict()
        self._debug_images: OrderedDict[int, tuple[np.ndarray, float]] = OrderedDict()
        self._debug_image_keyframes: int = values["debug_image_keyframes"]

        # Work queues: bounded, oldest dropped (counted).
        self._queue_condition = threading.Condition()
        self._map_jobs: deque[_Job] = deque()
        self._image_jobs: deque[_Job] = deque()
        self._map_queue_size: int = values["keyframe_queue_size"]
        self._image_queue_size: int = values["image_queue_size"]
        self._stopping = False

        # Latest camera info / depth for the raw image topic.
        self._camera_info: CameraInfo | None = None
        self._depth_msgs: deque[Image] = deque(maxlen=4)

        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.loop_closure_pub = self.create_publisher(LoopClosure, "loop_closures", reliable)
        self.rejected_pub = self.create_publisher(LoopClosure, "loop_closures/rejected", reliable)
        self.matches_pub = self.create_publisher(Matches, "matches", reliable)
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, "relocalization_pose", reliable)
        self.debug_image_pub = self.create_publisher(Image, "debug/matches_image", QoSProfile(depth=1))
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))

        self.create_subscription(Keyframe, "keyframes", self._on_keyframe, reliable)
        self.create_subscription(LoopCandidates, "loop_candidates", self._on_candidates, reliable)
        self.create_subscription(Image, "image", self._on_image, qos_profile_sensor_data)
        self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, qos_profile_sensor_data)
        self.create_subscription(Image, "depth", self._on_depth, qos_profile_sensor_data)

        services = MutuallyExclusiveCallbackGroup()
        self.create_service(MatchImages, "match_images", self._on_match_images, callback_group=services)
        self.create_service(Relocalize, "relocalize", self._on_relocalize, callback_group=services)
        self.create_service(SaveMap, "save_map", self._on_save_map, callback_group=services)
        self.create_service(LoadMap, "load_map", self._on_load_map, callback_group=services)

        self.create_timer(values["diagnostics_period_s"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="relocalization_worker", daemon=True)
        self._worker.start()
        pipeline = self.engine.pipeline.config
        self.get_logger().info(
            f"ready: preset {self.preset} ({pipeline.features.detector}+{pipeline.features.descriptor} / "
            f"{pipeline.matcher.name}, {pipeline.features.max_keypoints} keypoints, {self.engine.database.kind} "
            f"retrieval top {self.engine.config.retrieval.top_k}) on {self.engine.pipeline.device}; "
            f"map: {len(self.engine.database)} keyframes")

    # ------------------------------------------------------------------ parameters and startup
    def _declare_parameters(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in PARAMETERS:
            try:
                initial = spec.default if spec.default is not None else _PARAMETER_TYPES[spec.type]
                value = self.declare_parameter(spec.name, initial, self._descriptor(spec)).value
            except Exception as error:  # rclpy raises several types (range, type mismatch, read-only)
                raise ParameterError(f"invalid parameter {spec.name!r}: {error}; allowed: "
                                     f"{self._allowed_text(spec)} ({spec.type.__name__})") from error
            if spec.choices and value not in spec.choices:
                raise ParameterError(f"invalid parameter {spec.name!r}: {value!r}; allowed values: "
                                     f"{', '.join(spec.choices)}")
            values[spec.name] = value
        return values

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
    def _build_engine(values: dict[str, Any]):
        from feature_matching_ros.relocalizer import build_engine

        override = preset_override(values)
        try:
            return build_engine(values["preset"], override)
        except (ConfigError, CodebookError, TypeError) as error:
            raise ParameterError(f"invalid parameter (preset {values['preset']!r} with overrides {override}): "
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

    # ------------------------------------------------------------------ queues
    def _push(self, queue: deque, item: Any, capacity: int, drop_key: str) -> None:
        with self._queue_condition:
            while len(queue) >= capacity:
                queue.popleft()
                self._count(drop_key)
            queue.append(item)
            self._queue_condition.notify()

    def _next_job(self) -> _Job | None:
        with self._queue_condition:
            while not self._stopping and not self._map_jobs and not self._image_jobs:
                self._queue_condition.wait(0.5)
            if self._stopping:
                return None
            return self._map_jobs.popleft() if self._map_jobs else self._image_jobs.popleft()

    def _work(self) -> None:
        while True:
            job = self._next_job()
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
        with self._queue_condition:
            self._stopping = True
            self._queue_condition.notify_all()
        if self._worker.is_alive():
            self._worker.join(timeout=30.0)

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()

    # ------------------------------------------------------------------ conversions shared by topics and services
    def _frame(self, keyframe_id: int, header: Header, image_msg: Image, info: CameraInfo,
               depth_msg: Image | None, map_frame: str) -> _Frame:
        """Convert and validate; raises conv.ConversionError (kind + message). Arrays are copies."""
        start = time.perf_counter()
        image = np.array(conv.image_to_numpy(image_msg, conv.IMAGE_ENCODINGS))  # rclpy reuses the buffer
        K = conv.camera_matrix(info, image.shape)
        depth = None
        if depth_msg is not None:
            try:
                depth = conv.depth_to_metres(depth_msg)
            except conv.ConversionError as error:
                raise conv.ConversionError("bad_depth", str(error)) from error
            if depth is not None and depth.shape != image.shape[:2]:
                raise conv.ConversionError("bad_depth", f"depth {depth.shape[1]}x{depth.shape[0]} does not match "
                                           f"the image {image.shape[1]}x{image.shape[0]}")
            depth = None if depth is None else np.array(depth)
        self._latency.add("convert", (time.perf_counter() - start) * 1e3)
        return _Frame(int(keyframe_id), header.stamp.sec * 1_000_000_000 + header.stamp.nanosec,
                      image_msg.header.frame_id or header.frame_id, map_frame or self.map_frame, image, K, depth)

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
        self._push(self._map_jobs, _Job("keyframe", frame, time.monotonic()), self._map_queue_size,
                   "dropped.keyframes")

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
            insert = len(self.engine.database) < self._max_keyframes
            result = self.engine.process_keyframe(frame.image, frame.K, frame.stamp_ns, keyframe_id=frame.keyframe_id,
                                                  T_map_camera=frame.T_map_camera, depth=frame.depth, insert=insert)
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
        self._push(self._map_jobs, _Job("candidates", (int(msg.query_id), [int(i) for i in msg.candidate_ids]),
                                        time.monotonic()), self._map_queue_size, "dropped.candidate_requests")

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
        """Accepted loops -> loop_closures + matches + debug image; rejected ones are counted by reason and, with
        publish_rejected, published on loop_closures/rejected."""
        publish_rejected = self._param("publish_rejected")
        for loop in loops:
            if not loop.accepted:
                self._count(f"loop_closures.rejected.{_short_reason(loop.reason)}")
                if publish_rejected:
                    self.rejected_pub.publish(self._loop_msg(loop, query))
                continue
            self._count("loop_closures.accepted")
            msg = self._loop_msg(loop, query)
            self.loop_closure_pub.publish(msg)
            header = Header(stamp=msg.query_stamp, frame_id=self._camera_frames.get(loop.query_id, ""))
            self.matches_pub.publish(self._matches_msg(loop, header, header.frame_id,
                                                       self._camera_frames.get(loop.match_id, "")))
            self._publish_debug_image(query.image if query is not None else self._debug_images.get(loop.query_id),
                                      loop, header)

    def _loop_msg(self, loop: LoopRecord, query: _Frame | None) -> LoopClosure:
        msg = LoopClosure()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = query.map_frame if query is not None else self.map_frame
        msg.query_id, msg.match_id = int(loop.query_id), int(loop.match_id)
        msg.query_stamp, msg.match_stamp = _stamp(loop.query_stamp_ns), _stamp(loop.match_stamp_ns)
        msg.t_match_query = conv.matrix_to_transform(loop.T_match_query)
        msg.scale, msg.metric_scale = float(loop.scale), bool(loop.metric)
        msg.information = np.asarray(loop.information, np.float64).ravel()
        msg.num_matches, msg.num_inliers = int(loop.num_matches), int(loop.num_inliers)
        msg.retrieval_score = float(loop.retrieval_score)
        msg.accepted, msg.reason = bool(loop.accepted), loop.reason
        return msg

    # ------------------------------------------------------------------ raw images -> relocalization
    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    def _on_depth(self, msg: Image) -> None:
        self._depth_msgs.append(msg)

    def _depth_for(self, header: Header) -> Image | None:
        max_age = self._param("depth_max_age_s")
        stamp = conv.stamp_to_seconds(header.stamp)
        best = min(self._depth_msgs, key=lambda m: abs(conv.stamp_to_seconds(m.header.stamp) - stamp), default=None)
        if best is not None and abs(conv.stamp_to_seconds(best.header.stamp) - stamp) <= max_age:
            return best
        return None

    def _on_image(self, msg: Image) -> None:
        received = time.monotonic()
        self._count("images_received")
        if not self._param("relocalize_on_image"):
            return
        info = self._camera_info
        if info is None:
            self._reject("missing_camera_info", "image received before any camera_info")
            return
        try:
            frame = self._frame(0, msg.header, msg, info, self._depth_for(msg.header), "")
        except conv.ConversionError as error:
            self._reject(error.kind, str(error))
            return
        self._push(self._image_jobs, _Job("image", frame, received), self._image_queue_size, "dropped.images")

    def _process_image(self, frame: _Frame) -> None:
        result = self._relocalize(frame)
        self._count("images_processed")
        header = Header(stamp=_stamp(frame.stamp_ns), frame_id=frame.camera_frame)
        best = self._best_candidate(result)
        self.matches_pub.publish(self._matches_msg(best, header, frame.camera_frame,
                                                   self._camera_frames.get(best.match_id, "") if best else ""))
        if best is not None:
            self._publish_debug_image(frame.image, best, header)
        if result.success:
            self.pose_pub.publish(self._pose_msg(result, header))

    def _relocalize(self, frame: _Frame) -> Relocalization:
        with self._engine_lock:
            result = self.engine.relocalize(frame.image, frame.K, frame.depth, frame.stamp_ns)
        self._latency.add_all({f"relocalize.{k}": v for k, v in result.timing_ms.items()})
        self._count("relocalization.succeeded" if result.success
                    else f"relocalization.failed.{_short_reason(result.reason)}")
        return result

    @staticmethod
    def _best_candidate(result: Relocalization) -> LoopRecord | None:
        """The candidate the pose came from, else the verified candidate with the most inliers."""
        verified = [c for c in result.candidates if c.points_query is not None]
        chosen = [c for c in verified if c.match_id == result.match_id] if result.success else []
        return (chosen or sorted(verified, key=lambda c: -c.num_inliers) or [None])[0]

    def _pose_msg(self, result: Relocalization, header: Header) -> PoseWithCovarianceStamped:
        msg = PoseWithCovarianceStamped()
        msg.header.stamp = header.stamp
        msg.header.frame_id = self.map_frame
        msg.pose.pose = conv.matrix_to_pose(result.T_map_camera)
        msg.pose.covariance = np.asarray(result.covariance, np.float64).ravel()
        return msg

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def _matches_msg(loop: LoopRecord | None, header: Header, frame0: str, frame1: str) -> Matches:
        msg = Matches(header=header, frame_id0=frame0, frame_id1=frame1)
        if loop is not None and loop.points_query is not None:
            msg.id0, msg.id1 = max(int(loop.query_id), 0), int(loop.match_id)
            msg.points0 = np.ascontiguousarray(loop.points_query, np.float32).ravel()
            msg.points1 = np.ascontiguousarray(loop.points_match, np.float32).ravel()
            msg.scores = np.ascontiguousarray(loop.match_scores, np.float32)
            msg.inliers = [bool(v) for v in loop.inlier_mask]
        return msg

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

    def _publish_diagnostics(self) -> None:
        counters = self.counters()
        latency = self._latency.summary()
        status = DiagnosticStatus(name=f"{self.get_name()}: relocalization", hardware_id=str(self.engine.pipeline.device))
        dropped = sum(v for k, v in counters.items() if k.startswith("dropped."))
        rejected = sum(v for k, v in counters.items() if k.startswith("rejected."))
        keyframes = len(self.engine.database)
        status.level = DiagnosticStatus.OK
        status.message = (f"{keyframes} keyframes in the map; {counters.get('loop_closures.accepted', 0)} loops; "
                          f"{dropped} dropped; {rejected} rejected inputs")
        if counters.get("errors") or counters.get("map.load_failed"):
            status.level = DiagnosticStatus.ERROR
            status.message = (f"{counters.get('errors', 0)} processing errors, {counters.get('map.load_failed', 0)} "
                              f"failed map loads; " + status.message)
        elif dropped or rejected:
            status.level = DiagnosticStatus.WARN
        values = [KeyValue(key="preset", value=self.preset), KeyValue(key="map_keyframes", value=str(keyframes))]
        values += [KeyValue(key=key, value=str(value)) for key, value in sorted(counters.items())]
        for stage, stats in sorted(latency.items()):
            values += [KeyValue(key=f"latency_ms.{stage}.{name}", value=f"{value:.2f}") for name, value in stats.items()]
        with self._queue_condition:
            values += [KeyValue(key="queue.images", value=str(len(self._image_jobs))),
                       KeyValue(key="queue.map", value=str(len(self._map_jobs)))]
        status.values = values
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(array)

    # ------------------------------------------------------------------ services
    def _on_match_images(self, request: MatchImages.Request, response: MatchImages.Response) -> MatchImages.Response:
        self._count("match_images_requests")
        try:
            image0 = conv.image_to_numpy(request.image0, conv.IMAGE_ENCODINGS, "image0")
            image1 = conv.image_to_numpy(request.image1, conv.IMAGE_ENCODINGS, "image1")
            K0 = conv.camera_matrix(request.camera_info0, image0.shape)
            K1 = conv.camera_matrix(request.camera_info1, image1.shape)
            depth0 = conv.depth_to_metres(request.depth0, "depth0")
            depth1 = conv.depth_to_metres(request.depth1, "depth1")
            start = time.perf_counter()
            with self._engine_lock:
                result = self.engine.pipeline.match_pair(image0, image1, K0, K1, depth0, depth1)
            self._latency.add("match_images", (time.perf_counter() - start) * 1e3)
        except conv.ConversionError as error:
            self._reject(error.kind, f"match_images: {error}")
            response.success, response.reason = False, f"{error.kind}: {error}"
            return response
        except (ImageError, ValueError) as error:
            self._reject("image_error", f"match_images: {error}")
            response.success, response.reason = False, f"image_error: {error}"
            return response
        points0, points1 = result.matched_points()
        inliers = result.pose.inliers if len(result.pose.inliers) == len(result.matches) else np.zeros(
            len(result.matches), bool)
        response.matches = Matches(header=request.image0.header, frame_id0=request.image0.header.frame_id,
                                   frame_id1=request.image1.header.frame_id,
                                   points0=np.ascontiguousarray(points0, np.float32).ravel(),
                                   points1=np.ascontiguousarray(points1, np.float32).ravel(),
                                   scores=np.ascontiguousarray(result.scores, np.float32),
                                   inliers=[bool(v) for v in inliers])
        response.t_1_0 = conv.matrix_to_transform(result.pose.T_1_0)
        response.metric_scale = bool(result.pose.metric)
        response.information = np.asarray(result.pose.information, np.float64).ravel()
        response.success, response.reason = bool(result.success), result.reason
        return response

    def _on_relocalize(self, request: Relocalize.Request, response: Relocalize.Response) -> Relocalize.Response:
        self._count("relocalize_requests")
        depth = request.depth if (request.depth.width or len(request.depth.data)) else None
        try:
            frame = self._frame(0, request.image.header, request.image, request.camera_info, depth, "")
            result = self._relocalize(frame)
        except conv.ConversionError as error:
            self._reject(error.kind, f"relocalize: {error}")
            response.success, response.reason = False, f"{error.kind}: {error}"
            return response
        except (ImageError, ValueError) as error:
            self._reject("image_error", f"relocalize: {error}")
            response.success, response.reason = False, f"image_error: {error}"
            return response
        response.success, response.reason = bool(result.success), result.reason
        best = self._best_candidate(result)
        if best is not None:
            response.keyframe_id = int(best.match_id)
            response.num_matches, response.num_inliers = int(best.num_matches), int(best.num_inliers)
        if result.success:
            response.pose = self._pose_msg(result, request.image.header)
        return response

    def _on_save_map(self, request: SaveMap.Request, response: SaveMap.Response) -> SaveMap.Response:
        """Save the map to a directory; refuses (success=false + why) a relative path or a target holding
        anything the node did not write, so no request can destroy data (persistence.check_save_target)."""
        if not os.path.isabs(request.path):
            response.success = False
            response.message = (f"refused: {request.path!r} is not an absolute path (it would be resolved against "
                                "the node's working directory, not the caller's)")
            self._count("map.save_refused")
            self.get_logger().error(response.message)
            return response
        try:
            with self._engine_lock:
                path = self.engine.save_map(request.path)
                count = len(self.engine.database)
            response.success, response.message = True, f"saved {count} keyframes to {path}"
            self._count("map.saved")
        except MapTargetError as error:
            response.success, response.message = False, f"refused to save to {request.path!r}: {error}"
            self._count("map.save_refused")
            self.get_logger().error(response.message)
        except (OSError, ValueError, MapFormatError) as error:
            response.success, response.message = False, f"cannot save to {request.path!r}: {error}"
            self._count("map.save_failed")
            self.get_logger().error(response.message)
        return response

    def _on_load_map(self, request: LoadMap.Request, response: LoadMap.Response) -> LoadMap.Response:
        try:
            with self._engine_lock:
                self.engine.load_map(request.path)  # all or nothing: a failed load keeps the current map
                count = len(self.engine.database)
                self._debug_images.clear()  # cached images belong to the previous map
        except (MapFormatError, OSError, ValueError, KeyError) as error:
            response.success, response.message = False, f"cannot load {request.path!r}: {error}"
            self._count("map.load_failed")
            self.get_logger().error(response.message)
            return response
        self._count("map.loaded")
        response.success, response.message = True, f"loaded {count} keyframes from {request.path}"
        return response


def _stamp(stamp_ns: int):
    from builtin_interfaces.msg import Time
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    try:
        node = RelocalizationNode()
    except ParameterError as error:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=3)
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
