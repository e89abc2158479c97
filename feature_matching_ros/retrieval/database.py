"""Keyframe database: compact per-keyframe features + a global-descriptor index for top-k retrieval.

Each keyframe keeps what verification needs and nothing more: keypoints (float32 px), descriptors
(float16 for float descriptors, packed uint8 for ORB), detector scores (float16), the depth sampled AT
the keypoints (float32 metres, NaN = invalid; never the whole depth image), K, the backend pose
T_map_camera (4x4, optional), stamp and id, the global descriptor, and optionally the backend's own sparse
3D (:class:`MapPoints`: a monocular backend's map points in the keyframe's camera frame, backend units).

Retrieval (``query``) returns the k best candidates by global similarity while excluding the recent
past: keyframes within ``exclude_recent_seconds`` of the query stamp, the ``exclude_recent_count``
most recently inserted keyframes, and any ids the caller names (e.g. the backend's covisible set) —
so odometry neighbours are never offered as loop candidates.

Index: VLAD vectors are unit-norm, so cosine similarity = inner product and faiss ``IndexFlatIP`` is
exact; with a few hundred dims it answers 100k keyframes in a few ms (see benchmarks/). Exclusions are
a faiss ``IDSelectorBitmap`` (search-time filtering, exact top-k among the eligible keyframes). Without faiss
installed the same exact search runs in numpy (:class:`ExactInnerProduct`; linear in the map size, a few ms
per 10k keyframes), so the engine also runs on minimal installs without faiss.
Bag-of-words vectors use the DBoW2 L1 score (sum of per-word minima), which is not an inner product:
they go through a sparse inverted file (scipy CSR, words x keyframes) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from feature_matching_ros.features.base import Features


@dataclass
class MapPoints:
    """The sparse 3D a SLAM backend holds for one keyframe, as its keyframe stores it: for each of its keypoints
    that observes a map point, the keypoint's pixel and the map point in the keyframe's camera frame.

    pixels: (P, 2) float32, undistorted pixel positions of the backend's keypoints ((0, 0) = centre of the
    top-left pixel); points: (P, 3) float32, X_camera = T_camera_world X_world in the BACKEND's units (a
    monocular map has an arbitrary, drifting scale: these are not metres, so they never stand in for depth).

    Why pixels + points rather than 3D per extracted keypoint or a sparse depth image: the engine extracts its own
    keypoints, which the backend never sees, and an ORB-SLAM3 bridge holds exactly these two arrays per keyframe
    (``mvKeysUn[i]`` and ``Tcw * mvpMapPoints[i]->GetWorldPos()`` for the non-null ``i``); a sparse depth image
    would round every point to a pixel and could not be told apart from metric depth. Matches find their 3D by
    :meth:`at` (nearest backend keypoint within a radius), which serves keypoint and pixel matchers alike.
    """

    pixels: np.ndarray
    points: np.ndarray
    _tree: object | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.pixels = np.ascontiguousarray(self.pixels, np.float32)
        self.points = np.ascontiguousarray(self.points, np.float32)

    def __len__(self) -> int:
        return int(len(self.pixels))

    @staticmethod
    def from_backend(pixels: np.ndarray, points: np.ndarray) -> "MapPoints":
        """Validate a backend's (P, 2) pixels and (P, 3) camera-frame points. Rows with a non-finite value or a
        point at or behind the camera (z <= 0) carry no usable 3D and are dropped; wrong shapes raise ValueError."""
        pixels, points = np.asarray(pixels, np.float64), np.asarray(points, np.float64)
        if pixels.ndim != 2 or pixels.shape[1] != 2:
            raise ValueError(f"map point pixels must be (P, 2), got shape {pixels.shape}")
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"map points must be (P, 3) camera-frame coordinates, got shape {points.shape}")
        if len(pixels) != len(points):
            raise ValueError(f"{len(pixels)} map point pixels but {len(points)} map points")
        keep = np.isfinite(pixels).all(1) & np.isfinite(points).all(1) & (points[:, 2] > 0)
        return MapPoints(pixels[keep], points[keep])

    def at(self, query: np.ndarray, radius_px: float) -> np.ndarray:
        """(M, 3) float64 backend points at the (M, 2) matched pixels ``query``, NaN where none is near.

        Each query takes the nearest backend keypoint within ``radius_px``; a backend point claimed by several
        queries goes to the closest one only (one map point, one match, as in the backend)."""
        from scipy.spatial import cKDTree

        query = np.asarray(query, np.float64).reshape(-1, 2)
        out = np.full((len(query), 3), np.nan)
        if not len(self) or not len(query):
            return out
        if self._tree is None:
            self._tree = cKDTree(self.pixels.astype(np.float64))
        distance, nearest = self._tree.query(query, distance_upper_bound=radius_px)
        found = np.flatnonzero(np.isfinite(distance))
        # One-to-one: sort by distance, keep the first query of each backend point.
        order = found[np.argsort(distance[found], kind="stable")]
        _, first = np.unique(nearest[order], return_index=True)
        chosen = order[first]
        out[chosen] = self.points[nearest[chosen]]
        return out


@dataclass
class Keyframe:
    """One stored keyframe. Shapes: keypoints (N, 2) float32 px; descriptors (N, D) float16 or (N, 32) uint8;
    scores (N,) float16; depth_at_keypoints (N,) float32 metres (NaN invalid) or None; global_descriptor (G,)
    float32; K (3, 3) float64; T_map_camera (4, 4) float64 or None; image_size (W, H); map_points: the backend's
    sparse 3D (:class:`MapPoints`, backend units) or None."""

    id: int
    stamp_ns: int
    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]
    descriptor_type: str
    K: np.ndarray
    global_descriptor: np.ndarray
    T_map_camera: np.ndarray | None = None
    depth_at_keypoints: np.ndarray | None = None
    # Matchers that match pixels (``MatchingPipeline.needs_images``: eloftr, loftr) need the image: (H, W) uint8
    # gray, and the depth image (H, W) float16 metres (NaN invalid) when there is one. ~0.9 MB per VGA keyframe.
    image: np.ndarray | None = None
    depth_image: np.ndarray | None = None
    map_points: MapPoints | None = None

    def __len__(self) -> int:
        return int(len(self.keypoints))

    @property
    def has_depth(self) -> bool:
        if self.depth_at_keypoints is not None and bool(np.isfinite(self.depth_at_keypoints).any()):
            return True
        return self.depth_image is not None and bool(np.isfinite(self.depth_image).any())

    @staticmethod
    def from_features(keyframe_id: int, stamp_ns: int, features: Features, K: np.ndarray,
                      global_descriptor: np.ndarray, T_map_camera: np.ndarray | None = None,
                      depth: np.ndarray | None = None) -> "Keyframe":
        """Compact a :class:`Features` (any device) into a keyframe; ``depth`` is a whole depth image (metres,
        NaN/0 invalid, aligned with the image) sampled here at the nearest pixel of each keypoint."""
        keypoints = features.keypoints_numpy().astype(np.float32)
        descriptors = features.descriptors.detach().cpu()
        descriptors = descriptors.numpy() if features.is_binary else descriptors.to(torch.float16).numpy()
        depth_at_keypoints = None
        if depth is not None:
            depth = np.asarray(depth, dtype=np.float32)
            height, width = depth.shape[:2]
            cols = np.clip(np.round(keypoints[:, 0]).astype(int), 0, width - 1)
            rows = np.clip(np.round(keypoints[:, 1]).astype(int), 0, height - 1)
            depth_at_keypoints = depth[rows, cols].astype(np.float32)
            depth_at_keypoints[~(np.isfinite(depth_at_keypoints) & (depth_at_keypoints > 0))] = np.nan
        return Keyframe(int(keyframe_id), int(stamp_ns), keypoints, np.ascontiguousarray(descriptors),
                        features.scores.detach().float().cpu().numpy().astype(np.float16),
                        tuple(int(v) for v in features.image_size), features.descriptor_type,
                        np.asarray(K, np.float64).reshape(3, 3), np.asarray(global_descriptor, np.float32),
                        None if T_map_camera is None else np.asarray(T_map_camera, np.float64).reshape(4, 4),
                        depth_at_keypoints)

    def depth_at(self, points: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray | None:
        """(M,) float32 depth in metres (NaN invalid) at matched points: the stored per-keypoint depth when the
        matches index keypoints (``indices``), else the stored depth image at the nearest pixel of the (M, 2)
        ``points``. None when this keyframe has no depth."""
        if indices is not None and self.depth_at_keypoints is not None:
            return self.depth_at_keypoints[indices].astype(np.float32)
        if self.depth_image is None:
            return None
        height, width = self.depth_image.shape
        cols = np.clip(np.round(points[:, 0]).astype(int), 0, width - 1)
        rows = np.clip(np.round(points[:, 1]).astype(int), 0, height - 1)
        depth = self.depth_image[rows, cols].astype(np.float32)
        depth[~(np.isfinite(depth) & (depth > 0))] = np.nan
        return depth

    def points3d_at(self, points: np.ndarray, radius_px: float) -> np.ndarray | None:
        """(M, 3) backend map points (camera frame, backend units, NaN where none) at (M, 2) matched pixels, or
        None when the backend gave this keyframe no map points. See :meth:`MapPoints.at`."""
        if self.map_points is None or not len(self.map_points):
            return None
        return self.map_points.at(points, radius_px)

    def to_features(self, device: torch.device | str = "cpu") -> Features:
        """Back to the matcher's :class:`Features` (float descriptors re-normalised after float16 storage)."""
        descriptors = torch.from_numpy(self.descriptors)
        if descriptors.dtype != torch.uint8:
            descriptors = torch.nn.functional.normalize(descriptors.float(), dim=-1)
        return Features(torch.from_numpy(self.keypoints).float(), torch.from_numpy(self.scores.astype(np.float32)),
                        descriptors, self.image_size, self.descriptor_type).to(device)


