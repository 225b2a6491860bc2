"""Square Attack (Andriushchenko et al., ECCV 2020), L-infinity, margin loss: AutoAttack's black-box member.

evaluation.md section 6: vertical-stripe start, p-schedule without rescaling (AutoAttack's
`resc_schedule=False`), one square window per query, accepted when the margin strictly decreases or the
sample is misclassified; a sample stops at its first success. fairbench draws each sample's window and
signs from its own counter-based stream (independent of batch composition; statistically the same as the
reference, which shares one window per batch). `reference_rng=True` reproduces the reference's shared
draws from the global torch RNG (tests only). As in the reference, the window's top-left corner is drawn
from {0, ..., H-s-1}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from fairbench.attacks.pgd import project
from fairbench.attacks.registry import ComponentOutput, EvalAttack, register_attack
from fairbench.attacks.rng import per_sample_uniform


def p_schedule(i: int, p_init: float, n_queries: int, rescale: bool) -> float:
    """Fraction of pixels changed at query i (i counted after the start query)."""
    if rescale:
        i = int(i / n_queries * 10000)
    for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                           (6000, 128), (8000, 256)):
        if i <= bound:
            return p_init / divisor
    return p_init / 512


def margin(logits: Tensor, y: Tensor) -> Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    return true - logits.scatter(1, y[:, None], float("-inf")).amax(1)


def _sign(u: Tensor) -> Tensor:
    return torch.where(u < 0.5, -1.0, 1.0).to(u.dtype)


@dataclass
class Square(EvalAttack):
    eps: float
    n_queries: int = 5000
    p_init: float = 0.8
    rescale_schedule: bool = False
    component: str = "square"
    reference_rng: bool = False

    def settings(self) -> dict:
        return {"eps": self.eps, "n_queries": self.n_queries, "p_init": self.p_init,
                "rescale_schedule": self.rescale_schedule, "loss": "margin", "restarts": 1}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
            active: Tensor) -> Iterator[ComponentOutput]:
        adv, queries = self.perturb(model, x, y, sample_ids, seed, active)
        yield ComponentOutput(self.component, adv, queries=queries)

    @torch.no_grad()
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
                active: Tensor) -> tuple[Tensor, Tensor]:
        """(points: the successful ones for broken samples, clean elsewhere; queries used per sample)."""
        out, queries = x.clone(), torch.zeros(len(x), dtype=torch.int32, device=x.device)
        idx = active.nonzero().squeeze(1)
        if not len(idx):
            return out, queries
        xs, ys, ids = x[idx], y[idx], sample_ids[idx]
        c, h, w = xs.shape[1:]
        x_best = (xs + self.eps * self._stripes(ids, (c, 1, w), seed)).clamp(0.0, 1.0)
        margin_min = margin(model(x_best).float(), ys)
        loss_min = margin_min.clone()
        used = torch.ones(len(xs), dtype=torch.int32, device=x.device)
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        for i in range(self.n_queries):
            todo = (margin_min > 0).nonzero().squeeze(1)
            if not len(todo):
                break
            p = p_schedule(i, self.p_init, self.n_queries, self.rescale_schedule)
            s = min(max(int(round(math.sqrt(p * (c * h * w) / c))), 1), h, w)  # the reference's arithmetic
            vh, vw, signs = self._window(ids[todo], s, h, w, c, seed, i)
            inside = (((rows >= vh[:, None]) & (rows < vh[:, None] + s))[:, :, None]
                      & ((cols >= vw[:, None]) & (cols < vw[:, None] + s))[:, None, :])[:, None]
            delta = torch.where(inside, 2.0 * self.eps * signs[:, :, None, None], torch.zeros((), device=x.device))
            x_new = project(x_best[todo] + delta, xs[todo], self.eps)
            m = margin(model(x_new).float(), ys[todo])
            improved = m < loss_min[todo]
            loss_min[todo] = torch.where(improved, m, loss_min[todo])
            accept = improved | (m <= 0.0)
            margin_min[todo] = torch.where(accept, m, margin_min[todo])
            x_best[todo] = torch.where(accept[:, None, None, None], x_new, x_best[todo])
            used[todo] += 1
        success = margin_min <= 0
        out[idx] = torch.where(success[:, None, None, None], x_best, xs)
        queries[idx] = used
        return out, queries

    def _stripes(self, ids: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
        if self.reference_rng:
            return torch.sign(2 * torch.rand((len(ids), *shape)) - 1).to(ids.device)
        return _sign(per_sample_uniform(ids, shape, seed, stream=7001))

    def _window(self, ids: Tensor, s: int, h: int, w: int, c: int, seed: int, i: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        n = len(ids)
        if self.reference_rng:  # one window and one sign per channel for the whole batch
            vh = (0 + (h - s) * torch.rand([1])).long().to(ids.device).expand(n)
            vw = (0 + (w - s) * torch.rand([1])).long().to(ids.device).expand(n)
            signs = torch.sign(2 * torch.rand([c, 1, 1]) - 1).reshape(1, c).to(ids.device).expand(n, c)
            return vh, vw, signs
        u = per_sample_uniform(ids, (2 + c,), seed, stream=7002 + i)
        return ((h - s) * u[:, 0]).long(), ((w - s) * u[:, 1]).long(), _sign(u[:, 2:])


register_attack("square", "Square Attack, 5000 queries, p_init 0.8, no schedule rescaling (AutoAttack standard)")(
    lambda eps: Square(eps))
