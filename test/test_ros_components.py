"""The node's parts without DDS: work queue, diagnostics semantics, camera model (k / p / distortion), markers,
effective parameter values. The same parts run over real DDS in test_ros_relocalization.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy (ROS 2 Python client) is not installed")
cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
from sensor_msgs.msg import CameraInfo  # noqa: E402

from feature_matching_ros.presets import preset_names  # noqa: E402
from feature_matching_ros.ros.camera_model import Undistorter, camera_model  # noqa: E402
from feature_matching_ros.ros.conversions import ConversionError  # noqa: E402
from feature_matching_ros.ros.diagnostics import ERROR, OK, WARN, HealthMonitor  # noqa: E402
from feature_matching_ros.ros.parameters import PARAMETERS, effective_values, preset_override  # noqa: E402
from feature_matching_ros.ros.work_queue import Job, WorkQueue  # noqa: E402


# ---------------------------------------------------------------------------------------------- work queue
def test_map_work_is_never_dropped_and_images_keep_the_newest():
    queue = WorkQueue(image_capacity=2)
    for i in range(1000):
        queue.push_map(Job("keyframe", i, 0.0, nbytes=10))
    dropped = sum(queue.push_image(Job("image", i, 0.0)) for i in range(5))
    assert dropped == 3 and queue.sizes() == {"map": 1000, "map_bytes": 10_000, "images": 2}
    order = [queue.next().payload for _ in range(1002)]
    assert order[:1000] == list(range(1000)) and order[1000:] == [3, 4]  # map first, FIFO; newest images
    assert queue.sizes() == {"map": 0, "map_bytes": 0, "images": 0}


def test_stop_wakes_a_waiting_consumer():
    queue = WorkQueue(1)
    result = []
    consumer = threading.Thread(target=lambda: result.append(queue.next(poll_s=10.0)))
    consumer.start()
    queue.stop()
    consumer.join(timeout=5.0)
    assert not consumer.is_alive() and result == [None]


# ---------------------------------------------------------------------------------------------- diagnostics
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_levels_come_from_the_recent_window_and_recover():
    clock = FakeClock()
    health = HealthMonitor(window_s=10.0, clock=clock)
    assert health.inputs_concern().level == OK
    health.event("rejected.unsupported_encoding")
    assert health.inputs_concern().level == WARN and "unsupported_encoding 1" in health.inputs_concern().message
    health.event("errors")
    assert health.processing_concern(0, 100).level == ERROR
    clock.now += 10.5  # the window has passed: back to OK
    assert health.inputs_concern().level == OK and health.processing_concern(0, 100).level == OK
    assert health.processing_concern(101, 100).level == WARN  # backlog is a state, not an event


def test_a_failed_then_successful_load_returns_the_map_to_ok():
    clock = FakeClock()
    health = HealthMonitor(window_s=10.0, clock=clock)
    health.map_load_failed("cannot load '/maps/x': manifest.json is missing")
    assert health.map_concern(3).level == ERROR and "previous map stays" in health.map_concern(3).message
    health.map_loaded()
    assert health.map_concern(5).level == OK
    # a map_path that failed at startup is a state: ERROR until a map loads, however long that takes
    health.startup_map_failed("cannot load map_path '/maps/y'")
    clock.now += 3600
    assert health.map_concern(0).level == ERROR and "empty map" in health.map_concern(0).message
    health.map_loaded()
    concerns = [health.map_concern(2), health.inputs_concern(), health.processing_concern(0, 100)]
    assert HealthMonitor.summary(concerns, "fine").level == OK


def test_event_memory_is_bounded():
    health = HealthMonitor(window_s=1e6)
    for _ in range(150_000):
        health.event("rejected.empty_image")
    assert sum(health.recent.counts("rejected.").values()) == 100_000


# ---------------------------------------------------------------------------------------------- camera model
K = np.array([[400.0, 0, 319.5], [0, 410.0, 239.5], [0, 0, 1]])


def _info(k=K, p=None, d=(), model="plumb_bob", width=640, height=480) -> CameraInfo:
    info = CameraInfo(width=width, height=height, distortion_model=model)
    info.k = np.asarray(k, float).ravel()
    info.p = np.asarray(p if p is not None else np.c_[k, np.zeros(3)], float).ravel()
    info.d = list(d)
    return info


def test_rectified_topics_take_the_intrinsics_from_p():
    P = np.array([[380.0, 0, 300.0, -38.0], [0, 380.0, 250.0, 0], [0, 0, 1, 0]])  # right camera of a stereo rig
    model = camera_model(_info(p=P, d=(-0.3, 0.1, 0, 0, 0)), (480, 640), use_rectified=True)
    assert np.allclose(model.K, P[:, :3]) and model.distortion is None  # d describes the raw image
    raw = camera_model(_info(p=P), (480, 640), use_rectified=False)
    assert np.allclose(raw.K, K)
    with pytest.raises(ConversionError) as error:
        camera_model(_info(p=np.zeros((3, 4))), (480, 640), use_rectified=True)
    assert error.value.kind == "missing_camera_info" and "P" in str(error.value)


def test_unsupported_distortion_is_refused_with_the_fix():
    with pytest.raises(ConversionError) as error:
        camera_model(_info(d=(0.1, 0.2, 0.3), model="plumb_bob"), (480, 640))
    assert error.value.kind == "unsupported_distortion" and "use_rectified_intrinsics" in str(error.value)
    with pytest.raises(ConversionError) as error:
        camera_model(_info(d=(0.1, 0, 0, 0, 0), model="double_sphere"), (480, 640))
    assert error.value.kind == "unsupported_distortion"
    assert camera_model(_info(d=(0.0,) * 5), (480, 640)).distortion is None  # zero d: already pinhole


@pytest.mark.parametrize("model, d", [("plumb_bob", (-0.28, 0.09, 0.001, -0.0005, 0.0)),
                                      ("equidistant", (-0.02, 0.01, -0.004, 0.001))])
def test_undistortion_puts_points_where_the_pinhole_camera_sees_them(model, d):
    """Dots drawn where the DISTORTED camera sees a grid of 3D points land, after undistortion, at the pinhole
    projections of those points with the same K (sub-pixel)."""
    xs, ys = np.meshgrid(np.linspace(-0.55, 0.55, 7), np.linspace(-0.4, 0.4, 5))
    points = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 1).astype(np.float64)
    coefficients = np.array(d)
    if model == "equidistant":
        distorted = cv2.fisheye.projectPoints(points[None], np.zeros(3), np.zeros(3), K, coefficients)[0][0]
    else:
        distorted = cv2.projectPoints(points, np.zeros(3), np.zeros(3), K, coefficients)[0][:, 0]
    pinhole = (points[:, :2] * [K[0, 0], K[1, 1]]) + K[:2, 2]
    image = np.zeros((480, 640), np.uint8)
    for x, y in distorted:  # anti-aliased 3 px dots at the distorted positions (sub-pixel via shift)
        cv2.circle(image, (round(x * 16), round(y * 16)), 3 * 16, 255, -1, cv2.LINE_AA, shift=4)
    camera = camera_model(_info(d=d, model=model), image.shape)
    undistorted = Undistorter().undistort(image, camera)
    count, _, _, centroids = cv2.connectedComponentsWithStats((undistorted > 40).astype(np.uint8))
    centroids = centroids[1:]
    assert count - 1 == len(points)
    nearest = np.linalg.norm(centroids[:, None] - pinhole[None], axis=2).min(axis=0)
    assert np.median(nearest) < 0.3 and nearest.max() < 0.8, nearest
    # without undistortion the dots are far off (the test would notice a no-op)
    assert np.linalg.norm(distorted - pinhole, axis=1).max() > 10


# ---------------------------------------------------------------------------------------------- map points
def _cloud(pixels: np.ndarray, points: np.ndarray):
    from feature_matching_ros.ros.conversions import map_points_to_cloud

    return map_points_to_cloud(pixels, points, 1_000_000_000, "camera_optical_frame")


def _map_points_kind(cloud, width: int = 320, height: int = 240) -> str:
    from feature_matching_ros.ros.conversions import cloud_to_map_points

    with pytest.raises(ConversionError) as error:
        cloud_to_map_points(cloud, width, height)
    return error.value.kind


def test_map_points_cross_the_ros_message_unchanged():
    from sensor_msgs.msg import PointCloud2

    from feature_matching_ros.ros.conversions import cloud_to_map_points

    rng = np.random.default_rng(0)
    pixels = np.c_[rng.uniform(-0.5, 319.5, 50), rng.uniform(-0.5, 239.5, 50)].astype(np.float32)
    points = rng.uniform(0.5, 4.0, (50, 3)).astype(np.float32)
    got_pixels, got_points, dropped = cloud_to_map_points(_cloud(pixels, points), 320, 240)
    assert np.array_equal(got_pixels, pixels) and np.array_equal(got_points, points) and dropped == 0
    assert cloud_to_map_points(PointCloud2(), 320, 240) is None  # an empty cloud: no map points


def test_a_foreign_layout_is_read_by_its_fields():
    """Another producer's cloud: fields in another order with an extra one, big-endian, padded points and rows."""
    from sensor_msgs.msg import PointCloud2, PointField

    from feature_matching_ros.ros.conversions import cloud_to_map_points

    pixels = np.array([[10.0, 20.0], [30.5, 40.25], [0.0, 239.0]], np.float32)
    points = np.array([[0.1, 0.2, 1.5], [-0.3, 0.4, 2.5], [1.0, -1.0, 9.0]], np.float32)
    names = ("z", "intensity", "u", "x", "v", "y")  # 6 floats + 4 padding bytes per point
    values = {"z": points[:, 2], "intensity": np.full(3, 7.0), "u": pixels[:, 0], "x": points[:, 0],
              "v": pixels[:, 1], "y": points[:, 1]}
    point_step, width, height = 28, 3, 1
    row = np.zeros((width, point_step), np.uint8)
    for i, name in enumerate(names):
        row[:, 4 * i:4 * i + 4] = np.asarray(values[name], ">f4").reshape(-1, 1).view(np.uint8)
    data = np.r_[row.ravel(), np.zeros(8, np.uint8)]  # row padding
    cloud = PointCloud2(height=height, width=width, point_step=point_step, row_step=width * point_step + 8,
                        is_bigendian=True, is_dense=True, data=data.tobytes(),
                        fields=[PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                                for i, n in enumerate(names)])
    got_pixels, got_points, _ = cloud_to_map_points(cloud, 320, 240)
    assert np.array_equal(got_pixels, pixels) and np.array_equal(got_points, points)


