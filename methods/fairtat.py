"""FAIR-TAT (Medi, Jung, Keuper, WACV 2025), fairbench TRADES adaptation: targeted adversaries toward classes
the model over-predicts, with CFA's class-wise radius.

Paper: "FAIR-TAT: Improving Model Fairness Using Targeted Adversarial Training" (arXiv 2410.23142).
Official code: github.com/TejaswiniMedi/FAIR-TAT (target_train_new.py, Targeted_attack.py; README command
`--mode AT --ccm --lambda-r 0.5 --lambda-c 0.5 --untargeted 0 --adaptive_eps G-rob`).

**This is not the official algorithm but the TRADES adaptation of docs/methods/fairtat.md §2.** The official targeted
attack exists only for PGD-AT (CE outer loss) and its TRADES mode ignores the targets; as TRIX does, fairbench
turns the targeted adversary into a TRADES adversary:

- every sample is attacked with targeted CE descent toward t_i (eval mode, start x + 0.001 N(0,1), K steps,
  projection onto [x - eps[y], x + eps[y]] then [0, 1]; the step alpha is not scaled per class);
- outer loss: standard TRADES, CE + beta KL(clean || adv) (option: CFA's normalised form);
- per-class statistics of the train-mode adversarial logits of the loss (index_add, no host sync):
  acc_k = C * correct_k / N and CFPS_c = share of all errors predicted as c;
- at the start of each calibrated epoch (1-indexed epoch > begin, the code's 0-indexed `epoch >= begin`;
  begin = 1: epoch 1 uniform, epoch 2 onward calibrated): eps_k = (lambda_r + acc_k) eps ("G-rob") and
  q = softmax(2 * CFPS); before that, q is uniform, so epoch 1 draws uniform wrong-class targets;
- targets: t_i ~ q restricted to the classes != y_i (q masked at y_i and renormalised per sample). That is
  exactly the distribution of the code's "draw from q, redraw from q until t != y", drawn in one vectorised
  pass (an exponential race argmax_c q_c / E_c, E ~ Exp(1), on the device, no loop, no host sync).

Documented deviations: every collision t = y is redrawn (the code leaves a single collision in a batch in place;
`collisions="official"` reproduces that); CFPS without any error keeps the previous q (the code divides by
zero); the other radius rules of the code (G-cfps, T-rob, ...) are not offered; models take [0, 1] inputs
without the code's CIFAR normalisation wrapper. Weight averaging (the code's FAWA, decay 0.85, threshold 0.20)
is optional and off by default, so the last model is evaluated unless `averaging` is set. As in the code, the
first 2% of each class is held out as the validation split (used only by the optional averaging).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from fairbench.adversaries import clean_logits, inner_attack, per_sample, start_point, trades_loss
from fairbench.averaging import Averaging, average_after_epoch, make_averager
from fairbench.calibration import RobustTally, calibrated_radius, calibrated_trades_loss, calibrating
from fairbench.method import Batch, FairAT, RunContext, Services, StepOut, ValidationSpec
from fairbench.registry import register_method


@dataclass(frozen=True)
class FairTatConfig:
    beta: float = 6.0
    """TRADES trade-off of the outer loss."""
    eps: float = 8 / 255
    """Base training radius (the code's 8/255; 0.031 under the TRIX protocol)."""
    alpha: float = 2 / 255
    """Attack step, not scaled per class (the code's 2/255; 0.007 under the TRIX protocol)."""
    steps: int = 10
    """Inner attack steps."""
    init: Literal["normal", "uniform"] = "normal"
    """Attack start: x + 0.001 N(0,1) (TRADES convention) or uniform in the class's ball (the AT attack)."""
    lambda_r: float = 0.5
    """G-rob radius: eps_k = (lambda_r + acc_k) * eps (README value; the argument default varies by commit)."""
    begin: int = 1
    """Uniform epochs: radius and q apply from 1-indexed epoch begin+1 (the code's 0-indexed `epoch >= begin`)."""
    ccm: bool = True
    """Class-wise radius; False = eps for every class (targets still follow q)."""
    cfps_scale: float = 2.0
    """q = softmax(cfps_scale * CFPS) (the code's factor 2)."""
    random_target: bool = False
    """The code's --random_target: uniform wrong-class targets in every epoch."""
    collisions: Literal["redraw", "official"] = "redraw"
    """'redraw': no target equals its label; 'official': a lone collision in a batch stays (the code's quirk)."""
    untargeted: bool = False
    """The code's --untargeted 1: the TRADES KL-ascent adversary instead of targets (with ccm=False: TRADES)."""
    normalised_trades: bool = False
    """CFA's normalised TRADES (1 - b) CE + b KL with b = beta/(1+beta), as the code's untargeted TRADES mode."""
    averaging: Averaging = "off"
    """Model evaluated: 'off' (last model, default), 'fawa' or 'ema' (the code saves all three)."""
    decay: float = 0.85
    """Decay rate of the weight average."""
    threshold: float = 0.20
    """FAWA accepts an epoch when the validation worst-class PGD accuracy is >= this."""
    val_eps: float = 8 / 255
    """Radius of the validation PGD (FAWA only)."""
    val_alpha: float = 2 / 255
    """Step of the validation PGD."""
    val_steps: int = 10
    """Steps of the validation PGD (CE, uniform start, eval mode)."""


def categorical_race(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of c ~ probs (unnormalised rows): argmax_c probs_c / E_c with E_c ~ Exp(1).

    An exponential race picks c with probability probs_c / sum(probs); it needs one B x C draw, no loop and no
    host sync (torch.multinomial checks its input with a host sync). E is clamped away from 0 so no score is
    0/0.
    """
    race = torch.empty(probs.shape, device=probs.device, dtype=probs.dtype).exponential_(generator=generator)
    return (probs / race.clamp_min(torch.finfo(probs.dtype).tiny)).argmax(1)


def restricted_targets(y: Tensor, q: Tensor, generator: torch.Generator | None) -> Tensor:
    """t_i ~ q restricted to the classes != y_i, renormalised: exactly the law of "redraw from q until t != y"."""
    probs = q.unsqueeze(0).expand(y.shape[0], -1).scatter(1, y.unsqueeze(1), 0.0)
    return categorical_race(probs, generator)


def official_collision_targets(y: Tensor, q: Tensor, generator: torch.Generator | None) -> Tensor:
    """The code's rule: t ~ q; colliding samples are redrawn only when two or more collide in the batch."""
    first = categorical_race(q.unsqueeze(0).expand(y.shape[0], -1), generator)
    collide = first == y
    redrawn = restricted_targets(y, q, generator)
    return torch.where(collide & (collide.sum() >= 2), redrawn, first)


def target_distribution(cfps: Tensor, scale: float) -> Tensor:
    """q = softmax(scale * CFPS): global, not conditioned on the true class; max q / min q <= e^scale."""
    return torch.softmax(scale * cfps, dim=0)


@register_method("fairtat")
class FairTat(FairAT):
    description = ("FAIR-TAT (fairbench TRADES adaptation): targets drawn from softmax(2*CFPS), "
                   "CFA radius from training robust accuracy")
    Config = FairTatConfig
    services = Services(validation=ValidationSpec(fraction=0.02, position="first"))
    official_protocol = {"arch": "preact_resnet18", "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                         "nesterov": False, "weight_decay": 5e-4, "schedule": "madry"}
    """The FAIR-TAT code's (that of CFA): PreAct ResNet-18, 200 epochs, lr 0.1 /10 at 50% /100 at 75%."""

    def setup(self, ctx: RunContext) -> None:
        cfg, c = self.config, ctx.num_classes
        self.device = ctx.device
        self.acc = torch.zeros(c, device=ctx.device)
        self.cfps = torch.zeros(c, device=ctx.device)
        self.eps = torch.full((c,), cfg.eps, device=ctx.device)
        self.q = torch.full((c,), 1 / c, device=ctx.device)
        self.tally = RobustTally(c, ctx.device)
        self.averager = make_averager(cfg, self.name, ctx)
        if cfg.begin >= ctx.epochs:
            warnings.warn(f"{self.name}: begin={cfg.begin} >= epochs={ctx.epochs}, so radius and targets stay "
                          f"uniform; pass --set begin=N with N < {ctx.epochs}")

    def on_epoch_start(self, epoch: int, model: nn.Module, ctx: RunContext) -> None:
        """G-rob radius and q from the previous epoch's statistics; uniform before `begin`."""
        cfg, c = self.config, self.acc.shape[0]
        on = calibrating(epoch, cfg.begin)
        self.eps = calibrated_radius(self.acc, cfg.lambda_r, cfg.eps) if on and cfg.ccm else \
            torch.full((c,), cfg.eps, device=self.device)
        self.q = target_distribution(self.cfps, cfg.cfps_scale) if on and not cfg.random_target else \
            torch.full((c,), 1 / c, device=self.device)
        self.tally.reset()

    def targets(self, y: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.config.collisions == "official":
            return official_collision_targets(y, self.q, generator)
        return restricted_targets(y, self.q, generator)

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, ctx: RunContext
                    ) -> tuple[Tensor, Tensor | None]:
        """(x_adv, targets): targeted CE descent for every sample (or TRADES's KL ascent with `untargeted`)."""
        cfg = self.config
        eps = self.eps[y]
        start = start_point(x, per_sample(eps, x), cfg.init, ctx.generator)  # noise before targets, as TRIX
        if cfg.untargeted:
            x_adv = inner_attack(model, x, clean_logits(model, x), eps=eps, alpha=cfg.alpha, steps=cfg.steps,
                                 generator=ctx.generator, start=start)
            return x_adv, None
        targets = self.targets(y, ctx.generator)
        everyone = torch.ones_like(y, dtype=torch.bool)
        x_adv = inner_attack(model, x, None, eps=eps, alpha=cfg.alpha, steps=cfg.steps, generator=ctx.generator,
                             targets=targets, targeted=everyone, start=start, untargeted="ce", labels=y)
        return x_adv, targets

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        cfg = self.config
        x_adv, _ = self.adversarial(model, batch.x, batch.y, ctx)
        if cfg.normalised_trades:
            b = torch.full(batch.y.shape, cfg.beta / (1 + cfg.beta), device=batch.x.device)
            loss, _, logits_adv = calibrated_trades_loss(model, batch.x, x_adv, batch.y, b)
        else:
            loss, _, logits_adv = trades_loss(model, batch.x, x_adv, batch.y, cfg.beta)
        self.tally.record(logits_adv, batch.y)
        return StepOut(loss)

    def on_epoch_end(self, epoch: int, model: nn.Module, ctx: RunContext) -> None:
        """acc and CFPS of this epoch (CFPS without any error keeps the previous one, hence the previous q)."""
        self.acc = self.tally.accuracy()
        share, any_error = self.tally.false_positive_share()
        self.cfps = torch.where(any_error, share, self.cfps)
        average_after_epoch(self.averager, self.config, model, ctx)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.averager.eval_model(model)

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "cfps": self.cfps, "eps": self.eps, "q": self.q,
                "averaging": self.averager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc, self.cfps, self.eps, self.q = (state[k].to(self.device) for k in ("acc", "cfps", "eps", "q"))
        self.averager.load_state_dict(state["averaging"], self.device)
