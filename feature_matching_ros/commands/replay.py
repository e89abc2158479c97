"""``fmr replay``: play a rosbag's frames into relocalization_node over real DDS and measure the published loops.

    fmr replay BAG [--config PRESET] [--rate 1.0] [--report DIR] [--gt-loops loops.json] [--offline]
        [--set engine.retrieval.exclude_recent_seconds=1.0 ...] [--pose-source odom|gt] [--keyframe-every N]

The node runs in this process (its own rclpy context, a MultiThreadedExecutor thread) on a random
ROS_DOMAIN_ID with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, so nothing else on the network sees it. A player
node publishes every (N-th) image of the bag as a feature_matching_ros/Keyframe (image + depth + camera info +
pose + the backend's map points of monocular bags, keyframe id = image index, the bag's stamps) on a reliable
publisher, at the recorded timing divided by
--rate, and subscribes to loop_closures. Keyframe poses come from the odometry topic (--pose-source odom,
the default and what `fmr evaluate` feeds the engine: a SLAM frontend's poses) or from the ground-truth topic.

Metrics (same definitions as `fmr evaluate`'s "loop" section, eval/loop_detection.py): precision, recall,
false positives against --gt-loops / loops.json beside the bag, plus what the node counted (processed,
dropped by its bounded queue when the replay is faster than the matcher, rejected) and publish lateness.
--offline also runs the offline path (`fmr evaluate`'s engine loop, eval/loop_eval.evaluate_preset) on the same
frames, preset and --set overrides and reports whether both accepted the same loop pairs. When the node dropped
keyframes (replay too fast) the sets can differ: the dropped keyframes are listed.
Writes DIR/replay_metrics.json when --report is given and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

LOG = logging.getLogger("fmr.replay")
NAMESPACE = "fmr_replay"


def register(subparsers) -> None:
    from feature_matching_ros.presets import preset_names

    parser = subparsers.add_parser("replay", help="replay a rosbag into relocalization_node over DDS, report loops",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bag", type=Path, help="rosbag2 directory")
    parser.add_argument("--config", default="cpu", choices=preset_names(), help="node preset (presets.py)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed (1.0 = recorded timing)")
    parser.add_argument("--report", type=Path, help="write DIR/replay_metrics.json")
    parser.add_argument("--gt-loops", type=Path, help="JSON [[query_index, match_index], ...] (0-based image indices)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PARAMETER=VALUE",
                        help="node parameter (pipeline.* / engine.* preset overrides or node parameters; YAML value)")
    parser.add_argument("--offline", action="store_true",
                        help="also run the offline engine (fmr evaluate's path) on the same frames and compare")
    parser.add_argument("--pose-source", choices=("odom", "gt"), default="odom",
                        help="keyframe poses from the odometry topic (default, as fmr evaluate) or ground truth")
    parser.add_argument("--image-topic", default="/camera/image_raw")
    parser.add_argument("--camera-info-topic", default="/camera/camera_info")
    parser.add_argument("--depth-topic", default="/camera/depth/image_raw")
    parser.add_argument("--pose-topic", default="/ground_truth/pose", help="ground-truth PoseStamped (T_map_camera)")
    parser.add_argument("--odom-topic", default="/odom", help="odometry (the backend poses)")
    parser.add_argument("--no-depth", action="store_true", help="ignore the depth topic (monocular)")
    parser.add_argument("--map-points-topic", default="/slam/map_points",
                        help="a monocular backend's map points per keyframe (sensor_msgs/PointCloud2 u, v, x, y, z), "
                             "published inside each Keyframe as map_points (Sim3 loops); '' to leave them out")
    parser.add_argument("--keyframe-every", type=int, default=1, help="use every N-th image as a keyframe")
    parser.add_argument("--max-frames", type=int, help="stop after this many images")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="pipeline.device of the node (unless --set)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait after the last frame for the node to finish")
    parser.add_argument("--domain-id", type=int, help="ROS_DOMAIN_ID (default: random in 1..100)")
    parser.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["engine.min_inliers=30", ...] -> {name: typed value}, names checked against the node's parameters."""
    import yaml

    from feature_matching_ros.ros.parameters import SPECS

    values: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in SPECS:
            raise SystemExit(f"--set {item!r}: expected PARAMETER=VALUE with a parameter of relocalization_node "
                             f"(see docs/ROS.md); unknown {name!r}")
        value = yaml.safe_load(text)
        if SPECS[name].type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[name] = value
    return values


