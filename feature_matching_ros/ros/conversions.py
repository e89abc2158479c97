"""sensor_msgs/geometry_msgs <-> numpy, by hand (no cv_bridge), with validation that names what is wrong.

Images: ``np.frombuffer`` over the message buffer, so unpadded rows are a zero-copy view. Supported encodings:
mono8/8UC1, mono16/16UC1, bgr8, rgb8, bgra8, rgba8 (camera images) and 16UC1 (millimetres) / 32FC1 (metres)
(depth). Colour images come out RGB(A) as the core expects (BGR is a reversed view, no copy). Camera images may
also arrive as sensor_msgs/CompressedImage (JPEG or PNG, image_transport's ``compressed``). Everything else
raises :class:`ConversionError` whose ``kind`` is a short stable key the node counts rejections by.

Poses: ``T_a_b`` 4x4 matrices (maps points from b to a). Covariances and information matrices are 6x6 in ROS
order (x, y, z, rot x, rot y, rot z).

Backend map points (Keyframe.map_points, sensor_msgs/PointCloud2 with float32 u, v, x, y, z): decoded by the bag
layer's converter (bag/convert.py), the one reader of that layout, then checked for what the core cannot use.
"""

from __future__ import annotations

import math

import numpy as np
from geometry_msgs.msg import Pose, Quaternion, Transform, Vector3
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CompressedImage, Image, PointCloud2

from feature_matching_ros.bag import convert as bag_convert
from feature_matching_ros.ros.reason_codes import reason_code

# encoding -> (sample dtype, channels)
_ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "32FC1": (np.dtype(np.float32), 1),
}
IMAGE_ENCODINGS = ("mono8", "8UC1", "mono16", "16UC1", "rgb8", "bgr8", "rgba8", "bgra8")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")


