"""Real photo textures for the scene renderer and the homography training pairs.

Why a shipped set: the renderer needs the *same* pixels on every machine so that a seed gives the same
sequence everywhere, and a fresh machine has no opencv-doc. So ``resource/textures/`` holds a compact,
re-encoded copy (JPEG, longest side <= 640 px, ~2-3 MB in all) of public-domain / permissively licensed
photos from scikit-image's bundled data and OpenCV's ``samples/data`` (Debian ``opencv-doc``). The
manifest ``textures.json`` next to them records each file's origin, licence and *roles* (which surfaces a
scene builder may put it on). ``build_texture_set`` regenerates the folder from those two sources;
it is only needed by maintainers (``python -m feature_matching_ros.scenes.textures OUT``).

At load time each texture becomes a float32 mip pyramid (linear-ish 0..1 RGB, level 0 = full size,
each further level half the size with area averaging) that the ray caster samples trilinearly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

TEXTURE_DIR_ENV = "FMR_TEXTURE_DIR"
MANIFEST_NAME = "textures.json"
OPENCV_DATA_DIR = Path("/usr/share/doc/opencv-doc/examples/data")

# (name, source, file, roles, licence note). Roles: wall, floor, ceiling, poster, facade, ground, object.
# Licences: scikit-image's documentation of ``skimage.data`` (each function's docstring) and Debian's
# copyright file for opencv (samples/data falls under ``Files: *``, Apache-2.0).
_SKIMAGE_LICENCE = "scikit-image data: public domain / CC0 per skimage.data docstrings"
_OPENCV_LICENCE = "OpenCV samples/data as shipped in Debian opencv-doc (Apache-2.0 per debian/copyright)"
TEXTURE_SOURCES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("astronaut", "skimage", "astronaut", ("poster",)),
    ("camera", "skimage", "camera", ("poster",)),
    ("chelsea", "skimage", "chelsea", ("poster", "object")),
    ("coffee", "skimage", "coffee", ("poster", "object")),
    ("rocket", "skimage", "rocket", ("poster",)),
    ("brick", "skimage", "brick", ("wall", "facade")),
    ("grass", "skimage", "grass", ("ground",)),
    ("gravel", "skimage", "gravel", ("ground", "floor")),
    ("moon", "skimage", "moon", ("ceiling", "wall")),
    ("page", "skimage", "page", ("poster",)),
    ("coins", "skimage", "coins", ("poster",)),
    ("motorcycle", "skimage", "stereo_motorcycle", ("poster", "object")),
    ("hubble", "skimage", "hubble_deep_field", ("poster",)),
    ("ihc", "skimage", "immunohistochemistry", ("poster", "object")),
    ("building", "opencv", "building.jpg", ("facade",)),
    ("home", "opencv", "home.jpg", ("facade",)),
    ("leuven", "opencv", "leuvenA.jpg", ("facade",)),
    ("graffiti", "opencv", "graf1.png", ("facade", "wall")),
    ("aero", "opencv", "aero1.jpg", ("poster", "ground")),
    ("baboon", "opencv", "baboon.jpg", ("poster",)),
    ("fruits", "opencv", "fruits.jpg", ("poster", "object")),
    ("starry_night", "opencv", "starry_night.jpg", ("poster",)),
    ("stuff", "opencv", "stuff.jpg", ("object",)),
    ("box_in_scene", "opencv", "box_in_scene.png", ("object", "poster")),
    ("butterfly", "opencv", "butterfly.jpg", ("poster",)),
    ("apple", "opencv", "apple.jpg", ("object",)),
    ("orange", "opencv", "orange.jpg", ("object",)),
    ("messi", "opencv", "messi5.jpg", ("poster",)),
    ("squirrel", "opencv", "squirrel_cls.jpg", ("poster",)),
    ("board", "opencv", "board.jpg", ("object", "poster")),
    ("rubberwhale", "opencv", "rubberwhale1.png", ("object",)),
    ("basketball", "opencv", "basketball1.png", ("poster",)),
    ("aloe", "opencv", "aloeL.jpg", ("object", "poster")),
    ("smarties", "opencv", "smarties.png", ("object",)),
    ("sudoku", "opencv", "sudoku.png", ("poster",)),
    ("chessboard_photo", "opencv", "left01.jpg", ("poster",)),
    ("licenseplate", "opencv", "licenseplate_motion.jpg", ("poster",)),
    ("cards", "opencv", "cards.png", ("object",)),
    ("ela", "opencv", "ela_original.jpg", ("poster", "facade")),
    ("chicky", "opencv", "chicky_512.png", ("poster",)),
)


def _load_source_rgb(source: str, file: str) -> np.ndarray:
    """Read one original photo as uint8 RGB (H, W, 3)."""
    if source == "skimage":
        import skimage.data

        image = getattr(skimage.data, file)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
    elif source == "opencv":
        import cv2

        path = OPENCV_DATA_DIR / file
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"{path} missing: apt-get install opencv-doc to rebuild the texture set")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    else:
        raise ValueError(f"unknown texture source {source!r}")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def build_texture_set(out_dir: Path, max_side: int = 640, jpeg_quality: int = 90) -> Path:
    """Re-encode TEXTURE_SOURCES into ``out_dir`` (JPEGs + textures.json). Maintainer tool."""
    import cv2

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, source, file, roles in TEXTURE_SOURCES:
        rgb = _load_source_rgb(source, file)
        scale = min(1.0, max_side / max(rgb.shape[:2]))
        if scale < 1.0:
            size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        path = out_dir / f"{name}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        entries.append(
            {
                "name": name,
                "file": path.name,
                "origin": f"skimage.data.{file}" if source == "skimage" else f"opencv samples/data/{file}",
                "licence": _SKIMAGE_LICENCE if source == "skimage" else _OPENCV_LICENCE,
                "roles": list(roles),
                "size": [int(rgb.shape[1]), int(rgb.shape[0])],
            }
        )
    (out_dir / MANIFEST_NAME).write_text(json.dumps(entries, indent=1) + "\n")
    return out_dir


def texture_dir() -> Path:
    """The shipped texture folder: $FMR_TEXTURE_DIR, the source tree's resource/textures, or the installed share/."""
    candidates = []
    if os.environ.get(TEXTURE_DIR_ENV):
        candidates.append(Path(os.environ[TEXTURE_DIR_ENV]))
    candidates.append(Path(__file__).resolve().parents[2] / "resource" / "textures")
    import sys

    candidates.append(Path(sys.prefix) / "share" / "feature_matching_ros" / "resource" / "textures")
    for candidate in candidates:
        if (candidate / MANIFEST_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        "texture set not found; looked in " + ", ".join(str(c) for c in candidates)
        + f" (set {TEXTURE_DIR_ENV} or rebuild with `python -m feature_matching_ros.scenes.textures DIR`)"
    )


