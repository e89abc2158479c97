"""The loop-closure and relocalization engine: keyframes in, LoopClosure / Relocalization records out.

Written here because no library has it: it joins retrieval, batched matching and geometry into the decisions
a SLAM backend needs, with every rejection explained.

Per keyframe: extract -> global descriptor -> top-k retrieval (recent keyframes excluded) -> ONE batched
``MatchingPipeline.correspond`` of the query against the k candidates -> geometric verification per candidate
(engine/verification.py) -> acceptance (engine/acceptance.py, the odometry gate on the keyframe graph of
engine/keyframe_graph.py, ambiguity, temporal consistency) -> the keyframe is inserted.

Matchers that match pixels (Efficient LoFTR, LoFTR; ``pipeline.needs_images``): the features still drive
retrieval, keyframes keep their gray image (and depth image), and the matcher's correspondences are pixels
rather than keypoint indices; verification and every check run on the same :class:`Correspondences`.

Monocular scale: without depth, keyframes that carry the backend's map points (``map_points``: a monocular
SLAM's sparse 3D, in its own drifting units) are verified by a Sim3 between the two keyframes' points
(``method="sim3"``, ``LoopClosure.scale``, ``metric=False``); without them the pose is an essential matrix
(rotation + unit translation, ``metric=False``) whose information is zero along t: "scale unknown".
Relocalization needs a metric pose.

Precision first: a false loop closure corrupts the map, so every candidate gets a reason when rejected, and
acceptance stacks checks that scale with what the pair can show rather than per-dataset thresholds
(defaults in EngineConfig; the same for every sequence, camera and image size):
  1. support: inliers >= max(min_inliers, min_inlier_fraction x the smaller keypoint count) and inlier ratio
     >= min_inlier_ratio (min_inlier_ratio_monocular for essential-matrix / homography poses); inliers
     spread over >= min_inlier_coverage of a 4x4 grid in BOTH images;
  2. geometry (RGB-D / depth): median PnP residual at the noise level, the inliers' predicted depths agree
     with the measured ones, and so does the whole scene (every query keypoint with depth lands at the depth
     the match keyframe sees there);
  3. odometry gate along the keyframe graph (engine/keyframe_graph.py): the loop may disagree with the
     backend's poses by at most the drift it could have accumulated along the shortest path (abs + ratio x
     path length; heading only for monocular loops), so a place one period over is refused even when its
     rotation is right;
  4. ambiguity: two candidates at different places verifying nearly as well reject each other ("same place":
     database neighbours, joined by loops accepted earlier (engine/keyframe_graph.py's PlaceLinks), or two
     keyframes of one stretch of the trajectory that verify against each other);
  5. consistency (ORB-SLAM style): the previous temporal_consistency - 1 keyframes must also verify a keyframe
     at the same place as the match; keyframes whose own retrieval missed that place are verified against it on the spot, so
     the loop is accepted when first seen and one look-alike pair can never close a loop.
Relocalization runs checks 1, 2 and 4 (a lost camera has no odometry to compare with) and needs a metric pose.

Threads: the candidates of a keyframe are verified in parallel (engine/verification.py); the networks are behind
``network_lock``, so the next keyframe may be described in another thread while this one verifies
(engine/describe_ahead.py; ``process_keyframe(..., described=, after_matching=)``).
Monocular pairs that a homography explains (low parallax, planes) get the homography's pose instead of being
refused (geometry/pose.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from feature_matching_ros.config import ConfigError, PoseConfig
from feature_matching_ros.engine.acceptance import (depth_agreement, inlier_coverage, median_reprojection_residual,
                                                    scene_depth_agreement)
from feature_matching_ros.engine.config import EngineConfig
from feature_matching_ros.engine.keyframe_graph import KeyframeGraph, PlaceLinks
from feature_matching_ros.engine.records import KeyframeResult, LoopClosure, Relocalization
from feature_matching_ros.engine.verification import VerificationPool, verify_pair
from feature_matching_ros.features.base import Features
from feature_matching_ros.geometry.pose import check_intrinsics
from feature_matching_ros.geometry.covariance import relocalization_covariance
from feature_matching_ros.geometry.se3 import inverse, rotation_angle_deg
from feature_matching_ros.image import gray_uint8
from feature_matching_ros.matchers.base import Correspondences, View
from feature_matching_ros.retrieval.database import Candidate, Keyframe, KeyframeDatabase, MapPoints
from feature_matching_ros.retrieval.global_descriptors import (BinaryVocabulary, CodebookError, VladCodebook,
                                                               default_codebook_path, load_codebook, sha256_file)
from feature_matching_ros.retrieval.persistence import MapFormatError

LOG = logging.getLogger(__name__)

# What describe() returns: the keyframe (not yet inserted), its features on the device, and stage timings (ms).
Described = tuple[Keyframe, Features, dict[str, float]]


def _numpy_descriptors(features: Features) -> np.ndarray:
    descriptors = features.descriptors.detach().cpu()
    return descriptors.numpy() if features.is_binary else descriptors.float().numpy()


# Two keyframes of one stretch and a query that verified against both are one place only if the three monocular
# rotations compose: each is within a few degrees on real hand-held revisits (tum_fr1_rpy: median 3.3 deg, short
# baselines), while a look-alike seen from another side puts them tens of degrees apart (rendered: 90-180 deg).
STRETCH_ROTATION_DEG = 15.0

class LoopClosureEngine:
    """Loop closure + relocalization over a :class:`KeyframeDatabase`, with a :class:`MatchingPipeline`.

    Online use (the ROS node): ``process_keyframe(image, K, stamp_ns, ...)`` per backend keyframe,
    ``relocalize(image, K, ...)`` when tracking is lost, ``update_poses({id: T_map_camera})`` after the backend
    optimised, ``save_map(dir)`` / ``load_map(dir)`` for persistence.
    """

    def __init__(self, pipeline, config: EngineConfig | None = None,
                 codebook: VladCodebook | BinaryVocabulary | None = None) -> None:
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        descriptor_type = pipeline.extractor.descriptor_type
        binary = descriptor_type == "orb"
        kind = self.config.global_descriptor if self.config.global_descriptor != "auto" else ("bow" if binary else "vlad")
        if kind == "bow" and not binary:
            raise ConfigError(f"global_descriptor=bow needs binary ORB descriptors; the pipeline produces "
                              f"{descriptor_type} descriptors (use global_descriptor=vlad)")
        if kind == "vlad" and binary:
            raise ConfigError("global_descriptor=vlad needs float descriptors; ORB is binary (use bow)")
        if codebook is None:
            path = (default_codebook_path(descriptor_type) if self.config.codebook == "default"
                    else Path(self.config.codebook))
            codebook = load_codebook(path)
            self.codebook_sha256 = sha256_file(path)
        else:
            self.codebook_sha256 = "in-memory"
        if codebook.kind != kind or codebook.descriptor_type != descriptor_type:
            raise CodebookError(f"codebook is {codebook.kind} for {codebook.descriptor_type} descriptors; the engine "
                                f"needs {kind} for {descriptor_type}")
        self.codebook = codebook
        self.database = KeyframeDatabase(kind, codebook.dim, self.config.retrieval)
        self._recent_verified: deque[set[int]] = deque(maxlen=max(self.config.temporal_consistency - 1, 1))
        self._next_id = 0
        # Odometry gate: the keyframe graph by database position (metric loops become its edges); same-place links
        # of accepted loops of every kind (ambiguity, consistency). Accepted loops (match position, loop) wait in
        # _pending_loops until their query keyframe is inserted.
        self.graph = KeyframeGraph()
        self.places = PlaceLinks()
        self._pending_loops: dict[int, list[tuple[int, LoopClosure]]] = {}
        self._verification_pool = VerificationPool(self.config.verification_threads)
        # The networks (extractor, matcher, a VLAD codebook on the device) serve one caller at a time, so the next
        # keyframe may be described in another thread (engine/describe_ahead.py) while this one verifies. Code
        # that calls self.pipeline directly from another thread holds it too.
        self.network_lock = threading.Lock()

    # -------------------------------------------------------------------- keyframes
    def describe(self, image: np.ndarray, K: np.ndarray, stamp_ns: int, keyframe_id: int | None = None,
                 T_map_camera: np.ndarray | None = None, depth: np.ndarray | None = None,
                 map_points: MapPoints | tuple[np.ndarray, np.ndarray] | None = None) -> Described:
        """Extract features and the global descriptor of an image; returns (keyframe, device features, timing).
        ``map_points``: the backend's sparse 3D for this keyframe, a :class:`MapPoints` or ((P, 2) keypoint
        pixels, (P, 3) camera-frame points in backend units)."""
        K = check_intrinsics(K)
        timing: dict[str, float] = {}
        with self.network_lock:
            start = time.perf_counter()
            features = self.pipeline.extract(image)
            timing["extract"] = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            # VLAD describes the descriptors where they are (the GPU's); the binary vocabulary works on the host.
            descriptors = features.descriptors if self.codebook.kind == "vlad" else _numpy_descriptors(features)
            global_descriptor = (self.codebook(descriptors) if len(features)
                                 else np.zeros(self.codebook.dim, np.float32))
            timing["global_descriptor"] = (time.perf_counter() - start) * 1e3
            if keyframe_id is None:
                keyframe_id = self._next_id
            self._next_id = max(self._next_id, int(keyframe_id) + 1)
        keyframe = Keyframe.from_features(keyframe_id, stamp_ns, features, K, global_descriptor, T_map_camera,
                                          depth if self.config.store_depth else None)
        if self.pipeline.needs_images:
            keyframe.image = gray_uint8(image)
            if depth is not None and self.config.store_depth:
                keyframe.depth_image = np.asarray(depth, np.float32).astype(np.float16)
        if map_points is not None:
            keyframe.map_points = (map_points if isinstance(map_points, MapPoints)
                                   else MapPoints.from_backend(*map_points))
        return keyframe, features, timing

    def process_keyframe(self, image: np.ndarray, K: np.ndarray, stamp_ns: int, keyframe_id: int | None = None,
                         T_map_camera: np.ndarray | None = None, depth: np.ndarray | None = None,
                         exclude_ids: set[int] | None = None, insert: bool = True,
                         map_points: MapPoints | tuple[np.ndarray, np.ndarray] | None = None,
                         described: Described | None = None,
                         after_matching: Callable[[], None] | None = None) -> KeyframeResult:
        """Detect loops for a new keyframe, then insert it. ``exclude_ids``: covisible keyframes to skip;
        ``map_points``: the backend's sparse 3D of the keyframe (see ``describe``; monocular Sim3 loops);
        ``described``: what ``describe`` already returned for these arguments (DescribeAhead), else it runs here;
        ``after_matching``: called once when this keyframe no longer needs the networks (its candidates are
        matched; verification on the host follows), where the next keyframe's description may start."""
        start_total = time.perf_counter()
        described_ahead = described is not None
        if described is None:
            described = self.describe(image, K, stamp_ns, keyframe_id, T_map_camera, depth, map_points)
        keyframe, features, timing = described
        result = self.detect_loops(keyframe, features, exclude_ids, timing, after_matching)
        if insert:
            self.insert(keyframe)
        # The keyframe's own work: a description made ahead counts with its own duration, not the wait for it.
        result.timing_ms["total"] = (time.perf_counter() - start_total) * 1e3 + (
            timing["extract"] + timing["global_descriptor"] if described_ahead else 0.0)
        return result

    def insert(self, keyframe: Keyframe) -> None:
        previous = self.database.keyframes[-1].T_map_camera if len(self.database) else None
        position = self.graph.add_node(previous, keyframe.T_map_camera)
        for match_position, loop in self._pending_loops.pop(keyframe.id, []):
            self.places.add(match_position, position)
            if loop.metric:
                self.graph.add_loop(match_position, position, loop.T_match_query)
        self._pending_loops.clear()
        self.database.add(keyframe)

    def _predict_from_graph(self, keyframe: Keyframe, targets: set[int], source_position: int | None = None
                            ) -> dict[int, tuple[np.ndarray, float, float]]:
        """{database position: (T_position_query predicted by the keyframe graph, path length m, degrees turned)}.
        A new query is attached to the last keyframe by its odometry step; one already in the map starts at
        ``source_position``."""
        if source_position is not None:
            return self.graph.predict(source_position, np.eye(4), 0.0, targets)
        if not len(self.database) or keyframe.T_map_camera is None:
            return {}
        last = self.database.keyframes[-1]
        if last.T_map_camera is None:
            return {}
        T_last_query = inverse(last.T_map_camera) @ keyframe.T_map_camera
        return self.graph.predict(len(self.database) - 1, T_last_query, float(np.linalg.norm(T_last_query[:3, 3])),
                                  targets)

    def _odometry_gate(self, loop: LoopClosure, prediction: tuple[np.ndarray, float, float] | None) -> str | None:
        """Fill the loop's drift fields from the graph prediction; return a rejection reason if the loop disagrees
        with odometry (+ earlier loops) by more than the drift allowed along the shortest path. Loops without a
        translation length (essential matrix) are compared on rotation only; Sim3 loops on rotation and on
        translation up to the scale drift they measure."""
        if prediction is None:
            return None
        T_predicted, path_length, turned_deg = prediction
        loop.drift_rotation_deg = rotation_angle_deg(T_predicted[:3, :3].T @ loop.T_match_query[:3, :3])
        loop.path_length_m = float(path_length)
        has_length = loop.metric or loop.method == "sim3"
        if has_length:
            t_loop = loop.T_match_query[:3, 3]
            if loop.method == "sim3":
                # Monocular: the loop's t is in the match keyframe's units, the odometry between the two keyframes
                # drifts from those units to the query's (lengths x 1/scale); compare up to a scale in that range.
                low, high = sorted((1.0, 1.0 / loop.scale))
                t_loop = t_loop * float(np.clip(t_loop @ T_predicted[:3, 3] / max(t_loop @ t_loop, 1e-12), low, high))
            loop.drift_translation_m = float(np.linalg.norm(t_loop - T_predicted[:3, 3]))
        if not self.config.odometry_gate:
            return None
        max_translation = self.config.max_drift_abs_m + self.config.max_drift_ratio * path_length
        # The turn allowance only where translation is checked too: for an essential-matrix loop rotation is the
        # whole gate, and a look-alike place on a long, turning path would pass a wider one.
        turn_allowance = self.config.max_drift_ratio_of_turn * turned_deg if has_length else 0.0
        max_rotation = self.config.max_drift_abs_deg + self.config.max_drift_deg_per_m * path_length + turn_allowance
        translation_off = has_length and loop.drift_translation_m > max_translation
        if translation_off or loop.drift_rotation_deg > max_rotation:
            moved = f"{loop.drift_translation_m:.2f} m / " if has_length else ""
            return (f"inconsistent with odometry: moves the keyframe {moved}{loop.drift_rotation_deg:.1f} deg over "
                    f"a {path_length:.1f} m graph path turning {turned_deg:.0f} deg (allowed {max_translation:.2f} m / "
                    f"{max_rotation:.1f} deg; repetitive structure?)")
        return None

    def update_poses(self, poses: dict[int, np.ndarray]) -> None:
        """Backend-optimised poses T_map_camera by keyframe id (unknown ids are ignored)."""
        for keyframe_id, T in poses.items():
            if keyframe_id in self.database:
                self.database.get(keyframe_id).T_map_camera = np.asarray(T, np.float64).reshape(4, 4)

    # -------------------------------------------------------------------- verification
    def _views(self, keyframes: list[Keyframe], query_features: Features | None = None) -> list[View]:
        missing = [k.id for k in keyframes if self.pipeline.needs_images and k.image is None]
        if missing:
            raise MapFormatError(f"keyframes {missing[:5]} have no stored image; matcher="
                                 f"{self.pipeline.config.matcher.name} needs a map built by a preset that matches "
                                 "pixels (eloftr)")
        if self.pipeline.needs_images:
            return [View(image=k.image) for k in keyframes]
        device = self.pipeline.device
        return [View(features=query_features if query_features is not None and i == 0 else k.to_features(device))
                for i, k in enumerate(keyframes)]

    def _verify(self, keyframe: Keyframe, features: Features | None, candidates: list[Candidate],
                timing: dict[str, float], check_odometry: bool = True, source_position: int | None = None,
                after_matching: Callable[[], None] | None = None) -> list[LoopClosure]:
        stored = [self.database.keyframes[c.position] for c in candidates]
        with self.network_lock:
            start = time.perf_counter()
            query_view, *candidate_views = self._views([keyframe, *stored], features)
            pairs = self.pipeline.correspond(query_view, candidate_views)
            if self.pipeline.device.type == "cuda":
                torch.cuda.synchronize(self.pipeline.device)
            timing["match"] = (time.perf_counter() - start) * 1e3
        if after_matching is not None:
            after_matching()
        start = time.perf_counter()
        predictions = (self._predict_from_graph(keyframe, {c.position for c in candidates}, source_position)
                       if check_odometry else {})
        pose_config = self.pipeline.config.pose
        if self.config.ransac_floor:  # RANSAC need not look for what the support check rejects
            pose_config = replace(
                pose_config, min_inlier_ratio=max(pose_config.min_inlier_ratio, self.config.min_inlier_ratio),
                min_inlier_ratio_monocular=max(pose_config.min_inlier_ratio_monocular,
                                               self.config.min_inlier_ratio_monocular))

        def verify(rank: int) -> LoopClosure:
            candidate, match_kf, correspondences = candidates[rank], stored[rank], pairs[rank]
            prediction = predictions.get(candidate.position) if check_odometry else None
            return self._verify_candidate(keyframe, match_kf, correspondences, candidate, rank, pose_config,
                                          check_odometry, prediction)

        results = self._verification_pool.map(verify, range(len(candidates)))
        timing["verify"] = (time.perf_counter() - start) * 1e3
        return results

    def _verify_candidate(self, keyframe: Keyframe, match_kf: Keyframe, correspondences: Correspondences,
                          candidate: Candidate, rank: int, pose_config: PoseConfig, check_odometry: bool,
                          prediction: tuple[np.ndarray, float, float] | None) -> LoopClosure:
        """One candidate's verdict: support pre-check, geometric verification, acceptance checks, odometry gate.
        Reads the engine and the two keyframes only, so candidates of one query run in parallel threads."""
        loop = LoopClosure(keyframe.id, match_kf.id, keyframe.stamp_ns, match_kf.stamp_ns, False, "",
                           num_matches=len(correspondences), retrieval_score=candidate.score, retrieval_rank=rank)
        loop.reason = self._support_out_of_reach(keyframe, match_kf, len(correspondences)) or ""
        if loop.reason:
            return loop
        depth_query = keyframe.depth_at(correspondences.points0, correspondences.index0)
        depth_match = match_kf.depth_at(correspondences.points1, correspondences.index1)
        radius = pose_config.map_point_radius_px
        pose = verify_pair(correspondences, depth_query, depth_match, keyframe.K, match_kf.K, pose_config,
                           keyframe.points3d_at(correspondences.points0, radius),
                           match_kf.points3d_at(correspondences.points1, radius))
        loop = LoopClosure(keyframe.id, match_kf.id, keyframe.stamp_ns, match_kf.stamp_ns, False, pose.reason,
                           pose.T_1_0, pose.scale, pose.metric, pose.information, len(correspondences),
                           pose.num_inliers, candidate.score, rank, pose.method, pose.success,
                           median_residual_px=pose.median_residual_px, information_sim3=pose.information_sim3)
        if pose.success:
            loop.points_query, loop.points_match = correspondences.points0, correspondences.points1
            loop.match_scores = np.asarray(correspondences.scores, np.float32)
            loop.inlier_mask = np.asarray(pose.inliers, bool)
            inliers = pose.inliers
            pick = lambda depth: None if depth is None else depth[inliers]  # noqa: E731
            loop.reason = (self._check_geometry(keyframe, match_kf, correspondences.subset(inliers),
                                                pick(depth_query), pick(depth_match), loop)
                           or (self._odometry_gate(loop, prediction) if check_odometry else None)
                           or "ok")
            loop.accepted = loop.reason == "ok"
        else:
            loop.reason = f"geometric verification failed: {pose.reason}"
        return loop

    def _support_out_of_reach(self, query: Keyframe, candidate: Keyframe, num_matches: int) -> str | None:
        """Rejection before any RANSAC: inliers are a subset of the matches, so a pair with fewer matches than the
        support check requires (``_required_inliers``) can never be accepted, whatever its geometry."""
        required = self._required_inliers(query, candidate)
        if num_matches >= required:
            return None
        return (f"too few matches for the required support: {num_matches} < {required} inliers required "
                f"(min_inliers={self.config.min_inliers}, min_inlier_fraction={self.config.min_inlier_fraction} of "
                "what the pair can show); not verified")

    def _required_inliers(self, query: Keyframe, candidate: Keyframe) -> int:
        """Support check 1: inliers >= max(min_inliers, min_inlier_fraction x what the pair can show)."""
        return max(self.config.min_inliers,
                   int(np.ceil(self.config.min_inlier_fraction * self._capacity(query, candidate))))

    def verify_candidates(self, query_id: int, candidate_ids: list[int]) -> KeyframeResult:
        """Verify candidates named from outside (a backend's covisibility search, another place recogniser)
        against a keyframe already in the map: no retrieval, no exclusion window, no temporal consistency;
        the same acceptance thresholds and odometry gate as ``process_keyframe``. KeyError: unknown id."""
        start_total = time.perf_counter()
        keyframe = self.database.get(query_id)
        candidates = [Candidate(self.database.position_of(i), i, 0.0) for i in candidate_ids]
        timing: dict[str, float] = {}
        loops = []
        if candidates:  # no query features: _verify makes them from the stored keyframe
            loops = self._verify(keyframe, None, candidates, timing,
                                 source_position=self.database.position_of(query_id))
        timing["total"] = (time.perf_counter() - start_total) * 1e3
        return KeyframeResult(keyframe.id, keyframe.stamp_ns, loops, "ok" if loops else "no candidates", timing)

    def _check_geometry(self, query: Keyframe, candidate: Keyframe, inliers: Correspondences,
                        depth_query: np.ndarray | None, depth_match: np.ndarray | None, loop: LoopClosure
                        ) -> str | None:
        """Acceptance checks on a geometrically verified pair (its inlier correspondences and their depths);
        fills the loop's diagnostics, returns a rejection reason or None."""
        config = self.config
        loop.inlier_coverage = min(inlier_coverage(inliers.points0, query.image_size, config.coverage_grid),
                                   inlier_coverage(inliers.points1, candidate.image_size, config.coverage_grid))
        if loop.method == "pnp":
            loop.depth_agreement = depth_agreement(inliers.points0, depth_query, depth_match, query.K,
                                                   loop.T_match_query, config.depth_tolerance_rel,
                                                   config.depth_tolerance_abs_m)
            # Residuals in the image PnP was solved in (the candidate's points into the query when it has depth).
            if depth_match is not None and np.isfinite(depth_match).any():
                loop.median_residual_px = median_reprojection_residual(
                    inliers.points1, depth_match, candidate.K, inliers.points0, query.K, inverse(loop.T_match_query))
            else:
                loop.median_residual_px = median_reprojection_residual(
                    inliers.points0, depth_query, query.K, inliers.points1, candidate.K, loop.T_match_query)
        required = self._required_inliers(query, candidate)
        if loop.num_inliers < required:
            return (f"too few inliers: {loop.num_inliers} < {required} (min_inliers={config.min_inliers}, "
                    f"min_inlier_fraction={config.min_inlier_fraction} of what the pair can show)")
        if loop.method in ("essential", "homography"):
            if loop.inlier_ratio < config.min_inlier_ratio_monocular:
                return (f"inlier ratio {loop.inlier_ratio:.2f} < min_inlier_ratio_monocular="
                        f"{config.min_inlier_ratio_monocular}")
        elif loop.inlier_ratio < config.min_inlier_ratio:
            return f"inlier ratio {loop.inlier_ratio:.2f} < min_inlier_ratio={config.min_inlier_ratio}"
        if loop.inlier_coverage < config.min_inlier_coverage:
            return (f"inliers clustered: cover {loop.inlier_coverage:.2f} of the {config.coverage_grid}x"
                    f"{config.coverage_grid} grid < min_inlier_coverage={config.min_inlier_coverage}")
        residual_limit = config.max_median_residual_ratio * self.pipeline.config.pose.pnp_threshold_px
        if loop.median_residual_px is not None and loop.median_residual_px > residual_limit:
            return (f"reprojection residuals too large: median {loop.median_residual_px:.2f} px > "
                    f"{residual_limit:.2f} px (max_median_residual_ratio x pnp_threshold_px)")
        if loop.depth_agreement is not None and loop.depth_agreement < config.min_depth_agreement:
            return (f"depth inconsistent: {loop.depth_agreement:.2f} of the inliers have the predicted depth < "
                    f"min_depth_agreement={config.min_depth_agreement}")
        if loop.method == "pnp" and query.depth_at_keypoints is not None and candidate.depth_at_keypoints is not None:
            radius = config.scene_radius_ratio * float(np.hypot(*candidate.image_size))
            loop.scene_agreement = scene_depth_agreement(
                query.keypoints, query.depth_at_keypoints, query.K, candidate.keypoints, candidate.depth_at_keypoints,
                candidate.K, candidate.image_size, loop.T_match_query, config.depth_tolerance_rel,
                config.depth_tolerance_abs_m, radius)
            if loop.scene_agreement is not None and loop.scene_agreement < config.min_scene_agreement:
                return (f"scene inconsistent: {loop.scene_agreement:.2f} of the query's keypoints land at the depth "
                        f"the match sees < min_scene_agreement={config.min_scene_agreement}")
        return None

    def _capacity(self, query: Keyframe, candidate: Keyframe) -> int:
        """How many correspondences the pair could show at most: the smaller keypoint count (sparse matchers), or
        the smaller image's count of 8x8 coarse cells (pixel matchers)."""
        if self.pipeline.needs_images:
            return min((w // 8) * (h // 8) for w, h in (query.image_size, candidate.image_size))
        return min(len(query), len(candidate))

    def detect_loops(self, keyframe: Keyframe, features: Features, exclude_ids: set[int] | None = None,
                     timing: dict[str, float] | None = None, after_matching: Callable[[], None] | None = None
                     ) -> KeyframeResult:
        timing = timing if timing is not None else {}
        start = time.perf_counter()
        candidates = self.database.query(keyframe.global_descriptor, keyframe.stamp_ns, exclude_ids=exclude_ids)
        timing["retrieve"] = (time.perf_counter() - start) * 1e3
        if len(keyframe) == 0 or not candidates:
            if after_matching is not None:
                after_matching()
            self._remember(set())
            reason = ("no keypoints in the keyframe" if len(keyframe) == 0 else "database empty"
                      if not len(self.database) else "no eligible candidates outside the exclusion window")
            return KeyframeResult(keyframe.id, keyframe.stamp_ns, [], reason, timing)
        loops = self._verify(keyframe, features, candidates, timing, after_matching=after_matching)
        self._reject_ambiguous(loops)
        self._apply_temporal_consistency(loops)
        # A metric constraint (full information) serves the backend better than a monocular one at the same place.
        accepted = sorted((c for c in loops if c.accepted), key=lambda c: (not c.metric, -c.num_inliers))
        for extra in accepted[self.config.max_loops_per_keyframe:]:
            extra.accepted = False
            extra.reason = f"another candidate of this keyframe has more inliers or metric scale " \
                           f"(max_loops_per_keyframe={self.config.max_loops_per_keyframe})"
        self._pending_loops[keyframe.id] = [(self.database.position_of(c.match_id), c)
                                            for c in accepted[:self.config.max_loops_per_keyframe]]
        return KeyframeResult(keyframe.id, keyframe.stamp_ns, loops, "ok", timing)

    def _same_place(self, a: LoopClosure, b: LoopClosure) -> bool:
        """Two verified candidates agree on where the query is: their keyframes are neighbours in the database or
        joined by accepted loops (a place visited before the two of them: PlaceLinks), or both loops are metric
        and each passed the odometry gate (so both agree with the same odometry), or the two keyframes belong to
        one stretch of the trajectory and see the same scene (:meth:`_one_stretch`)."""
        position_a, position_b = self.database.position_of(a.match_id), self.database.position_of(b.match_id)
        if self.places.linked(position_a, position_b, self.config.consistency_window):
            return True
        if self.config.odometry_gate and all(c.metric and c.drift_translation_m is not None for c in (a, b)):
            return True
        return self._one_stretch(a, b)

    def _one_stretch(self, a: LoopClosure, b: LoopClosure) -> bool:
        """Are the keyframes of two candidates closer in time than retrieval's recency exclusion (never loop
        candidates of each other: the backend tracks between them), do they verify against each other through
        the same checks as a loop, and does that pose agree with the query's two loops (rotations within
        ``STRETCH_ROTATION_DEG``)? Then they are one place seen twice while the camera lingered or swung back (a
        hand-held camera looking around a room), as a backend's covisibility graph would say, and the pair is
        joined in PlaceLinks. A look-alike seen from elsewhere verifies each pair with rotations that do not
        compose. Keyframes further apart in time are never joined here: that would be a loop closure, which only
        the full rule (consistency included) may accept."""
        (earlier, to_earlier), (later, to_later) = sorted(
            (self.database.position_of(c.match_id), c.T_match_query) for c in (a, b))
        keyframes = self.database.keyframes
        if abs(keyframes[later].stamp_ns - keyframes[earlier].stamp_ns) > \
                self.database.config.exclude_recent_seconds * 1e9:
            return False
        keyframe = keyframes[later]
        features = None if self.pipeline.needs_images else keyframe.to_features(self.pipeline.device)
        loop = self._verify(keyframe, features, [Candidate(earlier, keyframes[earlier].id, 0.0)], {},
                            source_position=later)[0]
        if not loop.accepted:
            return False
        through_query = to_earlier[:3, :3] @ to_later[:3, :3].T  # R_earlier_later via the query
        if rotation_angle_deg(through_query.T @ loop.T_match_query[:3, :3]) > STRETCH_ROTATION_DEG:
            return False
        self.places.add(earlier, later)
        return True

    def _reject_ambiguous(self, loops: list[LoopClosure]) -> None:
        """Reject every candidate when a runner-up at another place verifies nearly as well (ambiguity_ratio)."""
        verified = sorted((c for c in loops if c.accepted), key=lambda c: -c.num_inliers)
        if len(verified) < 2 or self.config.ambiguity_ratio >= 1.0:
            return
        best = verified[0]
        rival = next((c for c in verified[1:] if c.num_inliers >= self.config.ambiguity_ratio * best.num_inliers
                      and not self._same_place(best, c)), None)
        if rival is None:
            return
        for loop in verified:
            loop.accepted = False
            loop.reason = (f"ambiguous: keyframes {best.match_id} ({best.num_inliers} inliers) and {rival.match_id} "
                           f"({rival.num_inliers}) at different places both verify (ambiguity_ratio="
                           f"{self.config.ambiguity_ratio})")

    def _apply_temporal_consistency(self, loops: list[LoopClosure]) -> None:
        """ORB-SLAM-style consistency: a candidate is accepted once each of the previous N-1 keyframes also verifies
        a keyframe at the same place (within ``consistency_window`` positions of it, or joined to it by accepted
        loops: PlaceLinks), so one look-alike pair cannot close a loop.

        The previous keyframes' own verdicts are used first; a previous keyframe whose retrieval did not offer that
        place is verified against the candidate's neighbourhood now (as ORB-SLAM3 checks the query's covisible
        keyframes), so a loop is accepted when it is first seen instead of N-1 keyframes later.

        Only the query's own trajectory confirms: the match's map neighbours verifying the same query is no
        independent evidence in a repetitive place (they look alike too; measured on rendered corridors, where
        accepting such confirmations closed dozens of false loops)."""
        verified = {self.database.position_of(c.match_id) for c in loops if c.accepted}
        needed = self.config.temporal_consistency - 1
        if needed > 0:
            window = self.config.consistency_window
            history = list(self._recent_verified)[-needed:]
            history = [set()] * (needed - len(history)) + history
            for loop in loops:
                if not loop.accepted:
                    continue
                position = self.database.position_of(loop.match_id)
                confirmed = 0
                for back, previous in enumerate(reversed(history), start=1):
                    if any(self.places.linked(position, p, window) for p in previous) or \
                            self._previous_keyframe_confirms(len(self.database) - back, position):
                        confirmed += 1
                if confirmed < needed:
                    loop.accepted = False
                    loop.reason = (f"awaiting temporal consistency: confirmed by {confirmed} of the previous "
                                   f"{needed} keyframes (temporal_consistency={self.config.temporal_consistency})")
        self._remember(verified)

    def _previous_keyframe_confirms(self, previous_position: int, match_position: int) -> bool:
        """Does the keyframe at ``previous_position`` pass every check against the match keyframe or its
        immediate neighbours (positions match +- 1, older than it)? Verified through the same code as a query."""
        if previous_position < 0 or previous_position <= match_position + 1:
            return False
        previous = self.database.keyframes[previous_position]
        candidates = [Candidate(p, self.database.keyframes[p].id, 0.0)
                      for p in range(max(match_position - 1, 0), match_position + 2) if p < previous_position]
        features = None if self.pipeline.needs_images else previous.to_features(self.pipeline.device)
        loops = self._verify(previous, features, candidates, {}, source_position=previous_position)
        return any(loop.accepted for loop in loops)

    def _remember(self, verified_positions: set[int]) -> None:
        self._recent_verified.append(verified_positions)

    # -------------------------------------------------------------------- relocalization
    def relocalize(self, image: np.ndarray, K: np.ndarray, depth: np.ndarray | None = None,
                   stamp_ns: int = 0, exclude_ids: set[int] | None = None) -> Relocalization:
        """Pose of an image in the map frame from the best verified keyframe (most inliers), metric only."""
        start_total = time.perf_counter()
        keyframe, features, timing = self.describe(image, K, stamp_ns, -1, None, depth)
        start = time.perf_counter()
        candidates = self.database.query(keyframe.global_descriptor, exclude_ids=exclude_ids, exclude_recent=False)
        candidates = [c for c in candidates if self.database.keyframes[c.position].T_map_camera is not None]
        timing["retrieve"] = (time.perf_counter() - start) * 1e3
        if len(keyframe) == 0:
            return Relocalization(False, "no keypoints in the image", timing_ms=timing)
        if not candidates:
            return Relocalization(False, "no keyframe with a pose in the map" if len(self.database)
                                  else "map is empty", timing_ms=timing)
        loops = self._verify(keyframe, features, candidates, timing, check_odometry=False)
        timing["total"] = (time.perf_counter() - start_total) * 1e3
        for loop in loops:
            if loop.accepted and not loop.metric:
                loop.accepted = False
                loop.reason = "no depth in the image or the keyframe: translation scale unknown (monocular)"
        accepted = sorted((c for c in loops if c.accepted), key=lambda c: -c.num_inliers)
        if len(accepted) > 1:  # ambiguity: a runner-up verifying nearly as well puts the query somewhere else
            T_best = self.database.get(accepted[0].match_id).T_map_camera @ accepted[0].T_match_query
            for rival in accepted[1:]:
                if rival.num_inliers < self.config.ambiguity_ratio * accepted[0].num_inliers:
                    break
                T_rival = self.database.get(rival.match_id).T_map_camera @ rival.T_match_query
                if (np.linalg.norm(T_rival[:3, 3] - T_best[:3, 3]) > self.config.max_drift_abs_m
                        or rotation_angle_deg(T_rival[:3, :3].T @ T_best[:3, :3]) > self.config.max_drift_abs_deg):
                    for loop in accepted:
                        loop.accepted = False
                        loop.reason = (f"ambiguous: keyframes {accepted[0].match_id} and {rival.match_id} put the "
                                       f"image at different map poses with similar support")
                    accepted = []
                    break
        if not accepted:
            reasons = "; ".join(f"kf {c.match_id}: {c.reason}" for c in loops)
            return Relocalization(False, f"no candidate verified ({reasons})", candidates=loops, timing_ms=timing)
        best = accepted[0]
        T_map_match = self.database.get(best.match_id).T_map_camera
        T_map_query = T_map_match @ best.T_match_query
        covariance = relocalization_covariance(T_map_match, best.T_match_query, best.information)
        return Relocalization(True, "ok", T_map_query, covariance, best.match_id,
                              best.num_matches, best.num_inliers, loops, timing)

    # -------------------------------------------------------------------- persistence
    def map_metadata(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return vars(self.pipeline.config.features).copy(), {"codebook": str(self.config.codebook),
                                                            "codebook_sha256": self.codebook_sha256}

    def save_map(self, directory: Path | str) -> Path:
        from feature_matching_ros.retrieval.persistence import save_map

        feature_config, global_info = self.map_metadata()
        return save_map(self.database, directory, feature_config, global_info)

    def load_map(self, directory: Path | str) -> dict[str, Any]:
        """Replace the database with a saved map; refuses maps of other features or another codebook."""
        from feature_matching_ros.retrieval.persistence import load_map

        feature_config, global_info = self.map_metadata()
        database, manifest = load_map(directory, feature_config, self.config.retrieval)
        stored = manifest["global_descriptor"]
        if stored.get("kind") != self.database.kind or stored.get("codebook_sha256") != self.codebook_sha256:
            raise MapFormatError(f"map {directory} was indexed with {stored.get('kind')} codebook sha256 "
                                 f"{stored.get('codebook_sha256')}; the engine uses {self.database.kind} "
                                 f"{self.codebook_sha256} (global descriptors would not be comparable)")
        if self.pipeline.needs_images and any(k.image is None for k in database.keyframes):
            raise MapFormatError(f"map {directory} stores no keyframe images; matcher="
                                 f"{self.pipeline.config.matcher.name} matches pixels and needs a map built by a "
                                 "preset that keeps them (eloftr)")
        self.database = database
        # Rebuild the odometry graph in database order (loop edges are not persisted: the backend owns them).
        self.graph, self.places, self._pending_loops = KeyframeGraph(), PlaceLinks(), {}
        previous = None
        for keyframe in database.keyframes:
            self.graph.add_node(previous, keyframe.T_map_camera)
            previous = keyframe.T_map_camera
        self._next_id = max((k.id for k in database.keyframes), default=-1) + 1
        return manifest


def build_engine(preset: str, override: dict[str, Any] | None = None, device: str | None = None
                 ) -> LoopClosureEngine:
    """Engine + pipeline from a preset name (presets.py), e.g. ``build_engine("orb_lightglue")``."""
    from feature_matching_ros.pipeline import MatchingPipeline
    from feature_matching_ros.presets import build_configs, merge

    if device is not None:
        override = merge(override or {}, {"pipeline": {"device": device}})
    pipeline_config, engine_config = build_configs(preset, override)
    return LoopClosureEngine(MatchingPipeline(pipeline_config), engine_config)
