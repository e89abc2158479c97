"""Engine configuration: retrieval, acceptance thresholds, consistency and the odometry gate (one dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from feature_matching_ros.config import ConfigError, _check_choice, _check_range
from feature_matching_ros.retrieval.database import RetrievalConfig

GLOBAL_DESCRIPTORS = ("auto", "vlad", "bow")


@dataclass
class EngineConfig:
    global_descriptor: str = "auto"  # auto: bow for binary (ORB) descriptors, vlad otherwise
    codebook: str = "default"  # path to a codebook .npz, or "default" = the shipped one for the descriptor
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    # Support, relative to what the pair can show: inliers >= max(min_inliers, min_inlier_fraction x the smaller
    # keyframe's keypoint count) (pixel matchers: x the smaller image's coarse 8x8 cells), and inliers / matches
    # >= min_inlier_ratio (PnP, Sim3: 3D points, 3 px reprojection threshold) or min_inlier_ratio_monocular
    # (essential matrix / homography: 1 px Sampson threshold). min_inliers is the statistical floor of a 5-point
    # / PnP RANSAC, not a tuning knob. Real cameras set the ratios: true loops of a hand-held RGB-D camera (TUM,
    # Kinect depth, motion blur, rolling shutter) keep 24-59 % of their matches within 3 px under PnP, and true
    # monocular loops 15-60 % within 1 px; random consensus above the support floor is already negligible, and
    # 0.25 is also COLMAP's two-view default. Wrong places that verify (repeated structure) do so with high
    # ratios: the later checks are what stop them.
    min_inliers: int = 20
    min_inlier_fraction: float = 0.05
    min_inlier_ratio: float = 0.3
    min_inlier_ratio_monocular: float = 0.25
    # RANSAC looks for models down to the inlier-ratio floors only (PoseConfig.min_inlier_ratio, and the monocular
    # floor for the essential matrix / homography): a pair without one is rejected after a few hundred
    # iterations instead of 10,000; its verdict is the same rejection.
    ransac_floor: bool = True
    # ORB-SLAM style: accept only when N consecutive queries verify keyframes near the same place (1 = off).
    temporal_consistency: int = 3
    consistency_window: int = 5  # "same place": verified candidates within this many keyframes of each other
    max_loops_per_keyframe: int = 1  # accepted loops reported per query (best inlier counts first)
    # Candidates of one keyframe are verified in parallel threads (OpenCV's RANSAC and PnP release the GIL);
    # 0 = auto (half the cores, at most 4: engine/verification.py), 1 = one after the other. Verdicts do not depend
    # on it.
    verification_threads: int = 0
    store_depth: bool = True  # keep depth at keypoints for PnP when a depth image is given
    # Inlier spread: the inliers must occupy at least this fraction of a coverage_grid x coverage_grid grid in
    # BOTH images. One repeated poster or a tiled patch gives a tight cluster of (consistent) inliers.
    min_inlier_coverage: float = 0.25
    coverage_grid: int = 4
    # Depth consistency (PnP, both keyframes with depth): the PnP pose predicts the depth of every inlier in the
    # other camera; at least this fraction must agree with the depth measured there (|dz| <= rel*z + abs).
    # A pose explained by the wrong structure (mirror-symmetric room, wall one tile over) predicts wrong depths.
    min_depth_agreement: float = 0.7
    depth_tolerance_rel: float = 0.1
    depth_tolerance_abs_m: float = 0.1
    # Scene agreement (PnP, both keyframes with depth): ALL query keypoints with depth, moved into the match camera,
    # must land next to (scene_radius_ratio x image diagonal) match keypoints of the same depth, for at least this
    # fraction of those that land next to one. Inliers on a repeated poster agree; the room around it does not,
    # and neither does a pose pulled a few degrees off by wrong inliers (correct poses: >= 0.83 on rendered
    # office pairs, where a 0.7 m / 5 deg-off pose left 0.61).
    min_scene_agreement: float = 0.7
    scene_radius_ratio: float = 0.012
    # Reprojection residuals: the median inlier residual after refinement must stay below this fraction of the
    # PnP RANSAC threshold (a correct pose sits at the noise level; a forced one spreads over the whole band).
    # Real RGB-D noise puts correct poses at a 1.2-2.0 px median within the 3 px band (TUM), hence 0.65.
    max_median_residual_ratio: float = 0.65
    # Ambiguity: if two candidates that pass every check put the query at places that disagree (beyond the
    # odometry allowance between them) and the weaker has >= ambiguity_ratio x the stronger's inliers, both are
    # rejected: the scene looks the same in two places (repetitive texture). 1.0 disables it.
    ambiguity_ratio: float = 0.7
    # Odometry-consistency gate (needs backend poses on both keyframes and a metric or Sim3 loop). The loop is compared
    # with the relative pose predicted by composing odometry (and previously accepted loops) along the SHORTEST
    # path between the two keyframes in the keyframe graph, and may disagree by at most
    # abs + ratio * (length of that path): the odometry's drift model (set it to your odometry's drift spec).
    # Accepted loops shorten the paths, so after the first closure the gate tightens to the drift since then,
    # as a backend's marginal covariance would. Repetitive textures verify with a pose one period away.
    odometry_gate: bool = True
    # Defaults: translation within 3 % of the distance travelled (visual(-inertial) odometry of the ORB-SLAM3
    # class, with margin), heading within 0.5 deg per metre (gyro-less odometry drifts in heading first: true loops
    # on rendered sequences with a deliberately poor odometry drifted <= 0.34 deg/m over 10-300 m paths, while
    # false loops in look-alike corridors contradicted it by 0.4-1 deg/m; a wrong place one period over can keep
    # the heading right, so translation is the gate that matters where it exists). Monocular loops
    # (scale unknown) are gated on rotation only.
    max_drift_abs_m: float = 0.25
    max_drift_ratio: float = 0.03
    max_drift_abs_deg: float = 5.0
    max_drift_deg_per_m: float = 0.5
    # Rotation drift also grows with the rotation turned (gyro and visual-odometry rotation errors scale with the
    # angle, not the distance): a hand-held camera that looked around on the spot drifts in rotation with no metres.
    # Applied to loops with a translation (PnP, Sim3), which the translation allowance still holds; an
    # essential-matrix loop keeps the distance-only rotation allowance, its only gate.
    max_drift_ratio_of_turn: float = 0.02

    def __post_init__(self) -> None:
        _check_choice("global_descriptor", self.global_descriptor, GLOBAL_DESCRIPTORS)
        if isinstance(self.retrieval, dict):
            known = {f.name for f in fields(RetrievalConfig)}
            unknown = set(self.retrieval) - known
            if unknown:
                raise ConfigError(f"unknown keys in engine.retrieval: {sorted(unknown)}; allowed: {sorted(known)}")
            self.retrieval = RetrievalConfig(**self.retrieval)
        _check_range("min_inliers", self.min_inliers, 5, 100_000)
        _check_range("min_inlier_fraction", self.min_inlier_fraction, 0.0, 1.0)
        _check_range("min_scene_agreement", self.min_scene_agreement, 0.0, 1.0)
        _check_range("scene_radius_ratio", self.scene_radius_ratio, 0.0, 0.5)
        _check_range("min_inlier_ratio", self.min_inlier_ratio, 0.0, 1.0)
        _check_range("min_inlier_ratio_monocular", self.min_inlier_ratio_monocular, 0.0, 1.0)
        _check_range("temporal_consistency", self.temporal_consistency, 1, 100)
        _check_range("consistency_window", self.consistency_window, 0, 100_000)
        _check_range("max_loops_per_keyframe", self.max_loops_per_keyframe, 1, 100)
        _check_range("verification_threads", self.verification_threads, 0, 256)
        _check_range("min_inlier_coverage", self.min_inlier_coverage, 0.0, 1.0)
        _check_range("coverage_grid", self.coverage_grid, 1, 64)
        _check_range("min_depth_agreement", self.min_depth_agreement, 0.0, 1.0)
        _check_range("depth_tolerance_rel", self.depth_tolerance_rel, 0.0, 10.0)
        _check_range("depth_tolerance_abs_m", self.depth_tolerance_abs_m, 0.0, 1e3)
        _check_range("max_median_residual_ratio", self.max_median_residual_ratio, 0.0, 1.0)
        _check_range("ambiguity_ratio", self.ambiguity_ratio, 0.0, 1.0)
        _check_range("max_drift_abs_m", self.max_drift_abs_m, 0.0, 1e6)
        _check_range("max_drift_ratio", self.max_drift_ratio, 0.0, 100.0)
        _check_range("max_drift_abs_deg", self.max_drift_abs_deg, 0.0, 180.0)
        _check_range("max_drift_deg_per_m", self.max_drift_deg_per_m, 0.0, 180.0)
        _check_range("max_drift_ratio_of_turn", self.max_drift_ratio_of_turn, 0.0, 1.0)
        self.min_inliers, self.temporal_consistency = int(self.min_inliers), int(self.temporal_consistency)
        self.consistency_window, self.max_loops_per_keyframe = int(self.consistency_window), int(
            self.max_loops_per_keyframe)
        self.coverage_grid = int(self.coverage_grid)
        self.verification_threads = int(self.verification_threads)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown engine keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["retrieval"] = vars(self.retrieval).copy()
        return out
