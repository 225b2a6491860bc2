"""DAFA (Lee et al., ICLR 2024): distance-aware class weights scaling the CE term and the attack radius.

Paper: "DAFA: Distance-Aware Fair Adversarial Training". Official code: github.com/rucy74/DAFA
(losses.py, utils.py calculate_class_weights, train.py). TRADES whose per-sample class weight w[y] scales the
radius, the step and the CE term. The weights are 1 until warm-up epoch `warmup` ends; the class similarity of
that epoch's adversarial train-mode predictions then gives one weight per class (`dafa_weights`), frozen for the
rest of training. Unlike the official code, the weights are checkpointed, so a resumed run keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from fairbench.adversaries import clean_logits, inner_attack, per_sample, start_point, trades_loss
from fairbench.classweights import DafaWeights, DafaWeightsConfig, WarmupWeighted
from fairbench.method import Batch, FairAT, RunContext, Services, StepOut
from fairbench.registry import register_method
from fairbench.trades_family import TradesConfig


@dataclass(frozen=True)
class DafaConfig(DafaWeightsConfig, TradesConfig):
    """The TRADES fields (fairbench/trades_family.py) and DAFA's weight options (fairbench/classweights.py)."""


@register_method("dafa")
class Dafa(WarmupWeighted, FairAT):
    description = "DAFA: class weights from adversarial class similarity scale CE and radius"
    Config = DafaConfig
    services = Services(sample_memory=True)
    official_protocol = {"arch": "resnet18", "epochs": 110, "lr": 0.1, "momentum": 0.9, "nesterov": True,
                         "weight_decay": 5e-4, "schedule": "bag_of_tricks"}

    def setup(self, ctx: RunContext) -> None:
        self.dafa = DafaWeights(self.config, ctx, self.name)

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg, x, y = self.config, batch.x, batch.y
        w = self.dafa.weights[y]  # each sample's class weight (1 until the warm-up epoch ends)
        eps = cfg.eps * w if cfg.weight_radius else cfg.eps
        alpha = cfg.alpha * w if cfg.weight_radius else cfg.alpha
        start = start_point(x, per_sample(eps, x), cfg.init, ctx.generator)
        logits_clean = clean_logits(model, x)
        x_adv = inner_attack(model, x, logits_clean, eps=eps, alpha=alpha, steps=cfg.steps,
                             generator=ctx.generator, start=start)
        loss, _, logits_adv = trades_loss(model, x, x_adv, y, cfg.beta, w if cfg.weight_loss else None,
                                          order=cfg.forward_order)
        if ctx.epoch == cfg.warmup:
            self.dafa.record(ctx.memory, batch.idx, logits_adv, y)
        return StepOut(loss)


@dataclass(frozen=True)
class DafaUniformConfig(DafaConfig):
    weight_loss: bool = False


@register_method("dafa-uniform")
class DafaUniform(Dafa):
    description = "Ablation (TRIX Table 2): DAFA with the radius scaled by the weights, uniform loss weights"
    Config = DafaUniformConfig
