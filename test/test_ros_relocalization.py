"""relocalization_node over real DDS on localhost: the engine behind keyframes, loop candidates, services, raw
images, map persistence across a restart, parameters, bad input.

Ground truth: scikit-image's Middlebury ``stereo_motorcycle`` rectified pair (f=994.978, cx=311.193,
cy=254.877, doffs=31.086, baseline 193.001 mm; GT disparity -> metric depth for the left view). The right
camera is the left one translated by +baseline along x, so X_right = X_left - (b, 0, 0) and
T_left_right = translation (+b, 0, 0). Images are downscaled to 320 px wide and matched with 256 keypoints
so the file runs in well under a minute on 2 CPU cores.

Isolation: a random ROS_DOMAIN_ID per session and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST. The node runs
in-process on a MultiThreadedExecutor thread that is joined before rclpy.shutdown().
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 Python client) is not installed")
import feature_matching_ros.ros  # noqa: E402,F401  (merges the generated interfaces into the package)

try:
    from feature_matching_ros.msg import Keyframe, LoopCandidates, LoopClosure, Matches
    from feature_matching_ros.srv import LoadMap, MatchImages, Relocalize, SaveMap
except ImportError as error:  # pragma: no cover - depends on the build
    pytest.skip(f"feature_matching_ros interfaces are not built (scripts/build_interfaces.sh): {error}",
                allow_module_level=True)
cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rcl_interfaces.msg import ParameterType  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from feature_matching_ros.ros import conversions as conv  # noqa: E402
from feature_matching_ros.ros.parameters import PARAMETERS, effective_values, preset_override  # noqa: E402
from feature_matching_ros.ros.relocalization_node import ParameterError, RelocalizationNode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDTH = 320
FOCAL, CX, CY, DOFFS, BASELINE_M = 994.978, 311.193, 254.877, 31.086, 0.193001
# The cpu preset, smaller, with a 5 s exclusion window (keyframes stamped within 5 s never close loops
# automatically) and a lower inlier threshold for 256 keypoints on a 320 px image.
FAST_PARAMETERS = {"preset": "cpu", "pipeline.features.max_keypoints": 256, "pipeline.features.resize_max": 320,
                   "engine.min_inliers": 20, "engine.temporal_consistency": 1, "engine.retrieval.exclude_recent_count": 0,
                   "engine.retrieval.exclude_recent_seconds": 5.0, "image_queue_size": 1, "publish_rejected": True,
                   "diagnostics_period_s": 0.2, "diagnostics_window_s": 2.0, "log_throttle_s": 0.0,
                   "markers_period_s": 0.2}


# ---------------------------------------------------------------------------------------------- ground truth
def _scaled_K(cx: float, scale: float) -> np.ndarray:
    # pixel-centre convention: x' = (x + 0.5) * s - 0.5
    return np.array([[FOCAL * scale, 0, (cx + 0.5) * scale - 0.5], [0, FOCAL * scale, (CY + 0.5) * scale - 0.5],
                     [0, 0, 1.0]])


@pytest.fixture(scope="module")
def stereo():
    left, right, disparity = skimage_data.stereo_motorcycle()
    scale = WIDTH / left.shape[1]
    size = (WIDTH, round(left.shape[0] * scale))
    depth = np.where(np.isfinite(disparity) & (disparity > 0), BASELINE_M * FOCAL / (disparity + DOFFS), 0.0)
    return {
        "left": cv2.resize(left, size, interpolation=cv2.INTER_AREA),
        "right": cv2.resize(right, size, interpolation=cv2.INTER_AREA),
        "depth_left": cv2.resize(depth.astype(np.float32), size, interpolation=cv2.INTER_NEAREST),
        "K_left": _scaled_K(CX, scale),
        "K_right": _scaled_K(CX + DOFFS, scale),
    }


def camera_info(K: np.ndarray, image: np.ndarray) -> CameraInfo:
    info = CameraInfo(width=image.shape[1], height=image.shape[0], distortion_model="plumb_bob")
    info.k = K.ravel().astype(float)
    return info


def keyframe_msg(keyframe_id: int, image: np.ndarray, K: np.ndarray, depth: np.ndarray | None = None,
                 T_map_camera: np.ndarray | None = None, stamp_s: float = 1.0) -> Keyframe:
    msg = Keyframe(id=keyframe_id)
    msg.header.frame_id = "map"
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp_s), int((stamp_s % 1) * 1e9)
    msg.image = conv.numpy_to_image(image, "rgb8")
    msg.image.header.frame_id = "camera"
    msg.camera_info = camera_info(K, image)
    if depth is not None:
        msg.depth = conv.numpy_to_image(np.round(depth * 1000).astype(np.uint16), "16UC1")  # millimetres
    if T_map_camera is None:
        msg.pose.covariance[0] = -1.0  # unknown pose
    else:
        msg.pose.pose = conv.matrix_to_pose(T_map_camera)
        msg.pose.covariance = (np.eye(6) * 1e-4).ravel()
    return msg


def rotation_error_deg(R: np.ndarray) -> float:
    return math.degrees(np.linalg.norm(Rotation.from_matrix(R).as_rotvec()))


def in_map(node: RelocalizationNode, keyframe_id: int) -> bool:
    try:
        node.engine.database.position_of(keyframe_id)
        return True
    except KeyError:
        return False


# ---------------------------------------------------------------------------------------------- DDS fixtures
@pytest.fixture(scope="module")
def ros_context():
    os.environ["ROS_DOMAIN_ID"] = str(random.randint(1, 100))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.shutdown(context=context)


class Harness:
    """The node under test plus a client node, both spun by one executor thread."""

    def __init__(self, context, parameters: dict, namespace: str = "") -> None:
        overrides = [Parameter(name, value=value) for name, value in parameters.items()]
        self.node = RelocalizationNode(context=context, parameter_overrides=overrides, namespace=namespace)
        self.client = rclpy.create_node("test_client", context=context, namespace=namespace)
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self.received: dict[str, list] = {"loop_closures": [], "rejected": [], "matches": [],
                                          "relocalization_pose": [], "diagnostics": [], "debug": [], "markers": []}
        self._lock = threading.Lock()
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        for topic, kind, key in (("loop_closures", LoopClosure, "loop_closures"),
                                 ("loop_closures/rejected", LoopClosure, "rejected"), ("matches", Matches, "matches"),
                                 ("relocalization_pose", PoseWithCovarianceStamped, "relocalization_pose"),
                                 ("/diagnostics", DiagnosticArray, "diagnostics"),
                                 ("debug/matches_image", Image, "debug"), ("markers", MarkerArray, "markers")):
            self.client.create_subscription(kind, topic, lambda msg, key=key: self._store(key, msg), reliable)
        self.keyframes = self.client.create_publisher(Keyframe, "keyframes", reliable)
        self.candidates = self.client.create_publisher(LoopCandidates, "loop_candidates", reliable)
        self.image = self.client.create_publisher(Image, "image", qos_profile_sensor_data
                                                  if parameters.get("image_qos", "sensor_data") == "sensor_data"
                                                  else reliable)
        self.camera_info = self.client.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data
                                                        if parameters.get("image_qos", "sensor_data") == "sensor_data"
                                                        else reliable)
        self.match_images = self.client.create_client(MatchImages, "match_images")
        self.relocalize = self.client.create_client(Relocalize, "relocalize")
        self.save_map = self.client.create_client(SaveMap, "save_map")
        self.load_map = self.client.create_client(LoadMap, "load_map")
        self.get_parameters = self.client.create_client(GetParameters, "relocalization_node/get_parameters")
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.wait_for(lambda: self.keyframes.get_subscription_count() > 0
                      and self.match_images.service_is_ready(), 10.0, "discovery")

    def _store(self, key: str, msg) -> None:
        with self._lock:
            self.received[key].append(msg)

    def messages(self, key: str) -> list:
        with self._lock:
            return list(self.received[key])

    @staticmethod
    def wait_for(predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def call(self, client, request, timeout: float = 60.0):
        future = client.call_async(request)
        self.wait_for(future.done, timeout, f"{client.srv_name} response")
        return future.result()

    def in_map(self, keyframe_id: int) -> bool:
        return in_map(self.node, keyframe_id)

    def wait_in_map(self, *keyframe_ids: int, timeout: float = 30.0) -> None:
        self.wait_for(lambda: all(self.in_map(i) for i in keyframe_ids), timeout, f"keyframes {keyframe_ids} in the map")

    def close(self) -> None:
        self.node.stop()
        self.executor.shutdown()
        self.thread.join(timeout=10.0)
        self.node.destroy_node()
        self.client.destroy_node()


@pytest.fixture(scope="module")
def harness(ros_context):
    h = Harness(ros_context, FAST_PARAMETERS)
    yield h
    h.close()



# ---------------------------------------------------------------------------------------------- tests
def test_loop_candidates_give_metric_loop_closure_and_matches(harness, stereo):
    T_map_left = np.eye(4)
    harness.keyframes.publish(keyframe_msg(1, stereo["left"], stereo["K_left"], stereo["depth_left"], T_map_left, 1.0))
    harness.keyframes.publish(keyframe_msg(2, stereo["right"], stereo["K_right"], None, None, 2.0))
    harness.wait_in_map(1, 2)
    assert not harness.messages("loop_closures")  # 1 s apart: inside the exclusion window, no automatic loop
    harness.candidates.publish(LoopCandidates(query_id=2, candidate_ids=[1]))
    loop = harness.wait_for(lambda: harness.messages("loop_closures"), 30.0, "loop closure")[0]
    assert (loop.query_id, loop.match_id) == (2, 1)
    assert loop.accepted and loop.reason == "ok", loop.reason
    assert loop.metric_scale and loop.scale == 1.0
    assert (loop.query_stamp.sec, loop.match_stamp.sec) == (2, 1)
    assert loop.header.frame_id == "map"
    T = conv.transform_to_matrix(loop.t_match_query)  # T_left_right = translation (+b, 0, 0)
    assert np.linalg.norm(T[:3, 3] - [BASELINE_M, 0, 0]) < 0.02, T[:3, 3]
    assert rotation_error_deg(T[:3, :3]) < 1.0
    assert loop.num_inliers >= 30 and loop.num_inliers <= loop.num_matches
    information = np.asarray(loop.information).reshape(6, 6)
    assert np.allclose(information, information.T) and np.linalg.eigvalsh(information).min() > 0  # metric: full rank
    matches = harness.wait_for(lambda: [m for m in harness.messages("matches") if m.id0 == 2], 10.0, "matches")[0]
    points0, points1 = np.reshape(matches.points0, (-1, 2)), np.reshape(matches.points1, (-1, 2))
    inliers = np.asarray(matches.inliers, bool)
    assert len(points0) == len(points1) == len(matches.scores) == len(inliers) == loop.num_matches
    assert inliers.sum() == loop.num_inliers
    # rectified pair: inlier matches lie on the same row (up to the 320 px downscale's rounding)
    assert np.median(np.abs(points0[inliers, 1] - points1[inliers, 1])) < 1.0
    # the debug image shows the pair side by side (both keyframe images are cached)
    debug = harness.wait_for(lambda: harness.messages("debug"), 10.0, "debug image")[0]
    assert debug.width == 2 * WIDTH and debug.encoding == "rgb8"


def test_keyframes_close_loops_through_retrieval(harness, stereo):
    """A keyframe far enough in time from the map's keyframes: retrieval + verification close the loop
    automatically; the best candidate is accepted, the others are published as rejected with their reason."""
    harness.keyframes.publish(keyframe_msg(3, stereo["right"], stereo["K_right"], None, None, 100.0))
    loop = harness.wait_for(lambda: [m for m in harness.messages("loop_closures") if m.query_id == 3], 60.0,
                            "automatic loop closure")[0]
    assert loop.match_id == 1 and loop.accepted  # keyframe 2 (the same right image) has no depth: no PnP
    assert loop.retrieval_score > 0
    T = conv.transform_to_matrix(loop.t_match_query)
    assert np.linalg.norm(T[:3, 3] - [BASELINE_M, 0, 0]) < 0.02, T[:3, 3]
    rejected = harness.wait_for(lambda: [m for m in harness.messages("rejected") if m.query_id == 3], 10.0,
                                "rejected candidate")
    assert all(not m.accepted and m.reason for m in rejected)
    assert any(k.startswith("loop_closures.rejected.") for k in harness.node.counters())


def test_resent_keyframe_updates_its_pose(harness, stereo):
    T = np.eye(4)
    T[:3, 3] = [0.5, 0.0, 0.0]
    before = harness.node.counters().get("keyframes.pose_updates", 0)
    harness.keyframes.publish(keyframe_msg(1, stereo["left"], stereo["K_left"], None, T, 1.0))
    harness.wait_for(lambda: harness.node.counters().get("keyframes.pose_updates", 0) > before, 10.0, "pose update")
    assert np.allclose(harness.node.engine.database.get(1).T_map_camera, T)
    harness.keyframes.publish(keyframe_msg(1, stereo["left"], stereo["K_left"], None, np.eye(4), 1.0))
    harness.wait_for(lambda: np.allclose(harness.node.engine.database.get(1).T_map_camera, np.eye(4)), 10.0,
                     "pose restored")
    before = harness.node.counters().get("rejected.duplicate_keyframe", 0)
    harness.keyframes.publish(keyframe_msg(1, stereo["left"], stereo["K_left"], None, None, 1.0))
    harness.wait_for(lambda: harness.node.counters().get("rejected.duplicate_keyframe", 0) > before, 10.0,
                     "re-sent keyframe without a pose rejected")


def test_unknown_candidates_are_rejected_and_counted(harness):
    before = harness.node.counters().get("rejected.unknown_keyframe", 0)
    harness.candidates.publish(LoopCandidates(query_id=2, candidate_ids=[999]))
    harness.candidates.publish(LoopCandidates(query_id=998, candidate_ids=[1]))
    harness.wait_for(lambda: harness.node.counters().get("rejected.unknown_keyframe", 0) >= before + 2, 10.0,
                     "unknown keyframes counted")


def test_match_images_service_monocular_direction(harness, stereo):
    request = MatchImages.Request(image0=conv.numpy_to_image(stereo["left"][:, :, ::-1], "bgr8"),
                                  image1=conv.numpy_to_image(cv2.cvtColor(stereo["right"], cv2.COLOR_RGB2GRAY), "mono8"),
                                  camera_info0=camera_info(stereo["K_left"], stereo["left"]),
                                  camera_info1=camera_info(stereo["K_right"], stereo["right"]))
    response = harness.call(harness.match_images, request)
    assert response.success, response.reason
    assert not response.metric_scale
    T = conv.transform_to_matrix(response.t_1_0)  # T_right_left: unit translation towards -x
    assert np.degrees(np.arccos(np.clip(T[:3, 3] @ [-1, 0, 0], -1, 1))) < 5.0, T[:3, 3]
    assert rotation_error_deg(T[:3, :3]) < 2.0  # monocular, 320 px, 256 keypoints
    assert len(response.matches.points0) == 2 * len(response.matches.scores) > 0
    information = np.asarray(response.information).reshape(6, 6)
    assert abs(T[:3, 3] @ information[:3, :3] @ T[:3, 3]) < 1e-6 * np.trace(information)  # scale unobservable


def test_match_images_homography_ground_truth(harness):
    samples = REPO / "resource" / "samples"
    image0, image1 = cv2.imread(str(samples / "graf1.jpg")), cv2.imread(str(samples / "graf3.jpg"))
    if image0 is None or image1 is None:
        pytest.skip("resource/samples/graf1.jpg / graf3.jpg are missing")
    text = (samples / "H1to3p.xml").read_text()
    H = np.array(text.split("<data>")[1].split("</data>")[0].split(), dtype=np.float64).reshape(3, 3)
    scale = WIDTH / image0.shape[1]
    offset = 0.5 * scale - 0.5  # pixel-centre convention: x' = (x + 0.5) * s - 0.5
    S = np.array([[scale, 0, offset], [0, scale, offset], [0, 0, 1.0]])
    small0 = cv2.resize(image0, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    small1 = cv2.resize(image1, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    K = np.array([[400.0, 0, small0.shape[1] / 2], [0, 400.0, small0.shape[0] / 2], [0, 0, 1]])
    request = MatchImages.Request(image0=conv.numpy_to_image(small0, "bgr8"), image1=conv.numpy_to_image(small1, "bgr8"),
                                  camera_info0=camera_info(K, small0), camera_info1=camera_info(K, small1))
    response = harness.call(harness.match_images, request)
    points0 = np.reshape(response.matches.points0, (-1, 2)).astype(np.float64)
    points1 = np.reshape(response.matches.points1, (-1, 2)).astype(np.float64)
    assert len(points0) >= 50
    projected = cv2.perspectiveTransform(points0[None], S @ H @ np.linalg.inv(S))[0]
    errors = np.linalg.norm(projected - points1, axis=1)  # ORB keypoints sit on integer pixels at 320 px
    assert np.median(errors) < 2.0 and np.mean(errors < 4.0) > 0.8, np.percentile(errors, [50, 80, 95])
    # A plane: the essential matrix is degenerate, the pose comes from the homography's valid decomposition.
    assert response.success, response.reason


def _relocalize_request(stereo) -> Relocalize.Request:
    return Relocalize.Request(image=conv.numpy_to_image(stereo["right"], "rgb8"),
                              camera_info=camera_info(stereo["K_right"], stereo["right"]))


def _check_pose(response, T_map_left: np.ndarray) -> None:
    T_left_right = np.eye(4)
    T_left_right[0, 3] = BASELINE_M
    expected = T_map_left @ T_left_right
    pose = conv.pose_to_matrix(response.pose.pose.pose)
    assert np.linalg.norm(pose[:3, 3] - expected[:3, 3]) < 0.02, (pose[:3, 3], expected[:3, 3])
    assert rotation_error_deg(pose[:3, :3].T @ expected[:3, :3]) < 1.0
    covariance = np.asarray(response.pose.pose.covariance).reshape(6, 6)
    assert np.all(np.linalg.eigvalsh(covariance) > 0) and np.all(np.isfinite(covariance))


def test_relocalize_service_composes_map_pose(harness, stereo):
    T_map_left = np.eye(4)
    T_map_left[:3, :3] = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    T_map_left[:3, 3] = [1.0, 2.0, 0.5]
    harness.keyframes.publish(keyframe_msg(10, stereo["left"], stereo["K_left"], stereo["depth_left"], T_map_left, 10.0))
    harness.wait_in_map(10)
    response = harness.call(harness.relocalize, _relocalize_request(stereo))
    assert response.success, response.reason
    assert response.keyframe_id in (1, 10) and response.num_inliers >= 30
    assert response.pose.header.frame_id == "map"
    _check_pose(response, T_map_left if response.keyframe_id == 10 else np.eye(4))


def _position_sigma(response) -> np.ndarray:
    return np.sqrt(np.diag(np.asarray(response.pose.pose.covariance).reshape(6, 6))[:3])


def test_relocalization_100m_from_the_origin_reports_the_same_sigma(harness, stereo):
    """The map's posed keyframes moved rigidly 100 m away (backend pose updates): the same image relocalizes to
    the moved pose with the same position sigma (ROS convention: position in the map frame, rotation about the
    fixed map axes), not one grown by 100 m x the rotation uncertainty."""
    near = harness.call(harness.relocalize, _relocalize_request(stereo))
    assert near.success, near.reason
    posed = {k.id: k.T_map_camera.copy() for k in harness.node.engine.database.keyframes if k.T_map_camera is not None}
    shift = np.eye(4)
    shift[:3, :3] = Rotation.from_euler("z", 40, degrees=True).as_matrix()
    shift[:3, 3] = [100.0, 0.0, 0.0]
    try:
        for keyframe_id, T in posed.items():
            harness.keyframes.publish(keyframe_msg(keyframe_id, stereo["left"], stereo["K_left"], None, shift @ T))
        harness.wait_for(lambda: all(np.allclose(harness.node.engine.database.get(i).T_map_camera, shift @ T)
                                     for i, T in posed.items()), 10.0, "keyframes moved 100 m")
        far = harness.call(harness.relocalize, _relocalize_request(stereo))
        assert far.success, far.reason
        assert far.keyframe_id == near.keyframe_id
        moved = shift @ conv.pose_to_matrix(near.pose.pose.pose)
        assert np.linalg.norm(conv.pose_to_matrix(far.pose.pose.pose)[:3, 3] - moved[:3, 3]) < 0.02
        sigma_near, sigma_far = _position_sigma(near), _position_sigma(far)
        assert np.allclose(np.sort(sigma_near), np.sort(sigma_far), rtol=0.05), (sigma_near, sigma_far)
        assert sigma_far.max() < 0.05, sigma_far  # centimetres, not the ~1 m the adjoint-transported form gave
    finally:
        for keyframe_id, T in posed.items():
            harness.keyframes.publish(keyframe_msg(keyframe_id, stereo["left"], stereo["K_left"], None, T))
        harness.wait_for(lambda: all(np.allclose(harness.node.engine.database.get(i).T_map_camera, T)
                                     for i, T in posed.items()), 10.0, "keyframes restored")


def test_every_parameter_carries_its_effective_value(harness):
    """GetParameters over DDS: every pipeline.* / engine.* parameter has a value, the preset's resolved value or
    the override the node was started with."""
    names = [spec.name for spec in PARAMETERS if spec.override_key is not None]
    response = harness.call(harness.get_parameters, GetParameters.Request(names=names))
    assert len(response.values) == len(names)
    unset = [name for name, value in zip(names, response.values) if value.type == ParameterType.PARAMETER_NOT_SET]
    assert not unset, f"parameters without a value: {unset}"
    fields = {ParameterType.PARAMETER_BOOL: "bool_value", ParameterType.PARAMETER_INTEGER: "integer_value",
              ParameterType.PARAMETER_DOUBLE: "double_value", ParameterType.PARAMETER_STRING: "string_value"}
    got = {name: getattr(value, fields[value.type]) for name, value in zip(names, response.values)}
    preset = effective_values("cpu")
    expected = effective_values("cpu", preset_override({**preset, **{k: v for k, v in FAST_PARAMETERS.items()
                                                                      if k in preset}}, preset))
    assert got == expected
    assert got["pipeline.features.max_keypoints"] == 256 and got["engine.min_inliers"] == 20  # the overrides
    assert got["pipeline.matcher.name"] == "lightglue" and got["engine.retrieval.top_k"] == 3  # the preset's


def test_markers_show_keyframes_and_accepted_loops(harness):
    posed = {k.id for k in harness.node.engine.database.keyframes if k.T_map_camera is not None}

    def complete():
        for array in reversed(harness.messages("markers")):
            keyframes = next(m for m in array.markers if m.ns == "keyframes")
            if len(keyframes.points) == len(posed):
                return array
        return None
    array = harness.wait_for(complete, 10.0, "markers of every posed keyframe")
    assert array.markers[0].action == 3  # DELETEALL first
    loops = next(m for m in array.markers if m.ns == "loops")
    assert loops.header.frame_id == "map" and len(loops.points) % 2 == 0


def test_image_topic_publishes_relocalization_pose(harness, stereo):
    info = camera_info(stereo["K_right"], stereo["right"])
    image = conv.numpy_to_image(stereo["right"], "rgb8")
    image.header.frame_id = "camera"

    def publish_until_pose():
        harness.camera_info.publish(info)
        image.header.stamp = harness.client.get_clock().now().to_msg()
        harness.image.publish(image)
        time.sleep(0.3)
        return harness.messages("relocalization_pose")

    poses = harness.wait_for(publish_until_pose, 60.0, "relocalization_pose from the image topic")
    assert poses[0].header.frame_id == "map"
    assert np.isfinite(np.asarray(poses[0].pose.covariance)).all()
    matches = [m for m in harness.messages("matches") if m.frame_id0 == "camera" and len(m.points0)]
    assert matches and matches[-1].id0 == 0 and matches[-1].id1 in (1, 10)


def test_malformed_inputs_are_counted_not_fatal(harness, stereo):
    good = keyframe_msg(30, stereo["left"], stereo["K_left"], None, np.eye(4))
    wrong_encoding = keyframe_msg(31, stereo["left"], stereo["K_left"], None, np.eye(4))
    wrong_encoding.image.encoding = "yuv422"
    step_mismatch = keyframe_msg(32, stereo["left"], stereo["K_left"], None, np.eye(4))
    step_mismatch.image.step += 7
    empty = keyframe_msg(33, stereo["left"], stereo["K_left"], None, np.eye(4))
    empty.image = Image(encoding="rgb8")
    no_info = keyframe_msg(34, stereo["left"], stereo["K_left"], None, np.eye(4))
    no_info.camera_info = CameraInfo()
    nan_pose = keyframe_msg(35, stereo["left"], stereo["K_left"], None, np.eye(4))
    nan_pose.pose.pose.position.x = float("nan")
    bad_depth = keyframe_msg(36, stereo["left"], stereo["K_left"], None, np.eye(4))
    bad_depth.depth = conv.numpy_to_image(np.zeros((10, 10), np.uint16), "16UC1")
    tiny = keyframe_msg(37, np.zeros((8, 8, 3), np.uint8), stereo["K_left"], None, np.eye(4))
    tiny.camera_info.width = tiny.camera_info.height = 0
    expected = {"unsupported_encoding": wrong_encoding, "step_mismatch": step_mismatch, "empty_image": empty,
                "missing_camera_info": no_info, "invalid_pose": nan_pose, "bad_depth": bad_depth, "image_error": tiny}
    before = harness.node.counters()
    for msg in expected.values():
        harness.keyframes.publish(msg)
    harness.keyframes.publish(good)
    harness.wait_in_map(30)
    counters = harness.wait_for(lambda: (c := harness.node.counters()) and all(
        c.get(f"rejected.{kind}", 0) > before.get(f"rejected.{kind}", 0) for kind in expected) and c, 10.0,
        "every rejection counted")
    assert not any(harness.in_map(i) for i in range(31, 38))
    assert counters.get("errors", 0) == 0
    # raw image with a step mismatch on the image topic: counted as well
    image = conv.numpy_to_image(stereo["right"], "rgb8")
    image.step -= 3
    harness.camera_info.publish(camera_info(stereo["K_right"], stereo["right"]))
    harness.wait_for(lambda: (harness.image.publish(image), time.sleep(0.1), harness.node.counters().get(
        "rejected.step_mismatch", 0) > counters.get("rejected.step_mismatch", 0))[-1], 10.0, "image step mismatch")
    # the service explains bad input in its response
    response = harness.call(harness.match_images, MatchImages.Request(
        image0=wrong_encoding.image, image1=good.image, camera_info0=good.camera_info, camera_info1=good.camera_info))
    assert not response.success and "unsupported_encoding" in response.reason
    # diagnostics carry the rejection counters by kind
    def diagnostics_with_rejections():
        for array in reversed(harness.messages("diagnostics")):
            values = {kv.key: kv.value for kv in array.status[0].values}
            if int(values.get("rejected.invalid_pose", 0)) > 0:
                return values
        return None
    values = harness.wait_for(diagnostics_with_rejections, 5.0, "diagnostics with rejections")
    assert "latency_ms.keyframe.extract.p50" in values and "rejected.unsupported_encoding" in values
    assert values["preset"] == "cpu" and int(values["map_keyframes"]) >= 4


def _status(array: DiagnosticArray, concern: str) -> DiagnosticStatus:
    return next(status for status in array.status if status.name.endswith(f": {concern}"))


def _level(status: DiagnosticStatus) -> int:
    return status.level[0] if isinstance(status.level, bytes) else int(status.level)


def _wait_status(harness: Harness, concern: str, level: int, timeout: float = 10.0) -> DiagnosticStatus:
    """The first diagnostics status of ``concern`` at ``level`` published after this call."""
    start = len(harness.messages("diagnostics"))

    def found():
        for array in harness.messages("diagnostics")[start:]:
            status = _status(array, concern)
            if _level(status) == level:
                return status
        return None
    return harness.wait_for(found, timeout, f"diagnostics {concern} at level {level}")


def _map_ids(node: RelocalizationNode) -> set[int]:
    return {k.id for k in node.engine.database.keyframes}


def test_save_load_map_and_restart(harness, ros_context, stereo, tmp_path):
    """save_map -> load_map round trip, a corrupt map refused (the current map stays), and a second node that
    starts from the saved map (map_path) relocalizes against it: the map survives a restart."""
    path = tmp_path / "map"
    saved_ids = _map_ids(harness.node)
    response = harness.call(harness.save_map, SaveMap.Request(path=str(path)))
    assert response.success and (path / "manifest.json").is_file(), response.message
    response = harness.call(harness.load_map, LoadMap.Request(path=str(path)))
    assert response.success, response.message
    assert _map_ids(harness.node) == saved_ids
    response = harness.call(harness.load_map, LoadMap.Request(path=str(tmp_path / "missing")))
    assert not response.success and "missing" in response.message
    corrupt = tmp_path / "corrupt"
    import shutil
    shutil.copytree(path, corrupt)
    victim = sorted(corrupt.glob("*.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:-8])
    failed_before = harness.node.counters().get("map.load_failed", 0)
    response = harness.call(harness.load_map, LoadMap.Request(path=str(corrupt)))
    assert not response.success and victim.name in response.message, response.message
    assert _map_ids(harness.node) == saved_ids and harness.node.counters()["map.load_failed"] == failed_before + 1
    # diagnostics: the failed load is an ERROR now, and a successful load returns the map status to OK at once
    status = _wait_status(harness, "map", 2)
    assert "previous map stays" in status.message, status.message
    assert harness.call(harness.load_map, LoadMap.Request(path=str(path))).success
    status = _wait_status(harness, "map", 0)
    assert status.message.endswith("keyframes"), status.message
    summary = _wait_status(harness, "relocalization", 0)  # every concern back to OK once the window passed
    assert "keyframes in the map" in summary.message

    restarted = Harness(ros_context, {**FAST_PARAMETERS, "map_path": str(path)}, namespace="restarted")
    try:
        assert _map_ids(restarted.node) == saved_ids and restarted.node.counters().get("map.loaded") == 1
        response = restarted.call(restarted.relocalize, _relocalize_request(stereo))
        assert response.success, response.reason
        assert response.keyframe_id in (1, 10)
    finally:
        restarted.close()
    # a corrupt map_path: logged, counted, and the node runs with an empty map (map_load_failure=empty_map) ...
    empty = Harness(ros_context, {**FAST_PARAMETERS, "map_path": str(corrupt)}, namespace="corrupt_map")
    try:
        assert len(empty.node.engine.database) == 0 and empty.node.counters()["map.load_failed"] == 1
        # ... where a posed keyframe without depth gives no metric relocalization: scale unknown
        empty.keyframes.publish(keyframe_msg(20, stereo["left"], stereo["K_left"], None, np.eye(4), 20.0))
        empty.wait_in_map(20)
        response = empty.call(empty.relocalize, _relocalize_request(stereo))
        assert not response.success and "scale unknown" in response.reason, response.reason
    finally:
        empty.close()
    # ... or refuses to start (map_load_failure=stop), naming the path
    with pytest.raises(ParameterError) as error:
        RelocalizationNode(context=ros_context, parameter_overrides=[Parameter(k, value=v) for k, v in {
            **FAST_PARAMETERS, "map_path": str(corrupt), "map_load_failure": "stop"}.items()])
    assert str(corrupt) in str(error.value) and "map_load_failure=stop" in str(error.value)


def test_save_map_never_overwrites_what_it_did_not_write(harness, tmp_path):
    """SaveMap onto a directory holding the user's files: refused with the reason, every file intact; onto a
    relative path: refused; onto our own map: replaced."""
    foreign = tmp_path / "documents"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "important.txt").write_text("keep me")
    (foreign / "sub" / "x.txt").write_text("and me")
    response = harness.call(harness.save_map, SaveMap.Request(path=str(foreign)))
    assert not response.success and "important.txt" in response.message and "not a" in response.message, \
        response.message
    assert (foreign / "important.txt").read_text() == "keep me" and (foreign / "sub" / "x.txt").read_text() == "and me"
    assert sorted(p.name for p in foreign.iterdir()) == ["important.txt", "sub"]
    response = harness.call(harness.save_map, SaveMap.Request(path="relative/map"))
    assert not response.success and "absolute" in response.message, response.message
    ours = tmp_path / "map"
    assert harness.call(harness.save_map, SaveMap.Request(path=str(ours))).success
    response = harness.call(harness.save_map, SaveMap.Request(path=str(ours)))
    assert response.success, response.message
    assert harness.node.counters().get("map.save_refused", 0) >= 2


def test_busy_matcher_drops_oldest_images(harness, stereo):
    info = camera_info(stereo["K_right"], stereo["right"])
    image = conv.numpy_to_image(stereo["right"], "rgb8")
    before = harness.node.counters()
    harness.camera_info.publish(info)
    time.sleep(0.1)
    for _ in range(30):  # ~300 Hz: far faster than the CPU matcher
        harness.camera_info.publish(info)
        harness.image.publish(image)
        time.sleep(0.003)
    harness.wait_for(lambda: harness.node.counters().get("dropped.images", 0) > before.get("dropped.images", 0),
                     10.0, "dropped images counted")
    counters = harness.node.counters()
    received = counters["images_received"] - before.get("images_received", 0)
    processed_or_pending = counters.get("images_processed", 0) - before.get("images_processed", 0)
    assert processed_or_pending < received


@pytest.mark.parametrize("overrides, names", [
    ({"preset": "fastest"}, ["preset", "fastest", "cpu", "orb_lightglue"]),
    ({"pipeline.features.detector": "surf"}, ["detector", "orb", "aliked"]),
    ({"pipeline.device": "tpu"}, ["device", "cpu", "cuda"]),
    ({"image_queue_size": 0}, ["image_queue_size", "1"]),
    ({"pipeline.pose.min_inliers": 2}, ["min_inliers", "5"]),
    ({"engine.min_inlier_ratio": 1}, ["engine.min_inlier_ratio", "float"]),
    ({"map_load_failure": "ignore"}, ["map_load_failure", "empty_map", "stop"]),
])
def test_invalid_parameters_stop_the_node_with_a_named_error(ros_context, overrides, names):
    with pytest.raises(ParameterError) as error:
        RelocalizationNode(context=ros_context, parameter_overrides=[
            Parameter(k, value=v) for k, v in {**FAST_PARAMETERS, **overrides}.items()])
    for name in names:
        assert name in str(error.value), str(error.value)


def test_eloftr_preset_closes_a_metric_loop_over_dds(ros_context, stereo):
    """The detector-free preset through the node: keyframes keep their images, a named candidate is verified by
    Efficient LoFTR's semi-dense matches (shipped weights) with the same PnP and acceptance checks."""
    parameters = FAST_PARAMETERS | {"preset": "eloftr", "pipeline.device": "cpu", "engine.min_inliers": 40}
    harness = Harness(ros_context, parameters, namespace="eloftr")
    try:
        harness.keyframes.publish(keyframe_msg(1, stereo["left"], stereo["K_left"], stereo["depth_left"], np.eye(4),
                                               1.0))
        harness.keyframes.publish(keyframe_msg(2, stereo["right"], stereo["K_right"], None, None, 2.0))
        harness.wait_in_map(1, 2)
        assert harness.node.engine.database.get(1).image is not None
        harness.candidates.publish(LoopCandidates(query_id=2, candidate_ids=[1]))
        loop = harness.wait_for(lambda: harness.messages("loop_closures") + harness.messages("rejected"), 60.0,
                                "loop verdict")[0]
        assert loop.accepted and loop.reason == "ok", loop.reason
        assert loop.metric_scale and loop.num_matches > 100
        T = conv.transform_to_matrix(loop.t_match_query)
        assert np.linalg.norm(T[:3, 3] - [BASELINE_M, 0, 0]) < 0.02, T[:3, 3]
        assert rotation_error_deg(T[:3, :3]) < 1.0
    finally:
        harness.close()


