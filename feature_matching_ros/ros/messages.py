"""Engine records -> outgoing messages of relocalization_node (LoopClosure, Matches, PoseWithCovarianceStamped).

Conventions: LoopClosure.information is the engine's (geometry/covariance.py: left perturbation of
T_match_query in the match keyframe's frame, (tx, ty, tz, rx, ry, rz)); LoopClosure.scale and information_sim3 carry
a Sim3 loop's scale and 7x7 information (geometry/sim3.py: left, (tx, ty, tz, rx, ry, rz, log s); zero for other
loops); the relocalization pose covariance is the ROS PoseWithCovariance convention (position in the map frame,
rotation about the fixed map axes), computed from the verified loop by
:func:`~feature_matching_ros.geometry.covariance.relocalization_covariance`.
"""

from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseWithCovarianceStamped
from std_msgs.msg import Header

from feature_matching_ros.geometry.covariance import relocalization_covariance
from feature_matching_ros.msg import LoopClosure, Matches
from feature_matching_ros.engine import LoopClosure as LoopRecord
from feature_matching_ros.engine import Relocalization
from feature_matching_ros.ros import conversions as conv


def stamp(stamp_ns: int) -> Time:
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def loop_msg(loop: LoopRecord, map_frame: str, now: Time) -> LoopClosure:
    msg = LoopClosure()
    msg.header.stamp, msg.header.frame_id = now, map_frame
    msg.query_id, msg.match_id = int(loop.query_id), int(loop.match_id)
    msg.query_stamp, msg.match_stamp = stamp(loop.query_stamp_ns), stamp(loop.match_stamp_ns)
    msg.t_match_query = conv.matrix_to_transform(loop.T_match_query)
    msg.method = "" if loop.method == "none" else loop.method
    msg.scale, msg.metric_scale = float(loop.scale), bool(loop.metric)
    msg.information = np.asarray(loop.information, np.float64).ravel()
    if loop.information_sim3 is not None:
        msg.information_sim3 = np.asarray(loop.information_sim3, np.float64).ravel()
    msg.num_matches, msg.num_inliers = int(loop.num_matches), int(loop.num_inliers)
    msg.retrieval_score = float(loop.retrieval_score)
    msg.accepted, msg.reason = bool(loop.accepted), loop.reason
    return msg


def matches_msg(loop: LoopRecord | None, header: Header, frame0: str, frame1: str) -> Matches:
    msg = Matches(header=header, frame_id0=frame0, frame_id1=frame1)
    if loop is not None and loop.points_query is not None:
        msg.id0, msg.id1 = max(int(loop.query_id), 0), int(loop.match_id)
        msg.points0 = np.ascontiguousarray(loop.points_query, np.float32).ravel()
        msg.points1 = np.ascontiguousarray(loop.points_match, np.float32).ravel()
        msg.scores = np.ascontiguousarray(loop.match_scores, np.float32)
        msg.inliers = [bool(v) for v in loop.inlier_mask]
    return msg


def best_candidate(result: Relocalization) -> LoopRecord | None:
    """The candidate the pose came from, else the verified candidate with the most inliers."""
    verified = [c for c in result.candidates if c.points_query is not None]
    chosen = [c for c in verified if c.match_id == result.match_id] if result.success else []
    return (chosen or sorted(verified, key=lambda c: -c.num_inliers) or [None])[0]


def pose_covariance(result: Relocalization) -> np.ndarray:
    """6x6 ROS-convention covariance of a successful relocalization, from the loop it came from (the map
    keyframe's pose T_map_match = T_map_query T_match_query^-1 taken as exact)."""
    loop = best_candidate(result)
    T_map_match = result.T_map_camera @ np.linalg.inv(loop.T_match_query)
    return relocalization_covariance(T_map_match, loop.T_match_query, loop.information)


def pose_msg(result: Relocalization, header: Header, map_frame: str) -> PoseWithCovarianceStamped:
    msg = PoseWithCovarianceStamped()
    msg.header.stamp, msg.header.frame_id = header.stamp, map_frame
    msg.pose.pose = conv.matrix_to_pose(result.T_map_camera)
    msg.pose.covariance = pose_covariance(result).ravel()
    return msg
