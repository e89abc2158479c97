"""Real image pairs with ground truth from structure from motion: the on-disk pair set and its loader.

A *real pair set* is a folder (one split: ``train`` or ``heldout``) that ``scripts/build_real_pairs.py`` writes
from public photo collections reconstructed with pycolmap, compact enough to copy whole to a training machine:

    SPLIT/real_pairs.json        manifest: format_version, split, scenes [{name, folder, images, ...}], pairs
                                 [{scene, i, j, covisibility, shared_points, rotation_deg}], depth settings
    SPLIT/<scene>/scene.npz      the reconstruction of one scene (np.savez_compressed):
        names               (N,) str      image file names in images/
        K                   (N, 3, 3)     pinhole intrinsics of the stored (undistorted, resized) image,
                                          pixel (0, 0) = centre of the top-left pixel
        T_camera_world      (N, 4, 4)     maps world points into camera n (x right, y down, z forward);
                                          world frame and scale are the reconstruction's (arbitrary)
        sizes               (N, 2) int    image width, height
        points              (P, 3) f32    triangulated 3D points (world frame)
        observation_offsets (N + 1,) i64  image n observes points[observations[offsets[n]:offsets[n + 1]]]
        observations        (M,) i32      point indices, the reconstruction's tracks (visible in that image)
    SPLIT/<scene>/images/*.jpg   the images (RGB JPEG, long side ~640)

Scenes never cross splits: a held-out scene is never trained on. :class:`RealPairs` yields pair dicts in the
format of :mod:`feature_matching_ros.scenes.pairs` (depth + pose pairs), so the LightGlue, SANDESC and Efficient
LoFTR training loops read them like ``fmr make-pairs`` folders (``--train SPLIT``):

    image0, image1   uint8 (H, W, 3) RGB
    depth0, depth1   float32 (H, W) semi-dense depth (NaN = unknown), see :func:`semi_dense_depth`
    K0, K1           float64 (3, 3)
    T_1_0            float64 (4, 4) maps points from camera 0 to camera 1
    kind "sfm", covisibility float, meta {"scene", "images": [name0, name1], "pair": [i, j], "split"}
    image_keys       (str, str) names the two images uniquely (feature extraction is memoised per image)

Depth: structure from motion gives sparse points, and the labels need depth at any detector's keypoints. Each
image's own observed points (its tracks, so visible in it) are triangulated in the image (Delaunay) and the
inverse depth is interpolated inside triangles that are small (``max_edge_px``) and whose corners agree in depth
(``max_depth_ratio``), i.e. locally planar surfaces; triangles spanning an occlusion boundary are dropped.
Labels then keep a correspondence only where the depth found in the other image agrees (``labels.depth_labels``,
10 %): occlusion is checked in both directions.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LOG = logging.getLogger(__name__)
FORMAT_VERSION = 1
MANIFEST = "real_pairs.json"
SCENE_FILE = "scene.npz"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class DepthSettings:
    """Semi-dense depth from sparse points (see module docstring)."""

    max_edge_px: float = 48.0  # at a 640 px long side; scaled with the image's long side
    max_depth_ratio: float = 1.15  # largest / smallest corner depth of a kept triangle


def is_real_pair_folder(folder: Path | str) -> bool:
    return (Path(folder) / MANIFEST).is_file()


# ------------------------------------------------------------------------------------------------ depth
def semi_dense_depth(pixels: np.ndarray, depths: np.ndarray, width: int, height: int,
                     settings: DepthSettings = DepthSettings()) -> np.ndarray:
    """Depth map (H, W) float32 (NaN = unknown) interpolated from sparse points.

    pixels (N, 2) float (x, y), depths (N,) > 0 along the optical axis. Inverse depth is affine in the image
    over a planar triangle, so it is interpolated linearly inside each kept Delaunay triangle (exact on planes).
    """
    import cv2
    from scipy.spatial import Delaunay, QhullError

    depth = np.full((height, width), np.nan, np.float32)
    keep = (depths > 0) & np.isfinite(pixels).all(1)
    pixels, depths = np.asarray(pixels, np.float64)[keep], np.asarray(depths, np.float64)[keep]
    if len(pixels) < 3:
        return depth
    try:
        triangles = Delaunay(pixels).simplices  # (T, 3)
    except QhullError:  # all points on a line
        return depth
    corners = pixels[triangles]  # (T, 3, 2)
    z = depths[triangles]  # (T, 3)
    edges = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=2).max(1)
    max_edge = settings.max_edge_px * max(width, height) / 640.0
    good = (edges <= max_edge) & (z.max(1) <= settings.max_depth_ratio * z.min(1))
    triangles, corners, z = triangles[good], corners[good], z[good]
    if not len(triangles):
        return depth
    # Affine inverse depth per triangle: [x y 1] @ coefficients = 1 / z at the corners.
    system = np.concatenate([corners, np.ones((len(corners), 3, 1))], axis=2)  # (T, 3, 3)
    determinant = np.linalg.det(system)
    solvable = np.abs(determinant) > 1e-6
    coefficients = np.zeros((len(corners), 3))
    coefficients[solvable] = np.linalg.solve(system[solvable], 1.0 / z[solvable][..., None])[..., 0]
    # Rasterise triangle ids (vertices with 4 fractional bits; pixel centres at integers as in OpenCV).
    ids = np.full((height, width), -1, np.int32)
    shift = 4
    scaled = np.round(corners * (1 << shift)).astype(np.int32)
    for index in np.flatnonzero(solvable):
        cv2.fillConvexPoly(ids, scaled[index], int(index), lineType=cv2.LINE_8, shift=shift)
    rows, cols = np.nonzero(ids >= 0)
    a, b, c = coefficients[ids[rows, cols]].T
    inverse = a * cols + b * rows + c
    z_min, z_max = z.min(1)[ids[rows, cols]], z.max(1)[ids[rows, cols]]
    with np.errstate(divide="ignore"):
        values = 1.0 / inverse
    # Rasterisation can touch pixels just outside a triangle: never extrapolate beyond its corner depths.
    values = np.where((inverse > 0) & (values >= z_min * 0.98) & (values <= z_max * 1.02), values, np.nan)
    depth[rows, cols] = values.astype(np.float32)
    return depth


def fit_pair_to_size(pair: dict, width: int, height: int) -> dict:
    """The pair at exactly ``width`` x ``height``: each image scaled to cover it (area filter), then centre-cropped;
    depth (nearest), K and homographies follow. Returns a new dict (the input is left as is)."""
    import cv2

    out = dict(pair)
    affines = []
    for side in ("0", "1"):
        image = pair["image" + side]
        h, w = image.shape[:2]
        scale = max(width / w, height / h)
        scaled = (max(width, round(w * scale)), max(height, round(h * scale)))
        sx, sy = scaled[0] / w, scaled[1] / h
        x0, y0 = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        # pixel centres: x' = (x + 0.5) * s - 0.5 - crop offset
        A = np.array([[sx, 0.0, 0.5 * sx - 0.5 - x0], [0.0, sy, 0.5 * sy - 0.5 - y0], [0.0, 0.0, 1.0]])
        affines.append(A)
        if (w, h) == (width, height):
            continue
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        out["image" + side] = cv2.resize(image, scaled, interpolation=interpolation)[y0:y0 + height, x0:x0 + width]
        if "depth" + side in pair:
            out["depth" + side] = cv2.resize(pair["depth" + side], scaled,
                                             interpolation=cv2.INTER_NEAREST)[y0:y0 + height, x0:x0 + width]
        if "K" + side in pair:
            out["K" + side] = A @ np.asarray(pair["K" + side], np.float64)
    if "H_1_0" in pair:
        out["H_1_0"] = affines[1] @ np.asarray(pair["H_1_0"], np.float64) @ np.linalg.inv(affines[0])
    return out


# ------------------------------------------------------------------------------------------------ scenes
class SfmScene:
    """One reconstructed scene of a real pair set (see module docstring), with per-image depth memoised."""

    def __init__(self, folder: Path | str, depth_settings: DepthSettings = DepthSettings(),
                 cached_depths: int = 64) -> None:
        self.folder = Path(folder)
        with np.load(self.folder / SCENE_FILE, allow_pickle=False) as data:
            self.names = [str(n) for n in data["names"]]
            self.K = data["K"].astype(np.float64)
            self.T_camera_world = data["T_camera_world"].astype(np.float64)
            self.sizes = data["sizes"].astype(np.int64)
            self.points = data["points"].astype(np.float64)
            self.offsets = data["observation_offsets"].astype(np.int64)
            self.observations = data["observations"].astype(np.int64)
        count = len(self.names)
        if not (self.K.shape == (count, 3, 3) and self.T_camera_world.shape == (count, 4, 4)
                and self.sizes.shape == (count, 2) and self.offsets.shape == (count + 1,)):
            raise ValueError(f"{self.folder / SCENE_FILE}: arrays disagree on the number of images ({count})")
        self.depth_settings = depth_settings
        self._depths: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_depths = cached_depths

    def __len__(self) -> int:
        return len(self.names)

    def observed(self, index: int) -> np.ndarray:
        """Indices (M,) of the 3D points image ``index`` observes."""
        return self.observations[self.offsets[index]:self.offsets[index + 1]]

    def project(self, index: int, point_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (M, 2) and depths (M,) of points (default: the image's own observations) in image ``index``."""
        ids = self.observed(index) if point_ids is None else point_ids
        T = self.T_camera_world[index]
        X = self.points[ids] @ T[:3, :3].T + T[:3, 3]
        z = X[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = (X @ self.K[index].T)[:, :2] / z[:, None]
        return uv, z

    def image(self, index: int) -> np.ndarray:
        """RGB uint8 (H, W, 3)."""
        import cv2

        path = self.folder / "images" / self.names[index]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"{path}: missing or unreadable image of scene {self.folder.name}")
        if image.shape[1::-1] != tuple(self.sizes[index]):
            raise ValueError(f"{path}: size {image.shape[1::-1]} differs from the scene's {tuple(self.sizes[index])}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def depth(self, index: int) -> np.ndarray:
        """Semi-dense depth (H, W) float32 of image ``index`` from its observed points (memoised)."""
        if index in self._depths:
            self._depths.move_to_end(index)
            return self._depths[index]
        uv, z = self.project(index)
        width, height = (int(v) for v in self.sizes[index])
        depth = semi_dense_depth(uv, z, width, height, self.depth_settings)
        self._depths[index] = depth
        if len(self._depths) > self._cached_depths:
            self._depths.popitem(last=False)
        return depth

    def T_1_0(self, i: int, j: int) -> np.ndarray:
        """(4, 4) maps points from camera i to camera j."""
        return self.T_camera_world[j] @ np.linalg.inv(self.T_camera_world[i])


class RealPairs:
    """Pairs of one real pair set folder, in the pair-dict format of the training loops (module docstring).

    ``size`` (W, H) fits every pair to one size (:func:`fit_pair_to_size`, for Efficient LoFTR's batches);
    None keeps each image's own size. ``max_pairs`` keeps the first pairs of the manifest (0 = all).
    """

    def __init__(self, folder: Path | str, size: tuple[int, int] | None = None, max_pairs: int = 0) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: not a real pair set (write one with scripts/build_real_pairs.py)")
        manifest = json.loads(path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {manifest.get('format_version')} (this reader: {FORMAT_VERSION})")
        self.manifest = manifest
        self.split = manifest["split"]
        settings = DepthSettings(**manifest.get("depth", {}))
        self.scenes = {s["name"]: SfmScene(self.folder / s["folder"], settings) for s in manifest["scenes"]}
        self.pairs = manifest["pairs"][:max_pairs] if max_pairs else manifest["pairs"]
        unknown = {p["scene"] for p in self.pairs} - set(self.scenes)
        if unknown:
            raise ValueError(f"{path}: pairs name unknown scenes {sorted(unknown)}")
        self.size = size

    def __len__(self) -> int:
        return len(self.pairs)

    def keys(self) -> list[str]:
        return [f"{self.folder.name}/{p['scene']}_{p['i']:04d}_{p['j']:04d}" for p in self.pairs]

    def load(self, index: int) -> dict:
        entry = self.pairs[index]
        scene = self.scenes[entry["scene"]]
        i, j = int(entry["i"]), int(entry["j"])
        pair = {"image0": scene.image(i), "image1": scene.image(j), "depth0": scene.depth(i).copy(),
                "depth1": scene.depth(j).copy(), "K0": scene.K[i].copy(), "K1": scene.K[j].copy(),
                "T_1_0": scene.T_1_0(i, j), "kind": "sfm", "covisibility": float(entry["covisibility"]),
                "image_keys": tuple(f"{self.folder.name}/{entry['scene']}/{scene.names[k]}" for k in (i, j)),
                "meta": {"scene": entry["scene"], "images": [scene.names[i], scene.names[j]], "pair": [i, j],
                         "split": self.split}}
        if self.size:
            pair = fit_pair_to_size(pair, *self.size)
            pair["image_keys"] = tuple(f"{key}@{self.size[0]}x{self.size[1]}" for key in pair["image_keys"])
        return pair


# ------------------------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class PairSelection:
    """Which image pairs of a scene become pairs (covisibility = shared points / points of the image, the smaller
    of the two directions)."""

    min_covisibility: float = 0.1
    min_shared_points: int = 30
    max_pairs: int = 0  # per scene; 0 = all
    # Evaluation pairs need an observable translation direction: baseline / median depth of the shared points.
    min_baseline_ratio: float = 0.0
    # Evaluation pairs are drawn evenly from these covisibility bins (easy pairs otherwise dominate).
    bins: tuple[float, ...] = ()
    seed: int = 0


def rotation_deg(T: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(T[:3, :3]) - 1) / 2, -1.0, 1.0))))


