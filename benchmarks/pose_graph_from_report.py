"""Pose graph and ATE after it, from an ``fmr evaluate`` report alone (no bag, no engine run).

    python benchmarks/pose_graph_from_report.py REPORT_DIR [REPORT_DIR ...] [--preset cpu] [--monocular]

An evaluation run where gtsam is not installed still writes the accepted loops (keyframes_<preset>.jsonl), the
odometry and the ground truth (trajectory_<preset>_odometry.tum, trajectory_gt.tum) and the ATE before the graph;
this adds the pose graph (``eval.loop_eval.trajectory_metrics``, the same code as ``fmr evaluate``) and writes
"ate_after" into metrics.json, so benchmark tables (``loop_closure.py --resume``) read a complete run. The
TUM files carry keyframe stamps; loops refer to keyframe ids, matched to rows through the jsonl's stamps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from feature_matching_ros.bag.image_folder import read_tum_trajectory
from feature_matching_ros.engine.records import LoopClosure
from feature_matching_ros.eval.loop_eval import trajectory_metrics


def complete_report(report: Path, preset: str, monocular: bool) -> dict:
    """Run the pose graph for one report; returns (and stores in metrics.json) the preset's trajectory entry."""
    stamps, gt = read_tum_trajectory(report / "trajectory_gt.tum")
    odometry_stamps, odometry = read_tum_trajectory(report / f"trajectory_{preset}_odometry.tum")
    if len(odometry_stamps) != len(stamps):
        raise ValueError(f"{report}: odometry and GT trajectories differ in length")
    results = [json.loads(line) for line in (report / f"keyframes_{preset}.jsonl").read_text().splitlines()]
    if len(results) != len(stamps):
        raise ValueError(f"{report}: {len(results)} keyframes in the jsonl, {len(stamps)} poses in the TUM files")
    id_to_index = {result["keyframe_id"]: row for row, result in enumerate(results)}
    accepted = [LoopClosure.from_json_dict(c) for result in results for c in result["candidates"] if c["accepted"]]
    trajectory = trajectory_metrics(odometry, gt, accepted, id_to_index, monocular)
    trajectory.pop("_poses")
    if "pose_graph_skipped" in trajectory:
        raise SystemExit(f"{report}: {trajectory['pose_graph_skipped']}")
    metrics_path = report / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    run = metrics["runs"][preset]
    run["trajectory"] = run.get("trajectory", {}) | trajectory
    run["trajectory"].pop("pose_graph_skipped", None)
    if metrics.get("preset") == preset:
        metrics["trajectory"] = run["trajectory"]
    metrics_path.write_text(json.dumps(metrics, indent=1))
    return trajectory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--monocular", action="store_true", help="Sim3 graph and Sim3-aligned ATE")
    args = parser.parse_args()
    for report in args.reports:
        trajectory = complete_report(report, args.preset, args.monocular)
        print(f"{report}: ATE {trajectory['ate_before']['rmse']:.3f} -> {trajectory['ate_after']['rmse']:.3f} m "
              f"({trajectory['pose_graph']['loop_factors']} loop factors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
