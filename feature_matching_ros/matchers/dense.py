"""Detector-free matchers: Efficient LoFTR (our implementation) and LoFTR (kornia's architecture).

They take the two images instead of keypoints and return matched pixel pairs directly, so they sit
behind their own batched interface, ``match_images(query, candidates) -> list[DenseMatches]``; the
pipeline and the loop-closure engine feed those pairs to the same pose and acceptance code as LightGlue.

Images go through :func:`prepare_image` (validation, RGB, shrink to ``resize_max``), are converted to
gray, padded at the bottom/right to the network's stride multiple (32 for Efficient LoFTR, 8 for LoFTR)
and to the batch's common size; matches that land in padding are dropped and coordinates go back to the
original pixels with the pixel-centre convention of :class:`PreparedImage`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from feature_matching_ros.config import MatcherConfig
from feature_matching_ros.features.learned import autocast_for
from feature_matching_ros.image import PreparedImage, prepare_image
from feature_matching_ros.models.efficient_loftr import PIXEL_OFFSET
from feature_matching_ros.weights import WeightsError

LOG = logging.getLogger(__name__)


@dataclass
class DenseMatches:
    """Matched pixels of a query (image 0) and one candidate (image 1), in original image pixels.

    keypoints0, keypoints1: (M, 2) float32; scores: (M,) float32 coarse match confidence in [0, 1]
    (Efficient LoFTR's optimized mode: sigmoid(similarity - coarse_threshold_optimized), in (0.5, 1]).
    """

    keypoints0: np.ndarray
    keypoints1: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.keypoints0.shape[0])

    @staticmethod
    def empty() -> "DenseMatches":
        zeros = np.zeros((0, 2), np.float32)
        return DenseMatches(zeros, zeros.copy(), np.zeros(0, np.float32))


class DenseMatcher(Protocol):
    name: str

    def match_images(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[DenseMatches]:
        """Match the ``query`` image against each candidate image; one :class:`DenseMatches` per candidate."""
        ...


def _gray_batch(images: Sequence[PreparedImage], divisor: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) gray in [0, 1], zero-padded bottom/right to a common size divisible by ``divisor``, and the
    (B, H, W) bool mask of real pixels."""
    height = max(p.size[1] for p in images)
    width = max(p.size[0] for p in images)
    height, width = -(-height // divisor) * divisor, -(-width // divisor) * divisor
    batch = torch.zeros(len(images), 1, height, width, device=device)
    mask = torch.zeros(len(images), height, width, dtype=torch.bool, device=device)
    for index, prepared in enumerate(images):
        gray = torch.from_numpy(np.ascontiguousarray(prepared.gray)).to(device).float().div_(255.0)
        h, w = gray.shape
        batch[index, 0, :h, :w] = gray
        mask[index, :h, :w] = True
    return batch, mask


def _prepare(query: np.ndarray, candidates: Sequence[np.ndarray], resize_max: int, divisor: int,
             device: torch.device) -> tuple[PreparedImage, list[PreparedImage], torch.Tensor, torch.Tensor]:
    """Validate and shrink the images, then batch them (query first) as :func:`_gray_batch` does."""
    prepared0 = prepare_image(query, resize_max, device)
    prepared1 = [prepare_image(c, resize_max, device) for c in candidates]
    images, masks = _gray_batch([prepared0, *prepared1], divisor, device)
    return prepared0, prepared1, images, masks


def _split(prepared0: PreparedImage, prepared1: Sequence[PreparedImage], keypoints0: torch.Tensor,
           keypoints1: torch.Tensor, scores: torch.Tensor, batch_indexes: torch.Tensor) -> list[DenseMatches]:
    """Per-pair matches in original pixels; matches outside either image's real area (padding) are dropped."""
    out = []
    for index, prepared in enumerate(prepared1):
        pick = batch_indexes == index
        k0, k1, s = keypoints0[pick].float(), keypoints1[pick].float(), scores[pick].float()
        w0, h0 = prepared0.size
        w1, h1 = prepared.size
        inside = ((k0[:, 0] <= w0 - 1) & (k0[:, 1] <= h0 - 1) & (k1[:, 0] <= w1 - 1) & (k1[:, 1] <= h1 - 1)
                  & (k0 >= 0).all(1) & (k1 >= 0).all(1))
        k0, k1, s = k0[inside], k1[inside], s[inside]
        out.append(DenseMatches(prepared0.to_original(k0).cpu().numpy().astype(np.float32),
                                prepared.to_original(k1).cpu().numpy().astype(np.float32),
                                s.clamp(0, 1).cpu().numpy().astype(np.float32)))
    return out


class EfficientLoftrMatcher:
    """Efficient LoFTR (``models.efficient_loftr``) with our synthetic-trained weights or a user checkpoint."""

    name = "eloftr"
    divisor = 32

    def __init__(self, config: MatcherConfig, resize_max: int, device: torch.device, precision: str) -> None:
        from feature_matching_ros.models.efficient_loftr import EfficientLoFTR, load_checkpoint

        self.device, self.precision, self.resize_max = device, precision, resize_max
        # coarse_threshold applies to the dual-softmax (full mode); optimized mode thresholds the similarity with
        # coarse_threshold_optimized: the official value for a checkpoint path, ours for our weights (weights.py).
        conf = {"coarse_threshold": config.coarse_threshold, "optimized": config.eloftr_mode == "optimized"}
        if config.weights == "default":
            from feature_matching_ros.weights import ELOFTR_CONF, load_trained_eloftr_state_dict

            model = EfficientLoFTR(ELOFTR_CONF | conf)
            model.load_state_dict(load_trained_eloftr_state_dict())
        else:
            path = Path(config.weights).expanduser()
            if not path.is_file():
                raise WeightsError(f"Efficient LoFTR checkpoint not found: {path} (weights=default uses the shipped "
                                   "synthetic-trained weights; the official eloftr_outdoor.ckpt is a user download)")
            try:
                model = load_checkpoint(path, conf)
            except (ValueError, RuntimeError, OSError) as error:
                raise WeightsError(f"cannot load Efficient LoFTR weights from {path}: {error}") from error
        model.reparameterize()  # RepVGG branches folded into one conv per block: same outputs, faster
        self.model = model.eval().to(device)
        # The fixed-shape part (backbone, transformer, coarse scores, mutual mask, fine maps) is launch-bound at
        # batch 1 on a GPU; on CUDA it replays from a captured graph per input shape (as LightGlue does).
        self._dense_keys = ("sim_matrix", "match_mask", "fine0", "fine1") + (
            () if model.conf["optimized"] else ("conf_matrix",))
        self._graphs = None
        if device.type == "cuda" and config.cuda_graphs:
            from feature_matching_ros.matchers.lightglue import CudaGraphCache

            self._graphs = CudaGraphCache(self._dense_stage)

    def _dense_stage(self, image0: torch.Tensor, image1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with autocast_for(self.device, self.precision):
            out = self.model.dense_stage(image0, image1)
        return tuple(out[key] for key in self._dense_keys)

    @torch.inference_mode()
    def match_images(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[DenseMatches]:
        if not len(candidates):
            return []
        prepared0, prepared1, images, _ = _prepare(query, candidates, self.resize_max, self.divisor, self.device)
        image0 = images[:1].expand(len(prepared1), -1, -1, -1).contiguous()
        dense_stage = self._graphs or self._dense_stage
        dense = dict(zip(self._dense_keys, dense_stage(image0, images[1:])))
        out = self.model.sparse_stage(dense)
        # The model reports the official frame (pixel index - PIXEL_OFFSET); ours is the pixel index.
        return _split(prepared0, prepared1, out["keypoints0"] + PIXEL_OFFSET, out["keypoints1"] + PIXEL_OFFSET,
                      out["scores"], out["batch_indexes"])


def _lightning_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not state:
        raise WeightsError("checkpoint holds no state_dict")
    prefix = "matcher."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


class LoftrMatcher:
    """LoFTR (linear attention) with kornia's architecture and a user-supplied checkpoint.

    kornia downloads its weights at construction; we build it with ``pretrained=None`` and load the file the
    user names (official ``loftr_outdoor.ckpt`` with ``matcher.`` keys, or kornia's re-saved copy), since
    nothing is downloaded at run time.
    """

    name = "loftr"
    divisor = 8

    def __init__(self, config: MatcherConfig, resize_max: int, device: torch.device, precision: str) -> None:
        from kornia.feature import LoFTR
        from kornia.feature.loftr.loftr import default_cfg

        self.device, self.precision, self.resize_max = device, precision, resize_max
        if config.weights == "default":
            raise WeightsError("matcher=loftr needs weights=PATH: no LoFTR weights ship with this package (download "
                               "the official loftr_outdoor.ckpt, or use matcher=eloftr)")
        path = Path(config.weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"LoFTR checkpoint not found: {path}")
        cfg = {**default_cfg, "match_coarse": {**default_cfg["match_coarse"], "thr": config.coarse_threshold}}
        model = LoFTR(pretrained=None, config=cfg)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            result = model.load_state_dict(_lightning_state_dict(checkpoint), strict=False)
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise WeightsError(f"cannot load LoFTR weights from {path}: {error}") from error
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(f"{path} does not fit kornia's LoFTR (missing {result.missing_keys[:4]}, unexpected "
                               f"{result.unexpected_keys[:4]})")
        self.model = model.eval().to(device)

    @torch.inference_mode()
    def match_images(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[DenseMatches]:
        if not len(candidates):
            return []
        prepared0, prepared1, images, masks = _prepare(query, candidates, self.resize_max, self.divisor, self.device)
        count = len(prepared1)
        data = {"image0": images[:1].expand(count, -1, -1, -1), "image1": images[1:]}
        if not bool(masks.all()):
            # Full-resolution masks of the real pixels; kornia samples them per coarse cell to keep padding out of
            # attention and coarse matching.
            data["mask0"], data["mask1"] = masks[:1].expand(count, -1, -1), masks[1:]
        with autocast_for(self.device, self.precision):
            out = self.model(data)
        return _split(prepared0, prepared1, out["keypoints0"], out["keypoints1"], out["confidence"],
                      out["batch_indexes"])


def build_dense_matcher(config: MatcherConfig, resize_max: int, device: torch.device, precision: str) -> DenseMatcher:
    if config.name == "eloftr":
        return EfficientLoftrMatcher(config, resize_max, device, precision)
    if config.name == "loftr":
        return LoftrMatcher(config, resize_max, device, precision)
    raise ValueError(f"{config.name!r} is not a detector-free matcher")
