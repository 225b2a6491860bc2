"""AutoAttack (Croce & Hein, ICML 2020), L-infinity, written in fairbench: the cascade of docs/evaluation.md §7.

Each component attacks the clean inputs of the samples still robust after the previous ones (the
evaluator verifies every success in fp32 and updates the mask in place between components), so a sample
is robust only if no component broke it. Versions: `standard` (APGD-CE, APGD-T, FAB-T, Square), `plus`
(APGD-CE and APGD-DLR with 5 restarts, untargeted FAB with 5 restarts, Square, APGD-T, FAB-T) and `rand`
(APGD-CE, APGD-DLR with EoT 20, for randomised models).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn as nn
from torch import Tensor

from fairbench.attacks.apgd import APGD
from fairbench.attacks.registry import ComponentOutput, EvalAttack, register_attack
from fairbench.attacks.square import Square


def reference_noise(x: Tensor, run: int) -> Tensor:
    """The reference implementations' start noise: U(-1, 1) of the subset's shape from the global RNG."""
    return (2 * torch.rand(x.shape) - 1).to(x.device)


@dataclass
class AutoAttack(EvalAttack):
    eps: float
    version: Literal["standard", "plus", "rand"] = "standard"
    reference_rng: bool = False
    """Draw noise as the reference component chain does (global RNG reseeded to `seed` before each
    component, windows shared across the batch), so flags can be compared one to one (tests, benchmarks)."""

    @property
    def shardable(self) -> bool:  # the reference's draws come from the global RNG in batch order
        return not self.reference_rng

    def components(self) -> list[EvalAttack]:
        noise = reference_noise if self.reference_rng else None
        if self.version == "rand":
            return [APGD(self.eps, "ce", eot=20, component="apgd-ce", start_noise=noise),
                    APGD(self.eps, "dlr", eot=20, component="apgd-dlr", start_noise=noise)]
        from fairbench.attacks.fab import FAB

        if self.version == "plus":
            if self.reference_rng:
                raise ValueError("reference-RNG mode covers AutoAttack standard and rand, not plus")
            return [APGD(self.eps, "ce", restarts=5, component="apgd-ce"),
                    APGD(self.eps, "dlr", restarts=5, component="apgd-dlr"),
                    FAB(self.eps, targeted=False, restarts=5, component="fab"),
                    Square(self.eps),
                    APGD(self.eps, "dlr-targeted", component="apgd-t"),
                    FAB(self.eps)]
        return [APGD(self.eps, "ce", component="apgd-ce", start_noise=noise),
                APGD(self.eps, "dlr-targeted", component="apgd-t", start_noise=noise),
                FAB(self.eps), Square(self.eps, reference_rng=self.reference_rng)]

    def settings(self) -> dict:
        return {"eps": self.eps, "version": self.version,
                "components": {type(c).__name__ + ":" + getattr(c, "component", ""): c.settings()
                               for c in self.components()}}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
            active: Tensor) -> Iterator[ComponentOutput]:
        for component in self.components():
            if not bool(active.any()):
                yield ComponentOutput(getattr(component, "component", type(component).__name__.lower()), x.clone())
                continue
            if self.reference_rng:
                torch.manual_seed(seed)
            yield from component.run(model, x, y, sample_ids, seed, active)


register_attack("aa", "AutoAttack standard: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square 5000")(
    lambda eps: AutoAttack(eps, "standard"))
register_attack("aa-plus", "AutoAttack plus: APGD-CE and APGD-DLR (5 restarts each), untargeted FAB (5 restarts), "
                           "Square 5000, APGD-T, FAB-T")(lambda eps: AutoAttack(eps, "plus"))
register_attack("aa-rand", "AutoAttack rand: APGD-CE and APGD-DLR with EoT 20 (randomised models only)")(
    lambda eps: AutoAttack(eps, "rand"))