class ConversionError(ValueError):
    """A message cannot be used. ``kind`` is a short key for counting (e.g. ``unsupported_encoding``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def image_to_numpy(msg: Image, allowed: tuple[str, ...] | None = None, what: str = "image") -> np.ndarray:
    """Return ``(H, W)`` or ``(H, W, C)`` with the message's dtype; colour in RGB(A) order.

    The result may be a read-only view of the message buffer; copy it before modifying or keeping it
    beyond the message's lifetime if that matters.
    """
    encoding = msg.encoding
    if encoding not in _ENCODINGS or (allowed is not None and encoding not in allowed):
        supported = allowed if allowed is not None else tuple(_ENCODINGS)
        raise ConversionError("unsupported_encoding",
                              f"{what} encoding {encoding!r} is not supported; use one of {', '.join(supported)}")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ConversionError("empty_image", f"{what} is empty ({width}x{height})")
    dtype, channels = _ENCODINGS[encoding]
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ConversionError("step_mismatch", f"{what} step {step} < width {width} x {channels * dtype.itemsize} "
                              f"bytes per pixel = {row_bytes} ({encoding})")
    data = msg.data
    if len(data) != step * height:
        raise ConversionError("step_mismatch", f"{what} has {len(data)} bytes of data, expected step {step} x "
                              f"height {height} = {step * height}")
    if dtype.itemsize > 1 and step % dtype.itemsize:
        raise ConversionError("step_mismatch", f"{what} step {step} is not a multiple of the {dtype.itemsize}-byte "
                              f"sample size of {encoding}")
    buffer = np.frombuffer(data, dtype=np.uint8)
    rows = buffer.reshape(height, step)[:, :row_bytes]  # drops row padding (still a view)
    sample_dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<") if dtype.itemsize > 1 else dtype
    # Rows are contiguous even when padded (strides (step, 1)), so reinterpreting the samples stays a view.
    array = rows.view(sample_dtype)
    array = array.reshape(height, width, channels) if channels > 1 else array.reshape(height, width)
    if not sample_dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))  # foreign byte order: one converting copy
    if encoding == "bgr8":
        array = array[:, :, ::-1]
    elif encoding == "bgra8":
        array = array[:, :, [2, 1, 0, 3]]
    return array


def camera_image_to_numpy(msg: Image | CompressedImage, what: str = "image") -> np.ndarray:
    """A camera image, raw (:func:`image_to_numpy` with IMAGE_ENCODINGS) or compressed (image_transport's
    ``compressed``: JPEG or PNG, decoded by the bag layer's decoder, the one reader of that format), as an owned
    (H, W[, C]) array in RGB order. An undecodable payload or compressed depth raises ``undecodable_image``."""
    if isinstance(msg, CompressedImage):
        try:
            return bag_convert.compressed_msg_to_image(msg)
        except ValueError as error:
            raise ConversionError("undecodable_image", f"{what}: {error}") from error
    return np.array(image_to_numpy(msg, IMAGE_ENCODINGS, what))  # rclpy reuses the buffer: keep a copy


def depth_to_metres(msg: Image, what: str = "depth") -> np.ndarray | None:
    """Depth image -> ``(H, W)`` float32 metres (0 = invalid); ``None`` for an empty message (no depth)."""
    if msg.width == 0 and msg.height == 0 and len(msg.data) == 0:
        return None
    depth = image_to_numpy(msg, DEPTH_ENCODINGS, what)
    if depth.dtype == np.uint16:
        return depth.astype(np.float32) * np.float32(0.001)
    return np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)


def numpy_to_image(array: np.ndarray, encoding: str, header=None) -> Image:
    """``(H, W)`` / ``(H, W, C)`` array -> Image with the given encoding (array must already be in that order)."""
    if encoding not in _ENCODINGS:
        raise ConversionError("unsupported_encoding", f"cannot encode {encoding!r}")
    dtype, channels = _ENCODINGS[encoding]
    array = np.ascontiguousarray(array, dtype=dtype)
    if array.ndim != (2 if channels == 1 else 3) or (channels > 1 and array.shape[2] != channels):
        raise ConversionError("bad_shape", f"array of shape {array.shape} does not fit {encoding}")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0 if array.dtype.byteorder in ("<", "=", "|") else 1
    msg.step = int(array.shape[1] * channels * dtype.itemsize)
    msg.data = array.tobytes()
    return msg


def pose_to_matrix(pose: Pose, what: str = "pose") -> np.ndarray:
    """geometry_msgs/Pose -> 4x4; NaN or a zero-norm quaternion raise ConversionError(invalid_pose)."""
    position = np.array([pose.position.x, pose.position.y, pose.position.z], dtype=np.float64)
    quaternion = np.array([pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w])
    if not (np.isfinite(position).all() and np.isfinite(quaternion).all()):
        raise ConversionError("invalid_pose", f"{what} contains NaN or infinite values")
    norm = float(np.linalg.norm(quaternion))
    if not 0.5 < norm < 1.5:
        raise ConversionError("invalid_pose", f"{what} orientation quaternion has norm {norm:.3g}, not 1")
    transform = np.eye(4)
    transform[:3, :3] = Rotation.from_quat(quaternion / norm).as_matrix()
    transform[:3, 3] = position
    return transform


def matrix_to_pose(transform: np.ndarray) -> Pose:
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in transform[:3, 3])
    pose.orientation = _quaternion(transform[:3, :3])
    return pose


def matrix_to_transform(transform: np.ndarray) -> Transform:
    msg = Transform()
    msg.translation = Vector3(x=float(transform[0, 3]), y=float(transform[1, 3]), z=float(transform[2, 3]))
    msg.rotation = _quaternion(transform[:3, :3])
    return msg


def transform_to_matrix(msg: Transform) -> np.ndarray:
    transform = np.eye(4)
    q = msg.rotation
    transform[:3, :3] = Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix()
    transform[:3, 3] = [msg.translation.x, msg.translation.y, msg.translation.z]
    return transform


def _quaternion(rotation: np.ndarray) -> Quaternion:
    x, y, z, w = Rotation.from_matrix(rotation).as_quat()
    return Quaternion(x=float(x), y=float(y), z=float(z), w=float(w))


def covariance_6x6(values) -> np.ndarray:
    """A 36-element ROS covariance (row-major) -> 6x6; raises ConversionError when it holds NaN."""
    matrix = np.asarray(values, dtype=np.float64).reshape(6, 6)
    if not np.isfinite(matrix).all():
        raise ConversionError("invalid_pose", "pose covariance contains NaN or infinite values")
    return matrix


def stamp_to_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def finite_or_zero(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def map_points_to_cloud(pixels: np.ndarray, points: np.ndarray, stamp_ns: int, frame_id: str) -> PointCloud2:
    """(P, 2) keypoint pixels + (P, 3) camera-frame points -> Keyframe.map_points: the bag layer's cloud
    (bag/convert.py ``map_points_to_msg``) carried over to the rclpy type through its serialised bytes."""
    from rclpy.serialization import deserialize_message

    msg = bag_convert.map_points_to_msg(pixels, points, stamp_ns, frame_id)
    data = bag_convert.typestore().serialize_cdr(msg, "sensor_msgs/msg/PointCloud2")
    return deserialize_message(bytes(data), PointCloud2)


def _map_points_error(message: str) -> ConversionError:
    return ConversionError(reason_code(message).value, message)


def cloud_to_map_points(cloud: PointCloud2, width: int, height: int, drop_outside: bool = False
                        ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Keyframe.map_points -> ((P, 2) float32 pixels, (P, 3) float32 camera-frame points, number of points dropped
    outside the image), or None for an empty cloud (the keyframe has none).

    The whole cloud is refused -- ConversionError whose ``kind`` is a ``map_points_*`` reason code
    (reason_codes.py) -- when its fields or size do not fit the layout, when any value is NaN or infinite (a
    backend that sends those has lost track of its points), or when a pixel lies outside the ``width`` x ``height``
    image ((0, 0) = centre of the top-left pixel, so [-0.5, width - 0.5] x [-0.5, height - 0.5]): pixels of
    another resolution or camera would attach 3D to the wrong keypoints. ``drop_outside``: the image was distorted
    and the node undistorts it to the same size, so a backend's undistorted keypoints near the borders may
    legitimately fall outside it; those points are dropped (and counted by the caller) instead."""
    if int(cloud.width) * int(cloud.height) == 0 and len(cloud.data) == 0:
        return None
    try:
        pixels, points = bag_convert.msg_to_map_points(cloud)
    except ValueError as error:
        raise _map_points_error(str(error)) from error
    finite = np.isfinite(pixels).all(1) & np.isfinite(points).all(1)
    if not finite.all():
        raise _map_points_error(f"map points contain NaN or infinite values ({int((~finite).sum())} of "
                                f"{len(finite)} points)")
    inside = ((pixels >= -0.5).all(1) & (pixels[:, 0] <= width - 0.5) & (pixels[:, 1] <= height - 0.5))
    if not inside.all() and not drop_outside:
        outside = pixels[~inside]
        raise _map_points_error(f"map point pixels outside the image: {len(outside)} of {len(pixels)} points, "
                                f"u in [{pixels[:, 0].min():.1f}, {pixels[:, 0].max():.1f}], v in "
                                f"[{pixels[:, 1].min():.1f}, {pixels[:, 1].max():.1f}] for a {width}x{height} "
                                "image (pixels of another resolution or camera?)")
    dropped = int((~inside).sum())
    return pixels[inside], points[inside], dropped
