"""`aa-official`: the official AutoAttack package (fra31/auto-attack), when it happens to be installed.

It is not on the package registries and fairbench never needs it: `aa` is fairbench's own implementation.
The adapter runs the official components in the official cascade order, with the settings its
`set_version` chose, each on the samples still robust, exactly as its `run_standard_evaluation` calls them,
and hands every component's points to fairbench's evaluator, which verifies them in strict fp32 and writes
the same per-sample records as for `aa`. Official seeding applies: one reseed per component call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch.nn as nn
from torch import Tensor

from fairbench.attacks.registry import ComponentOutput, EvalAttack, register_attack
from fairbench.errors import FairbenchError

INSTALL_HINT = ("--attack aa-official needs the official AutoAttack package, which is not on PyPI: "
                "pip install git+https://github.com/fra31/auto-attack (fairbench's own `aa` needs nothing)")


def official_autoattack_class() -> Any:
    try:
        from autoattack import AutoAttack
    except ImportError as err:
        raise FairbenchError(INSTALL_HINT) from err
    return AutoAttack


def run_component(adversary: Any, name: str, x: Tensor, y: Tensor) -> Tensor:
    """One component as the official cascade configures and calls it."""
    if name in ("apgd-ce", "apgd-dlr"):
        adversary.apgd.loss = name.split("-")[1]
        adversary.apgd.seed = adversary.get_seed()
        return adversary.apgd.perturb(x, y)
    if name == "apgd-t":
        adversary.apgd_targeted.seed = adversary.get_seed()
        return adversary.apgd_targeted.perturb(x, y)
    if name in ("fab", "fab-t"):
        adversary.fab.targeted = name == "fab-t"
        if name == "fab-t":
            adversary.fab.n_restarts = 1
        adversary.fab.seed = adversary.get_seed()
        return adversary.fab.perturb(x, y)
    if name == "square":
        adversary.square.seed = adversary.get_seed()
        return adversary.square.perturb(x, y)
    raise FairbenchError(f"the official AutoAttack asked for an unknown component {name!r}")


@dataclass
class OfficialAutoAttack(EvalAttack):
    eps: float
    version: str = "standard"
    shardable: ClassVar[bool] = False  # the package reseeds and draws from the global RNG, batch by batch

    def settings(self) -> dict:
        return {"eps": self.eps, "version": self.version, "implementation": "fra31/auto-attack (installed)"}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
            active: Tensor) -> Iterator[ComponentOutput]:
        adversary = official_autoattack_class()(model, norm="Linf", eps=self.eps, version=self.version, seed=seed,
                                                verbose=False, device=str(x.device))
        for name in list(adversary.attacks_to_run):
            out = x.clone()
            idx = active.nonzero().squeeze(1)  # the evaluator clears broken samples between components
            if len(idx):
                out[idx] = run_component(adversary, name, x[idx], y[idx]).detach().to(x.dtype)
            yield ComponentOutput(name, out)


def _official(eps: float) -> OfficialAutoAttack:
    official_autoattack_class()  # fail before any work when the package is absent
    return OfficialAutoAttack(eps)


register_attack("aa-official", "AutoAttack standard run by the official package (only if installed; an adapter "
                               "writing the same per-sample records)")(_official)
