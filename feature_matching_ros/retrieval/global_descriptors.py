"""Global (whole-image) descriptors for place recognition: VLAD on float descriptors, bag of binary words on ORB.

* :class:`VladCodebook` — hard-assignment VLAD (Jegou et al. 2010; the NetVLAD-style normalisations of
  Arandjelovic & Zisserman 2013): residuals to the nearest of K centroids summed per centroid, then
  intra-normalisation (per-centroid L2), signed square root (power norm) and a final L2 norm, then optional
  PCA-whitening to ``pca_dim`` dims and a final L2 norm, so the inner product of two descriptors is their
  cosine similarity and faiss ``IndexFlatIP`` ranks by it. Assignment is an exact L2 nearest centroid
  (:func:`nearest_centroids`, one small product); the math runs in torch on the descriptors' device.
* :class:`BinaryVocabulary` — bag of binary words the ORB-SLAM3 / DBoW2 way but with a flat vocabulary:
  words are k-majority centroids of 256-bit ORB descriptors (k-medoids-like clustering in Hamming space,
  centroid bit = majority vote), tf-idf weights, L1-normalised vectors and the DBoW2 L1 score
  ``s(a, b) = 1 - 0.5 |a - b|_1 = sum_w min(a_w, b_w)``. A flat vocabulary of a few thousand words with a
  faiss ``IndexBinaryFlat`` assignment is as fast as a tree at this size and has no quantisation cascade.
  The L1 score is not an inner product, so BoW vectors are scored through an inverted file
  (:class:`BowInvertedIndex` in ``database.py``), as DBoW2 does, rather than through faiss.

Training (``train_vlad_codebook``, ``train_binary_vocabulary``) uses faiss k-means / binary assignment;
faiss has no k-majority, hence the small loop here. Codebooks are stored as ``.npz`` without pickle,
with the descriptor type they were trained on, and refuse descriptors of another type or dimension.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CODEBOOK_FORMAT_VERSION = 1
RESOURCE_DIR = Path(__file__).resolve().parents[2] / "resource" / "retrieval"
# Shipped codebooks, by the descriptor type they describe (see resource/retrieval/CODEBOOKS.md).
DEFAULT_CODEBOOKS = {"aliked": "vlad_aliked_k64.npz", "orb": "bow_orb_k4096.npz", "xfeat": "vlad_xfeat_k64.npz"}


class CodebookError(ValueError):
    """A codebook file is missing, malformed, or does not fit the descriptors given to it."""


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _faiss():
    import faiss

    return faiss


def nearest_centroids(descriptors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, D) and (K, D) float32 -> (N,) int64 index of the exact L2-nearest centroid: faiss
    ``IndexFlatL2.search(x, 1)``'s answer (up to float rounding on near ties) as one small product."""
    return ((centroids * centroids).sum(1)[None] - 2.0 * descriptors @ centroids.T).argmin(1)


