"""LightGlue training loss (glue-factory's definition, written here: no library ships it standalone).

Per layer: 0.5 * mean NLL of the positives' assignment + 0.5 * mean NLL of the dustbin for unmatched
keypoints of both images (balanced per pair, then averaged over the batch); uniform average over all
layers (deep supervision). Plus a BCE loss on the token confidences of layers 0..L-2, whose target is
"this keypoint's prediction at layer i (mutual argmax above the filter threshold, or none) already equals
its final-layer prediction" -- what early exit relies on at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nll_loss(log_assignment: torch.Tensor, matches0: torch.Tensor, matches1: torch.Tensor, mask0: torch.Tensor,
             mask1: torch.Tensor, balance: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced NLL of one layer.

    log_assignment (B, M+1, N+1); matches0 (B, M) long: j >= 0 positive, -1 unmatched, -2 ignored;
    matches1 (B, N); masks (B, M), (B, N) bool. Returns (loss (B,), positive NLL (B,), negative NLL (B,)).
    """
    scores = log_assignment.float()
    positive = (matches0 >= 0) & mask0
    picked = scores[:, :-1, :-1].gather(2, matches0.clamp_min(0)[..., None])[..., 0]
    nll_pos = -(picked * positive).sum(1) / positive.sum(1).clamp_min(1)
    negative0, negative1 = (matches0 == -1) & mask0, (matches1 == -1) & mask1
    dust = (scores[:, :-1, -1] * negative0).sum(1) + (scores[:, -1, :-1] * negative1).sum(1)
    nll_neg = -dust / (negative0.sum(1) + negative1.sum(1)).clamp_min(1)
    return balance * nll_pos + (1 - balance) * nll_neg, nll_pos, nll_neg


def predictions(log_assignment: torch.Tensor, threshold: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual-argmax matches with probability > threshold: matches0 (B, M), matches1 (B, N), -1 = none."""
    scores = log_assignment[:, :-1, :-1].detach()
    best0, best1 = scores.max(2), scores.max(1)
    rows = torch.arange(scores.shape[1], device=scores.device)[None]
    cols = torch.arange(scores.shape[2], device=scores.device)[None]
    mutual0 = rows == best1.indices.gather(1, best0.indices)
    mutual1 = cols == best0.indices.gather(1, best1.indices)
    valid0 = mutual0 & (best0.values.exp() > threshold)
    valid1 = mutual1 & (best1.values.exp() > threshold)
    return (torch.where(valid0, best0.indices, torch.full_like(best0.indices, -1)),
            torch.where(valid1, best1.indices, torch.full_like(best1.indices, -1)))


def lightglue_loss(log_assignments: list[torch.Tensor], confidences: list[torch.Tensor], batch: dict[str, torch.Tensor],
                   threshold: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss (scalar) and logged parts, from :meth:`LightGlueMatcher.forward_layers` outputs.

    batch: matches0/matches1/mask0/mask1 as in :func:`feature_matching_ros.training.data.collate`.
    """
    m0, m1, mask0, mask1 = batch["matches0"], batch["matches1"], batch["mask0"], batch["mask1"]
    per_layer = [nll_loss(la, m0, m1, mask0, mask1) for la in log_assignments]
    nll = torch.stack([loss for loss, _, _ in per_layer]).mean(0).mean()
    final0, final1 = predictions(log_assignments[-1], threshold)
    final = torch.cat([final0, final1], 1)
    valid = torch.cat([mask0, mask1], 1)
    conf_terms = []
    for la, confidence in zip(log_assignments[:-1], confidences):
        layer0, layer1 = predictions(la, threshold)
        target = (torch.cat([layer0, layer1], 1) == final).float()
        bce = F.binary_cross_entropy(confidence.float().clamp(1e-6, 1 - 1e-6), target, reduction="none")
        conf_terms.append((bce * valid).sum() / valid.sum().clamp_min(1))
    conf = torch.stack(conf_terms).mean() if conf_terms else nll.new_zeros(())
    last = per_layer[-1]
    f = lambda t: float(t.detach())  # noqa: E731
    logs = {"loss": f(nll + conf), "nll": f(nll), "conf": f(conf),
            "nll_last": f(last[0].mean()), "pos_last": f(last[1].mean()), "neg_last": f(last[2].mean())}
    return nll + conf, logs


def match_metrics(log_assignment: torch.Tensor, batch: dict[str, torch.Tensor], threshold: float = 0.1) -> torch.Tensor:
    """Per-pair counts (B, 3): [correct predicted matches, predicted matches on labelled points, GT positives].

    A prediction is scored when its keypoint in image 0 is labelled (positive or unmatched); it is correct
    when it equals the GT partner. Precision = correct / predicted, recall = correct / positives.
    """
    pred0, _ = predictions(log_assignment, threshold)
    gt0, mask0 = batch["matches0"], batch["mask0"]
    predicted = (pred0 >= 0) & (gt0 > -2) & mask0
    correct = predicted & (pred0 == gt0)
    positives = (gt0 >= 0) & mask0
    return torch.stack([correct.sum(1), predicted.sum(1), positives.sum(1)], 1)
