"""LightGlue batch latency: 1 query vs B candidates with CUDA graphs vs eager, and kornia's own forward.

    python benchmarks/profile_lightglue.py --device cuda [--batch 1 8 32] [--detector orb] [--max-keypoints 1024]
        [--precision fp16] [--repeats 30] [--out benchmarks/results/lightglue_batch_gpu.md]
    python benchmarks/profile_lightglue.py --device cuda --profile --batch 1 8   # top CUDA kernels per batch size

Needs torch, kornia, OpenCV and the LightGlue / ALIKED weights (installed weight packages or FMR_WEIGHTS_DIR);
no faiss, no gtsam. Images: graf1 (query) and graf3 (resource/samples) and the photos of resource/textures,
640x480. Two candidate sets per batch size B:
  same   graf3 B times (the real pair, as in the issue's measurement);
  mixed  graf3, then photos of other places (what loop-closure retrieval hands over: mostly wrong places).
Rows, each timing ``matcher.match(query, candidates)`` end to end (padding, upload, forward, download; median
of --repeats after warm-up, which also captures the graphs):
  eager            LightGlueMatcher without CUDA graphs (early exit, exact shapes)
  graphs           stage graphs forced at every batch size (cuda_graph_max_batch = B), early exit
  policy           the shipped policy (cuda_graph_max_batch default): graphs or eager per batch
  graphs, 9 layers stage graphs without early exit (depth_confidence -1; what the old whole-forward graph ran)
  kornia adaptive  kornia's LightGlue forward, depth 0.95 / width 0.99 (B = 1: its point pruning; B > 1: pairs
                   cut to a common keypoint count, as kornia batches)
  kornia full      kornia's forward, no early exit, no pruning
Columns: ms per call, pairs per second, and the agreement of each row's matches with eager's (fraction of eager
matches found identically; kornia rows on cut keypoints are not compared).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from feature_matching_ros.config import FeatureConfig, MatcherConfig
from feature_matching_ros.devdata import load_graf
from feature_matching_ros.features import FeatureExtractor
from feature_matching_ros.features.base import Features
from feature_matching_ros.matchers.lightglue import LightGlueMatcher, build_lightglue

SIZE = (640, 480)
TEXTURES = Path(__file__).resolve().parents[1] / "resource" / "textures"


def load_images(count: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    graf = load_graf()
    resize = lambda image: cv2.resize(image, SIZE, interpolation=cv2.INTER_AREA)  # noqa: E731
    others = []
    for path in sorted(TEXTURES.glob("*.jpg"))[:count]:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            others.append(resize(image[..., ::-1]))
    return resize(graf.image0), resize(graf.image1), others


def timed(call, device: torch.device, warmup: int, repeats: int) -> tuple[float, object]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = None
    for _ in range(warmup):
        result = call()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = call()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), result


def agreement(reference, result) -> float:
    """Fraction of the reference's matches (over all pairs) that the result has too."""
    total = sum(len(r.matches) for r in reference)
    same = sum(len({tuple(m) for m in r.matches} & {tuple(m) for m in o.matches}) for r, o in zip(reference, result))
    return same / max(total, 1)


def kornia_call(model, query: Features, candidates: list[Features], device: torch.device, precision: str):
    """kornia's own forward: candidates cut to a common keypoint count (kornia batches equal counts only)."""
    count = min(len(c) for c in candidates)
    size = lambda f: torch.tensor([f.image_size] * len(candidates), device=device, dtype=torch.float32)  # noqa: E731
    data = {"image0": {"keypoints": query.keypoints[None].expand(len(candidates), -1, -1).to(device),
                       "descriptors": query.descriptors[None].expand(len(candidates), -1, -1).to(device),
                       "image_size": size(query)},
            "image1": {"keypoints": torch.stack([c.keypoints[:count] for c in candidates]).to(device),
                       "descriptors": torch.stack([c.descriptors[:count] for c in candidates]).to(device),
                       "image_size": size(candidates[0])}}
    autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def call():
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(data)
        return [m.cpu() for m in out["matches"]]

    return call


