"""APGD (Croce & Hein, ICML 2020), L-infinity: the engine of APGD-CE, APGD-DLR and APGD-T.

Follows evaluation.md section 4 and the official code's arithmetic (step-size checkpoints from N, the
momentum with the un-reset previous start, C1 counted with `<=` and its first-window comparison against
an unfilled history slot, C2 with the previous checkpoint's best loss). Each run works on the still-active
samples only; the start noise comes from the counter-based per-sample generator, so a sample's result
does not depend on the batch it is in. `start_noise` injects the reference implementation's draw order
(tests only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.attacks.pgd import project
from fairbench.attacks.registry import ComponentOutput, EvalAttack, register_attack
from fairbench.attacks.rng import per_sample_uniform

Loss = Literal["ce", "dlr", "dlr-targeted"]
NoiseFn = Callable[[Tensor, int], Tensor]
"""(subset images, run index) -> U(-1, 1) noise of the subset's shape."""


def checkpoint_windows(steps: int) -> list[int]:
    """Window lengths: max(floor(0.22N),1), then minus max(floor(0.03N),1) each time, floored at max(floor(0.06N),1)."""
    first, minimum, decrease = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    windows, k, done = [], first, 0
    while done + k <= steps:
        windows.append(k)
        done += k
        k = max(k - decrease, minimum)
    return windows


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12), in the official code's order of operations."""
    z_sorted, idx_sorted = logits.sort(dim=1)
    top_is_y = (idx_sorted[:, -1] == y).float()
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - z_sorted[:, -2] * top_is_y - z_sorted[:, -1] * (1.0 - top_is_y)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12), sorted logits of the current iterate."""
    z_sorted = logits.sort(dim=1)[0]
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12)


def _loss(kind: Loss, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if kind == "dlr":
        return dlr_loss(logits, y)
    return dlr_targeted_loss(logits, y, target)


def _loss_and_grad(model: nn.Module, x_adv: Tensor, y: Tensor, kind: Loss, target: Tensor | None,
                   eot: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample loss, logits (of the last EoT draw) and the mean input gradient."""
    grad = torch.zeros_like(x_adv)
    for _ in range(eot):
        x_req = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_req).float()
            loss = _loss(kind, logits, y, target)
            grad += torch.autograd.grad(loss.sum(), x_req)[0]
    return loss.detach(), logits.detach(), grad / float(eot)


