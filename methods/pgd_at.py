"""PGD-AT (Madry et al., ICLR 2018): cross-entropy on PGD adversaries, the robust-training baseline.

Paper: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks". Official code: github.com/MadryLab/cifar10_challenge (train.py, pgd_attack.py, config.json).

Constants: eps 8/255, step 2/255, 10 steps, uniform random start, CE ascent. These are the official
config.json (epsilon 8, step_size 2, num_steps 10 on the 0-255 scale, random_start, xent; the paper's
CIFAR-10 model used 7 steps) and also the convention of the fairness papers that report PGD-AT-style
training (CFA, FRL and FAIR-TAT train with 8/255, 2/255, 10 steps; FAIR-TAT's official code is PGD-AT
based), so one default serves both. The TRADES-protocol numbers (0.031, 0.007) are a `--set` away. The
outer loss is the batch-mean CE at x_adv in train mode; there is no clean term.

Deviations from the TensorFlow code, all fairbench conventions:
- The attack runs in eval mode (the official graph attacks in train mode, so its BatchNorm uses batch
  statistics during the attack).
- The uniform start is clamped to [0, 1] before the first gradient (the official start is clipped only
  after the first step).
- No per-image standardisation inside the model, and weight decay applies as the engine's SGD applies it
  (the code decays only conv and FC weights, via 2e-4 * sum ||W||^2 / 2).
`official_protocol`: the code trains the w28-10-derived wide ResNet with 5 units per stage (WRN-34-10 in
the TRADES naming) for 80k iterations at batch 128 (about 205 epochs), lr 0.1 / 0.01 from iteration 40k /
0.001 from 60k, momentum 0.9 without Nesterov, weight decay 2e-4: 200 epochs of the "madry" schedule
(x0.1 after epoch 100, x0.01 after 150).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn
import torch.nn.functional as F

from fairbench.adversaries import inner_attack
from fairbench.method import Batch, FairAT, RunContext, StepOut
from fairbench.registry import register_method


@dataclass(frozen=True)
class PgdAtConfig:
    eps: float = 8 / 255
    """L-inf training radius (official config: 8 on the 0-255 scale)."""
    alpha: float = 2 / 255
    """Sign-step size (official config: 2 on the 0-255 scale)."""
    steps: int = 10
    """Attack steps (official config.json: 10; the paper's CIFAR-10 text: 7)."""
    init: Literal["uniform", "normal"] = "uniform"
    """Start: uniform in the ball, clamped to [0, 1] (official random_start) or TRADES' x + 0.001 N(0,1)."""


@register_method("pgd-at")
class PgdAt(FairAT):
    description = "PGD-AT baseline: cross-entropy on CE-PGD adversaries (uniform start)"
    Config = PgdAtConfig
    official_protocol = {"arch": "wrn34_10", "epochs": 200, "lr": 0.1, "momentum": 0.9, "nesterov": False,
                         "weight_decay": 2e-4, "schedule": "madry"}

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg = self.config
        x_adv = inner_attack(model, batch.x, None, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                             generator=ctx.generator, init=cfg.init, untargeted="ce", labels=batch.y)
        return StepOut(loss=F.cross_entropy(model(x_adv).float(), batch.y))
