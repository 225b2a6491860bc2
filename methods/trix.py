"""TRIX (Medi, Jung, Keuper, arXiv 2507.07768): targeted adversaries for strong classes, untargeted for weak.

Paper: "TRIX: Trading Adversarial Fairness via Mixed Adversarial Training".
Official code: github.com/Fairness-a11y/TRIX (losses.py mixed_trades_loss, `--loss mixed
--rob_fairness_algorithm dafa`). Per batch, DAFA's pairwise rule applied to the clean eval-mode
predictions (lambda_b = 1) splits the samples: those whose class weight is below the batch's sample mean
get a targeted CE-descent adversary toward a uniformly drawn wrong class, the others the TRADES KL
adversary. On top, DAFA's global weights (after warm-up) scale CE, radius and step as in `dafa`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from fairbench.adversaries import clean_logits, inner_attack, per_sample, start_point, trades_loss
from fairbench.classweights import (
    DafaWeights,
    DafaWeightsConfig,
    WarmupWeighted,
    batch_class_similarity,
    dafa_weights,
    random_wrong_targets,
    targeted_mask,
)
from fairbench.method import Batch, FairAT, RunContext, Services, StepOut
from fairbench.registry import register_method
from fairbench.trades_family import TradesConfig


@dataclass(frozen=True)
class TrixConfig(DafaWeightsConfig, TradesConfig):
    """The TRADES fields (fairbench/trades_family.py), DAFA's weight options (fairbench/classweights.py) and:"""

    lam_batch: float = 1.0
    """Lambda of the per-batch split weights; hard-coded 1.0 in the official code, whatever the dataset."""


@register_method("trix")
class Trix(WarmupWeighted, FairAT):
    description = "TRIX: per-batch targeted (strong classes) / untargeted (weak) TRADES + DAFA weights"
    Config = TrixConfig
    services = Services(sample_memory=True)
    official_protocol = {"arch": "resnet18", "epochs": 150, "lr": 0.1, "momentum": 0.9, "nesterov": True,
                         "weight_decay": 5e-4, "schedule": "bag_of_tricks"}

    def setup(self, ctx: RunContext) -> None:
        self.dafa = DafaWeights(self.config, ctx, self.name)

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg, x, y = self.config, batch.x, batch.y
        w = self.dafa.weights[y]  # DAFA's global class weight of each sample (1 until the warm-up epoch ends)
        eps = cfg.eps * w if cfg.weight_radius else cfg.eps
        alpha = cfg.alpha * w if cfg.weight_radius else cfg.alpha
        start = start_point(x, per_sample(eps, x), cfg.init, ctx.generator)  # noise before targets, as TRIX
        logits_clean = clean_logits(model, x)
        # The split: DAFA's rule on this batch's clean predictions; classes weighted below the batch mean are the
        # strong ones, whose samples get a targeted adversary.
        similarity = batch_class_similarity(F.softmax(logits_clean, dim=1), y, ctx.num_classes)
        split_weights = dafa_weights(similarity, cfg.lam_batch, "code")[y]
        targeted = targeted_mask(split_weights)
        targets = random_wrong_targets(y, ctx.num_classes, ctx.generator)
        x_adv = inner_attack(model, x, logits_clean, eps=eps, alpha=alpha, steps=cfg.steps, generator=ctx.generator,
                             targets=targets, targeted=targeted, start=start)
        loss, _, logits_adv = trades_loss(model, x, x_adv, y, cfg.beta, w if cfg.weight_loss else None,
                                          order=cfg.forward_order)
        if ctx.epoch == cfg.warmup:
            self.dafa.record(ctx.memory, batch.idx, logits_adv, y)
        return StepOut(loss=loss, log={"targeted": targeted.float().mean()})


@dataclass(frozen=True)
class TrixBasicConfig(TrixConfig):
    weight_loss: bool = False
    weight_radius: bool = False


@register_method("trix-basic")
class TrixBasic(Trix):
    description = "Ablation (TRIX Table 2): the TRIX split without any DAFA weights"
    Config = TrixBasicConfig
    services = Services()


@dataclass(frozen=True)
class TrixUniformConfig(TrixConfig):
    weight_loss: bool = False


@register_method("trix-uniform")
class TrixUniform(Trix):
    description = "Ablation (TRIX Table 2): TRIX with the radius scaled by the weights, uniform loss weights"
    Config = TrixUniformConfig
