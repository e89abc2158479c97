"""SANDESC: a streamlined attention-based U-Net that extracts dense descriptors for any detector's keypoints.

"A Streamlined Attention-Based Network for Descriptor Extraction" (SANDESC). Written here because no
library ships it: not kornia, not cvg (LightGlue / glue-factory), not PyPI, and no official code or
weights were available to us. What the paper fixes and we follow: a U-Net of Residual U-Net Blocks with
Attention, 2.4 M parameters, 5x5 stem, 4 down + 4 up blocks (average-pool down, bilinear up, a 1x1
convolution aligning the shortcut, a residual path of 5x5 convolutions, CBAM attention: channel MLP with
reduction 16 then a 7x7 spatial attention), GELU + BatchNorm, dense 128-d L2-normalised output, trained
per detector on that detector's keypoints (``feature_matching_ros/training/sandesc.py``).

Our choices where the paper leaves room (documented so the weights can be reproduced):
- Widths: encoder 16-32-64-96-128 (stem at stride 1, then strides 2, 4, 8, 16), decoder 80-64-32-16
  (strides 8, 4, 2, 1), head 1x1 -> 128: 2,424,832 parameters (+1.0 % of the paper's 2.4 M). Cheap
  full-resolution levels (16 channels) keep the cost at ~35 GMAC per 640x480 image; the parameters sit
  in the coarse levels where they cost little.
- Grayscale input: the package serves SLAM cameras that are often mono8, ORB works on gray, and a
  descriptor that never sees colour cannot depend on white balance. RGB input is accepted and converted
  with ITU-R 601 luma (the weights of OpenCV's RGB2GRAY). Each image is standardised (zero mean, unit
  std) first, so exposure and contrast changes do not reach the network.
- Full-resolution output (stride 1): keypoints are sampled bilinearly without a stride conversion.
  Any H, W: the input is padded (replicate) to a multiple of 16 and the output cropped back.

    model = SANDesc().eval()
    dense = model(image)                     # (B, 1 or 3, H, W) in [0, 1] -> (B, 128, H, W) unit vectors
    descriptors = SANDesc.sample(dense, xy)  # xy (B, N, 2) pixels -> (B, N, 128) unit vectors

Weights: fp16 safetensors whose metadata holds the configuration (:func:`save_sandesc`, :func:`load_sandesc`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "sandesc"
FORMAT_VERSION = 1
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as cv2.COLOR_RGB2GRAY


class ConvBN(nn.Sequential):
    """k x k convolution (no bias) + BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate then spatial gate (Woo et al. 2018).

    Channel: a shared MLP (C -> C / reduction -> C) over the average- and max-pooled features, summed,
    sigmoid. Spatial: a k x k convolution over the channel-wise mean and max maps, sigmoid.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.GELU(),
                                 nn.Conv2d(hidden, channels, 1, bias=False))
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        gate = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(gate)
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(pooled))


class ResidualAttentionBlock(nn.Module):
    """Residual U-Net Block with Attention: GELU(align(x) + CBAM(conv-BN-GELU-conv-BN(x)))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, reduction: int = 16,
                 spatial_kernel: int = 7) -> None:
        super().__init__()
        self.align = nn.Conv2d(in_channels, out_channels, 1)
        self.residual = nn.Sequential(ConvBN(in_channels, out_channels, kernel_size), nn.GELU(),
                                      ConvBN(out_channels, out_channels, kernel_size))
        self.attention = CBAM(out_channels, reduction, spatial_kernel)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H, W)."""
        return self.activation(self.align(x) + self.attention(self.residual(x)))


