"""FRL (Xu, Liu, Li, Jain, Tang, ICML 2021): class-wise fairness constraints solved with Lagrange multipliers.

Paper: "To be Robust or to be Fair: Towards Fairness in Adversarial Training".
Official code: github.com/hannxu123/fair_robust (FRL-RW: frlrw.py + utils_frl.py; FRL-RWRM: frlrmrw.py +
utils_frl2.py). Before every epoch, the class-wise clean and CE-PGD-20 accuracy of the current model on a
held-out validation split (the last 6% of each class: 300 of 5000 on CIFAR-10) give each class's clean and
boundary error; projected dual ascent turns the violations of "within tau of the average" into per-class
weights on the TRADES CE and KL terms (reweight, RW) and, for RWRM, per-class attack radii (remargin, RM).

FRL fine-tunes an adversarially trained model (docs/methods/frl.md §2.1): `hot_start = "trades"` makes the runner
train or find the TRADES run of the same dataset, arch and seed under the common protocol and start from its
final checkpoint; this run's `official_protocol` (40 epochs, SGD lr 1e-3, momentum 0.9, wd 5e-4) then always
applies. The run's `init_from` (part of its protocol and id) records which checkpoint it started from.

Choices where the official code leaves room (docs/methods/frl.md §4):
- General C: w_k = 1/C + lam_k - sum(lam)/C (the code hard-codes C = 10; identical values there).
- rate1 halves before the update of every epoch e with e % 40 == 0; it is computed from the epoch, so a
  resumed run needs no extra state. The multipliers are checkpointed (the official code cannot resume).
- Validation accuracy per class is the official `in_class` rate of correct adversarial predictions,
  whether or not the clean prediction was correct (the boundary error a_k - r_k may then be negative);
  `val_accuracy="joint"` uses the harness's robust accuracy (correct on clean and adversarial) instead.
- The validation PGD is the harness's `PGD` (uniform start drawn per sample from the epoch and sample id).
- The outer loss runs two train-mode forwards (clean, adversarial) as `trades_loss` does; the official
  code forwards the clean batch twice, which differs only in BatchNorm running statistics.
- The arch and batch size come from the dataset defaults (those of the hot-start TRADES run) rather than
  the official PreAct ResNet-18: the fine-tuned weights must fit the hot-start model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.adversaries import clean_logits, inner_attack, kl_per_sample
from fairbench.attacks.pgd import PGD
from fairbench.evaluation import evaluate_split
from fairbench.method import Batch, FairAT, RunContext, Services, StepOut, ValidationSpec
from fairbench.registry import register_method


@dataclass(frozen=True)
class FrlConfig:
    beta: float = 1.5
    """TRADES trade-off of the FRL code (not 6); the KL term is a weighted mean scaled by beta."""
    tau0: float = 0.07
    """Fairness bound on the clean error: class error may exceed the average by this much (RWRM code)."""
    tau1: float = 0.07
    """Fairness bound on the boundary error (RWRM code)."""
    rate1: float = 0.05
    """Dual step of the reweighting multipliers lam0 (lam1 uses lam1_factor * rate1)."""
    rate1_halving: int = 40
    """rate1 halves before the update of every epoch e with e % rate1_halving == 0 (0: never)."""
    lam1_factor: float = 2.0
    """The official code's factor on the boundary multiplier step: lam1 += lam1_factor * rate1 * g1."""
    rate2: float = 0.2
    """Dual step of the remargin multiplier lam2 (unprojected, may go negative)."""
    lim: float = 0.5
    """N(v): negative entries clamped to 0, then v rescaled to sum lim if its sum exceeds lim."""
    remargin: bool = True
    """Update lam2; class k trains at rho_k eps, rho_k = clamp(exp(2 lam2_k)) (RWRM). False: rho = 1 (RW)."""
    rho_min: float = 0.98
    """Lower clamp of the radius factor exp(2 lam2)."""
    rho_max: float = 3.0
    """Upper clamp of the radius factor (3.0 in the RWRM code, 2.5 in the RW code where lam2 is frozen)."""
    eps: float = 8 / 255
    """Base L-inf training radius (FRL uses 8/255, not 0.031); class k trains at rho_k * eps."""
    step_rule: Literal["max_radius", "fixed"] = "max_radius"
    """Attack step: 'max_radius' = max_i(eps_i) / step_divisor, one per batch (RWRM); 'fixed' = alpha (RW)."""
    step_divisor: float = 4.0
    """Divisor of the largest radius in the batch under step_rule='max_radius'."""
    alpha: float = 2 / 255
    """Attack step under step_rule='fixed' (FRL-RW)."""
    steps: int = 10
    """Inner TRADES-KL attack steps."""
    init: Literal["normal", "uniform"] = "normal"
    """Attack start: x + 0.001 N(0,1) unclamped (official) or uniform in the ball."""
    val_eps: float = 8 / 255
    """Radius of the validation CE-PGD attack."""
    val_alpha: float = 2 / 255
    """Step of the validation CE-PGD attack."""
    val_steps: int = 20
    """Steps of the validation CE-PGD attack (uniform start, final iterate)."""
    val_accuracy: Literal["adversarial", "joint"] = "adversarial"
    """Per-class PGD accuracy: adversarial prediction correct (official) or correct on clean and adv."""