# ---------------------------------------------------------------------------------------------- a second node
AUX_PARAMETERS = {"preset": "orb_bow_nn", "pipeline.features.max_keypoints": 256, "pipeline.features.resize_max": 320,
                  "engine.min_inliers": 20, "engine.temporal_consistency": 1,
                  "engine.retrieval.exclude_recent_count": 0, "image_qos": "reliable", "distorted_images": "reject",
                  "image_stall_warn_s": 0.5, "keyframe_backlog_warn": 5, "diagnostics_period_s": 0.2,
                  "describe_ahead": True,
                  "diagnostics_window_s": 2.0, "log_throttle_s": 0.0}


@pytest.fixture(scope="module")
def aux(ros_context):
    h = Harness(ros_context, AUX_PARAMETERS, namespace="aux")
    yield h
    h.close()


def test_keyframes_are_never_dropped(aux, stereo):
    """A burst of keyframes far faster than the matcher: every one is processed, in order (backlog, no drops),
    each next one described while the current one verifies (describe_ahead)."""
    ids = list(range(100, 130))
    for offset, keyframe_id in enumerate(ids):
        image = np.roll(stereo["left"], 3 * offset, axis=1)
        aux.keyframes.publish(keyframe_msg(keyframe_id, image, stereo["K_left"], None, None, 1000.0 + offset))
    aux.wait_in_map(*ids, timeout=120.0)
    counters = aux.node.counters()
    assert counters["keyframes_processed"] >= len(ids) and not any(k.startswith("dropped.key") for k in counters)
    order = [k.id for k in aux.node.engine.database.keyframes if k.id in ids]
    assert order == ids
    # While one keyframe verified, the next waiting one was already being described (DescribeAhead).
    assert counters.get("keyframes.described_ahead", 0) >= len(ids) // 2, counters


