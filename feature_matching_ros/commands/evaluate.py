"""``fmr evaluate``: run the loop-closure engine offline over a rosbag and report metrics and plots.

    fmr evaluate BAG --config cpu --report DIR [--compare orb_bow_nn] [--gt-loops loops.json]
        [--image-topic /camera/image_raw --camera-info-topic /camera/camera_info --depth-topic ...
         --pose-topic /ground_truth/pose --odom-topic /odom] [--keyframe-every 2] [--no-depth]

Writes DIR/metrics.json (loop.precision, loop.recall, loop.false_positives, loop.max_recall_at_100_precision,
pose AUC, relocalization, latency, ATE before/after the pose graph; "skipped" says what could not be
evaluated and why), DIR/pr_curve.png, DIR/latency.png, DIR/trajectory_<preset>.png, the per-keyframe
verdicts DIR/keyframes_<preset>.jsonl and TUM trajectories for evo (DIR/trajectory_gt.tum,
DIR/trajectory_<preset>_odometry.tum before and DIR/trajectory_<preset>_optimised.tum after the pose graph:
``evo_ape tum DIR/trajectory_gt.tum DIR/trajectory_cpu_optimised.tum -a``).
The first preset is the reported one; --compare presets (default:
the orb_bow_nn baseline) run on the same frames and appear under "runs".
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

LOG = logging.getLogger("fmr.evaluate")


def register(subparsers) -> None:
    from feature_matching_ros.presets import preset_names

    parser = subparsers.add_parser("evaluate", help="evaluate loop closure / relocalization over a rosbag",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bag", type=Path, help="rosbag2 directory")
    parser.add_argument("--config", default="cpu", choices=preset_names(), help="engine preset (presets.py)")
    parser.add_argument("--compare", nargs="*", default=["orb_bow_nn"], choices=preset_names(),
                        help="presets to run on the same frames for comparison (default: orb_bow_nn baseline)")
    parser.add_argument("--report", type=Path, required=True, help="output directory")
    parser.add_argument("--gt-loops", type=Path, help="JSON [[query_index, match_index], ...] (0-based image indices)")
    parser.add_argument("--image-topic", default="/camera/image_raw")
    parser.add_argument("--camera-info-topic", default="/camera/camera_info")
    parser.add_argument("--depth-topic", default="/camera/depth/image_raw")
    parser.add_argument("--pose-topic", default="/ground_truth/pose", help="ground-truth PoseStamped (T_map_camera)")
    parser.add_argument("--odom-topic", default="/odom", help="odometry (the backend poses fed to the engine)")
    parser.add_argument("--map-points-topic", default="/slam/map_points",
                        help="a monocular backend's keyframe map points (PointCloud2 u, v, x, y, z): Sim3 loops")
    parser.add_argument("--no-depth", action="store_true", help="ignore the depth topic (monocular evaluation)")
    parser.add_argument("--keyframe-every", type=int, default=1, help="use every N-th image as a keyframe")
    parser.add_argument("--max-frames", type=int, help="stop after this many images")
    parser.add_argument("--reloc-queries", type=int, default=20, help="revisit frames to relocalize (0 = skip)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.set_defaults(func=run)


def evaluate_bag(bag: Path, presets: list[str], report: Path, topics, gt_loops: Path | None = None,
                 keyframe_every: int = 1, max_frames: int | None = None, reloc_queries: int = 20,
                 device: str = "cpu") -> dict:
    """Run every preset over the bag's keyframes and write the report; returns the written metrics dict."""
    import torch

    from feature_matching_ros.eval.loop_eval import evaluate_preset, ground_truth_loops, load_frames
    from feature_matching_ros.eval.report import write_report

    if keyframe_every < 1:
        raise SystemExit("--keyframe-every must be >= 1")
    start = time.perf_counter()
    frames = load_frames(bag, topics, keyframe_every, max_frames, None)
    gt, gt_source = ground_truth_loops(frames, bag, gt_loops)
    LOG.info("%d keyframes from %s; %d GT loop pairs (%s)", len(frames), bag, len(gt), gt_source)
    skipped = {}
    if not gt:
        skipped["loop_precision_recall"] = "no ground-truth loops (no --gt-loops, no loops.json, no poses+depth)"
    if all(f.depth is None for f in frames):
        kind = ("Sim3 from the backend map points where both keyframes have them, else essential matrix"
                if any(f.map_points is not None for f in frames) else "essential matrix, scale unknown")
        skipped["metric_loops"] = (f"no depth on {topics.depth or '(--no-depth)'}: loops are monocular ({kind}), "
                                   "no depth consistency check, no relocalization; Sim3 pose graph, Sim3-aligned "
                                   "ATE")
    if any(f.T_gt is None for f in frames):
        skipped["pose_errors_relocalization_ate"] = (f"no ground-truth poses on {topics.ground_truth}: loop "
                                                     "correctness from the GT loop set only, no pose errors/AUC, "
                                                     "no relocalization accuracy, no ATE")
    if any(f.T_odom is None for f in frames):
        skipped["odometry_gate_ate"] = (f"no odometry on {topics.odometry}: the engine's odometry gate cannot "
                                        "run, no pose graph, no ATE")
    runs = {}
    for preset in presets:
        runs[preset] = evaluate_preset(preset, frames, gt, device, reloc_queries)
        loop = runs[preset]["loop"]
        retrieval = runs[preset]["retrieval"]
        LOG.info("[%s] precision %s recall %s false positives %d, max recall@100%%P %.3f, retrieval recall@%d %s",
                 preset, loop["precision"], loop["recall"], loop["false_positives"],
                 loop["max_recall_at_100_precision"], retrieval["top_k"], retrieval[f"recall@{retrieval['top_k']}"])
    header = {"bag": str(bag), "keyframes": len(frames), "keyframe_every": keyframe_every,
              "gt_loops": len(gt), "gt_source": gt_source, "skipped": skipped, "device": device,
              "torch_threads": torch.get_num_threads(), "wall_time_s": round(time.perf_counter() - start, 1)}
    return write_report(runs, header, report)


def run(args: argparse.Namespace) -> int:
    from feature_matching_ros.bag import SequenceTopics

    topics = SequenceTopics(image=args.image_topic, depth="" if args.no_depth else args.depth_topic,
                            camera_info=args.camera_info_topic, ground_truth=args.pose_topic,
                            odometry=args.odom_topic, map_points=args.map_points_topic)
    presets = [args.config] + [p for p in args.compare if p != args.config]
    evaluate_bag(args.bag, presets, args.report, topics, args.gt_loops, args.keyframe_every, args.max_frames,
                 args.reloc_queries, args.device)
    print(args.report / "metrics.json")
    return 0
