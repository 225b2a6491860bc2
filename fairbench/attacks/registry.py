"""Evaluation attacks by name. An attack is a *suite* of one or more components; each component
returns one adversarial point per sample, and the evaluator verifies and records every one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch.nn as nn
from torch import Tensor

from fairbench.errors import ClassCountError, UnknownNameError


@dataclass
class ComponentOutput:
    component: str
    x_adv: Tensor
    """Returned points, in the feasible set of the suite's eps."""
    success_any: Tensor | None = None
    """PGD: some iterate was misclassified (the training scripts' stronger logging criterion)."""
    queries: Tensor | None = None
    """Square: forwards spent per sample."""


class EvalAttack:
    """Base of evaluation attacks: `run` yields one `ComponentOutput` per component, in cascade order."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    shardable: ClassVar[bool] = True
    """Whether a sample's record is independent of the other samples in its chunk, so that a chunk may be
    split into CPU shards."""

    def __init__(self, eps: float):
        self.eps = eps

    def settings(self) -> dict:
        """Every hyperparameter, recorded in the run metadata even when defaulted."""
        return {"eps": self.eps}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
            active: Tensor) -> Iterator[ComponentOutput]:
        """`active` marks the samples still worth attacking (clean-correct, not yet broken)."""
        raise NotImplementedError("abstract")


ATTACKS: dict[str, Callable[[float], EvalAttack]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register_attack(name: str, description: str) -> Callable:
    def wrap(factory: Callable[[float], EvalAttack]) -> Callable[[float], EvalAttack]:
        ATTACKS[name] = factory
        DESCRIPTIONS[name] = description
        return factory

    return wrap


def list_attacks() -> list[str]:
    _load()
    return sorted(ATTACKS)


def create_attack(name: str, eps: float) -> EvalAttack:
    _load()
    if name not in ATTACKS:
        raise UnknownNameError("attack", name, ["clean", *ATTACKS])
    return ATTACKS[name](eps)


def _load() -> None:
    import fairbench.attacks.a3  # noqa: F401
    import fairbench.attacks.apgd  # noqa: F401
    import fairbench.attacks.autoattack  # noqa: F401
    import fairbench.attacks.fab  # noqa: F401
    import fairbench.attacks.official  # noqa: F401
    import fairbench.attacks.pgd  # noqa: F401  (registers the PGD family)
    import fairbench.attacks.square  # noqa: F401


def require_classes(component: str, needed: int, available: int, why: str) -> None:
    """A clear error instead of an index error deep inside a loss (docs/evaluation.md §11, class count)."""
    if available < needed:
        raise ClassCountError(f"{component} needs at least {needed} classes ({why}); the model has {available}. "
                             f"Evaluate with apgd-ce, pgd20 or square instead")