def test_distorted_images_are_refused_when_asked(aux, stereo):
    msg = keyframe_msg(200, stereo["left"], stereo["K_left"], None, np.eye(4))
    msg.camera_info.d = [-0.2, 0.05, 0.0, 0.0, 0.0]
    before = aux.node.counters().get("rejected.distorted_image", 0)
    aux.keyframes.publish(msg)
    aux.wait_for(lambda: aux.node.counters().get("rejected.distorted_image", 0) > before, 10.0, "distorted refused")
    assert not aux.in_map(200)


def test_reliable_image_qos_and_the_stalled_image_warning(aux, stereo):
    """image_qos=reliable: a best-effort image publisher is reported as incompatible; camera_info arriving while
    images do not raises the stall warning in the counters and the inputs diagnostics; reliable images arrive."""
    best_effort = aux.client.create_publisher(Image, "image", qos_profile_sensor_data)
    aux.wait_for(lambda: aux.node.counters().get("images.incompatible_qos", 0) > 0, 10.0, "incompatible QoS event")
    # best_effort stays alive: destroying an entity while the executor thread waits on its QoS event handle kills
    # that thread (rclpy InvalidHandle), and the node would stop processing callbacks. It delivers nothing anyway.
    info = camera_info(stereo["K_right"], stereo["right"])

    def stalled():
        aux.camera_info.publish(info)
        time.sleep(0.1)
        return aux.node.counters().get("images.stalled", 0) > 0
    aux.wait_for(stalled, 30.0, "stalled image warning")  # a busy 2-core runner delays the check
    status = _wait_status(aux, "inputs", 1)
    assert "image_qos" in status.message, status.message
    image = conv.numpy_to_image(stereo["right"], "rgb8")
    before = aux.node.counters().get("images_received", 0)
    aux.wait_for(lambda: (aux.camera_info.publish(info), aux.image.publish(image), time.sleep(0.1),
                          aux.node.counters().get("images_received", 0) > before)[-1], 10.0, "reliable images")


