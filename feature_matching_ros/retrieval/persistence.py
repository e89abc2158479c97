"""Save / load a keyframe database (map) as a directory of ``.npy`` arrays + a JSON manifest. No pickle.

Layout (format version ``MAP_FORMAT_VERSION``)::

    MAP/manifest.json          {"format": "feature_matching_ros.map", "format_version", "created", "counts",
                                "feature_config", "global_descriptor", "retrieval", "files": {name: {sha256, bytes}}}
    MAP/<array>.npy            concatenated per-keyframe arrays (see ``_ARRAYS``), offsets.npy splits them
    MAP/images.npy, depth_images.npy   only in detector-free maps (eloftr, loftr): (n, H, W) pixels per keyframe
    MAP/map_point_offsets.npy, map_point_pixels.npy, map_points.npy   only when a backend gave keyframes map
                               points (monocular Sim3): (n + 1,) int64 offsets, (P, 2) float32 px, (P, 3) float32
                               camera-frame backend units; a keyframe with an empty slice has none
Optional arrays are absent from maps that have nothing to store, so maps written before they existed load as
they are (same format version).

Safety: arrays are read with ``np.load(allow_pickle=False)`` and metadata with ``json``, so a map from
elsewhere cannot execute code; every file's size and sha256 are checked against the manifest before
anything is parsed, and the shapes are cross-checked after, so a truncated, corrupt, foreign-version or
incomplete map raises :class:`MapFormatError` and nothing is half-loaded. Writes are atomic per file
(temp file, fsync, rename) and the whole map is written into a fresh temp directory beside the target,
manifest last, which then takes the target's place: a crash leaves either the old map or the new one.

Saving never removes what it did not write (:func:`check_save_target`): the target must be absent, an empty
directory, or a map this module wrote (its manifest carries ``"format": "feature_matching_ros.map"`` and the
directory holds nothing but the files that manifest lists). Anything else -- a file, a directory holding other
files, a map with extra files added -- is refused with :class:`MapTargetError` naming what is in the way.
An existing map is swapped with the new one in one ``renameat2(RENAME_EXCHANGE)`` where the kernel and file
system offer it (Linux), else by two renames (the old map moved aside first).
The map's feature config must equal the running pipeline's (:func:`check_compatible`): descriptors of
another network or keypoints of another detector would silently fail to match.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from feature_matching_ros.retrieval.database import Keyframe, KeyframeDatabase, MapPoints, RetrievalConfig

MAP_FORMAT = "feature_matching_ros.map"
MAP_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ARRAYS = ("ids", "stamps_ns", "offsets", "keypoints", "descriptors", "scores", "depth_at_keypoints",
           "has_depth", "K", "T_map_camera", "has_pose", "image_sizes", "global_descriptors")
# Detector-free maps (eloftr, loftr) keep the keyframe pixels; monocular backends' keyframes their map points.
_OPTIONAL_ARRAYS = ("images", "depth_images", "map_point_offsets", "map_point_pixels", "map_points")


class MapFormatError(RuntimeError):
    """The map directory is missing, truncated, corrupt, of another version, or incompatible."""


class MapTargetError(ValueError):
    """A save target holds something this module did not write (a file, a foreign directory): refused."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _pack(database: KeyframeDatabase) -> dict[str, np.ndarray]:
    keyframes = database.keyframes
    n = len(keyframes)
    counts = np.array([len(k) for k in keyframes], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    descriptor_width = keyframes[0].descriptors.shape[1] if n else 0
    descriptor_dtype = keyframes[0].descriptors.dtype if n else np.float16
    cat = lambda arrays, shape, dtype: (np.concatenate(arrays).astype(dtype) if n  # noqa: E731
                                        else np.zeros(shape, dtype))
    return {
        "ids": np.array([k.id for k in keyframes], np.int64),
        "stamps_ns": np.array([k.stamp_ns for k in keyframes], np.int64),
        "offsets": offsets,
        "keypoints": cat([k.keypoints for k in keyframes], (0, 2), np.float32),
        "descriptors": cat([k.descriptors for k in keyframes], (0, descriptor_width), descriptor_dtype),
        "scores": cat([k.scores for k in keyframes], (0,), np.float16),
        "depth_at_keypoints": cat([k.depth_at_keypoints if k.depth_at_keypoints is not None
                                   else np.full(len(k), np.nan, np.float32) for k in keyframes], (0,), np.float32),
        "has_depth": np.array([k.depth_at_keypoints is not None for k in keyframes], bool),
        "K": np.array([k.K for k in keyframes], np.float64).reshape(n, 3, 3),
        "T_map_camera": np.array([k.T_map_camera if k.T_map_camera is not None else np.eye(4) for k in keyframes],
                                 np.float64).reshape(n, 4, 4),
        "has_pose": np.array([k.T_map_camera is not None for k in keyframes], bool),
        "image_sizes": np.array([k.image_size for k in keyframes], np.int64).reshape(n, 2),
        "global_descriptors": np.array([k.global_descriptor for k in keyframes], np.float32).reshape(
            n, database.global_dim),
    } | _pack_images(keyframes) | _pack_map_points(keyframes)


def _pack_map_points(keyframes: list[Keyframe]) -> dict[str, np.ndarray]:
    """Backend map points of every keyframe, concatenated; nothing when no keyframe has any."""
    if all(k.map_points is None for k in keyframes):
        return {}
    counts = [len(k.map_points) if k.map_points is not None else 0 for k in keyframes]
    return {"map_point_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "map_point_pixels": np.concatenate([k.map_points.pixels for k in keyframes if k.map_points is not None]
                                               ).astype(np.float32).reshape(-1, 2),
            "map_points": np.concatenate([k.map_points.points for k in keyframes if k.map_points is not None]
                                         ).astype(np.float32).reshape(-1, 3)}


