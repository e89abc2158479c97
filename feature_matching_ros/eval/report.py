"""Plots, metrics.json and TUM trajectories for ``fmr evaluate`` (matplotlib, Agg backend: no display needed).

Trajectories are also written in the TUM format that evo and the TUM/ETH tools read, one pose per keyframe:
``trajectory_gt.tum`` (ground truth), ``trajectory_<preset>_odometry.tum`` (before the pose graph) and
``trajectory_<preset>_optimised.tum`` (after it), e.g. ``evo_ape tum trajectory_gt.tum
trajectory_cpu_optimised.tum -a`` (add ``-s`` for monocular runs, whose loops carry no scale).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(runs: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _plt()
    figure, axis = plt.subplots(figsize=(5, 4))
    for name, metrics in runs.items():
        curve = metrics["loop"]["pr_curve"]
        if curve["recall"]:
            axis.plot(curve["recall"], curve["precision"], marker=".", label=f"{name} (R@P100="
                      f"{metrics['loop']['max_recall_at_100_precision']:.2f})")
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_title("loop closure, threshold swept on inliers")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_trajectory(poses: dict[str, np.ndarray], accepted_pairs: list[tuple[int, int]], title: str, path: Path) -> None:
    plt = _plt()
    figure, axis = plt.subplots(figsize=(5, 5))
    for name, style in (("gt", "k-"), ("odometry", "r--"), ("optimised", "b-")):
        if name in poses:
            xy = poses[name][:, :2, 3]
            axis.plot(xy[:, 0], xy[:, 1], style, lw=1, label=name)
    gt = poses.get("gt")
    if gt is not None:
        for q, m in accepted_pairs:
            axis.plot(gt[[q, m], 0, 3], gt[[q, m], 1, 3], "g-", lw=0.5, alpha=0.5)
    axis.set_aspect("equal")
    axis.set_title(title, fontsize=8)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_latency(runs: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _plt()
    stages = ("extract", "global_descriptor", "retrieve", "match", "verify")
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(runs), 1)
    for i, (name, metrics) in enumerate(runs.items()):
        p50 = [metrics["latency_ms"].get(s, {}).get("p50", 0.0) for s in stages]
        p90 = [metrics["latency_ms"].get(s, {}).get("p90", 0.0) for s in stages]
        x = np.arange(len(stages)) + i * width
        axis.bar(x, p50, width, label=f"{name} p50")
        axis.errorbar(x, p50, yerr=[np.zeros(len(stages)), np.subtract(p90, p50)], fmt="none", ecolor="k", lw=0.8)
    axis.set_xticks(np.arange(len(stages)) + 0.4 - width / 2, stages, fontsize=7)
    axis.set_ylabel("ms per keyframe (bar p50, whisker p90)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


TUM_HEADER = "# timestamp tx ty tz qx qy qz qw"


def write_tum(path: Path, stamps_ns: list[int] | np.ndarray, poses: np.ndarray) -> Path:
    """TUM trajectory file: one line ``t tx ty tz qx qy qz qw`` per (4, 4) pose T_world_camera, t in seconds."""
    from scipy.spatial.transform import Rotation

    poses = np.asarray(poses, np.float64)
    if len(stamps_ns) != len(poses):
        raise ValueError(f"{len(stamps_ns)} stamps for {len(poses)} poses")
    quaternions = Rotation.from_matrix(poses[:, :3, :3]).as_quat()  # x, y, z, w
    lines = [TUM_HEADER] + [f"{int(stamp) // 1_000_000_000}.{int(stamp) % 1_000_000_000:09d} "
                            + " ".join(f"{v:.9f}" for v in (*pose[:3, 3], *quaternion))
                            for stamp, pose, quaternion in zip(stamps_ns, poses, quaternions)]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_tum(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N,) timestamps in seconds and (N, 4, 4) poses from a TUM trajectory file (``#`` lines are comments)."""
    from scipy.spatial.transform import Rotation

    rows = np.array([[float(v) for v in line.split()] for line in Path(path).read_text().splitlines()
                     if line.strip() and not line.startswith("#")], np.float64).reshape(-1, 8)
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3, 3] = rows[:, 1:4]
    if len(rows):
        poses[:, :3, :3] = Rotation.from_quat(rows[:, 4:8]).as_matrix()
    return rows[:, 0], poses


def write_report(runs: dict[str, dict[str, Any]], header: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    """Write metrics.json (+ per-keyframe results JSONL and plots); returns the JSON-able metrics."""
    report_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    clean_runs = {}
    for name, metrics in runs.items():
        results = metrics.pop("_results", [])
        with open(report_dir / f"keyframes_{name}.jsonl", "w") as handle:
            for result in results:
                handle.write(json.dumps(result.to_json_dict()) + "\n")
        trajectory = metrics.get("trajectory", {})
        poses = trajectory.pop("_poses", None)
        if poses is not None:
            index_of = {kf.keyframe_id: i for i, kf in enumerate(results)}
            pairs = [(index_of[c.query_id], index_of[c.match_id]) for r in results for c in r.accepted]
            after = (f"{trajectory['ate_after']['rmse']:.3f} m" if "ate_after" in trajectory
                     else "(pose graph skipped)")
            title = f"{name}: ATE {trajectory['ate_before']['rmse']:.3f} m -> {after} ({len(pairs)} loops)"
            plot_trajectory(poses, pairs, title, report_dir / f"trajectory_{name}.png")
            plots[f"trajectory_{name}"] = f"trajectory_{name}.png"
            stamps = [result.stamp_ns for result in results]
            if len(stamps) == len(poses["gt"]):
                trajectory["tum"] = {"gt": write_tum(report_dir / "trajectory_gt.tum", stamps, poses["gt"]).name}
                for kind in [kind for kind in ("odometry", "optimised") if kind in poses]:
                    path = write_tum(report_dir / f"trajectory_{name}_{kind}.tum", stamps, poses[kind])
                    trajectory["tum"][kind] = path.name
        clean_runs[name] = metrics
    plot_pr_curves(clean_runs, report_dir / "pr_curve.png")
    plot_latency(clean_runs, report_dir / "latency.png")
    plots |= {"pr_curve": "pr_curve.png", "latency": "latency.png"}
    primary = next(iter(clean_runs.values()))
    out = header | {"loop": primary["loop"], "retrieval": primary.get("retrieval"),
                    "relocalization": primary["relocalization"],
                    "trajectory": primary["trajectory"], "latency_ms": primary["latency_ms"],
                    "preset": primary["preset"], "runs": clean_runs, "plots": plots}
    tmp = report_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(out, indent=1, default=_json_default) + "\n")
    tmp.replace(report_dir / "metrics.json")
    return out


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
