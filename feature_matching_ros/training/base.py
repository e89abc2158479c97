"""What every training loop here shares: device and autocast choice, atomic checkpoints with ``--resume``, and
the run's progress (steps or a time budget, whichever is further along).

Each trainer (lightglue, eloftr, sandesc) subclasses :class:`Trainer`, builds ``self.model`` and
``self.optimizer``, and adds its own state to checkpoints through :meth:`Trainer.extra_state` /
:meth:`Trainer.load_extra_state`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on CUDA for "auto" / "bf16", fp16 for "fp16", and fp32 (no autocast) on the CPU."""
    if device.type != "cuda":
        return None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class Trainer:
    """State and checkpoints common to the training loops. ``config`` needs ``device``, ``precision``, ``seed``,
    ``out``, ``steps``, ``max_minutes``, ``deadline`` and ``stop_at`` fields (a dataclass)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, config: Any) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.autocast_dtype = training_autocast_dtype(self.device, config.precision)
        torch.manual_seed(config.seed)
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.elapsed_s = 0.0  # training time so far (survives resume)
        self.history: list[dict] = []
        self.validation: list[dict] = []

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def progress(self) -> float:
        """Fraction of the run done: the larger of step / steps and elapsed / max_minutes."""
        config = self.config
        by_time = self.elapsed_s / (60 * config.max_minutes) if config.max_minutes else 0.0
        return max(self.step / max(1, config.steps), by_time)

    def start_budget(self) -> float:
        """Turn ``config.deadline`` (unix time) into ``max_minutes`` for this run; returns the perf_counter origin
        of the training clock (so ``elapsed_s`` continues across resumes)."""
        config = self.config
        if config.deadline:
            config.max_minutes = max(0.2, (config.deadline - time.time()) / 60 + self.elapsed_s / 60)
            print(f"training for at most {config.max_minutes:.1f} min (deadline)", flush=True)
        return time.perf_counter() - self.elapsed_s

    def optimise(self, loss: torch.Tensor, lr: float, logs: dict[str, float]) -> None:
        """One optimiser step at learning rate ``lr``: refuses a non-finite loss, clips gradients, counts the step."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {logs}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1

    def stop_reason(self) -> str:
        """Why :meth:`end_of_step` ended the session (for the log)."""
        if self.config.stop_at and time.time() >= self.config.stop_at:
            return f"--stop-at reached at step {self.step} (resume continues the schedule)"
        return f"time budget of {self.config.max_minutes:.1f} min reached at step {self.step}"

    def end_of_step(self, start: float) -> bool:
        """Checkpoint every ``checkpoint_every`` steps; True once the time budget is spent or ``stop_at`` passed
        (the caller then checkpoints and returns; ``--resume`` continues the same schedule)."""
        config = self.config
        if config.checkpoint_every and self.step % config.checkpoint_every == 0:
            self.save_checkpoint()
        self.elapsed_s = time.perf_counter() - start
        if config.stop_at and time.time() >= config.stop_at:
            return True
        return bool(config.max_minutes) and self.elapsed_s > 60 * config.max_minutes

    def export_shards(self, folder: Path | str, stem: str) -> dict[str, str]:
        """fp16 safetensors shards of the model (bounded files: easy to copy, checksum and resume) plus
        ``{stem}.json`` listing them -> {file: sha256}."""
        from feature_matching_ros.weights import save_sharded_safetensors

        shards = save_sharded_safetensors(self.model.state_dict(), Path(folder), stem)
        (Path(folder) / f"{stem}.json").write_text(json.dumps(shards, indent=1) + "\n")
        return shards

    def extra_state(self) -> dict[str, Any]:
        """Trainer-specific checkpoint entries."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoint.pt atomically (temporary file, then rename)."""
        path = self.out / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "config": asdict(self.config), "history": self.history, "validation": self.validation,
                    "rng": torch.get_rng_state(), "elapsed_s": self.elapsed_s, **self.extra_state()}, tmp)
        tmp.replace(path)
        return path

    def resume(self, path: Path | None = None) -> None:
        """Continue from OUT/checkpoint.pt (or ``path``): model, optimizer, step, logs, RNG, elapsed time."""
        path = Path(path) if path else self.out / CHECKPOINT
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history, self.validation = state["step"], state["history"], state["validation"]
        torch.set_rng_state(state["rng"].cpu())
        self.elapsed_s = state.get("elapsed_s", 0.0)
        self.load_extra_state(state)
        print(f"resumed from {path} at step {self.step}", flush=True)
