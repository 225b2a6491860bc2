"""BAT (Sun et al., AAAI 2023): early-stopped near-boundary adversaries plus a uniform-prediction constraint.

Paper: Sun, Xu, Yao, Liang, Wu, Liang, Liu, Liu, "Improving Robust Fairness via Balance Adversarial
Training" (arXiv 2209.07534). Official code:
github.com/silvercherry/Improving-Robust-Fairness-via-Balance-Adversarial-Training (train.py BAT_loss,
train_mode/stop_to_lastclean.py, train_mode/stop_to_firstadv.py). Documentation: docs/methods/bat.md.

Two TRADES-KL searches with early stops, each from its own clamped 0.001-normal start: the "last clean"
point (last iterate still classified correctly) carries the CE term, the "first adversarial" point (FAT
counter tau = 1: one step past the first misclassification) the TRADES KL term; KL(p || uniform) on both
pushes their predictions toward the uniform distribution. No per-class state.

Quirks kept or documented:
- The official functions return the samples regrouped by stopping time (first-adv also shuffled); here
  the batch order is kept and stops are masks. The loss is order-invariant.
- The official code hard-codes 32x32x3 when it regroups; any image shape works here.
- The two searches run as one vectorised loop over the stacked 2B batch (independent starts, the
  last-clean start drawn first); eval mode makes that equal to two separate searches.
- KL to uniform is over all C classes, as in the code. The paper may restrict the constraint to the
  non-true classes; that is unverified (only the abstract was readable), so no option is offered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.adversaries import (
    StoppedPoints,
    clean_logits,
    early_stopped_search,
    kl_per_sample,
    per_sample,
    start_point,
)
from fairbench.method import Batch, FairAT, RunContext, StepOut
from fairbench.registry import register_method


@dataclass(frozen=True)
class BatConfig:
    beta: float = 6.0
    """Weight of KL(clean || first-adversarial)."""
    eps: float = 0.031
    """L-inf training radius of both searches (official 0.031)."""
    alpha: float = 0.007
    """Sign-step size of both searches."""
    steps: int = 10
    """Maximum steps K of each search; x^(K) is returned, never checked, by samples that never stop."""
    tau: int = 1
    """FAT counter of the first-adversarial search: misclassified checks tolerated before the stop."""
    uniform_weight: float = 1.0
    """Weight of each KL(p || uniform) term (hard-coded 1 in the official code)."""
    init: Literal["normal", "uniform"] = "normal"
    """Search starts: x + 0.001 N(0,1) (official) or uniform in the ball; both clamped to [0, 1]."""


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(softmax(logits) || uniform) per sample = log C - H(p), as the code's KL to constant logits."""
    return kl_per_sample(logits, torch.zeros_like(logits))


def bat_loss(model: nn.Module, x: Tensor, x_lc: Tensor, x_fa: Tensor, y: Tensor, beta: float,
             uniform_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """CE(f(x_lc), y) + beta KL(p(x) || p(x_fa)) + w [KL(p(x_lc) || u) + KL(p(x_fa) || u)], means over B.

    Three separate train-mode forwards in the official order (last clean, first adversarial, clean), so each
    gets its own BatchNorm statistics and the running buffers are updated as in the code. No softmax is
    detached. Returns the loss and its three terms (detached) for the progress line.
    """
    logits_lc = model(x_lc).float()
    logits_fa = model(x_fa).float()
    logits = model(x).float()
    batch = x.shape[0]
    ce = F.cross_entropy(logits_lc, y, reduction="sum") / batch
    robust = kl_per_sample(logits, logits_fa).sum() / batch
    uniform = (kl_to_uniform(logits_lc) + kl_to_uniform(logits_fa)).sum() / batch
    loss = ce + beta * robust + uniform_weight * uniform
    return loss, {"ce_lc": ce.detach(), "kl_fa": robust.detach(), "kl_uniform": uniform.detach()}


@register_method("bat")
class Bat(FairAT):
    description = "BAT: CE at the last-clean point, TRADES KL at the first-adversarial point, entropy terms"
    Config = BatConfig
    official_protocol = {"arch": "resnet18", "epochs": 200, "lr": 0.1, "momentum": 0.9, "nesterov": False,
                         "weight_decay": 2e-4, "schedule": "trades"}

    def adversaries(self, model: nn.Module, x: Tensor, y: Tensor,
                    ctx: RunContext) -> tuple[StoppedPoints, StoppedPoints]:
        """(last-clean search, first-adversarial search), each from its own start; only `.last_clean` of the
        first and `.first_adv` of the second are used."""
        cfg = self.config
        eps = per_sample(cfg.eps, x)
        starts = [start_point(x, eps, cfg.init, ctx.generator).clamp(0, 1) for _ in range(2)]
        logits = clean_logits(model, x)
        both = early_stopped_search(model, torch.cat([x, x]), torch.cat([y, y]), torch.cat([logits, logits]),
                                    eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, generator=None,
                                    tau=cfg.tau, start=torch.cat(starts))
        halves = [t.chunk(2) for t in both]
        return StoppedPoints(*(h[0] for h in halves)), StoppedPoints(*(h[1] for h in halves))

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        lc_search, fa_search = self.adversaries(model, batch.x, batch.y, ctx)
        loss, log = bat_loss(model, batch.x, lc_search.last_clean, fa_search.first_adv, batch.y,
                             self.config.beta, self.config.uniform_weight)
        log["lc_step"] = lc_search.last_clean_step.float().mean()
        log["fa_step"] = fa_search.first_adv_step.float().mean()
        return StepOut(loss=loss, log=log)
