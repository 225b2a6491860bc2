"""CFA (Wei, Wang, Guo, Wang, CVPR 2023): class-wise calibrated radius (CCM) and TRADES weight (CCR), plus FAWA.

Paper: "CFA: Class-wise Calibrated Fair Adversarial Training". Official code: github.com/PKU-ML/CFA
(train.py, attack.py cw_trades_loss, utils.py weight_average). "TRADES + CFA" = CCM + CCR + FAWA:

- per batch: TRADES-KL PGD with radius eps_k = eps[y] and a fixed step 2/255, then CFA's normalised TRADES
  loss (1/B) sum_i (1 - b[y_i]) CE_i + b[y_i] KL_i (cfa.md 2.2); the train-mode adversarial logits of the
  loss are counted per class on the device (index_add, no host sync);
- at the start of each calibrated epoch, from the previous epoch's training robust accuracy
  t_k = C * correct_k / N: eps_k = (lambda1 + t_k) eps and
  b_k = (lambda2 + t_k) beta / (1 + (lambda2 + t_k) beta);
- after each epoch: FAWA absorbs the weights when the validation worst-class PGD-10 accuracy reaches the
  threshold (fairbench/averaging.py); `eval_model` returns the FAWA model.

Epochs: the code's `epoch >= begin` counts from 0, fairbench from 1, so the calibrated settings start at
1-indexed epoch `begin + 1` (begin = 10: epochs 1-10 uniform, epoch 11 uses the statistics of epoch 10), the
same epoch as the official 0-indexed epoch 10.

Differences from the official code (documented deviations):
- Input normalisation: the official PreAct ResNet-18 is fed `(x - mean) / std` with CIFAR-10 mean/std; fairbench
  models take [0, 1] inputs without normalisation. Attacks and radii are in [0, 1] pixel space in both.
- Checkpoint choice: the code keeps the checkpoints whose *test* robust + worst-class accuracy is within 0.02 of
  the best; fairbench does not copy this selection on the test set and evaluates the last checkpoints.
- FAWA that never starts: the code silently evaluates the randomly initialised FAWA model; here `eval_model`
  falls back to the last model with a warning (per evaluated checkpoint: with `eval_last` > 1 an early
  checkpoint can fall back while later ones are averaged).
- One clean train-mode forward serves CE and the KL target (the code runs it twice, updating BatchNorm's running
  statistics once more); the plain EMA the code logs is kept only with `averaging="ema"`, which then
  replaces FAWA.
- After the optimiser step the code's training loop forwards the clean batch once more in train mode, to log
  clean training accuracy; that forward updates BatchNorm's running statistics again (which the eval-mode attacks
  of later batches and the evaluation use). fairbench leaves it out under either protocol, as it leaves out the
  duplicate clean forward.
- The validation split is 2% of each class (100 of 5000 on CIFAR-10, as the code); the code's CIFAR-100 split
  (25 of 500 per class) would be 5%. On small runs the split comes from the `train_per_class` subset.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.attacks.training import clean_logits, inner_attack, kl_per_sample
from fairbench.averaging import Averaging, ModelAverager, worst_class_robust_accuracy
from fairbench.method import Batch, FairAT, RunContext, StepOut, ValidationSpec
from fairbench.registry import register_method

OFFICIAL_PROTOCOL = {"arch": "preact_resnet18", "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                     "nesterov": False, "weight_decay": 5e-4, "schedule": "madry"}
"""PKU-ML/CFA and FAIR-TAT: PreAct ResNet-18, 200 epochs, lr 0.1 /10 at 50% /100 at 75%, SGD without Nesterov."""


@dataclass(frozen=True)
class CfaConfig:
    lambda1: float = 0.5
    """CCM: eps_k = (lambda1 + t_k) * eps."""
    lambda2: float = 0.5
    """CCR: b_k = (lambda2 + t_k) beta / (1 + (lambda2 + t_k) beta)."""
    begin: int = 10
    """Uniform epochs: CCM/CCR apply from 1-indexed epoch begin+1 (the code's 0-indexed `epoch >= begin`)."""
    ccm: bool = True
    """Class-wise calibrated margin (per-class radius); False = eps for every class."""
    ccr: bool = True
    """Class-wise calibrated regularisation (per-class TRADES weight); False = beta/(1+beta) for every class."""
    beta: float = 6.0
    """TRADES trade-off; without CCR the KL weight is b = beta/(1+beta) = 6/7."""
    normalised_trades: bool = True
    """CFA's normalised TRADES (official); False multiplies the loss by 1+beta (the TRADES scale)."""
    eps: float = 8 / 255
    """Base training radius."""
    alpha: float = 2 / 255
    """Attack step, the same for every class (not scaled with eps_k)."""
    steps: int = 10
    """Inner attack steps."""
    averaging: Averaging = "fawa"
    """Model evaluated: 'fawa' (official), 'ema' (the code's plain EMA of every epoch) or 'off' (last model)."""
    decay: float = 0.88
    """Decay rate d of FAWA/EMA: avg <- d avg + (1 - d) current."""
    threshold: float = 0.24
    """FAWA accepts an epoch when the validation worst-class PGD accuracy is >= this (train.py default;
    the README's example command uses 0.2: --set threshold=0.2)."""
    val_eps: float = 8 / 255
    """Radius of the validation PGD."""
    val_alpha: float = 2 / 255
    """Step of the validation PGD."""
    val_steps: int = 10
    """Steps of the validation PGD (CE, uniform start, eval mode)."""


class RobustTally:
    """Per-class counts of one epoch's train-mode adversarial predictions, kept on the device."""

    def __init__(self, num_classes: int, device: torch.device):
        self.correct = torch.zeros(num_classes, device=device)
        """Samples of true class k predicted k."""
        self.false_positive = torch.zeros(num_classes, device=device)
        """Misclassified samples (of any true class) predicted as k."""
        self.seen = 0

    def reset(self) -> None:
        self.correct.zero_()
        self.false_positive.zero_()
        self.seen = 0

    def record(self, logits_adv: Tensor, y: Tensor) -> None:
        """index_add only: no host synchronisation inside the training step."""
        pred = logits_adv.detach().argmax(1)
        hit = (pred == y).to(self.correct.dtype)
        self.correct.index_add_(0, y, hit)
        self.false_positive.index_add_(0, pred, 1 - hit)
        self.seen += y.shape[0]

    def accuracy(self) -> Tensor:
        """C * correct_k / N: class-wise accuracy with the code's balanced-class normaliser (not per-class counts)."""
        return self.correct * self.correct.shape[0] / max(self.seen, 1)

    def false_positive_share(self) -> tuple[Tensor, Tensor]:
        """(CFPS, any error): the share of all errors predicted as each class; sums to 1 when there are errors."""
        errors = self.false_positive.sum()
        return self.false_positive / errors.clamp_min(1), errors > 0


def calibrating(epoch: int, begin: int) -> bool:
    """Whether 1-indexed `epoch` uses the per-class settings: the code's 0-indexed `epoch >= begin`, and never
    epoch 1 (no statistics yet)."""
    return epoch > max(begin, 1)


def calibrated_radius(acc: Tensor, lam: float, eps: float) -> Tensor:
    """CCM (and FAIR-TAT's G-rob): eps_k = (lam + acc_k) * eps, so more robust classes get a larger radius."""
    return (lam + acc) * eps


def calibrated_weight(acc: Tensor, lam: float, beta: float) -> Tensor:
    """CCR: b_k = (lam + acc_k) beta / (1 + (lam + acc_k) beta), in (0, 1), increasing with acc_k."""
    scaled = (lam + acc) * beta
    return scaled / (1 + scaled)


def calibrated_trades_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, b: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """CFA's TRADES: (1/B) sum_i (1 - b_i) CE(f(x_i), y_i) + b_i KL(p(x_i) || p(x_adv_i)), in train mode.

    Two forwards (clean first, the code's order), the clean softmax not detached, as `trades_loss`. Returns
    (loss, clean logits, adversarial logits). With b_i = beta/(1+beta) this is TRADES / (1 + beta).
    """
    logits = model(x).float()
    logits_adv = model(x_adv).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    kl = kl_per_sample(logits, logits_adv)
    loss = ((1 - b) * ce + b * kl).sum() / x.shape[0]
    return loss, logits, logits_adv


def make_averager(config: Any, owner: str, ctx: RunContext) -> ModelAverager:
    """The FAWA/EMA keeper of CFA and FAIR-TAT; checks that FAWA has a usable validation split."""
    if config.averaging == "fawa":
        if ctx.val_split is None or len(ctx.val_split) == 0:
            raise ValueError(f"{owner}: FAWA needs a validation split, but it is empty; train on more samples "
                             "per class (2% of each class is held out) or pass --set averaging=off")
        present = torch.bincount(ctx.val_split.labels, minlength=ctx.num_classes)
        if bool((present == 0).any()):
            warnings.warn(f"{owner}: the validation split misses some classes, so their accuracy is 0 and FAWA "
                          "can start only with threshold <= 0")
    return ModelAverager(config.averaging, config.decay, config.threshold, owner)


def average_after_epoch(averager: ModelAverager, config: Any, ctx: RunContext) -> None:
    """FAWA / EMA step on the trained model, scored on the validation split only when FAWA needs it."""
    if averager.mode != "off" and ctx.model is None:
        raise ValueError("weight averaging needs ctx.model (the engine sets it)")
    averager.after_epoch(ctx.model, lambda: worst_class_robust_accuracy(
        ctx, ctx.model, config.val_eps, config.val_alpha, config.val_steps))


@register_method("cfa")
class Cfa(FairAT):
    description = "CFA: class-wise radius (CCM) and TRADES weight (CCR) from training robust accuracy; FAWA model"
    Config = CfaConfig
    validation = ValidationSpec(fraction=0.02, position="first")
    official_protocol = OFFICIAL_PROTOCOL

    def setup(self, ctx: RunContext) -> None:
        cfg = self.config
        self.device = ctx.device
        self.t = torch.zeros(ctx.num_classes, device=ctx.device)
        self.tally = RobustTally(ctx.num_classes, ctx.device)
        self.eps, self.b = self.uniform_settings()
        self.averager = make_averager(cfg, self.name, ctx)
        if (cfg.ccm or cfg.ccr) and cfg.begin >= ctx.epochs:
            warnings.warn(f"{self.name}: begin={cfg.begin} >= epochs={ctx.epochs}, so CCM/CCR never switch on; "
                          f"pass --set begin=N with N < {ctx.epochs}")

    def uniform_settings(self) -> tuple[Tensor, Tensor]:
        cfg, c = self.config, self.t.shape[0]
        return (torch.full((c,), cfg.eps, device=self.device),
                torch.full((c,), cfg.beta / (1 + cfg.beta), device=self.device))

    def on_epoch_start(self, epoch: int, ctx: RunContext) -> None:
        """CCM and CCR from the previous epoch's t (recomputed every epoch: no momentum)."""
        cfg = self.config
        self.eps, self.b = self.uniform_settings()
        if calibrating(epoch, cfg.begin):
            if cfg.ccm:
                self.eps = calibrated_radius(self.t, cfg.lambda1, cfg.eps)
            if cfg.ccr:
                self.b = calibrated_weight(self.t, cfg.lambda2, cfg.beta)
        self.tally.reset()

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, ctx: RunContext) -> Tensor:
        """TRADES-KL PGD with radius eps[y] and the fixed step alpha."""
        cfg = self.config
        return inner_attack(model, x, clean_logits(model, x), eps=self.eps[y], alpha=cfg.alpha, steps=cfg.steps,
                            generator=ctx.generator)

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg = self.config
        x_adv = self.adversarial(model, batch.x, batch.y, ctx)
        loss, _, logits_adv = calibrated_trades_loss(model, batch.x, x_adv, batch.y, self.b[batch.y])
        if not cfg.normalised_trades:
            loss = loss * (1 + cfg.beta)
        self.tally.record(logits_adv, batch.y)
        return StepOut(loss)

    def on_epoch_end(self, epoch: int, ctx: RunContext) -> None:
        self.t = self.tally.accuracy()
        average_after_epoch(self.averager, self.config, ctx)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.averager.eval_model(model)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "eps": self.eps, "b": self.b, "averaging": self.averager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.eps, self.b = (state[k].to(self.device) for k in ("t", "eps", "b"))
        self.averager.load_state_dict(state["averaging"], self.device)
