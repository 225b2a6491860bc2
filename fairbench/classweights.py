"""DAFA's class weights from a class-similarity matrix, vectorised and free of host syncs.

Shared by DAFA (global weights after warm-up) and TRIX (the same global weights, and the same rule per batch on
clean predictions). `DafaWeights` keeps the global weights of a run; `DafaWeightsConfig` holds their options.
The official code loops over class pairs on the host; the form here adds the same terms in the same
order (j = 0..C-1, vectorised over i), so it equals the loop bit for bit on the same device and dtype.
(`torch.cumsum`/`sum` would reorder or widen the accumulation and differ in the last bit.)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from fairbench.method import RunContext, SampleMemory

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


@dataclass(frozen=True)
class DafaWeightsConfig:
    """The options of DAFA's global class weights (DAFA and TRIX add them to the TRADES fields)."""

    warmup: int = 70
    """Epoch (1-indexed) whose adversarial predictions define the weights; used from epoch warmup+1."""
    lam: float = 1.0
    """Weight strength lambda; the dataset sets it (1.0 CIFAR-10, 1.5 CIFAR-100/STL-10/Tiny-ImageNet)."""
    tie_rule: TieRule = "code"
    """Equal self-confidences: 'code' decrements both classes (official), 'paper' changes nothing."""
    weight_loss: bool = True
    """Scale each sample's CE by its class weight (False: the paper's '-Uniform' ablation)."""
    weight_radius: bool = True
    """Scale each sample's eps and step by its class weight."""


class DafaWeights:
    """DAFA's global class weights over a run: 1 for every class until warm-up epoch `warmup` ends, then
    `dafa_weights` of the class similarity of that epoch's adversarial train-mode predictions, frozen.

    Unlike the official code the weights are checkpointed (`state_dict`), so a resumed run keeps them.
    """

    def __init__(self, config: DafaWeightsConfig, ctx: "RunContext", owner: str):
        self.config, self.owner = config, owner
        self.weights = torch.ones(ctx.num_classes, device=ctx.device)
        self.similarity = torch.zeros(ctx.num_classes, ctx.num_classes, device=ctx.device)
        self.lam = config.lam
        if self.used and config.warmup >= ctx.epochs:
            warnings.warn(f"{owner}: warmup={config.warmup} >= epochs={ctx.epochs}, so the class "
                          f"weights never switch on; pass --set warmup=N with N < {ctx.epochs}")

    @property
    def used(self) -> bool:
        """Whether the weights scale anything (both switched off: TRIX-basic)."""
        return self.config.weight_loss or self.config.weight_radius

    def record(self, memory: "SampleMemory | None", idx: Tensor, logits_adv: Tensor, y: Tensor) -> None:
        """Keep the warm-up epoch's adversarial probabilities (a method without the sample memory keeps none)."""
        if memory is not None:
            memory.record(idx, F.softmax(logits_adv.detach(), dim=1), y)

    def switch_on(self, memory: "SampleMemory | None") -> None:
        """At the end of the warm-up epoch: the weights from the recorded class similarity, then the memory is
        cleared. Without a sample memory the weights stay 1."""
        if memory is None:
            return
        self.similarity = memory.class_similarity()
        self.weights = dafa_weights(self.similarity, self.lam, self.config.tie_rule)
        memory.reset()
        if bool((self.weights <= 0).any()):
            warnings.warn(f"{self.owner}: a class weight is <= 0 ({self.weights.min().item():.3f}); "
                          "its radius is negative, as in the official code. Lower lam to avoid this.")

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "similarity": self.similarity, "lam": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].to(self.weights.device)
        self.similarity = state["similarity"].to(self.similarity.device)
        self.lam = state["lam"]


class WarmupWeighted:
    """What DAFA and TRIX do around their loss with their class weights (`self.dafa`, a `DafaWeights` made in
    `setup`): switch them on when the warm-up epoch ends, and keep them in the method's checkpoint state.
    Mixed in before `FairAT`: `class Dafa(WarmupWeighted, FairAT)`."""

    dafa: DafaWeights

    def on_epoch_end(self, epoch: int, model, ctx: "RunContext") -> None:
        if epoch == self.config.warmup:
            self.dafa.switch_on(ctx.memory)

    def state_dict(self) -> dict[str, Any]:
        return self.dafa.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dafa.load_state_dict(state)
