"""Stable codes for the engine's reasons, for counters and diagnostics keys.

The engine explains every verdict in a sentence with the values that decided it ("inlier ratio 0.44 <
min_inlier_ratio=0.5"). Those sentences go to the log and to LoopClosure.reason; counters and diagnostics keys
need a small, fixed vocabulary instead, so a reason is mapped to a :class:`ReasonCode` by the prefix the engine
always starts it with. Verification failures are wrapped as "geometric verification failed: <pose reason>" and
keep the code of the pose reason. A reason no prefix knows maps to ``other`` (test_reason_codes.py scans the
engine's sources so that a new reason without a code fails a test rather than a dashboard).

Backend map points of a keyframe (Keyframe.map_points) that cannot be used are rejected on their own -- the keyframe
is processed without them -- and counted as ``rejected.<code>`` with the ``map_points_*`` codes, mapped the same way
from the converter's sentences (bag/convert.py ``msg_to_map_points``, ros/conversions.py ``cloud_to_map_points``;
test_reason_codes.py scans those too).
"""

from __future__ import annotations

from enum import Enum


class ReasonCode(str, Enum):
    OK = "ok"
    # geometric verification (geometry/pose.py and the engine's PnP)
    TOO_FEW_MATCHES = "too_few_matches"
    SUPPORT_OUT_OF_REACH = "support_out_of_reach"  # fewer matches than the inliers required: not verified
    TOO_FEW_DEPTH_MATCHES = "too_few_depth_matches"
    PNP_FAILED = "pnp_failed"
    TOO_FEW_PNP_INLIERS = "too_few_pnp_inliers"
    ESSENTIAL_FAILED = "essential_failed"
    TOO_FEW_ESSENTIAL_INLIERS = "too_few_essential_inliers"
    TOO_FEW_HOMOGRAPHY_INLIERS = "too_few_homography_inliers"
    TOO_FEW_3D_MATCHES = "too_few_3d_matches"
    SIM3_FAILED = "sim3_failed"
    TOO_FEW_SIM3_INLIERS = "too_few_sim3_inliers"
    DEGENERATE = "degenerate_geometry"
    CHEIRALITY = "behind_cameras"
    NO_KEYPOINTS = "no_keypoints"
    OUT_OF_MEMORY = "out_of_memory"
    # acceptance checks
    TOO_FEW_INLIERS = "too_few_inliers"
    LOW_INLIER_RATIO = "low_inlier_ratio"
    INLIERS_CLUSTERED = "inliers_clustered"
    LARGE_RESIDUALS = "large_residuals"
    DEPTH_INCONSISTENT = "depth_inconsistent"
    SCENE_INCONSISTENT = "scene_inconsistent"
    ODOMETRY_INCONSISTENT = "odometry_inconsistent"
    AMBIGUOUS = "ambiguous"
    AWAITING_CONSISTENCY = "awaiting_consistency"
    WEAKER_CANDIDATE = "weaker_candidate"
    SCALE_UNKNOWN = "scale_unknown"
    # keyframe / relocalization outcomes
    MAP_EMPTY = "map_empty"
    NO_POSED_KEYFRAME = "no_posed_keyframe"
    NO_ELIGIBLE_CANDIDATES = "no_eligible_candidates"
    NO_CANDIDATES = "no_candidates"
    NO_CANDIDATE_VERIFIED = "no_candidate_verified"
    # backend map points of a keyframe, rejected while the keyframe is processed without them
    MAP_POINTS_MISSING_FIELDS = "map_points_missing_fields"
    MAP_POINTS_SIZE_MISMATCH = "map_points_size_mismatch"
    MAP_POINTS_NOT_FINITE = "map_points_not_finite"
    MAP_POINTS_OUTSIDE_IMAGE = "map_points_outside_image"
    OTHER = "other"


VERIFICATION_FAILED = "geometric verification failed: "