@dataclass
class RetrievalConfig:
    top_k: int = 5
    exclude_recent_seconds: float = 10.0  # keyframes closer in time than this to the query are never candidates
    exclude_recent_count: int = 20  # nor the last N inserted keyframes
    min_score: float = -1.0  # candidates below this global similarity are dropped (-1: none; cosine can be < 0)

    def __post_init__(self) -> None:
        from feature_matching_ros.config import _check_range

        _check_range("top_k", self.top_k, 1, 100)
        _check_range("exclude_recent_seconds", self.exclude_recent_seconds, 0.0, 1e7)
        _check_range("exclude_recent_count", self.exclude_recent_count, 0, 1_000_000)
        _check_range("min_score", self.min_score, -1.0, 1.0)
        self.top_k, self.exclude_recent_count = int(self.top_k), int(self.exclude_recent_count)


@dataclass
class Candidate:
    position: int  # index in the database (insertion order)
    keyframe_id: int
    score: float


class BowInvertedIndex:
    """Inverted file for L1-normalised bag-of-words vectors; score = sum_w min(q_w, d_w) (DBoW2 L1 score).

    Postings live in a CSR matrix (words x keyframes); new keyframes go to a small tail that is merged
    every ``merge_every`` additions, so online insert+query stays cheap without rebuilding per keyframe."""

    def __init__(self, dim: int, merge_every: int = 512) -> None:
        self.dim = dim
        self.merge_every = merge_every
        self._by_word = sp.csr_matrix((dim, 0), dtype=np.float32)
        self._tail: list[sp.csr_matrix] = []

    @property
    def ntotal(self) -> int:
        return int(self._by_word.shape[1]) + len(self._tail)

    def add(self, vectors: np.ndarray) -> None:
        for vector in np.atleast_2d(vectors):
            self._tail.append(sp.csr_matrix(vector.astype(np.float32).reshape(1, -1)))
        if len(self._tail) >= self.merge_every:
            self._merge()

    def _merge(self) -> None:
        if self._tail:
            tail = sp.vstack(self._tail).T.tocsr()
            self._by_word = sp.hstack([self._by_word, tail]).tocsr()
            self._tail = []

    @staticmethod
    def _min_scores(by_word: sp.csr_matrix, words: np.ndarray, weights: np.ndarray) -> np.ndarray:
        postings = by_word[words]  # (query words, keyframes)
        postings.data = np.minimum(postings.data, np.repeat(weights, np.diff(postings.indptr)))
        return np.asarray(postings.sum(axis=0)).ravel()

    def scores(self, query: np.ndarray) -> np.ndarray:
        words = np.flatnonzero(query)
        weights = query[words].astype(np.float32)
        parts = [self._min_scores(self._by_word, words, weights)]
        if self._tail:
            parts.append(self._min_scores(sp.vstack(self._tail).T.tocsr(), words, weights))
        return np.concatenate(parts)


