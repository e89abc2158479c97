"""Rendered sequences: exact ground truth, loop labels, bag round trips, determinism (small images, fast)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from feature_matching_ros.bag.sequence import SequenceBagWriter, SequenceFrame, read_raw_messages, read_sequence
from feature_matching_ros.scenes.builders import SCENE_KINDS, build_scene
from feature_matching_ros.scenes.loops import view_overlap
from feature_matching_ros.scenes.renderer import Renderer, default_intrinsics
from feature_matching_ros.scenes.sequence import generate_sequence, load_loops, load_sequence_metadata
from feature_matching_ros.scenes.trajectory import make_trajectory

W, H = 160, 120


def reproject(depth_a, K_a, T_map_a, K_b, T_map_b):
    """Pixel coordinates (float) in B and depth in B of every pixel of A (NaN where A has no depth)."""
    rows, cols = np.mgrid[0:depth_a.shape[0], 0:depth_a.shape[1]]
    pix = np.stack([cols, rows, np.ones_like(cols)], 0).reshape(3, -1).astype(np.float64)
    points = np.linalg.inv(K_a) @ pix * depth_a.reshape(1, -1)
    T_b_a = np.linalg.inv(T_map_b) @ T_map_a
    points_b = T_b_a[:3, :3] @ points + T_b_a[:3, 3:4]
    proj = K_b @ points_b
    with np.errstate(invalid="ignore", divide="ignore"):
        u, v = proj[0] / proj[2], proj[1] / proj[2]
    shape = depth_a.shape
    return u.reshape(shape).astype(np.float32), v.reshape(shape).astype(np.float32), points_b[2].reshape(shape)


def consistency(image_a, depth_a, K_a, T_a, image_b, depth_b, K_b, T_b, gain_invariant=False):
    """(photometric abs errors, relative depth errors, fraction used) over A's pixels visible and unoccluded
    in B. ``gain_invariant``: first scale B's samples by one global gain (images with different exposure)."""
    u, v, z_in_b = reproject(depth_a, K_a, T_a, K_b, T_b)
    depth_b_filled = np.nan_to_num(depth_b, nan=-1.0).astype(np.float32)
    sampled_depth = cv2.remap(depth_b_filled, u, v, cv2.INTER_LINEAR, borderValue=-1.0)
    # Away from depth edges: all four bilinear neighbours must agree, which rejects occlusion borders.
    neighbour_min = cv2.erode(depth_b_filled, np.ones((3, 3), np.uint8))
    neighbour_max = cv2.dilate(depth_b_filled, np.ones((3, 3), np.uint8))
    n_min = cv2.remap(neighbour_min, u, v, cv2.INTER_NEAREST, borderValue=-1.0)
    n_max = cv2.remap(neighbour_max, u, v, cv2.INTER_NEAREST, borderValue=-1.0)
    inside = (u > 1) & (u < depth_b.shape[1] - 2) & (v > 1) & (v < depth_b.shape[0] - 2)
    valid = (inside & np.isfinite(depth_a) & (z_in_b > 0) & (n_min > 0)
             & (np.abs(sampled_depth - z_in_b) < 0.02 * z_in_b) & ((n_max - n_min) < 0.05 * z_in_b))
    sampled = cv2.remap(image_b.astype(np.float32), u, v, cv2.INTER_LINEAR)
    sampled, original = sampled[valid], image_a.astype(np.float32)[valid]
    if gain_invariant:
        sampled = sampled * (np.median(original) / max(float(np.median(sampled)), 1e-6))
    photometric = np.abs(sampled - original)
    depth_error = np.abs(sampled_depth[valid] - z_in_b[valid]) / z_in_b[valid]
    return photometric, depth_error, valid.mean()


