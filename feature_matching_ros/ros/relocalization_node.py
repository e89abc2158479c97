"""relocalization_node: keyframes in, loop closures / matches / relocalization poses out.

Topics (relative names, remap or namespace them):
  in   keyframes (feature_matching_ros/Keyframe, reliable)      stored (bounded, by id), then `loop_closures_for`
       loop_candidates (feature_matching_ros/LoopCandidates)    verify a stored keyframe against stored candidates
       image, camera_info, depth (sensor-data QoS)              relocalize each image (if relocalize_on_image)
  out  loop_closures (LoopClosure), matches (Matches), relocalization_pose (PoseWithCovarianceStamped),
       debug/matches_image (sensor_msgs/Image, only while subscribed), /diagnostics (DiagnosticArray)
Services: match_images (MatchImages), relocalize (Relocalize), save_map (SaveMap), load_map (LoadMap).

Threading: subscription callbacks only convert and validate (cheap) and push work into two bounded queues
(map work: keyframes and candidate requests, FIFO; images: newest wins); one worker thread runs the matcher.
A full queue drops its OLDEST entry and counts it, so the node never falls behind the camera. Services run on
their own callback group and share the pipeline with the worker through a lock.

Bad input (unsupported encoding, step mismatch, empty image, missing/invalid camera info, NaN pose, bad depth,
core ImageError) is rejected, counted by kind (diagnostics, :meth:`counters`) and logged (throttled per kind).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
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
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from feature_matching_ros.config import ConfigError, PipelineConfig
from feature_matching_ros.image import ImageError
from feature_matching_ros.msg import Keyframe, LoopCandidates, LoopClosure, Matches
from feature_matching_ros.ros import conversions as conv
from feature_matching_ros.ros.keyframe_store import (KeyframeStore, RelocalizationResult, StoredKeyframe,
                                                     VerifiedPair, relocalize, verify_candidates)
from feature_matching_ros.ros.parameters import PARAMETERS, ParameterSpec, pipeline_dict
from feature_matching_ros.srv import LoadMap, MatchImages, Relocalize, SaveMap

NODE_NAME = "relocalization_node"
LATENCY_WINDOW = 512  # samples per stage kept for the percentiles in diagnostics


class ParameterError(RuntimeError):
    """A parameter is invalid; the message names it and the allowed values. The node does not start."""


@dataclass
class _ImageJob:
    image: np.ndarray
    K: np.ndarray
    depth: np.ndarray | None
    header: Header
    received: float  # time.monotonic() at the callback


@dataclass
class _MapJob:
    kind: str  # "keyframe" | "candidates"
    payload: Any
    received: float


class _LatencyStats:
    """Per-stage latency samples (ms) in bounded windows; percentiles for diagnostics."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, milliseconds: float) -> None:
        with self._lock:
            self._samples.setdefault(stage, deque(maxlen=LATENCY_WINDOW)).append(float(milliseconds))

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            snapshot = {stage: np.array(values) for stage, values in self._samples.items() if values}
        return {stage: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                        "max": float(v.max()), "n": float(len(v))} for stage, v in snapshot.items()}


def _short_reason(reason: str) -> str:
    """Stable counter key from a core reason ("too few matches: 3 < 15" -> "too_few_matches")."""
    head = reason.split(":")[0].split("(")[0].strip().lower()
    return "_".join(head.replace(";", " ").replace(",", " ").split())[:48] or "unknown"


