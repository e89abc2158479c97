"""The camera inputs of relocalization_node: image + camera_info (+ depth), time-synchronised, with QoS checks.

Transport (``image_transport``): raw sensor_msgs/Image on ``image``, or sensor_msgs/CompressedImage on
``image/compressed``, named as image_transport names it (the remapped image topic + ``/compressed``), so a
remap of ``image`` to a camera's image_raw finds that driver's compressed republisher. Decoding happens in the node's conversion step (conversions.camera_image_to_numpy).

Synchronisation: on a ROS 2 install, message_filters' ApproximateTimeSynchronizer pairs image, camera_info
and (``subscribe_depth``) depth whose stamps lie within ``depth_max_age_s``; it is the standard tool and
handles reordered and late messages. Where message_filters is not importable (it is a ROS distro package,
not on PyPI), the same contract is kept by hand: the latest camera_info, and the depth image with the nearest
stamp within ``depth_max_age_s`` (an image without one is used without depth, counted
``images.without_depth``).

QoS (``image_qos``): ``sensor_data`` (best effort) or ``reliable`` for all three topics. A reliable
subscription cannot connect to a best-effort publisher: that is logged as an error naming the fix
(incompatible-QoS event). Best effort connects to everything, but large images sent best effort with
default Fast DDS settings are often lost; :meth:`ImageInputs.stalled` notices camera_info arriving without
images, which is how that failure looks.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from feature_matching_ros.ros import conversions as conv

try:  # a ROS distro package (not on PyPI)
    import message_filters
except ImportError:  # pragma: no cover - depends on the install
    message_filters = None

IMAGE_TOPIC, CAMERA_INFO_TOPIC, DEPTH_TOPIC = "image", "camera_info", "depth"
# image_transport's naming: a transport's topic is the (remapped) image topic + "/" + the transport's name.
IMAGE_TRANSPORTS = {"raw": (Image, ""), "compressed": (CompressedImage, "/compressed")}


def image_qos_profile(name: str) -> QoSProfile:
    """QoS of the camera subscriptions for ``image_qos`` (sensor_data | reliable)."""
    if name == "reliable":
        return QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    if name == "sensor_data":
        return qos_profile_sensor_data
    raise ValueError(f"image_qos={name!r}; allowed: sensor_data, reliable")


class ImageInputs:
    """Subscribes the camera topics on ``node`` and calls ``on_set(image, camera_info | None, depth | None)``."""

    def __init__(self, node, on_set: Callable[[Image, CameraInfo | None, Image | None], None], image_qos: str,
                 subscribe_depth: bool, slop_s: float, queue_size: int, count: Callable[[str], None],
                 use_message_filters: bool = True, callback_group=None, image_transport: str = "raw") -> None:
        self._node = node
        self._on_set = on_set
        self._count = count
        self._slop_s = float(slop_s)
        self.subscribe_depth = bool(subscribe_depth)
        self.started = time.monotonic()
        self.last_image: float | None = None
        self.last_camera_info: float | None = None
        self._camera_info: CameraInfo | None = None
        self._depth: deque[Image] = deque(maxlen=max(4, queue_size))
        qos = image_qos_profile(image_qos)
        options = {"qos_profile": qos, "callback_group": callback_group, "event_callbacks": self._events(image_qos)}
        if image_transport not in IMAGE_TRANSPORTS:
            raise ValueError(f"image_transport={image_transport!r}; allowed: {', '.join(IMAGE_TRANSPORTS)}")
        image_kind, suffix = IMAGE_TRANSPORTS[image_transport]
        # Like image_transport: remap the base topic first (image:=/camera/image_raw), then add the transport.
        self.image_topic = node.resolve_topic_name(IMAGE_TOPIC) + suffix if suffix else IMAGE_TOPIC
        topics = [(image_kind, self.image_topic), (CameraInfo, CAMERA_INFO_TOPIC)] + (
            [(Image, DEPTH_TOPIC)] if self.subscribe_depth else [])
        self.synchroniser = "message_filters" if (use_message_filters and message_filters is not None) else "stamp"
        if self.synchroniser == "message_filters":
            subscribers = [message_filters.Subscriber(node, kind, topic, **options) for kind, topic in topics]
            subscribers[0].registerCallback(lambda msg: self._arrived(IMAGE_TOPIC))
            subscribers[1].registerCallback(lambda msg: self._arrived(CAMERA_INFO_TOPIC))
            self._sync = message_filters.ApproximateTimeSynchronizer(subscribers, queue_size, self._slop_s)
            self._sync.registerCallback(self._on_synchronised)
        else:
            handlers = {self.image_topic: self._on_image, CAMERA_INFO_TOPIC: self._on_camera_info,
                        DEPTH_TOPIC: self._on_depth}
            self._subscriptions = [node.create_subscription(kind, topic, handlers[topic], **options)
                                   for kind, topic in topics]

    def _events(self, image_qos: str):
        try:
            from rclpy.event_handler import SubscriptionEventCallbacks
        except ImportError:  # pragma: no cover - older rclpy
            from rclpy.qos_event import SubscriptionEventCallbacks

        def incompatible(event) -> None:
            self._count("images.incompatible_qos")
            hint = ("the publisher is best effort: set image_qos:=sensor_data" if image_qos == "reliable"
                    else "check the publisher's durability/deadline settings")
            self._node.get_logger().error(f"a camera topic publisher has incompatible QoS "
                                          f"(policy {event.last_policy_kind}): no data will arrive; {hint}")
        return SubscriptionEventCallbacks(incompatible_qos=incompatible)

    # ------------------------------------------------------------------ arrival bookkeeping
    def _arrived(self, topic: str) -> None:
        now = time.monotonic()
        if topic == IMAGE_TOPIC:
            self.last_image = now
        elif topic == CAMERA_INFO_TOPIC:
            self.last_camera_info = now

    def stalled(self, stall_s: float) -> bool:
        """camera_info arrived within ``stall_s`` but no image did for ``stall_s`` (and we listened that long)."""
        now = time.monotonic()
        if stall_s <= 0 or self.last_camera_info is None or now - self.last_camera_info > stall_s:
            return False
        if now - self.started < stall_s:
            return False
        return self.last_image is None or now - self.last_image > stall_s

    # ------------------------------------------------------------------ message_filters path
    def _on_synchronised(self, image: Image, camera_info: CameraInfo, depth: Image | None = None) -> None:
        self._on_set(image, camera_info, depth)

    # ------------------------------------------------------------------ fallback path
    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._arrived(CAMERA_INFO_TOPIC)
        self._camera_info = msg

    def _on_depth(self, msg: Image) -> None:
        self._depth.append(msg)

    def _on_image(self, msg: Image) -> None:
        self._arrived(IMAGE_TOPIC)
        depth = None
        if self.subscribe_depth:
            depth = self._nearest_depth(conv.stamp_to_seconds(msg.header.stamp))
            if depth is None:
                self._count("images.without_depth")
        self._on_set(msg, self._camera_info, depth)

    def _nearest_depth(self, stamp_s: float) -> Image | None:
        best = min(self._depth, key=lambda m: abs(conv.stamp_to_seconds(m.header.stamp) - stamp_s), default=None)
        if best is not None and abs(conv.stamp_to_seconds(best.header.stamp) - stamp_s) <= self._slop_s:
            return best
        return None
