"""Our Efficient LoFTR (models/efficient_loftr.py) against Hugging Face transformers, plus its own contracts.

Weights are fixed-seed random: BatchNorm and LayerNorm affine parameters are re-drawn and the BN running
statistics are then measured on the test pair (so no BN is an identity and activations stay in range).
Random weights give few mutual matches (a few high-norm cells win most rows), hence the low coarse threshold.
"""

from __future__ import annotations

import copy
import json
import math
import re
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from feature_matching_ros.devdata import load_graf
from feature_matching_ros.models.efficient_loftr import (PIXEL_OFFSET, EfficientLoFTR, _mutual_matches, default_conf,
                                                         load_checkpoint, state_dict_from_checkpoint)

SIZE = (160, 128)  # (W, H) of the test pair: graf1/graf3 downscaled 5x


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    pair = load_graf()

    def gray(image: np.ndarray) -> torch.Tensor:
        small = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), SIZE, interpolation=cv2.INTER_AREA)
        return torch.from_numpy(small).float()[None, None] / 255.0

    return gray(pair.image0), gray(pair.image1)


def randomized_model(images: tuple[torch.Tensor, torch.Tensor], conf: dict | None = None, seed: int = 2
                     ) -> EfficientLoFTR:
    torch.manual_seed(seed)
    model = EfficientLoFTR(conf)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # running stats := statistics of the calibration pass below
        model.train()
        model(*images)
    return model.eval()


@pytest.fixture(scope="module")
def model(images) -> EfficientLoFTR:
    return randomized_model(images, {"coarse_threshold": 0.01})


@pytest.fixture(scope="module")
def output(model, images) -> dict:
    with torch.no_grad():
        return model(*images)


# --------------------------------------------------------------------------------------- transformers reference

# Official -> transformers names, from the key-mapping table (ORIGINAL_TO_CONVERTED_KEY_MAPPING) of transformers'
# convert_efficientloftr_to_hf.py. That script is not shipped in the wheel, so the table is restated here; its
# "model." prefix is the attribute transformers now calls "efficientloftr".
_BACKBONE = {"rbr_dense.conv": "conv1.conv", "rbr_dense.bn": "conv1.norm", "rbr_1x1.conv": "conv2.conv",
             "rbr_1x1.bn": "conv2.norm", "rbr_identity": "identity"}
_ATTENTION = {"aggregate": "aggregation.q_aggregation", "norm1": "aggregation.norm", "q_proj": "attention.q_proj",
              "k_proj": "attention.k_proj", "v_proj": "attention.v_proj", "merge": "attention.o_proj",
              "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2", "norm2": "mlp.layer_norm"}
_FINE = {"0": "out_conv2", "1": "batch_norm", "3": "out_conv3"}


def transformers_key(key: str) -> str:
    key = key.removeprefix("matcher.")
    if m := re.fullmatch(r"backbone\.layer(\d+)\.(?:(\d+)\.)?(rbr_dense\.conv|rbr_dense\.bn|rbr_1x1\.conv|rbr_1x1\.bn|"
                         r"rbr_identity)\.(\w+)", key):
        block = m.group(2) or "0"  # layer0 is a single block
        return f"efficientloftr.backbone.stages.{m.group(1)}.blocks.{block}.{_BACKBONE[m.group(3)]}.{m.group(4)}"
    if m := re.fullmatch(r"loftr_coarse\.layers\.(\d+)\.(aggregate|norm1|q_proj|k_proj|v_proj|merge|mlp\.0|mlp\.2|"
                         r"norm2)\.(\w+)", key):
        index = int(m.group(1))
        kind = "self_attention" if index % 2 == 0 else "cross_attention"
        prefix = f"efficientloftr.local_feature_transformer.layers.{index // 2}.{kind}"
        return f"{prefix}.{_ATTENTION[m.group(2)]}.{m.group(3)}"
    if m := re.fullmatch(r"fine_preprocess\.layer3_outconv\.(\w+)", key):
        return f"refinement_layer.out_conv.{m.group(1)}"
    if m := re.fullmatch(r"fine_preprocess\.layer([12])_outconv\.(\w+)", key):
        return f"refinement_layer.out_conv_layers.{2 - int(m.group(1))}.out_conv1.{m.group(2)}"
    if m := re.fullmatch(r"fine_preprocess\.layer([12])_outconv2\.([013])\.(\w+)", key):
        return f"refinement_layer.out_conv_layers.{2 - int(m.group(1))}.{_FINE[m.group(2)]}.{m.group(3)}"
    raise KeyError(key)


