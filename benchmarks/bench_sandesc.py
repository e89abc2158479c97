"""SANDESC vs native descriptors at the same keypoints (ORB single-scale, ALIKED), matched by mutual nearest neighbour.

    python benchmarks/bench_sandesc.py --device cpu --max-pairs 20 --out benchmarks/results/sandesc_cpu.md
    python benchmarks/bench_sandesc.py --device cuda --pairs PAIRS/eval --max-pairs 96 --out sandesc_gpu.md

Pairs held apart from training: the real dev pairs (graf1-3 homography, motorcycle stereo with exact pose),
synthetic homographies of 3 photos (excluded from every training set) and the first ``--max-pairs`` pairs of
an *eval*-split ``fmr make-pairs`` folder (``--pairs``; generated into a temporary folder when absent) --
the same pairs as bench_matching.py / bench_agnostic.py.
Per keypoints x descriptor: mean matches; match precision (homography pairs: transfer error < 3 px, graf
< 5 px; pose pairs: reprojection with exact depth < 3 px); homography accuracy (MAGSAC homography from the
matches, mean corner error <= 3 / 5 px, over the homography pairs); relative pose AUC@5/10/20 over the pose
pairs (MODELS.md protocol: essential matrix with a 0.5 px threshold, error = max(rotation, translation
angle), failures infinite); median ms per 640x480 image for detection + description and for the
description alone (graf1 resized, after a warm-up); descriptor network parameters.
Matcher: mutual nearest neighbour without ratio test or distance limit (``--ratio-test`` to change), the
same for float and binary descriptors. Weights: ``--weights-dir`` (default resource/sandesc/) holds
``sandesc_<detector>.safetensors``; ``--allow-random`` substitutes random-init weights for missing files
(to check the script runs; such numbers are meaningless and flagged in the table).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matching import dev_pairs, evaluate_combination, machine_description, memoised  # noqa: E402

from feature_matching_ros.config import FeatureConfig, MatcherConfig, PipelineConfig, PoseConfig  # noqa: E402
from feature_matching_ros.devdata import HomographyPair, load_graf  # noqa: E402
from feature_matching_ros.features.extractor import _network  # noqa: E402
from feature_matching_ros.features.sandesc import ENV_WEIGHTS, SANDESC_DIR, sandesc_weights_path  # noqa: E402
from feature_matching_ros.pipeline import MatchingPipeline  # noqa: E402
from feature_matching_ros.training.sandesc import estimate_homography, homography_corner_error  # noqa: E402
from feature_matching_ros.weights import WeightsError  # noqa: E402

DETECTORS = ("orb", "aliked")
DEV_PAIRS = 5  # graf, motorcycle, 3 synthetic homographies come first in dev_pairs()


def homography_accuracy(pipeline: MatchingPipeline, pairs) -> dict[str, float]:
    errors = []
    for pair in pairs:
        if not isinstance(pair, HomographyPair):
            continue
        features0, features1 = pipeline.extract(pair.image0), pipeline.extract(pair.image1)
        found = pipeline.match(features0, [features1])[0].matches
        H = estimate_homography(features0.keypoints_numpy()[found[:, 0]], features1.keypoints_numpy()[found[:, 1]])
        height, width = pair.image0.shape[:2]
        errors.append(homography_corner_error(H, pair.H_1_0, (width, height)))
    errors = np.array(errors)
    return {"h_pairs": len(errors), "h_acc@3": float((errors <= 3).mean()) if len(errors) else float("nan"),
            "h_acc@5": float((errors <= 5).mean()) if len(errors) else float("nan")}


def timing(pipeline: MatchingPipeline, image: np.ndarray, repeat: int) -> tuple[float, float]:
    """Median ms per image: detect + describe, and describe alone (the extractor's own split)."""
    import torch

    extractor = pipeline.extractor
    extractor(image)  # warm-up
    total, describe = [], []
    for _ in range(repeat):
        if pipeline.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        extractor(image)
        total.append((time.perf_counter() - start) * 1e3)
        describe.append(extractor.last_timing_ms["describe"])
    return statistics.median(total), statistics.median(describe)


def parameters(pipeline: MatchingPipeline) -> int | None:
    extractor = pipeline.extractor
    network = extractor.descriptor if extractor.descriptor is not None else extractor.detector
    model = getattr(network, "model", None)
    return None if model is None else sum(p.numel() for p in model.parameters())


def sandesc_weights(detector: str, weights_dir: Path, allow_random: bool, scratch: Path) -> tuple[str, str]:
    """(file used, label) for ``detector``; writes random-init weights into ``scratch`` when allowed."""
    os.environ[ENV_WEIGHTS] = str(weights_dir)
    try:
        path = sandesc_weights_path(detector)
        return str(path), path.stem
    except WeightsError:
        if not allow_random:
            raise
    import torch

    from feature_matching_ros.models.sandesc import SANDesc, save_sandesc

    torch.manual_seed(0)
    path = save_sandesc(SANDesc().eval(), scratch / f"sandesc_{detector}.safetensors", {"detector": "random-init"})
    return str(path), "RANDOM INIT"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--weights-dir", type=Path, default=SANDESC_DIR, help="folder of sandesc_<detector>.safetensors")
    parser.add_argument("--pairs", type=Path, help="eval-split make-pairs folder (default: generate --max-pairs)")
    parser.add_argument("--max-pairs", type=int, default=32, help="eval-split pairs used (plus the 5 dev pairs)")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--max-keypoints", type=int, default=1024)
    parser.add_argument("--ratio-test", type=float, default=1.0, help="1.0 = plain mutual nearest neighbour")
    parser.add_argument("--repeat", type=int, default=5, help="timing repetitions (median)")
    parser.add_argument("--allow-random", action="store_true", help="random-init weights where a file is missing")
    parser.add_argument("--lightglue", action="store_true",
                        help="add rows matched by the official ALIKED-LightGlue: ALIKED descriptors (reference) and "
                             "SANDESC descriptors zero-shot (LightGlue never saw SANDESC)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()

    pairs_dir = args.pairs
    if pairs_dir is None and args.max_pairs > 0:
        from feature_matching_ros.scenes.pairs import generate_pairs

        pairs_dir = Path(tempfile.mkdtemp(prefix="fmr_sandesc_"))
        generate_pairs(pairs_dir, n=args.max_pairs, seed=0, split="eval")
    pairs = dev_pairs(pairs_dir, args.max_pairs)[:DEV_PAIRS + max(0, args.max_pairs)]
    timing_image = cv2.resize(load_graf().image0, (640, 480), interpolation=cv2.INTER_AREA)
    scratch = Path(tempfile.mkdtemp(prefix="fmr_sandesc_random_"))
    rows, random_used = [], False
    start = time.perf_counter()
    variants = ["native", "sandesc"] + (["aliked+lightglue", "sandesc+lightglue"] if args.lightglue else [])
    for detector in args.detectors:
        for variant in variants:
            descriptor = variant.split("+")[0]
            if descriptor == "aliked" and detector == "aliked":
                descriptor = "native"
            label = "-"
            if descriptor == "sandesc":
                path, label = sandesc_weights(detector, args.weights_dir, args.allow_random, scratch)
                random_used |= label == "RANDOM INIT"
                os.environ[ENV_WEIGHTS] = path
            _network.cache_clear()
            config = PipelineConfig(
                features=FeatureConfig(detector=detector, descriptor=descriptor, max_keypoints=args.max_keypoints),
                matcher=MatcherConfig(name="nn", ratio_test=args.ratio_test, max_hamming=256),
                pose=PoseConfig(ransac_threshold_px=0.5), device=args.device)
            pipeline = MatchingPipeline(config)
            if variant.endswith("+lightglue"):
                # The official ALIKED-LightGlue takes any 128-d descriptors; on SANDESC it runs zero-shot (the
                # config refuses that pairing for users, since LightGlue was never trained on SANDESC).
                from feature_matching_ros.matchers.lightglue import LightGlueMatcher

                pipeline.matcher = LightGlueMatcher("aliked", MatcherConfig(), pipeline.device, pipeline.precision)
                pipeline.matcher.descriptor_type = pipeline.extractor.descriptor_type  # lift the guard, on purpose
            total_ms, describe_ms = timing(pipeline, timing_image, args.repeat)
            pipeline.extract = memoised(pipeline.extract)
            result = evaluate_combination(pipeline, pairs) | homography_accuracy(pipeline, pairs)
            result |= {"ms": total_ms, "describe_ms": describe_ms, "params": parameters(pipeline), "weights": label,
                       "dim": int(pipeline.extract(pairs[0].image0).descriptors.shape[1])}
            rows.append((detector, variant, result))
            print(f"{detector:7s} {variant:8s} matches {result['matches']:6.1f} precision {result['precision']:.3f} "
                  f"H@3/5 {result['h_acc@3']:.2f}/{result['h_acc@5']:.2f} AUC {result['auc@5']:.1f}/"
                  f"{result['auc@10']:.1f}/{result['auc@20']:.1f} {total_ms:.0f} ms ({describe_ms:.0f} describe) "
                  f"[{time.perf_counter() - start:.0f} s]", flush=True)

    def params(value):
        return "-" if value is None else f"{value / 1e6:.2f} M"

    header = ["| keypoints | descriptor | weights | dim | params | ms / image (describe) | matches | precision | "
              "H acc@3px | H acc@5px | AUC@5 | AUC@10 | AUC@20 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = [f"| {d} | {e} | {r['weights']} | {r['dim']} | {params(r['params'])} | {r['ms']:.1f} ({r['describe_ms']:.1f}) | "
             f"{r['matches']:.1f} | {r['precision']:.3f} | {r['h_acc@3']:.3f} | {r['h_acc@5']:.3f} | {r['auc@5']:.1f} | "
             f"{r['auc@10']:.1f} | {r['auc@20']:.1f} |" for d, e, r in rows]
    first = rows[0][2] if rows else {"pose_pairs": 0, "h_pairs": 0}
    device = pipeline.device if rows else args.device
    text = "\n".join([
        "# SANDESC vs native descriptors (mutual nearest neighbour unless the row says lightglue)", "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Pairs: {len(pairs)} ({first['h_pairs']} homography, {first['pose_pairs']} with pose ground truth); "
        f"max_keypoints {args.max_keypoints}; ratio test {args.ratio_test}; device {machine_description(device)}; "
        f"precision auto (fp32 on CPU, fp16 on CUDA); timing on a 640x480 image, median of {args.repeat}.", "",
        *(["**Random-init SANDESC weights: these numbers only show that the script runs.**", ""] if random_used else []),
        *header, *lines, ""])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