def _pack_images(keyframes: list[Keyframe]) -> dict[str, np.ndarray]:
    """Keyframe images of detector-free maps: (n, H, W) uint8 and, when any keyframe has depth, (n, H, W)
    float16 depth (NaN where a keyframe has none). Nothing for keypoint maps."""
    if not keyframes or all(k.image is None for k in keyframes):
        return {}
    if any(k.image is None for k in keyframes) or len({k.image.shape for k in keyframes}) > 1:
        raise ValueError("detector-free map: every keyframe needs an image, all of one size")
    out = {"images": np.stack([k.image for k in keyframes]).astype(np.uint8)}
    if any(k.depth_image is not None for k in keyframes):
        blank = np.full(keyframes[0].image.shape, np.nan, np.float16)
        out["depth_images"] = np.stack([k.depth_image if k.depth_image is not None else blank
                                        for k in keyframes]).astype(np.float16)
    return out


def check_save_target(directory: Path | str) -> bool:
    """Refuse a save target holding anything this module did not write; True when it holds one of our maps.

    Allowed: a path that does not exist, an empty directory, or a map directory written by :func:`save_map`
    whose entries are exactly its manifest and the files the manifest lists. Raises :class:`MapTargetError`
    with the reason otherwise (the caller's data stays untouched).
    """
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return False
    if directory.is_symlink():
        raise MapTargetError(f"{directory} is a symbolic link; give the map directory itself")
    if not directory.is_dir():
        raise MapTargetError(f"{directory} is a file, not a map directory; a map is saved as a directory")
    entries = sorted(entry.name for entry in directory.iterdir())
    if not entries:
        return False
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MAP_FORMAT:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise MapTargetError(f"{directory} is a non-empty directory that is not a {MAP_FORMAT} map (it holds "
                             f"{shown}); refusing to overwrite it: save to a new or empty directory")
    ours = {MANIFEST} | set(manifest.get("files", {}))
    foreign = [name for name in entries if name not in ours]
    if foreign:
        raise MapTargetError(f"{directory} is a map with other files added ({', '.join(foreign[:5])}); refusing "
                             "to overwrite them: move them out or save to another directory")
    return True