def apgd_run(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, kind: Loss, noise: Tensor,
             target: Tensor | None = None, rho: float = 0.75, eot: int = 1) -> tuple[Tensor, Tensor]:
    """One APGD run on a batch. Returns (still correct after the run, latest misclassified iterate or start)."""
    x_adv = (x + eps * noise / noise.flatten(1).abs().amax(1).reshape(-1, *[1] * (x.dim() - 1))).clamp(0.0, 1.0)
    x_best, x_best_adv = x_adv.clone(), x_adv.clone()
    loss, logits, grad = _loss_and_grad(model, x_adv, y, kind, target, eot)
    grad_best, loss_best = grad.clone(), loss.clone()
    correct = logits.argmax(1) == y
    step = torch.full((len(x),) + (1,) * (x.dim() - 1), 2.0 * eps, dtype=x.dtype, device=x.device)
    history = torch.zeros(steps, len(x), device=x.device)
    windows = checkpoint_windows(steps)
    check_at, reduced_last, best_last = set(), torch.ones(len(x), dtype=torch.bool, device=x.device), loss_best.clone()
    pos = 0
    for w in windows:
        pos += w
        check_at.add(pos - 1)
    window = iter(windows)
    x_prev = x_adv.clone()
    for i in range(steps):
        with torch.no_grad():
            momentum = x_adv - x_prev
            x_prev = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            z = project(x_adv + step * grad.sign(), x, eps)
            x_adv = project(x_adv + (z - x_adv) * a + momentum * (1 - a), x, eps)
        loss, logits, grad = _loss_and_grad(model, x_adv, y, kind, target, eot)
        pred_ok = logits.argmax(1) == y
        correct &= pred_ok
        x_best_adv = torch.where(_b(~pred_ok, x), x_adv, x_best_adv)
        history[i] = loss
        better = loss > loss_best
        x_best = torch.where(_b(better, x), x_adv, x_best)
        grad_best = torch.where(_b(better, x), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        if i in check_at:
            k = next(window)
            idx = torch.arange(i - k + 1, i + 1, device=x.device)
            increases = (history[idx] > history[idx - 1]).sum(0)  # index -1 is the unfilled last slot
            oscillating = increases.float() <= k * rho
            stagnating = ~reduced_last & (best_last >= loss_best)
            reduce = oscillating | stagnating
            reduced_last, best_last = reduce, loss_best.clone()
            step = torch.where(_b(reduce, x), step / 2.0, step)
            x_adv = torch.where(_b(reduce, x), x_best, x_adv)
            grad = torch.where(_b(reduce, x), grad_best, grad)
    return correct, x_best_adv


def _b(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *[1] * (like.dim() - 1))


@dataclass
class APGD(EvalAttack):
    """APGD-CE / APGD-DLR (`restarts` runs) and APGD-T (`n_targets` targets x `restarts` runs)."""

    eps: float
    loss: Loss = "ce"
    steps: int = 100
    restarts: int = 1
    n_targets: int = 9
    rho: float = 0.75
    eot: int = 1
    component: str = "apgd-ce"
    start_noise: NoiseFn | None = field(default=None, repr=False)

    def settings(self) -> dict:
        out = {"eps": self.eps, "loss": self.loss, "steps": self.steps, "restarts": self.restarts,
               "rho": self.rho, "eot": self.eot}
        if self.loss == "dlr-targeted":
            out["n_targets"] = self.n_targets
        return out

    def run(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
            active: Tensor) -> Iterator[ComponentOutput]:
        yield ComponentOutput(self.component, self.perturb(model, x, y, sample_ids, seed, active))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
                active: Tensor) -> Tensor:
        """Adversarial points for the active samples (clean points elsewhere and where the attack failed)."""
        out = x.clone()
        robust = active.clone()
        targets = [None]
        if self.loss == "dlr-targeted":
            with torch.no_grad():
                ranking = model(x).float().sort(dim=1)[1]
            n = min(self.n_targets, ranking.shape[1] - 1)
            targets = [ranking[:, -k] for k in range(2, n + 2)]
        run = 0
        for target in targets:
            for _ in range(self.restarts):
                idx = robust.nonzero().squeeze(1)
                if len(idx):
                    noise = self._noise(x[idx], sample_ids[idx], seed, run)
                    still, x_adv = apgd_run(model, x[idx], y[idx], self.eps, self.steps, self.loss, noise,
                                            None if target is None else target[idx], self.rho, self.eot)
                    broken = idx[~still]
                    out[broken] = x_adv[~still]
                    robust[broken] = False
                run += 1
        return out

    def _noise(self, x: Tensor, ids: Tensor, seed: int, run: int) -> Tensor:
        if self.start_noise is not None:
            return self.start_noise(x, run)
        stream = 1000 + 97 * run + {"ce": 1, "dlr": 2, "dlr-targeted": 3}[self.loss]
        return per_sample_uniform(ids, tuple(x.shape[1:]), seed, stream).to(x.dtype) * 2 - 1


register_attack("apgd-ce", "APGD with CE loss, 100 iterations, 1 restart (AutoAttack standard)")(
    lambda eps: APGD(eps, "ce", component="apgd-ce"))
register_attack("apgd-dlr", "APGD with DLR loss, 100 iterations, 1 restart")(
    lambda eps: APGD(eps, "dlr", component="apgd-dlr"))
register_attack("apgd-t", "APGD-T: targeted DLR, 9 targets x 1 restart, 100 iterations (AutoAttack standard)")(
    lambda eps: APGD(eps, "dlr-targeted", component="apgd-t"))
