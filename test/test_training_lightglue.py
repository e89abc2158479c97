"""Detector-agnostic LightGlue training: labels, MegaDepth loader, per-layer forward, and a CPU smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from feature_matching_ros.config import MatcherConfig
from feature_matching_ros.training.labels import IGNORE, UNMATCHED, depth_labels, homography_labels


def test_homography_labels():
    H = torch.tensor([[1.0, 0.0, 10.0], [0.0, 1.0, -5.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    k0 = torch.tensor([[20.0, 20.0], [50.0, 60.0], [100.0, 100.0], [30.0, 30.0]])
    # partners of 0 and 1 (off by 1 px and 0 px), a far point, and one 4 px from kpt 3's projection (40, 25)
    k1 = torch.tensor([[31.0, 15.0], [60.0, 55.0], [300.0, 300.0], [44.0, 25.0]])
    m0, m1 = homography_labels(k0, k1, H)
    assert m0.tolist() == [0, 1, UNMATCHED, UNMATCHED]
    assert m1.tolist() == [0, 1, UNMATCHED, UNMATCHED]
    m0, _ = homography_labels(k0, k1, H, pos_px=3.0, neg_px=5.0)
    assert m0[3] == IGNORE  # 4 px: neither positive (< 3) nor unmatched (> 5)


def _plane_pair(z: float = 4.0, size=(64, 48)):
    width, height = size
    K = torch.tensor([[50.0, 0, (width - 1) / 2], [0, 50.0, (height - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    depth = torch.full((height, width), z, dtype=torch.float64)
    T_1_0 = torch.eye(4, dtype=torch.float64)
    T_1_0[0, 3] = -0.4  # camera 1 is 0.4 m to the right: points move 50 * 0.4 / 4 = 5 px left
    return K, depth, T_1_0


def test_depth_labels_plane():
    K, depth, T_1_0 = _plane_pair()
    k0 = torch.tensor([[30.0, 20.0], [10.0, 10.0], [2.0, 30.0]])
    k1 = torch.tensor([[25.0, 20.0], [40.0, 40.0], [5.5, 10.0]])
    depth1 = depth.clone()
    depth1[:, :] = float("nan")
    depth1[:, 20:] = 4.0  # kpt1 2 (x 5.5) has no depth -> ignored; kpt0 1 projects to x 5 (no depth) -> unmatched
    m0, m1 = depth_labels(k0, k1, depth, depth1, K, K, T_1_0)
    assert m0[0] == 0 and m1[0] == 0
    assert m0[1] == UNMATCHED  # valid depth, projection lands where image 1 has no surface
    assert m0[2] == UNMATCHED  # projects outside image 1
    assert m1[1] == UNMATCHED and m1[2] == IGNORE


def test_megadepth_loader(tmp_path):
    h5py = pytest.importorskip("h5py", reason="h5py (MegaDepth depth maps, requirements.txt) is not installed")
    import cv2

    from feature_matching_ros.training.data import MegaDepthPairs, label_pair

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        with h5py.File(tmp_path / f"{name}.h5", "w") as handle:
            handle["depth"] = np.full((48, 64), 4.0, np.float32)
    K, _, T_1_0 = _plane_pair()
    poses = np.stack([np.eye(4), T_1_0.numpy()])  # world = camera a
    np.savez(tmp_path / "scene.npz", image_paths=np.array(["a.png", "b.png"], dtype=object),
             depth_paths=np.array(["a.h5", "b.h5"], dtype=object), intrinsics=np.stack([K.numpy()] * 2), poses=poses,
             pair_infos=np.array([((0, 1), 0.5, None)], dtype=object))
    source = MegaDepthPairs(tmp_path, [tmp_path / "scene.npz"], resize=0)
    assert len(source) == 1 and source.keys() == ["md/a-b"]
    pair = source.load(0)
    assert pair["image0"].shape == (48, 64, 3) and np.allclose(pair["T_1_0"], T_1_0.numpy())
    m0, _ = label_pair(pair, torch.tensor([[30.0, 20.0]]), torch.tensor([[25.0, 20.0]]))
    assert m0.tolist() == [0]
    resized = MegaDepthPairs(tmp_path, [tmp_path / "scene.npz"], resize=32).load(0)
    assert resized["image0"].shape == (24, 32, 3) and np.isclose(resized["K0"][0, 0], 25.0)


def test_forward_layers_last_layer_equals_inference():
    from feature_matching_ros.matchers.lightglue import LightGlueMatcher, mutual_matches

    matcher = LightGlueMatcher("aliked", MatcherConfig(depth_confidence=-1, width_confidence=-1), "cpu")
    g = torch.Generator().manual_seed(0)
    kpts0, kpts1 = torch.rand(2, 40, 2, generator=g) - 0.5, torch.rand(2, 30, 2, generator=g) - 0.5
    desc0 = torch.nn.functional.normalize(torch.randn(2, 40, 128, generator=g), dim=-1)
    desc1 = torch.nn.functional.normalize(torch.randn(2, 30, 128, generator=g), dim=-1)
    mask0, mask1 = torch.ones(2, 40, dtype=torch.bool), torch.ones(2, 30, dtype=torch.bool)
    mask1[1, 20:] = False
    with torch.no_grad():
        layers, confidences = matcher.forward_layers(kpts0, desc0, mask0, kpts1, desc1, mask1)
        expected = matcher._forward_padded(kpts0, desc0, mask0, kpts1, desc1, mask1, early_exit=False)
    assert len(layers) == 9 and len(confidences) == 8 and layers[0].shape == (2, 41, 31)
    got = mutual_matches(layers[-1], matcher.config.filter_threshold)
    assert torch.equal(got[0], expected[0]) and torch.allclose(got[1], expected[1])


def test_train_smoke_checkpoint_resume_export(tmp_path):
    """A few steps on CPU: finite loss that drops on a repeated batch, checkpoint round trip, resume, export."""
    from feature_matching_ros.scenes.pairs import generate_pairs
    from feature_matching_ros.training.lightglue import LightGlueTrainer, TrainConfig, train_lightglue
    from feature_matching_ros.weights import load_sharded_safetensors

    generate_pairs(tmp_path / "train", n=2, seed=3, split="train", width=160, height=120)
    generate_pairs(tmp_path / "eval", n=2, seed=3, split="eval", width=160, height=120)
    config = TrainConfig(train=[str(tmp_path / "train")], eval=[str(tmp_path / "eval")], out=str(tmp_path / "run"),
                         detectors=("orb", "sift", "aliked"), max_keypoints=64, batch_size=2, steps=2, log_every=1,
                         checkpoint_every=0, device="cpu", export=str(tmp_path / "weights"))
    trainer = train_lightglue(config)
    assert trainer.step == 2 and len(trainer.history) == 2
    assert all(np.isfinite(h["loss"]) for h in trainer.history)
    report = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert report[0]["step"] == 0 and set(report[-1]["detectors"]) == {"orb", "sift", "aliked"}
    # Feature cache: a second trainer reads the samples instead of re-extracting.
    cache = tmp_path / "run" / "cache" / "train"
    assert len(list(cache.glob("*/*.npz"))) == 2

    # Export round trip: fp16 shards load back into the model (to fp16 precision).
    shards = json.loads((tmp_path / "weights" / "aliked_lightglue_agnostic.json").read_text())
    state = load_sharded_safetensors(tmp_path / "weights", shards)
    model_state = trainer.model.state_dict()
    assert set(state) == set(model_state)
    key = "transformers.0.self_attn.Wqkv.weight"
    assert torch.allclose(state[key], model_state[key], atol=1e-3)

    # Resume continues the step count from the checkpoint.
    config.steps = 3
    resumed = LightGlueTrainer(config)
    resumed.resume()
    assert resumed.step == 2
    assert torch.equal(resumed.model.state_dict()[key], model_state[key])
    resumed.load_data()
    resumed.fit()
    assert resumed.step == 3
    # Exact resume: the same weights as a run that went to step 3 without stopping (same batches, same schedule).
    from dataclasses import replace

    straight = train_lightglue(replace(config, out=str(tmp_path / "straight"), cache=str(tmp_path / "run" / "cache"),
                                       export=None))
    assert all(torch.equal(value, straight.model.state_dict()[name])
               for name, value in resumed.model.state_dict().items())

    # The loss drops when the same batch is trained on repeatedly.
    batch = resumed.train_data.batch(np.arange(min(2, len(resumed.train_data))))
    resumed.config.lr, resumed.config.steps = 1e-4, 1000
    losses = [resumed.train_step(batch)["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
