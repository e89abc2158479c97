"""Official vs detector-agnostic (fine-tuned) ALIKED-LightGlue, per detector, all keypoints described by ALIKED.

    # real held-out pairs (scenes never trained on; scripts/build_real_pairs.py), + our Efficient LoFTR
    python benchmarks/bench_agnostic.py --real ~/.cache/feature_matching_ros/real_pairs/heldout --max-pairs 20 \\
        --detectors orb sift aliked disk xfeat --eloftr --device cpu
    python benchmarks/bench_agnostic.py --real ~/.cache/feature_matching_ros/real_pairs/heldout \\
        --detectors orb sift aliked disk xfeat --eloftr --device cuda
    # synthetic dev pairs
    python benchmarks/bench_agnostic.py --device cpu --rendered-pairs 32 --out benchmarks/results/agnostic.md

``--real DIR``: the pairs of a real pair set (photos with structure-from-motion poses), its first ``--max-pairs``
(the manifest interleaves scenes, so a prefix samples every scene evenly). Match precision there is the share of
matches within 2 px of the ground-truth epipolar line (symmetric distance); poses by essential matrix, error =
max(rotation, translation direction), AUC@5/10/20 with failures infinite. ``--eloftr [WEIGHTS]`` adds Efficient
LoFTR (default: our weights in resource/eloftr; or a checkpoint, or an export folder of ``fmr train eloftr``) next
to official LightGlue on ORB-SS keypoints; ``--candidate DIR`` adds a LightGlue from an export folder of
``fmr train lightglue`` (weights measured before they are packed into resource/).
Without ``--real``: the synthetic dev pairs (graf1-3, motorcycle stereo and synthetic homographies of photos
excluded from fine-tuning) + the *eval* split of ``fmr make-pairs``; precision = homography transfer error < 3 px
(graf < 5 px), pose pairs reprojection with exact depth < 3 px.
Features are extracted once per detector and image and matched by both models (identical keypoints and
descriptors).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matching import dev_pairs, evaluate_combination, machine_description, memoised  # noqa: E402

from feature_matching_ros.config import FeatureConfig, MatcherConfig, PipelineConfig  # noqa: E402
from feature_matching_ros.devdata import PosePair  # noqa: E402
from feature_matching_ros.matchers import build_matcher  # noqa: E402
from feature_matching_ros.pipeline import MatchingPipeline  # noqa: E402

DETECTORS = ("orb", "orb_multiscale", "sift", "aliked", "disk", "xfeat")
WEIGHTS = ("official", "agnostic")


def real_pairs(folder: Path, max_pairs: int) -> tuple[list[PosePair], dict]:
    """Pose pairs of a real pair set (images shared between pairs, so per-image feature memos hit) and a summary."""
    from feature_matching_ros.training.real_pairs import RealPairs

    source = RealPairs(folder, max_pairs=max_pairs)
    images: dict[tuple[str, int], np.ndarray] = {}
    pairs, per_scene = [], {}
    for entry in source.pairs:
        scene = source.scenes[entry["scene"]]
        for k in (entry["i"], entry["j"]):
            images.setdefault((entry["scene"], k), scene.image(k))
        i, j = entry["i"], entry["j"]
        pairs.append(PosePair(f"{entry['scene']}-{i}-{j}", images[(entry["scene"], i)], images[(entry["scene"], j)],
                              scene.K[i], scene.K[j], scene.T_1_0(i, j)))
        per_scene[entry["scene"]] = per_scene.get(entry["scene"], 0) + 1
    return pairs, {"split": source.split, "pairs_per_scene": per_scene, "images": len(images),
                   "covisibility": [float(p["covisibility"]) for p in source.pairs]}


def export_state(folder: Path) -> dict:
    """The state dict of a training export folder (``fmr train ... --export DIR``: fp16 shards + a JSON of their
    sha256), so that weights can be measured before they are packed into resource/."""
    from feature_matching_ros.weights import load_sharded_safetensors

    listings = [p for p in sorted(folder.glob("*.json"))
                if all(str(k).endswith(".safetensors") for k in json.loads(p.read_text()) or [None])]
    if len(listings) != 1:
        raise SystemExit(f"{folder}: expected one JSON listing the exported shards, found {len(listings)}")
    return load_sharded_safetensors(folder, json.loads(listings[0].read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-keypoints", type=int, default=1024)
    parser.add_argument("--real", type=Path, help="real pair set folder (e.g. .../real_pairs/heldout)")
    parser.add_argument("--max-pairs", type=int, default=0, help="with --real: the first N pairs (0 = all)")
    parser.add_argument("--eloftr", nargs="?", const="default", metavar="WEIGHTS",
                        help="add Efficient LoFTR next to ORB-SS + official LightGlue: our shipped weights (no "
                             "value), a checkpoint file, or an export folder of fmr train eloftr")
    parser.add_argument("--candidate", type=Path, metavar="DIR",
                        help="also measure a LightGlue from an export folder of fmr train lightglue (--export DIR)")
    parser.add_argument("--rendered-pairs", type=int, default=32, help="eval-split pairs (half rendered, half homography)")
    parser.add_argument("--pairs-dir", type=Path, help="existing eval-split make-pairs folder")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=WEIGHTS,
                        help="shipped LightGlue weights to compare (the candidate is added to these)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    candidate = export_state(args.candidate) if args.candidate else None
    summary = None
    if args.real:
        pairs, summary = real_pairs(args.real, args.max_pairs)
    else:
        pairs_dir = args.pairs_dir
        if pairs_dir is None and args.rendered_pairs > 0:
            from feature_matching_ros.scenes.pairs import generate_pairs

            pairs_dir = Path(tempfile.mkdtemp(prefix="fmr_agnostic_"))
            generate_pairs(pairs_dir, n=args.rendered_pairs, seed=0, split="eval")
        pairs = dev_pairs(pairs_dir, args.rendered_pairs)
    rows = []
    start = time.perf_counter()

    def report(label: str, weights: str, result: dict) -> None:
        rows.append((label, weights, result))
        print(f"{label:15s} {weights:9s} matches {result['matches']:6.1f} precision {result['precision']:.3f} "
              f"inliers {result['inliers']:6.1f} AUC {result['auc@5']:.1f}/{result['auc@10']:.1f}/"
              f"{result['auc@20']:.1f} ({time.perf_counter() - start:.0f} s)", flush=True)

    device = None
    for detector in args.detectors:
        config = PipelineConfig(features=FeatureConfig(detector=detector, descriptor="aliked",
                                                       max_keypoints=args.max_keypoints),
                                matcher=MatcherConfig(), device=args.device, precision="fp32")
        pipeline = MatchingPipeline(config)
        device = pipeline.device
        pipeline.extract = memoised(pipeline.extract)
        for weights in tuple(args.weights) + (("candidate",) if candidate is not None else ()):
            matcher_config = MatcherConfig(weights="official" if weights == "candidate" else weights)
            pipeline.config.matcher = matcher_config
            pipeline.matcher = build_matcher(matcher_config, pipeline.extractor.descriptor_type, pipeline.device,
                                             pipeline.precision)
            if weights == "candidate":
                pipeline.matcher.model.load_state_dict({k: v.to(pipeline.device) for k, v in candidate.items()})
                weights = f"{args.candidate.name} (candidate)"
            report(detector, weights, evaluate_combination(pipeline, pairs))
    if args.eloftr:
        eloftr_weights = args.eloftr
        if Path(args.eloftr).is_dir():  # an export folder: one safetensors file with official key names
            from safetensors.torch import save_file

            eloftr_weights = str(Path(tempfile.mkdtemp(prefix="fmr_eloftr_")) / "candidate.safetensors")
            save_file({k: v.contiguous() for k, v in export_state(Path(args.eloftr)).items()}, eloftr_weights)
        # Detector-free: the extractor only serves retrieval in the engine; ORB with native descriptors loads no net.
        pipeline = MatchingPipeline(PipelineConfig(
            features=FeatureConfig(detector="orb", descriptor="native", resize_max=640),
            matcher=MatcherConfig(name="eloftr", weights=eloftr_weights), device=args.device, precision="fp32"))
        device = pipeline.device
        report("Efficient LoFTR (no keypoints)", "ours (resource/eloftr)" if args.eloftr == "default"
               else Path(args.eloftr).name,
               evaluate_combination(pipeline, pairs))
    text = "\n".join(table(rows, args, pairs, summary, device))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def table(rows: list, args, pairs: list, summary: dict | None, device) -> list[str]:
    pose_pairs = rows[0][2]["pose_pairs"] if rows else 0
    # The home folder as ~: results files are the same wherever the data lives.
    command = "python benchmarks/bench_agnostic.py " + " ".join(a.replace(str(Path.home()), "~") for a in sys.argv[1:])
    lines = [f"Machine: {machine_description(device) if device is not None else args.device}; fp32; max_keypoints "
             f"{args.max_keypoints}.  ", f"Command: `{command}`  "]
    if summary:
        scenes = ", ".join(f"{name} {count}" for name, count in summary["pairs_per_scene"].items())
        covisibility = np.asarray(summary["covisibility"])
        lines.append(f"Pairs: {len(pairs)} real pairs of the {summary['split']} split ({scenes}; {summary['images']} "
                     f"images; covisibility median {np.median(covisibility):.2f}, "
                     f"{(covisibility < 0.2).mean() * 100:.0f} % below 0.2).")
    else:
        lines.append(f"Pairs: {len(pairs)} ({pose_pairs} with pose ground truth).")
    lines += ["", "| detector (ALIKED descriptors) | LightGlue weights | matches | precision | inliers | AUC@5 | AUC@10 | "
              "AUC@20 |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {d} | {w} | {r['matches']:.1f} | {r['precision']:.3f} | {r['inliers']:.1f} | {r['auc@5']:.1f} | "
              f"{r['auc@10']:.1f} | {r['auc@20']:.1f} |" for d, w, r in rows]
    by_detector = {}
    for detector, weights, result in rows:
        by_detector.setdefault(detector, {})[weights] = result
    for weights in dict.fromkeys(w for _, w, _ in rows if w != "official"):
        deltas = [f"{d} {r[weights]['auc@10'] - r['official']['auc@10']:+.1f}" for d, r in by_detector.items()
                  if {"official", weights} <= set(r)]
        if deltas:
            lines += ["", f"AUC@10, {weights} minus official: " + ", ".join(deltas) + "."]
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
