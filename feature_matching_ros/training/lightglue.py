"""Detector-agnostic LightGlue fine-tuning (arXiv 2602.08430 recipe on our data).

Start from the official ALIKED-LightGlue; the descriptor network stays frozen (features are extracted once
and cached, :mod:`data`); train LightGlue on keypoints of several detectors, all described by ALIKED, with
glue-factory's labels and loss (deep supervision + confidence BCE), early exit and pruning off.
AdamW, lr 5e-5 constant for the first ``decay_start`` fraction of steps then exponential decay to
``lr * final_lr_factor``; bf16 autocast on CUDA (fp32 on CPU); checkpoints with ``--resume``; a validation
report (match precision / recall vs GT per detector) before training and after every epoch.
The loop is ours (glue-factory's trainer needs its whole framework); the layers are kornia's.
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

from feature_matching_ros.config import MatcherConfig
from feature_matching_ros.training.base import Trainer
from feature_matching_ros.training.data import (DEFAULT_DETECTORS, ExtractionSettings, FeatureCache, collate,
                                                pair_sources)
from feature_matching_ros.training.loss import lightglue_loss, match_metrics

LOG = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    train: list[str] = field(default_factory=list)  # make-pairs folders
    eval: list[str] = field(default_factory=list)
    megadepth_root: str | None = None  # MegaDepth root (images + depth h5) ...
    megadepth_scenes: list[str] = field(default_factory=list)  # ... and its scene_info npz files (training)
    out: str = "runs/lightglue_agnostic"
    cache: str | None = None  # feature cache folder (default: <out>/cache)
    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    descriptor: str = "aliked"
    max_keypoints: int = 512
    batch_size: int = 16
    steps: int = 1000
    lr: float = 5e-5
    weight_decay: float = 0.0
    decay_start: float = 0.5  # fraction of steps at constant lr, then exponential decay
    final_lr_factor: float = 0.1
    grad_clip: float = 1.0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    checkpoint_every: int = 500
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much training time; 0 = no limit
    deadline: float = 0.0  # unix time by which training must stop (sets max_minutes at the start of fit); 0 = none
    stop_at: float = 0.0  # unix time at which this session stops with a checkpoint; the schedule is unchanged
    log_every: int = 25
    export: str | None = None  # write fp16 safetensors shards of the final model here


def lr_at(progress: float, config: TrainConfig) -> float:
    """Constant ``lr`` until ``decay_start`` of the run, then exponential decay reaching ``final_lr_factor`` at the end.

    progress in [0, 1]: the larger of step / steps and elapsed / max_minutes (so a time-limited run still decays).
    """
    if progress < config.decay_start:
        return config.lr
    fraction = min(1.0, (progress - config.decay_start) / max(1e-9, 1.0 - config.decay_start))
    return config.lr * config.final_lr_factor ** fraction


def progress(iterable, description: str):
    """tqdm when installed, otherwise a line every ~10 %."""
    try:
        from tqdm import tqdm

        return tqdm(iterable, desc=description, dynamic_ncols=True, mininterval=5.0)
    except ImportError:
        def plain():
            items = list(iterable)
            every = max(1, len(items) // 10)
            start = time.perf_counter()
            for i, item in enumerate(items):
                if i % every == 0:
                    print(f"{description}: {i}/{len(items)} ({time.perf_counter() - start:.0f} s)", flush=True)
                yield item
        return plain()


class Packed:
    """All samples padded to ``max_keypoints`` and stacked on the training device (no per-step collation)."""

    def __init__(self, samples: list[dict], length: int, device: torch.device) -> None:
        self.detectors = np.array([s["detector"] for s in samples])
        parts = [collate(samples[i:i + 512], length) for i in range(0, len(samples), 512)]
        self.tensors = {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}
        for key in ("desc0", "desc1"):
            self.tensors[key] = self.tensors[key].half()

    def __len__(self) -> int:
        return len(self.detectors)

    def batch(self, index: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, device=self.tensors["kpts0"].device)
        out = {k: v[index] for k, v in self.tensors.items()}
        out["desc0"], out["desc1"] = out["desc0"].float(), out["desc1"].float()
        return out


class LightGlueTrainer(Trainer):
    def __init__(self, config: TrainConfig) -> None:
        from feature_matching_ros.matchers.lightglue import LightGlueMatcher

        super().__init__(config)
        # Early exit and pruning off: every layer runs and is supervised.
        matcher_config = MatcherConfig(depth_confidence=-1, width_confidence=-1, cuda_graphs=False)
        # SANDESC descriptors are 128-d like ALIKED's: start from the official ALIKED-LightGlue.
        init = "aliked" if config.descriptor == "sandesc" else config.descriptor
        self.matcher = LightGlueMatcher(init, matcher_config, self.device, "fp32")
        self.model = self.matcher.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
                                           weight_decay=config.weight_decay)

    # -- data ---------------------------------------------------------------------------------------------
    def load_data(self) -> None:
        config = self.config
        settings = ExtractionSettings(tuple(config.detectors), config.descriptor, config.max_keypoints)
        cache = Path(config.cache) if config.cache else self.out / "cache"
        precision = "fp16" if self.device.type == "cuda" else "fp32"
        start = time.perf_counter()
        train_samples: list[dict] = []
        for source in pair_sources(config.train, config.megadepth_root, config.megadepth_scenes):
            train_samples += FeatureCache(source, settings, cache / "train", self.device, precision, progress).samples
        eval_samples: list[dict] = []
        for source in pair_sources(config.eval):
            eval_samples += FeatureCache(source, settings, cache / "eval", self.device, precision, progress).samples
        if not train_samples:
            raise ValueError("no training samples: give --train folders (fmr make-pairs) or --megadepth-*")
        self.train_data = Packed(train_samples, config.max_keypoints, self.device)
        self.eval_data = Packed(eval_samples, config.max_keypoints, self.device) if eval_samples else None
        positives = float((self.train_data.tensors["matches0"] >= 0).sum(1).float().mean())
        LOG.info("data: %d train samples (%d eval) in %.0f s; mean GT positives per pair %.1f", len(self.train_data),
                 0 if self.eval_data is None else len(self.eval_data), time.perf_counter() - start, positives)
        print(f"data: {len(self.train_data)} train samples, {0 if self.eval_data is None else len(self.eval_data)} "
              f"eval samples, {time.perf_counter() - start:.0f} s, mean positives/pair {positives:.1f}", flush=True)

    # -- training --------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]):
        with self._autocast():
            return self.matcher.forward_layers(batch["kpts0"], batch["desc0"], batch["mask0"], batch["kpts1"],
                                               batch["desc1"], batch["mask1"])

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        lr = lr_at(self.progress(), self.config)
        log_assignments, confidences = self.forward(batch)
        loss, logs = lightglue_loss(log_assignments, confidences, batch)
        self.optimise(loss, lr, logs)
        return logs | {"lr": lr, "step": self.step}

    @torch.no_grad()
    def validate(self) -> dict:
        """Match precision / recall vs GT and final-layer NLL per detector on the eval samples."""
        if self.eval_data is None:
            return {}
        self.model.eval()
        counts: dict[str, np.ndarray] = {}
        nll: dict[str, list[float]] = {}
        for start in range(0, len(self.eval_data), 64):
            index = np.arange(start, min(start + 64, len(self.eval_data)))
            batch = self.eval_data.batch(index)
            log_assignments, confidences = self.forward(batch)
            metrics = match_metrics(log_assignments[-1].float(), batch).cpu().numpy()
            from feature_matching_ros.training.loss import nll_loss

            losses = nll_loss(log_assignments[-1], batch["matches0"], batch["matches1"], batch["mask0"],
                              batch["mask1"])[0].cpu().numpy()
            for row, detector, value in zip(metrics, self.eval_data.detectors[index], losses):
                counts.setdefault(detector, np.zeros(3))
                counts[detector] += row
                nll.setdefault(detector, []).append(float(value))
        report = {"step": self.step, "detectors": {}}
        for detector, (correct, predicted, positives) in counts.items():
            report["detectors"][detector] = {
                "precision": round(correct / max(predicted, 1), 4), "recall": round(correct / max(positives, 1), 4),
                "nll": round(float(np.mean(nll[detector])), 4), "pairs": len(nll[detector])}
        values = list(report["detectors"].values())
        report["mean_precision"] = round(float(np.mean([v["precision"] for v in values])), 4)
        report["mean_recall"] = round(float(np.mean([v["recall"] for v in values])), 4)
        self.validation.append(report)
        (self.out / "validation.json").write_text(json.dumps(self.validation, indent=1) + "\n")
        print("validation step {}: ".format(self.step) + ", ".join(
            f"{d} P {v['precision']:.3f} R {v['recall']:.3f} nll {v['nll']:.3f}" for d, v in report["detectors"].items()),
            flush=True)
        return report

    def fit(self) -> None:
        config = self.config
        if self.step == 0 and not self.validation:
            self.validate()
        start = self.start_budget()
        steps_per_epoch = math.ceil(len(self.train_data) / config.batch_size)
        window: list[dict] = []
        while self.step < config.steps:
            # The batch order is a function of (seed, epoch) and the step: a resumed run sees the same batches as
            # one that never stopped.
            epoch, done = divmod(self.step, steps_per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(len(self.train_data))
            for first in range(done * config.batch_size, len(order), config.batch_size):
                if self.step >= config.steps:
                    break
                self.elapsed_s = time.perf_counter() - start
                logs = self.train_step(self.train_data.batch(order[first:first + config.batch_size]))
                window.append(logs)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    mean = {k: float(np.mean([w[k] for w in window])) for k in ("loss", "nll", "conf", "pos_last",
                                                                               "neg_last")}
                    entry = {"step": self.step, "epoch": epoch, "lr": logs["lr"], **{k: round(v, 4) for k, v in mean.items()},
                             "elapsed_s": round(time.perf_counter() - start, 1)}
                    self.history.append(entry)
                    print(f"step {self.step}/{config.steps} ep {epoch} loss {mean['loss']:.4f} (nll {mean['nll']:.4f} "
                          f"conf {mean['conf']:.4f} pos {mean['pos_last']:.3f} neg {mean['neg_last']:.3f}) "
                          f"lr {logs['lr']:.2e} {entry['elapsed_s']:.0f} s", flush=True)
                    window = []
                if self.end_of_step(start):
                    print(self.stop_reason(), flush=True)
                    self.validate()
                    self.save_checkpoint()
                    return
            self.validate()
        self.save_checkpoint()
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1) + "\n")

    def export(self, folder: Path | str, stem: str = "aliked_lightglue_agnostic") -> dict[str, str]:
        """fp16 safetensors shards of the model (kornia key names) -> {file: sha256}."""
        return self.export_shards(folder, stem)


def train_lightglue(config: TrainConfig, resume: bool = False) -> LightGlueTrainer:
    trainer = LightGlueTrainer(config)
    if resume:
        trainer.resume()
    trainer.load_data()
    trainer.fit()
    (trainer.out / "history.json").write_text(json.dumps(trainer.history, indent=1) + "\n")
    if config.export:
        shards = trainer.export(config.export)
        print(f"exported {shards}", flush=True)
    return trainer
