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

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from fairbench.attacks.pgd import feasible_bounds
from fairbench.attacks.registry import ComponentOutput, EvalAttack, register_attack
from fairbench.attacks.rng import per_sample_uniform
from fairbench.attacks.search import confirmed_misclassified


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
    """z_y - max_{j != y} z_j per sample (Square's loss, and the margin stored with every verdict)."""
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
        """(points: the successful ones for broken samples, clean elsewhere; queries used per sample).

        The working arrays hold the still-running samples only and shrink when one succeeds. For a running
        sample the best loss and the current margin coincide (both are the margin of x_best, and a margin
        <= 0 ends the sample), so the reference's two acceptance rules reduce to "the margin decreased".
        A proposal equal to the sample's current point is answered from memory (its margin is known; the
        reference re-queries and rejects it) and counts as a query all the same.
        """
        out, queries = x.clone(), torch.zeros(len(x), dtype=torch.int32, device=x.device)
        idx = active.nonzero().squeeze(1)
        if not len(idx):
            return out, queries
        c, h, w = x.shape[1:]
        run = _Running(idx, x[idx], y[idx], sample_ids[idx], self.eps)
        run.x_best = (run.x + self.eps * self._stripes(run.ids, (c, 1, w), seed)).clamp(0.0, 1.0)
        run.margin = margin(model(run.x_best).float(), run.y)
        run.finish(confirmed_misclassified(model, run.x_best, run.y, run.margin <= 0), out, queries, used=1)
        for i in range(self.n_queries):
            if not run.size:
                break
            p = p_schedule(i, self.p_init, self.n_queries, self.rescale_schedule)
            s = min(max(int(round(math.sqrt(p * (c * h * w) / c))), 1), h, w)  # the reference's arithmetic
            vh, vw, step = self._window(run, s, h, w, c, seed, i)
            inside = _window_rows(h, s, x)[vh][:, :, None] * _window_rows(w, s, x)[vw][:, None, :]
            x_new = (run.x_best + inside[:, None] * step[:, :, None, None]).clamp(run.lo, run.hi)
            m = self._query(model, x_new, run)
            improved = m < run.margin
            run.margin = torch.where(improved, m, run.margin)
            run.x_best = torch.where(improved[:, None, None, None], x_new, run.x_best)
            run.finish(confirmed_misclassified(model, x_new, run.y, improved & (m <= 0.0)), out, queries, used=i + 2)
        queries[run.pos] = self.n_queries + 1
        return out, queries

    @staticmethod
    def _query(model: nn.Module, x_new: Tensor, run: "_Running") -> Tensor:
        """Margins of the proposals; unchanged proposals keep their known margin (no forward)."""
        changed = (x_new != run.x_best).flatten(1).any(1)
        if bool(changed.all()):
            return margin(model(x_new).float(), run.y)
        m = run.margin.clone()
        sel = changed.nonzero().squeeze(1)
        if len(sel):
            m[sel] = margin(model(x_new[sel]).float(), run.y[sel])
        return m

    def _stripes(self, ids: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
        if self.reference_rng:
            return torch.sign(2 * torch.rand((len(ids), *shape)) - 1).to(ids.device)
        return _sign(per_sample_uniform(ids, shape, seed, stream=7001))

    def _window(self, run: "_Running", s: int, h: int, w: int, c: int, seed: int, i: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Top-left corners (n,) and the per-channel steps 2 eps * sign (n, c) of query i."""
        n = run.size
        if self.reference_rng:  # one window and one sign per channel for the whole batch
            vh = (0 + (h - s) * torch.rand([1])).long().to(run.ids.device).expand(n)
            vw = (0 + (w - s) * torch.rand([1])).long().to(run.ids.device).expand(n)
            signs = torch.sign(2 * torch.rand([c, 1, 1]) - 1).reshape(1, c).to(run.ids.device).expand(n, c)
            return vh, vw, 2.0 * self.eps * signs
        if i % WINDOW_BLOCK == 0:  # each sample's stream, drawn WINDOW_BLOCK queries at a time
            u = per_sample_uniform(run.ids, (WINDOW_BLOCK, 2 + c), seed, stream=7002, offset=i * (2 + c))
            run.corners, run.steps = u[:, :, :2].to(run.x.dtype), 2.0 * self.eps * _sign(u[:, :, 2:]).to(run.x.dtype)
        u, k = run.corners, i % WINDOW_BLOCK
        return ((h - s) * u[:, k, 0]).long(), ((w - s) * u[:, k, 1]).long(), run.steps[:, k]


WINDOW_BLOCK = 100


@functools.lru_cache(maxsize=64)
def _window_rows_cached(size: int, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    rel = torch.arange(size, device=device)[None, :] - torch.arange(size - s + 1, device=device)[:, None]
    return ((rel >= 0) & (rel < s)).to(dtype)


def _window_rows(size: int, s: int, like: Tensor) -> Tensor:
    """Row k: 1 on the coordinates k .. k + s - 1 of a window of side s starting at k (a lookup table)."""
    return _window_rows_cached(size, s, like.dtype, like.device)


class _Running:
    """Square's per-sample state for the samples still running (compacted when samples finish)."""

    FIELDS = ("pos", "x", "y", "ids", "lo", "hi", "x_best", "margin", "corners", "steps")

    def __init__(self, pos: Tensor, x: Tensor, y: Tensor, ids: Tensor, eps: float):
        self.pos, self.x, self.y, self.ids = pos, x, y, ids
        self.lo, self.hi = feasible_bounds(x, eps)
        self.x_best = self.margin = self.corners = self.steps = None

    @property
    def size(self) -> int:
        return len(self.pos)

    def finish(self, done: Tensor, out: Tensor, queries: Tensor, used: int) -> None:
        """Write out the samples marked `done` (margin <= 0) and drop them (a host sync per query)."""
        if not bool(done.any()):
            return
        out[self.pos[done]] = self.x_best[done]
        queries[self.pos[done]] = used
        keep = ~done
        for name in self.FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])


register_attack("square", "Square Attack, 5000 queries, p_init 0.8, no schedule rescaling (AutoAttack standard)")(
    lambda eps: Square(eps))