@dataclass(frozen=True)
class TextureInfo:
    name: str
    file: str
    origin: str
    licence: str
    roles: tuple[str, ...]


@lru_cache(maxsize=1)
def texture_catalog() -> dict[str, TextureInfo]:
    """All shipped textures by name, in manifest order."""
    entries = json.loads((texture_dir() / MANIFEST_NAME).read_text())
    return {
        e["name"]: TextureInfo(e["name"], e["file"], e["origin"], e["licence"], tuple(e["roles"])) for e in entries
    }


def textures_with_role(role: str) -> list[str]:
    names = [n for n, info in texture_catalog().items() if role in info.roles]
    if not names:
        raise ValueError(f"no texture has role {role!r}")
    return names


@lru_cache(maxsize=64)
def load_texture_rgb(name: str) -> np.ndarray:
    """uint8 RGB (H, W, 3) of a shipped texture."""
    import cv2

    catalog = texture_catalog()
    if name not in catalog:
        raise KeyError(f"unknown texture {name!r}; known: {', '.join(catalog)}")
    bgr = cv2.imread(str(texture_dir() / catalog[name].file), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read texture file for {name!r}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb.setflags(write=False)
    return rgb


@dataclass
class MipTexture:
    """Float32 RGB mip pyramid; ``levels[k]`` has shape (H_k, W_k, 3), values in [0, 1]."""

    name: str
    levels: list[np.ndarray] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.levels[0].shape[1]

    @property
    def height(self) -> int:
        return self.levels[0].shape[0]


@lru_cache(maxsize=64)
def load_mip_texture(name: str, min_side: int = 4) -> MipTexture:
    """Mip pyramid by repeated 2x area averaging (odd sizes are resized, so texel centres stay aligned)."""
    import cv2

    level = load_texture_rgb(name).astype(np.float32) / 255.0
    levels = [level]
    while min(level.shape[:2]) >= 2 * min_side:
        size = (max(1, level.shape[1] // 2), max(1, level.shape[0] // 2))
        level = cv2.resize(level, size, interpolation=cv2.INTER_AREA)
        levels.append(level)
    return MipTexture(name, levels)


def split_of_texture(name: str, eval_fraction: float = 0.25) -> str:
    """'train' or 'eval' from a stable hash of the texture name (the homography-pair split rule)."""
    digest = hashlib.sha256(name.encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "little") / 2**32 < eval_fraction else "train"


if __name__ == "__main__":
    import sys

    target = build_texture_set(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("resource/textures"))
    print(f"wrote {target}")