def select_pairs(scene: SfmScene, selection: PairSelection) -> list[dict]:
    """Candidate pairs (i < j) of a scene by covisibility; capped per scene (evenly over ``bins`` when given)."""
    sets = [set(scene.observed(n).tolist()) for n in range(len(scene))]
    candidates = []
    for i in range(len(scene)):
        for j in range(i + 1, len(scene)):
            shared = sets[i] & sets[j]
            if len(shared) < selection.min_shared_points:
                continue
            covisibility = len(shared) / max(len(sets[i]), len(sets[j]))
            if covisibility < selection.min_covisibility:
                continue
            T = scene.T_1_0(i, j)
            if selection.min_baseline_ratio > 0:
                _, z = scene.project(i, np.fromiter(shared, np.int64))
                if np.linalg.norm(T[:3, 3]) < selection.min_baseline_ratio * float(np.median(z)):
                    continue
            candidates.append({"i": i, "j": j, "covisibility": round(covisibility, 4), "shared_points": len(shared),
                               "rotation_deg": round(rotation_deg(T), 2)})
    rng = np.random.default_rng(selection.seed)
    if not selection.max_pairs or len(candidates) <= selection.max_pairs:
        return candidates
    if not selection.bins:
        keep = sorted(rng.choice(len(candidates), selection.max_pairs, replace=False))
        return [candidates[k] for k in keep]
    edges = np.asarray(selection.bins, np.float64)
    groups = [[c for c in candidates if lo <= c["covisibility"] < hi] for lo, hi in zip(edges[:-1], edges[1:])]
    chosen: list[dict] = []
    quota = selection.max_pairs
    # Fill the scarce bins first, spreading what they cannot use over the others.
    for rank, group in enumerate(sorted(groups, key=len)):
        take = min(len(group), quota // (len(groups) - rank))
        chosen += [group[k] for k in sorted(rng.choice(len(group), take, replace=False))]
        quota -= take
    return sorted(chosen, key=lambda c: (c["i"], c["j"]))


def write_scene(folder: Path | str, names: list[str], images: list[np.ndarray], K: np.ndarray,
                T_camera_world: np.ndarray, points: np.ndarray, observations: list[np.ndarray],
                jpeg_quality: int = 85) -> int:
    """Write ``folder/scene.npz`` and ``folder/images/*.jpg``; returns the bytes written.

    images: RGB uint8 (H, W, 3) each; K (N, 3, 3); T_camera_world (N, 4, 4); points (P, 3);
    observations: per image, indices into ``points`` of the points it observes.
    """
    import cv2

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    total = 0
    for name, image in zip(names, images):
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality), cv2.IMWRITE_JPEG_OPTIMIZE, 1])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {name}")
        (folder / "images" / name).write_bytes(encoded.tobytes())
        total += len(encoded)
    ids = [np.unique(np.asarray(o, np.int64)) for o in observations]
    offsets = np.r_[0, np.cumsum([len(o) for o in ids])].astype(np.int64)
    np.savez_compressed(folder / SCENE_FILE, names=np.array(names), K=np.asarray(K, np.float64),
                        T_camera_world=np.asarray(T_camera_world, np.float64),
                        sizes=np.array([im.shape[1::-1] for im in images], np.int32),
                        points=np.asarray(points, np.float32), observation_offsets=offsets,
                        observations=(np.concatenate(ids) if ids else np.zeros(0)).astype(np.int32))
    return total + (folder / SCENE_FILE).stat().st_size


def write_manifest(folder: Path | str, split: str, scenes: list[dict], pairs: list[dict],
                   depth: DepthSettings = DepthSettings(), notes: dict | None = None) -> Path:
    """``folder/real_pairs.json``; ``scenes`` entries need name and folder (relative), pairs scene, i, j, covisibility."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(folder) / MANIFEST
    manifest = {"format_version": FORMAT_VERSION, "split": split, "depth": asdict(depth), "scenes": scenes,
                "pairs": pairs} | (notes or {})
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path
