"""Efficient LoFTR training from scratch on our synthetic pairs (the paper's losses; our loop).

No official weights are reachable offline, so this trains ``models.efficient_loftr`` from random init on
``fmr make-pairs`` folders (real-photo homographies + rendered scenes with exact depth and pose), or MegaDepth
if you have it. Written here because the official trainer needs its Lightning stack and MegaDepth indices.

Supervision (as in the paper, ground truth from the exact geometry of each pair):
- coarse: the 1/8 grid of each image is warped into the other (homography, or depth + pose with an
  occlusion check); cell pair (i, j) is positive when i lands in j and j lands back in i. Focal loss
  (alpha 0.25, gamma 2) on the dual-softmax confidence of the positives;
- fine stage 1: the fine stage runs on ground-truth coarse pairs (at most ``fine_per_pair`` per pair); each
  pixel of the 8x8 window of image 0 is warped into the 10x10 window of image 1, the nearest pixel there is
  its positive; focal loss on the stage-1 dual-softmax of the positives;
- fine stage 2: the stage-1 argmax pixel of image 0 is warped into image 1; its residual to the chosen pixel
  of image 1 (when within the 3x3 neighbourhood) is the target of the sub-pixel offset, L2, weight 0.25.
AdamW (paper: lr 2.5e-3 for batch 20 with weight decay 0.1; scaled linearly to our batch), linear warmup then
cosine decay, bf16 autocast on CUDA, gradient clipping, checkpoints every N steps and ``--resume``.
Validation on eval folders: match precision at 3 px (warped keypoints0 vs keypoints1), matches per pair,
coarse recall of ground-truth cells.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from feature_matching_ros.training.base import Trainer
from feature_matching_ros.training.data import pair_sources
from feature_matching_ros.training.labels import _project_homography, sample_depth

LOG = logging.getLogger(__name__)
STRIDE = 8  # coarse cell size in pixels
WINDOW0, WINDOW1 = 8, 10  # fine windows (pixels) of image 0 and image 1
# Top-left pixel of a fine window relative to its coarse cell's top-left pixel (8x, 8y): image 0's window is the
# cell, image 1's has a one-pixel ring (models.efficient_loftr._windows). All geometry here is in pixel indices
# (pixel centres at integers); the model's keypoints are pixel indices - PIXEL_OFFSET (its docstring).
WINDOW0_OFFSET, WINDOW1_OFFSET = 0, -1


@dataclass
class TrainConfig:
    train: list[str] = field(default_factory=list)  # make-pairs folders
    eval: list[str] = field(default_factory=list)
    megadepth_root: str | None = None
    megadepth_scenes: list[str] = field(default_factory=list)
    out: str = "runs/eloftr"
    batch_size: int = 8
    steps: int = 3000
    lr: float = 1e-3  # paper: 2.5e-3 at batch 20 (with 8 GPUs)
    weight_decay: float = 0.1
    warmup_steps: int = 200
    final_lr_factor: float = 0.05
    grad_clip: float = 1.0
    fine_per_pair: int = 256  # ground-truth coarse pairs refined per image pair (fine supervision)
    coarse_weight: float = 1.0
    fine_weight: float = 1.0
    subpixel_weight: float = 0.25
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    depth_tolerance: float = 0.1  # relative depth agreement for a warped pixel to count as visible
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    checkpoint_every: int = 500
    max_minutes: float = 0.0
    deadline: float = 0.0  # unix time by which training stops (time-boxed runs); 0 = none
    stop_at: float = 0.0  # unix time at which this session stops with a checkpoint; the schedule is unchanged
    log_every: int = 25
    max_pairs: int = 0  # use at most this many training pairs (0 = all; smoke tests)
    # Every pair is fitted to this size (scaled to cover, centre-cropped; multiples of 32): batches stack whole
    # images, and real photos come in many sizes and orientations.
    image_size: tuple[int, int] = (640, 480)
    export: str | None = None  # fp16 safetensors shards of the final model here


# ----------------------------------------------------------------------------------------------- geometry
@dataclass
class PairGeometry:
    """Exact geometry of one pair on the training device: a homography, or depth maps + K + T_1_0."""

    H_1_0: torch.Tensor | None = None
    depth0: torch.Tensor | None = None
    depth1: torch.Tensor | None = None
    K0: torch.Tensor | None = None
    K1: torch.Tensor | None = None
    T_1_0: torch.Tensor | None = None

    def warp(self, points: torch.Tensor, forward: bool, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) pixels of image 0 (forward) or image 1 -> pixels in the other image and a visibility mask."""
        points = points.double()
        if self.H_1_0 is not None:
            H = self.H_1_0 if forward else torch.linalg.inv(self.H_1_0)
            warped = _project_homography(H, points)
            return warped, torch.isfinite(warped).all(1)
        depth_a, depth_b = (self.depth0, self.depth1) if forward else (self.depth1, self.depth0)
        K_a, K_b = (self.K0, self.K1) if forward else (self.K1, self.K0)
        T = self.T_1_0 if forward else torch.linalg.inv(self.T_1_0)
        z = sample_depth(depth_a, points)
        rays = torch.cat([points, torch.ones_like(points[:, :1])], 1) @ torch.linalg.inv(K_a).T
        X = (rays * z[:, None]) @ T[:3, :3].T + T[:3, 3]
        uv = (X @ K_b.T)[:, :2] / X[:, 2:].clamp_min(1e-6)
        z_b = sample_depth(depth_b, uv)
        visible = (torch.isfinite(z) & (X[:, 2] > 1e-6) & torch.isfinite(z_b)
                   & ((z_b - X[:, 2]).abs() < tolerance * X[:, 2]))
        return uv, visible


