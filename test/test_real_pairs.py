"""Real pair sets (training.real_pairs): semi-dense depth from sparse points, the on-disk format round trip, labels
that agree with the exact geometry, fitting pairs to one size, and the loaders that read them.

The scene is a real photo on a slanted plane seen by two cameras: image 1 is image 0 warped by the plane's
homography, so every quantity the pair set derives (depth, T_1_0, labels) has an exact reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feature_matching_ros.training.labels import depth_labels, homography_labels
from feature_matching_ros.training.real_pairs import (DepthSettings, PairSelection, RealPairs, SfmScene,
                                                      fit_pair_to_size, select_pairs, semi_dense_depth, write_manifest,
                                                      write_scene)

WIDTH, HEIGHT = 320, 240
K = np.array([[260.0, 0.0, 159.5], [0.0, 260.0, 119.5], [0.0, 0.0, 1.0]])
# Plane n . X = d in camera 0 (= world): z = 4 + 0.3 x.
NORMAL, DISTANCE = np.array([-0.3, 0.0, 1.0]), 4.0


def _camera1() -> np.ndarray:
    angle = np.radians(6.0)
    T = np.eye(4)
    T[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    T[:3, 3] = [-0.6, 0.05, 0.1]
    return T  # T_1_0 = T_camera1_world


def _plane_depth(pixels: np.ndarray) -> np.ndarray:
    rays = np.c_[pixels, np.ones(len(pixels))] @ np.linalg.inv(K).T
    return DISTANCE / (rays @ NORMAL)


def _homography(T_1_0: np.ndarray) -> np.ndarray:
    R, t = T_1_0[:3, :3], T_1_0[:3, 3]
    return K @ (R + np.outer(t, NORMAL) / DISTANCE) @ np.linalg.inv(K)


@pytest.fixture(scope="module")
def plane_set(tmp_path_factory):
    """A one-scene real pair set (split train) and the pair's exact homography."""
    import cv2

    from feature_matching_ros.scenes.textures import load_texture_rgb

    photo = load_texture_rgb("brick")
    image0 = cv2.resize(photo[:photo.shape[1] * 3 // 4], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    T_1_0 = _camera1()
    H = _homography(T_1_0)
    image1 = cv2.warpPerspective(image0, H, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # Sparse 3D points: a jittered grid of image 0 pixels back-projected onto the plane.
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(4, WIDTH - 4, 9.0), np.arange(4, HEIGHT - 4, 9.0)), -1).reshape(-1, 2)
    grid += rng.uniform(-2, 2, grid.shape)
    rays = np.c_[grid, np.ones(len(grid))] @ np.linalg.inv(K).T
    points = rays * _plane_depth(grid)[:, None]
    in1 = points @ T_1_0[:3, :3].T + T_1_0[:3, 3]
    uv1 = (in1 @ K.T)[:, :2] / in1[:, 2:]
    seen1 = np.flatnonzero((uv1 >= 0).all(1) & (uv1[:, 0] <= WIDTH - 1) & (uv1[:, 1] <= HEIGHT - 1))
    root = tmp_path_factory.mktemp("real_pairs") / "train"
    write_scene(root / "plane", ["a.jpg", "b.jpg"], [image0, image1], np.stack([K, K]), np.stack([np.eye(4), T_1_0]),
                points, [np.arange(len(points)), seen1], jpeg_quality=95)
    pairs = select_pairs(SfmScene(root / "plane"), PairSelection())
    write_manifest(root, "train", [{"name": "plane", "folder": "plane"}], [{"scene": "plane", **p} for p in pairs])
    return root, H


def test_semi_dense_depth_is_exact_on_a_plane_and_leaves_occlusion_gaps():
    rng = np.random.default_rng(1)
    pixels = rng.uniform([0, 0], [WIDTH - 1, HEIGHT - 1], (3000, 2))
    depth = semi_dense_depth(pixels, _plane_depth(pixels), WIDTH, HEIGHT)
    rows, cols = np.nonzero(np.isfinite(depth))
    assert len(rows) > 0.8 * WIDTH * HEIGHT
    exact = _plane_depth(np.c_[cols, rows].astype(np.float64))
    # inverse depth is affine on a plane: exact up to the 2 % clamp at rasterised triangle edges
    assert np.median(np.abs(depth[rows, cols] / exact - 1)) < 1e-5
    assert np.max(np.abs(depth[rows, cols] / exact - 1)) < 0.02

    # Two surfaces, left at 2 m and right at 8 m: no depth is invented across the gap between them.
    left = rng.uniform([0, 0], [140, HEIGHT - 1], (300, 2))
    right = rng.uniform([180, 0], [WIDTH - 1, HEIGHT - 1], (300, 2))
    depth = semi_dense_depth(np.r_[left, right], np.r_[np.full(300, 2.0), np.full(300, 8.0)], WIDTH, HEIGHT,
                             DepthSettings(max_edge_px=200.0))
    assert np.isnan(depth[:, 150:170]).all()
    assert np.nanmax(depth[:, :140]) == pytest.approx(2.0) and np.nanmin(depth[:, 185:]) == pytest.approx(8.0)


def test_round_trip_pose_depth_and_labels_agree_with_the_homography(plane_set):
    import cv2

    root, H = plane_set
    pairs = RealPairs(root)
    assert len(pairs) == 1 and pairs.keys() == ["train/plane_0000_0001"]
    pair = pairs.load(0)
    assert pair["kind"] == "sfm" and pair["image0"].shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(pair["T_1_0"], _camera1(), atol=1e-9)
    np.testing.assert_allclose(pair["K1"], K)
    rows, cols = np.nonzero(np.isfinite(pair["depth0"]))
    assert len(rows) > 0.7 * WIDTH * HEIGHT
    exact = _plane_depth(np.c_[cols, rows].astype(np.float64))
    assert np.median(np.abs(pair["depth0"][rows, cols] / exact - 1)) < 1e-4  # float32 points

    orb = cv2.ORB_create(400, nlevels=1)
    keypoints = [torch.tensor([k.pt for k in orb.detect(cv2.cvtColor(pair[f"image{s}"], cv2.COLOR_RGB2GRAY))],
                              dtype=torch.float32) for s in (0, 1)]
    as_t = lambda key: torch.as_tensor(pair[key])  # noqa: E731
    m0, _ = depth_labels(*keypoints, as_t("depth0"), as_t("depth1"), as_t("K0"), as_t("K1"), as_t("T_1_0"))
    h0, _ = homography_labels(*keypoints, torch.as_tensor(H))
    positives = m0 >= 0
    assert positives.sum() > 60
    # Every depth positive is a homography positive with the same partner (depth labels are a subset: some
    # keypoints lie between the sparse points' triangles and have no depth).
    assert (h0[positives] == m0[positives]).float().mean() > 0.97


def test_fit_pair_to_size_keeps_the_geometry(plane_set):
    root, H = plane_set
    pair = RealPairs(root).load(0)
    fitted = fit_pair_to_size(pair, 96, 96)  # 4:3 -> square: scale to cover, crop the sides
    assert fitted["image0"].shape == (96, 96, 3) and fitted["depth1"].shape == (96, 96)
    # A pixel of the fitted image 0 and its plane depth, projected with the fitted K into fitted image 1,
    # lands where the homography of the fitted cameras puts it.
    rows, cols = np.nonzero(np.isfinite(fitted["depth0"]))
    pick = np.random.default_rng(2).choice(len(rows), 50, replace=False)
    pixels = np.c_[cols[pick], rows[pick]].astype(np.float64)
    z = fitted["depth0"][rows[pick], cols[pick]]
    X = (np.c_[pixels, np.ones(50)] @ np.linalg.inv(fitted["K0"]).T) * z[:, None]
    X1 = X @ pair["T_1_0"][:3, :3].T + pair["T_1_0"][:3, 3]
    projected = (X1 @ fitted["K1"].T)[:, :2] / X1[:, 2:]
    scale = 96 / HEIGHT
    A = np.array([[scale, 0, 0.5 * scale - 0.5 - (round(WIDTH * scale) - 96) // 2], [0, scale, 0.5 * scale - 0.5],
                  [0, 0, 1]])
    homography = fit_pair_to_size({"image0": pair["image0"], "image1": pair["image1"], "H_1_0": H}, 96, 96)["H_1_0"]
    np.testing.assert_allclose(homography, A @ H @ np.linalg.inv(A), rtol=1e-9, atol=1e-9)
    expected = np.c_[pixels, np.ones(50)] @ homography.T
    # depth was resampled by nearest neighbour: a fraction of a source pixel of depth error
    assert np.abs(projected - expected[:, :2] / expected[:, 2:]).max() < 0.3


def test_training_loaders_read_real_pair_sets(plane_set):
    from feature_matching_ros.training.data import PairFolder, pair_sources
    from feature_matching_ros.training.eloftr import PairTensors

    root, _ = plane_set
    (source,) = pair_sources([str(root)])
    assert isinstance(source, RealPairs)
    pair = source.load(0)
    assert pair["image_keys"] == ("train/plane/a.jpg", "train/plane/b.jpg")
    tensors = PairTensors([source], torch.device("cpu"), size=(128, 96))
    assert len(tensors) == 1 and tuple(tensors.images0[0].shape) == (96, 128)
    with pytest.raises(ValueError, match="multiples of 32"):
        PairTensors([source], torch.device("cpu"), size=(100, 96))
    with pytest.raises(FileNotFoundError, match="pair_"):
        PairFolder([str(root / "plane")])  # a scene folder is neither a pair set nor a make-pairs folder


def test_select_pairs_by_covisibility_bins_and_baseline(tmp_path):
    # Six cameras on a line looking at 200 points; camera k sees points [20 k, 20 k + 100): neighbours share
    # 80 %, cameras four apart 20 %, five apart 0 %.
    points = np.c_[np.linspace(-2, 2, 200), np.zeros(200), np.full(200, 10.0)]
    poses = []
    for k in range(6):
        T = np.eye(4)
        T[0, 3] = -0.1 * k * (k != 1)  # camera 1 sits where camera 0 does: no baseline
        poses.append(T)
    observations = [np.arange(20 * k, 20 * k + 100) for k in range(6)]
    image = np.zeros((8, 8, 3), np.uint8)
    write_scene(tmp_path / "line", [f"{k}.jpg" for k in range(6)], [image] * 6, np.stack([K] * 6), np.stack(poses),
                points, observations)
    scene = SfmScene(tmp_path / "line")
    every = select_pairs(scene, PairSelection(min_covisibility=0.1, min_shared_points=10))
    assert {(p["i"], p["j"]) for p in every} == {(i, j) for i in range(6) for j in range(i + 1, min(i + 5, 6))}
    assert {(p["i"], p["j"]): p["covisibility"] for p in every}[(0, 4)] == pytest.approx(0.2)
    # Baseline filter: pair (0, 1) has none.
    moving = select_pairs(scene, PairSelection(min_shared_points=10, min_baseline_ratio=0.005))
    assert (0, 1) not in {(p["i"], p["j"]) for p in moving} and len(moving) == len(every) - 1
    # Evenly over bins: 5 pairs with covisibility in [0.1, 0.5) and 9 in [0.5, 1] exist; 4 asked: 2 from each.
    binned = select_pairs(scene, PairSelection(min_shared_points=10, max_pairs=4, bins=(0.1, 0.5, 1.01)))
    covisibility = np.array([p["covisibility"] for p in binned])
    assert len(binned) == 4 and (covisibility < 0.5).sum() == 2
