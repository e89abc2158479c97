"""Efficient LoFTR (Wang, He, Peng, Tan, Zhou, CVPR 2024): semi-dense matching with aggregated attention.

Why we write it ourselves: no installable library ships Efficient LoFTR except Hugging Face
``transformers``, which we use only as the numerical reference in test/test_efficient_loftr.py (it renames
every parameter, has no training hooks, and departs from the release in small ways listed there). We need
the official layout, so that the released Lightning checkpoint (``matcher.`` + the names below) loads as is
and our own training writes checkpoints the official code reads, and we need training hooks: the coarse
matches can be imposed (ground-truth padding), and the matrices the losses need are returned.

Pipeline (images H x W, multiples of 32; coarse grid Hc x Wc = H/8 x W/8, L = Hc * Wc cells):

1. RepVGG backbone, both images in one batch: 1/2 (64 ch), 1/4 (128 ch), 1/8 (256 ch, coarse).
2. Coarse transformer, 4 x (self, cross) aggregated-attention layers at 1/8: queries from a depthwise
   4x4/4 conv, keys and values from a 4x4 max-pool (attention on 1/32 tokens), 2D RoPE in the self layers,
   upsampling x4, MLP on [x, message], residual.
3. Coarse matching: similarity / temperature, dual-softmax (skipped in optimized mode), threshold,
   border removal, mutual nearest neighbour.
4. Fine features at full resolution (64 ch) from the coarse map and the 1/4 and 1/2 maps; per matched cell an
   8x8 window in image 0 and a 10x10 window (one-pixel ring) in image 1.
5. Fine matching. Stage 1: dual-softmax on the first 56 channels, argmax over the central 8x8 x 8x8 pairs
   -> one pixel in each window. Stage 2: softmax over a 3x3 neighbourhood of the last 8 channels
   -> sub-pixel expectation for image 1.

Official behaviour reproduced on purpose (the released weights were trained with it):

- Coordinates. Coarse cell (row r, col c) sits at (8c, 8r); window pixel k (row-major in the 8x8 window, at
  image pixel (8c + k % 8, 8r + k // 8)) is offset by (k % 8 - 3.5, k // 8 - 3.5). So ``keypoints0`` is the
  image-0 pixel index minus 3.5 in x and y, and ``keypoints1`` the image-1 pixel index minus 3.5 plus the
  sub-pixel offset. The official training supervision uses the same frame (open question upstream:
  zju3dv/EfficientLoFTR#46); add ``PIXEL_OFFSET`` to get pixel indices.
- Stage 2 gathers the 10x10 window of image 1 at rows/cols (inner index - 1 .. inner index + 1), i.e. around
  the pixel one up and one left of the stage-1 pixel, and index -1 wraps to the far ring (official
  ``fine_matching.py`` and its loss index it this way); the expectation is still read as the offset from the
  stage-1 pixel.
- RoPE sin/cos tables are rounded to fp16 (official ``ropefp16=True``), positions are 1-based and scaled by
  ``npe`` = (train_h, train_w, test_h, test_w) as ``pos * train / test``.
- Stage-1 fine features (56 channels) are scaled by 1/sqrt(64), the full fine width.
- Cross layers run in sequence: image 1 attends to the already updated image 0.

Not reproduced: padding masks (``mask0``/``mask1``) and the official random sampling of coarse matches in
training (pass ``coarse_matches`` instead).

Precision: under torch.autocast (fp16/bf16) the networks run in low precision, while the coarse similarity,
both dual-softmaxes and the stage-2 softmax always run in float32 (the official optimized mode multiplies the
coarse features in fp16). Prefer fp16 to bf16: the deep RepVGG stack loses too much at 8 mantissa bits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

default_conf: dict[str, Any] = {
    "block_dims": (64, 128, 256),  # backbone widths at 1/2, 1/4, 1/8; the last is the transformer width
    "num_blocks": (2, 4, 14),  # RepVGG blocks at 1/2, 1/4, 1/8 (after the stride-2 stem "layer0")
    "num_heads": 8,
    "num_layers": 4,  # (self, cross) pairs
    "agg_size": 4,  # query conv kernel/stride and key/value max-pool size (official agg_size0 = agg_size1)
    "npe": (832, 832, 832, 832),  # RoPE position scaling (train_h, train_w, test_h, test_w), official default
    "temperature": 0.1,  # coarse dual-softmax temperature
    "coarse_threshold": 0.2,  # on the dual-softmax confidence (full mode)
    "optimized": False,  # skip the coarse dual-softmax; threshold the similarity instead
    "coarse_threshold_optimized": 25.0,  # on sim_matrix (similarity / temperature), official optimized value
    "border_removal": 2,  # coarse cells
    "fine_temperature": 10.0,  # stage-2 softmax temperature (official local_regress_temperature)
    "fine_slice_dim": 8,  # channels of the stage-2 features (the rest go to stage 1)
}

COARSE_STRIDE = 8
FINE_WINDOW = 8  # stage-1 window side (= COARSE_STRIDE: the windows tile the image)
PIXEL_OFFSET = (FINE_WINDOW - 1) / 2  # keypoints + PIXEL_OFFSET = pixel indices (see module docstring)


def _check_conf(conf: dict[str, Any]) -> None:
    unknown = sorted(set(conf) - set(default_conf))
    if unknown:
        raise ValueError(f"unknown Efficient LoFTR conf keys {unknown}; allowed: {sorted(default_conf)}")

    def ints(key: str, n: int) -> None:
        value = conf[key]
        if (not isinstance(value, (list, tuple)) or len(value) != n
                or not all(isinstance(v, int) and v > 0 for v in value)):
            raise ValueError(f"conf[{key!r}]={value!r} must be {n} positive ints")

    ints("block_dims", 3)
    ints("num_blocks", 3)
    ints("npe", 4)
    for key in ("num_heads", "num_layers", "agg_size", "fine_slice_dim"):
        if not isinstance(conf[key], int) or conf[key] <= 0:
            raise ValueError(f"conf[{key!r}]={conf[key]!r} must be a positive int")
    for key in ("temperature", "fine_temperature"):
        if not isinstance(conf[key], (int, float)) or conf[key] <= 0:
            raise ValueError(f"conf[{key!r}]={conf[key]!r} must be a positive number")
    for key in ("coarse_threshold", "coarse_threshold_optimized"):
        if not isinstance(conf[key], (int, float)):
            raise ValueError(f"conf[{key!r}]={conf[key]!r} must be a number")
    if not isinstance(conf["border_removal"], int) or conf["border_removal"] < 0:
        raise ValueError(f"conf['border_removal']={conf['border_removal']!r} must be an int >= 0")
    if not isinstance(conf["optimized"], bool):
        raise ValueError(f"conf['optimized']={conf['optimized']!r} must be a bool")
    if conf["block_dims"][2] % conf["num_heads"]:
        raise ValueError(f"block_dims[2]={conf['block_dims'][2]} must be divisible by num_heads={conf['num_heads']}")
    if conf["block_dims"][2] % 4:
        raise ValueError("block_dims[2] must be divisible by 4 (2D RoPE)")
    if conf["fine_slice_dim"] >= conf["block_dims"][0]:
        raise ValueError(f"fine_slice_dim={conf['fine_slice_dim']} must be < block_dims[0]={conf['block_dims'][0]}")


# ---------------------------------------------------------------------------------------------------- backbone

def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    branch = nn.Sequential()
    branch.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False))
    branch.add_module("bn", nn.BatchNorm2d(out_ch))
    return branch


def _fold_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Fold eval-mode BatchNorm into the preceding bias-free conv: returns (kernel, bias), float64."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double()
    scale = gamma / std
    return kernel.double() * scale.reshape(-1, 1, 1, 1), bn.bias.double() - bn.running_mean.double() * scale


class RepVGGBlock(nn.Module):
    """relu(conv3x3+BN + conv1x1+BN [+ BN identity]); ``reparameterize`` folds it into one conv3x3 with bias.

    x: (N, in_ch, H, W) -> (N, out_ch, H / stride, W / stride).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        self.rbr_dense = _conv_bn(in_ch, out_ch, 3, stride)
        self.rbr_1x1 = _conv_bn(in_ch, out_ch, 1, stride)
        self.rbr_reparam: nn.Conv2d | None = None
        self.nonlinearity = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.rbr_reparam is not None:
            return self.nonlinearity(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.rbr_reparam is not None:
            return
        dense = self.rbr_dense.conv
        kernel, bias = _fold_bn(dense.weight, self.rbr_dense.bn)
        kernel_1x1, bias_1x1 = _fold_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel, bias = kernel + F.pad(kernel_1x1, [1, 1, 1, 1]), bias + bias_1x1
        if self.rbr_identity is not None:
            channels = dense.in_channels
            identity = torch.zeros(channels, channels, 3, 3, dtype=torch.float64, device=kernel.device)
            identity[torch.arange(channels), torch.arange(channels), 1, 1] = 1.0
            kernel_id, bias_id = _fold_bn(identity, self.rbr_identity)
            kernel, bias = kernel + kernel_id, bias + bias_id
        conv = nn.Conv2d(dense.in_channels, dense.out_channels, 3, dense.stride, padding=1, bias=True)
        conv = conv.to(device=dense.weight.device, dtype=dense.weight.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        del self.rbr_dense, self.rbr_1x1
        self.rbr_identity = None
        self.rbr_reparam = conv


class RepVGGBackbone(nn.Module):
    """Stem ``layer0`` (1 -> dims[0], stride 2) then ``layer1..3`` at 1/2, 1/4, 1/8.

    x: (N, 1, H, W) -> (feats 1/2 (N, dims[0], H/2, W/2), 1/4 (N, dims[1], ...), 1/8 (N, dims[2], ...)).
    """

    def __init__(self, dims: tuple[int, int, int], blocks: tuple[int, int, int]) -> None:
        super().__init__()

        def stage(in_ch: int, out_ch: int, count: int, stride: int) -> nn.ModuleList:
            return nn.ModuleList(RepVGGBlock(in_ch if k == 0 else out_ch, out_ch, stride if k == 0 else 1)
                                 for k in range(count))

        self.layer0 = RepVGGBlock(1, dims[0], 2)
        self.layer1 = stage(dims[0], dims[0], blocks[0], 1)
        self.layer2 = stage(dims[0], dims[1], blocks[1], 2)
        self.layer3 = stage(dims[1], dims[2], blocks[2], 2)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.layer0(x)
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                x = block(x)
            outputs.append(x)
        return outputs[0], outputs[1], outputs[2]


# ------------------------------------------------------------------------------------------------- transformer

def rope_tables(height: int, width: int, dim: int, npe: tuple[int, ...], device: torch.device
                ) -> tuple[Tensor, Tensor]:
    """cos, sin (height, width, dim) float32 (values rounded to fp16 like the official tables).

    Channel pairs (2p, 2p+1) rotate by the row position for even p and the column position for odd p, with
    frequency 10000^(-(p // 2) / (dim / 4)); positions are 1-based and scaled by npe (train / test).
    """
    quarter = dim // 4
    freq = torch.exp(torch.arange(0, quarter, 1, device=device).float() * (-math.log(10000.0) / quarter))
    rows = torch.arange(1, height + 1, device=device).float() * npe[0] / npe[2]
    cols = torch.arange(1, width + 1, device=device).float() * npe[1] / npe[3]
    angle_rows = (rows[:, None, None] * freq).expand(height, width, quarter)
    angle_cols = (cols[None, :, None] * freq).expand(height, width, quarter)
    angles = torch.stack([angle_rows, angle_cols], -1).flatten(-2).repeat_interleave(2, -1)
    return angles.cos().half().float(), angles.sin().half().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (N, h, w, C) rotated pairwise by (h, w, C) tables; computed in fp32, returned in x's dtype."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


class AggregatedAttentionLayer(nn.Module):
    """One encoder layer: attention between aggregated tokens, upsampled message, MLP, residual.

    x: (N, C, H, W) attends to source: (N, C, H, W) (source = x in self layers) -> (N, C, H, W).
    """

    def __init__(self, dim: int, num_heads: int, agg_size: int) -> None:
        super().__init__()
        self.num_heads, self.agg_size = num_heads, agg_size
        self.aggregate = nn.Conv2d(dim, dim, agg_size, stride=agg_size, bias=False, groups=dim)
        self.max_pool = nn.MaxPool2d(agg_size, agg_size)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.merge = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim, bias=False), nn.LeakyReLU(),
                                 nn.Linear(2 * dim, dim, bias=False))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, source: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        n, c, _, _ = x.shape
        query = self.norm1(self.aggregate(x).permute(0, 2, 3, 1))  # (N, h, w, C), h = H / agg
        source = self.norm1(self.max_pool(source).permute(0, 2, 3, 1))
        q, k, v = self.q_proj(query), self.k_proj(source), self.v_proj(source)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        h, w = q.shape[1:3]
        q, k, v = (t.reshape(n, -1, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v))
        message = F.scaled_dot_product_attention(q, k, v.to(q.dtype))  # (N, heads, h*w, C/heads)
        message = self.merge(message.transpose(1, 2).reshape(n, h * w, c))
        message = message.transpose(1, 2).reshape(n, c, h, w)
        message = F.interpolate(message, scale_factor=self.agg_size, mode="bilinear", align_corners=False)
        message = self.mlp(torch.cat([x, message.to(x.dtype)], 1).permute(0, 2, 3, 1))
        return x + self.norm2(message).permute(0, 3, 1, 2)