# (prefix, code), longest prefixes first where one prefix starts another ("too few matches with valid depth"
# before "too few matches").
_PREFIXES: tuple[tuple[str, ReasonCode], ...] = (
    ("ok", ReasonCode.OK),
    ("too few matches with valid depth", ReasonCode.TOO_FEW_DEPTH_MATCHES),
    ("too few matches with 3D on both sides", ReasonCode.TOO_FEW_3D_MATCHES),
    ("too few matches for the required support", ReasonCode.SUPPORT_OUT_OF_REACH),
    ("too few matches", ReasonCode.TOO_FEW_MATCHES),
    ("PnP RANSAC found no pose", ReasonCode.PNP_FAILED),
    ("too few PnP inliers", ReasonCode.TOO_FEW_PNP_INLIERS),
    ("essential matrix estimation failed", ReasonCode.ESSENTIAL_FAILED),
    ("too few essential-matrix inliers", ReasonCode.TOO_FEW_ESSENTIAL_INLIERS),
    ("too few homography inliers", ReasonCode.TOO_FEW_HOMOGRAPHY_INLIERS),
    ("Sim3 RANSAC", ReasonCode.SIM3_FAILED),
    ("Sim3 inliers are degenerate", ReasonCode.SIM3_FAILED),
    ("too few Sim3 inliers", ReasonCode.TOO_FEW_SIM3_INLIERS),
    ("degenerate", ReasonCode.DEGENERATE),
    ("too few inliers in front of both cameras", ReasonCode.CHEIRALITY),
    ("no keypoints", ReasonCode.NO_KEYPOINTS),
    ("GPU out of memory", ReasonCode.OUT_OF_MEMORY),
    ("too few inliers", ReasonCode.TOO_FEW_INLIERS),
    ("inlier ratio", ReasonCode.LOW_INLIER_RATIO),
    ("inliers clustered", ReasonCode.INLIERS_CLUSTERED),
    ("reprojection residuals too large", ReasonCode.LARGE_RESIDUALS),
    ("depth inconsistent", ReasonCode.DEPTH_INCONSISTENT),
    ("scene inconsistent", ReasonCode.SCENE_INCONSISTENT),
    ("inconsistent with odometry", ReasonCode.ODOMETRY_INCONSISTENT),
    ("ambiguous", ReasonCode.AMBIGUOUS),
    ("awaiting temporal consistency", ReasonCode.AWAITING_CONSISTENCY),
    ("another candidate of this keyframe has more inliers", ReasonCode.WEAKER_CANDIDATE),
    ("no depth in the image or the keyframe", ReasonCode.SCALE_UNKNOWN),
    ("map is empty", ReasonCode.MAP_EMPTY),
    ("database empty", ReasonCode.MAP_EMPTY),
    ("no keyframe with a pose in the map", ReasonCode.NO_POSED_KEYFRAME),
    ("no eligible candidates", ReasonCode.NO_ELIGIBLE_CANDIDATES),
    ("no candidates", ReasonCode.NO_CANDIDATES),
    ("no candidate verified", ReasonCode.NO_CANDIDATE_VERIFIED),
    ("map point cloud lacks", ReasonCode.MAP_POINTS_MISSING_FIELDS),
    ("map point cloud size", ReasonCode.MAP_POINTS_SIZE_MISMATCH),
    ("map points contain NaN", ReasonCode.MAP_POINTS_NOT_FINITE),
    ("map point pixels outside the image", ReasonCode.MAP_POINTS_OUTSIDE_IMAGE),
)

MAP_POINTS_CODES = frozenset(code for code in ReasonCode if code.value.startswith("map_points_"))


def reason_code(reason: str) -> ReasonCode:
    """The stable code of an engine reason sentence (``other`` when no known prefix matches)."""
    text = reason.strip()
    if text.startswith(VERIFICATION_FAILED):
        text = text[len(VERIFICATION_FAILED):]
    for prefix, code in _PREFIXES:
        if text.startswith(prefix):
            return code
    return ReasonCode.OTHER
