"""sensor_msgs / geometry_msgs / nav_msgs <-> numpy, on rosbags' typestore (Stores.ROS2_KILTED).

Images are converted by hand (``np.frombuffer``): zero-copy on read, and no cv_bridge (the PyPI port
breaks on numpy 2). Supported encodings: rgb8, bgr8, mono8, 32FC1 (depth in metres), 16UC1 (depth in mm).
sensor_msgs/CompressedImage (what robots usually record, image_transport's ``.../compressed`` topics) holds a
JPEG or PNG colour or gray image; it is decoded with OpenCV to rgb8 / mono8 (``compressed_msg_to_image``).
Poses are 4x4 homogeneous matrices; quaternions are (x, y, z, w) as in ROS, via scipy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.spatial.transform import Rotation

ENCODINGS = {"rgb8": (np.uint8, 3), "bgr8": (np.uint8, 3), "mono8": (np.uint8, 1), "32FC1": (np.float32, 1),
             "16UC1": (np.uint16, 1)}


@lru_cache(maxsize=1)
def typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _types():
    return typestore().types


def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def header(stamp_ns: int, frame_id: str):
    types = _types()
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                        frame_id=frame_id)


def image_to_msg(image: np.ndarray, stamp_ns: int, frame_id: str, encoding: str):
    """numpy (H, W[, C]) -> sensor_msgs/Image. The dtype and channels must match the encoding."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")
    dtype, channels = ENCODINGS[encoding]
    image = np.ascontiguousarray(image)
    if image.dtype != dtype or (image.shape[2] if image.ndim == 3 else 1) != channels:
        raise ValueError(f"{encoding} needs dtype {np.dtype(dtype).name} with {channels} channel(s), "
                         f"got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    return _types()["sensor_msgs/msg/Image"](
        header=header(stamp_ns, frame_id), height=height, width=width, encoding=encoding,
        is_bigendian=int(np.dtype(dtype).byteorder == ">"), step=width * channels * np.dtype(dtype).itemsize,
        data=image.reshape(-1).view(np.uint8),
    )


def msg_to_image(msg) -> np.ndarray:
    """sensor_msgs/Image -> numpy (H, W, C) or (H, W); honours ``step`` padding and endianness."""
    if msg.encoding not in ENCODINGS:
        raise ValueError(f"unsupported encoding {msg.encoding!r}; supported: {', '.join(ENCODINGS)}")
    dtype, channels = ENCODINGS[msg.encoding]
    dtype = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    row_bytes = msg.width * channels * dtype.itemsize
    rows = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data, np.uint8)
    rows = rows.reshape(msg.height, msg.step)[:, :row_bytes]
    image = np.ascontiguousarray(rows).view(dtype).reshape(msg.height, msg.width, channels)
    image = image.astype(dtype.newbyteorder("="), copy=False)
    return image[..., 0] if channels == 1 else image


COMPRESSED_FORMATS = ("jpeg", "png")


def image_to_compressed_msg(image: np.ndarray, stamp_ns: int, frame_id: str, image_format: str = "jpeg",
                            jpeg_quality: int = 95):
    """numpy (H, W, 3) RGB or (H, W) gray uint8 -> sensor_msgs/CompressedImage (image_transport's format string,
    e.g. ``"rgb8; jpeg compressed bgr8"``)."""
    import cv2

    if image_format not in COMPRESSED_FORMATS:
        raise ValueError(f"unsupported compressed format {image_format!r}; supported: {', '.join(COMPRESSED_FORMATS)}")
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"compressed images are (H, W) or (H, W, 3) uint8, got {image.dtype} {image.shape}")
    colour = image.ndim == 3
    parameters = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if image_format == "jpeg" else []
    ok, data = cv2.imencode("." + ("jpg" if image_format == "jpeg" else "png"),
                            cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if colour else image, parameters)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as {image_format}")
    described = f"rgb8; {image_format} compressed bgr8" if colour else f"mono8; {image_format} compressed mono8"
    return _types()["sensor_msgs/msg/CompressedImage"](header=header(stamp_ns, frame_id), format=described,
                                                        data=data.reshape(-1))


