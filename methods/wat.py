"""WAT (Li & Liu, AAAI 2023): worst-class adversarial training as a Hedge game over C+1 experts.

Paper: "WAT: Improve the Worst-class Robustness in Adversarial Training" (arXiv 2302.04025).
Official code: github.com/boqili/WAT (worst_class_adversarial_train.py, attack_generator.py, data_loader.py).
After every epoch, the model's TRADES losses (CE + beta KL, eval mode, under the training TRADES-KL attack) on
a held-out validation split (the last 6% of each class: 300 of 5000 on CIFAR-10) give one cost per class plus
the overall cost of an "average" expert; the costs accumulate over all epochs and the expert weights become
w = C softmax(eta S). Each sample's TRADES loss is weighted by w[y] + w[C].

Choices where the official code leaves room (docs/methods/wat.md §4):
- The official code keeps identical "natural" and "boundary" weight vectors; one vector `weights` serves both.
- Costs use the official normalisation by n_batches * val_batch_size (3072 instead of 3000 on CIFAR-10);
  `normaliser="exact_mean"` divides by the class and split sizes instead.
- The validation natural logits are the eval-mode clean logits the attack already computed (the code
  recomputes the same eval-mode forward).
- Validation attack noise comes from `ctx.generator` after the epoch's training draws, so a resumed run
  repeats it exactly; costs and weights are checkpointed (the official resume does not restore them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.adversaries import clean_logits, eval_mode, inner_attack, kl_per_sample
from fairbench.data.loader import DeviceSplit, eval_batches
from fairbench.method import Batch, FairAT, RunContext, Services, StepOut, ValidationSpec
from fairbench.registry import register_method


@dataclass(frozen=True)
class WatConfig:
    beta: float = 6.0
    """TRADES trade-off, in the training loss and in the validation costs."""
    eta: float = 0.1
    """Hedge learning rate: w proportional to exp(eta * cumulative validation cost)."""
    eps: float = 0.031
    """L-inf radius of the TRADES-KL attack (training and validation)."""
    alpha: float = 0.007
    """Attack step (training and validation)."""
    steps: int = 10
    """Attack steps (training and validation)."""
    init: Literal["normal", "uniform"] = "normal"
    """Attack start: x + 0.001 N(0,1) unclamped (official) or uniform in the ball."""
    normaliser: Literal["official", "exact_mean"] = "official"
    """Cost scale: 'official' divides loss sums by n_batches * val_batch_size, 'exact_mean' by counts."""
    val_batch_size: int = 128
    """Validation batch size B of the cost normalisation (the official code's batch size, 128)."""


@dataclass(frozen=True)
class ValidationLosses:
    """Sums of eval-mode TRADES losses over the validation split, per class and overall."""

    per_class: Tensor
    total: Tensor
    counts: Tensor
    batches: int


def trades_per_sample(logits: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """l_i = CE(z_i, y_i) + beta KL(softmax(z_i) || softmax(z'_i)), in fp32."""
    return F.cross_entropy(logits.float(), y, reduction="none") + beta * kl_per_sample(logits, logits_adv)


def validation_losses(model: nn.Module, split: DeviceSplit, cfg: WatConfig, num_classes: int,
                      generator: torch.Generator | None) -> ValidationLosses:
    """The training attack on every validation batch of size cfg.val_batch_size, losses in eval mode."""
    device = split.labels.device
    per_class = torch.zeros(num_classes, device=device)
    counts = torch.zeros(num_classes, device=device)
    batches = 0
    for x, y, _ in eval_batches(split, cfg.val_batch_size):
        logits = clean_logits(model, x)
        x_adv = inner_attack(model, x, logits, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                             generator=generator, init=cfg.init)
        with torch.no_grad(), eval_mode(model):
            losses = trades_per_sample(logits, model(x_adv), y, cfg.beta)
        per_class.index_add_(0, y, losses)
        counts.index_add_(0, y, torch.ones_like(losses))
        batches += 1
    return ValidationLosses(per_class, per_class.sum(), counts, batches)


def epoch_costs(v: ValidationLosses, normaliser: str, batch_size: int) -> Tensor:
    """c (C+1,): c_k = C sum_{V_k} l / (n_b B) and c_C = sum_V l / (n_b B) (official), or exact means."""
    c = v.per_class.shape[0]
    if normaliser == "official":
        scale = v.batches * batch_size
        return torch.cat([c * v.per_class / scale, (v.total / scale)[None]])
    return torch.cat([v.per_class / v.counts.clamp_min(1), (v.total / v.counts.sum().clamp_min(1))[None]])


def hedge_weights(cumulative: Tensor, eta: float) -> Tensor:
    """w_k = C exp(eta S_k) / sum_j exp(eta S_j) over the C+1 experts (max-subtracted softmax): sums to C."""
    return (cumulative.shape[0] - 1) * torch.softmax(eta * cumulative, dim=0)


@register_method("wat")
class Wat(FairAT):
    description = "WAT: Hedge weights over C classes + an average expert from cumulative validation losses"
    Config = WatConfig
    services = Services(validation=ValidationSpec(fraction=0.06, position="last"))
    official_protocol = {"arch": "resnet18", "epochs": 100, "batch_size": 128, "lr": 0.1,
                         "schedule": "trades", "weight_decay": 2e-4, "nesterov": False, "momentum": 0.9}

    def setup(self, ctx: RunContext) -> None:
        self.costs = torch.zeros(ctx.num_classes + 1, device=ctx.device)
        self.weights = torch.ones(ctx.num_classes + 1, device=ctx.device)

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg = self.config
        x_adv = inner_attack(model, batch.x, clean_logits(model, batch.x), eps=cfg.eps, alpha=cfg.alpha,
                             steps=cfg.steps, generator=ctx.generator, init=cfg.init)
        losses = trades_per_sample(model(batch.x), model(x_adv), batch.y, cfg.beta)
        scale = self.weights[batch.y] + self.weights[-1]
        return StepOut((scale * losses).mean())

    def on_epoch_end(self, epoch: int, model: nn.Module, ctx: RunContext) -> None:
        cfg = self.config
        losses = validation_losses(model, ctx.val_split, cfg, ctx.num_classes, ctx.generator)
        self.costs = self.costs + epoch_costs(losses, cfg.normaliser, cfg.val_batch_size)
        self.weights = hedge_weights(self.costs, cfg.eta)

    def state_dict(self) -> dict[str, Any]:
        return {"costs": self.costs, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.costs = state["costs"].to(self.costs.device)
        self.weights = state["weights"].to(self.weights.device)