def _keyframe_message(frame, pose: np.ndarray | None, pose_frame: str):
    from sensor_msgs.msg import CameraInfo

    from feature_matching_ros.msg import Keyframe
    from feature_matching_ros.ros import conversions as conv

    msg = Keyframe(id=int(frame.index))
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(frame.stamp_ns), 1_000_000_000)
    msg.header.frame_id = pose_frame
    msg.image = conv.numpy_to_image(frame.image, "rgb8" if frame.image.ndim == 3 else "mono8")
    msg.image.header.stamp, msg.image.header.frame_id = msg.header.stamp, "camera_optical_frame"
    if frame.depth is not None:
        msg.depth = conv.numpy_to_image(frame.depth.astype(np.float32), "32FC1", msg.image.header)
    if frame.map_points is not None:
        msg.map_points = conv.map_points_to_cloud(*frame.map_points, frame.stamp_ns, msg.image.header.frame_id)
    msg.camera_info = CameraInfo(header=msg.image.header, width=frame.image.shape[1], height=frame.image.shape[0],
                                 distortion_model="plumb_bob")
    msg.camera_info.k = np.asarray(frame.K, np.float64).ravel()
    if pose is None:
        msg.pose.covariance[0] = -1.0  # pose unknown
    else:
        msg.pose.pose = conv.matrix_to_pose(pose)
    return msg