@dataclass(frozen=True)
class FrlRwConfig(FrlConfig):
    tau0: float = 0.1
    """Fairness bound on the clean error (RW code)."""
    tau1: float = 0.1
    """Fairness bound on the boundary error (RW code)."""
    rate2: float = 0.1
    """Remargin dual step (unused while remargin is False)."""
    remargin: bool = False
    """FRL-RW: lam2 stays 0, so every class trains at radius eps."""
    rho_max: float = 2.5
    """Upper clamp of the radius factor in the RW code (inactive: rho = 1)."""
    step_rule: Literal["max_radius", "fixed"] = "fixed"
    """FRL-RW attacks with the fixed step alpha = 2/255."""


@dataclass(frozen=True)
class ValidationErrors:
    """Per-class and overall clean error e0 = 1 - acc and boundary error e1 = acc - PGD acc (validation)."""

    clean: Tensor
    boundary: Tensor
    clean_total: Tensor
    boundary_total: Tensor


def normalize_multiplier(v: Tensor, lim: float) -> Tensor:
    """N(v): project onto {v >= 0, sum(v) <= lim} the official way (clamp, then rescale to sum lim)."""
    v = v.clamp_min(0)
    total = v.sum()
    return torch.where(total > lim, v * (lim / total.clamp_min(1e-30)), v)


def class_weights(lam: Tensor) -> Tensor:
    """w_k = 1/C + lam_k - sum(lam)/C: sums to 1 and stays positive while lam >= 0 and sum(lam) <= lim < 1."""
    c = lam.shape[0]
    return 1.0 / c + lam - lam.sum() / c


def radius_factor(lam2: Tensor, low: float, high: float) -> Tensor:
    """rho_k = clamp(exp(2 lam2_k), low, high): the remargin radius multiplier."""
    return torch.exp(2 * lam2).clamp(low, high)


