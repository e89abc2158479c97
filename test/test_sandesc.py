"""SANDESC: the network (size, shapes, any input size, sampling), weights files, the `descriptor: sandesc`
integration, the triplet loss, and a CPU training smoke run (overfit a fixed batch; exact resume)."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch

from feature_matching_ros.config import ConfigError, FeatureConfig, MatcherConfig, PipelineConfig
from feature_matching_ros.models.sandesc import SANDesc, load_sandesc, save_sandesc
from feature_matching_ros.weights import WeightsError


@pytest.fixture(scope="module")
def model() -> SANDesc:
    torch.manual_seed(0)
    return SANDesc().eval()


@pytest.fixture
def random_weights(tmp_path, monkeypatch, model):
    """A folder with random-init sandesc_orb.safetensors, selected through FMR_SANDESC_WEIGHTS."""
    from feature_matching_ros.features.extractor import _network

    save_sandesc(model, tmp_path / "weights" / "sandesc_orb.safetensors", {"detector": "orb"})
    monkeypatch.setenv("FMR_SANDESC_WEIGHTS", str(tmp_path / "weights"))
    _network.cache_clear()
    yield tmp_path / "weights"
    _network.cache_clear()


def test_parameter_count(model):
    # widths: encoder 16-32-64-96-128, decoder 80-64-32-16 (models/sandesc.py docstring)
    assert model.num_parameters() == 2_424_832
    assert abs(model.num_parameters() - 2.4e6) / 2.4e6 < 0.02


@pytest.mark.parametrize("shape", [(2, 1, 37, 53), (1, 3, 64, 48), (1, 1, 16, 16)])
def test_dense_output_any_size_unit_norm(model, shape):
    with torch.inference_mode():
        dense = model(torch.rand(shape))
    assert dense.shape == (shape[0], 128, shape[2], shape[3])
    norms = dense.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


def test_rgb_input_is_luma(model):
    rgb = torch.rand(1, 3, 32, 48)
    gray = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    with torch.inference_mode():
        assert torch.allclose(model(rgb), model(gray), atol=1e-5)
    with pytest.raises(ValueError):
        model(torch.rand(1, 2, 32, 32))


def test_sample_at_keypoints():
    torch.manual_seed(1)
    dense = torch.nn.functional.normalize(torch.randn(2, 128, 20, 30), dim=1)
    xy = torch.tensor([[[0.0, 0.0], [29.0, 19.0], [7.0, 3.0]], [[5.0, 6.0], [12.0, 1.0], [3.0, 17.0]]])
    out = SANDesc.sample(dense, xy)
    assert out.shape == (2, 3, 128)
    for b in range(2):
        for n, (x, y) in enumerate(xy[b].long().tolist()):
            assert torch.allclose(out[b, n], dense[b, :, y, x], atol=1e-5)
    half = SANDesc.sample(dense[:1], torch.tensor([[[7.5, 3.0]]]))[0, 0]  # between two pixels: renormalised mean
    expected = torch.nn.functional.normalize(dense[0, :, 3, 7] + dense[0, :, 3, 8], dim=0)
    assert torch.allclose(half, expected, atol=1e-5)
    assert torch.allclose(half.norm(), torch.tensor(1.0), atol=1e-5)


def test_weights_round_trip(tmp_path, model):
    trained = SANDesc()
    trained.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        trained(torch.rand(2, 1, 32, 32))
    trained.eval()
    path = save_sandesc(trained, tmp_path / "sandesc_orb.safetensors", {"detector": "orb", "step": 7})
    loaded, meta = load_sandesc(path)
    assert meta["detector"] == "orb" and meta["step"] == 7 and meta["config"] == trained.conf
    assert meta["num_parameters"] == 2_424_832
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values() if v.is_floating_point())
    image = torch.rand(1, 1, 40, 56)
    with torch.inference_mode():
        assert torch.allclose(loaded(image), trained(image), atol=2e-2)  # fp16 storage
    assert path.stat().st_size < 6e6  # fp16: ~4.9 MB
    with pytest.raises(WeightsError, match="not found"):
        load_sandesc(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError):
        load_sandesc(tmp_path / "junk.safetensors")


def test_missing_weights_error_says_how_to_train(tmp_path, monkeypatch):
    from feature_matching_ros.features.sandesc import SandescNetwork

    monkeypatch.setenv("FMR_SANDESC_WEIGHTS", str(tmp_path))  # an empty folder
    with pytest.raises(WeightsError, match=r"fmr train sandesc --detector aliked.*--export"):
        SandescNetwork(torch.device("cpu"), detector="aliked")
    monkeypatch.setenv("FMR_SANDESC_WEIGHTS", str(tmp_path / "nothing_here"))
    with pytest.raises(WeightsError, match="neither"):
        SandescNetwork(torch.device("cpu"), detector="orb")


def test_detector_without_weights_falls_back_to_orb(random_weights, caplog):
    from feature_matching_ros.features.sandesc import SandescNetwork, sandesc_weights_path

    assert sandesc_weights_path("orb_multiscale").name == "sandesc_orb.safetensors"  # alias, no warning
    with caplog.at_level(logging.WARNING):
        network = SandescNetwork(torch.device("cpu"), detector="sift")
    assert network.path.name == "sandesc_orb.safetensors"
    assert "no SANDESC weights trained on sift" in caplog.text


def test_lightglue_with_sandesc_is_a_config_error():
    with pytest.raises(ConfigError, match=r"no weights for sandesc descriptors.*matcher=nn"):
        PipelineConfig(features=FeatureConfig(detector="orb", descriptor="sandesc"), matcher=MatcherConfig(name="lightglue"))
    config = PipelineConfig(features=FeatureConfig(detector="orb", descriptor="sandesc"), matcher=MatcherConfig(name="nn"))
    assert config.features.descriptor_network == "sandesc"


def test_extractor_and_nn_matcher(random_weights, graf):
    from feature_matching_ros.pipeline import MatchingPipeline

    image0 = cv2.resize(graf.image0, (320, 256), interpolation=cv2.INTER_AREA)
    pipeline = MatchingPipeline(PipelineConfig(
        features=FeatureConfig(detector="orb", descriptor="sandesc", max_keypoints=128),
        matcher=MatcherConfig(name="nn"), device="cpu"))
    features = pipeline.extract(image0)
    assert features.descriptor_type == "sandesc" and 20 <= len(features) <= 128
    assert features.descriptors.shape == (len(features), 128) and features.descriptors.dtype == torch.float32
    assert torch.allclose(features.descriptors.norm(dim=1), torch.ones(len(features)), atol=1e-4)
    matches = pipeline.match(features, [features])[0].matches
    assert len(matches) == len(features) and (matches[:, 0] == matches[:, 1]).all()  # itself: identity


def test_shipped_weights_beat_chance():
    """The trained weights shipped in resource/sandesc/ (sha256 pinned) load and match a held-out photo."""
    from feature_matching_ros.devdata import homography_errors, synthetic_homography_pair
    from feature_matching_ros.features.sandesc import SANDESC_DIR
    from feature_matching_ros.pipeline import MatchingPipeline

    path = SANDESC_DIR / "sandesc_orb.safetensors"
    _, meta = load_sandesc(path)
    assert meta["detector"] == "orb" and meta["num_parameters"] == 2_424_832
    pair = synthetic_homography_pair("coffee", 1)
    pipeline = MatchingPipeline(PipelineConfig(
        features=FeatureConfig(detector="orb", descriptor="sandesc", max_keypoints=512),
        matcher=MatcherConfig(name="nn"), device="cpu"))
    f0, f1 = pipeline.extract(pair.image0), pipeline.extract(pair.image1)
    found = pipeline.match(f0, [f1])[0].matches
    errors = homography_errors(pair.H_1_0, f0.keypoints_numpy()[found[:, 0]], f1.keypoints_numpy()[found[:, 1]])
    assert len(found) >= 50 and (errors < 3).mean() > 0.5


def test_triplet_loss_semantics():
    from feature_matching_ros.training.sandesc import triplet_loss

    kpts0 = torch.tensor([[[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]]])
    kpts1 = kpts0.clone()
    matches = torch.tensor([[0, 1, -1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    eye = torch.eye(3)[None]
    loss, logs = triplet_loss(eye, eye, kpts0, kpts1, matches, matches, mask, mask, p_random=0.0)
    assert loss.item() == 0.0 and logs["triplets"] == 4  # orthogonal negatives: s_neg - s_pos + 0.5 < 0
    same = torch.nn.functional.normalize(torch.ones(1, 3, 4), dim=-1)
    loss, logs = triplet_loss(same, same, kpts0, kpts1, matches, matches, mask, mask, p_random=0.0)
    assert loss.item() == pytest.approx(0.5) and logs["violating"] == 1.0  # all equal: the margin
    # the only other keypoint lies within exclusion_px of the partner: no negative, no triplet
    near = torch.tensor([[[10.0, 10.0], [13.0, 10.0]]])
    loss, logs = triplet_loss(same[:, :2], same[:, :2], near, near, torch.tensor([[0, -1]]), torch.tensor([[0, -1]]),
                              mask[:, :2], mask[:, :2], p_random=0.0)
    assert logs["triplets"] == 0 and loss.item() == 0.0


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    from feature_matching_ros.scenes.pairs import generate_pairs

    root = tmp_path_factory.mktemp("sandesc_pairs")
    generate_pairs(root / "train", n=4, width=128, height=96)
    generate_pairs(root / "eval", n=2, width=128, height=96, split="eval")
    return root


@pytest.fixture
def one_thread():
    """Training tests on one thread: with other jobs on the 2 cores, 2 OpenMP threads ran 3-15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tiny_pairs, out, **overrides):
    from feature_matching_ros.training.sandesc import TrainConfig

    base = dict(train=[str(tiny_pairs / "train")], eval=[str(tiny_pairs / "eval")], out=str(out), max_keypoints=128,
                batch_size=2, steps=4, device="cpu", checkpoint_every=2, eval_every=0, log_every=1)
    return TrainConfig(**(base | overrides))


