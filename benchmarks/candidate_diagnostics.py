"""Every verified candidate of an ``fmr evaluate`` report, judged against ground truth: which check stopped it.

    python benchmarks/candidate_diagnostics.py REPORT_DIR BAG [--preset cpu] [--monocular] [--no-odometry]
        [--gt-loops loops.json] [--json out.json]

The decision rule (engine/engine.py) stacks checks; this table says, per rejection reason, how many of the
candidates it stopped were correct loops and how many were wrong poses or places, judged by
``eval.loop_eval.judge_loop`` (the same judge as precision/recall). A check that stops mostly correct loops costs
recall without buying precision. Also printed: the distribution of each diagnostic (inliers, inlier ratio, coverage,
scene agreement, odometry drift) for correct and wrong candidates. Read the bag with the same topic options as the
evaluation that wrote the report (``--monocular`` = no depth, ``--no-odometry``), so that the judge sees what the
engine saw.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from feature_matching_ros.bag import SequenceTopics
from feature_matching_ros.eval.loop_eval import ground_truth_loops, judge_loop, load_frames

DIAGNOSTICS = ("num_inliers", "inlier_ratio", "inlier_coverage", "scene_agreement", "depth_agreement",
               "median_residual_px", "drift_translation_m", "drift_rotation_deg", "retrieval_rank")


def judged_candidates(report: Path, bag: Path, preset: str, topics: SequenceTopics,
                      gt_loops: Path | None = None) -> list[dict]:
    """Every candidate of ``report/keyframes_<preset>.jsonl`` with ``label`` (judge_loop's, or ``unverified``
    when geometry failed) and ``in_gt``."""
    frames = load_frames(bag, topics, 1, None, None)
    gt, _ = ground_truth_loops(frames, bag, gt_loops)
    by_index = {f.index: f for f in frames}
    rows = []
    for line in (report / f"keyframes_{preset}.jsonl").read_text().splitlines():
        for candidate in json.loads(line)["candidates"]:
            row = {k: v for k, v in candidate.items() if k not in ("information", "T_match_query")}
            row["in_gt"] = (candidate["query_id"], candidate["match_id"]) in gt
            if not candidate.get("geometry_ok"):
                row["label"] = "unverified"
            else:
                loop = SimpleNamespace(query_id=candidate["query_id"], match_id=candidate["match_id"],
                                       T_match_query=np.asarray(candidate["T_match_query"]),
                                       metric=candidate["metric"])
                judgement = judge_loop(loop, by_index, gt)
                row.update(label=judgement.label, correct=judgement.correct,
                           rotation_error_deg=judgement.rotation_error_deg,
                           direction_error_deg=judgement.direction_error_deg,
                           translation_error_m=judgement.translation_error_m)
            rows.append(row)
    return rows


def reason_kind(reason: str) -> str:
    """The reason without its numbers (one row per check)."""
    return re.sub(r"\s+", " ", re.sub(r"[-+]?\d[\d.e+-]*", "#", reason.split(";")[0]))[:80]


def print_tables(rows: list[dict]) -> None:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        group = ("unverified" if row["label"] == "unverified" else "correct" if row["correct"] else "wrong")
        counts[reason_kind(row["reason"])][group + ("_in_gt" if group == "unverified" and row["in_gt"] else "")] += 1
    print("| reason | correct | wrong pose / not a loop | unverified (GT pair) | unverified (other) |")
    print("|---|---|---|---|---|")
    for reason, counter in sorted(counts.items(), key=lambda item: -sum(item[1].values())):
        print(f"| {reason} | {counter['correct']} | {counter['wrong']} | {counter['unverified_in_gt']} | "
              f"{counter['unverified']} |")
    print()
    print("| diagnostic | group | n | p5 | p25 | median | p75 | p95 |")
    print("|---|---|---|---|---|---|---|---|")
    for key in DIAGNOSTICS:
        for name, select in (("correct", lambda r: r.get("correct") is True),
                             ("wrong", lambda r: r.get("correct") is False)):
            values = np.array([r[key] for r in rows if select(r) and r.get(key) is not None], float)
            if len(values):
                p = np.percentile(values, [5, 25, 50, 75, 95])
                print(f"| {key} | {name} | {len(values)} | " + " | ".join(f"{v:.3g}" for v in p) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("bag", type=Path)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--monocular", action="store_true", help="read no depth (as the evaluation did)")
    parser.add_argument("--no-odometry", action="store_true", help="read no odometry (as the evaluation did)")
    parser.add_argument("--gt-loops", type=Path)
    parser.add_argument("--json", type=Path, help="write the judged candidates here")
    args = parser.parse_args()
    defaults = SequenceTopics()
    topics = SequenceTopics(depth="" if args.monocular else defaults.depth,
                            odometry="" if args.no_odometry else defaults.odometry)
    rows = judged_candidates(args.report, args.bag, args.preset, topics, args.gt_loops)
    print_tables(rows)
    if args.json:
        args.json.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
