"""Training-time adversaries: TRADES-KL PGD generalised to per-sample radius, step and objective.

TRADES, DAFA, TRIX (and the baselines built on TRADES) are a few lines each on top of `inner_attack`
and `trades_loss`. Logits are cast to fp32 before every softmax so bf16 autocast is safe.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Init = Literal["normal", "uniform"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """BatchNorm uses running statistics and does not update them while attacking."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """A scalar or a (B,) tensor, shaped to broadcast over the image dimensions of `like`."""
    if not torch.is_tensor(value):
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    return value.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def kl_per_sample(logits_target: Tensor, logits: Tensor) -> Tensor:
    """KL( softmax(logits_target) || softmax(logits) ) per sample, summed over classes, in fp32."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(logits_target.float(), dim=1),
                    reduction="none", log_target=True).sum(dim=1)


def start_point(x: Tensor, eps: Tensor, init: Init, generator: torch.Generator | None) -> Tensor:
    """'normal': x + 0.001 N(0, 1), not clamped (TRADES code); 'uniform': uniform in the ball, clamped."""
    if init == "normal":
        return x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    return (x + eps * noise).clamp(0, 1)


@torch.no_grad()
def clean_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode logits without gradient: the KL target of the attack (and TRIX's split statistics)."""
    with eval_mode(model):
        return model(x).float()


def inner_attack(
    model: nn.Module,
    x: Tensor,
    logits_clean: Tensor,
    *,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    generator: torch.Generator | None,
    targets: Tensor | None = None,
    targeted: Tensor | None = None,
    init: Init = "normal",
    start: Tensor | None = None,
    untargeted: Literal["kl", "ce"] = "kl",
    labels: Tensor | None = None,
) -> Tensor:
    """TRADES-KL PGD (trades.md 2.1) with per-sample eps/alpha and an optional targeted subset.

    Untargeted samples ascend KL(p_clean || p(x')) (or CE(f(x'), labels) with ``untargeted="ce"``, the
    PGD-AT adversary; `logits_clean` is then unused and may be None); samples with ``targeted[i]`` descend
    CE(f(x'), targets[i]). Each step: sign step, projection onto [x - eps_i, x + eps_i]
    (max first, then min, as the DAFA code), clamp to [0, 1]. Gradients are taken w.r.t. the input
    only, in eval mode; the returned point is detached. `start` overrides the drawn start point (the
    caller then controls the order of random draws: TRIX draws the noise before the targets).
    """
    eps_b, alpha_b = per_sample(eps, x), per_sample(alpha, x)
    lower, upper = x - eps_b, x + eps_b
    flip = None if targeted is None else per_sample(targeted, x).bool()
    with eval_mode(model):
        x_adv = (start if start is not None else start_point(x, eps_b, init, generator)).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv).float()
            if untargeted == "ce":
                objective = F.cross_entropy(logits, labels, reduction="none")
            else:
                objective = kl_per_sample(logits_clean, logits)
            if targeted is not None:
                ce_target = F.cross_entropy(logits, targets, reduction="none")
                objective = torch.where(targeted, ce_target, objective)
            (grad,) = torch.autograd.grad(objective.sum(), x_adv)
            direction = grad.sign()
            if flip is not None:
                direction = torch.where(flip, -direction, direction)
            x_adv = x_adv.detach() + alpha_b * direction
            x_adv = torch.min(torch.max(x_adv, lower), upper).clamp(0, 1)
    return x_adv.detach()


def trades_loss(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    beta: float,
    ce_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(1/B) sum_i w_i CE(f(x_i), y_i) + beta (1/B) sum_i KL(p(x_i) || p(x_adv_i)), in train mode.

    Two separate forwards (clean first), so each gets its own BatchNorm batch statistics; the clean
    softmax is not detached. Returns (loss, clean logits, adversarial logits).
    """
    logits = model(x).float()
    logits_adv = model(x_adv).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    if ce_weights is not None:
        ce = ce * ce_weights
    batch = x.shape[0]
    loss = ce.sum() / batch + beta * kl_per_sample(logits, logits_adv).sum() / batch
    return loss, logits, logits_adv