def rate1_at(epoch: int, rate1: float, every: int) -> float:
    """rate1 in `epoch` under the official halving (`if e % every == 0: rate1 /= 2`, before the update)."""
    return rate1 if every <= 0 else rate1 * 0.5 ** (epoch // every)


def violations(errors: ValidationErrors, tau0: float, tau1: float) -> tuple[Tensor, Tensor]:
    """g0_k = e0_k - e0 - tau0 and g1_k = e1_k - e1 - tau1 (positive = constraint violated)."""
    return (errors.clean - errors.clean_total - tau0, errors.boundary - errors.boundary_total - tau1)


def update_multipliers(lams: tuple[Tensor, Tensor, Tensor], g0: Tensor, g1: Tensor, rate1: float,
                       cfg: FrlConfig) -> tuple[Tensor, Tensor, Tensor]:
    """One projected dual-ascent step; lam2 moves only with remargin and is never projected."""
    lam0, lam1, lam2 = lams
    lam0 = normalize_multiplier(lam0 + rate1 * g0, cfg.lim)
    lam1 = normalize_multiplier(lam1 + cfg.lam1_factor * rate1 * g1, cfg.lim)
    if cfg.remargin:
        lam2 = lam2 + cfg.rate2 * g1
    return lam0, lam1, lam2


def class_rates(labels: np.ndarray, clean_ok: np.ndarray, adv_ok: np.ndarray, num_classes: int,
                device: torch.device) -> ValidationErrors:
    """Clean/boundary errors from per-sample verdicts; overall rates over samples (as the code's counts).
    A class without validation samples gets the overall rates, so it exerts no pressure."""
    n = np.bincount(labels, minlength=num_classes)
    a_total, r_total = clean_ok.mean(), adv_ok.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(n > 0, np.bincount(labels, weights=clean_ok, minlength=num_classes) / n, a_total)
        r = np.where(n > 0, np.bincount(labels, weights=adv_ok, minlength=num_classes) / n, r_total)
    rates = (1 - a, a - r, 1 - a_total, a_total - r_total)
    return ValidationErrors(*(torch.as_tensor(v, dtype=torch.float32, device=device) for v in rates))


def validation_errors(model: nn.Module, ctx: RunContext, cfg: FrlConfig) -> ValidationErrors:
    """Clean and CE-PGD verdicts of `model` as it stands, on `ctx.val_split` in eval mode, as rates."""
    attack = PGD(cfg.val_eps, steps=cfg.val_steps, alpha=cfg.val_alpha)
    samples = evaluate_split(model, ctx.val_split, [attack], cfg.val_eps, ctx.eval_batch_size, seed=ctx.epoch)
    clean = samples[samples.suite == "clean"].set_index("sample_idx")
    adv = samples[samples.suite != "clean"].set_index("sample_idx").loc[clean.index]
    labels = clean["label"].to_numpy().astype(np.int64)
    clean_ok = ~clean["success"].to_numpy()
    adv_ok = adv["pred"].to_numpy() == labels
    if cfg.val_accuracy == "joint":
        adv_ok = adv_ok & clean_ok
    return class_rates(labels, clean_ok.astype(np.float64), adv_ok.astype(np.float64), ctx.num_classes,
                       ctx.val_split.labels.device)


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """sum_i w_i v_i / sum_i w_i: FRL normalises each term by the batch's sum of weights, not by B."""
    return (values * weights).sum() / weights.sum()


@register_method("frl")
class Frl(FairAT):
    description = "FRL-RWRM: validation-driven multipliers set per-class TRADES CE/KL weights and radii"
    Config = FrlConfig
    services = Services(validation=ValidationSpec(fraction=0.06, position="last"))
    hot_start = "trades"
    official_protocol = {"epochs": 40, "lr": 0.001, "schedule": "constant", "weight_decay": 5e-4,
                         "nesterov": False, "momentum": 0.9}

    def setup(self, ctx: RunContext) -> None:
        zeros = torch.zeros(ctx.num_classes, device=ctx.device)
        self.lam0, self.lam1, self.lam2 = zeros.clone(), zeros.clone(), zeros.clone()
        self._derive()

    def _derive(self) -> None:
        """Weights and radius factors are functions of the multipliers (one source of truth)."""
        self.w0, self.w1 = class_weights(self.lam0), class_weights(self.lam1)
        self.rho = radius_factor(self.lam2, self.config.rho_min, self.config.rho_max)

    def on_epoch_start(self, epoch: int, model: nn.Module, ctx: RunContext) -> None:
        cfg = self.config
        g0, g1 = violations(validation_errors(model, ctx, cfg), cfg.tau0, cfg.tau1)
        rate1 = rate1_at(epoch, cfg.rate1, cfg.rate1_halving)
        lams = (self.lam0, self.lam1, self.lam2)
        self.lam0, self.lam1, self.lam2 = update_multipliers(lams, g0, g1, rate1, cfg)
        self._derive()

    def attack_step(self, eps: Tensor) -> float | Tensor:
        """One step for the whole batch: a quarter of its largest radius (RWRM) or the fixed alpha (RW)."""
        cfg = self.config
        return eps.max() / cfg.step_divisor if cfg.step_rule == "max_radius" else cfg.alpha

    def adversarial(self, model: nn.Module, batch: Batch, ctx: RunContext) -> Tensor:
        """TRADES-KL PGD at radius rho[y] * eps, on the device (no host sync)."""
        cfg = self.config
        eps = self.rho[batch.y] * cfg.eps
        return inner_attack(model, batch.x, clean_logits(model, batch.x), eps=eps,
                            alpha=self.attack_step(eps), steps=cfg.steps, generator=ctx.generator,
                            init=cfg.init)

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        x_adv = self.adversarial(model, batch, ctx)
        logits, logits_adv = model(batch.x).float(), model(x_adv).float()
        ce = F.cross_entropy(logits, batch.y, reduction="none")
        kl = kl_per_sample(logits, logits_adv)
        loss = weighted_mean(ce, self.w0[batch.y]) + self.config.beta * weighted_mean(kl, self.w1[batch.y])
        return StepOut(loss)

    def state_dict(self) -> dict[str, Any]:
        """The multipliers resume the run; the derived weights and radii are saved for run.json."""
        return {"lam0": self.lam0, "lam1": self.lam1, "lam2": self.lam2,
                "w0": self.w0, "w1": self.w1, "rho": self.rho}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.lam0.device
        self.lam0, self.lam1, self.lam2 = (state[k].to(device) for k in ("lam0", "lam1", "lam2"))
        self._derive()


@register_method("frl-rw")
class FrlRw(Frl):
    description = "FRL-RW: validation-driven multipliers reweight TRADES CE/KL per class (uniform radius)"
    Config = FrlRwConfig
