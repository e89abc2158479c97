"""Choosing which keypoint candidates to keep: radius non-maximum suppression and spreading over a grid.

Both ORB single-scale backends (OpenCV on the host, torch on the device) call these functions, so their
keypoints are selected by one implementation. Everything is batched over a leading dimension ``B`` and
works with static shapes (masks instead of variable-length outputs), so the torch detector can run the
whole selection on the GPU without waiting for the host.

Candidates are passed in rank order: position 0 is the strongest. Ranking by position instead of by score
breaks exact score ties by input order and keeps the arithmetic exact (a rank is an integer, while Harris
responses of neighbouring corners can differ by less than float32 resolution).
"""

from __future__ import annotations

import threading
from functools import lru_cache

import torch

GRID_CELLS = (8, 6)  # columns x rows of the spreading grid for ORB single-scale


@lru_cache(maxsize=16)
def _disk_offsets(radius: int, row_length: int, device: torch.device) -> torch.Tensor:
    """(P,) flat offsets, in an image of rows of ``row_length``, of the open disk dx^2 + dy^2 < radius^2.

    Cached per device: copying a constant from the host in the hot path would synchronise the stream.
    """
    span = torch.arange(-radius + 1, radius)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    inside = dx * dx + dy * dy < radius * radius
    return (dy[inside] * row_length + dx[inside]).to(device)


# Disk lookups per step. On the CPU, steps stay below torch's parallel grain size (32768 elements) and run on the
# calling thread: for a few thousand candidates, waking worker threads costs more than the lookups, by
# milliseconds when the cores are busy. On the GPU one step does them all (bounded for large radii).
_LOOKUPS_PER_STEP = {"cpu": 1 << 15}
_LOOKUPS_PER_STEP_DEFAULT = 1 << 22
_zeroed_buffers = threading.local()


def _zeroed_rank_image(batch: int, pixels: int, device: torch.device) -> torch.Tensor:
    """(batch, pixels) float32 zeros. On the CPU a per-thread buffer is reused (callers clear what they
    wrote), since filling a whole image with zeros is a parallel region, as costly as the lookups (above)."""
    if device.type != "cpu":
        return torch.zeros(batch, pixels, device=device, dtype=torch.float32)
    key = (batch, pixels)
    buffers = getattr(_zeroed_buffers, "images", None)
    if buffers is None:
        buffers = _zeroed_buffers.images = {}
    if key not in buffers:
        buffers.clear()  # one image size at a time: a stream of frames of one camera
        buffers[key] = torch.zeros(batch, pixels, dtype=torch.float32)
    return buffers[key]


def suppress_non_maxima(xy: torch.Tensor, valid: torch.Tensor, radius: int, size: tuple[int, int]) -> torch.Tensor:
    """Which candidates are the strongest within ``radius`` pixels of themselves.

    xy: (B, K, 2) float pixels (x right, y down), candidates sorted strongest first along K; valid: (B, K)
    bool, False for padding. Returns (B, K) bool: valid and the highest-ranked candidate of the open disk
    of ``radius`` around its pixel (a max-filter over a rank image, as SuperPoint-style NMS), so survivors
    at integer pixels are at least ``radius`` apart. Of several candidates on one pixel only the first can
    survive. A candidate's pixel is floor(xy + 0.5), clamped to the image. ``radius`` <= 0 keeps every
    valid one.

    The ranks are written into an image and each candidate reads the disk around itself: K * disk-area
    lookups, far fewer than dilating the whole image when candidates are sparse (thousands in a VGA image).
    """
    if radius <= 0:
        return valid.clone()
    batch, count = valid.shape
    width, height = size
    padded_width = width + 2 * radius  # a margin of ``radius`` keeps every disk lookup inside the image
    # floor(x + 0.5) as a clamp and a truncation: torch's CPU round() is another parallel region (see above).
    nearest = (xy + 0.5).clamp(min=0).long()
    cols = nearest[..., 0].clamp(max=width - 1) + radius
    rows = nearest[..., 1].clamp(max=height - 1) + radius
    pixel = rows * padded_width + cols
    # Ranks count down from K to 1 (0 = no candidate); float32 holds them exactly up to 2^24.
    rank = torch.arange(count, 0, -1, device=xy.device, dtype=torch.float32).expand(batch, count)
    rank = torch.where(valid, rank, torch.zeros_like(rank))
    rank_image = _zeroed_rank_image(batch, (height + 2 * radius) * padded_width, xy.device)
    offsets = _disk_offsets(radius, padded_width, xy.device)
    strongest_near = torch.zeros_like(rank)
    lookups = _LOOKUPS_PER_STEP.get(xy.device.type, _LOOKUPS_PER_STEP_DEFAULT)
    step = max(1, lookups // max(batch * count, 1))
    try:
        rank_image.scatter_reduce_(1, pixel, rank, reduce="amax")
        for start in range(0, len(offsets), step):
            lookup = (pixel[..., None] + offsets[start:start + step]).view(batch, -1)
            nearby = rank_image.gather(1, lookup).view(batch, count, -1).amax(dim=2)
            strongest_near = torch.maximum(strongest_near, nearby)
    finally:
        if xy.device.type == "cpu":
            rank_image.scatter_(1, pixel, 0.0)  # back to zeros for the next call
    return valid & (rank >= strongest_near)


def spread_over_grid(xy: torch.Tensor, valid: torch.Tensor, size: tuple[int, int], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``count`` candidates spread over a grid: every cell's best first, then every cell's second, ...

    This keeps strong keypoints while preventing one textured region from taking the whole budget.
    xy: (B, K, 2) float pixels, candidates sorted strongest first along K; valid: (B, K) bool.
    Returns (indices, picked), both (B, min(count, K)): indices into K, picked True where the index is a
    valid candidate; the picked ones come first, strongest first. When at most ``count`` candidates are
    valid, all of them are picked.
    """
    batch, total = valid.shape
    count = min(count, total)
    cols, rows = GRID_CELLS
    width, height = size
    cell = ((xy[..., 1] * rows / height).long().clamp(0, rows - 1) * cols
            + (xy[..., 0] * cols / width).long().clamp(0, cols - 1))
    cell = torch.where(valid, cell, torch.full_like(cell, cols * rows))  # padding in a cell of its own
    position = torch.arange(total, device=xy.device).expand(batch, total)
    by_cell = torch.argsort(cell * total + position, dim=1)  # by cell, strongest first within a cell
    sorted_cells = cell.gather(1, by_cell)
    # Index of the first entry of each cell by a running maximum (searchsorted is a parallel region on the CPU).
    starts_cell = torch.ones_like(valid)
    starts_cell[:, 1:] = sorted_cells[:, 1:] != sorted_cells[:, :-1]
    first_of_cell = torch.where(starts_cell, position, torch.zeros_like(position)).cummax(dim=1).values
    rank_in_cell = position - first_of_cell
    rank_in_cell = torch.empty_like(rank_in_cell).scatter_(1, by_cell, rank_in_cell)
    # Round-robin over the cells, strongest first within a round; padding after every valid candidate.
    key = torch.where(valid, rank_in_cell * total + position, total * total + position)
    chosen = torch.topk(key, count, dim=1, largest=False, sorted=True).indices
    picked = valid.gather(1, chosen)
    order = torch.argsort(torch.where(picked, chosen, chosen + total), dim=1)
    chosen = chosen.gather(1, order)
    return chosen, picked.gather(1, order)
