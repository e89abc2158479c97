"""Efficient LoFTR training: ground truth from exact geometry, window conventions pinned against the model, and a
CPU smoke run (the loss falls on a fixed batch; resume continues from the checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feature_matching_ros.models.efficient_loftr import FINE_WINDOW, EfficientLoFTR
from feature_matching_ros.training.eloftr import (STRIDE, WINDOW0_OFFSET, WINDOW1, WINDOW1_OFFSET, PairGeometry,
                                                  TrainConfig, coarse_ground_truth, fine_ground_truth, train_eloftr)


def _translation(dx: float, dy: float) -> PairGeometry:
    H = torch.eye(3, dtype=torch.float64)
    H[0, 2], H[1, 2] = dx, dy
    return PairGeometry(H_1_0=H)


def test_coarse_ground_truth_of_a_one_cell_shift():
    """A homography shifting by exactly one cell right: every cell i (not in the last column) pairs with i + 1."""
    height, width = 64, 96
    wc = width // STRIDE
    i, j = coarse_ground_truth(_translation(STRIDE, 0), (height, width), tolerance=0.1)
    assert len(i) == (height // STRIDE) * (wc - 1)
    assert torch.equal(j, i + 1)
    assert not torch.any(i % wc == wc - 1)


def test_coarse_ground_truth_from_depth_and_pose_matches_the_homography_case():
    """A fronto-parallel plane seen by a camera moved sideways is a pure image shift: depth + pose ground truth
    must equal the homography ground truth of that shift (tx * f / Z = 8 px)."""
    height, width, f, depth = 64, 96, 100.0, 2.0
    K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=torch.float64)
    T = torch.eye(4, dtype=torch.float64)
    T[0, 3] = STRIDE * depth / f  # X1 = X0 + t, so x1 = x0 + f * tx / Z = x0 + 8 px
    plane = torch.full((height, width), depth, dtype=torch.float64)
    geometry = PairGeometry(depth0=plane, depth1=plane, K0=K, K1=K, T_1_0=T)
    i, j = coarse_ground_truth(geometry, (height, width), tolerance=0.1)
    i_h, j_h = coarse_ground_truth(_translation(STRIDE, 0), (height, width), tolerance=0.1)
    assert torch.equal(i, i_h) and torch.equal(j, j_h)


def test_fine_ground_truth_uses_the_model_windows():
    """The window geometry the loss assumes is the one the model cuts: image 0's 8x8 window is the cell,
    image 1's 10x10 window has a one-pixel ring. Check it on the model's own window function with a feature map
    whose channels are the pixel coordinates."""
    from feature_matching_ros.models.efficient_loftr import _windows

    height, width = 32, 48
    wc = width // STRIDE
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coordinates = torch.stack([xs, ys])[None].float()  # (1, 2, H, W): channel 0 = x, channel 1 = y
    cell = torch.tensor([wc + 2])  # row 1, column 2
    win0 = _windows(coordinates, torch.tensor([0]), cell, wc, FINE_WINDOW, 0)[0]  # (64, 2)
    win1 = _windows(coordinates, torch.tensor([0]), cell, wc, FINE_WINDOW + 2, 1)[0]  # (100, 2)
    origin = torch.tensor([2 * STRIDE, 1 * STRIDE]).float()
    assert torch.equal(win0[0], origin + WINDOW0_OFFSET) and torch.equal(win1[0], origin + WINDOW1_OFFSET)
    assert torch.equal(win0[9], origin + WINDOW0_OFFSET + torch.tensor([1.0, 1.0]))  # row-major
    # A shift of (3, 2) px: pixel k of window 0 lands on window-1 pixel k shifted by (3 - offset, 2 - offset).
    target, warped = fine_ground_truth(_translation(3, 2), cell, cell, wc, tolerance=0.1)
    expected = [(r + 2 + 1) * WINDOW1 + (c + 3 + 1) if c + 3 + 1 < WINDOW1 and r + 2 + 1 < WINDOW1 else -1
                for r in range(FINE_WINDOW) for c in range(FINE_WINDOW)]
    assert target[0].tolist() == expected
    assert torch.allclose(warped[0, 0], (origin + torch.tensor([3.0, 2.0])).double())


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    from feature_matching_ros.scenes.pairs import generate_pairs

    root = tmp_path_factory.mktemp("eloftr_pairs")
    generate_pairs(root / "train", n=4, seed=3, split="train", width=128, height=96)
    generate_pairs(root / "eval", n=2, seed=5, split="eval", width=128, height=96)
    return root


def test_training_smoke_loss_falls_and_resume_continues(tiny_pairs, tmp_path):
    config = TrainConfig(train=[str(tiny_pairs / "train")], eval=[str(tiny_pairs / "eval")], out=str(tmp_path / "run"),
                         batch_size=2, steps=4, lr=2e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                         device="cpu", max_pairs=2, image_size=(128, 96), export=str(tmp_path / "export"))
    trainer = train_eloftr(config)
    losses = [entry["loss"] for entry in trainer.history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses  # two pairs, one batch: the model must fit it a little
    assert trainer.validation and {"precision_3px", "coarse_recall"} <= set(trainer.validation[-1])
    exported = sorted(p.name for p in (tmp_path / "export").glob("*.safetensors"))
    assert exported and exported[0].startswith("eloftr_synthetic.")
    from feature_matching_ros.weights import load_sharded_safetensors
    import json

    shards = json.loads((tmp_path / "export" / "eloftr_synthetic.json").read_text())
    state = load_sharded_safetensors(tmp_path / "export", shards)
    model = EfficientLoFTR()
    model.load_state_dict(state)  # official key names, training form: loads strictly

    config.steps = 6
    resumed = train_eloftr(config, resume=True)
    assert resumed.step == 6 and len(resumed.history) == 6