class ExactInnerProduct:
    """Exact inner-product scores of one query against every stored (dim,) vector, in numpy: faiss ``IndexFlatIP``
    for installs without faiss (same ranking up to float rounding)."""

    def __init__(self, dim: int) -> None:
        self._buffer = np.zeros((64, dim), np.float32)  # grows by doubling: adding one keyframe is O(1) amortised
        self.ntotal = 0

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32)
        needed = self.ntotal + len(vectors)
        if needed > len(self._buffer):
            grown = np.zeros((max(needed, 2 * len(self._buffer)), self._buffer.shape[1]), np.float32)
            grown[:self.ntotal] = self._buffer[:self.ntotal]
            self._buffer = grown
        self._buffer[self.ntotal:needed] = vectors
        self.ntotal = needed

    def scores(self, vector: np.ndarray) -> np.ndarray:
        """(dim,) query -> (ntotal,) float32 inner products."""
        return self._buffer[:self.ntotal] @ np.asarray(vector, np.float32)


class KeyframeDatabase:
    """Keyframes in insertion order plus a global index. ``kind``: "vlad" (faiss IP, or numpy without faiss) or
    "bow" (inverted file)."""

    def __init__(self, kind: str, global_dim: int, config: RetrievalConfig | None = None) -> None:
        if kind not in ("vlad", "bow"):
            raise ValueError(f"kind={kind!r} is not valid; allowed: vlad, bow")
        self.kind, self.global_dim = kind, int(global_dim)
        self.config = config or RetrievalConfig()
        self.keyframes: list[Keyframe] = []
        if kind == "vlad":
            try:
                import faiss

                self._index = faiss.IndexFlatIP(self.global_dim)
            except ImportError:
                self._index = ExactInnerProduct(self.global_dim)
        else:
            self._index = BowInvertedIndex(self.global_dim)
        self._stamps = np.zeros(0, np.int64)
        self._verifiable = np.zeros(0, bool)
        self._ids: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keyframes)

    def __contains__(self, keyframe_id: int) -> bool:
        return keyframe_id in self._ids

    def position_of(self, keyframe_id: int) -> int:
        return self._ids[keyframe_id]

    def get(self, keyframe_id: int) -> Keyframe:
        return self.keyframes[self._ids[keyframe_id]]

    def add(self, keyframe: Keyframe) -> None:
        if keyframe.id in self._ids:
            raise ValueError(f"keyframe id {keyframe.id} is already in the database")
        if keyframe.global_descriptor.shape != (self.global_dim,):
            raise ValueError(f"global descriptor of shape {keyframe.global_descriptor.shape}, database expects "
                             f"({self.global_dim},)")
        self.add_many([keyframe])

    def add_many(self, keyframes: list[Keyframe]) -> None:
        if not keyframes:
            return
        vectors = np.stack([k.global_descriptor for k in keyframes]).astype(np.float32)
        self._index.add(np.ascontiguousarray(vectors))
        for keyframe in keyframes:
            self._ids[keyframe.id] = len(self.keyframes)
            self.keyframes.append(keyframe)
        self._stamps = np.concatenate([self._stamps, [k.stamp_ns for k in keyframes]]).astype(np.int64)
        self._verifiable = np.concatenate([self._verifiable, [len(k) > 0 or k.image is not None for k in keyframes]])

    def eligible_mask(self, query_stamp_ns: int | None, exclude_ids: set[int] | None = None,
                      exclude_recent: bool = True) -> np.ndarray:
        """Boolean mask over positions of keyframes that may be returned for this query. Keyframes without
        keypoints (textureless, or pose-only) can never verify and are never candidates."""
        mask = self._verifiable.copy()
        if exclude_recent:
            if self.config.exclude_recent_count:
                mask[max(0, len(self) - self.config.exclude_recent_count):] = False
            if query_stamp_ns is not None:
                window_ns = int(self.config.exclude_recent_seconds * 1e9)
                mask &= np.abs(self._stamps - int(query_stamp_ns)) >= window_ns
        for keyframe_id in exclude_ids or ():
            if keyframe_id in self._ids:
                mask[self._ids[keyframe_id]] = False
        return mask

    def query(self, global_descriptor: np.ndarray, query_stamp_ns: int | None = None, top_k: int | None = None,
              exclude_ids: set[int] | None = None, exclude_recent: bool = True) -> list[Candidate]:
        """Top-k eligible keyframes by global similarity, best first.

        ``exclude_recent=False`` (relocalization: the camera is lost, any keyframe may be where it is) keeps
        only the ``exclude_ids`` exclusion."""
        top_k = top_k or self.config.top_k
        if not len(self):
            return []
        mask = self.eligible_mask(query_stamp_ns, exclude_ids, exclude_recent)
        if not mask.any():
            return []
        vector = np.asarray(global_descriptor, np.float32).reshape(1, -1)
        if self.kind == "vlad" and not isinstance(self._index, ExactInnerProduct):
            import faiss

            k = min(top_k, int(mask.sum()))
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
            scores, positions = self._index.search(vector, k, params=faiss.SearchParameters(sel=selector))
            scores, positions = scores[0], positions[0]
        else:
            all_scores = self._index.scores(vector[0])
            all_scores[~mask] = -np.inf
            k = min(top_k, int(mask.sum()))
            positions = np.argpartition(-all_scores, k - 1)[:k]
            positions = positions[np.argsort(-all_scores[positions], kind="stable")]
            scores = all_scores[positions]
        return [Candidate(int(p), self.keyframes[int(p)].id, float(s)) for p, s in zip(positions, scores)
                if p >= 0 and s >= self.config.min_score]