def _fresh_directory(parent: Path, prefix: str) -> Path:
    """A new directory with a name nobody else uses (permissions from the umask, like the user's own)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, f"cannot swap {a} and {b}: {os.strerror(error)}")


def save_map(database: KeyframeDatabase, directory: Path | str, feature_config: dict[str, Any],
             global_descriptor: dict[str, Any]) -> Path:
    """Write ``database`` to the map directory ``directory``. ``feature_config``: the pipeline's FeatureConfig
    as a dict; ``global_descriptor``: kind, dim, codebook sha256. An existing map written here is replaced
    atomically; anything else in the way raises :class:`MapTargetError` (see :func:`check_save_target`)."""
    directory = Path(directory)
    descriptor_types = {k.descriptor_type for k in database.keyframes}
    if len(descriptor_types) > 1:
        raise ValueError(f"database mixes descriptor types {sorted(descriptor_types)}")
    check_save_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_directory(directory.parent, f".{directory.name}.tmp-")
    try:
        files = {}
        for name, array in _pack(database).items():
            data = _npy_bytes(array)
            _atomic_write_bytes(staging / f"{name}.npy", data)
            files[f"{name}.npy"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest = {
            "format": MAP_FORMAT, "format_version": MAP_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counts": {"keyframes": len(database), "keypoints": int(sum(len(k) for k in database.keyframes))},
            "descriptor_type": next(iter(descriptor_types), None),
            "feature_config": feature_config, "global_descriptor": global_descriptor | {"kind": database.kind,
                                                                                       "dim": database.global_dim},
            "retrieval": vars(database.config).copy(), "files": files,
        }
        _atomic_write_bytes(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(staging)
        # Checked again right before the swap: the target may have changed while the arrays were written.
        if check_save_target(directory) or directory.is_dir():
            if not _exchange(staging, directory):  # two renames: the old map moved aside, the new one in
                old = _fresh_directory(directory.parent, f".{directory.name}.old-")
                os.replace(directory, old)
                try:
                    os.replace(staging, directory)
                except OSError:
                    os.replace(old, directory)  # put the previous map back
                    raise
                staging = old
            shutil.rmtree(staging, ignore_errors=True)  # the previous map (ours, checked above) or an empty dir
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(directory.parent)
    return directory


def read_manifest(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MapFormatError(f"{directory} is not a map: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MapFormatError(f"{path} is corrupt (not JSON): {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MAP_FORMAT:
        raise MapFormatError(f"{path} is not a {MAP_FORMAT} manifest")
    if manifest.get("format_version") != MAP_FORMAT_VERSION:
        raise MapFormatError(f"{directory} has map format_version {manifest.get('format_version')!r}; this "
                             f"version of feature_matching_ros reads format_version {MAP_FORMAT_VERSION}")
    missing = [f"{name}.npy" for name in _ARRAYS if f"{name}.npy" not in manifest.get("files", {})]
    if missing:
        raise MapFormatError(f"{path} does not list {missing}")
    return manifest


# Settings that choose HOW features are computed, not WHICH: the backends give identical keypoints.
_IMPLEMENTATION_KEYS = frozenset({"orb_backend"})


def check_compatible(manifest: dict[str, Any], feature_config: dict[str, Any]) -> None:
    """Refuse a map whose features were extracted differently from the running pipeline."""
    stored = manifest.get("feature_config", {})
    differing = sorted(k for k in set(stored) | set(feature_config)
                       if k not in _IMPLEMENTATION_KEYS and stored.get(k) != feature_config.get(k))
    if differing:
        details = ", ".join(f"{k}: map={stored.get(k)!r} pipeline={feature_config.get(k)!r}" for k in differing)
        raise MapFormatError(f"map was built with a different feature config ({details}); rebuild the map or "
                             "run the pipeline with the map's features config")


def load_map(directory: Path | str, feature_config: dict[str, Any] | None = None,
             retrieval_config: RetrievalConfig | None = None) -> tuple[KeyframeDatabase, dict[str, Any]]:
    """Load and fully verify a map; returns (database, manifest). Checks the feature config when given."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if feature_config is not None:
        check_compatible(manifest, feature_config)
    arrays: dict[str, np.ndarray] = {}
    for name in _ARRAYS + tuple(name for name in _OPTIONAL_ARRAYS if f"{name}.npy" in manifest["files"]):
        entry = manifest["files"][f"{name}.npy"]
        path = directory / f"{name}.npy"
        if not path.is_file():
            raise MapFormatError(f"map file {path} is missing")
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            raise MapFormatError(f"map file {path} is truncated or extended: {len(data)} bytes, manifest says "
                                 f"{entry['bytes']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise MapFormatError(f"map file {path} is corrupt: sha256 does not match the manifest")
        try:
            arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as error:  # object arrays need pickle: refused
            raise MapFormatError(f"map file {path} cannot be read without pickle: {error}") from error
    return _unpack(arrays, manifest, retrieval_config), manifest


def _check_map_points(arrays: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    names = ("map_point_offsets", "map_point_pixels", "map_points")
    present = [name for name in names if name in arrays]
    if not present:
        return None
    if len(present) != len(names):
        raise MapFormatError(f"map has {present} but not all of {list(names)}")
    offsets, pixels, points = (arrays[name] for name in names)
    total = len(pixels)
    if offsets.shape != (n + 1,) or pixels.shape != (total, 2) or points.shape != (total, 3) or (
            n and (offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0))):
        raise MapFormatError(f"map point arrays are inconsistent: offsets {offsets.shape}, pixels {pixels.shape}, "
                             f"points {points.shape} for {n} keyframes")
    return offsets


def _unpack(arrays: dict[str, np.ndarray], manifest: dict[str, Any],
            retrieval_config: RetrievalConfig | None) -> KeyframeDatabase:
    n = int(manifest["counts"]["keyframes"])
    offsets = arrays["offsets"]
    total = int(manifest["counts"]["keypoints"])
    global_info = manifest["global_descriptor"]
    expected = {"ids": (n,), "stamps_ns": (n,), "offsets": (n + 1,), "keypoints": (total, 2), "scores": (total,),
                "depth_at_keypoints": (total,), "has_depth": (n,), "K": (n, 3, 3), "T_map_camera": (n, 4, 4),
                "has_pose": (n,), "image_sizes": (n, 2), "global_descriptors": (n, int(global_info["dim"]))}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise MapFormatError(f"map array {name} has shape {arrays[name].shape}, expected {shape}")
    if arrays["descriptors"].ndim != 2 or len(arrays["descriptors"]) != total:
        raise MapFormatError(f"map array descriptors has shape {arrays['descriptors'].shape}, expected ({total}, D)")
    if n and (offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0)):
        raise MapFormatError("map offsets are inconsistent with the keypoint count")
    if len(np.unique(arrays["ids"])) != n:
        raise MapFormatError("map has duplicate keyframe ids")
    retrieval = retrieval_config or RetrievalConfig(**manifest.get("retrieval", {}))
    database = KeyframeDatabase(global_info["kind"], int(global_info["dim"]), retrieval)
    descriptor_type = manifest.get("descriptor_type") or ""
    keyframes = []
    for i in range(n):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        keyframes.append(Keyframe(
            id=int(arrays["ids"][i]), stamp_ns=int(arrays["stamps_ns"][i]),
            keypoints=arrays["keypoints"][lo:hi].copy(), descriptors=arrays["descriptors"][lo:hi].copy(),
            scores=arrays["scores"][lo:hi].copy(), image_size=tuple(int(v) for v in arrays["image_sizes"][i]),
            descriptor_type=descriptor_type, K=arrays["K"][i].copy(),
            global_descriptor=arrays["global_descriptors"][i].copy(),
            T_map_camera=arrays["T_map_camera"][i].copy() if arrays["has_pose"][i] else None,
            depth_at_keypoints=arrays["depth_at_keypoints"][lo:hi].copy() if arrays["has_depth"][i] else None))
    for name in ("images", "depth_images"):
        if name in arrays and (arrays[name].ndim != 3 or len(arrays[name]) != n):
            raise MapFormatError(f"map array {name} has shape {arrays[name].shape}, expected ({n}, H, W)")
    map_point_offsets = _check_map_points(arrays, n)
    for i, keyframe in enumerate(keyframes):
        if "images" in arrays:
            keyframe.image = arrays["images"][i].copy()
        if "depth_images" in arrays and arrays["has_depth"][i]:
            keyframe.depth_image = arrays["depth_images"][i].copy()
        if map_point_offsets is not None and map_point_offsets[i + 1] > map_point_offsets[i]:
            lo, hi = int(map_point_offsets[i]), int(map_point_offsets[i + 1])
            keyframe.map_points = MapPoints(arrays["map_point_pixels"][lo:hi].copy(),
                                            arrays["map_points"][lo:hi].copy())
    database.add_many(keyframes)
    return database
