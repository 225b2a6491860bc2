"""Training-time adversaries: TRADES-KL PGD generalised to per-sample radius, step and objective.

TRADES, DAFA, TRIX (and the baselines built on TRADES) are a few lines each on top of `inner_attack`
and `trades_loss`; BAT's early-stopped searches are `early_stopped_search`. Logits are cast to fp32
before every softmax so bf16 autocast is safe.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Init = Literal["normal", "uniform"]
ForwardOrder = Literal["adversarial_first", "clean_first"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """BatchNorm uses running statistics and does not update them while attacking. Afterwards every module
    gets its own mode back (`model.train(flag)` would impose the top module's flag on shared submodules)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


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
    """TRADES-KL PGD (docs/methods/trades.md §2.1) with per-sample eps/alpha and an optional targeted subset.

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


class StoppedPoints(NamedTuple):
    """BAT's two near-boundary points of one early-stopped trajectory (docs/methods/bat.md §2.1)."""

    last_clean: Tensor
    """x^(max(k*-1, 0)) for the first misclassified check k*, else x^(K)."""
    first_adv: Tensor
    """The iterate at which the FAT counter stopped the sample, else x^(K)."""
    last_clean_step: Tensor
    """(B,) int64: the iterate index of `last_clean` (sign steps taken from the start)."""
    first_adv_step: Tensor
    """(B,) int64: the iterate index of `first_adv`."""


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A (B,) bool mask shaped to broadcast over the image dimensions of `like`."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def early_stopped_search(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    logits_clean: Tensor,
    *,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    generator: torch.Generator | None,
    tau: int = 1,
    init: Init = "normal",
    start: Tensor | None = None,
) -> StoppedPoints:
    """TRADES-KL PGD with BAT's per-sample early stops, vectorised with active masks (docs/methods/bat.md §2.1).

    The start is clamped to [0, 1] (unlike TRADES). Before each step k = 0..K-1 the current iterate is
    checked (eval mode, argmax == y; x^(K) is never checked):
    - last clean: the last iterate before the first misclassified check (the start if that is k = 0);
    - first adversarial: FAT counter c = tau; a misclassified check with c = 0 stops the sample at the
      current iterate, with c > 0 it decrements c (never reset) and the sample steps on.
    A stopped sample keeps its point and takes no further steps; samples never stopped end at x^(K).
    Both points come from one trajectory: the last-clean point precedes the first-adversarial stop, so the
    trajectory up to it is that of a last-clean-only search (BAT runs two with independent starts). Every
    step forwards the whole batch (an early exit would need a host sync); in eval mode samples do not
    interact, so the masked steps equal the official code's shrinking batch. Any image size.
    """
    eps_b, alpha_b = per_sample(eps, x), per_sample(alpha, x)
    lower, upper = x - eps_b, x + eps_b
    x_k = (start if start is not None else start_point(x, eps_b, init, generator).clamp(0, 1)).detach()
    last_clean, last_clean_step = x_k, torch.zeros_like(y)
    clean_so_far = torch.ones_like(y, dtype=torch.bool)
    moving, counter = torch.ones_like(y, dtype=torch.bool), torch.full_like(y, tau)
    first_adv_step = torch.zeros_like(y)
    with eval_mode(model):
        for k in range(steps):
            x_k.requires_grad_(True)
            logits = model(x_k).float()
            wrong = logits.argmax(1) != y
            clean_so_far = clean_so_far & ~wrong
            last_clean = torch.where(_rows(clean_so_far, x), x_k.detach(), last_clean)
            last_clean_step = torch.where(clean_so_far, k, last_clean_step)
            stop = moving & wrong & (counter == 0)
            counter = counter - (moving & wrong & (counter > 0)).long()
            moving = moving & ~stop
            (grad,) = torch.autograd.grad(kl_per_sample(logits_clean, logits).sum(), x_k)
            stepped = torch.min(torch.max(x_k.detach() + alpha_b * grad.sign(), lower), upper).clamp(0, 1)
            x_k = torch.where(_rows(moving, x), stepped, x_k.detach())
            first_adv_step = first_adv_step + moving.long()
    last_clean = torch.where(_rows(clean_so_far, x), x_k, last_clean)  # never misclassified at a check: x^(K)
    last_clean_step = torch.where(clean_so_far, steps, last_clean_step)
    return StoppedPoints(last_clean.detach(), x_k.detach(), last_clean_step, first_adv_step)


def train_forwards(model: nn.Module, x: Tensor, x_adv: Tensor, order: ForwardOrder) -> tuple[Tensor, Tensor]:
    """(clean, adversarial) train-mode logits in fp32 from two separate forwards, run in `order`.

    Each forward normalises with its own batch statistics, so the logits, the loss and its gradients do not
    depend on the order (without dropout); BatchNorm's running statistics do, as every train-mode forward
    updates them.
    The DAFA and TRIX code (and their TRADES baseline) forward the adversarial batch first; the CFA, FRL and
    WAT code the clean batch.
    """
    if order == "adversarial_first":
        logits_adv = model(x_adv).float()
        return model(x).float(), logits_adv
    logits = model(x).float()
    return logits, model(x_adv).float()


def trades_loss(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    beta: float,
    ce_weights: Tensor | None = None,
    order: ForwardOrder = "clean_first",
) -> tuple[Tensor, Tensor, Tensor]:
    """(1/B) sum_i w_i CE(f(x_i), y_i) + beta (1/B) sum_i KL(p(x_i) || p(x_adv_i)), in train mode.

    Two separate forwards (`train_forwards`), so each gets its own BatchNorm batch statistics; the clean
    softmax is not detached. `order` defaults to clean first, the order this function always had, so
    callers that do not pass it (plugins) keep their results. Returns (loss, clean logits, adversarial logits).
    """
    logits, logits_adv = train_forwards(model, x, x_adv, order)
    ce = F.cross_entropy(logits, y, reduction="none")
    if ce_weights is not None:
        ce = ce * ce_weights
    batch = x.shape[0]
    loss = ce.sum() / batch + beta * kl_per_sample(logits, logits_adv).sum() / batch
    return loss, logits, logits_adv
