"""Camera sequences in rosbag2 (sqlite3 or mcap) through rosbags: one writer, one frame iterator.

Topics (defaults, see ``SequenceTopics``), all stamped with the frame's stamp:
  /camera/image_raw         sensor_msgs/Image rgb8 (mono8/bgr8 also read); or, on read, sensor_msgs/CompressedImage
                            (JPEG/PNG) on that topic or on image_transport's /camera/image_raw/compressed
  /camera/depth/image_raw   sensor_msgs/Image 32FC1, metres along the optical axis (z-depth);
                            NaN where there is no surface (sky / out of range). Valid: ``np.isfinite(d) & (d > 0)``.
                            16UC1 (millimetres, 0 = invalid) is accepted on read and converted to that form.
  /camera/camera_info       sensor_msgs/CameraInfo, one per image
  /ground_truth/pose        geometry_msgs/PoseStamped, frame_id "map": T_map_camera of the optical frame
  /odom                     nav_msgs/Odometry, frame_id "odom", child = the camera optical frame
  /slam/map_points          sensor_msgs/PointCloud2 (monocular sequences), frame_id the camera optical frame:
                            the keyframe's backend map points, float32 fields u, v (pixel of the observing
                            keypoint) and x, y, z (camera frame, the backend's drifting units; not metres)
The bag's log time of every message equals its header stamp, so the bag orders frames by stamp.
Frames are assembled by header stamp: every message with the image's stamp belongs to that frame;
topics other than the image are optional on read (missing -> None).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from feature_matching_ros.bag import convert


@dataclass(frozen=True)
class SequenceTopics:
    image: str = "/camera/image_raw"
    depth: str = "/camera/depth/image_raw"
    camera_info: str = "/camera/camera_info"
    ground_truth: str = "/ground_truth/pose"
    odometry: str = "/odom"
    map_points: str = "/slam/map_points"
    camera_frame: str = "camera_optical_frame"
    map_frame: str = "map"
    odom_frame: str = "odom"


DEFAULT_TOPICS = SequenceTopics()
STORAGE_FORMATS = ("mcap", "sqlite3")


@dataclass
class SequenceFrame:
    """One camera frame. ``image``: (H, W, 3) uint8 RGB (or (H, W) mono8); ``depth``: (H, W) float32 metres,
    NaN invalid; ``K``: 3x3; ``T_map_camera`` / ``T_odom_camera``: 4x4 optical-frame poses (None if absent);
    ``index``: 0-based position in the image topic; ``stamp_ns``: header stamp in nanoseconds."""

    index: int
    stamp_ns: int
    image: np.ndarray
    depth: np.ndarray | None = None
    K: np.ndarray | None = None
    T_map_camera: np.ndarray | None = None
    T_odom_camera: np.ndarray | None = None
    odom_linear_velocity: np.ndarray | None = None  # m/s in the camera frame
    odom_angular_velocity: np.ndarray | None = None  # rad/s in the camera frame
    # A monocular backend's sparse 3D for this frame: ((P, 2) keypoint pixels, (P, 3) camera-frame points in the
    # backend's units), see retrieval.database.MapPoints.
    map_points: tuple[np.ndarray, np.ndarray] | None = None


class SequenceBagWriter:
    """Context manager writing SequenceFrames to a rosbag2 directory (must not exist yet)."""

    def __init__(self, path: Path | str, storage: str = "mcap", topics: SequenceTopics = DEFAULT_TOPICS,
                 image_format: str = "raw", jpeg_quality: int = 95):
        """``image_format``: "raw" writes sensor_msgs/Image on ``topics.image``; "jpeg" / "png" write
        sensor_msgs/CompressedImage on ``topics.image + "/compressed"`` (image_transport's name), as robots
        record them."""
        from rosbags.rosbag2 import StoragePlugin, Writer

        if image_format not in ("raw",) + convert.COMPRESSED_FORMATS:
            raise ValueError(f"unknown image format {image_format!r}; choose raw, jpeg or png")
        self.image_format, self.jpeg_quality = image_format, jpeg_quality

        if storage not in STORAGE_FORMATS:
            raise ValueError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGE_FORMATS)}")
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; rosbag2 writes a new directory")
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self.topics = topics
        self._connections: dict[str, object] = {}

    def __enter__(self) -> "SequenceBagWriter":
        self._writer.open()
        store = convert.typestore()
        image_topic, image_type = ((self.topics.image, "sensor_msgs/msg/Image") if self.image_format == "raw" else
                                   (self.topics.image + "/compressed", "sensor_msgs/msg/CompressedImage"))
        for topic, msgtype in ((image_topic, image_type),
                               (self.topics.depth, "sensor_msgs/msg/Image"),
                               (self.topics.camera_info, "sensor_msgs/msg/CameraInfo"),
                               (self.topics.ground_truth, "geometry_msgs/msg/PoseStamped"),
                               (self.topics.odometry, "nav_msgs/msg/Odometry")):
            self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=store)
        return self

    def __exit__(self, *exc_info) -> None:
        self._writer.close()

    def _write(self, topic: str, msg, stamp_ns: int) -> None:
        if topic not in self._connections:  # optional topics get a connection when first written
            self._connections[topic] = self._writer.add_connection(topic, msg.__msgtype__,
                                                                   typestore=convert.typestore())
        connection = self._connections[topic]
        self._writer.write(connection, stamp_ns, convert.typestore().serialize_cdr(msg, connection.msgtype))

    def write_frame(self, frame: SequenceFrame, odom_pose_covariance: np.ndarray | None = None,
                    odom_twist_covariance: np.ndarray | None = None) -> None:
        t, s = self.topics, frame.stamp_ns
        image = frame.image
        if self.image_format == "raw":
            self._write(t.image, convert.image_to_msg(image, s, t.camera_frame, "rgb8" if image.ndim == 3 else "mono8"),
                        s)
        else:
            self._write(t.image + "/compressed", convert.image_to_compressed_msg(
                image, s, t.camera_frame, self.image_format, self.jpeg_quality), s)
        if frame.depth is not None:
            self._write(t.depth, convert.image_to_msg(frame.depth.astype(np.float32), s, t.camera_frame, "32FC1"), s)
        if frame.K is not None:
            self._write(t.camera_info, convert.camera_info_to_msg(frame.K, image.shape[1], image.shape[0], s,
                                                                  t.camera_frame), s)
        if frame.T_map_camera is not None:
            self._write(t.ground_truth, convert.pose_stamped_to_msg(frame.T_map_camera, s, t.map_frame), s)
        if frame.T_odom_camera is not None:
            zeros = np.zeros(3)
            self._write(t.odometry, convert.odometry_to_msg(
                frame.T_odom_camera, s, t.odom_frame, t.camera_frame,
                frame.odom_linear_velocity if frame.odom_linear_velocity is not None else zeros,
                frame.odom_angular_velocity if frame.odom_angular_velocity is not None else zeros,
                odom_pose_covariance if odom_pose_covariance is not None else np.zeros((6, 6)),
                odom_twist_covariance if odom_twist_covariance is not None else np.zeros((6, 6))), s)
        if frame.map_points is not None:
            self._write(t.map_points, convert.map_points_to_msg(*frame.map_points, s, t.camera_frame), s)


def read_raw_messages(path: Path | str) -> list[tuple[str, int, bytes]]:
    """All messages as (topic, log time ns, CDR bytes), in bag order (for exact comparisons)."""
    from rosbags.rosbag2 import Reader

    with Reader(Path(path)) as reader:
        return [(c.topic, int(t), bytes(raw)) for c, t, raw in reader.messages()]


def read_sequence(path: Path | str, topics: SequenceTopics = DEFAULT_TOPICS) -> Iterator[SequenceFrame]:
    """Iterate the frames of a bag in stamp order (a frame per message on ``topics.image``).

    The image topic may hold sensor_msgs/Image or sensor_msgs/CompressedImage; when the bag has no
    ``topics.image`` but has ``topics.image + "/compressed"`` (image_transport), that one is read."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no bag at {path}")
    store = convert.typestore()
    with Reader(path) as reader:
        if topics.image not in reader.topics and topics.image + "/compressed" in reader.topics:
            topics = replace(topics, image=topics.image + "/compressed")
        wanted = {topics.image, topics.depth, topics.camera_info, topics.ground_truth, topics.odometry,
                  topics.map_points}
        connections = [c for c in reader.connections if c.topic in wanted]
        if not any(c.topic == topics.image for c in connections):
            raise ValueError(f"{path} has no {topics.image} topic; topics: {sorted(reader.topics)}")
        pending: dict[int, dict[str, object]] = {}
        index = 0

        def assemble(stamp: int, parts: dict[str, object]) -> SequenceFrame:
            image_msg = parts[topics.image]
            image = (convert.compressed_msg_to_image(image_msg) if image_msg.__msgtype__.endswith("CompressedImage")
                     else convert.msg_to_image(image_msg))
            frame = SequenceFrame(index=index, stamp_ns=stamp, image=image)
            if topics.depth in parts:
                frame.depth = _depth_metres(parts[topics.depth])
            if topics.camera_info in parts:
                frame.K = convert.msg_to_intrinsics(parts[topics.camera_info])
            if topics.ground_truth in parts:
                frame.T_map_camera = convert.msg_pose_to_matrix(parts[topics.ground_truth].pose)
            if topics.odometry in parts:
                odom = parts[topics.odometry]
                frame.T_odom_camera = convert.msg_pose_to_matrix(odom.pose.pose)
                lin, ang = odom.twist.twist.linear, odom.twist.twist.angular
                frame.odom_linear_velocity = np.array([lin.x, lin.y, lin.z])
                frame.odom_angular_velocity = np.array([ang.x, ang.y, ang.z])
            if topics.map_points in parts:
                frame.map_points = convert.msg_to_map_points(parts[topics.map_points])
            return frame

        for connection, _, raw in reader.messages(connections=connections):
            msg = store.deserialize_cdr(raw, connection.msgtype)
            stamp = convert.stamp_to_ns(msg.header.stamp)
            # Messages are in log-time order and log time == stamp, so a frame is complete once a later
            # stamp shows up.
            for old in sorted(s for s in pending if s < stamp):
                parts = pending.pop(old)
                if topics.image in parts:
                    yield assemble(old, parts)
                    index += 1
            pending.setdefault(stamp, {})[connection.topic] = msg
        for old in sorted(pending):
            if topics.image in pending[old]:
                yield assemble(old, pending[old])
                index += 1


def _depth_metres(msg) -> np.ndarray:
    depth = convert.msg_to_image(msg)
    if msg.encoding == "16UC1":
        metres = depth.astype(np.float32) / 1000.0
        metres[depth == 0] = np.nan
        return metres
    return depth.astype(np.float32, copy=False)
