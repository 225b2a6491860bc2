"""Class-wise calibration from training robust accuracy, shared by CFA and FAIR-TAT.

Per epoch, the train-mode adversarial predictions of the loss are counted per class on the device
(`RobustTally`, no host sync); the next epoch's per-class radius (CFA's CCM, FAIR-TAT's G-rob) and TRADES
weight (CFA's CCR) follow from them. `calibrated_trades_loss` is CFA's normalised TRADES, which FAIR-TAT offers
as an option. See docs/methods/cfa.md §2 and docs/methods/fairtat.md §2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.adversaries import kl_per_sample


class RobustTally:
    """Per-class counts of one epoch's train-mode adversarial predictions, kept on the device."""

    def __init__(self, num_classes: int, device: torch.device):
        self.correct = torch.zeros(num_classes, device=device)
        """Samples of true class k predicted k."""
        self.false_positive = torch.zeros(num_classes, device=device)
        """Misclassified samples (of any true class) predicted as k."""
        self.seen = 0

    def reset(self) -> None:
        self.correct.zero_()
        self.false_positive.zero_()
        self.seen = 0

    def record(self, logits_adv: Tensor, y: Tensor) -> None:
        """index_add only: no host synchronisation inside the training step."""
        pred = logits_adv.detach().argmax(1)
        hit = (pred == y).to(self.correct.dtype)
        self.correct.index_add_(0, y, hit)
        self.false_positive.index_add_(0, pred, 1 - hit)
        self.seen += y.shape[0]

    def accuracy(self) -> Tensor:
        """C * correct_k / N: class-wise accuracy with the code's balanced-class normaliser (not per-class counts)."""
        return self.correct * self.correct.shape[0] / max(self.seen, 1)

    def false_positive_share(self) -> tuple[Tensor, Tensor]:
        """(CFPS, any error): the share of all errors predicted as each class; sums to 1 when there are errors."""
        errors = self.false_positive.sum()
        return self.false_positive / errors.clamp_min(1), errors > 0


def calibrating(epoch: int, begin: int) -> bool:
    """Whether 1-indexed `epoch` uses the per-class settings: the code's 0-indexed `epoch >= begin`, and never
    epoch 1 (no statistics yet)."""
    return epoch > max(begin, 1)


def calibrated_radius(acc: Tensor, lam: float, eps: float) -> Tensor:
    """CCM (and FAIR-TAT's G-rob): eps_k = (lam + acc_k) * eps, so more robust classes get a larger radius."""
    return (lam + acc) * eps


def calibrated_weight(acc: Tensor, lam: float, beta: float) -> Tensor:
    """CCR: b_k = (lam + acc_k) beta / (1 + (lam + acc_k) beta), in (0, 1), increasing with acc_k."""
    scaled = (lam + acc) * beta
    return scaled / (1 + scaled)


def calibrated_trades_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, b: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """CFA's TRADES: (1/B) sum_i (1 - b_i) CE(f(x_i), y_i) + b_i KL(p(x_i) || p(x_adv_i)), in train mode.

    Two forwards (clean first, the code's order), the clean softmax not detached, as `trades_loss`. Returns
    (loss, clean logits, adversarial logits). With b_i = beta/(1+beta) this is TRADES / (1 + beta).
    """
    logits = model(x).float()
    logits_adv = model(x_adv).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    kl = kl_per_sample(logits, logits_adv)
    loss = ((1 - b) * ce + b * kl).sum() / x.shape[0]
    return loss, logits, logits_adv
