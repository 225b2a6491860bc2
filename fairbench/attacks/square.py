"""Square Attack (Andriushchenko et al., ECCV 2020), L-infinity, margin loss: AutoAttack's black-box member.

docs/evaluation.md §6: vertical-stripe start, p-schedule without rescaling (AutoAttack's
`resc_schedule=False`), one square window per query, accepted when the margin strictly decreases or the
sample is misclassified; a sample stops at its first success. fairbench draws each sample's window and
signs from its own counter-based stream (independent of batch composition; statistically the same as the
reference, which shares one window per batch). `reference_rng=True` reproduces the reference's shared
draws from the global torch RNG (tests only). As in the reference, the window's top-left corner is drawn
from {0, ..., H-s-1}.

Because a sample's draws do not depend on its state, its next `lookahead` proposals are evaluated in one
forward (exact: `Square.perturb`), and a proposal equal to the current point or already rejected there is
answered from memory. On the digits benchmark (8x8, 200 images, 2 CPU cores) the lookahead turns 5000
forwards of ~100 rows into ~340 of ~1700 rows, and the memory cuts the rows forwarded from ~2900 to ~660
per robust image (of 5000 queries): Square 3.9 s -> 1.25 s per 100 images on one core, same points and
query counts. The memory pays where windows shrink to a pixel or two on small images (digits,
Fashion-MNIST); on 32x32x3 CIFAR the late windows have thousands of positions and sign patterns and it
saves little. On a GPU, where a forward of a few hundred small images is launch-bound, the lookahead's
gain grows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterator

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
    lookahead: int = 16
    """Proposals per sample evaluated in one forward (see `perturb`); 1 is the reference's one at a time."""
    max_rows: int = 4096
    """Cap on lookahead x running samples, the rows of one forward (memory)."""
    remember_rejected: bool = True
    """Answer a proposal already rejected at the sample's current point from memory (see `perturb`)."""

    @property
    def shardable(self) -> bool:  # the reference's windows come from the global RNG, shared by the batch
        return not self.reference_rng

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

        For a running sample the best loss and the current margin coincide (both are the margin of x_best,
        and a margin <= 0 ends the sample), so the reference's two acceptance rules reduce to "the margin
        decreased". Lookahead: a sample's windows and signs come from its own stream and do not depend on
        its state, so its next K proposals can all be built from the current x_best and evaluated in one
        forward. Up to and including the first accepted one they are exactly the proposals the one-at-a-time
        loop makes; the rest assumed a state that no longer holds and are discarded. Most proposals are
        rejected, so a forward serves several queries per sample: the same results with fewer, larger
        forwards. Two kinds of proposal are answered from memory, without a forward (the reference queries
        and rejects them; they count as queries all the same): one equal to the current point, and one with
        the window, side and signs of a proposal already rejected since the sample's last accepted one (the
        same point, so the same margin: the model is deterministic). The second kind is what most queries
        become once the windows are a pixel or two wide on small images, where the few hundred possible
        windows are soon all tried. Samples advance at their own pace and leave the working arrays when they
        succeed or run out of queries.
        """
        out, queries = x.clone(), torch.zeros(len(x), dtype=torch.int32, device=x.device)
        idx = active.nonzero().squeeze(1)
        if not len(idx):
            return out, queries
        c, h, w = x.shape[1:]
        sides = torch.tensor([window_side(p_schedule(i, self.p_init, self.n_queries, self.rescale_schedule), c, h, w)
                              for i in range(self.n_queries)] + [1], device=x.device)
        run = _Running(idx, x[idx], y[idx], sample_ids[idx], self.eps)
        run.x_best = (run.x + self.eps * self._stripes(run.ids, (c, 1, w), seed)).clamp(0.0, 1.0)
        run.margin = margin(model(run.x_best).float(), run.y)
        run.finish(confirmed_misclassified(model, run.x_best, run.y, run.margin <= 0), out, queries, used=run.next + 1)
        shared = self._reference_draws(c, x) if self.reference_rng else None
        memo = _Rejected.for_shape(c, h, w) if self.remember_rejected else None
        if memo is not None:
            run.rejected, run.rejected_side = memo.empty(run.size, x.device)
        while run.size:
            k = max(1, min(self.lookahead, self.max_rows // run.size))
            query = run.next[:, None] + torch.arange(k, device=x.device)  # (n, k) query indices
            valid = query < self.n_queries
            side = sides[query.clamp(max=self.n_queries)]
            x_new, key = self._proposals(run, side, query, seed, shared)
            known = memo.lookup(run, key, side) & valid if memo is not None else None
            m = self._query(model, x_new, valid, run, known)
            accepted = m < run.margin[:, None]
            hit = accepted.any(1)
            first = accepted.to(torch.int8).argmax(1)  # the first accepted proposal (0 where none)
            if memo is not None:
                memo.update(run, key, side, valid, hit)
            rows = torch.arange(run.size, device=x.device)
            m_first = m[rows, first]
            run.margin = torch.where(hit, m_first, run.margin)
            run.x_best = torch.where(hit[:, None, None, None], x_new[rows, first], run.x_best)
            run.next = run.next + torch.where(hit, first + 1, valid.sum(1))
            done = confirmed_misclassified(model, run.x_best, run.y, hit & (m_first <= 0.0))
            run.finish(done, out, queries, used=run.next + 1)
            run.finish(run.next >= self.n_queries, None, queries, used=self.n_queries + 1)
        return out, queries

    def _proposals(self, run: "_Running", side: Tensor, query: Tensor, seed: int,
                   shared: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """(n, k, c, h, w): x_best with one window of side `side` set to x -+ eps (then clipped) per query,
        and (n, k) keys naming each proposal's window and signs among those of its side."""
        c, h, w = run.x.shape[1:]
        corner, step = self._draws(run, query, c, seed, shared)
        top, left = ((h - side) * corner[..., 0]).long(), ((w - side) * corner[..., 1]).long()
        rows, cols = torch.arange(h, device=side.device), torch.arange(w, device=side.device)
        in_rows = (rows >= top[..., None]) & (rows < (top + side)[..., None])
        in_cols = (cols >= left[..., None]) & (cols < (left + side)[..., None])
        inside = (in_rows[..., :, None] & in_cols[..., None, :]).to(run.x.dtype)  # (n, k, h, w)
        x_new = (run.x_best[:, None] + inside[:, :, None] * step[..., None, None]).clamp(run.lo[:, None],
                                                                                         run.hi[:, None])
        signs = ((step > 0).long() << torch.arange(c, device=side.device)).sum(-1)
        return x_new, (top * w + left) * (1 << c) + signs

    def _draws(self, run: "_Running", query: Tensor, c: int, seed: int,
               shared: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Window corners in [0, 1)^2 (n, k, 2) and per-channel steps 2 eps * sign (n, k, c) of each query."""
        if shared is not None:  # reference RNG: one window and one sign per channel per query for the batch
            corners, signs = shared
            at = query.clamp(max=self.n_queries - 1)
            return corners[at], 2.0 * self.eps * signs[at]
        u = per_sample_uniform(run.ids, (query.shape[1], 2 + c), seed, stream=7002, offset=query[:, 0] * (2 + c))
        return u[..., :2].to(run.x.dtype), 2.0 * self.eps * _sign(u[..., 2:]).to(run.x.dtype)

    def _reference_draws(self, c: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The reference's per-query draws from the global RNG, in its order (corners, then channel signs),
        all drawn up front: they do not depend on the state, so lookahead can use them too."""
        corners, signs = [], []
        for _ in range(self.n_queries):
            corners.append(torch.rand([2]))  # float32, as the reference's corner arithmetic
            signs.append(torch.sign(2 * torch.rand([c, 1, 1]) - 1).reshape(c))
        return torch.stack(corners).to(like.device), torch.stack(signs).to(like.device, like.dtype)

    @staticmethod
    def _query(model: nn.Module, x_new: Tensor, valid: Tensor, run: "_Running", known: Tensor | None) -> Tensor:
        """Margins (n, k) of the proposals; unchanged and `known` (already rejected) ones get the current
        margin, so they are rejected again, and invalid ones (beyond the query budget) +inf, all without a
        forward."""
        n, k = valid.shape
        flat = x_new.flatten(0, 1)
        changed = (x_new != run.x_best[:, None]).flatten(2).any(2) & valid
        if known is not None:
            changed &= ~known
        m = torch.where(valid, run.margin[:, None], float("inf")).flatten()
        sel = changed.flatten().nonzero().squeeze(1)
        labels = run.y.repeat_interleave(k)
        if len(sel) == len(m):
            return margin(model(flat).float(), labels).view(n, k)
        if len(sel):
            m[sel] = margin(model(flat[sel]).float(), labels[sel])
        return m.view(n, k)

    def _stripes(self, ids: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
        if self.reference_rng:
            return torch.sign(2 * torch.rand((len(ids), *shape)) - 1).to(ids.device)
        return _sign(per_sample_uniform(ids, shape, seed, stream=7001))


def window_side(p: float, c: int, h: int, w: int) -> int:
    """Side of the square window changing a fraction p of the pixels (the reference's arithmetic)."""
    return min(max(int(round(math.sqrt(p * (c * h * w) / c))), 1), h, w)


class _Running:
    """Square's per-sample state for the samples still running (compacted when samples finish)."""

    FIELDS = ("pos", "x", "y", "ids", "lo", "hi", "x_best", "margin", "next", "rejected", "rejected_side")

    def __init__(self, pos: Tensor, x: Tensor, y: Tensor, ids: Tensor, eps: float):
        self.pos, self.x, self.y, self.ids = pos, x, y, ids
        self.lo, self.hi = feasible_bounds(x, eps)
        self.next = torch.zeros(len(pos), dtype=torch.long, device=x.device)  # the next query index
        self.x_best = self.margin = None
        self.rejected = self.rejected_side = None  # `_Rejected`'s table and the window side it holds

    @property
    def size(self) -> int:
        return len(self.pos)

    def finish(self, done: Tensor, out: Tensor | None, queries: Tensor, used: Tensor | int) -> None:
        """Record the samples marked `done` (their x_best into `out` if given, `used` queries) and drop them
        (a host sync per round)."""
        if not bool(done.any()):
            return
        if out is not None:
            out[self.pos[done]] = self.x_best[done]
        queries[self.pos[done]] = used[done].to(queries.dtype) if isinstance(used, Tensor) else used
        keep = ~done
        for name in self.FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])


