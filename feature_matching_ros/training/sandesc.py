"""SANDESC training (``fmr train sandesc``): a dense descriptor network trained on one detector's keypoints.

Data: the same pair sources as the LightGlue trainer (``fmr make-pairs`` folders, optionally MegaDepth).
Per pair, the chosen detector's keypoints (ORB single-scale by default, or ALIKED, ...) are detected once
and labelled with the GT geometry (:func:`feature_matching_ros.training.data.label_pair`: positives are
mutual nearest neighbours under the homography or depth + pose reprojection, < 3 px); keypoints and
labels are cached per pair (``OUT/cache`` or ``--cache``), the grayscale images are kept on the training
device as uint8.

Loss (the paper's modified triplet loss): for every positive (anchor, partner), in both directions, a
negative among the other image's keypoints farther than ``exclusion_px`` from the partner: a random one
with probability p, else the hardest (highest dot product); p starts at ``p_start`` (1) and is multiplied
by ``p_decay`` (0.9993) every step -- an easy-to-hard curriculum. Loss = mean(s_neg - s_pos + margin)
over the triplets that violate the margin (0.5), with s = dot products of unit descriptors.
Optimiser: AdamW; linear warm-up to ``lr`` (5e-3) over ``warmup`` of the run, cosine decay to
``final_lr`` (1e-4); batch 14 pairs; bf16 autocast on CUDA. Both images of a pair are flipped
horizontally together with probability 0.5 (``augment``).
Validation on ``--eval`` folders (before training, every ``eval_every`` steps and at the end):
mutual-NN match precision / recall against the GT labels and homography accuracy (MAGSAC homography from
the mutual-NN matches, mean corner error <= 3 / 5 px) -> ``validation.json``.
Exact resume: every step's batch, flips and random negatives come from generators seeded with
(seed, step), and the checkpoint holds the model, optimiser, step, curriculum p, elapsed time and RNG states.

A short run on one GPU (pairs generated first: 16 processes x 128 pairs, ~1-2 min on 16 cores; 5 minutes of
training, time-budgeted, so the curriculum decays faster than the paper's per-step 0.9993)::

    for i in $(seq 1 16); do fmr make-pairs pairs/train_$i --n 128 --seed $i --split train & done
    fmr make-pairs pairs/eval --n 96 --seed 100 --split eval & wait
    fmr train sandesc --detector orb --train pairs/train_* --eval pairs/eval --out runs/sandesc_orb \\
        --steps 100000 --max-minutes 5 --p-decay 0.998 --export results/sandesc
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from feature_matching_ros.models.sandesc import SANDesc, save_sandesc
from feature_matching_ros.training.data import label_pair
from feature_matching_ros.training.base import Trainer
from feature_matching_ros.training.data import pair_sources
from feature_matching_ros.training.lightglue import progress

LOG = logging.getLogger(__name__)
CACHE_VERSION = 1
EXPORT_STEM = "sandesc_{detector}"


@dataclass
class TrainConfig:
    train: list[str] = field(default_factory=list)  # make-pairs folders
    eval: list[str] = field(default_factory=list)
    megadepth_root: str | None = None  # MegaDepth root (images + depth h5) ...
    megadepth_scenes: list[str] = field(default_factory=list)  # ... and its scene_info npz files (training)
    out: str = "runs/sandesc"
    cache: str | None = None  # keypoint + label cache (default: <out>/cache)
    detector: str = "orb"  # whose keypoints the descriptors are trained on
    max_keypoints: int = 1024
    nms_radius: int = 4
    batch_size: int = 14  # pairs per step
    steps: int = 5000
    lr: float = 5e-3  # peak, after the warm-up
    final_lr: float = 1e-4
    warmup: float = 0.05  # fraction of the run
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    margin: float = 0.5
    p_start: float = 1.0  # probability of a random (instead of the hardest) negative ...
    p_decay: float = 0.9993  # ... multiplied by this every step
    exclusion_px: float = 8.0  # negatives are farther than this from the positive partner
    augment: bool = True  # flip both images of a pair horizontally with probability 0.5
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 500
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much training time; 0 = no limit
    deadline: float = 0.0  # unix time by which training must stop (sets max_minutes at the start of fit); 0 = none
    stop_at: float = 0.0  # unix time at which this session stops with a checkpoint; the schedule is unchanged
    log_every: int = 25
    export: str | None = None  # write fp16 safetensors (+ history, validation) here

    def cache_key(self) -> str:
        text = json.dumps({"v": CACHE_VERSION, "det": self.detector, "kp": self.max_keypoints, "nms": self.nms_radius})
        return f"{self.detector}_{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def lr_at(progress: float, config: TrainConfig) -> float:
    """Linear warm-up from 0 to ``lr`` over ``warmup`` of the run, then cosine decay to ``final_lr``."""
    if progress < config.warmup:
        return config.lr * max(progress / config.warmup, 1e-3)
    fraction = min(1.0, (progress - config.warmup) / max(1e-9, 1.0 - config.warmup))
    return config.final_lr + 0.5 * (config.lr - config.final_lr) * (1.0 + math.cos(math.pi * fraction))


def triplet_loss(desc0: torch.Tensor, desc1: torch.Tensor, kpts0: torch.Tensor, kpts1: torch.Tensor,
                 matches0: torch.Tensor, matches1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor,
                 p_random: float, margin: float = 0.5, exclusion_px: float = 8.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """SANDESC's modified triplet loss over the GT positives of a batch, both directions.

    desc (B, N, D) unit vectors; kpts (B, N, 2) pixels; matches0 (B, N0) long (j >= 0 the GT partner in
    image 1; -1 / -2 none), matches1 (B, N1); masks (B, N) bool (False = padding). Each anchor gets one
    negative among the other image's valid keypoints farther than ``exclusion_px`` from its partner:
    random with probability ``p_random``, else the hardest. Returns (loss, logs); the loss is the mean of
    ``s_neg - s_pos + margin`` over the triplets where it is positive (0 when none violates).
    """
    similarity = desc0.float() @ desc1.float().transpose(1, 2)  # (B, N0, N1)
    terms, anchors, s_pos_all, s_hard_all = [], [], [], []
    for sim, matches, kpts_other, mask_other in ((similarity, matches0, kpts1, mask1),
                                                  (similarity.transpose(1, 2), matches1, kpts0, mask0)):
        partner = matches.clamp_min(0)  # (B, N)
        s_pos = sim.gather(2, partner[..., None])[..., 0]
        partner_xy = kpts_other.gather(1, partner[..., None].expand(-1, -1, 2))  # (B, N, 2)
        valid = (torch.cdist(partner_xy.float(), kpts_other.float()) > exclusion_px) & mask_other[:, None, :]
        hardest = sim.masked_fill(~valid, -4.0).amax(2)
        draw = torch.rand(sim.shape, generator=generator, device=sim.device)
        random_index = draw.masked_fill(~valid, -1.0).argmax(2)
        s_random = sim.gather(2, random_index[..., None])[..., 0]
        use_random = torch.rand(s_pos.shape, generator=generator, device=sim.device) < p_random
        s_neg = torch.where(use_random, s_random, hardest)
        anchor = (matches >= 0) & valid.any(2)
        terms.append((s_neg - s_pos + margin)[anchor])
        anchors.append(anchor.sum())
        s_pos_all.append(s_pos[anchor].detach())
        s_hard_all.append(hardest[anchor].detach())
    values = torch.cat(terms)
    violating = values > 0
    loss = (values * violating).sum() / violating.sum().clamp_min(1)
    count = int(sum(a for a in anchors))
    s_pos, s_hard = torch.cat(s_pos_all), torch.cat(s_hard_all)
    logs = {"loss": float(loss.detach()), "hinge": float(values.detach().clamp_min(0).mean()) if count else 0.0,
            "violating": float(violating.float().mean()) if count else 0.0,
            "s_pos": float(s_pos.mean()) if count else 0.0, "s_hard": float(s_hard.mean()) if count else 0.0,
            "triplets": float(count)}
    return loss, logs


def mutual_nn(desc0: torch.Tensor, desc1: torch.Tensor) -> torch.Tensor:
    """(N0, D) x (N1, D) unit vectors -> (N0,) index of the mutual nearest neighbour in image 1, -1 if none."""
    if len(desc0) == 0 or len(desc1) == 0:
        return torch.full((len(desc0),), -1, dtype=torch.long, device=desc0.device)
    similarity = desc0.float() @ desc1.float().t()
    best0, best1 = similarity.argmax(1), similarity.argmax(0)
    mutual = best1[best0] == torch.arange(len(desc0), device=desc0.device)
    return torch.where(mutual, best0, torch.full_like(best0, -1))


def homography_corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, size: tuple[int, int]) -> float:
    """Mean distance (px) of the image corners mapped by the estimated vs the GT homography; inf on failure."""
    if H_est is None or not np.isfinite(H_est).all():
        return float("inf")
    width, height = size
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [width - 1, height - 1, 1], [0, height - 1, 1]], np.float64)
    a, b = corners @ H_est.T, corners @ H_gt.T
    if (np.abs(a[:, 2]) < 1e-12).any():
        return float("inf")
    return float(np.linalg.norm(a[:, :2] / a[:, 2:] - b[:, :2] / b[:, 2:], axis=1).mean())


def estimate_homography(points0: np.ndarray, points1: np.ndarray) -> np.ndarray | None:
    import cv2

    if len(points0) < 4:
        return None
    H, _ = cv2.findHomography(points0.astype(np.float64), points1.astype(np.float64), cv2.USAC_MAGSAC, 3.0,
                              maxIters=10000, confidence=0.9999)
    return H


class Detector:
    """One detector by name (``FeatureExtractor``'s), returning network-frame keypoints (N, 2) float32 on CPU."""

    def __init__(self, name: str, max_keypoints: int, nms_radius: int, device: torch.device) -> None:
        from feature_matching_ros.config import FeatureConfig
        from feature_matching_ros.features import FeatureExtractor
        from feature_matching_ros.training.data import CPU_DETECTORS

        precision = "fp16" if device.type == "cuda" else "fp32"
        # CPU detectors run on the host here (images prepared on the CPU), ORB by OpenCV.
        config = FeatureConfig(detector=name, descriptor="native", max_keypoints=max_keypoints,
                               nms_radius=nms_radius, resize_max=0, orb_backend="opencv")
        self.extractor = FeatureExtractor(config, device, precision)
        self.max_keypoints = max_keypoints
        self.on_cpu = name in CPU_DETECTORS
        self.device = device if not self.on_cpu else torch.device("cpu")

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        from feature_matching_ros.image import prepare_image

        prepared = prepare_image(rgb, 0, self.device)
        with torch.inference_mode():
            keypoints = self.extractor.detector.detect(prepared, self.max_keypoints, False)
        return keypoints.xy.float().cpu()


class PairSet:
    """Pairs with grayscale images (uint8, on the device), padded keypoints and GT labels.

    images (P, 2, H, W) uint8 (smaller images padded with zeros at the bottom/right); kpts (P, 2, K, 2)
    float32 pixels; mask (P, 2, K) bool; matches (P, 2, K) long (matches0, matches1; padding -2);
    sizes (P, 2, 2) (W, H); kinds (P,) str; H_1_0 (P, 3, 3) float64 numpy (NaN for non-homography pairs).
    """

    def __init__(self, sources: list, detector: Detector, config: TrainConfig, cache: Path | None,
                 device: torch.device, name: str) -> None:
        import cv2

        entries: list[dict] = []
        K = config.max_keypoints
        # OpenCV detectors release the GIL and run in parallel; a GPU network detects one image at a time
        lock = contextlib.nullcontext() if detector.on_cpu else threading.Lock()
        for source in sources:
            keys = source.keys()

            def prepare(index: int) -> dict | None:
                pair = source.load(index)
                if pair is None:
                    return None
                path = None if cache is None else cache / (keys[index].replace("/", "__") + ".npz")
                # a regenerated pair folder with the same name must not reuse stale keypoints
                checksum = zlib.crc32(np.ascontiguousarray(pair["image0"]).tobytes()) ^ zlib.crc32(
                    np.ascontiguousarray(pair["image1"]).tobytes())
                labelled = None
                if path is not None and path.is_file():
                    with np.load(path) as data:
                        if int(data["checksum"]) == checksum:
                            labelled = {k: torch.from_numpy(data[k]) for k in ("kpts0", "kpts1", "matches0", "matches1")}
                if labelled is None:
                    with lock:
                        k0, k1 = detector(pair["image0"]), detector(pair["image1"])
                    m0, m1 = label_pair(pair, k0, k1)
                    labelled = {"kpts0": k0, "kpts1": k1, "matches0": m0.cpu(), "matches1": m1.cpu()}
                    if path is not None:
                        tmp = path.with_suffix(".tmp.npz")
                        np.savez(tmp, checksum=np.array(checksum, np.int64), **{k: v.numpy() for k, v in labelled.items()})
                        tmp.replace(path)
                gray = [cv2.cvtColor(pair[k], cv2.COLOR_RGB2GRAY) for k in ("image0", "image1")]
                return {**labelled, "gray": gray, "kind": pair["kind"],
                        "H_1_0": np.asarray(pair.get("H_1_0", np.full((3, 3), np.nan)), np.float64)}

            with ThreadPoolExecutor(8) as pool:
                for entry in progress(pool.map(prepare, range(len(source))), f"{name} keypoints"):
                    if entry is not None:
                        entries.append(entry)
        if not entries:
            raise ValueError(f"no {name} pairs")
        height = max(g.shape[0] for e in entries for g in e["gray"])
        width = max(g.shape[1] for e in entries for g in e["gray"])
        P = len(entries)
        images = torch.zeros((P, 2, height, width), dtype=torch.uint8)
        self.kpts = torch.zeros((P, 2, K, 2))
        self.mask = torch.zeros((P, 2, K), dtype=torch.bool)
        self.matches = torch.full((P, 2, K), -2, dtype=torch.long)
        self.sizes = np.zeros((P, 2, 2), np.int64)
        for p, entry in enumerate(entries):
            for side in (0, 1):
                gray = entry["gray"][side]
                images[p, side, :gray.shape[0], :gray.shape[1]] = torch.from_numpy(gray)
                n = min(K, len(entry[f"kpts{side}"]))
                self.kpts[p, side, :n] = entry[f"kpts{side}"][:n]
                self.mask[p, side, :n] = True
                matches = entry[f"matches{side}"][:n].clone()
                matches[matches >= K] = -2  # partner cut by the keypoint limit
                self.matches[p, side, :n] = matches
                self.sizes[p, side] = gray.shape[1], gray.shape[0]
        self.kinds = np.array([e["kind"] for e in entries])
        self.H_1_0 = np.stack([e["H_1_0"] for e in entries])
        self.images = images.to(device)
        self.kpts, self.mask, self.matches = self.kpts.to(device), self.mask.to(device), self.matches.to(device)
        self.positives = float((self.matches[:, 0] >= 0).sum(1).float().mean())

    def __len__(self) -> int:
        return len(self.kinds)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        index = index.to(self.images.device)
        return {"images": self.images[index], "kpts": self.kpts[index], "mask": self.mask[index],
                "matches": self.matches[index]}


class SandescTrainer(Trainer):
    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.model = SANDesc().to(self.device)
        if self.device.type == "cuda":  # NHWC convolutions for bf16 tensor cores
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.p_random = config.p_start
        self.train_data: PairSet | None = None
        self.eval_data: PairSet | None = None

    # -- data ---------------------------------------------------------------------------------------------
    def load_data(self) -> None:
        config = self.config
        start = time.perf_counter()
        detector = Detector(config.detector, config.max_keypoints, config.nms_radius, self.device)
        cache = (Path(config.cache) if config.cache else self.out / "cache") / config.cache_key()
        (cache / "train").mkdir(parents=True, exist_ok=True)
        (cache / "eval").mkdir(parents=True, exist_ok=True)
        sources = pair_sources(config.train, config.megadepth_root, config.megadepth_scenes)
        if not sources:
            raise ValueError("no training pairs: give --train folders (fmr make-pairs) or --megadepth-*")
        self.train_data = PairSet(sources, detector, config, cache / "train", self.device, "train")
        eval_sources = pair_sources(config.eval)
        self.eval_data = (PairSet(eval_sources, detector, config, cache / "eval", self.device, "eval")
                          if eval_sources else None)
        print(f"data: {len(self.train_data)} train pairs, {0 if self.eval_data is None else len(self.eval_data)} eval "
              f"pairs, {config.detector} keypoints (<= {config.max_keypoints}), mean GT positives/pair "
              f"{self.train_data.positives:.1f}, {time.perf_counter() - start:.0f} s", flush=True)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"p_random": self.p_random,
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}

    def load_extra_state(self, state: dict) -> None:
        self.p_random = state["p_random"]
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])

    # -- training --------------------------------------------------------------------------------------------
    def _generators(self, step: int) -> tuple[np.random.Generator, torch.Generator]:
        """Per-step randomness (batch choice; flips and negatives) from (seed, step): resume is exact."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(np.random.SeedSequence([self.config.seed, step]).generate_state(1)[0]))
        return np.random.default_rng([self.config.seed, step]), generator

    def describe(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                 augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2, H, W) uint8 images -> descriptors (B, 2, K, D) at the batch keypoints, and the keypoints used."""
        images, kpts = batch["images"], batch["kpts"]
        B, _, H, W = images.shape
        if augment:
            flip = torch.rand(B, generator=generator, device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            flipped = torch.stack([W - 1 - kpts[..., 0], kpts[..., 1]], -1)
            kpts = torch.where(flip[:, None, None, None], flipped, kpts)
        x = images.reshape(B * 2, 1, H, W).float().div_(255.0)
        with self._autocast():
            dense = self.model(x)
        descriptors = SANDesc.sample(dense, kpts.reshape(B * 2, -1, 2))
        return descriptors.reshape(B, 2, -1, descriptors.shape[-1]), kpts

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None, p_random: float,
             augment: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        desc, kpts = self.describe(batch, generator, augment)
        m, mask = batch["matches"], batch["mask"]
        return triplet_loss(desc[:, 0], desc[:, 1], kpts[:, 0], kpts[:, 1], m[:, 0], m[:, 1], mask[:, 0], mask[:, 1],
                            p_random, self.config.margin, self.config.exclusion_px, generator)

    def train_step(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, float]:
        self.model.train()
        lr = lr_at(self.progress(), self.config)
        loss, logs = self.loss(batch, generator, self.p_random, self.config.augment)
        self.optimise(loss, lr, logs)
        logs |= {"lr": lr, "p_random": self.p_random, "step": self.step}
        self.p_random *= self.config.p_decay
        return logs

    @torch.no_grad()
    def validate(self) -> dict:
        """Mutual-NN precision / recall vs the GT labels, homography accuracy; appended to validation.json."""
        if self.eval_data is None:
            return {}
        self.model.eval()
        data = self.eval_data
        correct = predicted = positives = matches = 0
        corner_errors = []
        for first in range(0, len(data), 8):
            index = torch.arange(first, min(first + 8, len(data)))
            batch = data.batch(index)
            desc, _ = self.describe(batch)
            for row, p in enumerate(index.tolist()):
                n0, n1 = int(data.mask[p, 0].sum()), int(data.mask[p, 1].sum())
                pred = mutual_nn(desc[row, 0, :n0], desc[row, 1, :n1])
                gt = data.matches[p, 0, :n0]
                scored = (pred >= 0) & (gt > -2)
                correct += int((scored & (pred == gt)).sum())
                predicted += int(scored.sum())
                positives += int((gt >= 0).sum())
                matches += int((pred >= 0).sum())
                if data.kinds[p] == "homography":
                    found = torch.nonzero(pred >= 0)[:, 0]
                    k0 = data.kpts[p, 0, found].cpu().numpy()
                    k1 = data.kpts[p, 1, pred[found]].cpu().numpy()
                    corner_errors.append(homography_corner_error(estimate_homography(k0, k1), data.H_1_0[p],
                                                                 tuple(data.sizes[p, 0])))
        errors = np.array(corner_errors)
        report = {"step": self.step, "pairs": len(data), "precision": round(correct / max(predicted, 1), 4),
                  "recall": round(correct / max(positives, 1), 4), "matches_per_pair": round(matches / len(data), 1),
                  "homography_pairs": len(errors),
                  "h_acc@3px": round(float((errors <= 3).mean()), 4) if len(errors) else None,
                  "h_acc@5px": round(float((errors <= 5).mean()), 4) if len(errors) else None}
        self.validation.append(report)
        (self.out / "validation.json").write_text(json.dumps(self.validation, indent=1) + "\n")
        print(f"validation step {self.step}: precision {report['precision']:.3f} recall {report['recall']:.3f} "
              f"matches/pair {report['matches_per_pair']} H acc@3/5px {report['h_acc@3px']}/{report['h_acc@5px']}",
              flush=True)
        return report

    def fit(self) -> None:
        config = self.config
        if self.train_data is None:
            raise RuntimeError("call load_data() first")
        if self.step == 0 and not self.validation:
            self.validate()
        start = self.start_budget()
        window: list[dict] = []
        size = len(self.train_data)
        while self.step < config.steps:
            rng, generator = self._generators(self.step)
            index = torch.from_numpy(rng.choice(size, config.batch_size, replace=size < config.batch_size))
            self.elapsed_s = time.perf_counter() - start
            window.append(self.train_step(self.train_data.batch(index), generator))
            if self.step % config.log_every == 0 or self.step == config.steps:
                mean = {k: float(np.mean([w[k] for w in window])) for k in ("loss", "violating", "s_pos", "s_hard")}
                entry = {"step": self.step, "lr": window[-1]["lr"], "p_random": round(window[-1]["p_random"], 4),
                         **{k: round(v, 4) for k, v in mean.items()}, "elapsed_s": round(time.perf_counter() - start, 1)}
                self.history.append(entry)
                print(f"step {self.step}/{config.steps} loss {mean['loss']:.4f} violating {mean['violating']:.3f} "
                      f"s_pos {mean['s_pos']:.3f} s_hard {mean['s_hard']:.3f} p {entry['p_random']:.3f} "
                      f"lr {entry['lr']:.2e} {entry['elapsed_s']:.0f} s", flush=True)
                window = []
            if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                self.validate()
            if self.end_of_step(start):
                print(self.stop_reason(), flush=True)
                break
        self.validate()
        self.save_checkpoint()
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1) + "\n")

    def export(self, folder: Path | str) -> Path:
        """fp16 safetensors ``sandesc_<detector>.safetensors`` (config + training facts in the metadata),
        with ``.history.json`` and ``.validation.json`` beside it."""
        folder = Path(folder)
        stem = EXPORT_STEM.format(detector=self.config.detector)
        facts = {"detector": self.config.detector, "max_keypoints": self.config.max_keypoints, "step": self.step,
                 "train_pairs": len(self.train_data) if self.train_data is not None else None,
                 "elapsed_s": round(self.elapsed_s, 1), "device": str(self.device),
                 "validation": self.validation[-1] if self.validation else None}
        path = save_sandesc(self.model, folder / f"{stem}.safetensors", facts)
        (folder / f"{stem}.history.json").write_text(json.dumps(self.history, indent=1) + "\n")
        (folder / f"{stem}.validation.json").write_text(json.dumps(self.validation, indent=1) + "\n")
        return path


def train_sandesc(config: TrainConfig, resume: bool = False) -> SandescTrainer:
    trainer = SandescTrainer(config)
    if resume:
        trainer.resume()
    trainer.load_data()
    trainer.fit()
    if config.export:
        from feature_matching_ros.weights import sha256_of

        path = trainer.export(config.export)
        print(f"exported {path} sha256 {sha256_of(path)}", flush=True)
    return trainer