def compressed_msg_to_image(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG, colour or gray) -> (H, W, 3) RGB or (H, W) uint8.

    Raises ValueError for what is not a decodable 8-bit image: compressedDepth payloads (depth travels
    uncompressed here), 16-bit PNGs, or corrupt data."""
    import cv2

    described = str(msg.format).lower()
    if "compresseddepth" in described:
        raise ValueError(f"compressed depth ({msg.format!r}) is not supported; record depth as sensor_msgs/Image")
    data = np.frombuffer(bytes(msg.data) if not isinstance(msg.data, np.ndarray) else msg.data, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if len(data) else None
    if image is None:
        raise ValueError(f"compressed image ({msg.format!r}, {len(data)} bytes) could not be decoded")
    if image.dtype != np.uint8:
        raise ValueError(f"compressed image ({msg.format!r}) is {image.dtype}; 8-bit images only")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim == 3:
        # OpenCV decodes into BGR order; a payload encoded from RGB bytes ("... compressed rgb8") is RGB already.
        return image if "compressed rgb8" in described else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def camera_info_to_msg(K: np.ndarray, width: int, height: int, stamp_ns: int, frame_id: str):
    """Pinhole CameraInfo without distortion (plumb_bob with zero coefficients), P = [K | 0]."""
    K = np.asarray(K, dtype=np.float64)
    P = np.zeros((3, 4))
    P[:, :3] = K
    types = _types()
    return types["sensor_msgs/msg/CameraInfo"](
        header=header(stamp_ns, frame_id), height=height, width=width, distortion_model="plumb_bob",
        d=np.zeros(5), k=K.reshape(-1), r=np.eye(3).reshape(-1), p=P.reshape(-1), binning_x=0, binning_y=0,
        roi=types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )


def msg_to_intrinsics(msg) -> np.ndarray:
    return np.asarray(msg.k, dtype=np.float64).reshape(3, 3).copy()


def pose_to_msg_pose(T: np.ndarray):
    types = _types()
    T = np.asarray(T, dtype=np.float64)
    qx, qy, qz, qw = Rotation.from_matrix(T[:3, :3]).as_quat()
    return types["geometry_msgs/msg/Pose"](
        position=types["geometry_msgs/msg/Point"](x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
        orientation=types["geometry_msgs/msg/Quaternion"](x=float(qx), y=float(qy), z=float(qz), w=float(qw)),
    )


def msg_pose_to_matrix(pose) -> np.ndarray:
    T = np.eye(4)
    q = pose.orientation
    T[:3, :3] = Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix()
    T[:3, 3] = [pose.position.x, pose.position.y, pose.position.z]
    return T


def pose_stamped_to_msg(T: np.ndarray, stamp_ns: int, frame_id: str):
    return _types()["geometry_msgs/msg/PoseStamped"](header=header(stamp_ns, frame_id), pose=pose_to_msg_pose(T))


def odometry_to_msg(T_odom_child: np.ndarray, stamp_ns: int, frame_id: str, child_frame_id: str,
                    linear_velocity: np.ndarray, angular_velocity: np.ndarray,
                    pose_covariance: np.ndarray, twist_covariance: np.ndarray):
    """nav_msgs/Odometry; velocities are in the child frame, covariances 6x6 (x y z rx ry rz)."""
    types = _types()
    vector3 = types["geometry_msgs/msg/Vector3"]
    return types["nav_msgs/msg/Odometry"](
        header=header(stamp_ns, frame_id), child_frame_id=child_frame_id,
        pose=types["geometry_msgs/msg/PoseWithCovariance"](
            pose=pose_to_msg_pose(T_odom_child), covariance=np.asarray(pose_covariance, np.float64).reshape(-1)),
        twist=types["geometry_msgs/msg/TwistWithCovariance"](
            twist=types["geometry_msgs/msg/Twist"](
                linear=vector3(x=float(linear_velocity[0]), y=float(linear_velocity[1]), z=float(linear_velocity[2])),
                angular=vector3(x=float(angular_velocity[0]), y=float(angular_velocity[1]),
                                z=float(angular_velocity[2]))),
            covariance=np.asarray(twist_covariance, np.float64).reshape(-1)),
    )


# sensor_msgs/PointField datatype FLOAT32; the map-points cloud carries these fields, in this order.
_FLOAT32 = 7
MAP_POINT_FIELDS = ("u", "v", "x", "y", "z")


def map_points_to_msg(pixels: np.ndarray, points: np.ndarray, stamp_ns: int, frame_id: str):
    """A keyframe's backend map points as sensor_msgs/PointCloud2 with float32 fields u, v (pixel of the
    observing keypoint) and x, y, z (the point in the camera frame ``frame_id``, backend units); one point per
    row of (P, 2) ``pixels`` and (P, 3) ``points``."""
    types = _types()
    rows = np.ascontiguousarray(np.c_[np.asarray(pixels, np.float32).reshape(-1, 2),
                                      np.asarray(points, np.float32).reshape(-1, 3)], dtype="<f4")
    fields = [types["sensor_msgs/msg/PointField"](name=name, offset=4 * i, datatype=_FLOAT32, count=1)
              for i, name in enumerate(MAP_POINT_FIELDS)]
    return types["sensor_msgs/msg/PointCloud2"](
        header=header(stamp_ns, frame_id), height=1, width=len(rows), fields=fields, is_bigendian=False,
        point_step=4 * len(MAP_POINT_FIELDS), row_step=4 * len(MAP_POINT_FIELDS) * len(rows),
        data=rows.reshape(-1).view(np.uint8), is_dense=True)


def msg_to_map_points(msg) -> tuple[np.ndarray, np.ndarray]:
    """sensor_msgs/PointCloud2 (a rosbags or an rclpy message) with float32 fields u, v, x, y, z (any order, any
    point_step, rows padded to row_step) -> ((P, 2) pixels, (P, 3) camera-frame points), P = height x width.

    Raises ValueError naming what is wrong: a field that is missing or not float32 ("map point cloud lacks ..."), or
    a layout the data does not fit ("map point cloud size: ..."). Values are returned as they are (NaN included):
    what counts as a usable point is the caller's decision."""
    offsets = {f.name: int(f.offset) for f in msg.fields if int(f.datatype) == _FLOAT32}
    missing = [name for name in MAP_POINT_FIELDS if name not in offsets]
    if missing:
        raise ValueError(f"map point cloud lacks float32 fields {missing} (needs {', '.join(MAP_POINT_FIELDS)})")
    height, width, step, row_step = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    beyond = [name for name in MAP_POINT_FIELDS if offsets[name] + 4 > step]
    if beyond:
        raise ValueError(f"map point cloud size: fields {beyond} end beyond point_step {step}")
    if row_step < width * step:
        raise ValueError(f"map point cloud size: row_step {row_step} < width {width} x point_step {step}")
    data = msg.data
    raw = np.asarray(data, np.uint8).reshape(-1) if isinstance(data, (list, tuple)) else np.frombuffer(data, np.uint8)
    if len(raw) != height * row_step:
        raise ValueError(f"map point cloud size: {len(raw)} bytes of data for height {height} x row_step {row_step} "
                         f"= {height * row_step} ({height * width} points of {step} bytes)")
    rows = raw.reshape(height, row_step)[:, :width * step].reshape(height * width, step)
    dtype = np.dtype(">f4" if msg.is_bigendian else "<f4")
    column = lambda name: rows[:, offsets[name]:offsets[name] + 4].copy().view(dtype).reshape(-1)  # noqa: E731
    pixels = np.stack([column("u"), column("v")], 1).astype(np.float32)
    points = np.stack([column("x"), column("y"), column("z")], 1).astype(np.float32)
    return pixels, points
