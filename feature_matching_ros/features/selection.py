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


_MAX_GATHERED = 1 << 22  # disk lookups per chunk: bounds memory for large radii and candidate counts


def suppress_non_maxima(xy: torch.Tensor, valid: torch.Tensor, radius: int, size: tuple[int, int]) -> torch.Tensor:
    """Which candidates are the strongest within ``radius`` pixels of themselves.

    xy: (B, K, 2) float pixels (x right, y down), candidates sorted strongest first along K; valid: (B, K)
    bool, False for padding. Returns (B, K) bool: valid and the highest-ranked candidate of the open disk
    of ``radius`` around its pixel (a max-filter over a rank image, as SuperPoint-style NMS), so survivors
    at integer pixels are at least ``radius`` apart. Of several candidates on one pixel only the first can
    survive. Candidates outside the image are clamped to its edge. ``radius`` <= 0 keeps every valid one.

    The ranks are written into an image and each candidate reads the disk around itself: K * disk-area
    lookups, far fewer than dilating the whole image when candidates are sparse (thousands in a VGA image).
    """
    if radius <= 0:
        return valid.clone()
    batch, count = valid.shape
    width, height = size
    padded_width = width + 2 * radius  # a margin of ``radius`` keeps every disk lookup inside the image
    cols = xy[..., 0].round().long().clamp(0, width - 1) + radius
    rows = xy[..., 1].round().long().clamp(0, height - 1) + radius
    pixel = rows * padded_width + cols
    # Ranks count down from K to 1 (0 = no candidate); float32 holds them exactly up to 2^24.
    rank = torch.arange(count, 0, -1, device=xy.device, dtype=torch.float32).expand(batch, count)
    rank = torch.where(valid, rank, torch.zeros_like(rank))
    rank_image = torch.zeros(batch, (height + 2 * radius) * padded_width, device=xy.device, dtype=torch.float32)
    rank_image.scatter_reduce_(1, pixel, rank, reduce="amax")
    offsets = _disk_offsets(radius, padded_width, xy.device)
    strongest_near = torch.zeros_like(rank)
    chunk = max(1, _MAX_GATHERED // max(batch * count, 1))
    for start in range(0, len(offsets), chunk):
        lookup = (pixel[..., None] + offsets[start:start + chunk]).view(batch, -1)
        nearby = rank_image.gather(1, lookup).view(batch, count, -1).amax(dim=2)
        strongest_near = torch.maximum(strongest_near, nearby)
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
    rank_in_cell = position - torch.searchsorted(sorted_cells, sorted_cells, side="left")
    rank_in_cell = torch.empty_like(rank_in_cell).scatter_(1, by_cell, rank_in_cell)
    # Round-robin over the cells, strongest first within a round; padding after every valid candidate.
    key = torch.where(valid, rank_in_cell * total + position, total * total + position)
    chosen = torch.topk(key, count, dim=1, largest=False, sorted=True).indices
    picked = valid.gather(1, chosen)
    order = torch.argsort(torch.where(picked, chosen, chosen + total), dim=1)
    chosen = chosen.gather(1, order)
    return chosen, picked.gather(1, order)
