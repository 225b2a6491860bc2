"""TRADES (Zhang et al., ICML 2019): clean CE + beta * KL(clean || adversarial), KL-ascent inner attack.

Paper: "Theoretically Principled Trade-off between Robustness and Accuracy".
Official code: github.com/yaodongyu/TRADES (trades.py). Baseline protocol as in rucy74/DAFA and
Fairness-a11y/TRIX (scripts/trades.sh). No per-class state. DAFA and TRIX reuse this class through two
hooks: `sample_scale` (per-sample class weight) and `adversary_targets` (targeted subset).

The loss forwards the adversarial batch before the clean one in train mode, as the DAFA and TRIX code (their
TRADES baseline included) does, so BatchNorm's running statistics match theirs; the TRADES code forwards
clean, adversarial, clean. `forward_order="clean_first"` gives the order fairbench used before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn
from torch import Tensor

from fairbench.attacks.training import ForwardOrder, clean_logits, inner_attack, per_sample, start_point, trades_loss
from fairbench.method import Batch, FairAT, RunContext, StepOut
from fairbench.registry import register_method


@dataclass(frozen=True)
class TradesConfig:
    beta: float = 6.0
    """Weight of the KL (robustness) term."""
    eps: float = 0.031
    """L-inf training radius; the TRADES/DAFA/TRIX code uses 0.031 (set 8/255 for the CFA/FRL convention)."""
    alpha: float = 0.007
    """Step size of the inner attack (0.007 in the code; 2/255 in the CFA/FRL convention)."""
    steps: int = 10
    """Inner attack steps K."""
    init: Literal["normal", "uniform"] = "normal"
    """Attack start: x + 0.001 N(0,1), unclamped (official) or uniform in the ball."""
    forward_order: ForwardOrder = "adversarial_first"
    """Train-mode forwards of the loss: adversarial batch first (the DAFA/TRIX code, TRADES baseline included)
    or clean first (fairbench before this option). The step's loss and gradients do not depend on it, BatchNorm's
    running statistics (used by the eval-mode attacks of later batches and by evaluation) do."""


@register_method("trades")
class Trades(FairAT):
    description = "TRADES baseline: CE + beta*KL(clean||adv), untargeted KL-PGD adversary"
    Config = TradesConfig
    official_protocol = {"arch": "wrn34_10", "epochs": 76, "lr": 0.1, "momentum": 0.9, "nesterov": False,
                         "weight_decay": 2e-4, "schedule": "trades"}

    def sample_scale(self, y: Tensor) -> Tensor | None:
        """Per-sample class weight scaling CE, radius and step; None = 1 for every sample."""
        return None

    def adversary_targets(self, logits_clean: Tensor, y: Tensor, ctx: RunContext) -> tuple[Tensor | None, Tensor | None]:
        """(targets, targeted-mask) for a mixed adversary; (None, None) = all untargeted."""
        return None, None

    def radius_scale(self, scale: Tensor | None) -> Tensor | None:
        return scale

    def loss_scale(self, scale: Tensor | None) -> Tensor | None:
        return scale

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg = self.config
        scale = self.sample_scale(batch.y)
        radius = self.radius_scale(scale)
        eps = cfg.eps if radius is None else cfg.eps * radius
        start = start_point(batch.x, per_sample(eps, batch.x), cfg.init, ctx.generator)  # noise before targets
        logits_clean = clean_logits(model, batch.x)
        targets, targeted = self.adversary_targets(logits_clean, batch.y, ctx)
        x_adv = inner_attack(
            model, batch.x, logits_clean, eps=eps, alpha=cfg.alpha if radius is None else cfg.alpha * radius,
            steps=cfg.steps, generator=ctx.generator, targets=targets, targeted=targeted, start=start,
        )
        loss, _, logits_adv = trades_loss(model, batch.x, x_adv, batch.y, cfg.beta, self.loss_scale(scale),
                                          order=cfg.forward_order)
        self.after_loss(batch, logits_adv, ctx)
        log = {} if targeted is None else {"targeted": targeted.float().mean()}
        return StepOut(loss=loss, log=log)

    def after_loss(self, batch: Batch, logits_adv: Tensor, ctx: RunContext) -> None:
        """Per-batch bookkeeping on the train-mode adversarial logits (DAFA's warm-up memory)."""