def _geometry(pair: dict, device: torch.device) -> PairGeometry:
    f64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64, device=device)  # noqa: E731
    if "H_1_0" in pair:
        return PairGeometry(H_1_0=f64(pair["H_1_0"]))
    return PairGeometry(depth0=f64(np.nan_to_num(pair["depth0"], nan=0.0)),
                        depth1=f64(np.nan_to_num(pair["depth1"], nan=0.0)),
                        K0=f64(pair["K0"]), K1=f64(pair["K1"]), T_1_0=f64(pair["T_1_0"]))


def _gray(image: np.ndarray) -> np.ndarray:
    import cv2

    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def coarse_ground_truth(geometry: PairGeometry, hw: tuple[int, int], tolerance: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive coarse cell pairs (i, j) (flat indices into the (Hc, Wc) grids of both images): the centre of
    cell i warps into cell j and the centre of cell j warps back into cell i (pixel-index coordinates)."""
    hc, wc = hw[0] // STRIDE, hw[1] // STRIDE
    device = geometry.H_1_0.device if geometry.H_1_0 is not None else geometry.depth0.device
    ys, xs = torch.meshgrid(torch.arange(hc, device=device), torch.arange(wc, device=device), indexing="ij")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).double() * STRIDE + (STRIDE - 1) / 2

    def nearest_cell(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        cell = torch.floor((points.nan_to_num(nan=-1e9, posinf=1e9, neginf=-1e9) + 0.5) / STRIDE)
        inside = valid & (cell[:, 0] >= 0) & (cell[:, 0] < wc) & (cell[:, 1] >= 0) & (cell[:, 1] < hc)
        index = (cell[:, 1] * wc + cell[:, 0]).long()
        return torch.where(inside, index, torch.full_like(index, -1))

    j_of_i = nearest_cell(*geometry.warp(grid, True, tolerance))
    i_of_j = nearest_cell(*geometry.warp(grid, False, tolerance))
    i = torch.nonzero(j_of_i >= 0)[:, 0]
    j = j_of_i[i]
    consistent = i_of_j[j] == i
    return i[consistent], j[consistent]


def _cell_pixels(index: torch.Tensor, wc: int) -> torch.Tensor:
    """Flat coarse indices (M,) -> pixel (x, y) of the cell (M, 2)."""
    return torch.stack([index % wc, index // wc], 1).double() * STRIDE


def fine_ground_truth(geometry: PairGeometry, i_ids: torch.Tensor, j_ids: torch.Tensor, wc: int, tolerance: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 targets for coarse pairs (M,): target (M, 64) = index into image 1's 10x10 window of the pixel
    where each pixel of image 0's 8x8 window lands (-1 outside the window or not visible), and the warped
    positions (M, 64, 2) in image-1 pixels."""
    m = len(i_ids)
    r, c = torch.meshgrid(torch.arange(WINDOW0, device=i_ids.device), torch.arange(WINDOW0, device=i_ids.device),
                          indexing="ij")
    local0 = torch.stack([c.reshape(-1), r.reshape(-1)], 1).double()  # (64, 2) x, y
    pixels0 = _cell_pixels(i_ids, wc)[:, None] + WINDOW0_OFFSET + local0[None]  # (M, 64, 2)
    warped, visible = geometry.warp(pixels0.reshape(-1, 2), True, tolerance)
    warped, visible = warped.reshape(m, -1, 2), visible.reshape(m, -1)
    local1 = torch.round(warped - (_cell_pixels(j_ids, wc)[:, None] + WINDOW1_OFFSET))
    inside = visible & (local1 >= 0).all(-1) & (local1 < WINDOW1).all(-1)
    target = torch.where(inside, (local1[..., 1] * WINDOW1 + local1[..., 0]).long(),
                         torch.full_like(inside, -1, dtype=torch.long))
    return target, warped


def focal_loss_positive(probability: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Focal loss of positive entries: -alpha (1 - p)^gamma log p (mean; 0 for none)."""
    if probability.numel() == 0:
        return probability.new_zeros(())
    p = probability.float().clamp(1e-6, 1 - 1e-6)
    return (-alpha * (1 - p) ** gamma * p.log()).mean()


# ----------------------------------------------------------------------------------------------- data
class PairTensors:
    """All pairs as gray uint8 tensors on the training device, with their geometry (no per-step loading).
    Pairs of another size than ``size`` (W, H) are fitted to it (``real_pairs.fit_pair_to_size``)."""

    def __init__(self, sources: list, device: torch.device, max_pairs: int = 0,
                 size: tuple[int, int] = (640, 480)) -> None:
        from feature_matching_ros.training.real_pairs import fit_pair_to_size

        width, height = size
        if width % 32 or height % 32 or width < 64 or height < 64:
            raise ValueError(f"image size {width}x{height}: both sides must be multiples of 32 (at least 64)")
        fitted = 0
        self.images0: list[torch.Tensor] = []
        self.images1: list[torch.Tensor] = []
        self.geometry: list[PairGeometry] = []
        self.kinds: list[str] = []
        for source in sources:
            for index in range(len(source)):
                if max_pairs and len(self.kinds) >= max_pairs:
                    break
                pair = source.load(index)
                if pair is None:
                    continue
                if any(pair[k].shape[:2] != (height, width) for k in ("image0", "image1")):
                    pair = fit_pair_to_size(pair, width, height)
                    fitted += 1
                image0, image1 = _gray(pair["image0"]), _gray(pair["image1"])
                self.images0.append(torch.from_numpy(np.ascontiguousarray(image0)).to(device))
                self.images1.append(torch.from_numpy(np.ascontiguousarray(image1)).to(device))
                self.geometry.append(_geometry(pair, device))
                self.kinds.append(pair.get("kind", "megadepth"))
        if fitted:
            LOG.info("%d of %d pairs fitted to %dx%d", fitted, len(self.kinds), width, height)

    def __len__(self) -> int:
        return len(self.kinds)

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor, list[PairGeometry]]:
        image0 = torch.stack([self.images0[i] for i in index])[:, None].float() / 255.0
        image1 = torch.stack([self.images1[i] for i in index])[:, None].float() / 255.0
        return image0, image1, [self.geometry[i] for i in index]


# ----------------------------------------------------------------------------------------------- trainer
def lr_at(step: int, progress: float, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * final_lr_factor`` at progress 1."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.final_lr_factor + (1 - config.final_lr_factor) * cosine)


class EfficientLoftrTrainer(Trainer):
    def __init__(self, config: TrainConfig) -> None:
        from feature_matching_ros.models.efficient_loftr import EfficientLoFTR

        super().__init__(config)
        self.model = EfficientLoFTR().to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def load_data(self) -> None:
        start = time.perf_counter()
        size = tuple(self.config.image_size)
        self.train_data = PairTensors(pair_sources(self.config.train, self.config.megadepth_root,
                                                   self.config.megadepth_scenes), self.device, self.config.max_pairs, size)
        self.eval_data = (PairTensors(pair_sources(self.config.eval), self.device, 0, size)
                          if self.config.eval else None)
        if not len(self.train_data):
            raise ValueError("no training pairs: give --train folders (fmr make-pairs) or --megadepth-*")
        print(f"data: {len(self.train_data)} train pairs, {len(self.eval_data) if self.eval_data else 0} eval pairs, "
              f"{time.perf_counter() - start:.0f} s", flush=True)

    # -- loss -----------------------------------------------------------------------------------------------
    def _coarse_targets(self, geometry: list[PairGeometry], hw: tuple[int, int], generator: torch.Generator
                        ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, ...]]:
        per_pair, picks = [], []
        for b, geo in enumerate(geometry):
            i, j = coarse_ground_truth(geo, hw, self.config.depth_tolerance)
            per_pair.append((i, j))
            if len(i) > self.config.fine_per_pair:
                keep = torch.randperm(len(i), generator=generator, device="cpu")[:self.config.fine_per_pair]
                keep = keep.to(i.device)
                i, j = i[keep], j[keep]
            picks.append((torch.full_like(i, b), i, j))
        fine = tuple(torch.cat([p[k] for p in picks]) for k in range(3))
        return per_pair, fine

    def losses(self, image0: torch.Tensor, image1: torch.Tensor, geometry: list[PairGeometry],
               generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        hw = tuple(image0.shape[-2:])
        wc = hw[1] // STRIDE
        per_pair, (b_ids, i_ids, j_ids) = self._coarse_targets(geometry, hw, generator)
        with self._autocast():
            out = self.model(image0, image1, coarse_matches=(b_ids, i_ids, j_ids))
        conf = out["conf_matrix"]
        positives = torch.cat([conf[b, i, j] for b, (i, j) in enumerate(per_pair)])
        loss_coarse = focal_loss_positive(positives, config.focal_alpha, config.focal_gamma)

        targets, warped = [], []
        for b, geo in enumerate(geometry):
            pick = b_ids == b
            target, warp = fine_ground_truth(geo, i_ids[pick], j_ids[pick], wc, config.depth_tolerance)
            targets.append(target)
            warped.append(warp)
        target = torch.cat(targets) if targets else torch.zeros(0, WINDOW0 ** 2, dtype=torch.long)
        warped = torch.cat(warped) if warped else torch.zeros(0, WINDOW0 ** 2, 2)
        conf_fine = out["conf_matrix_fine"]  # (M, 64, 100)
        rows, cols = torch.nonzero(target >= 0, as_tuple=True)
        loss_fine = focal_loss_positive(conf_fine[rows, cols, target[rows, cols]], config.focal_alpha,
                                        config.focal_gamma)

        # Stage 2: residual of the warped stage-1 pixel of image 0 to the chosen pixel of image 1.
        m = torch.arange(len(i_ids), device=i_ids.device)
        idx0, idx1 = out["fine_idx0"].long(), out["fine_idx1"].long()
        pixel1 = (_cell_pixels(j_ids, wc) + WINDOW1_OFFSET
                  + torch.stack([idx1 % WINDOW1, idx1 // WINDOW1], 1).double())
        residual = warped[m, idx0] - pixel1  # (M, 2)
        valid = (target[m, idx0] >= 0) & (residual.abs() <= 1.0).all(1)
        offset = out["fine_offset1"].float()
        loss_subpixel = (((offset[valid] - residual[valid].float()) ** 2).sum(1).mean() if valid.any()
                         else offset.sum() * 0.0)
        loss = (config.coarse_weight * loss_coarse + config.fine_weight * loss_fine
                + config.subpixel_weight * loss_subpixel)
        logs = {"loss": float(loss.detach()), "coarse": float(loss_coarse.detach()),
                "fine": float(loss_fine.detach()), "subpixel": float(loss_subpixel.detach()), "positives": float(len(positives) / len(geometry)),
                "fine_valid": float(valid.float().mean()) if len(valid) else 0.0}
        return loss, logs

    def train_step(self, image0, image1, geometry, generator) -> dict[str, float]:
        self.model.train()
        lr = lr_at(self.step, self.progress(), self.config)
        loss, logs = self.losses(image0, image1, geometry, generator)
        self.optimise(loss, lr, logs)
        return logs | {"lr": lr}

    @torch.no_grad()
    def validate(self, max_pairs: int = 64) -> dict:
        from feature_matching_ros.models.efficient_loftr import PIXEL_OFFSET

        """Inference-mode matches on eval pairs: precision at 3 px and 1 px, matches per pair, coarse recall."""
        if not self.eval_data:
            return {}
        self.model.eval()
        correct3 = correct1 = total = recalled = gt_cells = 0
        count = min(len(self.eval_data), max_pairs)
        for first in range(0, count, 4):
            index = list(range(first, min(first + 4, count)))
            image0, image1, geometry = self.eval_data.batch(index)
            with self._autocast():
                out = self.model(image0, image1)
            hw = tuple(image0.shape[-2:])
            for b, geo in enumerate(geometry):
                pick = out["batch_indexes"] == b
                k0 = out["keypoints0"][pick].double() + PIXEL_OFFSET
                k1 = out["keypoints1"][pick].double() + PIXEL_OFFSET
                warped, visible = geo.warp(k0, True, self.config.depth_tolerance)
                error = torch.where(visible, (warped - k1).norm(dim=1), torch.full_like(k0[:, 0], 1e9))
                correct3 += int((error < 3).sum())
                correct1 += int((error < 1).sum())
                total += int(pick.sum())
                i, j = coarse_ground_truth(geo, hw, self.config.depth_tolerance)
                gt_cells += len(i)
                predicted = set(zip(out["i_ids"][out["b_ids"] == b].tolist(), out["j_ids"][out["b_ids"] == b].tolist()))
                recalled += sum((a, c) in predicted for a, c in zip(i.tolist(), j.tolist()))
        report = {"step": self.step, "pairs": count, "precision_3px": round(correct3 / max(total, 1), 4),
                  "precision_1px": round(correct1 / max(total, 1), 4), "matches_per_pair": round(total / count, 1),
                  "coarse_recall": round(recalled / max(gt_cells, 1), 4)}
        self.validation.append(report)
        (self.out / "validation.json").write_text(json.dumps(self.validation, indent=1) + "\n")
        print(f"validation step {self.step}: P@3px {report['precision_3px']:.3f} P@1px {report['precision_1px']:.3f} "
              f"{report['matches_per_pair']:.0f} matches/pair, coarse recall {report['coarse_recall']:.3f}", flush=True)
        return report

    def fit(self) -> None:
        config = self.config
        start = self.start_budget()
        generator = torch.Generator()
        window: list[dict] = []
        steps_per_epoch = max(1, len(self.train_data) // config.batch_size)
        while self.step < config.steps:
            # Batch order and fine-stage sampling are functions of (seed, epoch, step): a resumed run sees the same
            # batches as one that never stopped.
            epoch, done = divmod(self.step, steps_per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(len(self.train_data))
            for first in range(done * config.batch_size, steps_per_epoch * config.batch_size, config.batch_size):
                if self.step >= config.steps:
                    break
                generator.manual_seed(config.seed * 7919 + self.step)
                self.elapsed_s = time.perf_counter() - start
                image0, image1, geometry = self.train_data.batch(order[first:first + config.batch_size])
                window.append(self.train_step(image0, image1, geometry, generator))
                if self.step % config.log_every == 0 or self.step == config.steps:
                    mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    entry = {"step": self.step, **{k: round(v, 5) for k, v in mean.items()},
                             "elapsed_s": round(time.perf_counter() - start, 1)}
                    self.history.append(entry)
                    print(f"step {self.step}/{config.steps} loss {mean['loss']:.4f} (coarse {mean['coarse']:.4f} "
                          f"fine {mean['fine']:.4f} subpixel {mean['subpixel']:.4f}) positives/pair "
                          f"{mean['positives']:.0f} lr {mean['lr']:.2e} {entry['elapsed_s']:.0f} s", flush=True)
                    window = []
                if self.end_of_step(start):
                    print(self.stop_reason(), flush=True)
                    self.validate()
                    self.save_checkpoint()
                    return
        self.validate()
        self.save_checkpoint()

    def export(self, folder: Path | str, stem: str = "eloftr_synthetic") -> dict[str, str]:
        """fp16 safetensors shards (official key names, training form) -> {file: sha256}."""
        return self.export_shards(folder, stem)


def train_eloftr(config: TrainConfig, resume: bool = False) -> EfficientLoftrTrainer:
    trainer = EfficientLoftrTrainer(config)
    if resume:
        trainer.resume()
    trainer.load_data()
    if trainer.step == 0 and not trainer.validation:
        trainer.validate()
    trainer.fit()
    (trainer.out / "history.json").write_text(json.dumps(trainer.history, indent=1) + "\n")
    if config.export:
        print(f"exported {trainer.export(config.export)}", flush=True)
    return trainer
