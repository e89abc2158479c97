"""Training / evaluation image pairs with exact geometry: rendered 3D pairs and real-photo homographies.

Storage: one ``pair_NNNNNN.npz`` per pair (``np.savez_compressed``) plus ``pairs.json`` (manifest) in the
output folder. Keys of every pair:
  image0, image1   uint8 (H, W, 3) RGB
  kind             "rendered_narrow" | "rendered_wide" | "homography"
  covisibility     float: min over both directions of the fraction of pixels seen (unoccluded) in the other image
  meta             dict (decoded from JSON): split, seed, scene / texture, frame indices ...
Rendered pairs add
  depth0, depth1   float32 (H, W) metres along the optical axis, NaN = no surface
  K0, K1           float64 (3, 3)
  T_1_0            float64 (4, 4): maps points from camera 0 to camera 1 (optical frames)
Homography pairs add
  H_1_0            float64 (3, 3): maps pixel (x, y, 1) of image0 to image1 (pixel-centre convention)
``load_pair(path)`` returns that dict; ``iter_pairs(folder)`` yields them in order (no torch needed).

Kinds cycle deterministically with the pair index: homography, rendered_narrow, homography, rendered_wide.
Rendered pairs take two frames of a looping trajectory through a random scene: *narrow* = 1-3 frames
apart on the same pass, *wide* = from different passes or far apart in time (the loop-closure case:
other lane, other gaze, other exposure), kept if covisibility >= 0.1. Each image gets its own exposure
gain and 1 DN read noise. Homography pairs warp a real photo twice (image0 = crop/scale of the photo,
image1 = image0's view through a random homography, photo reflected at its borders so both images
are full) and augment each photometrically (gain, contrast, gamma, white balance, blur, noise).

Split rule (train and eval never overlap):
- homography photos: ``textures.split_of_texture(name)`` (stable sha256 of the name, ~25 % eval) --
  a photo is in exactly one split;
- rendered pairs: scene seeds are ``2 * h + s`` with s = 0 for train and 1 for eval, so no scene
  (layout, textures placement, lights, trajectory) is shared; per-pair randomness is seeded with
  (split, seed, index) as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from feature_matching_ros.scenes.builders import SCENE_KINDS, build_scene
from feature_matching_ros.scenes.loops import scale_intrinsics, view_overlap
from feature_matching_ros.scenes.renderer import Renderer, default_intrinsics
from feature_matching_ros.scenes.textures import load_texture_rgb, split_of_texture, texture_catalog
from feature_matching_ros.scenes.trajectory import make_trajectory

LOG = logging.getLogger(__name__)
SPLITS = ("train", "eval")
KIND_CYCLE = ("homography", "rendered_narrow", "homography", "rendered_wide")
PAIRS_PER_SCENE = 8
TRAJECTORY_FRAMES = 240
MIN_COVISIBILITY = 0.1
FORMAT_VERSION = 1


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def scene_seed_for(split: str, seed: int, group: int) -> int:
    """Scene seed of a group of pairs: even for train, odd for eval (the 3D split rule)."""
    return 2 * _stable_int("scene", seed, group) + SPLITS.index(split)


def _photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gain, contrast, gamma, white balance, blur and noise on a float [0, 1] RGB image."""
    import cv2

    out = image.astype(np.float32)
    out = (out - 0.5) * rng.uniform(0.7, 1.3) + 0.5  # contrast
    out = out * rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # gain, white balance
    out = np.clip(out, 0.0, 1.0) ** rng.uniform(0.75, 1.35)  # gamma
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out = out + rng.normal(0.0, rng.uniform(0.0, 4.0) / 255.0, out.shape).astype(np.float32)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _homography_covisibility(H_1_0: np.ndarray, width: int, height: int) -> float:
    rows, cols = np.mgrid[0:height:4, 0:width:4]
    pts = np.stack([cols.ravel(), rows.ravel(), np.ones(cols.size)])
    fractions = []
    for H in (H_1_0, np.linalg.inv(H_1_0)):
        p = H @ pts
        x, y = p[0] / p[2], p[1] / p[2]
        fractions.append(float(np.mean((p[2] > 0) & (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1))))
    return min(fractions)