class DownBlock(nn.Module):
    """2x2 average pooling, then a residual attention block."""

    def __init__(self, in_channels: int, out_channels: int, **block) -> None:
        super().__init__()
        self.block = ResidualAttentionBlock(in_channels, out_channels, **block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H / 2, W / 2)."""
        return self.block(F.avg_pool2d(x, 2))


class UpBlock(nn.Module):
    """Bilinear 2x upsampling, concatenation with the encoder skip, then a residual attention block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, **block) -> None:
        super().__init__()
        self.block = ResidualAttentionBlock(in_channels + skip_channels, out_channels, **block)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H / 2, W / 2), skip (B, C_skip, H, W) -> (B, C_out, H, W)."""
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], 1))


class SANDesc(nn.Module):
    """Dense descriptor U-Net; see the module docstring for the architecture and the choices made."""

    default_conf = {
        "in_channels": 1,  # 1: grayscale network (RGB input is converted); 3: RGB network
        "descriptor_dim": 128,
        "encoder_widths": [16, 32, 64, 96, 128],  # stem (stride 1), then after each of the 4 down blocks
        "decoder_widths": [80, 64, 32, 16],  # after each of the 4 up blocks (strides 8, 4, 2, 1)
        "kernel_size": 5,
        "reduction": 16,  # CBAM channel MLP
        "spatial_kernel": 7,  # CBAM spatial attention
    }
    stride = 1  # the dense map has the input's resolution
    pad_multiple = 16  # four 2x poolings

    def __init__(self, **conf) -> None:
        super().__init__()
        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(f"unknown SANDesc options {sorted(unknown)}; known: {sorted(self.default_conf)}")
        self.conf = {**self.default_conf, **conf}
        c = self.conf
        enc, dec = list(c["encoder_widths"]), list(c["decoder_widths"])
        if len(enc) != 5 or len(dec) != 4:
            raise ValueError("SANDesc needs 5 encoder widths (stem + 4 down) and 4 decoder widths (4 up)")
        block = {"kernel_size": c["kernel_size"], "reduction": c["reduction"], "spatial_kernel": c["spatial_kernel"]}
        self.stem = nn.Sequential(ConvBN(c["in_channels"], enc[0], c["kernel_size"]), nn.GELU())
        self.down = nn.ModuleList(DownBlock(enc[i], enc[i + 1], **block) for i in range(4))
        ins = [enc[4]] + dec[:3]
        self.up = nn.ModuleList(UpBlock(ins[i], enc[3 - i], dec[i], **block) for i in range(4))
        self.head = nn.Conv2d(dec[3], c["descriptor_dim"], 1)

    @property
    def descriptor_dim(self) -> int:
        return int(self.conf["descriptor_dim"])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _input(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [0, 1] -> (B, in_channels, H, W) standardised per image and channel."""
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"SANDesc expects (B, 1, H, W) or (B, 3, H, W) images, got {tuple(image.shape)}")
        image = image.float()
        if self.conf["in_channels"] == 1 and image.shape[1] == 3:
            luma = torch.tensor(LUMA, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
            image = (image * luma).sum(1, keepdim=True)
        elif self.conf["in_channels"] == 3 and image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        mean = image.mean((2, 3), keepdim=True)
        std = image.std((2, 3), keepdim=True).clamp_min(1e-2)  # a flat image stays finite
        return (image - mean) / std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Dense descriptors of (B, 1 or 3, H, W) images in [0, 1], any H, W -> (B, D, H, W) unit vectors."""
        x = self._input(image)
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.pad_multiple, (-width) % self.pad_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = self.stem(x)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        for up in self.up:
            x = up(x, skips.pop())
        x = self.head(x)[..., :height, :width]
        return F.normalize(x.float(), dim=1)

    @staticmethod
    def sample(dense: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        """Bilinear sampling at pixel keypoints, re-normalised.

        dense (B, D, H, W) from :meth:`forward`; keypoints (B, N, 2) pixels (x right, y down, (0, 0) the
        centre of the top-left pixel) -> (B, N, D) unit vectors. Points outside clamp to the border.
        """
        height, width = dense.shape[-2:]
        scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], device=keypoints.device)
        grid = (keypoints.float() * scale - 1.0)[:, None]  # (B, 1, N, 2), align_corners=True
        sampled = F.grid_sample(dense.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
        return F.normalize(sampled[:, :, 0].transpose(1, 2), dim=-1)

    def describe(self, image: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        """image (B, 1 or 3, H, W), keypoints (B, N, 2) pixels -> (B, N, D) unit vectors."""
        return self.sample(self(image), keypoints)


def save_sandesc(model: SANDesc, path: Path | str, metadata: dict | None = None) -> Path:
    """Write fp16 safetensors; the metadata holds the configuration (JSON) and ``metadata`` (JSON values)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(model.conf),
            "num_parameters": str(model.num_parameters())}
    meta |= {k: json.dumps(v) for k, v in (metadata or {}).items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_sandesc(path: Path | str, device: torch.device | str = "cpu") -> tuple[SANDesc, dict]:
    """Model (eval mode, fp32, on ``device``) and metadata (JSON-decoded) from :func:`save_sandesc` output.

    Raises :class:`feature_matching_ros.weights.WeightsError` when the file is missing, unreadable or not SANDESC.
    """
    from safetensors import safe_open

    from feature_matching_ros.weights import WeightsError

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"SANDESC weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise WeightsError(f"cannot read SANDESC weights {path}: {exc}") from exc
    if raw.get("format") != FORMAT or "config" not in raw:
        raise WeightsError(f"{path} is not a SANDESC weights file (metadata format={raw.get('format')!r})")
    metadata = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    model = SANDesc(**metadata["config"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"{path}: weights do not fit SANDesc (missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]})")
    return model.eval().to(device), metadata