@dataclass(frozen=True)
class _Rejected:
    """Per sample, the proposals rejected since its last accepted one, as a bit per key (window corner and
    channel signs) for one window side at a time: a proposal with a remembered key is the same point, so it
    is rejected again without a forward. Proposals of another side than the table's are not remembered (at
    most a round's worth, where the schedule changes the side)."""

    keys: int

    MAX_KEYS: ClassVar[int] = 1 << 16
    """Tables above this many keys per sample (2^c sign patterns times h w corners) are not kept."""

    @classmethod
    def for_shape(cls, c: int, h: int, w: int) -> "_Rejected | None":
        keys = h * w << c
        return cls(keys) if keys <= cls.MAX_KEYS else None

    def empty(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(a cleared table with a spare column `keys` that is written but never read, its side -1)."""
        return (torch.zeros(n, self.keys + 1, dtype=torch.bool, device=device),
                torch.full((n,), -1, dtype=torch.long, device=device))

    def lookup(self, run: _Running, key: Tensor, side: Tensor) -> Tensor:
        """(n, k): the proposals known to be rejected. A table kept for another side is cleared first."""
        stale = run.rejected_side != side[:, 0]
        run.rejected[stale] = False
        run.rejected_side = side[:, 0].clone()
        return run.rejected.gather(1, key) & (side == run.rejected_side[:, None])

    def update(self, run: _Running, key: Tensor, side: Tensor, valid: Tensor, hit: Tensor) -> None:
        """Remember the round's proposals of a sample that accepted none (all were rejected); a sample that
        accepted one has moved, so its table is cleared."""
        keep = valid & (side == run.rejected_side[:, None]) & ~hit[:, None]
        run.rejected.scatter_(1, torch.where(keep, key, self.keys), True)
        run.rejected[hit] = False


register_attack("square", "Square Attack, 5000 queries, p_init 0.8, no schedule rescaling (AutoAttack standard)")(
    lambda eps: Square(eps))