@pytest.mark.parametrize("kind", SCENE_KINDS)
def test_render_ground_truth_is_exact(kind):
    layout = build_scene(kind, 3)
    poses = make_trajectory(layout, 300, np.random.default_rng(5))
    renderer = Renderer(layout.scene)
    K = default_intrinsics(W, H)
    a, b = renderer.render(K, poses[40], W, H), renderer.render(K, poses[42], W, H)
    photometric, depth_error, fraction = consistency(a.rgb, a.depth, K, poses[40], b.rgb, b.depth, K, poses[42])
    assert fraction > 0.1, "frames 2 apart must share part of the view (grazing walls are excluded)"
    # Depth is exact up to float32 and bilinear interpolation on planes (linear in the image only approximately).
    assert np.median(depth_error) < 1e-3
    # Colours agree up to texture interpolation / mip-level differences between the two views.
    assert np.median(photometric) < 0.02 and np.percentile(photometric, 90) < 0.08
    # Control: a 10 cm / 1.5 degree pose error (about 3 px here) must be clearly visible to the same check.
    wrong = poses[42].copy()
    wrong[:3, 3] += wrong[:3, :3] @ np.array([0.10, 0.0, 0.0])
    wrong[:3, :3] = wrong[:3, :3] @ cv2.Rodrigues(np.array([0.0, np.radians(1.5), 0.0]))[0]
    photometric_wrong, _, _ = consistency(a.rgb, a.depth, K, poses[40], b.rgb, b.depth, K, wrong)
    assert np.median(photometric_wrong) > 2 * np.median(photometric)


@pytest.fixture(scope="module")
def office_sequence(tmp_path_factory):
    out = tmp_path_factory.mktemp("office")
    generate_sequence(out, "office", frames=90, seed=11, storage="mcap", width=W, height=H, progress=False)
    return out


def test_bag_frames_reproject_with_stored_poses(office_sequence):
    meta = load_sequence_metadata(office_sequence)
    frames = list(read_sequence(office_sequence / "bag"))
    assert len(frames) == meta["frames"] == 90
    gains = meta["exposure_gain"]
    checked = 0
    for i, j in [(10, 12), (30, 31), (50, 53)] + [tuple(p) for p in load_loops(office_sequence)[:3]]:
        fa, fb = frames[i], frames[j]
        assert fa.K is not None and np.allclose(fa.K, np.asarray(meta["K"]))
        photometric, depth_error, fraction = consistency(
            fa.image / (255.0 * gains[i]), fa.depth, fa.K, fa.T_map_camera,
            fb.image / (255.0 * gains[j]), fb.depth, fb.K, fb.T_map_camera)
        if fraction < 0.05:
            continue
        checked += 1
        assert np.median(depth_error) < 1e-3
        # Stored images carry 1 DN read noise and 8-bit rounding on top of the render.
        assert np.median(photometric) < 0.03, (i, j, np.median(photometric))
    assert checked >= 4


