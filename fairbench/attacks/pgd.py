"""PGD-k and CW-inf as the TRADES/DAFA/TRIX evaluation scripts run them (docs/evaluation.md §3).

Uniform start in the ball (clipped to the box so every queried point is feasible; documented
deviation from the scripts), k steps x <- P(x + alpha sign(grad)), the final iterate decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.attacks.registry import ComponentOutput, EvalAttack, register_attack
from fairbench.attacks.rng import per_sample_uniform


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """P(u) = clip_[0,1](clip_[x-eps, x+eps](u)): the one projection every attack uses."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def input_grad(value: Tensor, x: Tensor, retain_graph: bool = False) -> Tensor:
    """d value / d x, or zeros where `value` does not depend on x differentiably (a non-differentiable
    defence: gradient attacks then stand still, and the evaluation's zero-gradient check reports it)."""
    if not value.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(value, x, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def feasible_bounds(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(lo, hi) with `u.clamp(lo, hi) == project(u, x, eps)` bit for bit (min/max round nothing): one op per
    projection in loops that project thousands of times."""
    return (x - eps).clamp_min(0), (x + eps).clamp_max(1)


def cw_loss(logits: Tensor, y: Tensor, kappa: float = 50.0) -> Tensor:
    """-max(z_y - max_{j != y} z_j + kappa, 0) per sample (the FAT/MAIL-family CW-inf loss)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(true - other + kappa).clamp_min(0)


@dataclass
class PGD(EvalAttack):
    eps: float
    steps: int = 20
    alpha: float = 0.003
    loss: Literal["ce", "cw"] = "ce"
    component: str = "pgd"

    def settings(self) -> dict:
        return {"eps": self.eps, "steps": self.steps, "alpha": self.alpha, "loss": self.loss, "start": "uniform"}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
            active: Tensor) -> Iterator[ComponentOutput]:
        noise = per_sample_uniform(sample_ids, tuple(x.shape[1:]), seed, stream=1).to(x.dtype) * 2 - 1
        x_adv = project(x + self.eps * noise, x, self.eps)
        wrong_any = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv).float()
            wrong_any |= logits.argmax(1) != y
            loss = F.cross_entropy(logits, y, reduction="sum") if self.loss == "ce" else cw_loss(logits, y).sum()
            grad = input_grad(loss, x_adv)
            x_adv = project(x_adv.detach() + self.alpha * grad.sign(), x, self.eps)
        yield ComponentOutput(self.component, x_adv.detach(), wrong_any)


register_attack("pgd20", "PGD-20, step 0.003, CE, uniform start; eps from --eps (8/255)")(
    lambda eps: PGD(eps, steps=20, alpha=0.003))
register_attack("pgd20-trixcode", "PGD-20 with the TRIX/DAFA scripts' eps 0.031 and step 0.003")(
    lambda eps: PGD(0.031, steps=20, alpha=0.003))
register_attack("pgd100", "PGD-100, step 2/255, CE (TRIX authors' response)")(
    lambda eps: PGD(eps, steps=100, alpha=2 / 255))
register_attack("cw20", "CW-inf (kappa 50) with the PGD-20 loop")(
    lambda eps: PGD(eps, steps=20, alpha=0.003, loss="cw", component="cw"))
