"""``fmr evaluate``: run the loop-closure engine offline over a rosbag and report metrics and plots.

    fmr evaluate BAG --config cpu --report DIR [--compare orb_bow_nn] [--gt-loops loops.json]
        [--image-topic /camera/image_raw --camera-info-topic /camera/camera_info --depth-topic ...
         --pose-topic /ground_truth/pose --odom-topic /odom] [--keyframe-every 2] [--no-depth]

Writes DIR/metrics.json (loop.precision, loop.recall, loop.false_positives, loop.max_recall_at_100_precision,
pose AUC, relocalization, latency, ATE before/after the pose graph; "skipped" says what could not be
evaluated and why), DIR/pr_curve.png, DIR/latency.png, DIR/trajectory_<preset>.png and the per-keyframe
verdicts DIR/keyframes_<preset>.jsonl. The first preset is the reported one; --compare presets (default:
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
    parser.add_argument("--no-depth", action="store_true", help="ignore the depth topic (monocular evaluation)")
    parser.add_argument("--keyframe-every", type=int, default=1, help="use every N-th image as a keyframe")
    parser.add_argument("--max-frames", type=int, help="stop after this many images")
    parser.add_argument("--reloc-queries", type=int, default=20, help="revisit frames to relocalize (0 = skip)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from feature_matching_ros.bag import SequenceTopics
    from feature_matching_ros.eval.loop_eval import evaluate_preset, ground_truth_loops, load_frames
    from feature_matching_ros.eval.report import write_report

    if args.keyframe_every < 1:
        raise SystemExit("--keyframe-every must be >= 1")
    topics = SequenceTopics(image=args.image_topic, depth="" if args.no_depth else args.depth_topic,
                            camera_info=args.camera_info_topic, ground_truth=args.pose_topic,
                            odometry=args.odom_topic)
    start = time.perf_counter()
    frames = load_frames(args.bag, topics, args.keyframe_every, args.max_frames, None)
    gt, gt_source = ground_truth_loops(frames, args.bag, args.gt_loops)
    LOG.info("%d keyframes from %s; %d GT loop pairs (%s)", len(frames), args.bag, len(gt), gt_source)
    skipped = {}
    if not gt:
        skipped["loop_precision_recall"] = "no ground-truth loops"
    if all(f.depth is None for f in frames):
        skipped["metric_loops"] = "no depth: loops are monocular (essential matrix, scale unknown)"
    if any(f.T_gt is None for f in frames):
        skipped["pose_errors_relocalization_ate"] = f"no ground-truth poses on {args.pose_topic}"
    if any(f.T_odom is None for f in frames):
        skipped["ate"] = f"no odometry on {args.odom_topic}"
    presets = [args.config] + [p for p in args.compare if p != args.config]
    runs = {}
    for preset in presets:
        runs[preset] = evaluate_preset(preset, frames, gt, args.device, args.reloc_queries)
        loop = runs[preset]["loop"]
        LOG.info("[%s] precision %s recall %s false positives %d, max recall@100%%P %.3f", preset,
                 loop["precision"], loop["recall"], loop["false_positives"], loop["max_recall_at_100_precision"])
    header = {"bag": str(args.bag), "keyframes": len(frames), "keyframe_every": args.keyframe_every,
              "gt_loops": len(gt), "gt_source": gt_source, "skipped": skipped, "device": args.device,
              "torch_threads": torch.get_num_threads(), "wall_time_s": round(time.perf_counter() - start, 1)}
    write_report(runs, header, args.report)
    print(args.report / "metrics.json")
    return 0