@dataclass
class VladCodebook:
    """centroids: (K, D) float32; pca_mean (K*D,), pca_projection (P, K*D) rows already divided by
    sqrt(eigenvalue + eps) when whitening; both None without PCA."""

    descriptor_type: str
    centroids: np.ndarray
    pca_mean: np.ndarray | None = None
    pca_projection: np.ndarray | None = None
    kind: str = "vlad"

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        # The math runs in torch on the descriptors' device (the GPU's when they come from it), in torch's own
        # thread pool: numpy's BLAS threads after a torch network, or after a faiss search, wait on the other
        # pool's spinning threads (10 ms for a 0.5 ms descriptor on 2 cores).
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}

    @property
    def descriptor_dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def dim(self) -> int:
        return int(self.pca_projection.shape[0]) if self.pca_projection is not None else self.raw_dim

    @property
    def raw_dim(self) -> int:
        return int(self.centroids.size)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(centroids, pca_mean, pca_projection) as float32 tensors on ``device``, copied once."""
        if device not in self._tensors:
            def to(array: np.ndarray | None) -> torch.Tensor | None:
                return None if array is None else torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(device)
            self._tensors[device] = (to(self.centroids), to(self.pca_mean), to(self.pca_projection))
        return self._tensors[device]

    @torch.inference_mode()
    def _raw(self, descriptors: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(descriptors, np.ndarray):
            descriptors = torch.from_numpy(np.ascontiguousarray(descriptors, dtype=np.float32))
        descriptors = descriptors.float()
        if descriptors.ndim != 2 or descriptors.shape[1] != self.descriptor_dim:
            raise CodebookError(f"VLAD codebook ({self.descriptor_type}) expects (N, {self.descriptor_dim}) "
                                f"descriptors, got {tuple(descriptors.shape)}")
        centroids = self._on(descriptors.device)[0]
        k = len(centroids)
        if len(descriptors):
            assignment = nearest_centroids(descriptors, centroids)
            # Residual sums per centroid: assigned descriptors summed (a one-hot product, deterministic on the
            # GPU unlike scatter-adds) minus count x centroid.
            members = F.one_hot(assignment, k).T.float()
            vlad = members @ descriptors - members.sum(1, keepdim=True) * centroids
        else:
            vlad = torch.zeros_like(centroids)
        vlad = F.normalize(vlad, dim=1).flatten()  # intra-normalisation (empty clusters stay zero)
        vlad = vlad.sign() * vlad.abs().sqrt()  # power normalisation (burstiness)
        return vlad / vlad.norm().clamp_min(1e-12)

    def raw_vlad(self, descriptors: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, D) float descriptors -> (K*D,) intra-normalised, power-normalised, L2-normalised VLAD."""
        return self._raw(descriptors).cpu().numpy()

    @torch.inference_mode()
    def __call__(self, descriptors: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, D) array or tensor (on any device) -> (dim,) float32 unit vector."""
        vlad = self._raw(descriptors)
        if self.pca_projection is None:
            return vlad.cpu().numpy()
        _, mean, projection = self._on(vlad.device)
        reduced = projection @ (vlad - mean)
        return (reduced / reduced.norm().clamp_min(1e-12)).cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"centroids": self.centroids}
        if self.pca_projection is not None:
            out |= {"pca_mean": self.pca_mean.astype(np.float32), "pca_projection": self.pca_projection.astype(np.float32)}
        return out


@dataclass
class BinaryVocabulary:
    """words: (K, 32) uint8 packed 256-bit centroids; idf: (K,) float32 inverse document frequency."""

    descriptor_type: str
    words: np.ndarray
    idf: np.ndarray
    kind: str = "bow"

    def __post_init__(self) -> None:
        self.words = np.ascontiguousarray(self.words, dtype=np.uint8)
        self.idf = np.asarray(self.idf, dtype=np.float32)
        self._index = _faiss().IndexBinaryFlat(self.words.shape[1] * 8)
        self._index.add(self.words)

    @property
    def dim(self) -> int:
        return int(len(self.words))

    def assign(self, descriptors: np.ndarray) -> np.ndarray:
        descriptors = np.ascontiguousarray(descriptors, dtype=np.uint8)
        if descriptors.ndim != 2 or descriptors.shape[1] != self.words.shape[1]:
            raise CodebookError(f"binary vocabulary expects (N, {self.words.shape[1]}) uint8 descriptors, "
                                f"got {descriptors.shape} {descriptors.dtype}")
        if not len(descriptors):
            return np.zeros(0, np.int64)
        _, assignment = self._index.search(descriptors, 1)
        return assignment.ravel().astype(np.int64)

    def __call__(self, descriptors: np.ndarray) -> np.ndarray:
        """(N, 32) uint8 -> (K,) float32 tf-idf vector, L1-normalised (zeros for no descriptors)."""
        words = self.assign(descriptors)
        vector = np.bincount(words, minlength=self.dim).astype(np.float32)
        if len(words):
            vector = vector / len(words) * self.idf  # tf * idf
        total = float(vector.sum())
        return vector / total if total > 0 else vector

    def arrays(self) -> dict[str, np.ndarray]:
        return {"words": self.words, "idf": self.idf}


GlobalDescriptor = VladCodebook | BinaryVocabulary


def bow_l1_score(a: np.ndarray, b: np.ndarray) -> float:
    """DBoW2 L1 score of two L1-normalised non-negative vectors: 1 - 0.5 |a - b|_1 (in [0, 1])."""
    return float(1.0 - 0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


def save_codebook(codebook: GlobalDescriptor, path: Path | str, card: dict[str, Any] | None = None) -> str:
    """Write ``.npz`` (no pickle: metadata is a JSON string stored as a uint8 array). Returns the sha256."""
    path = Path(path)
    meta = {"format_version": CODEBOOK_FORMAT_VERSION, "kind": codebook.kind,
            "descriptor_type": codebook.descriptor_type, "card": card or {}}
    arrays = codebook.arrays() | {"meta_json": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return sha256_file(path)


def load_codebook(path: Path | str) -> GlobalDescriptor:
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"codebook {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(bytes(arrays.pop("meta_json")).decode())
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        raise CodebookError(f"codebook {path} is unreadable or corrupt: {error}") from error
    if meta.get("format_version") != CODEBOOK_FORMAT_VERSION:
        raise CodebookError(f"codebook {path} has format_version {meta.get('format_version')}, "
                            f"this code reads {CODEBOOK_FORMAT_VERSION}")
    if meta["kind"] == "vlad":
        return VladCodebook(meta["descriptor_type"], arrays["centroids"], arrays.get("pca_mean"),
                            arrays.get("pca_projection"))
    if meta["kind"] == "bow":
        return BinaryVocabulary(meta["descriptor_type"], arrays["words"], arrays["idf"])
    raise CodebookError(f"codebook {path} has unknown kind {meta['kind']!r}; known: vlad, bow")


def default_codebook_path(descriptor_type: str) -> Path:
    if descriptor_type not in DEFAULT_CODEBOOKS:
        raise CodebookError(f"no shipped codebook for {descriptor_type} descriptors (shipped: "
                            f"{', '.join(DEFAULT_CODEBOOKS)}); train one with `fmr train-codebook` and set "
                            "engine.codebook to its path")
    return RESOURCE_DIR / DEFAULT_CODEBOOKS[descriptor_type]


# ----------------------------------------------------------------------------------------------- training


def train_vlad_codebook(descriptor_sets: list[np.ndarray], descriptor_type: str, clusters: int = 64,
                        pca_dim: int = 256, whiten: bool = True, iterations: int = 25, seed: int = 0,
                        max_training_descriptors: int = 200_000) -> VladCodebook:
    """faiss k-means on the pooled descriptors, then PCA(-whitening) fitted on the images' raw VLADs.

    ``descriptor_sets``: one (N_i, D) float array per training image. ``pca_dim=0`` disables PCA;
    it is capped at (number of images - 1) since PCA cannot find more directions than that.
    """
    faiss = _faiss()
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([d for d in descriptor_sets if len(d)]).astype(np.float32)
    if len(pooled) > max_training_descriptors:
        pooled = pooled[rng.choice(len(pooled), max_training_descriptors, replace=False)]
    if len(pooled) < clusters * 39:
        raise CodebookError(f"{len(pooled)} descriptors are too few for {clusters} clusters (need >= {clusters * 39})")
    kmeans = faiss.Kmeans(pooled.shape[1], clusters, niter=iterations, seed=seed, verbose=False)
    kmeans.train(np.ascontiguousarray(pooled))
    codebook = VladCodebook(descriptor_type, kmeans.centroids)
    if pca_dim:
        raw = np.stack([codebook.raw_vlad(d) for d in descriptor_sets])
        pca_dim = min(pca_dim, len(raw) - 1)
        mean = raw.mean(0)
        # SVD of the centred data: right singular vectors are the principal directions.
        _, singular, vt = np.linalg.svd(raw - mean, full_matrices=False)
        eigenvalues = singular[:pca_dim] ** 2 / max(len(raw) - 1, 1)
        projection = vt[:pca_dim]
        if whiten:
            # Regularised whitening: dividing by sqrt(lambda + eps) keeps tiny eigenvalues from amplifying noise.
            projection = projection / np.sqrt(eigenvalues + eigenvalues.mean() * 0.1)[:, None]
        codebook = VladCodebook(descriptor_type, kmeans.centroids, mean.astype(np.float32),
                                projection.astype(np.float32))
    return codebook


def _majority_bits(packed: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(packed, axis=1)
    return np.packbits(bits.mean(0) >= 0.5)


def train_binary_vocabulary(descriptor_sets: list[np.ndarray], descriptor_type: str = "orb", words: int = 4096,
                            iterations: int = 10, seed: int = 0, max_training_descriptors: int = 300_000
                            ) -> BinaryVocabulary:
    """Flat k-majority clustering of packed binary descriptors (Hamming assignment by faiss), then idf from
    the per-image word occurrences: idf_w = log(N_images / n_images_with_w) (0 for words seen in every image;
    words never seen get the maximum log(N_images))."""
    faiss = _faiss()
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([d for d in descriptor_sets if len(d)]).astype(np.uint8)
    if len(pooled) > max_training_descriptors:
        pooled = pooled[rng.choice(len(pooled), max_training_descriptors, replace=False)]
    if len(pooled) < words * 4:
        raise CodebookError(f"{len(pooled)} descriptors are too few for {words} words (need >= {words * 4})")
    pooled = np.ascontiguousarray(pooled)
    centroids = pooled[rng.choice(len(pooled), words, replace=False)].copy()
    for _ in range(iterations):
        index = faiss.IndexBinaryFlat(pooled.shape[1] * 8)
        index.add(centroids)
        _, assignment = index.search(pooled, 1)
        assignment = assignment.ravel()
        order = np.argsort(assignment, kind="stable")
        bounds = np.searchsorted(assignment[order], np.arange(words + 1))
        for word in range(words):
            members = order[bounds[word]:bounds[word + 1]]
            if len(members):
                centroids[word] = _majority_bits(pooled[members])
            else:  # empty cluster: re-seed with a random descriptor
                centroids[word] = pooled[rng.integers(len(pooled))]
    vocabulary = BinaryVocabulary(descriptor_type, centroids, np.ones(words, np.float32))
    document_frequency = np.zeros(words, np.int64)
    for descriptors in descriptor_sets:
        if len(descriptors):
            document_frequency[np.unique(vocabulary.assign(descriptors))] += 1
    n_images = len(descriptor_sets)
    idf = np.log(n_images / np.maximum(document_frequency, 1)).astype(np.float32)
    return BinaryVocabulary(descriptor_type, centroids, idf)