def test_compressed_images_relocalize_and_undecodable_ones_are_counted(ros_context, stereo):
    """image_transport=compressed: JPEG images on image/compressed (image_transport's naming, after remapping the
    image topic) relocalize against the map like raw ones; a truncated JPEG is counted as undecodable, not fatal."""
    parameters = {**AUX_PARAMETERS, "image_qos": "sensor_data", "image_transport": "compressed"}
    h = Harness(ros_context, parameters, namespace="compressed")
    try:
        assert h.node.camera.image_topic == "/compressed/image/compressed"
        h.keyframes.publish(keyframe_msg(1, stereo["left"], stereo["K_left"], stereo["depth_left"], np.eye(4)))
        h.wait_in_map(1, timeout=60.0)
        publisher = h.client.create_publisher(CompressedImage, "image/compressed", qos_profile_sensor_data)
        info = camera_info(stereo["K_right"], stereo["right"])
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(stereo["right"], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        image = CompressedImage(format="jpeg", data=jpeg.tobytes())
        image.header.frame_id = "camera"

        def publish_until_pose():
            h.camera_info.publish(info)
            image.header.stamp = h.client.get_clock().now().to_msg()
            publisher.publish(image)
            time.sleep(0.3)
            return h.messages("relocalization_pose")
        poses = h.wait_for(publish_until_pose, 60.0, "relocalization_pose from a compressed image")
        position = np.array([poses[-1].pose.pose.position.x, poses[-1].pose.pose.position.y,
                             poses[-1].pose.pose.position.z])
        assert abs(np.linalg.norm(position) - BASELINE_M) < 0.03  # the right camera, one baseline from the left

        truncated = CompressedImage(format="jpeg", data=jpeg.tobytes()[:200])
        h.wait_for(lambda: (h.camera_info.publish(info), publisher.publish(truncated), time.sleep(0.1),
                            h.node.counters().get("rejected.undecodable_image", 0) > 0)[-1], 20.0,
                   "undecodable image counted")
    finally:
        h.close()


def test_images_are_time_synchronised_with_message_filters(ros_context, stereo):
    """On a ROS install, image + camera_info + depth are paired by stamp with ApproximateTimeSynchronizer."""
    pytest.importorskip("message_filters", reason="message_filters not installed (ROS distro package)")
    parameters = {**AUX_PARAMETERS, "image_qos": "sensor_data", "subscribe_depth": True, "depth_max_age_s": 0.02}
    h = Harness(ros_context, parameters, namespace="synced")
    try:
        assert h.node.camera.synchroniser == "message_filters"
        depth_pub = h.client.create_publisher(Image, "depth", qos_profile_sensor_data)
        info = camera_info(stereo["K_left"], stereo["left"])
        image = conv.numpy_to_image(stereo["left"], "rgb8")
        depth = conv.numpy_to_image(np.round(stereo["depth_left"] * 1000).astype(np.uint16), "16UC1")

        def publish(depth_offset_s: float) -> None:
            now = h.client.get_clock().now()
            for msg in (image, info):
                msg.header.stamp = now.to_msg()
            depth.header.stamp = (now + rclpy.duration.Duration(seconds=depth_offset_s)).to_msg()
            depth_pub.publish(depth)
            h.camera_info.publish(info)
            h.image.publish(image)
            time.sleep(0.1)
        h.wait_for(lambda: (publish(0.0), h.node.counters().get("images_processed", 0) > 0)[-1], 20.0,
                   "a synchronised set processed")
        processed = h.node.counters()["images_processed"]
        for _ in range(5):
            publish(0.5)  # depth 0.5 s off: outside the slop, never paired
        time.sleep(1.0)
        assert h.node.counters()["images_processed"] == processed
    finally:
        h.close()
