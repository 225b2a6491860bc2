"""The `FairAT` method interface and the small context object a method sees.

A method never owns the loop: the engine calls its hooks, checkpoints its `state_dict`, and offers
the services several methods share (a held-out validation split, a per-sample memory of adversarial
probabilities, class-wise accuracy on a split, a seeded generator). A method declares the services it uses
in one place, `services = Services(...)`; `fairbench.engine.build_context` allocates exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:
    from fairbench.attacks.registry import EvalAttack
    from fairbench.data.loader import DeviceSplit


@dataclass
class Batch:
    x: Tensor
    """Augmented float images in [0, 1] on the device."""
    y: Tensor
    """int64 labels."""
    idx: Tensor
    """int64 positions in the training split (stable across epochs), for per-sample memories."""


@dataclass
class StepOut:
    loss: Tensor
    """Scalar to minimise; the engine calls backward and checks finiteness without a host sync."""
    log: dict[str, Tensor] = field(default_factory=dict)
    """Detached scalars to show in the progress line (reduced by the engine at log intervals)."""


@dataclass(frozen=True)
class ValidationSpec:
    """A held-out split taken from the training set per class, in dataset order (FRL, WAT, CFA)."""

    fraction: float
    """Share of each class held out (FRL/WAT: 0.06 = 300 of 5000, CFA: 0.02 = 100 of 5000)."""
    position: Literal["first", "last"] = "last"
    """Which end of each class's samples (in dataset order) is held out."""


class SampleMemory:
    """One row per training sample: the latest recorded probability vector and whether it was written.

    DAFA and TRIX fill it during their warm-up epoch from the adversarial predictions; the class
    similarity matrix is then one `index_add` on the device.
    """

    def __init__(self, num_samples: int, num_classes: int, device: torch.device):
        self.probs = torch.zeros(num_samples, num_classes, device=device)
        self.labels = torch.full((num_samples,), -1, dtype=torch.long, device=device)
        self.written = torch.zeros(num_samples, dtype=torch.int32, device=device)

    def reset(self) -> None:
        self.probs.zero_()
        self.labels.fill_(-1)
        self.written.zero_()

    def record(self, idx: Tensor, probs: Tensor, labels: Tensor) -> None:
        self.probs[idx] = probs.detach().float()
        self.labels[idx] = labels
        self.written[idx] += 1

    def class_similarity(self) -> Tensor:
        """P[i, j] = mean recorded probability of class j over the written samples of true class i."""
        c = self.probs.shape[1]
        mask = self.written > 0
        labels, probs = self.labels[mask], self.probs[mask]
        sums = torch.zeros(c, c, device=probs.device).index_add_(0, labels, probs)
        counts = torch.bincount(labels, minlength=c).clamp_min(1).unsqueeze(1)
        return sums / counts


@dataclass(frozen=True)
class Services:
    """The engine services a method uses, declared once as the class attribute `services`."""

    sample_memory: bool = False
    """`ctx.memory`: one probability vector per training sample (DAFA and TRIX fill it in their warm-up epoch)."""
    validation: ValidationSpec | None = None
    """`ctx.val_split`: this share of each class is held out of training (FRL, WAT, CFA, FAIR-TAT)."""


@dataclass
class RunContext:
    """What a method may use. Built by `fairbench.engine.build_context`; methods read it, they do not construct it.

    The model is not part of it: `training_loss` and the epoch hooks receive it as an argument.
    """

    num_classes: int
    device: torch.device
    epochs: int
    generator: torch.Generator
    """Seeded per epoch on the device: draw attack noise and targets from it, never from the global RNG."""
    epoch: int = 0
    """Current epoch, counted from 1 as in the DAFA/TRIX/TRADES code."""
    memory: SampleMemory | None = None
    """Allocated when the method declares `Services(sample_memory=True)`."""
    val_split: "DeviceSplit | None" = None
    """Allocated when the method declares `Services(validation=ValidationSpec(...))`."""
    eval_batch_size: int = 256

    def classwise_accuracy(self, model: nn.Module, split: "DeviceSplit",
                           attack: "str | EvalAttack | None" = None, eps: float = 8 / 255) -> Tensor:
        """Per-class accuracy (C,) of `model` on `split`: clean, or under an attack given by registered name
        (at radius `eps`) or as an `EvalAttack` instance (e.g. ``PGD(8/255, steps=20, alpha=2/255)``)."""
        from fairbench.evaluation import classwise_accuracy

        return classwise_accuracy(model, split, self.num_classes, attack, self.eval_batch_size,
                                  seed=self.epoch, eps=eps)


class FairAT:
    """Base class of every training method. Override `training_loss`; the other hooks are optional."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    """One line shown by `fairbench methods`."""
    Config: ClassVar[type] = object
    """A dataclass of hyperparameters with the paper's defaults, one docstring per field."""
    services: ClassVar[Services] = Services()
    """Engine services to allocate (sample memory, validation split); the default asks for none."""
    official_protocol: ClassVar[dict[str, Any]] = {}
    """The official code's optimisation (epochs, lr, schedule, weight_decay, nesterov, momentum, batch_size, arch),
    used with ``--protocol official``; by default every method runs under the common TRADES protocol."""
    hot_start: ClassVar[str | None] = None
    """A method whose finished run (same dataset, arch, seed) provides the start weights (FRL fine-tunes a
    TRADES model); its `official_protocol` then describes the fine-tuning stage and always applies."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _refuse_older_interface(cls)

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.Config()

    def setup(self, ctx: RunContext) -> None:
        """Allocate per-class state on `ctx.device`."""

    def on_epoch_start(self, epoch: int, model: nn.Module, ctx: RunContext) -> None:
        """Called before the first batch of `epoch` (1-indexed) with the model being trained."""

    def training_loss(self, model: nn.Module, batch: Batch, ctx: RunContext) -> StepOut:
        raise NotImplementedError(f"{type(self).__name__} must define training_loss (abstract)")

    def on_epoch_end(self, epoch: int, model: nn.Module, ctx: RunContext) -> None:
        """Called after the last batch of `epoch` with the model being trained, before the checkpoint is written."""

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate and report; CFA returns its weight-averaged copy."""
        return model

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors are saved as they are)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but the checkpoint holds {sorted(state)}")


def _refuse_older_interface(cls: type) -> None:
    """A method written for the interface before `services` and the explicit model fails at import, by name,
    instead of training without its services or failing in the first epoch hook."""
    import inspect

    old = [name for name in ("needs", "validation") if name in vars(cls)]
    if old:
        raise TypeError(f"{cls.__name__} declares {' and '.join(old)}; declare engine services in one place: "
                        "services = Services(sample_memory=True, validation=ValidationSpec(...))")
    for hook in ("on_epoch_start", "on_epoch_end"):
        if hook in vars(cls) and len(inspect.signature(vars(cls)[hook]).parameters) == 3:  # (self, epoch, ctx)
            raise TypeError(f"{cls.__name__}.{hook} takes (self, epoch, ctx); the engine now passes the model: "
                            f"def {hook}(self, epoch, model, ctx)")
