#!/usr/bin/env python3
"""Build real training / held-out image pairs with ground truth from structure from motion (docs/REAL_DATA.md).

    python scripts/build_real_pairs.py \\
        --line3dpp CLONES/Line3Dpp --sceaux CLONES/ImageDataset_SceauxCastle --hloc CLONES/Hierarchical-Localization \\
        --monstree CLONES/dataset_monstree --superglue CLONES/SuperGluePretrainedNetwork \\
        --instant-ngp CLONES/instant-ngp --vggsfm CLONES/vggsfm --mast3r CLONES/mast3r --bundler CLONES/bundler_sfm \\
        [--out ~/.cache/feature_matching_ros/real_pairs] [--sfm-cache ~/.cache/feature_matching_ros/real/_sfm] \\
        [--long-side 640] [--jpeg-quality 80] [--train-pairs-per-scene 250] [--heldout-pairs-per-scene 40] [--only NAME ...]

Every collection in COLLECTIONS is reconstructed with pycolmap by ``build_real_benchmark.reconstruct`` (SIFT,
exhaustive matching, incremental mapping, undistortion to pinhole; models cached in --sfm-cache and shared with
the loop-closure benchmark), then written as a *real pair set* (``feature_matching_ros.training.real_pairs``):
images resized to --long-side and JPEG-encoded, the reconstruction's poses, intrinsics, 3D points and tracks, and
the selected pairs with their covisibility. Two folders, split BY SCENE (a held-out scene is never trained on):

    OUT/train/     training scenes      -> fmr train lightglue|eloftr --train OUT/train [make-pairs folders ...]
    OUT/heldout/   held-out scenes      -> python benchmarks/bench_agnostic.py --real OUT/heldout

Each folder is self-contained and small (the train folder is the training pack to copy to a training machine;
the script prints the sizes). Nothing is downloaded; every source is a local clone given on the command line.
Never used here: lund_streets and the KITTI snippets (the held-out loop-closure sequence streets_aliasing is built
from them) and the sources reserved for independent evaluation (rtabmap data/samples, Kimera-VIO
ForLoopClosureDetector, openMVG SfM_quality_evaluation, SuperGlue's ScanNet samples).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from build_real_benchmark import (  # noqa: E402
    MONSTREE_PHOTOS, SOURCES, Source, check_source, reconstruct, source_record)

from feature_matching_ros.bag.image_folder import read_rgb, resize_long_side  # noqa: E402
from feature_matching_ros.training.real_pairs import (  # noqa: E402
    DepthSettings, PairSelection, RealPairs, SfmScene, select_pairs, write_manifest, write_scene)

LOG = logging.getLogger("build_real_pairs")
BUILDER_VERSION = 1
MIN_REGISTERED = 5  # fewer registered photos make too few pairs to be worth a scene

PAIR_SOURCES = {key: SOURCES[key] for key in ("line3dpp", "sceaux", "hloc", "monstree", "superglue")} | {
    "instant_ngp": Source("--instant-ngp", "https://github.com/NVlabs/instant-ngp",
                          "NVIDIA Source Code License (non-commercial; repository LICENSE.txt) for the fox photos",
                          ("data/nerf/fox/images",)),
    "vggsfm": Source("--vggsfm", "https://github.com/facebookresearch/vggsfm",
                     "CC BY-NC 4.0 (repository LICENSE.txt); british_museum photos come from the Image Matching "
                     "Challenge PhotoTourism set (Flickr)", ("examples/kitchen/images", "examples/statue/images",
                                                            "examples/british_museum/images", "examples/cake/images")),
    "mast3r": Source("--mast3r", "https://github.com/naver/mast3r", "CC BY-NC-SA 4.0 (repository LICENSE)",
                     ("assets/NLE_tower",)),
    "bundler": Source("--bundler", "https://github.com/snavely/bundler_sfm",
                      "GNU GPL (repository README); example photo sets shipped with Bundler",
                      ("examples/kermit", "examples/ET")),
}
# Data that must never feed these pairs: the held-out loop-closure sequence and the reserved evaluation sources.
FORBIDDEN_PATH_PARTS = ("data/lund", "KITTI", "data/samples", "ForLoopClosureDetector", "SfM_quality_evaluation",
                        "scannet_sample")


def _glob(pattern: str) -> Callable[[Path], list[Path]]:
    def files(root: Path) -> list[Path]:
        folder, _, name = pattern.rpartition("/")
        return sorted(p for p in (root / folder).glob(name) if p.is_file())
    return files


@dataclass(frozen=True)
class Collection:
    source: str
    files: Callable[[Path], list[Path]]
    split: str
    kind: str
    single_camera: bool  # one camera for the whole collection (same device and zoom), else one per photo
    description: str


# Tried and left out (structure from motion registered too little): alicevision/dataset_buddha (3 of the 13
# photos its snapshot holds), vggsfm examples/cake (8 small video frames), Kimera-VIO MicroEurocDataset cam0
# (no initial pair).
COLLECTIONS = {
    # -- train -------------------------------------------------------------------------------------------------
    "brick_building": Collection("line3dpp", _glob("testdata/img*.jpg"), "train", "outdoor facade", True,
                                 "26 photos of a brick building facade (Line3D++ test data)"),
    "sceaux_castle": Collection("sceaux", _glob("images/*.JPG"), "train", "outdoor building", True,
                                "11 photos of Sceaux castle (openMVG sample)"),
    # The dataset_monstree photos the loop-closure benchmark reconstructed (its SfM model is reused).
    "tree": Collection("monstree", lambda root: [root / "full" / f"IMG_{n}.JPG" for n in MONSTREE_PHOTOS],
                       "train", "outdoor object", True, "a tree trunk walked around (AliceVision monstree)"),
    "fox": Collection("instant_ngp", _glob("data/nerf/fox/images/*.jpg"), "train", "indoor object", True,
                      "a fox figurine on a shelf, hand-held phone video frames (instant-ngp sample)"),
    "nle_tower": Collection("mast3r", _glob("assets/NLE_tower/*.jpg"), "train", "outdoor building", False,
                            "a tower photographed from the street (MASt3R example)"),
    "kermit": Collection("bundler", _glob("examples/kermit/*.jpg"), "train", "indoor object", True,
                         "a Kermit toy on a desk (Bundler example)"),
    "et": Collection("bundler", _glob("examples/ET/*.jpg"), "train", "indoor object", True,
                     "an E.T. toy on a desk (Bundler example)"),
    "tum_fr3_office": Collection("superglue", _glob("assets/freiburg_sequence/*.png"), "train", "indoor office",
                                 True, "TUM RGB-D freiburg3 office frames (SuperGlue assets)"),
    # -- held out: never trained on ----------------------------------------------------------------------------
    "sacre_coeur": Collection("hloc", _glob("datasets/sacre_coeur/mapping/*.jpg"), "heldout", "outdoor landmark",
                              False, "Sacre-Coeur, tourists' photos: other cameras, days, seasons (hloc)"),
    "british_museum": Collection("vggsfm", _glob("examples/british_museum/images/*.jpg"), "heldout",
                                 "indoor landmark", False, "British Museum great court, tourists' photos (VGGSfM "
                                 "example, PhotoTourism)"),
    "kitchen": Collection("vggsfm", _glob("examples/kitchen/images/*.png"), "heldout", "indoor room", True,
                          "a kitchen counter with objects, hand-held views (VGGSfM example)"),
    "statue": Collection("vggsfm", _glob("examples/statue/images/*.jpg"), "heldout", "outdoor object", True,
                         "a statue walked around (VGGSfM example)"),
}
TRAIN_SELECTION = PairSelection(min_covisibility=0.1, min_shared_points=30, max_pairs=250, seed=0)
# Held out: the translation direction must be observable (baseline >= 3 % of the scene depth), and pairs are
# drawn evenly from three covisibility bins so that wide baselines count as much as easy neighbours.
HELDOUT_SELECTION = PairSelection(min_covisibility=0.1, min_shared_points=50, max_pairs=40,
                                  min_baseline_ratio=0.03, bins=(0.1, 0.2, 0.35, 1.01), seed=0)


def scene_arrays(work: Path, long_side: int) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray,
                                                       np.ndarray, list[np.ndarray], dict]:
    """Images (long side <= ``long_side``), K in our pixel convention, T_camera_world, points, tracks of a
    reconstruction in ``work/undistorted`` (written by ``reconstruct``)."""
    import pycolmap

    model = pycolmap.Reconstruction(work / "undistorted" / "sparse")
    point_ids = sorted(model.points3D)
    index_of = {pid: n for n, pid in enumerate(point_ids)}
    points = np.array([model.points3D[pid].xyz for pid in point_ids], np.float64).reshape(-1, 3)
    names, images, Ks, poses, observations = [], [], [], [], []
    for image_id in sorted(model.reg_image_ids(), key=lambda k: model.images[k].name):
        image = model.images[image_id]
        camera = model.cameras[image.camera_id]
        K = np.asarray(camera.calibration_matrix(), np.float64).copy()
        # COLMAP puts pixel centres at +0.5; ours at integers.
        K[0, 2] -= 0.5
        K[1, 2] -= 0.5
        pixels, K, _ = resize_long_side(read_rgb(work / "undistorted" / "images" / image.name), K, long_side)
        T = np.eye(4)
        T[:3] = image.cam_from_world().matrix()
        ids = [index_of[int(image.points2D[k].point3D_id)] for k in image.get_observation_point2D_idxs()]
        names.append(Path(image.name).stem + ".jpg")
        images.append(pixels)
        Ks.append(K)
        poses.append(T)
        observations.append(np.asarray(ids, np.int64))
    summary = {"registered": len(names), "points3D": len(point_ids),
               "mean_reprojection_error_px": round(model.compute_mean_reprojection_error(), 3),
               "mean_observations_per_image": round(float(np.mean([len(o) for o in observations])), 1)}
    return names, images, np.stack(Ks), np.stack(poses), points, observations, summary


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, source in PAIR_SOURCES.items():
        parser.add_argument(source.option, dest=key, type=Path, help=f"local clone of {source.url}")
    parser.add_argument("--out", type=Path, default=Path("~/.cache/feature_matching_ros/real_pairs"),
                        help="output folder, outside the repository (train/ and heldout/ are written in it)")
    parser.add_argument("--sfm-cache", type=Path, default=Path("~/.cache/feature_matching_ros/real/_sfm"),
                        help="structure-from-motion models (shared with build_real_benchmark.py; reused)")
    parser.add_argument("--redo-sfm", action="store_true", help="recompute the structure-from-motion models")
    parser.add_argument("--long-side", type=int, default=640, help="stored images' long side in pixels")
    parser.add_argument("--jpeg-quality", type=int, default=80)
    parser.add_argument("--train-pairs-per-scene", type=int, default=TRAIN_SELECTION.max_pairs)
    parser.add_argument("--heldout-pairs-per-scene", type=int, default=HELDOUT_SELECTION.max_pairs)
    parser.add_argument("--only", nargs="+", choices=sorted(COLLECTIONS), help="build only these scenes "
                        "(the others already in OUT are kept in the manifests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.out.expanduser().resolve()
    if REPO_ROOT in out.parents or out == REPO_ROOT:
        raise SystemExit(f"--out {out} is inside the repository; data stays outside it")
    wanted = args.only or sorted(COLLECTIONS)
    roots = {key: check_source(key, getattr(args, key), PAIR_SOURCES)
             for key in sorted({COLLECTIONS[name].source for name in wanted})}
    selections = {"train": PairSelection(**{**TRAIN_SELECTION.__dict__, "max_pairs": args.train_pairs_per_scene}),
                  "heldout": PairSelection(**{**HELDOUT_SELECTION.__dict__,
                                              "max_pairs": args.heldout_pairs_per_scene})}
    depth = DepthSettings()
    sfm_cache = args.sfm_cache.expanduser().resolve()
    skipped: dict[str, str] = {}
    for name in wanted:
        collection = COLLECTIONS[name]
        root = roots[collection.source]
        files = collection.files(root)
        relative = [str(f.relative_to(root)) for f in files]
        bad = [p for p in relative if any(part in p for part in FORBIDDEN_PATH_PARTS)]
        if bad or not files:
            raise SystemExit(f"{name}: {'forbidden paths ' + str(bad[:3]) if bad else 'no photos found in ' + str(root)}")
        started = time.perf_counter()
        folder = out / collection.split / name
        if folder.exists():
            shutil.rmtree(folder)
        try:
            sfm = reconstruct(name, files, sfm_cache / name, collection.single_camera, args.redo_sfm)
        except RuntimeError as error:  # a collection SfM cannot register is reported and left out
            LOG.warning("%s skipped: %s", name, error)
            skipped[name] = str(error)
            continue
        names, images, K, poses, points, observations, summary = scene_arrays(sfm_cache / name, args.long_side)
        if len(names) < MIN_REGISTERED:
            LOG.warning("%s skipped: only %d of %d photos registered", name, len(names), len(files))
            skipped[name] = f"only {len(names)} of {len(files)} photos registered"
            continue
        size = write_scene(folder, names, images, K, poses, points, observations, args.jpeg_quality)
        scene = SfmScene(folder, depth)
        pairs = select_pairs(scene, selections[collection.split])
        record = {"name": name, "folder": name, "kind": collection.kind, "description": collection.description,
                  "images": len(names), "input_photos": len(files), "pairs": len(pairs), "bytes": size,
                  "source": source_record(collection.source, root, relative, PAIR_SOURCES),
                  "structure_from_motion": {**sfm.summary, **summary, "not_registered": sfm.summary["not_registered"]}}
        (folder / "scene.json").write_text(json.dumps(record | {"pairs_selected": pairs}, indent=1) + "\n")
        LOG.info("%s (%s): %d/%d photos, %d points, %d pairs, %.1f MB, %.0f s", name, collection.split, len(names),
                 len(files), len(points), len(pairs), size / 1e6, time.perf_counter() - started)
    for split in ("train", "heldout"):
        root = out / split
        if not root.is_dir():
            continue
        scenes, pairs = [], []
        for scene_json in sorted(root.glob("*/scene.json")):
            record = json.loads(scene_json.read_text())
            if record["name"] not in COLLECTIONS or COLLECTIONS[record["name"]].split != split:
                raise SystemExit(f"{scene_json}: scene not listed for split {split} (remove it)")
            pairs += [{"scene": record["name"], **p} for p in record.pop("pairs_selected")]
            scenes.append(record)
        # Interleave scenes so that a prefix of the pair list (--max-pairs) samples every scene.
        rank: dict[str, int] = {}
        keyed = []
        for pair in pairs:
            rank[pair["scene"]] = rank.get(pair["scene"], -1) + 1
            keyed.append((rank[pair["scene"]], pair["scene"], pair))
        pairs = [pair for _, _, pair in sorted(keyed, key=lambda item: item[:2])]
        write_manifest(root, split, scenes, pairs, depth, {
            "builder": f"scripts/build_real_pairs.py v{BUILDER_VERSION}", "long_side": args.long_side,
            "jpeg_quality": args.jpeg_quality, "selection": selections[split].__dict__ | {"bins": list(
                selections[split].bins)}})
        check = RealPairs(root)
        print(f"{split}: {len(check.scenes)} scenes ({', '.join(check.scenes)}), {len(check)} pairs, "
              f"{folder_bytes(root) / 1e6:.1f} MB in {root}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
