"""A3, Adaptive Auto Attack (Liu et al., CVPR 2022), L-infinity. EXPERIMENTAL, never a default.

Written from the official script (docs/evaluation.md §8; there is no installable reference to validate
against). Each restart is a margin-loss PGD with per-sample early stop, preceded by an ADI phase: full-eps
sign steps that ascend w . f(x) for a logit-space direction w. Round 1 draws w uniformly and records which
directions led to successes; later rounds bias w by those statistics (true-class weight, and +-0.8 C/10 on a
target cycling through the top wrong classes of a pre-pass at a random corner of the eps-ball). OSD: before
each restart only the still-robust samples with the largest margin loss seen so far are attacked (a shrinking
fraction alpha), which saves most of the cost. The 13-round schedule is the official code's, in the "discard"
regime when the ADI phases broke few samples, else in the "bias" regime.

What A3 gives up (docs/evaluation.md §8): no black-box component (Square's masking check is lost), and OSD
drops exactly the hardest samples, which cluster in the strong classes, so report it next to `aa` and read
the union "AA u A3". OSD and the regime decision rank the samples of one chunk, so the records depend on
the evaluation batch size (for a given batch size they are reproducible: every random number comes from
the sample's own stream), and A3 is never split into CPU shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from fairbench.attacks.pgd import feasible_bounds, input_grad
from fairbench.attacks.registry import ComponentOutput, EvalAttack, register_attack
from fairbench.attacks.rng import per_sample_uniform
from fairbench.attacks.search import confirmed_misclassified
from fairbench.attacks.square import margin


@dataclass(frozen=True)
class Round:
    alpha: float
    """Fraction of the still-robust samples attacked (OSD), floored at ALPHA_MIN."""
    max_iter: int
    k_adi: int
    restarts: int

    @property
    def k_pgd(self) -> int:
        return self.max_iter + self.k_adi  # the official code's PGD length


OPENING = (Round(1, 8, 0, 1), Round(1, 8, 7, 1), Round(1, 8, 7, 1))  # round 1 collects the ADI statistics
DISCARD = tuple(Round(a, m, 7, r) for a, m, r in zip(
    (0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.065, 0.03), (25, 30, 30, 35, 40, 45, 50, 50, 55, 60),
    (1, 1, 1, 1, 1, 1, 1, 4, 4, 50)))
BIAS = tuple(Round(a, m, k, r) for a, m, k, r in zip(
    (1, 1, 1, 1, 1, 1, 1, 0.8, 0.5, 0.5), (5, 5, 10, 10, 15, 18, 20, 25, 35, 45),
    (10, 15, 15, 10, 10, 10, 10, 10, 10, 10), (10, 1, 1, 1, 1, 1, 1, 5, 5, 20)))
ALPHA_MIN = 0.03
FINAL_ROUNDS = 10  # rounds from here on use the final true-class range and, for 10 classes, 4 targets
DISCARD_BELOW = 0.05  # ADI successes below this fraction of the round-0 survivors: the discard regime
FEW_ROBUST = 0.1  # below this fraction of the chunk still robust: attack all, 10 extra restarts


def cosine_step(s: int, k_pgd: int, eps: float) -> float:
    """PGD step s of k_pgd: cosine annealing from eps to eta_min (0.1 eps for short phases, else 0.001 eps)."""
    eta_min = (0.1 if k_pgd <= 10 else 0.001) * eps
    return eta_min + (eps - eta_min) * (1 + math.cos(math.pi * s / (k_pgd + 1))) / 2


def n_targets(num_classes: int, final: bool) -> int:
    """Top wrong classes the biased direction cycles through (CIFAR-10 9, final rounds 4; CIFAR-100 14; more 20)."""
    if num_classes <= 10:
        return min(4 if final else 9, num_classes - 1)
    return 14 if num_classes <= 100 else 20


def osd_select(live: Tensor, best_loss: Tensor, alpha: float, min_attacked: int) -> Tensor:
    """Indices of the live samples OSD attacks: the max(min_attacked, floor(alpha n_live)) with the largest
    margin loss seen so far (ties: lower index first)."""
    idx = live.nonzero().squeeze(1)
    keep = max(min_attacked, int(math.floor(alpha * len(idx))))
    if keep >= len(idx):
        return idx
    order = torch.sort(-best_loss[idx], stable=True).indices  # descending loss, ascending index among ties
    return idx[order[:keep]].sort().values


@dataclass
class A3(EvalAttack):
    eps: float
    component: str = "a3"
    min_attacked: int = 100
    """OSD never attacks fewer samples than this in a restart (the official value)."""
    shardable: ClassVar[bool] = False

    def settings(self) -> dict:
        return {"eps": self.eps, "experimental": True, "rounds": 13, "min_attacked": self.min_attacked,
                "schedule": "Liu et al. 2022 official code (docs/evaluation.md §8)"}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
            active: Tensor) -> Iterator[ComponentOutput]:
        yield ComponentOutput(self.component, self.perturb(model, x, y, sample_ids, seed, active))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
                active: Tensor) -> Tensor:
        """Adversarial points for the broken active samples, x elsewhere."""
        out, robust = x.clone(), active.clone()
        if not bool(robust.any()):
            return out
        best_loss = torch.full((len(x),), -math.inf, device=x.device)
        ranking = self._corner_ranking(model, x, y, sample_ids, seed)
        num_classes = ranking.shape[1] + 1
        stats = torch.zeros(2, device=x.device)  # summed w of the true class and of the class pushed into
        survivors0 = adi_broken = 0
        restart_no = 0
        for r in range(len(OPENING) + len(BIAS)):
            if r < len(OPENING):
                rnd = OPENING[r]
            else:
                discard = adi_broken < DISCARD_BELOW * survivors0  # re-tested every round
                rnd = (DISCARD if discard else BIAS)[r - len(OPENING)]
            alpha, restarts = max(rnd.alpha, ALPHA_MIN), rnd.restarts
            if int(robust.sum()) < FEW_ROBUST * len(x):
                alpha, restarts = 1.0, restarts + 10
            for _ in range(restarts):
                if not bool(robust.any()):
                    return out
                idx = osd_select(robust, best_loss, alpha, self.min_attacked)
                w = self._direction(r, restart_no, idx, y, ranking, stats, num_classes, sample_ids, seed)
                found, points, loss, in_adi, pred = self._restart(model, x[idx], y[idx], w, rnd, sample_ids[idx],
                                                                  seed, restart_no)
                restart_no += 1
                best_loss[idx] = torch.maximum(best_loss[idx], loss)
                broken = idx[found]
                out[broken] = points[found]
                robust[broken] = False
                adi_broken += int(in_adi.sum())
                if r == 1 and w is not None and bool(found.any()):  # the statistics of the unbiased round
                    stats[0] += w[found].gather(1, y[broken][:, None]).sum()
                    stats[1] += w[found].gather(1, pred[found][:, None]).sum()
            if r == 0:
                survivors0 = int(robust.sum())
        return out

    def _corner_ranking(self, model: nn.Module, x: Tensor, y: Tensor, ids: Tensor, seed: int) -> Tensor:
        """Wrong classes by decreasing logit at x + eps * (random sign), the pre-pass ADI takes targets from."""
        u = per_sample_uniform(ids, tuple(x.shape[1:]), seed, stream=9000).to(x.dtype)
        with torch.no_grad():
            logits = model((x + self.eps * torch.where(u < 0.5, -1.0, 1.0)).clamp(0, 1)).float()
        ranked = logits.scatter(1, y[:, None], -math.inf).argsort(dim=1, descending=True, stable=True)
        return ranked[:, :-1]  # y (at -inf) is last

    def _direction(self, r: int, restart_no: int, idx: Tensor, y: Tensor, ranking: Tensor, stats: Tensor,
                   num_classes: int, ids: Tensor, seed: int) -> Tensor | None:
        """ADI's logit-space direction w (len(idx), C), or None in round 0 (no ADI phase)."""
        if r == 0:
            return None
        u = per_sample_uniform(ids[idx], (num_classes + 1,), seed, stream=9100 + restart_no)
        w = u[:, :num_classes] * 2 - 1
        if r == 1:
            return w
        scale, final = num_classes / 10, r >= FINAL_ROUNDS
        t = ranking[idx, restart_no % n_targets(num_classes, final)]
        if num_classes >= 100 or final:
            low, high = (-0.8, 0.1) if final and num_classes < 100 else (-0.5, 0.1)
        else:
            low, high = (-0.1, 0.5) if stats[0] >= 0 else (-0.5, 0.1)
        true_weight = scale * (low + (high - low) * u[:, num_classes])
        target_weight = 0.8 * scale * (1.0 if num_classes >= 100 or stats[1] >= 0 else -1.0)
        w = w.scatter(1, y[idx][:, None], true_weight[:, None])
        return w.scatter(1, t[:, None], target_weight)

    def _restart(self, model: nn.Module, x0: Tensor, y: Tensor, w: Tensor | None, rnd: Round, ids: Tensor,
                 seed: int, restart_no: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One restart on the given samples: (broken, their points, largest margin loss seen, broken during
        the ADI phase, predicted class of the broken point)."""
        n = len(x0)
        lo, hi = feasible_bounds(x0, self.eps)
        u = per_sample_uniform(ids, tuple(x0.shape[1:]), seed, stream=9300 + restart_no).to(x0.dtype)
        x_adv = (x0 + self.eps * (2 * u - 1)).clamp(lo, hi)
        found = torch.zeros(n, dtype=torch.bool, device=x0.device)
        in_adi = torch.zeros_like(found)
        pred = torch.zeros(n, dtype=torch.long, device=x0.device)
        points, loss_max = x0.clone(), torch.full((n,), -math.inf, device=x0.device)
        live = torch.arange(n, device=x0.device)
        k_adi = rnd.k_adi if w is not None else 0
        for s in range(k_adi + rnd.k_pgd + 1):
            xr = x_adv[live].clone().requires_grad_(True)
            logits = model(xr).float()
            loss = -margin(logits, y[live])
            loss_max[live] = torch.maximum(loss_max[live], loss.detach())
            wrong = confirmed_misclassified(model, xr.detach(), y[live], loss.detach() > 0)
            keep = ~wrong
            if bool(wrong.any()):  # the sample leaves the batch at its first misclassified iterate
                done = live[wrong]
                found[done], in_adi[done] = True, 0 < s <= k_adi
                points[done], pred[done] = xr.detach()[wrong], logits.detach()[wrong].argmax(1)
                live, logits, loss = live[keep], logits[keep], loss[keep]
            if not len(live) or s == k_adi + rnd.k_pgd:
                break
            adi = s < k_adi
            objective = (w[live] * logits).sum() if adi else loss.sum()
            grad = input_grad(objective, xr)[keep]
            step = self.eps if adi else cosine_step(s - k_adi, rnd.k_pgd, self.eps)
            x_adv[live] = (x_adv[live] + step * grad.sign()).clamp(lo[live], hi[live])
        return found, points, loss_max, in_adi, pred


register_attack("a3", "EXPERIMENTAL A3 (Liu et al. 2022): margin PGD with adaptive direction initialisation and "
                      "online discarding, 13 rounds; no black-box check, never a default; read with aa")(
    lambda eps: A3(eps))