def test_training_overfits_a_fixed_batch(tiny_pairs, tmp_path, one_thread):
    from feature_matching_ros.training.sandesc import SandescTrainer

    trainer = SandescTrainer(_config(tiny_pairs, tmp_path / "run", eval=[], steps=8, warmup=0.0, lr=1e-3,
                                     p_start=0.0, augment=False))  # hardest negatives only: deterministic
    trainer.load_data()
    assert trainer.train_data.positives > 5
    batch = trainer.train_data.batch(torch.tensor([0, 1]))
    # hinge = mean of max(0, s_neg - s_pos + margin) over all triplets (the loss averages the violating ones)
    hinges = [trainer.train_step(batch, torch.Generator().manual_seed(0))["hinge"] for _ in range(8)]
    assert np.mean(hinges[-2:]) < 0.5 * np.mean(hinges[:2]), hinges


def test_training_cli_resume_is_exact(tiny_pairs, tmp_path, one_thread):
    from feature_matching_ros.cli import main
    from feature_matching_ros.models.sandesc import load_sandesc
    from feature_matching_ros.training.sandesc import SandescTrainer

    # a 4-step run killed during step 3 (last checkpoint: step 2), resumed through the CLI
    first = SandescTrainer(_config(tiny_pairs, tmp_path / "a"))
    first.load_data()
    train_step = first.train_step

    def killed_at_step_3(batch, generator=None):
        if first.step == 2:
            raise KeyboardInterrupt
        return train_step(batch, generator)

    first.train_step = killed_at_step_3
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert main(["train", "sandesc", "--train", str(tiny_pairs / "train"), "--eval", str(tiny_pairs / "eval"),
                 "--max-keypoints", "128", "--batch-size", "2", "--device", "cpu", "--checkpoint-every", "2",
                 "--eval-every", "0", "--log-every", "1", "--out", str(tmp_path / "a"), "--steps", "4", "--resume",
                 "--export", str(tmp_path / "export")]) == 0
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["p_random"] == pytest.approx(0.9993 ** 3, abs=1e-4)  # the p used by step 4
    validation = json.loads((tmp_path / "a" / "validation.json").read_text())
    assert [v["step"] for v in validation] == [0, 4] and 0.0 <= validation[-1]["precision"] <= 1.0
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and state["p_random"] == pytest.approx(0.9993 ** 4)

    straight = SandescTrainer(_config(tiny_pairs, tmp_path / "b", eval=[]))
    straight.load_data()
    straight.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(value.float(), state["model"][key].float(), atol=1e-5), key

    exported, meta = load_sandesc(tmp_path / "export" / "sandesc_orb.safetensors")
    assert meta["detector"] == "orb" and meta["step"] == 4
    assert (tmp_path / "export" / "sandesc_orb.history.json").is_file()