class LocalFeatureTransformer(nn.Module):
    """``layers[2k]`` self (with RoPE), ``layers[2k+1]`` cross; feat0, feat1: (B, C, Hc, Wc) -> same."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, agg_size: int, npe: tuple[int, ...]) -> None:
        super().__init__()
        self.agg_size, self.npe = agg_size, tuple(npe)
        self.layers = nn.ModuleList(AggregatedAttentionLayer(dim, num_heads, agg_size) for _ in range(2 * num_layers))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, feat0: Tensor, feat1: Tensor) -> tuple[Tensor, Tensor]:
        batch, dim, height, width = feat0.shape
        rope = rope_tables(height // self.agg_size, width // self.agg_size, dim, self.npe, feat0.device)
        for index, layer in enumerate(self.layers):
            if index % 2 == 0:  # self: both images in one batch, same weights
                feat0, feat1 = layer(x := torch.cat([feat0, feat1]), x, rope).split(batch)
            else:  # cross, sequential as in the official code
                feat0 = layer(feat0, feat1)
                feat1 = layer(feat1, feat0)
        return feat0, feat1


# ----------------------------------------------------------------------------------------------- fine features

def _conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, bias=False)


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)


class FinePreprocess(nn.Module):
    """FPN from the coarse map up to full resolution.

    coarse (N, d2, H/8, W/8), x2 (N, d1, H/4, W/4), x1 (N, d0, H/2, W/2) -> (N, d0, H, W).
    """

    def __init__(self, dims: tuple[int, int, int]) -> None:
        super().__init__()
        d0, d1, d2 = dims
        self.layer3_outconv = _conv1x1(d2, d2)
        self.layer2_outconv = _conv1x1(d1, d2)
        self.layer2_outconv2 = nn.Sequential(_conv3x3(d2, d2), nn.BatchNorm2d(d2), nn.LeakyReLU(), _conv3x3(d2, d1))
        self.layer1_outconv = _conv1x1(d0, d1)
        self.layer1_outconv2 = nn.Sequential(_conv3x3(d1, d1), nn.BatchNorm2d(d1), nn.LeakyReLU(), _conv3x3(d1, d0))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")

    def forward(self, coarse: Tensor, x2: Tensor, x1: Tensor) -> Tensor:
        def up(t: Tensor) -> Tensor:
            return F.interpolate(t, scale_factor=2.0, mode="bilinear", align_corners=False)

        x = up(self.layer3_outconv(coarse))
        x = up(self.layer2_outconv2(self.layer2_outconv(x2) + x))
        return up(self.layer1_outconv2(self.layer1_outconv(x1) + x))


def _windows(feat: Tensor, b_ids: Tensor, cells: Tensor, grid_width: int, size: int, pad: int) -> Tensor:
    """Crop a size x size window per cell (row-major, top-left at (8c - pad, 8r - pad)), zero padding.

    feat (B, C, H, W), b_ids/cells (M,) -> (M, size * size, C); equals F.unfold(kernel=size, stride=8, padding=pad).
    """
    if pad:
        feat = F.pad(feat, (pad, pad, pad, pad))
    offsets = torch.arange(size, device=feat.device)
    rows = (cells // grid_width * COARSE_STRIDE)[:, None, None] + offsets[None, :, None]
    cols = (cells % grid_width * COARSE_STRIDE)[:, None, None] + offsets[None, None, :]
    return feat[b_ids[:, None, None], :, rows, cols].reshape(len(cells), size * size, feat.shape[1])


def subpixel_expectation(sim_matrix_ff: Tensor, idx0: Tensor, idx1: Tensor, temperature: float) -> Tensor:
    """Stage 2: expected offset (x, y) in [-1, 1] from a softmax over a 3x3 neighbourhood.

    sim_matrix_ff (M, 64, 100) stage-2 similarities; idx0 (M,) in [0, 64) pixel of the image-0 window;
    idx1 (M,) in [0, 100) pixel of the image-1 10x10 window (an inner cell). The neighbourhood is the official
    one: rows/cols (idx1 - 2 .. idx1) of the 10x10 window, -1 wrapping to 9 (see the module docstring).
    Differentiable in sim_matrix_ff; the training loss calls it with ground-truth indices.
    """
    side = FINE_WINDOW + 2
    steps = torch.arange(-1, 2, device=sim_matrix_ff.device)
    rows = (idx1 // side - 1)[:, None, None] + steps[None, :, None]
    cols = (idx1 % side - 1)[:, None, None] + steps[None, None, :]
    m_ids = torch.arange(len(idx0), device=idx0.device)[:, None, None]
    logits = sim_matrix_ff.reshape(-1, FINE_WINDOW ** 2, side, side)[m_ids, idx0[:, None, None], rows % side,
                                                                        cols % side]
    heatmap = torch.softmax(logits.reshape(-1, 9).float() / temperature, -1).reshape(-1, 3, 3)
    grid = steps.to(heatmap.dtype)
    return torch.stack([(heatmap.sum(1) * grid).sum(-1), (heatmap.sum(2) * grid).sum(-1)], -1)


# ------------------------------------------------------------------------------------------------------- model

class EfficientLoFTR(nn.Module):
    """Efficient LoFTR with the official parameter names (``backbone``, ``loftr_coarse``, ``fine_preprocess``).

    conf: merged over :data:`default_conf`; unknown keys raise ValueError.
    """

    def __init__(self, conf: dict | None = None) -> None:
        super().__init__()
        conf = {**default_conf, **(conf or {})}
        _check_conf(conf)
        self.conf = conf
        dims = tuple(conf["block_dims"])
        self.backbone = RepVGGBackbone(dims, tuple(conf["num_blocks"]))
        self.loftr_coarse = LocalFeatureTransformer(dims[2], conf["num_heads"], conf["num_layers"], conf["agg_size"],
                                                    tuple(conf["npe"]))
        self.fine_preprocess = FinePreprocess(dims)

    @property
    def size_divisor(self) -> int:
        return COARSE_STRIDE * self.conf["agg_size"]

    def reparameterize(self) -> None:
        """Fold every RepVGG block into one 3x3 conv with bias (deploy form; same outputs, faster).

        Irreversible; the backbone keys become ``rbr_reparam.{weight,bias}`` as in official deploy mode.
        """
        for module in self.backbone.modules():
            if isinstance(module, RepVGGBlock):
                module.reparameterize()

    def _check_inputs(self, image0: Tensor, image1: Tensor) -> None:
        for name, image in (("image0", image0), ("image1", image1)):
            if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != 1:
                shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"{name} must be a (B, 1, H, W) gray image tensor, got {shape}")
            if not image.is_floating_point():
                raise ValueError(f"{name} must be float in [0, 1], got {image.dtype}")
        if image0.shape != image1.shape:
            raise ValueError(f"image0 and image1 must have the same shape, got {tuple(image0.shape)} and "
                             f"{tuple(image1.shape)}")
        height, width = image0.shape[-2:]
        divisor = self.size_divisor
        if height % divisor or width % divisor or height == 0 or width == 0:
            raise ValueError(f"image height and width must be positive multiples of {divisor}, got {height}x{width} "
                             f"(pad or resize the images)")

    def forward(self, image0: Tensor, image1: Tensor,
                coarse_matches: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """Match two batches of gray images.

        image0, image1: (B, 1, H, W) float in [0, 1], H and W multiples of 32.
        coarse_matches: optional (b_ids, i_ids, j_ids), each (M,) long: coarse cell pairs (row-major cell indices)
            the fine stage runs on instead of the predicted matches (training with ground-truth padding).

        Returns (M matches, L0 = L1 = Hc * Wc):
            sim_matrix (B, L0, L1) float32: coarse similarity / temperature.
            conf_matrix (B, L0, L1) float32: dual-softmax confidence (absent in optimized mode).
            hw_c: (Hc, Wc) ints.
            b_ids, i_ids, j_ids (M,) long: coarse matches the fine stage used; mconf (M,): their conf_matrix value
                (sim_matrix value in optimized mode), no gradient.
            conf_matrix_fine (M, 64, 100) float32: stage-1 dual-softmax, 8x8 window of image 0 (rows) vs 10x10 of
                image 1 (columns); the argmax and the official loss use its central 8x8 columns
                (``.unflatten(2, (10, 10))[..., 1:-1, 1:-1]``).
            sim_matrix_ff (M, 64, 100) float32: stage-2 similarities (for :func:`subpixel_expectation`).
            fine_idx0 (M,) in [0, 64), fine_idx1 (M,) in [0, 100) (an inner cell of the 10x10 window): stage-1 argmax.
            fine_offset1 (M, 2) float32: stage-2 expected offset (x, y), pixels, from the stage-1 pixel of image 1.
            keypoints0, keypoints1 (M, 2) float32: matches (x, y) in the official frame (pixel index - 3.5, see
                the module docstring); batch_indexes (M,) long; scores (M,) float32 in [0, 1]: mconf, or in
                optimized mode sigmoid(mconf - coarse_threshold_optimized).
        """
        self._check_inputs(image0, image1)
        batch, _, height, width = image0.shape
        if coarse_matches is not None:
            cells = (height // COARSE_STRIDE) * (width // COARSE_STRIDE)
            coarse_matches = _check_coarse_matches(coarse_matches, batch, cells, image0.device)
        dense = self.dense_stage(image0, image1, with_match_mask=coarse_matches is None)
        return self.sparse_stage(dense, coarse_matches)

    def dense_stage(self, image0: Tensor, image1: Tensor, with_match_mask: bool = True) -> dict[str, Tensor]:
        """Everything of fixed shape: backbone, coarse transformer, coarse scores, the mutual-match mask and the
        full-resolution fine maps. No host synchronisation, so inference can replay it as a CUDA graph.

        Returns sim_matrix (B, L, L), conf_matrix (B, L, L) (full mode), match_mask (B, L, L) bool (when asked),
        fine0, fine1 (B, 64, H, W) fine feature maps.
        """
        conf = self.conf
        batch = image0.shape[0]
        x1, x2, coarse = self.backbone(torch.cat([image0, image1]))
        hc, wc = coarse.shape[-2:]
        feat0, feat1 = self.loftr_coarse(*coarse.split(batch))
        out: dict[str, Tensor] = {}
        with torch.autocast(device_type=coarse.device.type, enabled=False):
            f0, f1 = (f.flatten(2).transpose(1, 2).float() for f in (feat0, feat1))  # (B, L, C)
            dim = f0.shape[-1]
            sim = torch.einsum("blc,bsc->bls", f0 / dim ** 0.5, f1 / dim ** 0.5) / conf["temperature"]
            out["sim_matrix"] = sim
            if conf["optimized"]:
                scores, threshold = sim, conf["coarse_threshold_optimized"]
            else:
                scores = out["conf_matrix"] = F.softmax(sim, 1) * F.softmax(sim, 2)
                threshold = conf["coarse_threshold"]
            if with_match_mask:
                out["match_mask"] = _mutual_mask(scores.detach(), threshold, conf["border_removal"], hc, wc)
        # Fine features, from the coarse maps scaled like the official code (fp16 overflow guard).
        fine = self.fine_preprocess(torch.cat([feat0, feat1]) / feat0.shape[1] ** 0.5, x2, x1)
        out["fine0"], out["fine1"] = fine.split(batch)
        return out

    def sparse_stage(self, dense: Mapping[str, Tensor],
                     coarse_matches: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Any]:
        """Coarse matches (from ``match_mask`` or imposed) -> fine windows -> stage 1 and 2 -> keypoints.
        ``dense``: the output of :meth:`dense_stage`. Returns what :meth:`forward` documents."""
        conf = self.conf
        fine0, fine1 = dense["fine0"], dense["fine1"]
        height = fine0.shape[-2]
        hc, wc = fine0.shape[-2] // COARSE_STRIDE, fine0.shape[-1] // COARSE_STRIDE
        out: dict[str, Any] = {"hw_c": (hc, wc), "sim_matrix": dense["sim_matrix"]}
        if "conf_matrix" in dense:
            out["conf_matrix"] = dense["conf_matrix"]
        scores = dense["sim_matrix"] if conf["optimized"] else dense["conf_matrix"]
        if coarse_matches is None:
            valid, j_all = dense["match_mask"].max(2)
            b_ids, i_ids = torch.where(valid)
            j_ids = j_all[b_ids, i_ids]
        else:
            b_ids, i_ids, j_ids = coarse_matches
        mconf = scores.detach()[b_ids, i_ids, j_ids]
        out.update(b_ids=b_ids, i_ids=i_ids, j_ids=j_ids, mconf=mconf, batch_indexes=b_ids)
        if conf["optimized"]:
            out["scores"] = torch.sigmoid(mconf - conf["coarse_threshold_optimized"])
        else:
            out["scores"] = mconf

        win0 = _windows(fine0, b_ids, i_ids, wc, FINE_WINDOW, 0)  # (M, 64, C)
        win1 = _windows(fine1, b_ids, j_ids, wc, FINE_WINDOW + 2, 1)  # (M, 100, C)
        out.update(self._fine_matching(win0, win1))

        scale = height / hc
        kpts0 = torch.stack([i_ids % wc, i_ids // wc], 1).float() * scale
        kpts1 = torch.stack([j_ids % wc, j_ids // wc], 1).float() * scale
        out["keypoints0"] = kpts0 + out.pop("delta0")
        out["keypoints1"] = kpts1 + out.pop("delta1") + out["fine_offset1"]
        return out

    def _fine_matching(self, win0: Tensor, win1: Tensor) -> dict[str, Tensor]:
        """win0 (M, 64, C), win1 (M, 100, C) -> stage-1/2 outputs, and delta0/delta1 (M, 2) stage-1 pixel offsets."""
        m, _, channels = win0.shape
        s = self.conf["fine_slice_dim"]
        side = FINE_WINDOW + 2
        with torch.autocast(device_type=win0.device.type, enabled=False):
            win0, win1 = win0.float(), win1.float()
            sim_f = torch.einsum("mlc,mrc->mlr", win0[..., :-s] / channels ** 0.5, win1[..., :-s] / channels ** 0.5)
            sim_ff = torch.einsum("mlc,mrc->mlr", win0[..., -s:], win1[..., -s:] / s ** 0.5)
            conf_f = F.softmax(sim_f, 1) * F.softmax(sim_f, 2)  # (M, 64, 100)
            with torch.no_grad():
                inner = conf_f.reshape(m, FINE_WINDOW ** 2, side, side)[..., 1:-1, 1:-1].reshape(m, FINE_WINDOW ** 4)
                best = inner.argmax(1) if m else inner.new_zeros(0, dtype=torch.long)
                idx0, inner1 = best // FINE_WINDOW ** 2, best % FINE_WINDOW ** 2
                idx1 = (inner1 // FINE_WINDOW + 1) * side + inner1 % FINE_WINDOW + 1
            offset = subpixel_expectation(sim_ff, idx0, idx1, self.conf["fine_temperature"])

        def delta(index: Tensor) -> Tensor:  # window pixel -> offset (x, y) from the window centre
            return torch.stack([index % FINE_WINDOW, index // FINE_WINDOW], 1).float() - PIXEL_OFFSET

        return {"conf_matrix_fine": conf_f, "sim_matrix_ff": sim_ff, "fine_idx0": idx0, "fine_idx1": idx1,
                "fine_offset1": offset, "delta0": delta(idx0), "delta1": delta(inner1)}


@torch.no_grad()
def _mutual_mask(scores: Tensor, threshold: float, border: int, hc: int, wc: int) -> Tensor:
    """scores (B, L, L) -> bool (B, L, L): above threshold, off the border, mutual nearest neighbours."""
    batch = scores.shape[0]
    mask = scores > threshold
    if border > 0:
        grid = mask.view(batch, hc, wc, hc, wc)
        for axis in range(1, 5):
            grid.narrow(axis, 0, min(border, grid.shape[axis])).fill_(False)
            grid.narrow(axis, max(grid.shape[axis] - border, 0), min(border, grid.shape[axis])).fill_(False)
    mask &= scores == scores.max(2, keepdim=True).values
    mask &= scores == scores.max(1, keepdim=True).values
    return mask


def _mutual_matches(scores: Tensor, threshold: float, border: int, hc: int, wc: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """scores (B, L, L) -> b_ids, i_ids, j_ids (M,): above threshold, off the border, mutual nearest neighbours."""
    valid, j_all = _mutual_mask(scores, threshold, border, hc, wc).max(2)
    b_ids, i_ids = torch.where(valid)
    return b_ids, i_ids, j_all[b_ids, i_ids]


def _check_coarse_matches(matches: Any, batch: int, cells: int, device: torch.device
                          ) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(matches, (tuple, list)) or len(matches) != 3:
        raise ValueError("coarse_matches must be a tuple (b_ids, i_ids, j_ids)")
    ids = [torch.as_tensor(t, device=device) for t in matches]
    if any(t.ndim != 1 or t.shape != ids[0].shape or t.is_floating_point() for t in ids):
        shapes = [tuple(t.shape) for t in ids]
        raise ValueError(f"coarse_matches must be three (M,) integer tensors, got shapes {shapes}")
    ids = [t.long() for t in ids]
    for name, t, limit in zip(("b_ids", "i_ids", "j_ids"), ids, (batch, cells, cells)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
            raise ValueError(f"coarse_matches {name} must lie in [0, {limit})")
    return ids[0], ids[1], ids[2]


# ----------------------------------------------------------------------------------------------------- loading

_GROUPS = ("backbone.", "loftr_coarse.", "fine_preprocess.")


def state_dict_from_checkpoint(obj: dict) -> dict[str, Tensor]:
    """Model state dict from an official Lightning checkpoint ({"state_dict": {"matcher.<name>": ...}}), or a
    bare state dict with or without the ``matcher.`` prefix. Raises ValueError when it is not one."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(obj).__name__}")
    state = obj["state_dict"] if "state_dict" in obj else obj
    if not isinstance(state, Mapping) or not state:
        raise ValueError("checkpoint holds no state dict (empty, or 'state_dict' is not a dict)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint entries are not tensors: {not_tensors[:4]}")
    if any(str(k).startswith("matcher.") for k in state):
        state = {k[len("matcher."):]: v for k, v in state.items() if k.startswith("matcher.")}
    absent = [g.rstrip(".") for g in _GROUPS if not any(k.startswith(g) for k in state)]
    if absent:
        raise ValueError(f"not an Efficient LoFTR state dict: no {absent} keys (first keys: {list(state)[:4]})")
    return dict(state)