def make_homography_pair(photo_name: str, width: int, height: int, rng: np.random.Generator) -> dict:
    import cv2

    photo = load_texture_rgb(photo_name).astype(np.float32) / 255.0
    ph, pw = photo.shape[:2]
    # image0: a random crop at a random scale (A0 maps photo pixels to image0 pixels).
    scale = max(width / pw, height / ph) * rng.uniform(1.0, 1.6)
    x_off = rng.uniform(0, max(0.0, pw * scale - width))
    y_off = rng.uniform(0, max(0.0, ph * scale - height))
    A0 = np.array([[scale, 0, -x_off], [0, scale, -y_off], [0, 0, 1.0]])
    for _ in range(50):
        # Random similarity about the centre followed by a perspective perturbation of the corners.
        angle = np.radians(rng.uniform(-30, 30))
        zoom = np.exp(rng.uniform(np.log(0.7), np.log(1.4)))
        centre = np.array([(width - 1) / 2, (height - 1) / 2])
        corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * zoom
        moved = (corners - centre) @ rot.T + centre + rng.uniform(-0.1, 0.1, 2) * [width, height]
        moved += rng.uniform(-0.12, 0.12, (4, 2)) * [width, height]
        H_1_0 = cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32)).astype(np.float64)
        covisibility = _homography_covisibility(H_1_0, width, height)
        if covisibility >= 0.25:
            break
    else:  # pragma: no cover - the sampler above practically always succeeds
        raise RuntimeError("could not sample a homography with enough overlap")
    image0 = cv2.warpPerspective(photo, A0, (width, height), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT)
    image1 = cv2.warpPerspective(photo, H_1_0 @ A0, (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT)
    return {
        "image0": _photometric(image0, rng), "image1": _photometric(image1, rng), "kind": "homography",
        "covisibility": covisibility, "H_1_0": H_1_0, "meta": {"texture": photo_name},
    }


class _SceneCache:
    """Keeps the current scene's renderer and trajectory (pairs come in groups per scene)."""

    def __init__(self):
        self.key = None

    def get(self, scene_seed: int, width: int, height: int):
        key = (scene_seed, width, height)
        if key != self.key:
            kind = SCENE_KINDS[scene_seed // 2 % len(SCENE_KINDS)]
            layout = build_scene(kind, scene_seed)
            poses = make_trajectory(layout, TRAJECTORY_FRAMES, np.random.default_rng([scene_seed, 1]))
            self.key, self.kind, self.layout, self.poses = key, kind, layout, poses
            self.renderer = Renderer(layout.scene)
        return self


def make_rendered_pair(scene: _SceneCache, wide: bool, width: int, height: int, rng: np.random.Generator) -> dict:
    K = default_intrinsics(width, height, hfov_deg=rng.uniform(55, 80))
    n = len(scene.poses)
    step = 4
    K_coarse = scale_intrinsics(K, step)
    best = None
    for _ in range(30):
        i = int(rng.integers(n))
        if wide:
            distances = np.linalg.norm(scene.poses[:, :3, 3] - scene.poses[i, :3, 3], axis=1)
            gaps = np.abs(np.arange(n) - i)
            candidates = np.flatnonzero((gaps >= 8) & (distances < scene.layout.loop_distance_m * 1.5))
            if candidates.size == 0:
                continue
            j = int(candidates[rng.integers(candidates.size)])
        else:
            j = int(np.clip(i + rng.choice([-3, -2, -1, 1, 2, 3]), 0, n - 1))
            if j == i:
                continue
        r0 = scene.renderer.render(K, scene.poses[i], width, height, exposure=rng.uniform(0.75, 1.25))
        r1 = scene.renderer.render(K, scene.poses[j], width, height, exposure=rng.uniform(0.75, 1.25))
        d0, d1 = r0.depth[::step, ::step], r1.depth[::step, ::step]
        covisibility = min(view_overlap(d0, K_coarse, scene.poses[i], d1, K_coarse, scene.poses[j]),
                           view_overlap(d1, K_coarse, scene.poses[j], d0, K_coarse, scene.poses[i]))
        if covisibility >= MIN_COVISIBILITY:
            best = (i, j, r0, r1, covisibility)
            break
    if best is None:
        raise RuntimeError(f"no covisible {'wide' if wide else 'narrow'} pair found in scene {scene.key}")
    i, j, r0, r1, covisibility = best
    images = []
    for result in (r0, r1):
        noisy = result.rgb * 255.0 + rng.normal(0.0, 1.0, result.rgb.shape).astype(np.float32)
        images.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return {
        "image0": images[0], "image1": images[1], "kind": "rendered_wide" if wide else "rendered_narrow",
        "covisibility": covisibility, "depth0": r0.depth, "depth1": r1.depth, "K0": K, "K1": K.copy(),
        "T_1_0": np.linalg.inv(scene.poses[j]) @ scene.poses[i],
        "meta": {"scene": scene.kind, "scene_seed": scene.key[0], "frames": [i, j]},
    }


def generate_pairs(out_dir: Path | str, n: int, seed: int = 0, split: str = "train", width: int = 640,
                   height: int = 480, overwrite: bool = False) -> Path:
    """Write ``n`` pairs (see module docstring) into ``out_dir``; returns it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n < 1:
        raise ValueError("--n must be at least 1")
    if width < 32 or height < 24:
        raise ValueError(f"image size {width}x{height} is too small (min 32x24)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.glob("pair_*.npz")) and not overwrite:
        raise FileExistsError(f"{out_dir} already holds pairs (use --overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("pair_*.npz"):
        stale.unlink()
    photos = [name for name in texture_catalog() if split_of_texture(name) == split]
    cache = _SceneCache()
    entries = []
    for index in range(n):
        rng = np.random.default_rng([SPLITS.index(split), int(seed), index])
        kind = KIND_CYCLE[index % len(KIND_CYCLE)]
        if kind == "homography":
            pair = make_homography_pair(photos[int(rng.integers(len(photos)))], width, height, rng)
        else:
            scene = cache.get(scene_seed_for(split, seed, index // PAIRS_PER_SCENE), width, height)
            pair = make_rendered_pair(scene, kind == "rendered_wide", width, height, rng)
        pair["meta"] |= {"split": split, "seed": int(seed), "index": index}
        path = out_dir / f"pair_{index:06d}.npz"
        save_pair(path, pair)
        entries.append({"file": path.name, "kind": pair["kind"], "covisibility": round(float(pair["covisibility"]), 4)})
        if index % 20 == 19 or index == n - 1:
            LOG.info("wrote %d/%d pairs", index + 1, n)
    manifest = {"format_version": FORMAT_VERSION, "split": split, "seed": int(seed), "n": n, "width": width,
                "height": height, "kind_cycle": list(KIND_CYCLE), "homography_photos": photos, "pairs": entries}
    (out_dir / "pairs.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out_dir


def save_pair(path: Path | str, pair: dict) -> None:
    arrays = {k: v for k, v in pair.items() if k not in ("kind", "meta", "covisibility")}
    np.savez_compressed(path, kind=np.array(pair["kind"]), covisibility=np.array(float(pair["covisibility"])),
                        meta=np.array(json.dumps(pair["meta"])), **arrays)


def load_pair(path: Path | str) -> dict:
    """One pair as a dict (see module docstring): numpy arrays, ``kind`` str, ``covisibility`` float, ``meta`` dict."""
    with np.load(path, allow_pickle=False) as data:
        pair = {key: data[key] for key in data.files}
    pair["kind"] = str(pair["kind"])
    pair["covisibility"] = float(pair["covisibility"])
    pair["meta"] = json.loads(str(pair["meta"]))
    return pair


def iter_pairs(folder: Path | str) -> Iterator[dict]:
    """Pairs of a folder in index order (plain numpy; wrap in a torch Dataset if needed)."""
    paths = sorted(Path(folder).glob("pair_*.npz"))
    if not paths:
        raise FileNotFoundError(f"no pair_*.npz in {folder}")
    for path in paths:
        yield load_pair(path)
