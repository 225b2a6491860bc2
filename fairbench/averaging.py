"""Weight averaging of CFA (FAWA) and FAIR-TAT: an exponential average of a model's whole state dict.

A method keeps a `ModelAverager` (`make_averager` in `setup`), calls `average_after_epoch` in `on_epoch_end`
and returns `averager.eval_model(model)` from `eval_model`.

CFA's `utils.weight_average` averages every entry of the state dict, BatchNorm running statistics
included (they are averaged, not recomputed): ``avg <- d * avg + (1 - d) * current``, the first update
being a plain copy. FAWA (fairness-aware weight averaging, docs/methods/cfa.md §2.5) only absorbs the epochs whose
worst-class PGD-10 accuracy on the validation split reaches a threshold; the plain EMA absorbs every
epoch. The averaged weights live on the model's device and are part of the method's `state_dict`, so a
resumed run and the evaluation of the last checkpoints see the same averaged model.

The integer counter `num_batches_tracked` keeps the value of the first copy: averaging it is a no-op for
BatchNorm with a momentum (the official code's float average is truncated back into the int buffer).
"""
from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:
    from fairbench.method import RunContext

Averaging = Literal["fawa", "ema", "off"]


class WeightAverage:
    """avg <- decay * avg + (1 - decay) * current over the whole state dict; the first update copies."""

    def __init__(self, decay: float):
        self.decay = decay
        self.weights: dict[str, Tensor] = {}
        self.updates = 0
        self._module: nn.Module | None = None
        self._stale = True

    @property
    def started(self) -> bool:
        return self.updates > 0

    def update(self, model: nn.Module) -> None:
        """Absorb the current weights (new tensors each time, so an earlier `state_dict()` stays valid)."""
        current = model.state_dict()
        if not self.started:
            self.weights = {k: v.detach().clone() for k, v in current.items()}
        else:
            d = self.decay
            self.weights = {k: (avg * d + current[k] * (1 - d)) if avg.is_floating_point() else avg
                            for k, avg in self.weights.items()}
        self.updates += 1
        self._stale = True

    def averaged_model(self, like: nn.Module) -> nn.Module:
        """A copy of `like`'s structure holding the averaged weights; built once, reloaded when they change."""
        if not self.started:
            raise RuntimeError("the weight average has not absorbed any model yet")
        if self._module is None:
            self._module = copy.deepcopy(like)
            self._stale = True
        if self._stale:
            self._module.load_state_dict(self.weights)
            self._stale = False
        return self._module

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any], device=None) -> None:
        self.weights = {k: v.to(device) if device is not None else v for k, v in state["weights"].items()}
        self.updates = int(state["updates"])
        self._stale = True


class ModelAverager:
    """FAWA, the plain EMA, or nothing, as the CFA / FAIR-TAT code keep them, with the model to evaluate."""

    def __init__(self, mode: Averaging, decay: float, threshold: float, owner: str):
        self.mode, self.threshold, self.owner = mode, threshold, owner
        self.average = WeightAverage(decay)
        self.last_score: float | None = None
        """The latest validation worst-class robust accuracy (FAWA only), kept for the run metadata."""

    def after_epoch(self, model: nn.Module, score: Callable[[], float]) -> bool:
        """Absorb `model` if the mode accepts this epoch; `score` is evaluated only for FAWA."""
        if self.mode == "off":
            return False
        if self.mode == "fawa":
            self.last_score = float(score())
            if self.last_score < self.threshold:
                return False
        self.average.update(model)
        return True

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The averaged model; the last model (with a warning) if FAWA never accepted an epoch."""
        if self.mode == "off":
            return model
        if not self.average.started:
            why = (f"the validation worst-class robust accuracy never reached threshold {self.threshold}"
                   if self.mode == "fawa" else "no epoch has ended")
            warnings.warn(f"{self.owner}: {self.mode.upper()} never started ({why}); "
                          "evaluating the last model instead")
            return model
        return self.average.averaged_model(model)

    def state_dict(self) -> dict[str, Any]:
        return {**self.average.state_dict(), "last_score": self.last_score}

    def load_state_dict(self, state: dict[str, Any], device=None) -> None:
        self.average.load_state_dict(state, device)
        self.last_score = state["last_score"]


def worst_class_robust_accuracy(ctx: "RunContext", model: nn.Module, eps: float, alpha: float,
                                steps: int) -> float:
    """min over classes of CE-PGD accuracy on the validation split (eval mode, uniform start): FAWA's test."""
    from fairbench.attacks.pgd import PGD

    if ctx.val_split is None or len(ctx.val_split) == 0:
        raise ValueError("weight averaging needs the validation split; it is empty "
                         "(train on more samples per class)")
    return float(ctx.classwise_accuracy(model, ctx.val_split, PGD(eps, steps=steps, alpha=alpha)).min())


def make_averager(config: Any, owner: str, ctx: "RunContext") -> ModelAverager:
    """The FAWA/EMA keeper of a config with `averaging`, `decay` and `threshold` (CFA, FAIR-TAT); checks that
    FAWA has a usable validation split."""
    if config.averaging == "fawa":
        if ctx.val_split is None or len(ctx.val_split) == 0:
            raise ValueError(f"{owner}: FAWA needs a validation split, but it is empty; train on more samples "
                             "per class (2% of each class is held out) or pass --set averaging=off")
        present = torch.bincount(ctx.val_split.labels, minlength=ctx.num_classes)
        if bool((present == 0).any()):
            warnings.warn(f"{owner}: the validation split misses some classes, so their accuracy is 0 and FAWA "
                          "can start only with threshold <= 0")
    return ModelAverager(config.averaging, config.decay, config.threshold, owner)


def average_after_epoch(averager: ModelAverager, config: Any, model: nn.Module, ctx: "RunContext") -> None:
    """FAWA / EMA step on the trained `model`, scored on the validation split (PGD with the config's `val_eps`,
    `val_alpha`, `val_steps`) only when FAWA needs it."""
    averager.after_epoch(model, lambda: worst_class_robust_accuracy(
        ctx, model, config.val_eps, config.val_alpha, config.val_steps))
