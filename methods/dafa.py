"""DAFA (Lee et al., ICLR 2024): distance-aware class weights scaling the CE term and the attack radius.

Paper: "DAFA: Distance-Aware Fair Adversarial Training". Official code: github.com/rucy74/DAFA
(losses.py, utils.py calculate_class_weights, train.py). After warm-up epoch `warmup` the class
similarity of adversarial train-mode predictions gives one weight per class, frozen for the rest of
training. Unlike the official code, the weights are checkpointed, so a resumed run keeps them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fairbench.classweights import dafa_weights
from fairbench.method import Batch, RunContext
from fairbench.methods.trades import Trades, TradesConfig
from fairbench.registry import register_method


@dataclass(frozen=True)
class DafaConfig(TradesConfig):
    warmup: int = 70
    """Epoch (1-indexed) whose adversarial predictions define the weights; used from epoch warmup+1."""
    lam: float | None = None
    """Weight strength lambda; None = the dataset's value (1.0 CIFAR-10, 1.5 CIFAR-100/STL-10/Tiny-ImageNet)."""
    tie_rule: Literal["code", "paper"] = "code"
    """Equal self-confidences: 'code' decrements both classes (official), 'paper' changes nothing."""
    weight_loss: bool = True
    """Scale each sample's CE by its class weight (False: the paper's '-Uniform' ablation)."""
    weight_radius: bool = True
    """Scale each sample's eps and step by its class weight."""


@register_method("dafa")
class Dafa(Trades):
    description = "DAFA: class weights from adversarial class similarity scale CE and radius"
    Config = DafaConfig
    needs = frozenset({"sample_memory"})
    official_protocol = {"arch": "resnet18", "epochs": 110, "lr": 0.1, "momentum": 0.9, "nesterov": True,
                         "weight_decay": 5e-4, "schedule": "bag_of_tricks"}

    def setup(self, ctx: RunContext) -> None:
        self.lam = self.config.lam if self.config.lam is not None else ctx.dafa_lambda
        self.weights = torch.ones(ctx.num_classes, device=ctx.device)
        self.similarity = torch.zeros(ctx.num_classes, ctx.num_classes, device=ctx.device)
        if self.uses_weights() and self.config.warmup >= ctx.epochs:
            warnings.warn(f"{self.name}: warmup={self.config.warmup} >= epochs={ctx.epochs}, so the class "
                          f"weights never switch on; pass --set warmup=N with N < {ctx.epochs}")

    def uses_weights(self) -> bool:
        return self.config.weight_loss or self.config.weight_radius

    def sample_scale(self, y: Tensor) -> Tensor | None:
        return self.weights[y] if self.uses_weights() else None

    def radius_scale(self, scale: Tensor | None) -> Tensor | None:
        return scale if self.config.weight_radius else None

    def loss_scale(self, scale: Tensor | None) -> Tensor | None:
        return scale if self.config.weight_loss else None

    def after_loss(self, batch: Batch, logits_adv: Tensor, ctx: RunContext) -> None:
        if ctx.memory is not None and ctx.epoch == self.config.warmup:
            ctx.memory.record(batch.idx, F.softmax(logits_adv.detach(), dim=1), batch.y)

    def on_epoch_end(self, epoch: int, ctx: RunContext) -> None:
        if ctx.memory is None or epoch != self.config.warmup:
            return
        self.similarity = ctx.memory.class_similarity()
        self.weights = dafa_weights(self.similarity, self.lam, self.config.tie_rule)
        ctx.memory.reset()
        if bool((self.weights <= 0).any()):
            warnings.warn(f"{self.name}: a class weight is <= 0 ({self.weights.min().item():.3f}); "
                          "its radius is negative, as in the official code. Lower lam to avoid this.")

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "similarity": self.similarity, "lam": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].to(self.weights.device)
        self.similarity = state["similarity"].to(self.similarity.device)
        self.lam = state["lam"]


@dataclass(frozen=True)
class DafaUniformConfig(DafaConfig):
    weight_loss: bool = False


@register_method("dafa-uniform")
class DafaUniform(Dafa):
    description = "Ablation (TRIX Table 2): DAFA with the radius scaled by the weights, uniform loss weights"
    Config = DafaUniformConfig