def test_unusable_map_points_are_refused_with_their_reason_code():
    from sensor_msgs.msg import PointField

    from feature_matching_ros.ros.conversions import cloud_to_map_points

    pixels = np.array([[10.0, 20.0], [300.0, 200.0]], np.float32)
    points = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 3.0]], np.float32)
    cloud = _cloud(pixels, points)
    cloud.fields = cloud.fields[:4]
    assert _map_points_kind(cloud) == "map_points_missing_fields"
    cloud = _cloud(pixels, points)
    cloud.fields[4].datatype = PointField.FLOAT64  # z is not float32
    assert _map_points_kind(cloud) == "map_points_missing_fields"
    cloud = _cloud(pixels, points)
    cloud.data = cloud.data[:-4]  # the last point is cut short
    assert _map_points_kind(cloud) == "map_points_size_mismatch"
    cloud = _cloud(pixels, points)
    cloud.width = 3  # says three points, holds two
    assert _map_points_kind(cloud) == "map_points_size_mismatch"
    cloud = _cloud(pixels, points)
    cloud.point_step = 16  # field z at offset 16 does not fit
    assert _map_points_kind(cloud) == "map_points_size_mismatch"
    assert _map_points_kind(_cloud(pixels, np.array([[0, 0, 1.0], [np.nan, 2, 3]]))) == "map_points_not_finite"
    assert _map_points_kind(_cloud(np.array([[10, 20], [np.inf, 5]]), points)) == "map_points_not_finite"
    # Pixels of a 640x480 image sent with the 320x240 keyframe image.
    assert _map_points_kind(_cloud(pixels * 2, points)) == "map_points_outside_image"
    assert _map_points_kind(_cloud(np.array([[10, 20], [10, -0.6]]), points)) == "map_points_outside_image"
    # A distorted camera's undistorted keypoints may fall outside the undistorted image: dropped, not refused.
    kept_pixels, kept_points, dropped = cloud_to_map_points(_cloud(np.array([[10, 20], [-3, 5]]), points), 320, 240,
                                                            drop_outside=True)
    assert dropped == 1 and np.array_equal(kept_pixels, [[10, 20]]) and np.array_equal(kept_points, points[:1])


