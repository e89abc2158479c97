"""Efficient LoFTR: speed per 640x480 pair (full / optimized, fp32 / fp16) and accuracy next to LightGlue.

    python benchmarks/bench_eloftr.py --device cuda --precision fp32 fp16 --out benchmarks/results/eloftr_gpu.md
    python benchmarks/bench_eloftr.py --device cpu --precision fp32 --repeat 3 --out benchmarks/results/eloftr_cpu.md

Speed: median over ``--repeat`` runs after a warm-up, on graf1 vs graf3 resized to 640x480 (a real pair, so
the fine stage refines a realistic number of coarse matches). "network, eager" is the network alone on tensors
already on the device (the paper's number); "match_images" adds image preparation and coordinate mapping, and
on CUDA replays the fixed-shape dense stage from a captured graph (the row says so).
Accuracy: the dev pairs of bench_matching.py (graf, motorcycle, 3 synthetic homographies of held-out photos)
plus ``--rendered-pairs`` eval-split pairs; match precision (homography transfer < 3 px, graf < 5 px; pose
pairs: reprojection with exact depth < 3 px), mean matches, mean essential-matrix inliers, pose AUC@5/10/20.
Weights: ``--weights default`` = ours (resource/eloftr, synthetic data only), or a checkpoint path (the
official eloftr_outdoor.ckpt); ``--random-weights`` times the architecture without trained weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_matching import dev_pairs, evaluate_combination, machine_description  # noqa: E402

from feature_matching_ros.config import FeatureConfig, MatcherConfig, PipelineConfig  # noqa: E402
from feature_matching_ros.devdata import load_graf  # noqa: E402
from feature_matching_ros.features.learned import autocast_for  # noqa: E402
from feature_matching_ros.pipeline import MatchingPipeline  # noqa: E402
from feature_matching_ros.weights import WeightsError  # noqa: E402


def _median_ms(fn, repeat: int, device: torch.device) -> tuple[float, object]:
    result = fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), result


# Detector-free pipelines still build a feature extractor (it serves retrieval in the engine); ORB with its
# native descriptors loads no network, so these rows need no ALIKED weights installed.
_RETRIEVAL_ONLY = FeatureConfig(detector="orb", descriptor="native", resize_max=640)


def _pipeline(matcher: MatcherConfig, device: str, precision: str, features: FeatureConfig | None = None
              ) -> MatchingPipeline:
    return MatchingPipeline(PipelineConfig(features=features or _RETRIEVAL_ONLY, matcher=matcher,
                                           device=device, precision=precision))


def speed_rows(args, pair_images: tuple[np.ndarray, np.ndarray]) -> list[str]:
    """Per precision and mode: the network alone (eager, tensors on the device), then ``match_images`` (image
    preparation + dense stage + sparse stage), with and without CUDA graphs, for 1 pair and 1 vs 4."""
    from feature_matching_ros.models.efficient_loftr import EfficientLoFTR

    rows = []
    image0, image1 = pair_images
    device = torch.device(args.device)
    graph_modes = (False, True) if device.type == "cuda" else (False,)
    for precision in args.precision:
        for mode in args.modes:
            if args.random_weights:
                model = EfficientLoFTR({"optimized": mode == "optimized"})
                model.reparameterize()
                model = model.eval().to(device)
            else:
                config = MatcherConfig(name="eloftr", weights=args.weights, eloftr_mode=mode, cuda_graphs=False)
                model = _pipeline(config, args.device, precision).dense_matcher.model
            tensors = [torch.from_numpy(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)).to(device)[None, None].float() / 255
                       for im in (image0, image1)]

            def forward():
                with torch.inference_mode(), autocast_for(device, precision):
                    return model(*tensors)

            model_ms, out = _median_ms(forward, args.repeat, device)
            matches = int(out["keypoints0"].shape[0])
            label = "random" if args.random_weights else args.weights
            rows.append(f"| {precision} | {mode} | {label} | {matches} | network, eager | {model_ms:.1f} | |")
            print(rows[-1], flush=True)
            if args.random_weights:
                continue
            reference = None
            for graphs in graph_modes:
                config = MatcherConfig(name="eloftr", weights=args.weights, eloftr_mode=mode, cuda_graphs=graphs)
                pipeline = _pipeline(config, args.device, precision)
                one_ms, result = _median_ms(lambda: pipeline.match_images(image0, [image1]), args.repeat, device)
                four_ms, _ = _median_ms(lambda: pipeline.match_images(image0, [image1] * 4), args.repeat, device)
                note = ""
                if reference is None:
                    reference = result[0]
                elif len(reference) == len(result[0]):
                    note = (f"max |dx| vs eager {np.abs(reference.keypoints1 - result[0].keypoints1).max():.2g} px"
                            if len(reference) else "")
                else:
                    note = f"{len(result[0])} matches vs {len(reference)} eager"
                rows.append(f"| {precision} | {mode} | {label} | {len(result[0])} | match_images"
                            f"{', CUDA graphs' if graphs else ''} | {one_ms:.1f} | {four_ms:.1f} {note} |")
                print(rows[-1], flush=True)
    return rows


def accuracy_rows(args) -> list[str]:
    pairs_dir = args.pairs_dir
    if pairs_dir is None and args.rendered_pairs > 0:
        from feature_matching_ros.scenes.pairs import generate_pairs

        pairs_dir = Path(tempfile.mkdtemp(prefix="fmr_eloftr_"))
        generate_pairs(pairs_dir, n=args.rendered_pairs, seed=0, split="eval")
    pairs = dev_pairs(pairs_dir, args.rendered_pairs)
    precision = args.precision[0]
    combos = [
        ("Efficient LoFTR (ours, full)", MatcherConfig(name="eloftr", weights=args.weights), None),
        ("Efficient LoFTR (ours, optimized)", MatcherConfig(name="eloftr", weights=args.weights,
                                                           eloftr_mode="optimized"), None),
        ("ORB-SS + ALIKED + LightGlue", MatcherConfig(), FeatureConfig(detector="orb", descriptor="aliked",
                                                                       resize_max=640)),
        ("ALIKED + LightGlue", MatcherConfig(), FeatureConfig(detector="aliked", descriptor="aliked",
                                                              resize_max=640)),
    ]
    rows = []
    for name, matcher, features in combos:
        start = time.perf_counter()
        try:
            pipeline = _pipeline(matcher, args.device, precision, features)
        except WeightsError as error:  # a machine with only the Efficient LoFTR weights installed
            rows.append(f"| {name} | skipped: {error} | | | | | | | |")
            continue
        result = evaluate_combination(pipeline, pairs)
        rows.append(f"| {name} | {result['matches']:.0f} | {result['precision']:.3f} | {result['inliers']:.0f} | "
                    f"{result['auc@5']:.1f} | {result['auc@10']:.1f} | {result['auc@20']:.1f} | "
                    f"{result['pose_pairs']} | {time.perf_counter() - start:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--modes", nargs="+", default=["full", "optimized"], choices=("full", "optimized"))
    parser.add_argument("--weights", default="default", help="default (ours) or a checkpoint path")
    parser.add_argument("--random-weights", action="store_true", help="time the architecture only (no accuracy)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rendered-pairs", type=int, default=32)
    parser.add_argument("--pairs-dir", type=Path, help="existing eval-split make-pairs folder")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    graf = load_graf()
    images = tuple(cv2.resize(im, (640, 480), interpolation=cv2.INTER_AREA) for im in (graf.image0, graf.image1))
    device = torch.device(args.device)
    lines = [f"# Efficient LoFTR benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine_description(device)}. Command: `python benchmarks/bench_eloftr.py "
             f"{' '.join(sys.argv[1:])}`", "", "## Speed, one 640x480 pair (graf1 vs graf3), median ms", "",
             "| precision | mode | weights | matches | what | ms, 1 pair | ms, 1 vs 4 |",
             "|---|---|---|---|---|---|---|"]
    lines += speed_rows(args, images)
    if not (args.skip_accuracy or args.random_weights):
        lines += ["", f"## Accuracy on the dev pairs ({args.precision[0]}, images <= 640 px)", "",
                  "| method | matches | precision | inliers | AUC@5 | AUC@10 | AUC@20 | pose pairs | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += accuracy_rows(args)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
