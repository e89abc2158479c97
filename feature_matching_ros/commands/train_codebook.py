"""``fmr train-codebook``: train a global-descriptor codebook (VLAD k-means or ORB binary vocabulary).

    fmr train-codebook --descriptor aliked --out resource/retrieval/vlad_aliked_k64.npz          # VLAD, k=64
    fmr train-codebook --descriptor orb --out resource/retrieval/bow_orb_k4096.npz --words 4096  # BoW
    fmr train-codebook ... --images DIR_OR_FILE ... --bag BAG --views-per-image 12

Training images: the photos given with --images (default: resource/textures, real photographs), each
seen through ``--views-per-image`` random homographies (crop, scale, rotation, perspective, brightness)
at --width x --height, plus every --bag-stride-th frame of the --bag sequences. The codebook and a JSON
card (data, parameters, sha256) are written next to each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

LOG = logging.getLogger("fmr.train_codebook")
TEXTURE_DIR = Path(__file__).resolve().parents[2] / "resource" / "textures"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train-codebook", help="train a VLAD codebook or an ORB bag-of-words vocabulary",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptor", required=True, choices=("aliked", "disk", "orb", "xfeat"),
                        help="descriptor the codebook describes (orb -> binary vocabulary, else VLAD)")
    parser.add_argument("--detector", default="orb",
                        help="keypoints to describe (default orb single-scale; orb and xfeat descriptors need their "
                             "own detector)")
    parser.add_argument("--out", type=Path, required=True, help="output .npz")
    parser.add_argument("--images", nargs="*", type=Path, default=[TEXTURE_DIR], help="image files or directories")
    parser.add_argument("--bag", nargs="*", type=Path, default=[], help="rosbag2 sequences to add frames from")
    parser.add_argument("--bag-stride", type=int, default=5)
    parser.add_argument("--views-per-image", type=int, default=12)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--max-keypoints", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=64, help="VLAD centroids")
    parser.add_argument("--pca-dim", type=int, default=256, help="VLAD PCA-whitened dimension; 0 = no PCA")
    parser.add_argument("--words", type=int, default=4096, help="binary vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)


def random_views(image: np.ndarray, count: int, size: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` random homographic views (W, H = ``size``) of an RGB image: the variation a camera sees."""
    import cv2

    width, height = size
    h0, w0 = image.shape[:2]
    views = []
    for _ in range(count):
        scale = rng.uniform(0.35, 1.0)
        crop_w, crop_h = min(w0, int(w0 * scale)), min(h0, int(w0 * scale * height / width))
        crop_h = min(crop_h, h0)
        x0, y0 = rng.integers(0, w0 - crop_w + 1), rng.integers(0, h0 - crop_h + 1)
        src = np.float32([[x0, y0], [x0 + crop_w, y0], [x0 + crop_w, y0 + crop_h], [x0, y0 + crop_h]])
        src += rng.normal(0, 0.06 * crop_w, src.shape).astype(np.float32)  # perspective
        angle = rng.uniform(-0.3, 0.3)
        centre = src.mean(0)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
        src = (src - centre) @ rotation.T + centre
        dst = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
        H = cv2.getPerspectiveTransform(src, dst)
        view = cv2.warpPerspective(image, H, (width, height), borderMode=cv2.BORDER_REFLECT)
        gain, bias = rng.uniform(0.6, 1.4), rng.uniform(-25, 25)
        views.append(np.clip(view.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8))
    return views