def replay_frames(frames, parameters: dict[str, Any], rate: float, pose_source: str,
                  drain_timeout_s: float = 120.0) -> dict[str, Any]:
    """Start relocalization_node in-process, publish ``frames`` as Keyframes at the recorded timing / ``rate`` and
    return the LoopClosure messages it published (as dicts), its counters and the publish lateness.
    ROS_DOMAIN_ID / ROS_AUTOMATIC_DISCOVERY_RANGE must be set by the caller before this (read at rclpy init)."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    import feature_matching_ros.ros  # noqa: F401  (merges the generated interfaces into the package)
    from feature_matching_ros.msg import Keyframe, LoopClosure
    from feature_matching_ros.ros import conversions as conv
    from feature_matching_ros.ros.relocalization_node import RelocalizationNode

    context = rclpy.Context()
    rclpy.init(context=context)
    node = player = executor = spinner = None
    received: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_loop(msg) -> None:
        with lock:
            received.append({"query_id": int(msg.query_id), "match_id": int(msg.match_id),
                             "num_inliers": int(msg.num_inliers), "num_matches": int(msg.num_matches),
                             "accepted": bool(msg.accepted), "metric_scale": bool(msg.metric_scale),
                             "method": msg.method, "scale": float(msg.scale),
                             "information": np.reshape(msg.information, (6, 6)),
                             "information_sim3": np.reshape(msg.information_sim3, (7, 7)),
                             "T_match_query": conv.transform_to_matrix(msg.t_match_query),
                             "retrieval_score": float(msg.retrieval_score), "reason": msg.reason})

    try:
        node = RelocalizationNode(context=context, namespace=NAMESPACE,
                                  parameter_overrides=[Parameter(k, value=v) for k, v in parameters.items()])
        player = rclpy.create_node("fmr_replay_player", context=context, namespace=NAMESPACE)
        reliable = QoSProfile(depth=max(100, len(frames)), reliability=ReliabilityPolicy.RELIABLE)
        publisher = player.create_publisher(Keyframe, "keyframes", reliable)
        player.create_subscription(LoopClosure, "loop_closures", on_loop, reliable)
        executor = MultiThreadedExecutor(num_threads=3, context=context)
        executor.add_node(node)
        executor.add_node(player)
        spinner = threading.Thread(target=executor.spin, name="fmr_replay_executor", daemon=True)
        spinner.start()
        _wait(lambda: publisher.get_subscription_count() > 0
              and player.count_publishers(f"/{NAMESPACE}/loop_closures") > 0, 30.0, "DDS discovery")
        pose_frame = "odom" if pose_source == "odom" else "map"
        lateness_ms = []
        start, first_stamp = time.monotonic(), frames[0].stamp_ns
        for number, frame in enumerate(frames):
            pose = frame.T_odom if pose_source == "odom" else frame.T_gt
            msg = _keyframe_message(frame, pose, pose_frame)
            target = start + (frame.stamp_ns - first_stamp) / 1e9 / rate
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            publisher.publish(msg)
            lateness_ms.append(max(0.0, time.monotonic() - target) * 1e3)
            if (number + 1) % 25 == 0:
                LOG.info("published %d/%d keyframes; node processed %d", number + 1, len(frames),
                         node.counters().get("keyframes_processed", 0))
        publish_s = time.monotonic() - start

        def settled() -> bool:
            counters = node.counters()
            # Rejected map points do not reject their keyframe (it is processed without them): not counted here.
            done = (counters.get("keyframes_processed", 0) + counters.get("dropped.keyframes", 0)
                    + counters.get("keyframes.pose_updates", 0)
                    + sum(v for k, v in counters.items()
                          if k.startswith("rejected.") and not k.startswith("rejected.map_points_")))
            with lock:
                return done >= len(frames) and len(received) >= counters.get("loop_closures.accepted", 0)

        _wait(settled, drain_timeout_s, "the node to process every keyframe and its loop closures to arrive")
        counters = node.counters()
        latency = node.latency_summary()
    finally:
        if node is not None:
            node.stop()
        if executor is not None:
            executor.shutdown()
        if spinner is not None:
            spinner.join(timeout=10.0)
        for each in (node, player):
            if each is not None:
                each.destroy_node()
        rclpy.shutdown(context=context)
    with lock:
        loops = list(received)
    return {"loops": loops, "counters": counters, "latency_ms": latency, "publish_s": publish_s,
            "lateness_ms": lateness_ms}


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def run(args: argparse.Namespace) -> int:
    from feature_matching_ros.bag import SequenceTopics
    from feature_matching_ros.eval.loop_detection import AcceptedLoop, detection_metrics
    from feature_matching_ros.eval.loop_eval import ground_truth_loops, load_frames
    from feature_matching_ros.eval.metrics import percentiles
    from feature_matching_ros.presets import build_configs
    from feature_matching_ros.ros.parameters import preset_override

    if args.rate <= 0 or args.keyframe_every < 1:
        raise SystemExit("--rate must be > 0 and --keyframe-every >= 1")
    parameters = {"preset": args.config, "pipeline.device": args.device, **parse_overrides(args.overrides)}
    override = preset_override(parameters)
    _, engine_config = build_configs(args.config, override)  # invalid overrides fail here, before any DDS
    topics = SequenceTopics(image=args.image_topic, depth="" if args.no_depth else args.depth_topic,
                            camera_info=args.camera_info_topic, ground_truth=args.pose_topic, odometry=args.odom_topic,
                            map_points=args.map_points_topic)
    frames = load_frames(args.bag, topics, args.keyframe_every, args.max_frames, None)
    missing = [f.index for f in frames if (f.T_odom if args.pose_source == "odom" else f.T_gt) is None]
    if missing:
        LOG.warning("%d frames have no %s pose (published as unknown pose), e.g. %s", len(missing), args.pose_source,
                    missing[:5])
    gt, gt_source = ground_truth_loops(frames, args.bag, args.gt_loops)
    domain = args.domain_id if args.domain_id is not None else random.randint(1, 100)
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    duration_s = (frames[-1].stamp_ns - frames[0].stamp_ns) / 1e9
    LOG.info("replaying %d keyframes of %s (%.1f s recorded) at rate %g on ROS_DOMAIN_ID=%d; %d GT loop pairs (%s)",
             len(frames), args.bag, duration_s, args.rate, domain, len(gt), gt_source)
    start = time.perf_counter()
    replay = replay_frames(frames, parameters, args.rate, args.pose_source, args.drain_timeout)
    accepted = [AcceptedLoop(loop["query_id"], loop["match_id"], loop["T_match_query"], loop["metric_scale"],
                             loop["num_inliers"], loop["num_matches"]) for loop in replay["loops"] if loop["accepted"]]
    counters = replay["counters"]
    dropped = counters.get("dropped.keyframes", 0)
    metrics: dict[str, Any] = {
        "bag": str(args.bag), "preset": args.config, "parameters": parameters, "rate": args.rate,
        "ros_domain_id": domain, "pose_source": args.pose_source, "keyframes": len(frames),
        "keyframe_every": args.keyframe_every, "gt_loops": len(gt), "gt_source": gt_source,
        "loop": detection_metrics(accepted, frames, gt, engine_config.retrieval),
        "node": {"processed": counters.get("keyframes_processed", 0), "dropped": dropped,
                 "with_map_points": counters.get("keyframes.with_map_points", 0),
                 "sim3_loops_accepted": sum(loop["accepted"] and loop["method"] == "sim3" for loop in replay["loops"]),
                 "rejected": {k: v for k, v in counters.items() if k.startswith("rejected.")},
                 "loop_closures_accepted": counters.get("loop_closures.accepted", 0),
                 "loop_closures_rejected_by_reason": {k.split(".", 2)[2]: v for k, v in counters.items()
                                                      if k.startswith("loop_closures.rejected.")},
                 "latency_ms": {k: v for k, v in replay["latency_ms"].items()}},
        "publish": {"recorded_s": round(duration_s, 3), "wall_s": round(replay["publish_s"], 3),
                    "lateness_ms": percentiles(replay["lateness_ms"])},
    }
    if args.offline:
        metrics["offline"] = compare_offline(args.config, frames, gt, args.device, override, metrics["loop"], dropped)
    metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
    loop = metrics["loop"]
    LOG.info("node: %d processed, %d dropped; accepted %d loops: precision %s recall %s false positives %d",
             metrics["node"]["processed"], dropped, loop["accepted"], loop["precision"], loop["recall"],
             loop["false_positives"])
    if args.offline:
        LOG.info("offline engine: %s", metrics["offline"]["summary"])
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        path = args.report / "replay_metrics.json"
        path.write_text(json.dumps(metrics, indent=1, default=float) + "\n")
        print(path)
    else:
        print(json.dumps({"loop": {k: loop[k] for k in ("precision", "recall", "accepted", "false_positives")},
                          "dropped": dropped}, default=float))
    return 0


def compare_offline(preset: str, frames, gt, device: str, override: dict[str, Any], replay_loop: dict[str, Any],
                    dropped: int) -> dict[str, Any]:
    """Run `fmr evaluate`'s offline engine loop on the same frames/preset/overrides; compare accepted pairs."""
    from feature_matching_ros.eval.loop_eval import evaluate_preset

    evaluated = evaluate_preset(preset, frames, gt, device, 0, override)
    offline = evaluated["loop"]
    offline_pairs = {(c.query_id, c.match_id) for result in evaluated["_results"] for c in result.accepted}
    replay_pairs = {tuple(p) for p in replay_loop["accepted_pairs"]}
    same = offline_pairs == replay_pairs
    keys = ("precision", "recall", "accepted", "true_positives", "false_positives")
    same_metrics = all(offline[k] == replay_loop[k] for k in keys)
    return {"loop": {k: offline[k] for k in keys}, "same_metrics": same_metrics,
            "accepted_pairs": sorted(list(p) for p in offline_pairs),
            "same_accepted_pairs": same, "only_offline": sorted(list(p) for p in offline_pairs - replay_pairs),
            "only_replay": sorted(list(p) for p in replay_pairs - offline_pairs),
            "summary": (f"{'same' if same else 'DIFFERENT'} accepted pairs and {'same' if same_metrics else 'DIFFERENT'} "
                        f"precision/recall/false positives ({len(offline_pairs)} offline, "
                        f"{len(replay_pairs)} replay; node dropped {dropped} keyframes); offline precision "
                        f"{offline['precision']} recall {offline['recall']}")}