def _load_into(model: EfficientLoFTR, state: dict[str, Tensor], source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit Efficient LoFTR with conf {model.conf}: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source}: shape mismatch for {len(wrong)} tensors, e.g. {wrong[:3]}")
    model.load_state_dict(state)


def load_checkpoint(path: str | Path, conf: dict | None = None) -> EfficientLoFTR:
    """Build an :class:`EfficientLoFTR` (eval mode) from a checkpoint file.

    path: an official Lightning ``.ckpt``/``.pth`` (``torch.load(weights_only=True)``; "state_dict" with
        ``matcher.`` keys, or a bare state dict), or a ``.safetensors`` file with the same key names and an
        optional JSON ``conf`` entry in its metadata. Reparameterized (``rbr_reparam``) weights are accepted.
    conf: merged over the file's conf (which is merged over :data:`default_conf`).
    Raises FileNotFoundError when the file does not exist, ValueError when its content does not fit.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Efficient LoFTR checkpoint not found: {path}")
    file_conf: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {path} as safetensors: {error}") from error
        if "conf" in metadata:
            try:
                file_conf = json.loads(metadata["conf"])
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: metadata 'conf' is not JSON: {error}") from error
            if not isinstance(file_conf, dict):
                raise ValueError(f"{path}: metadata 'conf' must be a JSON object")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and weights_only errors have no common base class
            raise ValueError(f"cannot read {path} as a torch checkpoint: {error}") from error
    state = state_dict_from_checkpoint(state)
    model = EfficientLoFTR({**file_conf, **(conf or {})})
    if any(".rbr_reparam." in k for k in state):
        model.reparameterize()
    _load_into(model, state, str(path))
    return model.eval()
