"""Side-by-side runs ("lanes"): the targets and restarts of one sample attacked in one batch (docs/evaluation.md §14).

The reference runs target 1 on every robust sample, then target 2 on those target 1 did not break, and so
on. With per-sample random streams every (sample, run) has its own fixed trajectory, so running all runs
at once and keeping, per sample, the first successful run in the reference's order gives the same flags;
the only extra work is on samples an earlier run broke, and one large batch instead of many small ones
keeps the hardware busy (1.5x per pass for the small CNN on the 2-core CPU, more on a GPU).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def lane_rows(n: int, n_runs: int, device: torch.device) -> Tensor:
    """Row r * n + i of the lane batch is run r of sample i: the sample index of every row."""
    return torch.arange(n, device=device).repeat(n_runs)


def first_success(success: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(hit (n,): some run succeeded, row (n,): the lane row of the first successful run in run order)."""
    grid = success.reshape(-1, n)
    first = grid.to(torch.int8).argmax(0)  # argmax returns the first maximal index
    return grid.any(0), first * n + torch.arange(n, device=success.device)


LaneAttack = Callable[[Tensor, list[int]], tuple[Tensor, Tensor]]
"""(still-robust sample indices idx, runs) -> (success, point) per lane row (row r * len(idx) + i)."""


def run_all(x: Tensor, active: Tensor, n_runs: int, side_by_side: bool, attack: LaneAttack) -> Tensor:
    """Points for the active samples (x where every run failed): all runs in one batch, or one after the
    other on the samples no earlier run broke (the reference's order, needed for its RNG draws)."""
    out, robust = x.clone(), active.clone()
    for group in [list(range(n_runs))] if side_by_side else [[r] for r in range(n_runs)]:
        idx = robust.nonzero().squeeze(1)
        if not len(idx):
            break
        success, points = attack(idx, group)
        hit, row = first_success(success, len(idx))
        out[idx[hit]] = points[row[hit]]
        robust[idx[hit]] = False
    return out
