"""Loop-closure precision over generated sequences: every preset at its DEFAULT thresholds, same frames.

    python benchmarks/loop_closure.py [--scenes office corridor street] [--seeds 0 3] [--frames 120]
        [--sizes 320x240 640x480] [--keyframe-every 1] [--presets cpu orb_bow_nn orb_lightglue aliked_lightglue]
        [--work /tmp/fmr_loop_closure] [--out benchmarks/results/loop_closure.md] [--jobs N] [--resume]

For each scene x seed: render the sequence (``ensure_sample_sequence``, cached in --work), run ``fmr evaluate``'s
``evaluate_bag`` with all presets on the same keyframes (odometry from the bag feeds the engine's gate, depth
is used), and tabulate per preset: precision, recall, false positives (loop correctness rules of
``eval/loop_eval.py``: a wrong relative pose is always false), max recall at 100 % precision, pose AUC of the
accepted loops, ATE RMSE before/after the GTSAM pose graph, and ms per keyframe (p50 of the engine's total).
The table is rewritten after every sequence, so an interrupted run still leaves its finished rows;
``--resume`` reuses per-sequence reports already in --work. ``--jobs N`` evaluates N sequences at once in
separate processes (the cores shared out). Where gtsam is missing the ATE after the graph is left out;
``benchmarks/pose_graph_from_report.py`` adds it to the reports later, then ``--resume`` rebuilds the table.
Nothing is tuned here: presets.py's defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from feature_matching_ros.bag import SequenceTopics
from feature_matching_ros.commands.demo import _cell, summary_rows
from feature_matching_ros.commands.evaluate import evaluate_bag
from feature_matching_ros.presets import preset_names
from feature_matching_ros.scenes.sample import ensure_sample_sequence

LOG = logging.getLogger("loop_closure")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()}")


def write_markdown(path: Path, rows: list[dict], command: str, started: float, args: argparse.Namespace) -> None:
    lines = ["# Loop closure on generated sequences: every preset at its default thresholds", "",
             f"Machine: {machine()}. Shared machine: other jobs ran concurrently, so ms/keyframe is an upper bound.",
             "", f"Command: `{command}`", "",
             f"Sequences: {args.frames} frames at {' and '.join(args.sizes)}, 10 Hz, keyframe every "
             f"{args.keyframe_every} frames; depth and odometry from the bag; GT loops from loops.json with the "
             "correctness rules of feature_matching_ros/eval/loop_eval.py (wrong relative pose > 0.5 m / 5 deg "
             "is always a false positive; a correct pose beyond the GT distance counts when the views overlap).",
             "Recall: over queries with a GT loop outside the 10 s exclusion window. max R@100P: recall at the best "
             "inlier threshold with precision 1. AUC: pose error AUC@5/10/20 over accepted loops.",
             f"Wall time so far: {time.perf_counter() - started:.0f} s.", "",
             "| sequence | preset | precision | recall | FPs | accepted | retrieval R@k | max R@100P | AUC@5/10/20 | "
             "ATE before -> after (m) | ms/keyframe p50 |", "|" + "---|" * 11]
    for row in rows:
        auc = "/".join(_cell(row[k], 1) for k in ("auc@5", "auc@10", "auc@20"))
        lines.append("| " + " | ".join((row["sequence"], row["preset"], _cell(row["precision"]), _cell(row["recall"]),
                                        str(row["false_positives"]), str(row["accepted"]),
                                        f"{_cell(row.get('retrieval_recall'))} (k={row.get('retrieval_top_k')})",
                                        _cell(row["max_recall_at_100_precision"]), auc,
                                        f"{_cell(row['ate_before'])} -> {_cell(row['ate_after'])}",
                                        _cell(row["ms_per_keyframe_p50"], 0))) + " |")
    lines += ["", "## Totals per preset", "", "| preset | sequences | false positives | mean recall |", "|---|---|---|---|"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        recalls = [r["recall"] for r in mine if r["recall"] is not None]
        lines.append(f"| {preset} | {len(mine)} | {sum(r['false_positives'] for r in mine)} | "
                     f"{_cell(sum(recalls) / len(recalls) if recalls else None)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def evaluate_run(run: tuple[str, int, int, int], args: argparse.Namespace, torch_threads: int | None) -> dict:
    """Render (or reuse) one sequence and evaluate every preset on it; returns metrics.json's dict."""
    scene, seed, width, height = run
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    directory = args.work / f"{scene}_s{seed}_{args.frames}f_{width}x{height}"
    report = args.work / f"report_{scene}_s{seed}_{args.frames}f_{width}x{height}_kf{args.keyframe_every}"
    metrics_path = report / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if args.resume and metrics_path.is_file() else None
    if metrics is None or set(metrics["runs"]) != set(args.presets):
        bag = ensure_sample_sequence(directory, scene=scene, frames=args.frames, seed=seed, width=width,
                                     height=height)
        metrics = evaluate_bag(bag, list(args.presets), report, SequenceTopics(), None, args.keyframe_every, None,
                               args.reloc_queries, args.device)
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=["office", "corridor", "street"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 3])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--sizes", nargs="+", default=["320x240", "640x480"], help="WIDTHxHEIGHT per run")
    parser.add_argument("--keyframe-every", type=int, default=1)
    parser.add_argument("--presets", nargs="+", default=["cpu", "orb_bow_nn", "orb_lightglue", "aliked_lightglue"],
                        choices=preset_names())
    parser.add_argument("--reloc-queries", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/fmr_loop_closure"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loop_closure.md"))
    parser.add_argument("--resume", action="store_true", help="reuse per-sequence reports already in --work")
    parser.add_argument("--jobs", type=int, default=1, help="sequences evaluated in parallel processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = "python " + " ".join(sys.argv)
    started = time.perf_counter()
    runs = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        for seed in args.seeds:  # seed-major: every scene appears early in an interrupted run
            for scene in args.scenes:
                runs.append((scene, seed, width, height))
    rows_by_run: dict[int, list[dict]] = {}

    def record(index: int, metrics: dict) -> None:
        scene, seed, width, height = runs[index]
        name = f"{scene}_s{seed}_{width}x{height}"
        rows_by_run[index] = [{"sequence": name} | row for row in summary_rows(metrics)]
        for row in rows_by_run[index]:
            LOG.info("%s %s: precision %s recall %s FPs %d", name, row["preset"], row["precision"],
                     row["recall"], row["false_positives"])
        rows = [row for i in sorted(rows_by_run) for row in rows_by_run[i]]
        write_markdown(args.out, rows, command, started, args)

    if args.jobs == 1:
        for index, run in enumerate(runs):
            record(index, evaluate_run(run, args, torch_threads=None))
    else:
        # One process per sequence, the cores shared out: a many-core machine runs the grid in one pass.
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(evaluate_run, run, args, threads): index for index, run in enumerate(runs)}
            for future in as_completed(futures):
                record(futures[future], future.result())
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
