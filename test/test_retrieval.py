"""Keyframe database, global descriptors and map persistence on real photos (ORB, small sizes)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")

from feature_matching_ros.config import FeatureConfig  # noqa: E402
from feature_matching_ros.features import FeatureExtractor  # noqa: E402
from feature_matching_ros.retrieval import (Keyframe, KeyframeDatabase, MapFormatError, RetrievalConfig,  # noqa: E402
                                            load_map, save_map)
from feature_matching_ros.retrieval.global_descriptors import (bow_l1_score, load_codebook, save_codebook,  # noqa: E402
                                                               train_binary_vocabulary, train_vlad_codebook)
from feature_matching_ros.retrieval.persistence import MapTargetError, check_compatible, check_save_target  # noqa: E402

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel")
K = np.array([[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]])


def _photo(name: str) -> np.ndarray:
    import cv2

    image = getattr(skimage_data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return cv2.resize(image[..., :3], (320, 240), interpolation=cv2.INTER_AREA)


def _crop_view(image: np.ndarray, shift: int) -> np.ndarray:
    """Another view of the same place: a shifted, slightly zoomed crop."""
    import cv2

    h, w = image.shape[:2]
    crop = image[shift // 2: h - shift // 2, shift: w]
    return cv2.resize(crop, (w, h))


@pytest.fixture(scope="module")
def orb_features():
    extractor = FeatureExtractor(FeatureConfig(detector="orb", descriptor="native", max_keypoints=256, resize_max=0))
    return {name: extractor(_photo(name)) for name in PHOTOS} | {
        f"{name}_view": extractor(_crop_view(_photo(name), 24)) for name in PHOTOS}


@pytest.fixture(scope="module")
def vocabulary(orb_features):
    sets = [f.descriptors.numpy() for name, f in orb_features.items() if not name.endswith("_view")]
    return train_binary_vocabulary(sets, "orb", words=128, iterations=5)


def _database(orb_features, vocabulary, config=None, with_depth=False):
    database = KeyframeDatabase("bow", vocabulary.dim, config or RetrievalConfig(top_k=3, exclude_recent_seconds=0,
                                                                                 exclude_recent_count=0))
    rng = np.random.default_rng(0)
    for i, name in enumerate(PHOTOS):
        features = orb_features[name]
        depth = rng.uniform(1, 5, (240, 320)).astype(np.float32) if with_depth else None
        if depth is not None:
            depth[:10] = np.nan
        pose = np.eye(4)
        pose[:3, 3] = [i, 0, 0]
        database.add(Keyframe.from_features(i, i * 1_000_000_000, features, K,
                                            vocabulary(features.descriptors.numpy()), pose if i % 2 else None, depth))
    return database


def test_bow_retrieves_the_same_place(orb_features, vocabulary):
    database = _database(orb_features, vocabulary)
    hits = 0
    for i, name in enumerate(PHOTOS):
        query = vocabulary(orb_features[f"{name}_view"].descriptors.numpy())
        candidates = database.query(query)
        hits += candidates[0].keyframe_id == i
        assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)
    assert hits >= len(PHOTOS) - 1, f"only {hits}/{len(PHOTOS)} views retrieved their photo first"


def test_bow_score_is_dbow2_l1(vocabulary, orb_features):
    a = vocabulary(orb_features["coffee"].descriptors.numpy())
    b = vocabulary(orb_features["coffee_view"].descriptors.numpy())
    assert np.isclose(a.sum(), 1.0) and np.isclose(b.sum(), 1.0)
    database = KeyframeDatabase("bow", vocabulary.dim)
    database.add(Keyframe.from_features(0, 0, orb_features["coffee"], K, a))
    inverted = database._index.scores(b)[0]
    assert np.isclose(inverted, bow_l1_score(a, b), atol=1e-5)
    assert np.isclose(np.minimum(a, b).sum(), bow_l1_score(a, b), atol=1e-5)


def test_keyframes_without_keypoints_are_never_candidates(orb_features, vocabulary):
    """A keyframe that cannot verify (no keypoints: textureless, or a pose-only keyframe) takes no top-k slot."""
    database = _database(orb_features, vocabulary, RetrievalConfig(top_k=8, exclude_recent_seconds=0,
                                                                   exclude_recent_count=0))
    query = vocabulary(orb_features["gravel_view"].descriptors.numpy())
    database.add(Keyframe(99, 99_000_000_000, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8),
                          np.zeros(0, np.float16), (320, 240), "orb", K, query))  # the query's own vector
    ids = [c.keyframe_id for c in database.query(query)]
    assert 99 not in ids and len(ids) == len(PHOTOS)


def test_exclusion_windows(orb_features, vocabulary):
    # 8 keyframes 1 s apart; query at t=7.5 s for the place of keyframe 7
    config = RetrievalConfig(top_k=8, exclude_recent_seconds=3.0, exclude_recent_count=0)
    database = _database(orb_features, vocabulary, config)
    query = vocabulary(orb_features["gravel_view"].descriptors.numpy())  # gravel is keyframe 7
    ids = [c.keyframe_id for c in database.query(query, query_stamp_ns=7_500_000_000)]
    assert ids and max(ids) <= 4, ids  # 5, 6, 7 are within 3 s
    database.config.exclude_recent_seconds = 0.0
    database.config.exclude_recent_count = 2
    ids = [c.keyframe_id for c in database.query(query, query_stamp_ns=7_500_000_000)]
    assert 6 not in ids and 7 not in ids and len(ids) == 6
    ids = [c.keyframe_id for c in database.query(query, query_stamp_ns=None, exclude_ids={0, 1})]
    assert set(ids) == {2, 3, 4, 5}
    # relocalization ignores the recency windows
    ids = [c.keyframe_id for c in database.query(query, exclude_recent=False)]
    assert ids[0] == 7


def test_vlad_faiss_exclusion_and_ranking():
    """VLAD on ALIKED-free data: real ORB keypoints are binary, so use SIFT float descriptors of real photos."""
    extractor = FeatureExtractor(FeatureConfig(detector="sift", descriptor="native", max_keypoints=256, resize_max=0))
    features = {name: extractor(_photo(name)) for name in PHOTOS}
    sets = {name: f.descriptors.numpy() for name, f in features.items()}
    views = {name: extractor(_crop_view(_photo(name), 24)).descriptors.numpy() for name in PHOTOS}
    codebook = train_vlad_codebook(list(sets.values()) + list(views.values()), "sift", clusters=8, pca_dim=0)
    assert codebook.dim == 8 * 128
    database = KeyframeDatabase("vlad", codebook.dim, RetrievalConfig(top_k=3, exclude_recent_seconds=1.5,
                                                                       exclude_recent_count=0))
    for i, name in enumerate(PHOTOS):
        vector = codebook(sets[name])
        assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
        database.add(Keyframe.from_features(i, i * 1_000_000_000, features[name], K, vector))
    hits = sum(database.query(codebook(views[name]))[0].keyframe_id == i for i, name in enumerate(PHOTOS))
    assert hits >= len(PHOTOS) - 1
    ids = [c.keyframe_id for c in database.query(codebook(views["gravel"]), query_stamp_ns=7_000_000_000)]
    assert all(i <= 5 for i in ids) and len(ids) == 3


def test_codebook_round_trip_and_no_pickle(tmp_path, vocabulary):
    path = tmp_path / "vocab.npz"
    save_codebook(vocabulary, path, {"note": "test"})
    loaded = load_codebook(path)
    assert np.array_equal(loaded.words, vocabulary.words) and np.allclose(loaded.idf, vocabulary.idf)
    np.savez(tmp_path / "evil.npz", meta_json=np.array([{"a": 1}], dtype=object))
    with pytest.raises(Exception, match="pickle|corrupt"):
        load_codebook(tmp_path / "evil.npz")


# ------------------------------------------------------------------------------------------------ persistence

FEATURES = FeatureConfig(detector="orb", descriptor="native", max_keypoints=256, resize_max=0)


@pytest.fixture()
def saved_map(tmp_path, orb_features, vocabulary):
    database = _database(orb_features, vocabulary, with_depth=True)
    directory = save_map(database, tmp_path / "map", vars(FEATURES), {"codebook_sha256": "x"})
    return database, directory


def test_map_round_trip(saved_map):
    database, directory = saved_map
    loaded, manifest = load_map(directory, vars(FEATURES))
    assert manifest["counts"]["keyframes"] == len(database) == len(loaded)
    for a, b in zip(database.keyframes, loaded.keyframes):
        assert a.id == b.id and a.stamp_ns == b.stamp_ns and a.image_size == b.image_size
        for name in ("keypoints", "descriptors", "scores", "K", "global_descriptor"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(a.depth_at_keypoints, b.depth_at_keypoints, equal_nan=True)
        assert (a.T_map_camera is None) == (b.T_map_camera is None)
        if a.T_map_camera is not None:
            assert np.array_equal(a.T_map_camera, b.T_map_camera)
        assert b.descriptors.dtype == np.uint8
    query = database.keyframes[3].global_descriptor
    assert [c.keyframe_id for c in database.query(query)] == [c.keyframe_id for c in loaded.query(query)]
    # depth is kept per keypoint, NaN where invalid
    assert np.isnan(loaded.keyframes[0].depth_at_keypoints[database.keyframes[0].keypoints[:, 1] < 9.5]).all()
    assert torch.equal(loaded.keyframes[0].to_features().descriptors, database.keyframes[0].to_features().descriptors)


def test_map_rejects_truncated_file(saved_map):
    _, directory = saved_map
    path = directory / "keypoints.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MapFormatError, match="truncated"):
        load_map(directory)


def test_map_rejects_flipped_byte(saved_map):
    _, directory = saved_map
    path = directory / "descriptors.npy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(MapFormatError, match="corrupt"):
        load_map(directory)


def test_map_rejects_wrong_version_and_missing_file(saved_map):
    _, directory = saved_map
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "scores.npy").unlink()
    with pytest.raises(MapFormatError, match="missing"):
        load_map(directory)
    manifest["format_version"] = 999
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapFormatError, match="format_version"):
        load_map(directory)
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(MapFormatError, match="corrupt"):
        load_map(directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(MapFormatError, match="manifest.json is missing"):
        load_map(directory)


def test_map_rejects_pickled_array_even_with_matching_checksum(saved_map):
    """A crafted map whose manifest checksums match an object array must still not be unpickled."""
    import hashlib
    import io

    _, directory = saved_map
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    data = buffer.getvalue()
    (directory / "ids.npy").write_bytes(data)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["ids.npy"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapFormatError, match="pickle"):
        load_map(directory)


def test_map_rejects_other_feature_config(saved_map):
    _, directory = saved_map
    other = vars(FeatureConfig(detector="orb", descriptor="aliked", max_keypoints=256, resize_max=0))
    with pytest.raises(MapFormatError, match="descriptor: map='native' pipeline='aliked'"):
        load_map(directory, other)
    manifest = json.loads((directory / "manifest.json").read_text())
    check_compatible(manifest, vars(FEATURES))  # same config passes


def test_save_replaces_existing_map_atomically(saved_map, orb_features, vocabulary):
    database, directory = saved_map
    smaller = KeyframeDatabase("bow", vocabulary.dim)
    smaller.add(database.keyframes[0])
    save_map(smaller, directory, vars(FEATURES), {})
    loaded, _ = load_map(directory)
    assert len(loaded) == 1
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    shutil.rmtree(directory)


def test_save_refuses_a_directory_it_did_not_write(saved_map, tmp_path):
    """SaveMap must never delete the user's data: a foreign directory, a file, or a map with files added."""
    database, _ = saved_map
    foreign = tmp_path / "documents"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "important.txt").write_text("keep me")
    (foreign / "sub" / "x.txt").write_text("and me")
    with pytest.raises(MapTargetError, match="not a feature_matching_ros.map map.*important.txt"):
        save_map(database, foreign, vars(FEATURES), {})
    assert (foreign / "important.txt").read_text() == "keep me" and (foreign / "sub" / "x.txt").read_text() == "and me"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file")
    with pytest.raises(MapTargetError, match="is a file"):
        save_map(database, a_file, vars(FEATURES), {})
    assert a_file.read_text() == "a file"
    _, directory = saved_map
    (directory / "my_notes.md").write_text("added by the user")
    with pytest.raises(MapTargetError, match="other files added.*my_notes.md"):
        save_map(database, directory, vars(FEATURES), {})
    assert (directory / "my_notes.md").is_file() and load_map(directory)[0].keyframes[0].id == database.keyframes[0].id
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # refused before writing anything


