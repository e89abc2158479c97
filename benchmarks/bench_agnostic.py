"""Official vs detector-agnostic (fine-tuned) ALIKED-LightGlue, per detector, all keypoints described by ALIKED.

    python benchmarks/bench_agnostic.py --device cpu --rendered-pairs 32 --out benchmarks/results/agnostic.md

Pairs held apart from training: the real dev pairs (graf1-3, motorcycle stereo; their photos were excluded
from the fine-tuning data) + synthetic homographies of 3 photos (also excluded) + the *eval* split of
``fmr make-pairs`` (other photos, other scenes than any training pair). Metrics as bench_matching.py:
mean matches, match precision (homography transfer error < 3 px, graf < 5 px; pose pairs reprojection with
exact depth < 3 px), mean essential-matrix inliers and pose AUC@5/10/20 over the pose pairs.
Features are extracted once per detector and matched by both models (identical keypoints and descriptors).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matching import dev_pairs, evaluate_combination, machine_description, memoised  # noqa: E402

from feature_matching_ros.config import FeatureConfig, MatcherConfig, PipelineConfig  # noqa: E402
from feature_matching_ros.matchers import build_matcher  # noqa: E402
from feature_matching_ros.pipeline import MatchingPipeline  # noqa: E402

DETECTORS = ("orb", "orb_multiscale", "sift", "aliked", "disk", "xfeat")
WEIGHTS = ("official", "agnostic")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-keypoints", type=int, default=1024)
    parser.add_argument("--rendered-pairs", type=int, default=32, help="eval-split pairs (half rendered, half homography)")
    parser.add_argument("--pairs-dir", type=Path, help="existing eval-split make-pairs folder")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    pairs_dir = args.pairs_dir
    if pairs_dir is None and args.rendered_pairs > 0:
        from feature_matching_ros.scenes.pairs import generate_pairs

        pairs_dir = Path(tempfile.mkdtemp(prefix="fmr_agnostic_"))
        generate_pairs(pairs_dir, n=args.rendered_pairs, seed=0, split="eval")
    pairs = dev_pairs(pairs_dir, args.rendered_pairs)
    rows = []
    start = time.perf_counter()
    for detector in args.detectors:
        config = PipelineConfig(features=FeatureConfig(detector=detector, descriptor="aliked",
                                                       max_keypoints=args.max_keypoints),
                                matcher=MatcherConfig(), device=args.device, precision="fp32")
        pipeline = MatchingPipeline(config)
        pipeline.extract = memoised(pipeline.extract)
        for weights in WEIGHTS:
            matcher_config = MatcherConfig(weights=weights)
            pipeline.config.matcher = matcher_config
            pipeline.matcher = build_matcher(matcher_config, pipeline.extractor.descriptor_type, pipeline.device,
                                             pipeline.precision)
            result = evaluate_combination(pipeline, pairs)
            rows.append((detector, weights, result))
            print(f"{detector:15s} {weights:9s} matches {result['matches']:6.1f} precision {result['precision']:.3f} "
                  f"inliers {result['inliers']:6.1f} AUC {result['auc@5']:.1f}/{result['auc@10']:.1f}/"
                  f"{result['auc@20']:.1f} ({time.perf_counter() - start:.0f} s)", flush=True)
    header = ["| detector (ALIKED descriptors) | LightGlue weights | matches | precision | inliers | AUC@5 | AUC@10 | AUC@20 |",
              "|---|---|---|---|---|---|---|---|"]
    lines = [f"| {d} | {w} | {r['matches']:.1f} | {r['precision']:.3f} | {r['inliers']:.1f} | {r['auc@5']:.1f} | "
             f"{r['auc@10']:.1f} | {r['auc@20']:.1f} |" for d, w, r in rows]
    pose_pairs = rows[0][2]["pose_pairs"] if rows else 0
    text = "\n".join([
        f"Pairs: {len(pairs)} ({pose_pairs} with pose ground truth); max_keypoints {args.max_keypoints}; "
        f"device {machine_description(pipeline.device)}; fp32.", "", *header, *lines, ""])
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
