"""TRADES (Zhang et al., ICML 2019): clean CE + beta * KL(clean || adversarial), KL-ascent inner attack.

Paper: "Theoretically Principled Trade-off between Robustness and Accuracy".
Official code: github.com/yaodongyu/TRADES (trades.py). Baseline protocol as in rucy74/DAFA and
Fairness-a11y/TRIX (scripts/trades.sh). No per-class state.

The loss forwards the adversarial batch before the clean one in train mode, as the DAFA and TRIX code (their
TRADES baseline included) does, so BatchNorm's running statistics match theirs; the TRADES code forwards
clean, adversarial, clean. `forward_order="clean_first"` gives the order fairbench used before.
"""
from __future__ import annotations

import torch.nn as nn

from fairbench.adversaries import clean_logits, inner_attack, per_sample, start_point, trades_loss
from fairbench.method import Batch, FairAT, RunContext, StepOut
from fairbench.registry import register_method
from fairbench.trades_family import TradesConfig


@register_method("trades")
class Trades(FairAT):
    description = "TRADES baseline: CE + beta*KL(clean||adv), untargeted KL-PGD adversary"
    Config = TradesConfig
    official_protocol = {"arch": "wrn34_10", "epochs": 76, "lr": 0.1, "momentum": 0.9, "nesterov": False,
                         "weight_decay": 2e-4, "schedule": "trades"}

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg, x, y = self.config, batch.x, batch.y
        start = start_point(x, per_sample(cfg.eps, x), cfg.init, ctx.generator)
        logits_clean = clean_logits(model, x)  # eval mode: the KL target of the attack
        x_adv = inner_attack(model, x, logits_clean, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                             generator=ctx.generator, start=start)
        loss, _, _ = trades_loss(model, x, x_adv, y, cfg.beta, order=cfg.forward_order)
        return StepOut(loss)
