"""Loop closure on REAL image sequences: every preset at its default thresholds, the same frames.

    python benchmarks/loop_closure_real.py --cache ~/.cache/feature_matching_ros/real [--split dev]
        [--presets cpu orb_bow_nn] [--device cpu] [--monocular] [--out benchmarks/results/loop_closure_real.md]

The cache is what ``scripts/build_real_benchmark.py`` builds from public sources (docs/REAL_DATA.md): per
sequence a rosbag2 (images, camera info, GT poses, optional drifting odometry), loops.json and sequence.json.
For each sequence of the split, ``fmr evaluate``'s ``evaluate_bag`` runs every preset on the same keyframes and
the table gets, per preset: precision, recall, false positives (a wrong relative pose is always false), retrieval
recall@k (is a GT loop among the candidates the engine verified), max recall at 100 % precision (inlier-count
sweep), ATE before/after the pose graph (when the sequence has odometry) and ms per keyframe (p50).
``--monocular`` ignores depth (essential-matrix loops), ``--no-odometry`` the odometry (no gate, no pose graph):
together they are a camera-only bag. Nothing is tuned here: presets.py's defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from feature_matching_ros.bag import SequenceTopics
from feature_matching_ros.commands.demo import _cell, summary_rows
from feature_matching_ros.commands.evaluate import evaluate_bag
from feature_matching_ros.presets import preset_names

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_closure import machine  # noqa: E402

LOG = logging.getLogger("loop_closure_real")


def write_markdown(path: Path, rows: list[dict], command: str, started: float) -> None:
    lines = ["# Loop closure on real sequences: every preset at its default thresholds", "",
             f"Machine: {machine()}.", "", f"Command: `{command}`", "",
             "Sequences: docs/REAL_DATA.md. Correctness: feature_matching_ros/eval/loop_eval.py (a wrong relative "
             "pose is always a false positive). Recall: over queries with a GT loop outside the exclusion window. "
             "Retrieval R@k: a GT match among the k candidates verified. max R@100P: recall at the best inlier "
             "threshold with precision 1 (an oracle threshold, for reference).",
             f"Wall time: {time.perf_counter() - started:.0f} s.", "",
             "| sequence | kind | keyframes | preset | precision | recall | FPs | retrieval R@k | max R@100P | "
             "ATE before -> after (m) | ms/keyframe p50 |", "|" + "---|" * 11]
    for row in rows:
        lines.append("| " + " | ".join((
            row["sequence"], row["kind"], str(row["keyframes"]), row["preset"], _cell(row["precision"]),
            _cell(row["recall"]), str(row["false_positives"]),
            f"{_cell(row['retrieval_recall'])} (k={row['retrieval_top_k']})",
            _cell(row["max_recall_at_100_precision"]),
            f"{_cell(row['ate_before'])} -> {_cell(row['ate_after'])}", _cell(row["ms_per_keyframe_p50"], 0))) + " |")
    lines += ["", "## Totals per preset", "", "| preset | sequences | false positives | mean recall | min recall |",
              "|---|---|---|---|---|"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        recalls = [r["recall"] for r in mine if r["recall"] is not None]
        lines.append(f"| {preset} | {len(mine)} | {sum(r['false_positives'] for r in mine)} | "
                     f"{_cell(sum(recalls) / len(recalls) if recalls else None)} | "
                     f"{_cell(min(recalls) if recalls else None)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/feature_matching_ros/real")
    parser.add_argument("--split", default="dev", help="dev | heldout | all")
    parser.add_argument("--sequences", nargs="*", help="only these sequence names")
    parser.add_argument("--presets", nargs="+", default=["cpu", "orb_bow_nn"], choices=preset_names())
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--monocular", action="store_true", help="ignore depth (essential-matrix loops)")
    parser.add_argument("--no-odometry", action="store_true", help="ignore odometry (no gate, no pose graph)")
    parser.add_argument("--reloc-queries", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fmr_loop_closure_real"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loop_closure_real.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = "python " + " ".join(sys.argv)
    started = time.perf_counter()
    rows = []
    for directory in sorted(p for p in args.cache.iterdir() if (p / "sequence.json").is_file()):
        meta = json.loads((directory / "sequence.json").read_text())
        if args.sequences and directory.name not in args.sequences:
            continue
        if args.split != "all" and meta.get("split") != args.split:
            continue
        defaults = SequenceTopics()
        topics = SequenceTopics(depth="" if args.monocular else defaults.depth,
                                odometry="" if args.no_odometry else defaults.odometry)
        report = args.work / directory.name
        metrics = evaluate_bag(directory / "bag", list(args.presets), report, topics, directory / "loops.json",
                               1, None, args.reloc_queries, args.device)
        for row in summary_rows(metrics):
            rows.append({"sequence": directory.name, "kind": meta.get("kind", "?"),
                         "keyframes": metrics.get("keyframes", "?")} | row)
        write_markdown(args.out, rows, command, started)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