class RelocalizationNode(Node):
    """Thin shell: messages -> numpy -> core (MatchingPipeline, keyframe store) -> messages."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self._counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._last_log: dict[str, float] = {}
        self._latency = _LatencyStats()
        self._worker: threading.Thread | None = None
        try:
            values = self._declare_parameters()
            try:
                self.pipeline_config = PipelineConfig.from_dict(pipeline_dict(values))
                from feature_matching_ros.pipeline import MatchingPipeline
                self.pipeline = MatchingPipeline(self.pipeline_config)
            except (ConfigError, TypeError) as error:
                raise ParameterError(f"invalid parameter: {error}") from error
        except ParameterError:
            super().destroy_node()  # release the rcl node: the caller never gets this object
            raise
        self.map_frame: str = values["map_frame"]
        self._pipeline_lock = threading.Lock()
        self.store = KeyframeStore(values["keyframe_store_size"])
        self._batch_size: int = values["match_batch_size"]

        # Work queues: bounded, oldest dropped (counted).
        self._queue_condition = threading.Condition()
        self._map_jobs: deque[_MapJob] = deque()
        self._image_jobs: deque[_ImageJob] = deque()
        self._map_queue_size: int = values["keyframe_queue_size"]
        self._image_queue_size: int = values["image_queue_size"]
        self._stopping = False

        # Latest camera info / depth for the raw image topic.
        self._camera_info: CameraInfo | None = None
        self._depth_msgs: deque[Image] = deque(maxlen=4)

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.loop_closure_pub = self.create_publisher(LoopClosure, "loop_closures", reliable)
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
        features = self.pipeline_config.features
        self.get_logger().info(
            f"ready: {features.detector}+{features.descriptor} / {self.pipeline_config.matcher.name} on "
            f"{getattr(self.pipeline, 'device', self.pipeline_config.device)}, {features.max_keypoints} keypoints, "
            f"store {self.store.capacity} keyframes")

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in PARAMETERS:
            try:
                values[spec.name] = self.declare_parameter(spec.name, spec.default, self._descriptor(spec)).value
            except Exception as error:  # rclpy raises several types (range, type mismatch, read-only)
                raise ParameterError(f"invalid parameter {spec.name!r}: {error}; allowed: "
                                     f"{spec.allowed or self._range_text(spec) or type(spec.default).__name__}"
                                     ) from error
        return values

    @staticmethod
    def _range_text(spec: ParameterSpec) -> str:
        return f"[{spec.value_range[0]}, {spec.value_range[1]}]" if spec.value_range else ""

    @staticmethod
    def _descriptor(spec: ParameterSpec) -> ParameterDescriptor:
        descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only,
                                         additional_constraints=spec.allowed or RelocalizationNode._range_text(spec))
        if spec.value_range is not None:
            low, high = spec.value_range
            if isinstance(spec.default, int) and not isinstance(spec.default, bool):
                descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=0)]
            else:
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high),
                                                                      step=0.0)]
        return descriptor

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
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= self._param("log_throttle_s"):
            self._last_log[kind] = now
            total = self.counters().get(f"rejected.{kind}", 0)
            self.get_logger().warning(f"rejected ({kind}, {total} so far): {message}")

    # ------------------------------------------------------------------ queues
    def _push(self, queue: deque, item: Any, capacity: int, drop_key: str) -> None:
        with self._queue_condition:
            while len(queue) >= capacity:
                queue.popleft()
                self._count(drop_key)
            queue.append(item)
            self._queue_condition.notify()

    def _next_job(self) -> _MapJob | _ImageJob | None:
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
                if isinstance(job, _ImageJob):
                    self._process_image(job)
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
    def _keyframe_from_images(self, keyframe_id: int, header: Header, image_msg: Image, info: CameraInfo,
                              depth_msg: Image | None, map_frame: str) -> StoredKeyframe:
        start = time.perf_counter()
        image = conv.image_to_numpy(image_msg, conv.IMAGE_ENCODINGS)
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
        self._latency.add("convert", (time.perf_counter() - start) * 1e3)
        stamp = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        return StoredKeyframe(int(keyframe_id), int(stamp), image_msg.header.frame_id or header.frame_id,
                              map_frame or self.map_frame, image, K, depth)

    def _extract(self, keyframe: StoredKeyframe) -> None:
        start = time.perf_counter()
        with self._pipeline_lock:
            keyframe.features = self.pipeline.extract(keyframe.image)
        self._latency.add("extract", (time.perf_counter() - start) * 1e3)

    # ------------------------------------------------------------------ keyframes and loop closures
    def _on_keyframe(self, msg: Keyframe) -> None:
        self._count("keyframes_received")
        try:
            keyframe = self._keyframe_from_images(msg.id, msg.header, msg.image, msg.camera_info,
                                                  msg.depth, msg.header.frame_id)
            covariance = conv.covariance_6x6(msg.pose.covariance)
            if covariance[0, 0] != -1.0:  # -1 marks an unknown pose (sensor_msgs convention)
                keyframe.T_map_camera = conv.pose_to_matrix(msg.pose.pose, "keyframe pose")
                keyframe.pose_covariance = covariance
            # The message buffer is reused by rclpy after the callback: keep our own copies.
            keyframe.image = np.array(keyframe.image)
        except conv.ConversionError as error:
            self._reject(error.kind, f"keyframe {msg.id}: {error}")
            return
        self._push(self._map_jobs, _MapJob("keyframe", keyframe, time.monotonic()), self._map_queue_size,
                   "dropped.keyframes")

    def _process_keyframe(self, keyframe: StoredKeyframe) -> None:
        self._extract(keyframe)
        evicted = self.store.insert(keyframe)
        self._count("keyframes_stored")
        self._count("keyframes_evicted", evicted)
        for pair in self.loop_closures_for(keyframe):
            self._publish_pair(pair)

    def loop_closures_for(self, keyframe: StoredKeyframe) -> list[VerifiedPair]:
        """Loop closures found for a newly stored keyframe. Without a place-recognition engine: none (the
        backend or another module asks through ``loop_candidates``). The engine plugs in here."""
        return []

    def _on_candidates(self, msg: LoopCandidates) -> None:
        self._count("candidate_requests_received")
        self._push(self._map_jobs, _MapJob("candidates", (int(msg.query_id), [int(i) for i in msg.candidate_ids]),
                                           time.monotonic()), self._map_queue_size, "dropped.candidate_requests")

    def _process_candidates(self, request: tuple[int, list[int]]) -> None:
        query_id, candidate_ids = request
        query = self.store.get(query_id)
        if query is None:
            self._reject("unknown_keyframe", f"loop candidates for keyframe {query_id}, which is not stored")
            return
        candidates = []
        for candidate_id in candidate_ids:
            candidate = self.store.get(candidate_id)
            if candidate is None or candidate_id == query_id:
                self._reject("unknown_keyframe", f"candidate {candidate_id} of keyframe {query_id} is not stored "
                             "(or is the query itself)")
            else:
                candidates.append(candidate)
        if not candidates:
            return
        timing: dict[str, float] = {}
        with self._pipeline_lock:
            pairs = verify_candidates(self.pipeline, query, candidates, self._batch_size, timing)
        for stage, milliseconds in timing.items():
            self._latency.add(stage, milliseconds)
        for pair in pairs:
            self._publish_pair(pair)

    def _publish_pair(self, pair: VerifiedPair) -> None:
        query, match = self.store.get(pair.query_id), self.store.get(pair.match_id)
        msg = LoopClosure()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = query.map_frame if query else self.map_frame
        msg.query_id, msg.match_id = pair.query_id, pair.match_id
        msg.query_stamp = _stamp(pair.query_stamp_ns)
        msg.match_stamp = _stamp(pair.match_stamp_ns)
        msg.t_match_query = conv.matrix_to_transform(pair.T_match_query)
        msg.scale, msg.metric_scale = float(pair.scale), bool(pair.metric)
        msg.information = np.asarray(pair.information, np.float64).ravel()
        msg.num_matches, msg.num_inliers = int(pair.num_matches), int(pair.num_inliers)
        msg.retrieval_score = float(pair.retrieval_score)
        msg.accepted, msg.reason = bool(pair.accepted), pair.reason
        self.loop_closure_pub.publish(msg)
        self._count("loop_closures.accepted" if pair.accepted else f"loop_closures.rejected.{_short_reason(pair.reason)}")
        header = Header(stamp=msg.query_stamp, frame_id=query.frame_id if query else "")
        self.matches_pub.publish(self._matches_msg(pair, header, query.frame_id if query else "",
                                                   match.frame_id if match else ""))
        if query is not None and match is not None:
            self._publish_debug_image(query.image, match.image, pair, header)

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
            keyframe = self._keyframe_from_images(0, msg.header, msg, info, self._depth_for(msg.header), "")
        except conv.ConversionError as error:
            self._reject(error.kind, str(error))
            return
        job = _ImageJob(np.array(keyframe.image), keyframe.K, keyframe.depth, msg.header, received)
        self._push(self._image_jobs, job, self._image_queue_size, "dropped.images")

    def _process_image(self, job: _ImageJob) -> None:
        query = StoredKeyframe(0, job.header.stamp.sec * 1_000_000_000 + job.header.stamp.nanosec,
                               job.header.frame_id, self.map_frame, job.image, job.K, job.depth)
        result = self._relocalize(query)
        self._count("images_processed")
        header = Header(stamp=job.header.stamp, frame_id=job.header.frame_id)
        if result.best is not None:
            keyframe = self.store.get(result.best.match_id)
            self.matches_pub.publish(self._matches_msg(result.best, header, job.header.frame_id,
                                                       keyframe.frame_id if keyframe else ""))
            if keyframe is not None:
                self._publish_debug_image(job.image, keyframe.image, result.best, header)
        else:
            self.matches_pub.publish(self._matches_msg(None, header, job.header.frame_id, ""))
        if result.success:
            self.pose_pub.publish(self._pose_msg(result, job.header))

    def _relocalize(self, query: StoredKeyframe) -> RelocalizationResult:
        self._extract(query)
        with self._pipeline_lock:
            result = relocalize(self.pipeline, query, self.store, self._param("relocalization_max_keyframes"),
                                self._param("relocalization_top_k"), self._batch_size)
        for stage, milliseconds in result.timing_ms.items():
            self._latency.add(stage, milliseconds)
        self._count("relocalization.succeeded" if result.success
                    else f"relocalization.failed.{_short_reason(result.reason)}")
        return result

    def _pose_msg(self, result: RelocalizationResult, header: Header) -> PoseWithCovarianceStamped:
        msg = PoseWithCovarianceStamped()
        msg.header.stamp = header.stamp
        msg.header.frame_id = result.map_frame or self.map_frame
        msg.pose.pose = conv.matrix_to_pose(result.T_map_camera)
        msg.pose.covariance = np.asarray(result.covariance, np.float64).ravel()
        return msg

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def _matches_msg(pair: VerifiedPair | None, header: Header, frame0: str, frame1: str) -> Matches:
        msg = Matches(header=header, frame_id0=frame0, frame_id1=frame1)
        if pair is not None:
            msg.id0, msg.id1 = int(pair.query_id), int(pair.match_id)
            msg.points0 = np.ascontiguousarray(pair.points_query, np.float32).ravel()
            msg.points1 = np.ascontiguousarray(pair.points_match, np.float32).ravel()
            msg.scores = np.ascontiguousarray(pair.scores, np.float32)
            msg.inliers = [bool(v) for v in pair.inliers]
        return msg

    def _publish_debug_image(self, image0: np.ndarray, image1: np.ndarray, pair: VerifiedPair, header: Header) -> None:
        if not self._param("publish_debug_image") or self.debug_image_pub.get_subscription_count() == 0:
            return
        from feature_matching_ros.viz import draw_matches
        import cv2

        canvas = draw_matches(image0, image1, pair.points_query, pair.points_match, pair.inliers,
                              header=f"{pair.num_inliers}/{pair.num_matches} inliers: {pair.reason}"[:80])
        max_width = self._param("debug_image_max_width")
        if canvas.shape[1] > max_width:
            scale = max_width / canvas.shape[1]
            canvas = cv2.resize(canvas, (max_width, max(1, round(canvas.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        self.debug_image_pub.publish(conv.numpy_to_image(canvas, "rgb8", header))

    def _publish_diagnostics(self) -> None:
        counters = self.counters()
        latency = self._latency.summary()
        status = DiagnosticStatus(name=f"{self.get_name()}: relocalization", hardware_id=str(
            getattr(self.pipeline, "device", self.pipeline_config.device)))
        dropped = sum(v for k, v in counters.items() if k.startswith("dropped."))
        rejected = sum(v for k, v in counters.items() if k.startswith("rejected."))
        status.level = DiagnosticStatus.OK
        status.message = f"{len(self.store)} keyframes; {dropped} dropped; {rejected} rejected inputs"
        if counters.get("errors"):
            status.level, status.message = DiagnosticStatus.ERROR, f"{counters['errors']} processing errors; " + status.message
        elif dropped or rejected:
            status.level = DiagnosticStatus.WARN
        values = [KeyValue(key="keyframes_stored_now", value=str(len(self.store)))]
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
            with self._pipeline_lock:
                result = self.pipeline.match_pair(image0, image1, K0, K1, depth0, depth1)
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
        pair = VerifiedPair(0, 0, 0, 0, result.success, result.reason, points_query=points0, points_match=points1,
                            scores=result.scores, inliers=inliers)
        response.matches = self._matches_msg(pair, request.image0.header, request.image0.header.frame_id,
                                             request.image1.header.frame_id)
        response.t_1_0 = conv.matrix_to_transform(result.pose.T_1_0)
        response.metric_scale = bool(result.pose.metric)
        response.information = np.asarray(result.pose.information, np.float64).ravel()
        response.success, response.reason = bool(result.success), result.reason
        return response

    def _on_relocalize(self, request: Relocalize.Request, response: Relocalize.Response) -> Relocalize.Response:
        self._count("relocalize_requests")
        depth = request.depth if (request.depth.width or len(request.depth.data)) else None
        try:
            query = self._keyframe_from_images(0, request.image.header, request.image, request.camera_info, depth, "")
            result = self._relocalize(query)
        except conv.ConversionError as error:
            self._reject(error.kind, f"relocalize: {error}")
            response.success, response.reason = False, f"{error.kind}: {error}"
            return response
        except ImageError as error:
            self._reject("image_error", f"relocalize: {error}")
            response.success, response.reason = False, f"image_error: {error}"
            return response
        response.success, response.reason = bool(result.success), result.reason
        if result.best is not None:
            response.keyframe_id = int(result.best.match_id)
            response.num_matches, response.num_inliers = int(result.best.num_matches), int(result.best.num_inliers)
        if result.success:
            response.pose = self._pose_msg(result, request.image.header)
        return response

    def _on_save_map(self, request: SaveMap.Request, response: SaveMap.Response) -> SaveMap.Response:
        try:
            with self._pipeline_lock:
                path = self.store.save(request.path)
            response.success, response.message = True, f"saved {len(self.store)} keyframes to {path}"
        except (OSError, ValueError) as error:
            response.success, response.message = False, f"cannot save to {request.path!r}: {error}"
        return response

    def _on_load_map(self, request: LoadMap.Request, response: LoadMap.Response) -> LoadMap.Response:
        try:
            keyframes = KeyframeStore.load(request.path, self.store.capacity)
            for keyframe in keyframes:
                self._extract(keyframe)
        except (OSError, ValueError, KeyError) as error:
            response.success, response.message = False, f"cannot load {request.path!r}: {error}"
            return response
        with self._pipeline_lock:
            self.store = KeyframeStore(self.store.capacity)
            for keyframe in keyframes:
                self.store.insert(keyframe)
        response.success, response.message = True, f"loaded {len(keyframes)} keyframes from {request.path}"
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