def test_save_into_an_empty_directory_and_the_manifest_marks_the_map(saved_map, tmp_path):
    database, _ = saved_map
    empty = tmp_path / "empty"
    empty.mkdir()
    save_map(database, empty, vars(FEATURES), {})
    manifest = json.loads((empty / "manifest.json").read_text())
    assert manifest["format"] == "feature_matching_ros.map"
    assert check_save_target(empty) is True  # ours: may be replaced
    assert sorted(p.name for p in empty.iterdir()) == sorted(["manifest.json", *manifest["files"]])
    assert oct(empty.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # like a directory the user made
    assert check_save_target(tmp_path / "new" / "map") is False


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_retrieval_without_faiss_gives_the_faiss_answers(monkeypatch):
    """VLAD assignment always, and the keyframe search where faiss is not installed, run exactly in numpy: the
    same nearest centroids as faiss's IndexFlatL2, and the same VLAD vectors and candidates, in the same order,
    on real SIFT descriptors of real photos."""
    import sys

    import faiss

    from feature_matching_ros.retrieval.database import ExactInnerProduct
    from feature_matching_ros.retrieval.global_descriptors import VladCodebook, nearest_centroids

    extractor = FeatureExtractor(FeatureConfig(detector="sift", descriptor="native", max_keypoints=256, resize_max=0))
    features = {name: extractor(_photo(name)) for name in PHOTOS}
    sets = {name: f.descriptors.numpy() for name, f in features.items()}
    views = {name: extractor(_crop_view(_photo(name), 24)).descriptors.numpy() for name in PHOTOS}
    with_faiss = train_vlad_codebook(list(sets.values()), "sift", clusters=8, pca_dim=0)
    flat = faiss.IndexFlatL2(with_faiss.descriptor_dim)
    flat.add(with_faiss.centroids)
    for descriptors in [*sets.values(), *views.values()]:
        assert np.array_equal(nearest_centroids(torch.from_numpy(descriptors).float(),
                                                torch.from_numpy(with_faiss.centroids)).numpy(),
                              flat.search(np.ascontiguousarray(descriptors, np.float32), 1)[1].ravel())
    config = RetrievalConfig(top_k=4, exclude_recent_seconds=1.5, exclude_recent_count=0)

    def build(codebook):
        database = KeyframeDatabase("vlad", codebook.dim, config)
        for i, name in enumerate(PHOTOS):
            database.add(Keyframe.from_features(i, i * 1_000_000_000, features[name], K, codebook(sets[name])))
        return database

    reference = build(with_faiss)
    stamps = (None, 7_000_000_000)
    expected = {(name, stamp): (with_faiss(views[name]), reference.query(with_faiss(views[name]), query_stamp_ns=stamp))
                for name in PHOTOS for stamp in stamps}
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    without = VladCodebook(with_faiss.descriptor_type, with_faiss.centroids, with_faiss.pca_mean,
                           with_faiss.pca_projection)
    database = build(without)
    assert isinstance(database._index, ExactInnerProduct)
    grown, stored = ExactInnerProduct(without.dim), np.stack([without(sets[name]) for name in PHOTOS] * 20)
    for start in range(0, len(stored), 7):  # past its first buffer, in uneven chunks
        grown.add(stored[start:start + 7])
    assert grown.ntotal == 160 and np.allclose(grown.scores(stored[3]), stored @ stored[3], atol=1e-6)
    for (name, stamp), (vector, candidates) in expected.items():
        assert np.allclose(without(views[name]), vector, atol=1e-6)
        got = database.query(without(views[name]), query_stamp_ns=stamp)
        assert [c.keyframe_id for c in got] == [c.keyframe_id for c in candidates] and len(got) == 4
        assert np.allclose([c.score for c in got], [c.score for c in candidates], atol=1e-5)