def transformers_reference(model: EfficientLoFTR, skip_softmax: bool = False):
    """transformers' EfficientLoFTRForKeypointMatching with our weights, fed through a Lightning-style checkpoint,
    instrumented to expose what its outputs hide, and with its fp32 RoPE tables rounded to fp16 like the release."""
    from transformers import EfficientLoFTRConfig, EfficientLoFTRForKeypointMatching

    ckpt = {"state_dict": {"matcher." + k: v for k, v in model.state_dict().items()}}
    conf = model.conf
    threshold = conf["coarse_threshold_optimized"] if skip_softmax else conf["coarse_threshold"]
    hf_conf = EfficientLoFTRConfig(coarse_matching_threshold=threshold, coarse_matching_skip_softmax=skip_softmax,
                                   coarse_matching_temperature=conf["temperature"],
                                   coarse_matching_border_removal=conf["border_removal"],
                                   fine_matching_regress_temperature=conf["fine_temperature"],
                                   fine_matching_slice_dim=conf["fine_slice_dim"])
    hf = EfficientLoFTRForKeypointMatching(hf_conf).eval()
    hf.load_state_dict({transformers_key(k): v for k, v in ckpt["state_dict"].items()}, strict=True)

    captured: dict = {}
    rotary = hf.efficientloftr.rotary_emb
    rotary_forward = rotary.forward
    rotary.forward = lambda x: tuple(t.half().to(t.dtype) for t in rotary_forward(x))
    hf.efficientloftr.register_forward_hook(lambda m, i, o: captured.update(coarse=o.feature_maps[0]))
    hf.refinement_layer.register_forward_hook(lambda m, i, o: captured.update(windows=o))
    get_matches = hf._get_matches_from_scores
    hf._get_matches_from_scores = lambda scores: (captured.update(scores=scores.clone()), get_matches(scores))[1]
    return hf, captured


