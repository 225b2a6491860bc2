"""CFA (Wei, Wang, Guo, Wang, CVPR 2023): class-wise calibrated radius (CCM) and TRADES weight (CCR), plus FAWA.

Paper: "CFA: Class-wise Calibrated Fair Adversarial Training". Official code: github.com/PKU-ML/CFA
(train.py, attack.py cw_trades_loss, utils.py weight_average). "TRADES + CFA" = CCM + CCR + FAWA:

- per batch: TRADES-KL PGD with radius eps_k = eps[y] and a fixed step 2/255, then CFA's normalised TRADES
  loss (1/B) sum_i (1 - b[y_i]) CE_i + b[y_i] KL_i (docs/methods/cfa.md §2.2); the train-mode adversarial logits of the
  loss are counted per class on the device (index_add, no host sync);
- at the start of each calibrated epoch, from the previous epoch's training robust accuracy
  t_k = C * correct_k / N: eps_k = (lambda1 + t_k) eps and
  b_k = (lambda2 + t_k) beta / (1 + (lambda2 + t_k) beta) (tally, radius, weight and loss: fairbench/calibration.py,
  shared with FAIR-TAT);
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
from torch import Tensor

from fairbench.adversaries import clean_logits, inner_attack
from fairbench.averaging import Averaging, average_after_epoch, make_averager
from fairbench.calibration import RobustTally, calibrated_radius, calibrated_trades_loss, calibrated_weight, calibrating
from fairbench.method import Batch, FairAT, RunContext, Services, StepOut, ValidationSpec
from fairbench.registry import register_method


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


@register_method("cfa")
class Cfa(FairAT):
    description = "CFA: class-wise radius (CCM) and TRADES weight (CCR) from training robust accuracy; FAWA model"
    Config = CfaConfig
    services = Services(validation=ValidationSpec(fraction=0.02, position="first"))
    official_protocol = {"arch": "preact_resnet18", "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                         "nesterov": False, "weight_decay": 5e-4, "schedule": "madry"}
    """PKU-ML/CFA: PreAct ResNet-18, 200 epochs, lr 0.1 /10 at 50% /100 at 75%, SGD without Nesterov."""

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

    def on_epoch_start(self, epoch: int, model: nn.Module, ctx: RunContext) -> None:
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

    def on_epoch_end(self, epoch: int, model: nn.Module, ctx: RunContext) -> None:
        self.t = self.tally.accuracy()
        average_after_epoch(self.averager, self.config, model, ctx)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.averager.eval_model(model)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "eps": self.eps, "b": self.b, "averaging": self.averager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.eps, self.b = (state[k].to(self.device) for k in ("t", "eps", "b"))
        self.averager.load_state_dict(state["averaging"], self.device)