def collect_images(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no image or directory at {path}")
    return files


def run(args: argparse.Namespace) -> int:
    import cv2

    from feature_matching_ros.config import FeatureConfig
    from feature_matching_ros.features import FeatureExtractor
    from feature_matching_ros.retrieval.global_descriptors import (save_codebook, train_binary_vocabulary,
                                                                   train_vlad_codebook)

    rng = np.random.default_rng(args.seed)
    native_only = ("orb", "xfeat")  # descriptors computed only at their own detector's keypoints
    if args.descriptor in native_only and args.detector != args.descriptor:
        raise SystemExit(f"--descriptor {args.descriptor} needs --detector {args.descriptor}")
    descriptor = "native" if args.descriptor in native_only else args.descriptor
    feature_config = FeatureConfig(detector=args.detector, descriptor=descriptor, max_keypoints=args.max_keypoints,
                                   resize_max=0)
    extractor = FeatureExtractor(feature_config, args.device)
    images = collect_images(args.images)
    frames: list[np.ndarray] = []
    for path in images:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {path}")
        frames += random_views(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), args.views_per_image,
                               (args.width, args.height), rng)
    bag_frames = 0
    for bag in args.bag:
        from feature_matching_ros.bag import read_sequence

        for frame in read_sequence(bag):
            if frame.index % args.bag_stride == 0:
                frames.append(frame.image)
                bag_frames += 1
    LOG.info("extracting %s descriptors from %d training views (%d photos, %d bag frames)", args.descriptor,
             len(frames), len(images), bag_frames)
    start = time.perf_counter()
    descriptor_sets = []
    for number, image in enumerate(frames):
        features = extractor(image)
        if features.descriptors is None or len(features) == 0:  # textureless view
            continue
        descriptors = features.descriptors.detach().cpu().numpy()
        descriptor_sets.append(descriptors if features.is_binary else descriptors.astype(np.float32))
        if (number + 1) % 100 == 0:
            LOG.info("  %d/%d views (%.0f ms/view)", number + 1, len(frames),
                     (time.perf_counter() - start) / (number + 1) * 1e3)
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    if args.descriptor == "orb":
        codebook = train_binary_vocabulary(descriptor_sets, "orb", words=args.words, seed=args.seed)
        parameters = {"kind": "bow", "words": args.words, "iterations": 10, "weighting": "tf-idf", "score": "L1"}
    else:
        codebook = train_vlad_codebook(descriptor_sets, args.descriptor, clusters=args.clusters,
                                       pca_dim=args.pca_dim, seed=args.seed)
        parameters = {"kind": "vlad", "clusters": args.clusters, "pca_dim": codebook.dim, "whitening": True,
                      "normalisation": "intra + signed sqrt + L2, PCA-whitening + L2"}
    card = {
        "descriptor_type": args.descriptor, "keypoints": f"{args.detector} (max {args.max_keypoints})",
        "data": {"photos": [p.name for p in images], "views_per_photo": args.views_per_image,
                 "view_size": [args.width, args.height], "bag_frames": bag_frames,
                 "bags": [str(b) for b in args.bag], "seed": args.seed,
                 "descriptors": int(sum(len(d) for d in descriptor_sets))},
        "parameters": parameters,
        "time_s": {"extract": round(extract_s, 1), "train": round(time.perf_counter() - start, 1)},
        "command": _reproducible_command(args),
    }
    sha = save_codebook(codebook, args.out, card)
    card["sha256"] = sha
    card["file"] = args.out.name
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    LOG.info("wrote %s (dim %d, sha256 %s)", args.out, codebook.dim, sha)
    print(args.out)
    return 0


def _portable(value: object) -> str:
    """A path inside the working directory as a relative path, so a card's command runs from any checkout; one
    in the home directory as ``~/...``."""
    if isinstance(value, Path):
        resolved = value.resolve()
        for root, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~/")):
            try:
                return prefix + str(resolved.relative_to(root))
            except ValueError:
                continue
        return str(value)
    return str(value)


LISTED_IMAGES = 8  # longer --images lists are named in the card's data.photos, not repeated in its command


def _reproducible_command(args: argparse.Namespace) -> str:
    """The ``fmr train-codebook`` call that reproduces this run (lists space-separated, empty lists left out)."""
    parts = ["fmr train-codebook"]
    for key, value in vars(args).items():
        if key in ("func", "command", "verbose"):
            continue
        values = value if isinstance(value, list) else [value]
        if key == "images" and len(values) > LISTED_IMAGES:
            parts.append(f"--images PHOTOS (the {len(values)} files of data.photos)")
        elif values:
            parts.append(f"--{key.replace('_', '-')} " + " ".join(_portable(v) for v in values))
    return " ".join(parts)
