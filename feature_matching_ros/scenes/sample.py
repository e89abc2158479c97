"""The README's sample sequence: generated on first use (about a minute on 2 CPU cores), then reused.

Not shipped in the repository: 300 raw 640x480 rgb8 + 32FC1 frames make a ~650 MB bag, while the
generator plus textures are ~3 MB and reproduce it exactly from the seed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

LOG = logging.getLogger(__name__)
SAMPLE_PARAMETERS = {"scene": "office", "frames": 300, "seed": 0, "storage": "mcap", "width": 640, "height": 480}
SAMPLE_DIR_ENV = "FMR_SAMPLE_DIR"


def default_sample_dir() -> Path:
    if os.environ.get(SAMPLE_DIR_ENV):
        return Path(os.environ[SAMPLE_DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "feature_matching_ros" / "sample_office"


def _is_complete(directory: Path, parameters: dict) -> bool:
    meta_path = directory / "sequence.json"
    if not (meta_path.is_file() and (directory / "loops.json").is_file() and (directory / "bag" / "metadata.yaml").is_file()):
        return False
    from feature_matching_ros.scenes.sequence import GENERATOR_VERSION

    meta = json.loads(meta_path.read_text())
    return meta.get("generator_version") == GENERATOR_VERSION and all(meta.get(k) == v for k, v in parameters.items())


def ensure_sample_sequence(directory: Path | str | None = None, **overrides) -> Path:
    """Path of the sample bag in ``directory`` (default: $FMR_SAMPLE_DIR or ~/.cache/feature_matching_ros/...),
    generating it (``fmr make-sequence`` defaults: office, 300 frames, seed 0, 640x480, mcap) if missing or stale.
    ``overrides`` change those parameters (e.g. frames=100 for a quicker demo). loops.json and
    sequence.json lie next to the returned bag directory."""
    from feature_matching_ros.scenes.sequence import generate_sequence

    unknown = set(overrides) - set(SAMPLE_PARAMETERS)
    if unknown:
        raise ValueError(f"unknown sample parameter(s) {sorted(unknown)}; allowed: {sorted(SAMPLE_PARAMETERS)}")
    parameters = SAMPLE_PARAMETERS | overrides
    directory = Path(directory) if directory is not None else default_sample_dir()
    if _is_complete(directory, parameters):
        return directory / "bag"
    LOG.info("generating the sample sequence in %s (about a minute on 2 cores)", directory)
    return generate_sequence(directory, overwrite=True, **parameters)
