"""``fmr demo``: the README's one command. Renders (or reuses) the sample sequence, runs ``fmr evaluate`` with
the baseline comparison, prints a summary table and writes the report directory.

    fmr demo [--out out/demo] [--scene office] [--frames 200] [--width 320] [--height 240] [--seed 0]
             [--config cpu] [--compare orb_bow_nn] [--keyframe-every 2] [--device auto]

Defaults are sized for a 2-core laptop without a GPU, offline and without a ROS distro: a 320x240 office
sequence of 200 frames (100 keyframes, every 2nd frame), the ``cpu`` preset (ORB + XFeat descriptors +
LighterGlue at 512 keypoints, ~0.2 s per keyframe on 2 cores) against the ``orb_bow_nn`` baseline (ORB + bag of
binary words + Hamming NN). Rendering takes ~10 s, evaluation ~2 minutes. ``--device auto`` uses CUDA when
present. The sequence is cached (``ensure_sample_sequence``) in a directory named after its parameters under
$FMR_SAMPLE_DIR's parent (default ~/.cache/feature_matching_ros/), so a second run starts at once.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

LOG = logging.getLogger("fmr.demo")
DEMO_DEFAULTS = {"scene": "office", "frames": 200, "width": 320, "height": 240, "seed": 0}


def register(subparsers) -> None:
    from feature_matching_ros.presets import preset_names

    parser = subparsers.add_parser("demo", help="render the sample sequence, evaluate loop closure vs the baseline, "
                                   "print a summary (CPU, offline, no ROS)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="report directory (default out/demo)")
    parser.add_argument("--sample-dir", type=Path, help="where the sequence is generated / reused "
                        "(default: a cache directory named after the parameters)")
    parser.add_argument("--scene", choices=("office", "corridor", "street"), default=DEMO_DEFAULTS["scene"])
    parser.add_argument("--frames", type=int, default=DEMO_DEFAULTS["frames"])
    parser.add_argument("--width", type=int, default=DEMO_DEFAULTS["width"])
    parser.add_argument("--height", type=int, default=DEMO_DEFAULTS["height"])
    parser.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"])
    parser.add_argument("--config", default="cpu", choices=preset_names(), help="engine preset (default cpu)")
    parser.add_argument("--compare", nargs="*", default=["orb_bow_nn"], choices=preset_names(),
                        help="baseline preset(s) run on the same frames (default orb_bow_nn)")
    parser.add_argument("--keyframe-every", type=int, default=2, help="every N-th image is a keyframe (default 2)")
    parser.add_argument("--reloc-queries", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.set_defaults(func=run)


def sample_dir_for(scene: str, frames: int, width: int, height: int, seed: int) -> Path:
    from feature_matching_ros.scenes.sample import default_sample_dir

    return default_sample_dir().parent / f"demo_{scene}_{frames}f_{width}x{height}_seed{seed}"


def summary_rows(metrics: dict) -> list[dict]:
    """One row per preset of a written metrics.json: the numbers the README's table shows."""
    rows = []
    for name, run in metrics["runs"].items():
        loop, trajectory = run["loop"], run.get("trajectory", {})
        reloc = run.get("relocalization", {})
        total = run.get("latency_ms", {}).get("total", {})
        retrieval = run.get("retrieval", {})
        rows.append({"preset": name, "precision": loop["precision"], "recall": loop["recall"],
                     "false_positives": loop["false_positives"], "accepted": loop["accepted"],
                     "max_recall_at_100_precision": loop["max_recall_at_100_precision"],
                     "auc@5": loop["pose_error"].get("auc@5"), "auc@10": loop["pose_error"].get("auc@10"),
                     "auc@20": loop["pose_error"].get("auc@20"),
                     "reloc_success": reloc.get("success_rate"), "reloc_correct": reloc.get("correct_rate"),
                     "ate_before": trajectory.get("ate_before", {}).get("rmse"),
                     "ate_after": trajectory.get("ate_after", {}).get("rmse"),
                     "retrieval_top_k": retrieval.get("top_k"),
                     "retrieval_recall": retrieval.get(f"recall@{retrieval.get('top_k')}"),
                     "ms_per_keyframe_p50": total.get("p50"), "ms_per_keyframe_mean": total.get("mean")})
    return rows


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``summary_rows``."""
    header = ("preset", "precision", "recall", "FPs", "accepted", "max R@100P", "AUC@5/10/20", "reloc ok/correct",
              "ATE before -> after (m)", "ms/keyframe p50")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        auc = "/".join(_cell(row[k], 1) for k in ("auc@5", "auc@10", "auc@20"))
        lines.append("| " + " | ".join((
            row["preset"], _cell(row["precision"]), _cell(row["recall"]), _cell(row["false_positives"]),
            _cell(row["accepted"]), _cell(row["max_recall_at_100_precision"]), auc,
            f"{_cell(row['reloc_success'], 2)}/{_cell(row['reloc_correct'], 2)}",
            f"{_cell(row['ate_before'])} -> {_cell(row['ate_after'])}", _cell(row["ms_per_keyframe_p50"], 0))) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from feature_matching_ros.bag import SequenceTopics
    from feature_matching_ros.commands.evaluate import evaluate_bag
    from feature_matching_ros.scenes.sample import ensure_sample_sequence

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    directory = args.sample_dir or sample_dir_for(args.scene, args.frames, args.width, args.height, args.seed)
    bag = ensure_sample_sequence(directory, scene=args.scene, frames=args.frames, width=args.width,
                                 height=args.height, seed=args.seed)
    LOG.info("sequence %s; evaluating %s vs %s on %s", bag, args.config, ", ".join(args.compare), device)
    presets = [args.config] + [p for p in args.compare if p != args.config]
    metrics = evaluate_bag(bag, presets, args.out, SequenceTopics(), None, args.keyframe_every, None,
                           args.reloc_queries, device)
    print(f"\n{args.scene} {args.width}x{args.height}, {metrics['keyframes']} keyframes (every "
          f"{args.keyframe_every}), {metrics['gt_loops']} GT loop pairs, device {device}, "
          f"{metrics['wall_time_s']} s\n")
    print(format_table(summary_rows(metrics)))
    print(f"\nreport: {args.out / 'metrics.json'} (plots: {', '.join(metrics['plots'].values())})")
    return 0
