"""Per-keyframe latency of the engine: extract + global descriptor + retrieve + match/verify 5 candidates.

    python benchmarks/keyframe_latency.py --preset cpu --device cpu [--bag /tmp/seq/office/bag] [--keyframes 40]
    python benchmarks/keyframe_latency.py --preset orb_lightglue --device cuda   # on a CUDA GPU

Frames: the bag's images if --bag is given, else scikit-image photos cycled with small crops (no ROS needed).
The map is pre-filled with the first frames so every timed query has top_k candidates to verify
(exclusion windows disabled for the benchmark). Prints one JSON line per stage with percentiles.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _frames(bag: str | None, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    if bag:
        from feature_matching_ros.bag import read_sequence

        frames, K = [], None
        for frame in read_sequence(bag):
            frames.append(frame.image)
            K = frame.K
            if len(frames) >= count:
                break
        return frames, K
    import cv2
    from skimage import data

    photos = [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")]
    frames = []
    for i in range(count):
        image = photos[i % len(photos)]
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        shift = 4 * (i // len(photos))
        frames.append(cv2.resize(image[shift:, shift:], (640, 480)))
    return frames, np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bag")
    parser.add_argument("--keyframes", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    import torch

    from feature_matching_ros.engine import build_engine

    override = {"engine": {"retrieval": {"top_k": args.top_k, "exclude_recent_seconds": 0.0,
                                         "exclude_recent_count": 0}}}
    engine = build_engine(args.preset, override, device=args.device)
    frames, K = _frames(args.bag, args.keyframes + args.top_k)
    for i, image in enumerate(frames[:args.top_k]):  # map with enough candidates
        engine.process_keyframe(image, K, i * 1_000_000_000, keyframe_id=i)
    timings: dict[str, list[float]] = {}
    for n, image in enumerate(frames[args.top_k:]):
        result = engine.process_keyframe(image, K, (n + args.top_k) * 1_000_000_000, insert=False)
        if n < args.warmup:
            continue
        assert len(result.candidates) == args.top_k, result.reason
        for stage, value in result.timing_ms.items():
            timings.setdefault(stage, []).append(value)
    header = {"preset": args.preset, "device": str(engine.pipeline.device), "candidates": args.top_k,
              "image_size": list(frames[0].shape[1::-1]), "torch_threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(json.dumps(header))
    for stage, values in timings.items():
        values = np.array(values)
        print(json.dumps({"stage": stage, "n": len(values), "p50_ms": round(float(np.percentile(values, 50)), 2),
                          "p90_ms": round(float(np.percentile(values, 90)), 2),
                          "mean_ms": round(float(values.mean()), 2)}))


if __name__ == "__main__":
    main()
