"""``fmr match``: match two images (or a list of pairs) and estimate their relative pose.

    fmr match IMG0 IMG1 --detector orb --descriptor aliked --matcher lightglue --max-keypoints 1024 \\
        --K0 fx,fy,cx,cy --K1 fx,fy,cx,cy [--depth0 PNG] --json OUT.json --viz OUT.png [--device cuda]
    fmr match --pairs PAIRS.txt --out DIR [same options]
    fmr match IMG0 IMG1 --matcher eloftr [--weights eloftr_outdoor.ckpt] [--eloftr-mode optimized]

Detector-free matchers (eloftr, loftr) ignore --detector/--descriptor/--max-keypoints; --resize-max applies.

Depth PNGs are 16-bit in millimetres by default (``--depth-scale`` metres per unit; 0 = invalid), as
ROS 16UC1 depth; 32-bit float TIFF/EXR or .npy in metres also work (``--depth-scale 1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

LOG = logging.getLogger("fmr.match")


def register(subparsers) -> None:
    from feature_matching_ros.config import (DESCRIPTORS, DETECTORS, DEVICES, ELOFTR_MODES, MATCHERS, ORB_BACKENDS,
                                            PRECISIONS)

    parser = subparsers.add_parser("match", help="match two images or a list of pairs; estimate relative pose",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMG", help="two images (omit with --pairs)")
    parser.add_argument("--pairs", type=Path, help="text file: IMG0 IMG1 [fx0 fy0 cx0 cy0 fx1 fy1 cx1 cy1] per line")
    parser.add_argument("--out", type=Path, help="output directory for --pairs (00000.json, ..., summary.json)")
    parser.add_argument("--detector", default="orb", choices=DETECTORS)
    parser.add_argument("--descriptor", default="aliked", choices=DESCRIPTORS)
    parser.add_argument("--matcher", default="lightglue", choices=MATCHERS)
    parser.add_argument("--weights", default="default",
                        help="lightglue: official (= default) or agnostic (our multi-detector fine-tune, ALIKED "
                             "descriptors); eloftr: default (our synthetic-trained weights) or PATH to a checkpoint "
                             "(official eloftr_outdoor.ckpt, or from `fmr train eloftr`); loftr: PATH (official "
                             "loftr_outdoor.ckpt)")
    parser.add_argument("--eloftr-mode", default="full", choices=ELOFTR_MODES,
                        help="Efficient LoFTR: full, or optimized (skips the coarse dual-softmax; faster)")
    parser.add_argument("--coarse-threshold", type=float, default=0.2, help="eloftr/loftr coarse match threshold")
    parser.add_argument("--max-keypoints", type=int, default=1024)
    parser.add_argument("--nms-radius", type=int, default=4, help="ORB single-scale NMS radius (px)")
    parser.add_argument("--orb-backend", default="auto", choices=ORB_BACKENDS,
                        help="ORB single-scale keypoints by OpenCV on the host or by torch on --device (same "
                             "keypoints); auto: torch on CUDA")
    parser.add_argument("--resize-max", type=int, default=1024, help="longest side fed to the networks; 0 = none")
    parser.add_argument("--filter-threshold", type=float, default=0.1)
    parser.add_argument("--depth-confidence", type=float, default=0.95)
    parser.add_argument("--width-confidence", type=float, default=0.99)
    parser.add_argument("--ratio-test", type=float, default=0.9)
    parser.add_argument("--K0", help="fx,fy,cx,cy of image 0 (default: guessed, see --help)")
    parser.add_argument("--K1", help="fx,fy,cx,cy of image 1")
    parser.add_argument("--depth0", type=Path, help="depth image aligned with image 0")
    parser.add_argument("--depth1", type=Path, help="depth image aligned with image 1")
    parser.add_argument("--depth-scale", type=float, default=0.001, help="metres per depth unit (16-bit mm: 0.001)")
    parser.add_argument("--json", type=Path, help="write the result as JSON")
    parser.add_argument("--viz", type=Path, help="write a PNG with inliers green, outliers red")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.set_defaults(func=run)


def read_image(path: Path) -> np.ndarray:
    """Read an image file as RGB(A) or gray numpy array, keeping 16-bit data."""
    import cv2

    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot decode image: {path}")
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def read_depth(path: Path, scale: float) -> np.ndarray:
    """Depth in metres (float32); zero or non-finite means invalid."""
    if Path(path).suffix == ".npy":
        depth = np.load(path, allow_pickle=False)
    else:
        depth = read_image(path)
    if depth.ndim != 2:
        raise ValueError(f"depth image {path} must have one channel, got shape {depth.shape}")
    return depth.astype(np.float32) * np.float32(scale)


def parse_intrinsics(text: str | None, image: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """'fx,fy,cx,cy' -> K. Without it, guess fx = fy = 1.2 * max(W, H) at the image centre (flagged)."""
    from feature_matching_ros.geometry.pose import intrinsics_matrix

    if text is None:
        height, width = image.shape[:2]
        focal = 1.2 * max(width, height)
        return intrinsics_matrix(focal, focal, (width - 1) / 2, (height - 1) / 2), True
    values = [float(v) for v in text.replace(" ", ",").split(",") if v]
    if len(values) != 4:
        raise ValueError(f"--{name} needs fx,fy,cx,cy, got {text!r}")
    return intrinsics_matrix(*values), False


def build_config(args: argparse.Namespace):
    from feature_matching_ros.config import FeatureConfig, MatcherConfig, PipelineConfig

    return PipelineConfig(
        features=FeatureConfig(detector=args.detector, descriptor=args.descriptor, max_keypoints=args.max_keypoints,
                               nms_radius=args.nms_radius, resize_max=args.resize_max, orb_backend=args.orb_backend),
        matcher=MatcherConfig(name=args.matcher, weights=args.weights, filter_threshold=args.filter_threshold,
                              depth_confidence=args.depth_confidence, width_confidence=args.width_confidence,
                              ratio_test=args.ratio_test, eloftr_mode=args.eloftr_mode,
                              coarse_threshold=args.coarse_threshold),
        device=args.device, precision=args.precision,
    )


def match_one(pipeline, path0: Path, path1: Path, k0: str | None, k1: str | None, args, viz: Path | None) -> dict:
    from feature_matching_ros.image import ImageError

    try:
        image0, image1 = read_image(path0), read_image(path1)
        K0, guessed0 = parse_intrinsics(k0, image0, "K0")
        K1, guessed1 = parse_intrinsics(k1, image1, "K1")
        depth0 = read_depth(args.depth0, args.depth_scale) if getattr(args, "depth0", None) else None
        depth1 = read_depth(args.depth1, args.depth_scale) if getattr(args, "depth1", None) else None
        result = pipeline.match_pair(image0, image1, K0, K1, depth0=depth0, depth1=depth1)
    except (ImageError, ValueError, FileNotFoundError) as error:
        LOG.error("%s %s: %s", path0, path1, error)
        return {"image0": str(path0), "image1": str(path1), "success": False, "reason": f"bad input: {error}",
                "num_matches": 0, "num_inliers": 0, "timing_ms": {}}
    report = {"image0": str(path0), "image1": str(path1), **result.to_json_dict(),
              "K0": K0.tolist(), "K1": K1.tolist(), "intrinsics_guessed": bool(guessed0 or guessed1),
              "config": pipeline.config.to_dict()}
    if viz is not None:
        import cv2

        from feature_matching_ros.viz import draw_matches

        points0, points1 = result.matched_points()
        method = args.matcher if pipeline.needs_images else f"{args.detector}+{args.descriptor}+{args.matcher}"
        header = (f"{method}: {len(result.matches)} matches, "
                  f"{result.pose.num_inliers} inliers ({result.reason})")
        inliers = np.asarray(report["inliers"], dtype=bool)
        canvas = draw_matches(image0, image1, points0, points1, inliers, header=header)
        viz.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(viz), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return report


def read_pairs(path: Path) -> list[tuple[Path, Path, str | None, str | None]]:
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 10):
            raise ValueError(f"{path}:{number}: expected 'IMG0 IMG1 [fx0 fy0 cx0 cy0 fx1 fy1 cx1 cy1]', got {line!r}")
        resolve = lambda p: Path(p) if Path(p).exists() else path.parent / p  # noqa: E731
        k0 = ",".join(fields[2:6]) if len(fields) == 10 else None
        k1 = ",".join(fields[6:10]) if len(fields) == 10 else None
        pairs.append((resolve(fields[0]), resolve(fields[1]), k0, k1))
    return pairs


def run(args: argparse.Namespace) -> int:
    from feature_matching_ros.config import ConfigError
    from feature_matching_ros.pipeline import MatchingPipeline
    from feature_matching_ros.weights import WeightsError

    if bool(args.pairs) == bool(args.images) or (args.images and len(args.images) != 2):
        print("fmr match: give exactly two images, or --pairs FILE --out DIR", file=sys.stderr)
        return 2
    if args.pairs and not args.out:
        print("fmr match: --pairs needs --out DIR", file=sys.stderr)
        return 2
    try:
        pipeline = MatchingPipeline(build_config(args))
    except ConfigError as error:
        print(f"fmr match: invalid configuration: {error}", file=sys.stderr)
        return 2
    except WeightsError as error:
        print(f"fmr match: weights: {error}", file=sys.stderr)
        return 2
    if args.images:
        report = match_one(pipeline, Path(args.images[0]), Path(args.images[1]), args.K0, args.K1, args, args.viz)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report))
        print(f"{report['num_matches']} matches, {report['num_inliers']} inliers, success={report['success']} "
              f"({report['reason']}); timing ms: {report['timing_ms']}")
        return 0 if "bad input" not in report["reason"] else 1
    return run_pairs(pipeline, args)


def run_pairs(pipeline, args: argparse.Namespace) -> int:
    try:
        pairs = read_pairs(args.pairs)
    except (OSError, ValueError) as error:
        print(f"fmr match: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (path0, path1, k0, k1) in enumerate(pairs):
        viz = args.out / f"{index:05d}.png" if args.viz else None
        report = match_one(pipeline, path0, path1, k0, k1, args, viz)
        (args.out / f"{index:05d}.json").write_text(json.dumps(report))
        rows.append({k: report[k] for k in ("image0", "image1", "success", "reason", "num_matches", "num_inliers",
                                             "timing_ms")})
        LOG.info("[%d/%d] %s: %d matches, %d inliers, %s", index + 1, len(pairs), path0.name,
                 report["num_matches"], report["num_inliers"], report["reason"])
    stages = sorted({stage for row in rows for stage in row["timing_ms"]})
    summary = {
        "pairs": len(rows),
        "successes": sum(row["success"] for row in rows),
        "median_timing_ms": {s: float(np.median([r["timing_ms"][s] for r in rows if s in r["timing_ms"]]))
                             for s in stages},
        "results": rows,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{summary['successes']}/{summary['pairs']} pairs with a pose; median ms: "
          f"{ {k: round(v, 1) for k, v in summary['median_timing_ms'].items()} }")
    return 0