def machine(device: torch.device) -> str:
    text = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def table(args, device: torch.device) -> str:
    query_image, match_image, others = load_images(max(args.batch))
    extractor = FeatureExtractor(FeatureConfig(detector=args.detector, descriptor="aliked",
                                               max_keypoints=args.max_keypoints, resize_max=0), device, args.precision)
    query, match = extractor(query_image), extractor(match_image)
    other_features = [extractor(image) for image in others] or [match]
    settings = lambda **kwargs: MatcherConfig(weights=args.weights, **kwargs)  # noqa: E731
    kornia_models = {"kornia adaptive": build_lightglue("aliked", settings(depth_confidence=0.95,
                                                                           width_confidence=0.99)),
                     "kornia full": build_lightglue("aliked", settings(depth_confidence=-1, width_confidence=-1))}
    kornia_models = {name: model.to(device) for name, model in kornia_models.items()}
    # The presets' matcher settings: early exit (depth 0.95), no point pruning.
    matchers = {"eager": LightGlueMatcher("aliked", settings(cuda_graphs=False, width_confidence=-1), device,
                                          args.precision),
                "policy": LightGlueMatcher("aliked", settings(width_confidence=-1), device, args.precision)}
    lines = ["| set | B | row | ms | pairs/s | agreement with eager |", "|---|---:|---|---:|---:|---:|"]
    for batch in args.batch:
        sets = {"same": [match] * batch}
        if batch > 1:
            sets["mixed"] = [match] + [other_features[i % len(other_features)] for i in range(batch - 1)]
        forced = {"graphs": LightGlueMatcher("aliked", settings(width_confidence=-1, cuda_graph_max_batch=batch),
                                             device, args.precision),
                  "graphs, 9 layers": LightGlueMatcher("aliked", settings(
                      depth_confidence=-1, width_confidence=-1, cuda_graph_max_batch=batch), device, args.precision)}
        for set_name, candidates in sets.items():
            reference = None
            for row, matcher in [("eager", matchers["eager"]), ("graphs", forced["graphs"]),
                                 ("policy", matchers["policy"]), ("graphs, 9 layers", forced["graphs, 9 layers"])]:
                if device.type != "cuda" and row != "eager":
                    continue  # graphs are CUDA only: the same rows would repeat eager
                try:
                    ms, result = timed(lambda: matcher.match(query, candidates), device, args.warmup, args.repeats)
                except Exception as error:  # noqa: BLE001 - a failing row is reported, the table goes on
                    lines.append(f"| {set_name} | {batch} | {row} | failed: {type(error).__name__}: {error} | | |")
                    continue
                if reference is None:
                    reference = result
                lines.append(f"| {set_name} | {batch} | {row} | {ms:.2f} | {batch / ms * 1e3:.0f} | "
                             f"{agreement(reference, result):.4f} |")
                print(lines[-1], flush=True)
            for row, model in kornia_models.items():
                try:
                    call = kornia_call(model, query, candidates, device, args.precision)
                    ms, _ = timed(call, device, args.warmup, args.repeats)
                except Exception as error:  # noqa: BLE001
                    lines.append(f"| {set_name} | {batch} | {row} | failed: {type(error).__name__}: {error} | | |")
                    continue
                lines.append(f"| {set_name} | {batch} | {row} | {ms:.2f} | {batch / ms * 1e3:.0f} | - |")
                print(lines[-1], flush=True)
        del forced
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = [f"# LightGlue: 1 query vs B candidates ({args.device}, {args.precision})", "",
              f"Command: `python benchmarks/profile_lightglue.py {' '.join(sys.argv[1:])}`", "",
              f"Machine: {machine(device)}.", "",
              f"640x480, {args.detector} keypoints (max {args.max_keypoints}; query {len(query)}, graf3 {len(match)}) "
              f"with ALIKED descriptors, LightGlue weights {args.weights}; median of {args.repeats} calls after "
              f"{args.warmup} warm-up calls. Rows: "
              "see the script's docstring.", ""]
    return "\n".join(header + lines) + "\n"


def profile(args, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    query_image, match_image, _ = load_images(0)
    extractor = FeatureExtractor(FeatureConfig(detector=args.detector, descriptor="aliked",
                                               max_keypoints=args.max_keypoints, resize_max=0), device, args.precision)
    query, candidate = extractor(query_image), extractor(match_image)
    matcher = LightGlueMatcher("aliked", MatcherConfig(weights=args.weights, cuda_graphs=False), device,
                               args.precision)
    for batch in args.batch:
        padded = matcher._padded_inputs(query, [candidate] * batch)
        run = lambda: matcher._forward_padded(*padded.tensors, early_exit=False, masked0=padded.masked0,  # noqa: E731
                                              masked1=padded.masked1)
        with torch.inference_mode():
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    run()
                torch.cuda.synchronize()
        print(f"=== batch {batch}, {args.precision}, shapes {[tuple(t.shape) for t in padded.tensors]}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--detector", default="orb", choices=("orb", "aliked"))
    parser.add_argument("--precision", default="auto", help="fp16 | bf16 | fp32 | auto (fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--max-keypoints", type=int, default=1024)
    parser.add_argument("--weights", default="default", choices=("default", "official", "agnostic"),
                        help="LightGlue weights; agnostic = the shipped fine-tune (same architecture and cost)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="top CUDA kernels per batch size instead of the table")
    parser.add_argument("--out", type=Path, help="write the table as markdown here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    if args.precision == "auto":
        args.precision = "fp16" if device.type == "cuda" else "fp32"
    if args.profile:
        profile(args, device)
        return
    text = table(args, device)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
