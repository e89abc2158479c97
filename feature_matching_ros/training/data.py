"""Training data for the detector-agnostic LightGlue: pair sources, multi-detector features, labels, cache.

Sources (each yields pair dicts in the format of :mod:`feature_matching_ros.scenes.pairs`):
- :class:`PairFolder`: folders written by ``fmr make-pairs`` (homography + rendered pairs);
- :class:`~feature_matching_ros.training.real_pairs.RealPairs`: real photos with structure-from-motion ground
  truth (folders holding ``real_pairs.json``, written by ``scripts/build_real_pairs.py``); a training run mixes
  them with make-pairs folders by listing both;
- :class:`MegaDepthPairs`: the MegaDepth layout used by LoFTR / glue-factory for users who have it:
  ``scene_info/<scene>.npz`` with ``image_paths`` (N,), ``depth_paths`` (N,), ``intrinsics`` (N, 3, 3),
  ``poses`` (N, 4, 4) world-to-camera (T_cam_world), and either ``pair_infos`` (LoFTR: entries
  ``((i, j), overlap, ...)``) or ``overlap_matrix`` (N, N) (glue-factory: pairs with overlap in a range);
  depth maps are HDF5 files with a ``depth`` dataset (metres, 0 = invalid), paths relative to ``root``.

For every pair and every detector (ORB single-scale, SIFT, ALIKED, DISK, XFeat, ...) we detect keypoints
and describe them all with ONE frozen descriptor network (ALIKED by default, DISK selectable), sampled at
those keypoints, then label them (:mod:`labels`). :class:`FeatureCache` stores the result per pair
(one ``.npz`` per pair under a folder keyed by the extraction settings) so epochs never re-extract.
Written here: nothing in kornia/opencv pairs arbitrary detectors with a fixed descriptor network and
caches labelled samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from feature_matching_ros.config import FeatureConfig
from feature_matching_ros.training.labels import depth_labels, homography_labels

LOG = logging.getLogger(__name__)
CACHE_VERSION = 1
# Photos behind the real dev pairs (graf, motorcycle, synthetic homographies of astronaut/coffee/chelsea):
# homography training pairs built from them are skipped so the benchmark's dev pairs stay unseen.
DEV_PHOTOS = frozenset({"graffiti", "motorcycle", "astronaut", "coffee", "chelsea"})
DEFAULT_DETECTORS = ("orb", "sift", "aliked", "disk", "xfeat")
CPU_DETECTORS = frozenset({"orb", "orb_multiscale", "sift"})


class PairFolder:
    """Pairs of one or more ``fmr make-pairs`` folders (index order), minus homographies of dev photos."""

    def __init__(self, folders: Sequence[Path | str], exclude_photos: frozenset[str] = DEV_PHOTOS) -> None:
        self.paths: list[Path] = []
        for folder in folders:
            paths = sorted(Path(folder).glob("pair_*.npz"))
            if not paths:
                raise FileNotFoundError(f"no pair_*.npz in {folder} (write some with `fmr make-pairs`)")
            self.paths += paths
        self.exclude_photos = exclude_photos

    def __len__(self) -> int:
        return len(self.paths)

    def keys(self) -> list[str]:
        return [f"{p.parent.name}/{p.stem}" for p in self.paths]

    def load(self, index: int) -> dict | None:
        from feature_matching_ros.scenes.pairs import load_pair

        pair = load_pair(self.paths[index])
        if pair["kind"] == "homography" and pair["meta"].get("texture") in self.exclude_photos:
            return None
        return pair


class MegaDepthPairs:
    """MegaDepth pairs from scene_info npz files (see module docstring); images resized to ``resize`` max side."""

    def __init__(self, root: Path | str, scene_info: Sequence[Path | str], min_overlap: float = 0.1,
                 max_overlap: float = 0.7, pairs_per_scene: int = 200, resize: int = 640, seed: int = 0) -> None:
        self.root = Path(root)
        self.resize = resize
        self.items: list[tuple[dict, int, int]] = []
        rng = np.random.default_rng(seed)
        for path in scene_info:
            info = dict(np.load(path, allow_pickle=True))
            if "pair_infos" in info:
                pairs = [(int(p[0][0]), int(p[0][1]), float(p[1])) for p in info["pair_infos"]]
            elif "overlap_matrix" in info:
                i, j = np.nonzero(np.triu(info["overlap_matrix"], 1))
                pairs = [(int(a), int(b), float(info["overlap_matrix"][a, b])) for a, b in zip(i, j)]
            else:
                raise ValueError(f"{path}: neither pair_infos nor overlap_matrix")
            pairs = [(a, b) for a, b, o in pairs if min_overlap <= o <= max_overlap
                     and info["image_paths"][a] is not None and info["depth_paths"][a] is not None
                     and info["image_paths"][b] is not None and info["depth_paths"][b] is not None]
            if len(pairs) > pairs_per_scene:
                pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), pairs_per_scene, replace=False))]
            self.items += [(info, a, b) for a, b in pairs]
            LOG.info("%s: %d pairs", Path(path).name, len(pairs))

    def __len__(self) -> int:
        return len(self.items)

    def keys(self) -> list[str]:
        return [f"md/{Path(str(info['image_paths'][a])).stem}-{Path(str(info['image_paths'][b])).stem}"
                for info, a, b in self.items]

    def _view(self, info: dict, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import cv2
        import h5py

        image = cv2.imread(str(self.root / str(info["image_paths"][index])), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(self.root / str(info["image_paths"][index]))
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        with h5py.File(self.root / str(info["depth_paths"][index]), "r") as handle:
            depth = np.asarray(handle["depth"], dtype=np.float32)
        K = np.asarray(info["intrinsics"][index], dtype=np.float64).copy()
        height, width = image.shape[:2]
        if depth.shape != (height, width):  # MegaDepth depth maps match their image; guard anyway
            depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST)
        scale = self.resize / max(height, width) if self.resize else 1.0
        if scale != 1.0:
            size = (round(width * scale), round(height * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            depth = cv2.resize(depth, size, interpolation=cv2.INTER_NEAREST)
            sx, sy = size[0] / width, size[1] / height
            # pixel centres: x' = (x + 0.5) * s - 0.5
            K = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]]) @ K
        depth[~(depth > 0)] = np.nan
        return image, depth, K

    def load(self, index: int) -> dict:
        info, a, b = self.items[index]
        image0, depth0, K0 = self._view(info, a)
        image1, depth1, K1 = self._view(info, b)
        T_1_0 = np.asarray(info["poses"][b], np.float64) @ np.linalg.inv(np.asarray(info["poses"][a], np.float64))
        return {"image0": image0, "image1": image1, "depth0": depth0, "depth1": depth1, "K0": K0, "K1": K1,
                "T_1_0": T_1_0, "kind": "megadepth", "covisibility": float("nan"), "meta": {"pair": [a, b]}}


def pair_sources(paths: Sequence[str], megadepth_root: str | None = None,
                 scenes: Sequence[str] | None = None) -> list:
    """The pair sources of a training run: make-pairs folders and real pair sets (told apart by their
    ``real_pairs.json``), plus MegaDepth when its root and scenes are given."""
    from feature_matching_ros.training.real_pairs import RealPairs, is_real_pair_folder

    synthetic = [p for p in paths if not is_real_pair_folder(p)]
    sources: list = [PairFolder(synthetic)] if synthetic else []
    sources += [RealPairs(p) for p in paths if is_real_pair_folder(p)]
    if megadepth_root and scenes:
        sources.append(MegaDepthPairs(megadepth_root, scenes))
    return sources


@dataclass
class ExtractionSettings:
    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    descriptor: str = "aliked"  # the frozen descriptor network sampled at every detector's keypoints
    max_keypoints: int = 512
    nms_radius: int = 4

    def key(self) -> str:
        text = json.dumps({"v": CACHE_VERSION, "det": list(self.detectors), "desc": self.descriptor,
                           "kp": self.max_keypoints, "nms": self.nms_radius})
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class MultiDetectorExtractor:
    """Keypoints of several detectors on one image, all described by one descriptor network.

    The descriptor's dense map is computed once per image and sampled at each detector's keypoints;
    CPU detectors (OpenCV ORB/SIFT release the GIL) run in a thread pool while the GPU works.
    """

    def __init__(self, settings: ExtractionSettings, device: str | torch.device, precision: str = "fp32",
                 threads: int = 4) -> None:
        from feature_matching_ros.features import FeatureExtractor
        from feature_matching_ros.features.extractor import _network

        self.settings = settings
        self.extractors = {name: FeatureExtractor(FeatureConfig(detector=name, descriptor=settings.descriptor,
                                                                max_keypoints=settings.max_keypoints,
                                                                nms_radius=settings.nms_radius, resize_max=0),
                                                  device, precision) for name in settings.detectors}
        # SANDESC has weights per detector: the first detector's (the others sample the same map).
        detector = settings.detectors[0] if settings.descriptor == "sandesc" else ""
        self.descriptor = _network(settings.descriptor, str(torch.device(device)), precision, detector)
        self.pool = ThreadPoolExecutor(max(1, threads))

    chunk = 8  # pairs whose CPU detections are queued together

    def __call__(self, image: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """image (H, W, 3) uint8 -> {detector: (keypoints (N, 2) float32 pixels, descriptors (N, D) float32)}."""
        return self.extract_many([image])[0]

    @torch.inference_mode()
    def extract_many(self, images: Sequence[np.ndarray]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Several images: all CPU detections are queued first (threads), then the GPU networks run per image."""
        from feature_matching_ros.image import prepare_image

        any_extractor = next(iter(self.extractors.values()))
        prepared = [prepare_image(image, 0, any_extractor.device) for image in images]
        cpu_jobs = [{name: self.pool.submit(ex.detector.detect, p, self.settings.max_keypoints, False)
                     for name, ex in self.extractors.items() if name in CPU_DETECTORS} for p in prepared]
        results = []
        for p, jobs in zip(prepared, cpu_jobs):
            dense = self.descriptor.dense_map(p)
            out = {}
            for name, extractor in self.extractors.items():
                keypoints = (jobs[name].result() if name in jobs
                             else extractor.detector.detect(p, self.settings.max_keypoints, False))
                descriptors = self.descriptor.sample(dense, keypoints.xy, p.size)
                out[name] = (keypoints.xy.float().cpu(), descriptors.float().cpu())
            results.append(out)
        return results


