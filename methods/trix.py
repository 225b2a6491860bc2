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

import torch.nn.functional as F
from torch import Tensor

from fairbench.classweights import batch_class_similarity, dafa_weights, random_wrong_targets, targeted_mask
from fairbench.method import RunContext
from fairbench.methods.dafa import Dafa, DafaConfig
from fairbench.registry import register_method


@dataclass(frozen=True)
class TrixConfig(DafaConfig):
    lam_batch: float = 1.0
    """Lambda of the per-batch split weights; hard-coded 1.0 in the official code, whatever the dataset."""


@register_method("trix")
class Trix(Dafa):
    description = "TRIX: per-batch targeted (strong classes) / untargeted (weak) TRADES + DAFA weights"
    Config = TrixConfig
    official_protocol = {"arch": "resnet18", "epochs": 150, "lr": 0.1, "momentum": 0.9, "nesterov": True,
                         "weight_decay": 5e-4, "schedule": "bag_of_tricks"}

    def adversary_targets(self, logits_clean: Tensor, y: Tensor, ctx: RunContext) -> tuple[Tensor, Tensor]:
        probs = F.softmax(logits_clean, dim=1)
        similarity = batch_class_similarity(probs, y, ctx.num_classes)
        batch_weights = dafa_weights(similarity, self.config.lam_batch, "code")
        targeted = targeted_mask(batch_weights[y])
        return random_wrong_targets(y, ctx.num_classes, ctx.generator), targeted


@dataclass(frozen=True)
class TrixBasicConfig(TrixConfig):
    weight_loss: bool = False
    weight_radius: bool = False


@register_method("trix-basic")
class TrixBasic(Trix):
    description = "Ablation (TRIX Table 2): the TRIX split without any DAFA weights"
    Config = TrixBasicConfig
    needs = frozenset()


@dataclass(frozen=True)
class TrixUniformConfig(TrixConfig):
    weight_loss: bool = False


@register_method("trix-uniform")
class TrixUniform(Trix):
    description = "Ablation (TRIX Table 2): TRIX with the radius scaled by the weights, uniform loss weights"
    Config = TrixUniformConfig