def test_loop_labels_agree_with_poses(office_sequence):
    meta = load_sequence_metadata(office_sequence)
    criteria = meta["loop_criteria"]
    loops = {tuple(p) for p in load_loops(office_sequence)}
    assert loops, "three laps must produce loop closures"
    frames = list(read_sequence(office_sequence / "bag"))
    poses = np.stack([f.T_map_camera for f in frames])
    centres = poses[:, :3, 3]
    # Labels come from coarse depth; recompute overlap at full resolution and allow a small margin.
    margin = 0.05
    for query in range(len(frames)):
        for match in range(query):
            labelled = (query, match) in loops
            gap_ok = query - match >= criteria["min_index_gap"]
            near = np.linalg.norm(centres[query] - centres[match]) < criteria["distance_m"]
            if labelled:
                assert gap_ok and near, (query, match)
            if not (gap_ok and near):
                continue
            fq, fm = frames[query], frames[match]
            overlap = min(view_overlap(fq.depth, fq.K, fq.T_map_camera, fm.depth, fm.K, fm.T_map_camera, stride=2),
                          view_overlap(fm.depth, fm.K, fm.T_map_camera, fq.depth, fq.K, fq.T_map_camera, stride=2))
            if labelled:
                assert overlap >= criteria["min_overlap"] - margin, (query, match, overlap)
            else:
                assert overlap < criteria["min_overlap"] + margin, (query, match, overlap)
    # Loops must exist between different laps, not only at the start/end seam of one lap.
    assert len({q // 30 for q, _ in loops}) >= 2


def _tiny_frames(rng, n=3):
    frames = []
    for k in range(n):
        depth = rng.uniform(0.5, 9.0, (H, W)).astype(np.float32)
        depth[0, :5] = np.nan
        T = np.eye(4)
        T[:3, :3] = cv2.Rodrigues(rng.normal(0, 1, 3))[0]
        T[:3, 3] = rng.normal(0, 5, 3)
        frames.append(SequenceFrame(k, 1_000_000_000 + k * 100_000_000, rng.integers(0, 256, (H, W, 3), np.uint8),
                                    depth, default_intrinsics(W, H), T, T @ np.diag([1.0, 1, 1, 1]),
                                    rng.normal(0, 1, 3), rng.normal(0, 1, 3)))
    return frames


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bag_round_trip(tmp_path, storage):
    frames = _tiny_frames(np.random.default_rng(0))
    with SequenceBagWriter(tmp_path / "bag", storage) as writer:
        for frame in frames:
            writer.write_frame(frame)
    back = list(read_sequence(tmp_path / "bag"))
    assert len(back) == len(frames)
    for original, read in zip(frames, back):
        assert read.index == original.index and read.stamp_ns == original.stamp_ns
        assert np.array_equal(read.image, original.image)
        assert np.array_equal(read.depth, original.depth, equal_nan=True) and read.depth.dtype == np.float32
        assert np.array_equal(read.K, original.K)
        assert np.allclose(read.T_map_camera, original.T_map_camera, atol=1e-12)
        assert np.allclose(read.T_odom_camera, original.T_odom_camera, atol=1e-12)
        assert np.array_equal(read.odom_linear_velocity, original.odom_linear_velocity)
    # Messages re-serialise to the same bytes (nothing lost in (de)serialisation).
    from feature_matching_ros.bag.convert import typestore

    store = typestore()
    raw = read_raw_messages(tmp_path / "bag")
    assert len(raw) == 5 * len(frames)
    from rosbags.rosbag2 import Reader

    with Reader(tmp_path / "bag") as reader:
        msgtypes = {c.topic: c.msgtype for c in reader.connections}
    for topic, _, data in raw:
        assert store.serialize_cdr(store.deserialize_cdr(data, msgtypes[topic]), msgtypes[topic]) == data


def test_bag_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="storage"):
        SequenceBagWriter(tmp_path / "x", "rosbag1")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        SequenceBagWriter(tmp_path / "exists")
    with pytest.raises(ValueError, match="scene"):
        generate_sequence(tmp_path / "y", "kitchen", frames=20)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_same_seed_same_bag_different_seed_differs(tmp_path, storage):
    kwargs = dict(scene="corridor", frames=24, storage=storage, width=64, height=48, progress=False)
    generate_sequence(tmp_path / "a", seed=4, **kwargs)
    generate_sequence(tmp_path / "b", seed=4, **kwargs)
    generate_sequence(tmp_path / "c", seed=5, **kwargs)
    raw_a, raw_b, raw_c = (read_raw_messages(tmp_path / name / "bag") for name in "abc")
    assert len(raw_a) == 24 * 5
    assert raw_a == raw_b
    assert (tmp_path / "a" / "loops.json").read_bytes() == (tmp_path / "b" / "loops.json").read_bytes()
    assert json.loads((tmp_path / "a" / "sequence.json").read_text()) == json.loads(
        (tmp_path / "b" / "sequence.json").read_text())
    images_a = [d for t, _, d in raw_a if t == "/camera/image_raw"]
    images_c = [d for t, _, d in raw_c if t == "/camera/image_raw"]
    assert all(x != y for x, y in zip(images_a, images_c))


def test_odometry_drifts_from_ground_truth(office_sequence):
    frames = list(read_sequence(office_sequence / "bag"))
    assert np.allclose(frames[0].T_odom_camera, frames[0].T_map_camera)
    errors = [np.linalg.norm(f.T_odom_camera[:3, 3] - f.T_map_camera[:3, 3]) for f in frames]
    assert errors[-1] > 0.2 and np.mean(errors[-10:]) > np.mean(errors[:10])


@pytest.fixture(scope="module")
def pair_folders(tmp_path_factory):
    from feature_matching_ros.scenes.pairs import generate_pairs

    root = tmp_path_factory.mktemp("pairs")
    generate_pairs(root / "train", 8, seed=1, split="train", width=W, height=H)
    generate_pairs(root / "eval", 8, seed=1, split="eval", width=W, height=H)
    return root


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_homography_pairs_map_points(pair_folders):
    from feature_matching_ros.scenes.pairs import iter_pairs

    checked = 0
    for pair in iter_pairs(pair_folders / "train"):
        if pair["kind"] != "homography":
            continue
        homography = pair["H_1_0"]
        gray0 = cv2.cvtColor(pair["image0"], cv2.COLOR_RGB2GRAY).astype(np.float32)
        gray1 = cv2.cvtColor(pair["image1"], cv2.COLOR_RGB2GRAY).astype(np.float32)

        def warped_ncc(H_1_0):
            # image0 seen through H: compare with image1 where image0 covers it (away from the border).
            warped = cv2.warpPerspective(gray0, H_1_0, (W, H), flags=cv2.INTER_LINEAR)
            cover = cv2.warpPerspective(np.ones_like(gray0), H_1_0, (W, H), flags=cv2.INTER_NEAREST)
            cover = cv2.erode(cover, np.ones((5, 5), np.uint8)) > 0
            return _ncc(warped[cover], gray1[cover])

        good = warped_ncc(homography)
        shifted = np.array([[1, 0, 3.0], [0, 1, 2.0], [0, 0, 1]]) @ homography
        assert good > 0.8, good
        assert good > warped_ncc(shifted) + 0.1
        checked += 1
    assert checked == 4


def test_rendered_pairs_reproject(pair_folders):
    from feature_matching_ros.scenes.pairs import iter_pairs

    kinds = set()
    for pair in iter_pairs(pair_folders / "train"):
        if not pair["kind"].startswith("rendered"):
            continue
        kinds.add(pair["kind"])
        assert pair["covisibility"] >= 0.1
        T_map_0 = np.eye(4)
        T_map_1 = np.linalg.inv(pair["T_1_0"])
        photometric, depth_error, fraction = consistency(
            pair["image0"] / 255.0, pair["depth0"], pair["K0"], T_map_0,
            pair["image1"] / 255.0, pair["depth1"], pair["K1"], T_map_1, gain_invariant=True)
        assert fraction > 0.02
        assert np.median(depth_error) < 1e-3
        # Each image has its own exposure (compensated by one gain), noise and 8-bit rounding.
        assert np.median(photometric) < 0.03, np.median(photometric)
    assert kinds == {"rendered_narrow", "rendered_wide"}


def test_pair_splits_do_not_overlap(pair_folders):
    from feature_matching_ros.scenes.pairs import iter_pairs, load_pair

    metas = {split: [p["meta"] for p in iter_pairs(pair_folders / split)] for split in ("train", "eval")}
    textures = {s: {m["texture"] for m in metas[s] if "texture" in m} for s in metas}
    scenes = {s: {m["scene_seed"] for m in metas[s] if "scene_seed" in m} for s in metas}
    assert textures["train"] and textures["eval"] and not textures["train"] & textures["eval"]
    assert scenes["train"] and scenes["eval"] and not scenes["train"] & scenes["eval"]
    manifest = json.loads((pair_folders / "eval" / "pairs.json").read_text())
    first = load_pair(pair_folders / "eval" / manifest["pairs"][0]["file"])
    assert first["image0"].dtype == np.uint8 and first["image0"].shape == (H, W, 3)
