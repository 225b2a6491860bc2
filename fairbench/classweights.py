"""DAFA's class weights from a class-similarity matrix, vectorised and free of host syncs.

Shared by DAFA (global weights after warm-up) and TRIX (the same rule per batch on clean predictions).
The official code loops over class pairs on the host; the form here adds the same terms in the same
order (j = 0..C-1, vectorised over i), so it equals the loop bit for bit on the same device and dtype.
(`torch.cumsum`/`sum` would reorder or widen the accumulation and differ in the last bit.)
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

TieRule = Literal["code", "paper"]


def dafa_weights(similarity: Tensor, lam: float, tie_rule: TieRule = "code") -> Tensor:
    """W_i = 1 + lam * sum_{j != i} [ 1(d_i < d_j) P[i,j] d_j  -  1(d_i >= d_j) P[j,i] d_i ],  d = diag(P).

    Rows of `similarity` are true classes. `tie_rule="paper"` decrements only on d_i > d_j, so a tie
    changes nothing (DAFA paper, Algorithm 2); `"code"` decrements on >= as the official code does.
    """
    p = similarity
    c = p.shape[0]
    d = torch.diagonal(p)
    harder = d.unsqueeze(1) < d.unsqueeze(0)  # [i, j]: class i is harder than j
    easier = d.unsqueeze(1) >= d.unsqueeze(0) if tie_rule == "code" else d.unsqueeze(1) > d.unsqueeze(0)
    off_diagonal = ~torch.eye(c, dtype=torch.bool, device=p.device)
    gain = (lam * p) * d.unsqueeze(0)  # lam * P[i,j] * d_j
    loss = (lam * p.t()) * d.unsqueeze(1)  # lam * P[j,i] * d_i
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    terms = torch.where(harder & off_diagonal, gain, torch.where(easier & off_diagonal, -loss, zero))
    weights = torch.ones(c, dtype=p.dtype, device=p.device)
    for j in range(c):  # C device ops, no host sync; the official code's order of additions
        weights = weights + terms[:, j]
    return weights


def batch_class_similarity(probs: Tensor, labels: Tensor, num_classes: int, diagonal_offset: float = 1e-8) -> Tensor:
    """Q[k, j] = mean of probs[:, j] over the batch samples of class k; absent classes keep a zero row.

    `diagonal_offset` is TRIX's 1e-8 on every diagonal entry.
    """
    sums = torch.zeros(num_classes, probs.shape[1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(probs.dtype)
    q = sums / counts.unsqueeze(1)
    return q + diagonal_offset * torch.eye(num_classes, dtype=q.dtype, device=q.device)


def targeted_mask(sample_weights: Tensor) -> Tensor:
    """TRIX: a sample is attacked with a targeted adversary when its class weight is below the
    mean over the batch's samples (strict), i.e. it belongs to a class stronger than average."""
    return sample_weights < sample_weights.mean()


def random_wrong_targets(labels: Tensor, num_classes: int, generator: torch.Generator | None) -> Tensor:
    """Targets uniform over the C-1 wrong classes.

    Same distribution as the official rejection sampling (redraw until t != y), drawn as
    (y + U{1..C-1}) mod C so no host-side loop is needed.
    """
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return (labels + offset) % num_classes
