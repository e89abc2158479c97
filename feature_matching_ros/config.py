"""Configuration of the matching pipeline: one dataclass per component, validated at construction.

Invalid values fail early with a message naming the key and the allowed values, so a typo in a ROS
parameter file or on the command line stops the program at startup instead of at the first frame.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DETECTORS = ("orb", "orb_multiscale", "sift", "aliked", "disk", "xfeat")
# Where ORB single-scale keypoints are computed: OpenCV on the host, or torch on the pipeline's device
# (features/orb_torch.py, same keypoints); auto = torch on CUDA, where it runs beside the descriptor network.
ORB_BACKENDS = ("auto", "opencv", "torch")
DESCRIPTORS = ("native", "aliked", "disk", "xfeat", "sandesc")  # sandesc: our trained SANDESC, weights per detector
MATCHERS = ("lightglue", "nn", "eloftr", "loftr")
# Detector-free matchers take the two images, not keypoints: they return matched pixel pairs directly.
DENSE_MATCHERS = ("eloftr", "loftr")
LIGHTGLUE_WEIGHTS = ("default", "official", "agnostic")  # agnostic: our multi-detector fine-tune (ALIKED descriptors)
ELOFTR_MODES = ("full", "optimized")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
RANSAC_SAMPLING = ("confidence", "uniform")


class ConfigError(ValueError):
    """A configuration key has an invalid value."""


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number in [{low}, {high}]")
    if not low <= value <= high:
        raise ConfigError(f"{key}={value!r} is out of range; allowed: [{low}, {high}]")


@dataclass
class FeatureConfig:
    """Which keypoints to detect and how to describe them (decoupled: any detector x any descriptor)."""

    detector: str = "orb"
    descriptor: str = "aliked"  # "native" = the detector's own descriptor
    max_keypoints: int = 1024
    nms_radius: int = 4  # px; minimum distance between two ORB single-scale keypoints
    resize_max: int = 1024  # longest image side fed to the networks; 0 keeps the input size
    orb_backend: str = "auto"  # detector=orb: opencv, torch or auto (torch on CUDA); see ORB_BACKENDS

    def __post_init__(self) -> None:
        _check_choice("detector", self.detector, DETECTORS)
        _check_choice("orb_backend", self.orb_backend, ORB_BACKENDS)
        _check_choice("descriptor", self.descriptor, DESCRIPTORS)
        _check_range("max_keypoints", self.max_keypoints, 1, 100_000)
        _check_range("nms_radius", self.nms_radius, 0, 64)
        _check_range("resize_max", self.resize_max, 0, 8192)
        self.max_keypoints, self.nms_radius, self.resize_max = (
            int(self.max_keypoints), int(self.nms_radius), int(self.resize_max))

    @property
    def descriptor_network(self) -> str:
        """The network or algorithm that actually computes the descriptors."""
        if self.descriptor != "native":
            return self.descriptor
        return {"orb_multiscale": "orb"}.get(self.detector, self.detector)


@dataclass
class MatcherConfig:
    name: str = "lightglue"
    # "default": the best weights this package has for the matcher (official LightGlue; our synthetic-trained
    # Efficient LoFTR). LightGlue also takes "official" or "agnostic"; eloftr and loftr take a checkpoint path
    # (the official eloftr_outdoor.ckpt / loftr_outdoor.ckpt, or a file from `fmr train eloftr`).
    weights: str = "default"
    filter_threshold: float = 0.1  # LightGlue match confidence threshold
    depth_confidence: float = 0.95  # LightGlue early exit; -1 disables
    width_confidence: float = 0.99  # LightGlue point pruning (single pairs only); -1 disables
    ratio_test: float = 0.9  # nearest-neighbour ratio test; 1.0 disables
    max_hamming: int = 64  # nearest-neighbour: reject binary matches farther than this many bits
    cuda_graphs: bool = True  # LightGlue and Efficient LoFTR on CUDA: replay captured graphs per input shape
    # LightGlue: batches of up to this many candidates are padded to graph shapes (launch-bound, padding is cheap);
    # larger ones take graphs only when no padding is needed, else run eager (matchers/lightglue.py docstring).
    cuda_graph_max_batch: int = 16
    eloftr_mode: str = "full"  # "optimized" skips the coarse dual-softmax (paper: ~1 AUC point, ~25% faster)
    coarse_threshold: float = 0.2  # eloftr / loftr: coarse match confidence threshold

    def __post_init__(self) -> None:
        _check_choice("matcher", self.name, MATCHERS)
        if self.name == "lightglue":
            _check_choice("weights", self.weights, LIGHTGLUE_WEIGHTS)
        elif not isinstance(self.weights, str) or not self.weights:
            raise ConfigError(f"weights={self.weights!r} must be 'default' or a checkpoint path")
        _check_choice("eloftr_mode", self.eloftr_mode, ELOFTR_MODES)
        _check_range("coarse_threshold", self.coarse_threshold, 0.0, 1.0)
        _check_range("cuda_graph_max_batch", self.cuda_graph_max_batch, 0, 4096)
        _check_range("filter_threshold", self.filter_threshold, 0.0, 1.0)
        for key in ("depth_confidence", "width_confidence"):
            value = getattr(self, key)
            if value != -1:
                _check_range(key, value, 0.0, 1.0)
        _check_range("ratio_test", self.ratio_test, 0.0, 1.0)
        _check_range("max_hamming", self.max_hamming, 0, 256)


@dataclass
class PoseConfig:
    ransac_threshold_px: float = 1.0  # essential matrix: Sampson error threshold in pixels
    pnp_threshold_px: float = 3.0  # PnP and Sim3: reprojection error threshold in pixels
    confidence: float = 0.9999
    max_iterations: int = 10_000
    # How the essential-matrix RANSAC draws minimal samples: "confidence" tries the matcher's most confident
    # matches first (PROSAC); "uniform" draws from all matches alike (for matchers whose scores do not rank
    # matches). The homography test and PnP sample uniformly (geometry/pose.py says why).
    sampling: str = "confidence"
    # The lowest inlier ratio (inliers / matches) the caller accepts: RANSAC stops once it is `confidence` sure that
    # no model with this ratio exists (geometry/pose.py: ransac_iterations) instead of running max_iterations on a
    # pair it would reject anyway. 0: no floor, search up to max_iterations. The engine raises it to its own
    # min_inlier_ratio (EngineConfig.ransac_floor). PnP uses min_inlier_ratio; the essential matrix and homography
    # (1 px Sampson threshold, lower ratios on real cameras) use min_inlier_ratio_monocular.
    min_inlier_ratio: float = 0.0
    min_inlier_ratio_monocular: float = 0.0
    min_matches: int = 15
    min_inliers: int = 15
    homography_ratio: float = 0.8  # H inliers / E inliers above which the pair is planar or pure rotation
    min_depth: float = 0.05  # metres; depth outside [min_depth, max_depth] counts as invalid
    max_depth: float = 100.0
    # Backend map points (monocular Sim3): a matched pixel takes the 3D of the nearest backend keypoint within
    # this radius (one-to-one). A backend's keypoints come from its own pyramid (ORB-SLAM3: 8 levels x 1.2), so
    # the same corner lands within a pixel or two of ours.
    map_point_radius_px: float = 2.0
    # A Sim3 whose scale its own information leaves less certain than this (1 sigma of log-scale, ~relative) does
    # not measure the scale (points far away or on one plane, few 3D-3D inliers): the pair is verified by the
    # essential matrix instead, which says "scale unknown" exactly.
    sim3_max_scale_sigma: float = 0.05

    def __post_init__(self) -> None:
        _check_range("map_point_radius_px", self.map_point_radius_px, 0.0, 50.0)
        _check_range("sim3_max_scale_sigma", self.sim3_max_scale_sigma, 0.0, 10.0)
        _check_range("ransac_threshold_px", self.ransac_threshold_px, 0.01, 50.0)
        _check_range("pnp_threshold_px", self.pnp_threshold_px, 0.01, 50.0)
        _check_range("confidence", self.confidence, 0.5, 0.999999)
        _check_range("max_iterations", self.max_iterations, 10, 1_000_000)
        _check_choice("sampling", self.sampling, RANSAC_SAMPLING)
        _check_range("min_inlier_ratio", self.min_inlier_ratio, 0.0, 1.0)
        _check_range("min_inlier_ratio_monocular", self.min_inlier_ratio_monocular, 0.0, 1.0)
        _check_range("min_matches", self.min_matches, 5, 100_000)
        _check_range("min_inliers", self.min_inliers, 5, 100_000)
        _check_range("homography_ratio", self.homography_ratio, 0.0, 1.0)
        _check_range("min_depth", self.min_depth, 0.0, 1e6)
        _check_range("max_depth", self.max_depth, self.min_depth, 1e9)


@dataclass
class PipelineConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    device: str = "auto"  # "auto" picks cuda when available
    precision: str = "auto"  # "auto": fp16 on CUDA (LightGlue 2x faster, same matches), fp32 on CPU

    def __post_init__(self) -> None:
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        if self.matcher.name == "lightglue":
            # LightGlue weights exist for ALIKED, DISK and XFeat descriptors, at any detector's keypoints.
            usable = {"aliked", "disk", "xfeat"}
            if self.features.descriptor_network not in usable:
                raise ConfigError(
                    f"matcher=lightglue has no weights for {self.features.descriptor_network} descriptors "
                    f"(detector={self.features.detector}, descriptor={self.features.descriptor}); "
                    "use descriptor=aliked, disk or xfeat with this detector, or matcher=nn"
                )
            if self.matcher.weights == "agnostic" and self.features.descriptor_network != "aliked":
                raise ConfigError(
                    f"weights=agnostic is LightGlue fine-tuned on ALIKED descriptors; got descriptor="
                    f"{self.features.descriptor_network} (use descriptor=aliked or weights=official)"
                )

    @property
    def detector_free(self) -> bool:
        """True when the matcher works on image pairs (the features only serve retrieval)."""
        return self.matcher.name in DENSE_MATCHERS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        """Build from a nested dict (YAML, JSON); unknown keys are errors, not silently ignored."""
        sections = {"features": FeatureConfig, "matcher": MatcherConfig, "pose": PoseConfig}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                section_cls = sections[key]
                known = {f.name for f in fields(section_cls)}
                unknown = set(value) - known
                if unknown:
                    raise ConfigError(f"unknown keys in {key}: {sorted(unknown)}; allowed: {sorted(known)}")
                kwargs[key] = section_cls(**value)
            elif key in ("device", "precision"):
                kwargs[key] = value
            else:
                raise ConfigError(f"unknown config key {key!r}; allowed: features, matcher, pose, device, precision")
        return cls(**kwargs)
