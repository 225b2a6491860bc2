"""The automatic checks of an evaluation (docs/evaluation.md §11).

Asserted (the evaluation stops, nothing is written): attacks leave the model in eval mode with its buffers
unchanged. An attack that runs the model in train mode rewrites the BatchNorm statistics at every step and
makes predictions depend on the batch, so every number after it would be wrong.

Flagged (printed, and stored with the evaluation in run.json): properties of the model that make AutoAttack's
deterministic white-box settings unsuitable (randomised, probability outputs, autograd inside the forward,
batch-dependent predictions), samples with an all-zero input gradient, and signs of gradient masking in the
records (Square lowering robust accuracy after the white-box attacks, AutoAttack above PGD-20, successful
points far inside the eps-ball).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.adversaries import eval_mode
from fairbench.attacks.apgd import dlr_loss
from fairbench.attacks.pgd import input_grad
from fairbench.results import find_runs

REPEATS = 5  # forwards compared by the randomness check (the reference's value)
LOGIT_TOLERANCE = 1e-4  # on L2-normalised logits (randomness check)
PROBABILITY_TOLERANCE = 1e-5
SQUARE_DROP = 0.002  # robust accuracy Square may remove after the white-box attacks (0.2 points)
LINF_FRACTION = 0.5  # successful gradient-attack points all closer than this fraction of eps: eps bug?
ALONE = 8  # samples compared alone and inside the batch


class ModelStateChangedError(RuntimeError):
    """An attack switched the model to train mode or changed its buffers: its results are void."""


@contextmanager
def frozen_for_attack(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and parameters without gradients (attacks need input gradients only); restored afterwards."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)


@dataclass
class ModelState:
    """Train/eval flags of every module and copies of every buffer, to prove an evaluation changed neither."""

    training: list[bool]
    buffers: list[Tensor]

    @classmethod
    def capture(cls, model: nn.Module) -> "ModelState":
        return cls([m.training for m in model.modules()], [b.detach().clone() for b in model.buffers()])

    def verify(self, model: nn.Module, where: str) -> None:
        training = [m.training for m in model.modules()]
        buffers = list(model.buffers())
        if training != self.training:
            raise ModelStateChangedError(
                f"{where} switched modules of the model to train mode; its records were discarded (an attack "
                f"must run the model in eval mode: BatchNorm in train mode makes predictions batch-dependent)")
        if len(buffers) != len(self.buffers) or not all(torch.equal(a, b) for a, b in zip(buffers, self.buffers)):
            raise ModelStateChangedError(
                f"{where} changed the model's buffers (BatchNorm running statistics?); its records were "
                f"discarded. Reload the checkpoint and fix the attack: it must not update the model")


def model_flags(model: nn.Module, x: Tensor, y: Tensor) -> dict:
    """The model checks of docs/evaluation.md §11 on one chunk (clean inputs x, labels y)."""
    with frozen_for_attack(model), torch.no_grad():
        outs = [model(x).float() for _ in range(REPEATS)]
        normed = [F.normalize(o, dim=1) for o in outs]
        randomised = (len({int((o.argmax(1) == y).sum()) for o in outs}) > 1
                      or max(float((n - normed[0]).abs().max()) for n in normed[1:]) > LOGIT_TOLERANCE)
        logits = outs[0]
        probabilities = bool(((logits > -PROBABILITY_TOLERANCE) & (logits < 1 + PROBABILITY_TOLERANCE)).all()
                             and ((logits.sum(1) - 1).abs() <= PROBABILITY_TOLERANCE).all())
        alone = torch.cat([model(x[i:i + 1]).float() for i in range(min(ALONE, len(x)))])
        batch_dependent = bool((alone.argmax(1) != logits[:len(alone)].argmax(1)).any())
    with frozen_for_attack(model):
        dynamic = _calls_autograd(model, x[:ALONE])
        zero_gradient = _zero_gradient_samples(model, x, y, logits)
    return {"randomised": randomised, "probabilities": probabilities, "dynamic": dynamic,
            "batch_dependent": batch_dependent, "zero_gradient_samples": zero_gradient}


def _calls_autograd(model: nn.Module, x: Tensor) -> bool:
    """Whether a plain forward calls autograd (the reference's `sys.settrace` check for dynamic defences)."""
    targets = {torch.autograd.grad.__code__, torch.autograd.backward.__code__, torch.Tensor.backward.__code__}
    seen: list[str] = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code in targets:
            seen.append(frame.f_code.co_name)
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        model(x)
    finally:
        sys.settrace(previous)
    return bool(seen)


def _zero_gradient_samples(model: nn.Module, x: Tensor, y: Tensor, logits: Tensor) -> int:
    """Clean-correct samples whose DLR-loss input gradient is all zero (APGD-DLR/-T would never move them)."""
    if logits.shape[1] < 3:
        return 0
    keep = logits.argmax(1) == y
    if not bool(keep.any()):
        return 0
    xr = x[keep].clone().requires_grad_(True)
    grad = input_grad(dlr_loss(model(xr).float(), y[keep]).sum(), xr)
    return int((grad.flatten(1).abs().amax(1) == 0).sum())


def suite_flags(samples: pd.DataFrame, eps_of: dict[str, float]) -> dict[str, dict]:
    """Per suite: robust accuracy after each component, the largest successful perturbation, and whether
    Square lowered robust accuracy after the white-box attacks (one epoch's records)."""
    clean = samples[samples.suite == "clean"]
    n = max(len(clean), 1)
    clean_correct = int((~clean["success"]).sum())
    out = {}
    for suite, group in samples[samples.suite != "clean"].groupby("suite", sort=False):
        order = group.groupby("order", sort=True).agg(component=("component", "first"), broken=("success", "sum"))
        prefix = (clean_correct - order["broken"].cumsum()) / n
        flags: dict = {"prefix_robust": {c: round(float(p), 6) for c, p in zip(order["component"], prefix)}}
        won = group[group.success]
        flags["max_linf"] = float(won["linf"].max()) if len(won) else 0.0
        components = list(order["component"])
        if "square" in components and components.index("square") > 0:
            at = components.index("square")
            flags["square_drop"] = round(float(prefix.iloc[at - 1] - prefix.iloc[at]), 6)
        gradient = won[won.component.str.startswith(("apgd", "pgd", "fab"))]
        eps = eps_of.get(suite)
        if eps and len(gradient) >= 10:
            flags["linf_far_below_eps"] = bool(gradient["linf"].max() < LINF_FRACTION * eps)
        out[suite] = flags
    return out


def robust_accuracy(flags: dict) -> float | None:
    prefix = flags.get("prefix_robust") or {}
    return list(prefix.values())[-1] if prefix else None


MODEL_WARNINGS = {
    "randomised": "the model is randomised (repeated forwards differ): use aa-rand, AutoAttack's version for "
                  "stochastic models",
    "probabilities": "the model outputs probabilities, not logits: CE and DLR on probabilities weaken the attacks; "
                     "remove the final softmax",
    "dynamic": "the model calls autograd inside its forward (a dynamic defence): white-box gradients may be "
               "meaningless; an adaptive attack is needed",
    "batch_dependent": "a sample's prediction changes with the batch it is in (BatchNorm in train mode?): results "
                       "depend on the batch size",
}


def warnings_for(model: dict, suites: dict[str, dict]) -> list[str]:
    """One line per raised flag, saying what it suggests."""
    lines = [message for flag, message in MODEL_WARNINGS.items() if model.get(flag)]
    if model.get("zero_gradient_samples"):
        lines.append(f"{model['zero_gradient_samples']} clean-correct samples have an all-zero input gradient: "
                     f"gradient attacks cannot move them (gradient masking?)")
    for suite, flags in suites.items():
        if flags.get("square_drop", 0.0) > SQUARE_DROP:
            lines.append(f"{suite}: Square lowered robust accuracy by {100 * flags['square_drop']:.1f} points after "
                         f"the white-box attacks: their gradients may be masked")
        if flags.get("linf_far_below_eps"):
            lines.append(f"{suite}: every successful gradient-attack point lies within {LINF_FRACTION:.0%} of eps "
                         f"(max {flags['max_linf']:.5f}): is eps in the right units?")
        if suite.startswith("aa") and suite != "aa-rand":
            label = suite.partition("@")[2]
            pgd = suites.get("pgd20" + ("@" + label if label else ""))
            aa_acc, pgd_acc = robust_accuracy(flags), robust_accuracy(pgd or {})
            if pgd_acc is not None and aa_acc is not None and aa_acc > pgd_acc:
                lines.append(f"{suite}: AutoAttack robust accuracy {100 * aa_acc:.2f}% is above PGD-20's "
                             f"{100 * pgd_acc:.2f}%: an attack is broken or the gradients are masked")
        if suite.startswith("aa-rand") and model and not model.get("randomised"):
            lines.append(f"{suite}: the model is deterministic; aa-rand is meant for randomised models, use aa")
    return lines


def epoch_checks(samples: pd.DataFrame, model: dict, eps_of: dict[str, float]) -> dict:
    """The stored form: model flags, per-suite flags, and the warnings they raise."""
    suites = suite_flags(samples, eps_of)
    return {"model": model, "suites": suites, "warnings": warnings_for(model, suites)}


def stored_warnings(results_dir: str | Path) -> list[str]:
    """The raised checks of every run under `results_dir` (training-time evaluation and later `fairbench
    eval`s), as `run_id epoch E: warning` lines: tables are what people read, run.json is not."""
    lines = []
    for _, meta in find_runs(results_dir, finished=False):
        blocks = [meta.get("checks") or {}] + [e.get("checks") or {} for e in meta.get("evaluations", [])]
        for block in blocks:
            for epoch, checks in block.items():
                lines.extend(f"{meta['run_id']} epoch {epoch}: {w}" for w in checks.get("warnings", []))
    return list(dict.fromkeys(lines))