# ---------------------------------------------------------------------------------------------- markers
def test_markers_show_posed_keyframes_and_loops_between_them():
    from visualization_msgs.msg import Marker

    from feature_matching_ros.ros.markers import map_markers

    positions = {1: np.zeros(3), 2: np.array([1.0, 0, 0]), 5: np.array([100.0, 2.0, 0])}
    array = map_markers(positions, [(5, 1), (7, 1)], "map", _stamp())
    clear, keyframes, loops = array.markers
    assert clear.action == Marker.DELETEALL
    assert keyframes.type == Marker.SPHERE_LIST and len(keyframes.points) == 3
    assert loops.type == Marker.LINE_LIST and len(loops.points) == 2  # loop 7-1: keyframe 7 has no pose
    assert (loops.points[0].x, loops.points[1].x) == (100.0, 0.0) and keyframes.header.frame_id == "map"


def _stamp():
    from builtin_interfaces.msg import Time

    return Time(sec=1)


# ---------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("preset", preset_names())
def test_every_override_parameter_has_the_presets_effective_value(preset):
    from feature_matching_ros.presets import build_configs

    values = effective_values(preset)
    overrides = [spec for spec in PARAMETERS if spec.override_key is not None]
    assert set(values) == {spec.name for spec in overrides}
    assert all(type(values[spec.name]) is spec.type for spec in overrides)
    assert preset_override(values, values) == {}  # the preset's own values override nothing
    pipeline, engine = build_configs(preset, preset_override(values))  # all values given explicitly: same config
    assert (pipeline, engine.to_dict()) == (build_configs(preset)[0], build_configs(preset)[1].to_dict())
    changed = dict(values, **{"pipeline.features.max_keypoints": 77})
    assert preset_override(changed, values) == {"pipeline": {"features": {"max_keypoints": 77}}}
