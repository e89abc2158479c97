"""Per-keyframe latency of the engine, stage by stage, with kornia's ALIKED and LightGlue timed in the same run.

    python benchmarks/keyframe_latency.py --presets orb_lightglue aliked_lightglue --device cuda \
        [--keyframes 60] [--out benchmarks/results/keyframe_latency_gpu.md]
    python benchmarks/keyframe_latency.py --presets cpu orb_bow_nn --device cpu [--bag /tmp/seq/office/bag]

Frames: the bag's images if --bag is given, else scikit-image photos cycled with small crops (no ROS needed).
The map is pre-filled with the first --top-k frames and exclusion windows are off, so every timed query verifies
top_k candidates. Per preset: p50 / p90 / mean of every engine stage (extract, global_descriptor, retrieve,
match, verify, total) over the timed keyframes, the candidates rejected before RANSAC, and, for LightGlue
presets, kornia on the same images and features as a new user would call it: ALIKED (1024 keypoints) on the
image, and LightGlue on the query against the same candidates, pair by pair with kornia's adaptive defaults
(early exit + point pruning) and batched without them (candidates cut to a common keypoint count). Needs torch,
kornia, OpenCV, scikit-image and the weights; not faiss (numpy search without it) and not gtsam.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

STAGES = ("extract", "global_descriptor", "retrieve", "match", "verify", "total")


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


class KorniaReference:
    """kornia's own ALIKED and LightGlue, same weights as the engine, called the way kornia documents them."""

    def __init__(self, device: torch.device, precision: str, weights: str) -> None:
        from feature_matching_ros.config import MatcherConfig
        from feature_matching_ros.features.learned import AlikedNetwork
        from feature_matching_ros.matchers.lightglue import build_lightglue

        self.device = device
        self.autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.aliked = AlikedNetwork(device, precision).model  # kornia.feature.ALIKED("aliked-n16")
        self.adaptive = build_lightglue("aliked", MatcherConfig(weights=weights, depth_confidence=0.95,
                                                                width_confidence=0.99)).to(device)
        self.full = build_lightglue("aliked", MatcherConfig(weights=weights, depth_confidence=-1,
                                                            width_confidence=-1)).to(device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def extract_ms(self, image: np.ndarray) -> float:
        def call() -> None:
            tensor = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float() / 255
            with torch.inference_mode(), self._autocast():
                self.aliked(tensor)

        return _timed(call, self.device)

    def _data(self, query, candidates, count: int | None) -> dict:
        cut = lambda t: t if count is None else t[:count]  # noqa: E731
        size = lambda f: torch.tensor([f.image_size] * len(candidates), device=self.device,  # noqa: E731
                                      dtype=torch.float32)
        return {"image0": {"keypoints": query.keypoints[None].expand(len(candidates), -1, -1),
                           "descriptors": query.descriptors.float()[None].expand(len(candidates), -1, -1),
                           "image_size": size(query)},
                "image1": {"keypoints": torch.stack([cut(c.keypoints) for c in candidates]),
                           "descriptors": torch.stack([cut(c.descriptors.float()) for c in candidates]),
                           "image_size": size(candidates[0])}}

    def match_ms(self, query, candidates) -> tuple[float, float]:
        """(pair by pair with early exit and pruning, batched without them) in ms for one query."""
        pairs = [self._data(query, [candidate], None) for candidate in candidates]
        batched = self._data(query, candidates, min(len(c) for c in candidates))

        def one_by_one() -> None:
            with torch.inference_mode(), self._autocast():
                for data in pairs:
                    self.adaptive(data)["matches"][0].cpu()

        def batch() -> None:
            with torch.inference_mode(), self._autocast():
                [m.cpu() for m in self.full(batched)["matches"]]

        return _timed(one_by_one, self.device), _timed(batch, self.device)


def _top_k(preset: str, args) -> int:
    """Candidates verified per keyframe: --top-k, or the preset's own retrieval top_k."""
    from feature_matching_ros.presets import get_preset

    return args.top_k or get_preset(preset)["engine"]["retrieval"]["top_k"]


def back_to_back_ms(engine, frames: list[np.ndarray], K: np.ndarray, first_stamp: int, ahead: bool,
                    repeats: int = 2) -> float:
    """Wall ms per keyframe for keyframes arriving back to back (a backlog), best of ``repeats`` passes: one by
    one, or with the next keyframe described while the current one verifies (DescribeAhead, as the node does)."""
    from feature_matching_ros.engine.describe_ahead import DescribeAhead

    best = float("inf")
    for _ in range(repeats):
        describer = DescribeAhead(engine) if ahead else None
        arguments = [dict(image=image, K=K, stamp_ns=(first_stamp + n) * 1_000_000_000) for n, image in enumerate(frames)]
        start = time.perf_counter()
        for n in range(len(frames)):
            described = describer.take(n) if describer else None
            following = None
            if describer and n + 1 < len(frames):
                following = lambda n=n + 1: describer.start(n, **arguments[n])  # noqa: E731
            engine.process_keyframe(**arguments[n], insert=False, described=described, after_matching=following)
        best = min(best, (time.perf_counter() - start) * 1e3 / len(frames))
        if describer:
            describer.close()
    return best


def run_preset(preset: str, args, frames: list[np.ndarray], K: np.ndarray) -> dict:
    from feature_matching_ros.engine import build_engine
    from feature_matching_ros.engine.verification import VerificationPool

    top_k = _top_k(preset, args)
    override = {"engine": {"retrieval": {"top_k": top_k, "exclude_recent_seconds": 0.0,
                                         "exclude_recent_count": 0}}}
    if args.verification_threads is not None:
        override["engine"]["verification_threads"] = args.verification_threads
    if args.matcher_weights is not None:
        override["pipeline"] = {"matcher": {"weights": args.matcher_weights}}
    engine = build_engine(preset, override, device=args.device)
    pipeline = engine.pipeline
    kornia = None
    if not args.no_kornia and pipeline.config.matcher.name == "lightglue" and \
            pipeline.extractor.descriptor_type == "aliked":
        kornia = KorniaReference(pipeline.device, pipeline.precision, pipeline.config.matcher.weights)
    for i, image in enumerate(frames[:top_k]):  # map with enough candidates
        engine.process_keyframe(image, K, i * 1_000_000_000, keyframe_id=i)
    timings: dict[str, list[float]] = {}
    rejected_before_ransac = candidates_seen = 0
    for n, image in enumerate(frames[top_k:]):
        result = engine.process_keyframe(image, K, (n + top_k) * 1_000_000_000, insert=False)
        extra: dict[str, float] = {}
        if kornia is not None:
            extra["kornia ALIKED extract"] = kornia.extract_ms(image)
            if result.candidates:
                query = pipeline.extract(image)
                stored = [engine.database.get(c.match_id).to_features(pipeline.device) for c in result.candidates]
                extra["kornia LightGlue adaptive, pair by pair"], extra["kornia LightGlue full, batched"] = \
                    kornia.match_ms(query, stored)
        if n < args.warmup:
            continue
        if len(result.candidates) != top_k:
            raise RuntimeError(f"keyframe {n}: {len(result.candidates)} candidates, expected {top_k}: "
                               f"{result.reason}")
        candidates_seen += len(result.candidates)
        rejected_before_ransac += sum(c.reason.startswith("too few matches for the required support")
                                      for c in result.candidates)
        for stage, value in {**result.timing_ms, **extra}.items():
            timings.setdefault(stage, []).append(value)
    timed = frames[top_k + args.warmup:]
    back_to_back = {"one by one": back_to_back_ms(engine, timed, K, len(frames), ahead=False),
                    "describe ahead": back_to_back_ms(engine, timed, K, len(frames), ahead=True)}
    stats = {}
    for stage, values in timings.items():
        values = np.array(values)
        stats[stage] = {"n": len(values), "p50_ms": float(np.percentile(values, 50)),
                        "p90_ms": float(np.percentile(values, 90)), "mean_ms": float(values.mean())}
    return {"preset": preset, "device": str(pipeline.device), "precision": pipeline.precision,
            "matcher_weights": pipeline.config.matcher.weights if pipeline.config.matcher.name == "lightglue" else None,
            "cuda_graphs": bool(getattr(getattr(pipeline, "matcher", None), "graphs", None) is not None),
            "verification_threads": VerificationPool(engine.config.verification_threads).threads,
            "top_k": top_k, "candidates": candidates_seen, "rejected_before_ransac": rejected_before_ransac, "stages": stats,
            "back_to_back_ms_per_keyframe": back_to_back}


def markdown(results: list[dict], args, frames: list[np.ndarray]) -> str:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available() and args.device != "cpu":
        machine += f", {torch.cuda.get_device_name()}"
    lines = ["# Per-keyframe engine latency", "",
             f"Command: `python benchmarks/keyframe_latency.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {machine}.", "",
             f"{frames[0].shape[1]}x{frames[0].shape[0]} {'bag images' if args.bag else 'scikit-image photos'}, "
             f"{f'{args.top_k} candidates' if args.top_k else 'each preset its own number of candidates'} verified "
             f"per keyframe, {args.keyframes - args.warmup} timed keyframes after "
             f"{args.warmup} warm-up. kornia rows: the same images and candidates through kornia's own ALIKED and "
             "LightGlue (see the script's docstring); they are not part of the engine's total.", ""]
    for result in results:
        lines += [f"## {result['preset']}", "",
                  f"{result['device']}, {result['precision']}, LightGlue weights {result['matcher_weights']}, CUDA "
                  f"graphs {result['cuda_graphs']}, verification "
                  f"threads {result['verification_threads']}; {result['top_k']} candidates per keyframe; candidates "
                  f"rejected before RANSAC: {result['rejected_before_ransac']} of {result['candidates']}.", "",
                  "| stage | p50 ms | p90 ms | mean ms |", "|---|---:|---:|---:|"]
        order = [s for s in STAGES if s in result["stages"]] + [s for s in result["stages"] if s not in STAGES]
        for stage in order:
            s = result["stages"][stage]
            lines.append(f"| {stage} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['mean_ms']:.2f} |")
        b2b = result["back_to_back_ms_per_keyframe"]
        lines += ["", f"Keyframes back to back (a backlog; wall ms per keyframe, best of 2 passes): one by one "
                  f"{b2b['one by one']:.2f}, the next described while the current verifies (the node's DescribeAhead) "
                  f"{b2b['describe ahead']:.2f} ({b2b['one by one'] / b2b['describe ahead']:.2f}x the throughput)."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bag")
    parser.add_argument("--keyframes", type=int, default=30, help="timed keyframes + warm-up")
    parser.add_argument("--top-k", type=int, default=0,
                        help="candidates verified per keyframe (default 0: each preset's own retrieval top_k)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--verification-threads", type=int, help="engine.verification_threads (default: preset)")
    parser.add_argument("--no-kornia", action="store_true", help="skip the kornia reference rows")
    parser.add_argument("--matcher-weights", choices=("default", "official", "agnostic"),
                        help="LightGlue weights (default: the preset's); agnostic = the shipped fine-tune, same "
                             "architecture and cost, no official weights file needed")
    parser.add_argument("--out", type=Path, help="write the tables as markdown here")
    args = parser.parse_args()
    frames, K = _frames(args.bag, args.keyframes + max(_top_k(preset, args) for preset in args.presets))
    results = []
    for preset in args.presets:
        result = run_preset(preset, args, frames, K)
        results.append(result)
        print(json.dumps(result), flush=True)
    text = markdown(results, args, frames)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