def test_matches_transformers_reference(model, images, output):
    """Same numbers as transformers' EfficientLoFTR (fp32, CPU) given the same (official-layout) checkpoint.

    Measured on this pair: coarse features, coarse confidence, coarse matches and their scores, fine windows,
    stage-1 confidences and the stage-2 similarities are bitwise equal; the stage-2 offsets agree to 4e-8 px.
    Asserted with atol 1e-5 (1e-4 px for coordinates).

    transformers 5.23 departs from the official code here, so the comparison routes around it:
    - RoPE: fp32 sin/cos tables; the release rounds them to fp16 (ropefp16=True). We round transformers' tables.
    - Fine stage 1 is not usable as a reference: it scales the 56 stage-1 channels by 1/sqrt(56) (official
      1/sqrt(64)); its dual-softmax runs over (matches, image-0 pixels) instead of (image-0, image-1 pixels),
      because its tensors carry a leading batch axis; and its stage-1 offset is gathered along the match axis, so
      every match gets window pixel 0 (it fails outright with fewer than 64 matches). We check our stage-1
      matrix against the official formula on transformers' fine windows, then use transformers' own argmax
      decomposition and stage-2 code (3x3 gather with the official off-by-one/wrap, softmax, expectation).
    - It refines non-corresponding windows: entry k pairs the image-0 cell matched to image-1 cell k with the
      image-1 cell matched to image-0 cell k (and interleaves pairs when the batch is > 1). We feed it the
      windows of our matched cells, so its end-to-end keypoints are not compared.
    """
    pytest.importorskip("transformers", reason="transformers (test dependency in requirements.txt) is not installed")
    hf, captured = transformers_reference(model)
    image0, image1 = images
    with torch.no_grad():
        hf_out = hf(torch.stack([image0, image1], 1))
        _, _, coarse = model.backbone(torch.cat([image0, image1]))
        feat0, feat1 = model.loftr_coarse(*coarse.split(1))

    # Coarse features, confidence, matches.
    atol = 1e-5
    torch.testing.assert_close(captured["coarse"][:, 0], feat0, atol=atol, rtol=1e-5)
    torch.testing.assert_close(captured["coarse"][:, 1], feat1, atol=atol, rtol=1e-5)
    cells = output["conf_matrix"].shape[1]
    torch.testing.assert_close(captured["scores"].reshape(1, cells, cells), output["conf_matrix"], atol=atol, rtol=0)
    assert len(output["i_ids"]) >= 10
    matched = hf_out.matches[0, 1] > -1  # per image-0 cell: its image-1 cell
    assert torch.equal(torch.nonzero(matched)[:, 0], output["i_ids"])
    assert torch.equal(hf_out.matches[0, 1][matched], output["j_ids"])
    torch.testing.assert_close(hf_out.matching_scores[0, 1][matched], output["mconf"], atol=atol, rtol=0)

    # Fine stage on 128 cell pairs spread over the grid (borders included: the ring and the wrap-around matter).
    generator = torch.Generator().manual_seed(3)
    i_ids, j_ids = torch.randint(0, cells, (2, 128), generator=generator)
    b_ids = torch.zeros_like(i_ids)
    with torch.no_grad():
        ours = model(image0, image1, coarse_matches=(b_ids, i_ids, j_ids))
    windows0, windows1 = (w[0] for w in captured["windows"])  # (L, 64, 64), (L, 100, 64): every cell
    windows0, windows1 = windows0[i_ids], windows1[j_ids]
    stage1 = torch.einsum("mlc,mrc->mlr", windows0[..., :56] / 8, windows1[..., :56] / 8)
    stage1 = stage1.softmax(1) * stage1.softmax(2)
    torch.testing.assert_close(ours["conf_matrix_fine"], stage1, atol=atol, rtol=0)
    stage2 = windows0[..., 56:] @ (windows1[..., 56:] / math.sqrt(8)).transpose(1, 2)
    torch.testing.assert_close(ours["sim_matrix_ff"], stage2, atol=atol, rtol=1e-5)

    wc = ours["hw_c"][1]
    coarse_kpts = torch.stack([torch.stack([i_ids % wc, i_ids // wc], 1),
                               torch.stack([j_ids % wc, j_ids // wc], 1)])[None].float() * 8  # (1, 2, M, 2)
    inner = stage1.unflatten(2, (10, 10))[..., 1:-1, 1:-1].reshape(1, 128, 64, 64)
    with torch.no_grad():
        indices, _ = hf._get_first_stage_fine_matching(inner, coarse_kpts, 64, 1.0)  # (1, 2, M, 1)
        refined = hf._get_second_stage_fine_matching(indices, torch.zeros(1, 2, 128, 2), stage2[None], 64, 1.0)
    idx0, idx1 = indices[0, :, :, 0]
    assert torch.equal(ours["fine_idx0"], idx0)
    assert torch.equal(ours["fine_idx1"], (idx1 // 8 + 1) * 10 + idx1 % 8 + 1)
    torch.testing.assert_close(ours["fine_offset1"], refined[0, 1], atol=1e-4, rtol=0)

    def pixel(index: torch.Tensor) -> torch.Tensor:  # official: window pixel k -> (k % 8, k // 8) - W // 2 + 0.5
        return torch.stack([index % 8, index // 8], 1).float() - 3.5

    torch.testing.assert_close(ours["keypoints0"], coarse_kpts[0, 0] + pixel(idx0), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["keypoints1"], coarse_kpts[0, 1] + pixel(idx1) + refined[0, 1], atol=1e-4, rtol=0)


def test_optimized_mode_matches_transformers_skip_softmax(model, images):
    """Optimized mode = transformers' coarse_matching_skip_softmax: same matches, mconf = similarity logit."""
    pytest.importorskip("transformers", reason="transformers (test dependency in requirements.txt) is not installed")
    optimized = copy.deepcopy(model)
    optimized.conf = {**model.conf, "optimized": True, "coarse_threshold_optimized": 40.0}
    hf, captured = transformers_reference(optimized, skip_softmax=True)
    with torch.no_grad():
        hf_out = hf(torch.stack(images, 1))
        out = optimized(*images)
    assert "conf_matrix" not in out
    cells = out["sim_matrix"].shape[1]
    torch.testing.assert_close(captured["scores"].reshape(1, cells, cells), out["sim_matrix"], atol=1e-4, rtol=1e-6)
    matched = hf_out.matches[0, 1] > -1
    assert len(out["i_ids"]) >= 5
    assert torch.equal(torch.nonzero(matched)[:, 0], out["i_ids"])
    assert torch.equal(hf_out.matches[0, 1][matched], out["j_ids"])
    torch.testing.assert_close(hf_out.matching_scores[0, 1][matched], out["mconf"], atol=1e-4, rtol=1e-6)


def test_coarse_match_rule_matches_transformers():
    """Threshold + border removal + mutual nearest neighbour on a score volume with many planted matches."""
    pytest.importorskip("transformers", reason="transformers (test dependency in requirements.txt) is not installed")
    from transformers import EfficientLoFTRConfig, EfficientLoFTRForKeypointMatching

    hf = SimpleNamespace(config=EfficientLoFTRConfig(coarse_matching_threshold=0.5))  # the rule reads only this
    generator = torch.Generator().manual_seed(0)
    hc, wc = 16, 20
    scores = torch.rand(2, hc * wc, hc * wc, generator=generator) * 0.3
    for b in range(2):  # planted pairs in [0.3, 0.9]: about half pass the 0.5 threshold
        scores[b, torch.arange(hc * wc), torch.randperm(hc * wc, generator=generator)] += 0.3 + torch.rand(
            hc * wc, generator=generator) * 0.6
    for b in range(2):  # transformers' batch > 1 interleaves its match indices: one pair at a time
        volume = scores[b:b + 1].reshape(1, hc, wc, hc, wc)
        matches, _ = EfficientLoFTRForKeypointMatching._get_matches_from_scores(hf, volume)
        valid = matches[0, 1] > -1
        _, i_ids, j_ids = _mutual_matches(scores[b:b + 1], 0.5, 2, hc, wc)
        assert 40 < len(i_ids) < 150
        assert torch.equal(torch.nonzero(valid)[:, 0], i_ids) and torch.equal(matches[0, 1][valid], j_ids)


# ------------------------------------------------------------------------------------------------ own contracts

def test_output_contract(model, images, output):
    hc, wc = output["hw_c"]
    assert (hc, wc) == (SIZE[1] // 8, SIZE[0] // 8)
    m = len(output["b_ids"])
    shapes = {"sim_matrix": (1, hc * wc, hc * wc), "conf_matrix": (1, hc * wc, hc * wc), "mconf": (m,),
              "conf_matrix_fine": (m, 64, 100), "sim_matrix_ff": (m, 64, 100), "fine_idx0": (m,), "fine_idx1": (m,),
              "fine_offset1": (m, 2), "keypoints0": (m, 2), "keypoints1": (m, 2), "batch_indexes": (m,),
              "scores": (m,), "i_ids": (m,), "j_ids": (m,)}
    for key, shape in shapes.items():
        assert tuple(output[key].shape) == shape, key
    assert ((output["fine_idx0"] >= 0) & (output["fine_idx0"] < 64)).all()
    inner_row, inner_col = output["fine_idx1"] // 10, output["fine_idx1"] % 10
    assert ((inner_row >= 1) & (inner_row <= 8) & (inner_col >= 1) & (inner_col <= 8)).all()
    assert (output["fine_offset1"].abs() <= 1).all()
    # keypoints0 + 3.5 is a pixel of the matched cell (official frame, see the module docstring)
    pixel0 = output["keypoints0"] + PIXEL_OFFSET
    cell0 = torch.stack([output["i_ids"] % wc, output["i_ids"] // wc], 1) * 8
    assert ((pixel0 - cell0 >= 0) & (pixel0 - cell0 <= 7)).all()
    torch.testing.assert_close(output["scores"], output["mconf"])
    # batch of two pairs = the pairs one at a time
    image0, image1 = images
    with torch.no_grad():
        batched = model(torch.cat([image0, image1]), torch.cat([image1, image0]))
        swapped = model(image1, image0)
    first = batched["b_ids"] == 0
    assert torch.equal(batched["i_ids"][first], output["i_ids"])
    torch.testing.assert_close(batched["keypoints1"][first], output["keypoints1"], atol=1e-4, rtol=0)
    assert torch.equal(batched["i_ids"][~first], swapped["i_ids"])
    torch.testing.assert_close(batched["sim_matrix"][1:], swapped["sim_matrix"], atol=1e-3, rtol=1e-5)


def test_reparameterize_same_outputs(model, images, output):
    """Measured: 1/8 backbone features within 1.4e-4 (values up to 25), sim_matrix within 6e-4 (up to 177),
    conf_matrix within 4e-5 (1.7e-4 seen with another thread count: folded BN reassociates fp32 sums), stage-2
    offsets within 3e-7 px; same coarse matches and stage-1 pixels."""
    deployed = copy.deepcopy(model)
    deployed.reparameterize()
    keys = deployed.state_dict().keys()
    assert "backbone.layer0.rbr_reparam.weight" in keys and not any("rbr_dense" in k for k in keys)
    with torch.no_grad():
        out = deployed(*images)
    torch.testing.assert_close(out["sim_matrix"], output["sim_matrix"], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out["conf_matrix"], output["conf_matrix"], atol=5e-4, rtol=0)
    for key in ("i_ids", "j_ids", "fine_idx0", "fine_idx1"):
        assert torch.equal(out[key], output[key]), key
    torch.testing.assert_close(out["keypoints1"], output["keypoints1"], atol=1e-4, rtol=0)


def test_parameter_count_and_names():
    model = EfficientLoFTR()
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 16.0e6) / 16.0e6 < 0.01, count  # official: 16.0 M
    names = model.state_dict().keys()
    assert len(names) == 447
    for name in ("backbone.layer0.rbr_dense.conv.weight", "backbone.layer1.0.rbr_identity.running_var",
                 "backbone.layer3.13.rbr_1x1.bn.num_batches_tracked", "loftr_coarse.layers.7.aggregate.weight",
                 "loftr_coarse.layers.0.mlp.2.weight", "loftr_coarse.layers.3.norm2.bias",
                 "fine_preprocess.layer2_outconv2.1.running_mean", "fine_preprocess.layer1_outconv2.3.weight"):
        assert name in names, name


def _same_weights(a: EfficientLoFTR, b: EfficientLoFTR) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_load_checkpoint_round_trip(model, tmp_path):
    from safetensors.torch import save_file

    state = model.state_dict()
    path = tmp_path / "eloftr.ckpt"
    torch.save({"epoch": 3, "state_dict": {"matcher." + k: v for k, v in state.items()}}, path)
    loaded = load_checkpoint(path, {"coarse_threshold": 0.01})
    _same_weights(loaded, model)
    assert not loaded.training and loaded.conf["coarse_threshold"] == 0.01

    path = tmp_path / "eloftr.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"conf": json.dumps({"coarse_threshold": 0.3, "optimized": True})})
    loaded = load_checkpoint(path)
    _same_weights(loaded, model)
    assert loaded.conf["coarse_threshold"] == 0.3 and loaded.conf["optimized"]
    assert not load_checkpoint(path, {"optimized": False}).conf["optimized"]

    deployed = copy.deepcopy(model)  # deploy-form (reparameterized) weights load too
    deployed.reparameterize()
    save_file({k: v.contiguous() for k, v in deployed.state_dict().items()}, str(path))
    _same_weights(load_checkpoint(path), deployed)

    bare = state_dict_from_checkpoint({"matcher." + k: v for k, v in state.items()})
    assert bare.keys() == state.keys()
    assert state_dict_from_checkpoint(dict(state)).keys() == state.keys()


def test_bad_checkpoints(model, tmp_path):
    from safetensors.torch import save_file

    state = {"matcher." + k: v for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    cases = {
        "missing": ({k: v for k, v in state.items() if "layer3.5." not in k}, r"missing keys .*layer3\.5\."),
        "unexpected": ({**state, "matcher.extra.weight": torch.zeros(1)}, r"unexpected keys .*extra\.weight"),
        "shape": ({**state, "matcher.loftr_coarse.layers.0.merge.weight": torch.zeros(3, 3)}, "shape mismatch"),
        "foreign": ({"model.encoder.weight": torch.zeros(1)}, "not an Efficient LoFTR state dict"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": bad}, path)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(path)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(garbage)
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(garbage.rename(tmp_path / "garbage.safetensors"))
    path = tmp_path / "badconf.safetensors"
    save_file({k.removeprefix("matcher."): v.contiguous() for k, v in state.items()}, str(path),
              metadata={"conf": json.dumps({"no_such_key": 1})})
    with pytest.raises(ValueError, match="unknown Efficient LoFTR conf keys"):
        load_checkpoint(path)
    for bad in (["not", "a", "dict"], {}, {"state_dict": {"backbone.x": 1}}):
        with pytest.raises(ValueError):
            state_dict_from_checkpoint(bad)


def test_coarse_matches_override(model, images, output):
    image0, image1 = images
    with torch.no_grad():
        same = model(image0, image1, coarse_matches=(output["b_ids"], output["i_ids"], output["j_ids"]))
    for key in ("keypoints0", "keypoints1", "conf_matrix_fine", "mconf"):
        torch.testing.assert_close(same[key], output[key], atol=0, rtol=0)

    # cells the matcher did not pick, border cells included (training pads predictions with ground truth)
    b_ids, i_ids, j_ids = torch.tensor([0, 0, 0]), torch.tensor([0, 45, 319]), torch.tensor([319, 46, 0])
    with torch.no_grad():
        forced = model(image0, image1, coarse_matches=(b_ids, i_ids, j_ids))
    assert torch.equal(forced["i_ids"], i_ids) and torch.equal(forced["j_ids"], j_ids)
    torch.testing.assert_close(forced["mconf"], output["conf_matrix"][0, i_ids, j_ids])
    wc = forced["hw_c"][1]
    for ids, key in ((i_ids, "keypoints0"), (j_ids, "keypoints1")):
        offset = forced[key] + PIXEL_OFFSET - torch.stack([ids % wc, ids // wc], 1) * 8
        assert ((offset >= -1) & (offset <= 8)).all()  # within the cell's window (+1 px of sub-pixel offset)

    for bad in ((b_ids, i_ids), (b_ids, i_ids, j_ids[:2]), (b_ids + 1, i_ids, j_ids), (b_ids, i_ids + 400, j_ids),
                (b_ids.float(), i_ids, j_ids)):
        with pytest.raises(ValueError, match="coarse_matches"):
            model(image0, image1, coarse_matches=bad)


def test_optimized_mode(model, images, output):
    """Optimized mode thresholds the similarity logits instead of the dual-softmax (official THR 25 vs 0.2).

    The two rank cells differently (the dual-softmax divides by row and column sums), so the official code does
    not promise the same coarse matches; each mode is checked against its own rule, and given the same cells
    the fine stage is identical.
    """
    optimized = copy.deepcopy(model)
    optimized.conf = {**model.conf, "optimized": True, "coarse_threshold_optimized": 40.0}
    with torch.no_grad():
        out = optimized(*images)
        given = optimized(*images, coarse_matches=(output["b_ids"], output["i_ids"], output["j_ids"]))
    assert "conf_matrix" not in out
    torch.testing.assert_close(out["sim_matrix"], output["sim_matrix"], atol=0, rtol=0)
    sim = out["sim_matrix"][0]
    hc, wc = out["hw_c"]
    expected = []
    for i in range(hc * wc):
        j = int(sim[i].argmax())
        inside = all(2 <= v < n - 2 for v, n in ((i // wc, hc), (i % wc, wc), (j // wc, hc), (j % wc, wc)))
        if inside and int(sim[:, j].argmax()) == i and sim[i, j] > 40.0:
            expected.append((i, j))
    assert len(expected) >= 5
    assert list(zip(out["i_ids"].tolist(), out["j_ids"].tolist())) == expected
    torch.testing.assert_close(out["mconf"], sim[out["i_ids"], out["j_ids"]])
    torch.testing.assert_close(out["scores"], torch.sigmoid(out["mconf"] - 40.0))
    assert ((out["scores"] > 0.5) & (out["scores"] <= 1)).all()
    for key in ("keypoints0", "keypoints1", "conf_matrix_fine", "fine_offset1"):
        torch.testing.assert_close(given[key], output[key], atol=0, rtol=0)


def test_no_matches_and_low_precision(model, images):
    strict = copy.deepcopy(model)
    strict.conf = {**model.conf, "coarse_threshold": 1.1}
    with torch.no_grad():
        out = strict(*images)
    assert out["keypoints0"].shape == (0, 2) and out["conf_matrix_fine"].shape == (0, 64, 100)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(*images)
    assert low["conf_matrix"].dtype == torch.float32 and low["keypoints1"].dtype == torch.float32
    assert torch.isfinite(low["conf_matrix"]).all() and torch.isfinite(low["keypoints1"]).all()


def test_gradients_reach_all_stages(images):
    """Training hooks: coarse confidence, stage-1 confidence and stage-2 offsets are differentiable."""
    small = tuple(image[..., :64, :96] for image in images)
    model = EfficientLoFTR().train()
    out = model(*small, coarse_matches=(torch.tensor([0, 0]), torch.tensor([26, 30]), torch.tensor([27, 29])))
    loss = out["conf_matrix"].sum() + out["conf_matrix_fine"].sum() + out["fine_offset1"].sum()
    loss.backward()
    for name in ("backbone.layer0.rbr_dense.conv.weight", "loftr_coarse.layers.7.mlp.0.weight",
                 "fine_preprocess.layer1_outconv2.3.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_input_and_conf_checks(model, images):
    image0, image1 = images
    bad_inputs = {
        "3D": (image0[0], image1[0]),
        "RGB": (image0.expand(-1, 3, -1, -1), image1.expand(-1, 3, -1, -1)),
        "shapes differ": (image0, image1[..., :96]),
        "not multiple of 32": (image0[..., :120, :], image1[..., :120, :]),
        "integer": ((image0 * 255).to(torch.uint8), (image1 * 255).to(torch.uint8)),
        "batch differs": (torch.cat([image0, image0]), image1),
    }
    for name, (a, b) in bad_inputs.items():
        with pytest.raises(ValueError):
            model(a, b)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(image0[..., :120, :], image1[..., :120, :])
    with pytest.raises(ValueError, match="unknown Efficient LoFTR conf keys"):
        EfficientLoFTR({"thr": 0.2})
    with pytest.raises(ValueError, match="npe"):
        EfficientLoFTR({"npe": (832, 832)})
    assert set(default_conf) >= {"coarse_threshold", "border_removal", "temperature", "fine_temperature", "optimized",
                                 "npe"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast(model, images, output):
    """fp16/bf16 autocast on CUDA: float32 matrices and coordinates, similarity close to the fp32 CPU result.

    Measured on an H200 (max error / max |sim|): 3.3e-3 for CUDA fp32 (cuDNN's default TF32 convolutions),
    8.9e-3 fp16, 5.7e-2 bf16. The error comes from the 21 random RepVGG blocks (coarse features: 5.9e-3, 1.6e-2,
    1.2e-1), not from the transformer; with logits near 100 it flips dual-softmax decisions, so matches are not
    compared. The release's mixed-precision mode uses fp16, which keeps 10 mantissa bits to bf16's 8.
    """
    cuda = copy.deepcopy(model).cuda()
    pair = tuple(image.cuda() for image in images)
    for dtype, tolerance in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            out = cuda(*pair)
        for key in ("sim_matrix", "conf_matrix", "conf_matrix_fine", "keypoints0", "keypoints1", "scores"):
            assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all(), key
        error = (out["sim_matrix"].cpu() - output["sim_matrix"]).abs().max() / output["sim_matrix"].abs().max()
        assert error < tolerance
