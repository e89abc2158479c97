"""Where LightGlue's GPU time goes: torch.profiler over the padded batched forward (no early exit).

    python benchmarks/profile_lightglue.py --batch 1 8 --precision fp16
Prints the top CUDA kernels by total time for each batch size and the SDPA backend in use.
"""

from __future__ import annotations

import argparse

import cv2
import torch
from torch.profiler import ProfilerActivity, profile

from feature_matching_ros.config import FeatureConfig, MatcherConfig, PipelineConfig
from feature_matching_ros.devdata import load_graf
from feature_matching_ros.pipeline import MatchingPipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--max-keypoints", type=int, default=1024)
    args = parser.parse_args()
    pair = load_graf()
    pipeline = MatchingPipeline(PipelineConfig(
        features=FeatureConfig(detector="orb", descriptor="aliked", max_keypoints=args.max_keypoints, resize_max=640),
        matcher=MatcherConfig(cuda_graphs=False), device="cuda", precision=args.precision))
    query = pipeline.extract(cv2.resize(pair.image0, (640, 480)))
    candidate = pipeline.extract(cv2.resize(pair.image1, (640, 480)))
    matcher = pipeline.matcher
    for batch in args.batch:
        inputs = matcher._padded_inputs(query, [candidate] * batch)
        run = lambda: matcher._forward_padded(*inputs, early_exit=False)  # noqa: E731
        with torch.inference_mode():
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    run()
                torch.cuda.synchronize()
        print(f"=== batch {batch}, {args.precision}, shapes {[tuple(t.shape) for t in inputs]}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