def label_pair(pair: dict, kpts0: torch.Tensor, kpts1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (matches0 (N0,), matches1 (N1,)) from the pair's homography or depth + pose."""
    if "H_1_0" in pair:
        return homography_labels(kpts0, kpts1, torch.as_tensor(pair["H_1_0"]))
    as_t = lambda key: torch.as_tensor(np.asarray(pair[key]))  # noqa: E731
    return depth_labels(kpts0, kpts1, as_t("depth0"), as_t("depth1"), as_t("K0"), as_t("K1"), as_t("T_1_0"))


Sample = dict  # {"kpts0": (N0, 2) f32, "desc0": (N0, D) f16, "matches0": (N0,) i64, ..., "size0": (2,), "detector": str}


class FeatureCache:
    """Labelled multi-detector samples of every pair of a source, extracted once and kept on disk/in memory.

    ``samples`` is a flat list of dicts (one per pair and detector): kpts0 (N0, 2) float32 pixels,
    desc0 (N0, D) float16, matches0 (N0,) int64, size0 (W, H), the same for image 1, detector name,
    pair kind. With ``folder`` set, each pair's samples live in ``folder/<settings key>/<pair>.npz``.
    """

    def __init__(self, source, settings: ExtractionSettings, folder: Path | str | None, device: str | torch.device,
                 precision: str = "fp32", progress=None) -> None:
        self.settings = settings
        self.samples: list[Sample] = []
        cache_dir = None if folder is None else Path(folder) / settings.key()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            (cache_dir / "settings.json").write_text(json.dumps(settings.__dict__, default=list) + "\n")
        extractor = None
        keys = source.keys()
        chunks = [list(range(i, min(i + MultiDetectorExtractor.chunk, len(source))))
                  for i in range(0, len(source), MultiDetectorExtractor.chunk)]
        loader = ThreadPoolExecutor(4)
        by_image: dict[str, dict] = {}  # features of named images (see below)
        for chunk in (progress(chunks, "extract") if progress else chunks):
            paths = {i: None if cache_dir is None else cache_dir / (keys[i].replace("/", "__") + ".npz") for i in chunk}
            todo = []
            for i in chunk:
                if paths[i] is not None and paths[i].is_file():
                    self.samples += _read_samples(paths[i])
                else:
                    todo.append(i)
            pairs = [(i, pair) for i, pair in zip(todo, loader.map(source.load, todo)) if pair is not None]
            if not pairs:
                continue
            if extractor is None:
                extractor = MultiDetectorExtractor(settings, device, precision, threads=8)
            # Real pair sets name their images ("image_keys"): an image shared by many pairs is extracted once.
            keys_of = [pair.get("image_keys", (None, None)) for _, pair in pairs]
            wanted = {(n, side): pair["image" + str(side)] for n, (_, pair) in enumerate(pairs) for side in (0, 1)
                      if keys_of[n][side] is None or keys_of[n][side] not in by_image}
            found = dict(zip(wanted, extractor.extract_many(list(wanted.values()))))
            for (n, side), extracted in found.items():
                if keys_of[n][side] is not None:
                    by_image[keys_of[n][side]] = extracted
            features = [found[(n, side)] if (n, side) in found else by_image[keys_of[n][side]]
                        for n in range(len(pairs)) for side in (0, 1)]
            for n, (i, pair) in enumerate(pairs):
                samples = self._label(extractor.settings.detectors, pair, features[2 * n], features[2 * n + 1])
                if paths[i] is not None:
                    _write_samples(paths[i], samples)
                self.samples += samples
        loader.shutdown()

    @staticmethod
    def _label(detectors: Sequence[str], pair: dict, features0: dict, features1: dict) -> list[Sample]:
        samples = []
        for name in detectors:
            (k0, d0), (k1, d1) = features0[name], features1[name]
            m0, m1 = label_pair(pair, k0, k1)
            samples.append({"kpts0": k0, "desc0": d0.half(), "matches0": m0,
                            "kpts1": k1, "desc1": d1.half(), "matches1": m1,
                            "size0": torch.tensor(pair["image0"].shape[1::-1], dtype=torch.float32),
                            "size1": torch.tensor(pair["image1"].shape[1::-1], dtype=torch.float32),
                            "detector": name, "kind": pair["kind"]})
        return samples

    def __len__(self) -> int:
        return len(self.samples)


_TENSOR_KEYS = ("kpts0", "desc0", "matches0", "kpts1", "desc1", "matches1", "size0", "size1")


def _write_samples(path: Path, samples: list[Sample]) -> None:
    arrays = {}
    for i, sample in enumerate(samples):
        arrays |= {f"{i}/{k}": sample[k].numpy() for k in _TENSOR_KEYS}
        arrays[f"{i}/detector"] = np.array(sample["detector"])
        arrays[f"{i}/kind"] = np.array(sample["kind"])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _read_samples(path: Path) -> list[Sample]:
    with np.load(path) as data:
        count = len({k.split("/")[0] for k in data.files})
        return [{**{k: torch.from_numpy(data[f"{i}/{k}"]) for k in _TENSOR_KEYS},
                 "detector": str(data[f"{i}/detector"]), "kind": str(data[f"{i}/kind"])} for i in range(count)]


def collate(samples: Sequence[Sample], length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad samples to one batch. Keypoints are normalised as LightGlue expects ((kpts - size/2) / (max(size)/2)).

    Returns kpts0 (B, M, 2), desc0 (B, M, D) float32, mask0 (B, M) bool, matches0 (B, M) long (padding = -2),
    and the same for image 1 with N; M, N = the longest sample or ``length``.
    """
    from kornia.feature.lightglue import normalize_keypoints

    batch = {}
    for side in ("0", "1"):
        count = max([len(s["kpts" + side]) for s in samples] + [length or 0, 1])
        dim = samples[0]["desc" + side].shape[1]
        kpts = torch.zeros(len(samples), count, 2)
        desc = torch.zeros(len(samples), count, dim)
        mask = torch.zeros(len(samples), count, dtype=torch.bool)
        matches = torch.full((len(samples), count), -2, dtype=torch.long)
        for b, sample in enumerate(samples):
            n = len(sample["kpts" + side])
            kpts[b, :n] = normalize_keypoints(sample["kpts" + side][None].float(), sample["size" + side][None])[0]
            desc[b, :n] = sample["desc" + side].float()
            mask[b, :n] = True
            matches[b, :n] = sample["matches" + side]
        batch |= {"kpts" + side: kpts, "desc" + side: desc, "mask" + side: mask, "matches" + side: matches}
    return batch


def iter_batches(samples: Sequence[Sample], batch_size: int, rng: np.random.Generator | None,
                 length: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over ``samples`` (shuffled when ``rng`` is given; the last short batch is kept)."""
    order = rng.permutation(len(samples)) if rng is not None else np.arange(len(samples))
    for start in range(0, len(order), batch_size):
        yield collate([samples[i] for i in order[start:start + batch_size]], length)
