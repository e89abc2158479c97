"""Accuracy and speed of every detector x descriptor x matcher combination on the dev pairs.

    python benchmarks/bench_matching.py --device cpu --out benchmarks/results/matching_cpu.md
    python benchmarks/bench_matching.py --device cuda --precision fp32 fp16 --out benchmarks/results/matching_gpu.md

Accuracy (on the device given, fp32): per combination, mean matches, match precision (homography pairs:
transfer error < 3 px, graf < 5 px; pose pairs: reprojection with exact depth < 3 px, else symmetric
epipolar distance < 2 px), mean inliers, and pose AUC@5/10/20 over the pose pairs (essential matrix,
error = max(rotation, translation angle), failures infinite).
Dev pairs: graf1-3 (real, homography), motorcycle (real stereo, exact pose), 3 synthetic homographies of
scikit-image photos, and the eval split of ``fmr make-pairs`` (rendered scenes + photo homographies,
generated on the fly unless --pairs-dir is given).
Speed (640x480, --max-keypoints, median of --repeat runs after warm-up): extraction per image for each
detector/descriptor, LightGlue per pair, and one query against 8 candidates in one batched call.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from feature_matching_ros.config import DESCRIPTORS, DETECTORS, ConfigError, FeatureConfig, MatcherConfig, PipelineConfig
from feature_matching_ros.devdata import (HomographyPair, PosePair, homography_errors, load_graf, load_motorcycle,
                                          reprojection_errors, synthetic_homography_pair)
from feature_matching_ros.eval.metrics import pose_auc, relative_pose_error_deg
from feature_matching_ros.pipeline import MatchingPipeline
from feature_matching_ros.weights import WeightsError


def dev_pairs(pairs_dir: Path | None, rendered: int) -> list[HomographyPair | PosePair]:
    pairs: list[HomographyPair | PosePair] = [load_graf(), load_motorcycle()]
    pairs += [synthetic_homography_pair(photo, seed) for seed, photo in enumerate(("astronaut", "coffee", "chelsea"))]
    if rendered <= 0:
        return pairs
    from feature_matching_ros.scenes.pairs import generate_pairs, iter_pairs

    if pairs_dir is None:
        pairs_dir = Path(tempfile.mkdtemp(prefix="fmr_devpairs_"))
        generate_pairs(pairs_dir, n=rendered, seed=0, split="eval")
    for index, pair in enumerate(iter_pairs(pairs_dir)):
        name = f"{pair['kind']}-{index}"
        if pair["kind"] == "homography":
            pairs.append(HomographyPair(name, pair["image0"], pair["image1"], pair["H_1_0"]))
        else:
            pairs.append(PosePair(name, pair["image0"], pair["image1"], pair["K0"], pair["K1"], pair["T_1_0"],
                                  depth0=np.nan_to_num(pair["depth0"], nan=0.0)))
    return pairs


def memoised(extract):
    """Extract each image once per pipeline (keyed by identity; the pairs list keeps the images alive), so several
    matchers or metrics over the same pairs reuse the features."""
    cache: dict[int, object] = {}

    def wrapper(image):
        if id(image) not in cache:
            cache[id(image)] = extract(image)
        return cache[id(image)]
    return wrapper


def evaluate_combination(pipeline: MatchingPipeline, pairs) -> dict:
    matches, correct_fractions, inliers, pose_errors, timings = [], [], [], [], []
    for pair in pairs:
        if isinstance(pair, PosePair):
            result = pipeline.match_pair(pair.image0, pair.image1, pair.K0, pair.K1)
            points0, points1 = result.matched_points()
            errors = reprojection_errors(pair, points0, points1)
            threshold = 3.0 if pair.depth0 is not None else 2.0
            known = np.isfinite(errors)
            correct_fractions.append(float((errors[known] < threshold).mean()) if known.any() else np.nan)
            pose_errors.append(max(relative_pose_error_deg(result.pose.T_1_0, pair.T_1_0)) if result.success
                               else np.inf)
            inliers.append(result.pose.num_inliers)
        elif pipeline.needs_images:
            dense = pipeline.match_images(pair.image0, [pair.image1])[0]
            found = np.zeros((len(dense), 2))
            errors = homography_errors(pair.H_1_0, dense.keypoints0, dense.keypoints1)
            threshold = 5.0 if pair.name == "graf1-3" else 3.0
            correct_fractions.append(float((errors < threshold).mean()) if len(found) else 0.0)
            result = None
        else:
            features0, features1 = pipeline.extract(pair.image0), pipeline.extract(pair.image1)
            found = pipeline.match(features0, [features1])[0].matches
            errors = homography_errors(pair.H_1_0, features0.keypoints_numpy()[found[:, 0]],
                                       features1.keypoints_numpy()[found[:, 1]])
            threshold = 5.0 if pair.name == "graf1-3" else 3.0
            correct_fractions.append(float((errors < threshold).mean()) if len(found) else 0.0)
            result = None
        matches.append(len(result.matches) if result is not None else len(found))
        if result is not None:
            timings.append(result.timing_ms)
    auc = pose_auc(pose_errors)
    return {"matches": float(np.mean(matches)), "precision": float(np.nanmean(correct_fractions)),
            "inliers": float(np.mean(inliers)) if inliers else float("nan"), **auc,
            "pose_pairs": len(pose_errors)}


def time_call(fn, repeat: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, kernels, cudnn autotune)
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def speed_rows(device: str, precisions: list[str], max_keypoints: int, repeat: int, pair: HomographyPair) -> list[str]:
    """Timing on a real pair (graf1 vs graf3 at 640x480): matching an image with itself would let early exit
    stop after a layer or two and flatter the numbers."""
    import cv2

    image = cv2.resize(pair.image0, (640, 480), interpolation=cv2.INTER_AREA)
    other = cv2.resize(pair.image1, (640, 480), interpolation=cv2.INTER_AREA)
    rows = []
    graph_modes = (True, False) if device == "cuda" else (False,)
    combos = [(d, e, g) for d, e in (("orb", "aliked"), ("orb", "disk"), ("aliked", "aliked"), ("disk", "disk"),
                                     ("xfeat", "native"), ("sift", "aliked"), ("orb", "native"))
              for g in (graph_modes if (d, e) != ("orb", "native") else (False,))]
    for precision in precisions:
        for detector, descriptor, graphs in combos:
            matcher = "nn" if descriptor == "native" and detector == "orb" else "lightglue"
            try:
                pipeline = MatchingPipeline(PipelineConfig(
                    features=FeatureConfig(detector=detector, descriptor=descriptor, max_keypoints=max_keypoints,
                                           resize_max=640),
                    matcher=MatcherConfig(name=matcher, cuda_graphs=graphs), device=device, precision=precision))
            except WeightsError as error:  # rows whose weights are not installed are reported, not fatal
                rows.append(f"| {precision} | {detector}+{descriptor} | {matcher} | | skipped: {error} | | | | |")
                continue
            matcher = f"{matcher}{' (CUDA graphs)' if graphs else ''}"
            features, candidate = pipeline.extract(image), pipeline.extract(other)
            extract_ms = time_call(lambda: pipeline.extract(image), repeat, pipeline.device)
            single_ms = time_call(lambda: pipeline.match(features, [candidate]), repeat, pipeline.device)
            batch_ms = time_call(lambda: pipeline.match(features, [candidate] * 8), repeat, pipeline.device)
            rows.append(f"| {precision} | {detector}+{descriptor} | {matcher} | {len(features)} | {extract_ms:.1f} | "
                        f"{single_ms:.1f} | {batch_ms:.1f} | {batch_ms / single_ms:.2f} |")
            print(rows[-1], flush=True)
    return rows


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--max-keypoints", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rendered-pairs", type=int, default=32, help="eval pairs from fmr make-pairs (0: none)")
    parser.add_argument("--pairs-dir", type=Path, help="existing fmr make-pairs output to use")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    args = parser.parse_args()
    device = torch.device(args.device)
    lines = [f"# Matching benchmark ({args.device})", "", f"Machine: {machine_description(device)}  ",
             f"Command: `python {' '.join(sys.argv)}`", ""]
    if not args.skip_accuracy:
        pairs = dev_pairs(args.pairs_dir, args.rendered_pairs)
        lines += [f"## Accuracy on {len(pairs)} dev pairs, {args.max_keypoints} keypoints, precision auto (fp16 on CUDA, fp32 on CPU)", "",
                  "| detector | descriptor | matcher | matches | precision | inliers | AUC@5 | AUC@10 | AUC@20 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for detector in DETECTORS:
            for descriptor in DESCRIPTORS:
                for matcher in ("lightglue", "nn"):
                    try:
                        config = PipelineConfig(
                            features=FeatureConfig(detector=detector, descriptor=descriptor,
                                                   max_keypoints=args.max_keypoints),
                            matcher=MatcherConfig(name=matcher), device=args.device)
                    except ConfigError:
                        continue  # no LightGlue weights for native ORB/SIFT descriptors
                    try:
                        pipeline = MatchingPipeline(config)
                    except WeightsError as error:  # rows whose weights are not installed are reported, not fatal
                        lines.append(f"| {detector} | {descriptor} | {matcher} | skipped: {error} | | | | | |")
                        continue
                    if descriptor == "native" and detector in ("aliked", "disk"):
                        continue  # identical to descriptor=aliked/disk for these detectors
                    stats = evaluate_combination(pipeline, pairs)
                    row = (f"| {detector} | {descriptor} | {matcher} | {stats['matches']:.0f} | "
                           f"{stats['precision']:.3f} | {stats['inliers']:.0f} | {stats['auc@5']:.1f} | "
                           f"{stats['auc@10']:.1f} | {stats['auc@20']:.1f} |")
                    lines.append(row)
                    print(row, flush=True)
        lines.append("")
    if not args.skip_speed:
        lines += [f"## Speed at 640x480, {args.max_keypoints} keypoints (median ms of {args.repeat})", "",
                  "| precision | features | matcher | keypoints | extract / image | match 1 pair | "
                  "match 1 vs 8 (batched) | batch / single |", "|---|---|---|---|---|---|---|---|"]
        lines += speed_rows(args.device, args.precision, args.max_keypoints, args.repeat, load_graf())
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
