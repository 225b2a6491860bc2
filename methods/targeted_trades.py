"""TARGETED TRADES: TRADES with every sample attacked toward a uniformly drawn wrong class.

The all-targeted baseline of Figure 4 (and Figure 5) of Medi, Jung, Keuper, "TRIX: Trading Adversarial
Fairness via Mixed Adversarial Training" (arXiv 2507.07768): "the TRADES objective using targeted
perturbations", compared class by class with TRADES (all untargeted) and TRIX (mixed). The official TRIX
code (github.com/Fairness-a11y/TRIX) has no all-targeted mode, so this is TRIX's targeted branch
(losses.py mixed_trades_loss) applied to every sample, with no DAFA weights:
- inner attack: CE descent toward t_i, t_i uniform over the C-1 wrong classes, fixed for the K steps;
  start x + 0.001 N(0,1) unclamped, the noise drawn before the targets, as TRIX does;
- outer loss: the TRADES loss, CE(f(x)) + beta KL(p(x) || p(x_adv)), unchanged.
`official_protocol` is TRIX's (the figure compares against TRIX runs). Cost note: the step still takes the
eval-mode clean forward of the TRADES family (the KL target), which the all-targeted attack does not use.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fairbench.adversaries import clean_logits, inner_attack, per_sample, start_point, trades_loss
from fairbench.classweights import random_wrong_targets
from fairbench.method import Batch, FairAT, RunContext, StepOut
from fairbench.registry import register_method
from fairbench.trades_family import TradesConfig


@register_method("targeted-trades")
class TargetedTrades(FairAT):
    description = "TRIX Fig. 4 baseline: TRADES with all samples targeted toward a random wrong class"
    Config = TradesConfig
    official_protocol = {"arch": "resnet18", "epochs": 150, "lr": 0.1, "momentum": 0.9, "nesterov": True,
                         "weight_decay": 5e-4, "schedule": "bag_of_tricks"}

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg, x, y = self.config, batch.x, batch.y
        start = start_point(x, per_sample(cfg.eps, x), cfg.init, ctx.generator)  # noise before targets, as TRIX
        logits_clean = clean_logits(model, x)
        targets = random_wrong_targets(y, ctx.num_classes, ctx.generator)
        targeted = torch.ones_like(y, dtype=torch.bool)  # every sample
        x_adv = inner_attack(model, x, logits_clean, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                             generator=ctx.generator, targets=targets, targeted=targeted, start=start)
        loss, _, _ = trades_loss(model, x, x_adv, y, cfg.beta, order=cfg.forward_order)
        return StepOut(loss=loss, log={"targeted": targeted.float().mean()})
