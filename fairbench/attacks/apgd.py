"""APGD (Croce & Hein, ICML 2020), L-infinity: the engine of APGD-CE, APGD-DLR and APGD-T.

Follows docs/evaluation.md §4 and the official code's arithmetic (step-size checkpoints from N, the
momentum with the un-reset previous start, C1 counted with `<=` and its first-window comparison against
an unfilled history slot, C2 with the previous checkpoint's best loss). Each run works on the still-active
samples only; the start noise comes from the counter-based per-sample generator, so a sample's result
does not depend on the batch it is in. `start_noise` injects the reference implementation's draw order
(tests only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fairbench.attacks.lanes import lane_rows, run_all
from fairbench.attacks.pgd import input_grad, project
from fairbench.attacks.registry import ComponentOutput, EvalAttack, register_attack, require_classes
from fairbench.attacks.rng import per_sample_uniform
from fairbench.attacks.search import confirmed_misclassified

Loss = Literal["ce", "dlr", "dlr-targeted"]
NoiseFn = Callable[[Tensor, int], Tensor]
"""(subset images, run index) -> U(-1, 1) noise of the subset's shape."""


def checkpoint_windows(steps: int) -> list[int]:
    """Window lengths: max(floor(0.22N),1), then minus max(floor(0.03N),1) each time, floored at max(floor(0.06N),1)."""
    first, minimum, decrease = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    windows, k, done = [], first, 0
    while done + k <= steps:
        windows.append(k)
        done += k
        k = max(k - decrease, minimum)
    return windows


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12), in the official code's order of operations."""
    z_sorted, idx_sorted = logits.sort(dim=1)
    top_is_y = (idx_sorted[:, -1] == y).float()
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - z_sorted[:, -2] * top_is_y - z_sorted[:, -1] * (1.0 - top_is_y)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12), sorted logits of the current iterate."""
    z_sorted = logits.sort(dim=1)[0]
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12)


def _loss(kind: Loss, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if kind == "dlr":
        return dlr_loss(logits, y)
    return dlr_targeted_loss(logits, y, target)


def _loss_and_grad(model: nn.Module, x_adv: Tensor, y: Tensor, kind: Loss, target: Tensor | None,
                   eot: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample loss, logits (of the last EoT draw) and the mean input gradient."""
    grad = torch.zeros_like(x_adv)
    for _ in range(eot):
        x_req = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_req).float()
            loss = _loss(kind, logits, y, target)
            grad += input_grad(loss.sum(), x_req)
    return loss.detach(), logits.detach(), grad / float(eot)


def apgd_run(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, kind: Loss, noise: Tensor,
             target: Tensor | None = None, rho: float = 0.75, eot: int = 1,
             early_stop: bool = False, group: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One APGD run on a batch. Returns (still correct after the run, a misclassified iterate or the start).

    Without `early_stop` every sample runs all iterations and the *latest* misclassified iterate is
    returned, as in the reference. With it, a sample leaves the working batch at its first misclassified
    iterate (that point is returned): the success flags are identical, since samples do not interact in
    eval mode and "ever misclassified" cannot be undone, and broken samples cost nothing further.
    `group` (with `early_stop`) ties rows that are copies of one sample (its targets and restarts run side
    by side): when one copy breaks the sample, all its copies stop.
    """
    n = len(x)
    x_adv = (x + eps * noise / noise.flatten(1).abs().amax(1).reshape(-1, *[1] * (x.dim() - 1))).clamp(0.0, 1.0)
    loss, logits, grad = _loss_and_grad(model, x_adv, y, kind, target, eot)
    correct_all = ~confirmed_misclassified(model, x_adv, y, logits.argmax(1) != y)
    adv_all = x_adv.clone()
    live = torch.arange(n, device=x.device)
    s = {"x": x, "y": y, "x_adv": x_adv, "x_best": x_adv.clone(), "grad": grad, "grad_best": grad.clone(),
         "loss_best": loss.clone(), "best_last": loss.clone(), "correct": correct_all.clone(),
         "reduced_last": torch.ones(n, dtype=torch.bool, device=x.device),
         "step": torch.full((n,) + (1,) * (x.dim() - 1), 2.0 * eps, dtype=x.dtype, device=x.device),
         "history": torch.zeros(n, steps, device=x.device), "x_prev": x_adv.clone()}
    if target is not None:
        s["target"] = target
    if group is not None:
        s["group"] = group
    if early_stop:
        s, live = _drop_broken(s, live)
    windows = checkpoint_windows(steps)
    ends = {sum(windows[:j + 1]) - 1: w for j, w in enumerate(windows)}
    for i in range(steps):
        if not len(live):
            break
        with torch.no_grad():
            momentum = s["x_adv"] - s["x_prev"]
            s["x_prev"] = s["x_adv"].clone()
            a = 0.75 if i > 0 else 1.0
            z = project(s["x_adv"] + s["step"] * s["grad"].sign(), s["x"], eps)
            s["x_adv"] = project(s["x_adv"] + (z - s["x_adv"]) * a + momentum * (1 - a), s["x"], eps)
        loss, logits, s["grad"] = _loss_and_grad(model, s["x_adv"], s["y"], kind, s.get("target"), eot)
        pred_ok = ~confirmed_misclassified(model, s["x_adv"], s["y"], logits.argmax(1) != s["y"])
        s["correct"] &= pred_ok
        adv_all[live] = torch.where(_b(~pred_ok, s["x_adv"]), s["x_adv"], adv_all[live])
        correct_all[live] = s["correct"]
        s["history"][:, i] = loss
        better = loss > s["loss_best"]
        s["x_best"] = torch.where(_b(better, s["x"]), s["x_adv"], s["x_best"])
        s["grad_best"] = torch.where(_b(better, s["x"]), s["grad"], s["grad_best"])
        s["loss_best"] = torch.where(better, loss, s["loss_best"])
        if i in ends:
            k = ends[i]
            cols = torch.arange(i - k + 1, i + 1, device=x.device)
            increases = (s["history"][:, cols] > s["history"][:, cols - 1]).sum(1)  # col -1: the unfilled last slot
            reduce = (increases.float() <= k * rho) | (~s["reduced_last"] & (s["best_last"] >= s["loss_best"]))
            s["reduced_last"], s["best_last"] = reduce, s["loss_best"].clone()
            s["step"] = torch.where(_b(reduce, s["x"]), s["step"] / 2.0, s["step"])
            s["x_adv"] = torch.where(_b(reduce, s["x"]), s["x_best"], s["x_adv"])
            s["grad"] = torch.where(_b(reduce, s["x"]), s["grad_best"], s["grad"])
        if early_stop:
            s, live = _drop_broken(s, live)
    return correct_all, adv_all


def _drop_broken(state: dict[str, Tensor], live: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Keep only the samples still correctly classified, and of grouped rows only the groups that no row
    has broken yet (a host sync; evaluation only)."""
    keep = state["correct"]
    if bool(keep.all()):
        return state, live
    if "group" in state:
        broken_groups = state["group"][~keep]
        keep = keep & ~torch.isin(state["group"], broken_groups)
    return {k: v[keep] for k, v in state.items()}, live[keep]


def _b(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *[1] * (like.dim() - 1))


@dataclass
class APGD(EvalAttack):
    """APGD-CE / APGD-DLR (`restarts` runs) and APGD-T (`n_targets` targets x `restarts` runs)."""

    eps: float
    loss: Loss = "ce"
    steps: int = 100
    restarts: int = 1
    n_targets: int = 9
    rho: float = 0.75
    eot: int = 1
    component: str = "apgd-ce"
    early_stop: bool = True
    """Stop a sample at its first misclassified iterate (same flags, less work; docs/evaluation.md §14)."""
    side_by_side: bool = True
    """Run all targets and restarts of a sample in one batch (same flags; `fairbench.attacks.lanes`).
    Reference-RNG mode (`start_noise`) always runs them one after the other, as the reference does."""
    start_noise: NoiseFn | None = field(default=None, repr=False)

    @property
    def shardable(self) -> bool:  # injected reference noise is drawn from the global RNG in batch order
        return self.start_noise is None

    def settings(self) -> dict:
        out = {"eps": self.eps, "loss": self.loss, "steps": self.steps, "restarts": self.restarts,
               "rho": self.rho, "eot": self.eot, "early_stop": self.early_stop}
        if self.loss == "dlr-targeted":
            out["n_targets"] = self.n_targets
        return out

    def run(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
            active: Tensor) -> Iterator[ComponentOutput]:
        yield ComponentOutput(self.component, self.perturb(model, x, y, sample_ids, seed, active))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor, seed: int,
                active: Tensor) -> Tensor:
        """Adversarial points for the active samples (clean points elsewhere and where the attack failed)."""
        targets: list[Tensor | None] = [None]
        if self.loss == "dlr":
            with torch.no_grad():
                require_classes(self.component, 3, model(x[:1]).shape[1], "the DLR loss uses the third largest logit")
        if self.loss == "dlr-targeted":
            with torch.no_grad():
                ranking = model(x).float().sort(dim=1)[1]
            require_classes(self.component, 4, ranking.shape[1], "the targeted DLR loss uses the fourth largest logit")
            n = min(self.n_targets, ranking.shape[1] - 1)
            targets = [ranking[:, -k] for k in range(2, n + 2)]
        runs = [t for t in targets for _ in range(self.restarts)]  # run index = position, as in the reference

        def attack(idx: Tensor, group: list[int]) -> tuple[Tensor, Tensor]:
            rows = lane_rows(len(idx), len(group), x.device)
            noise = torch.cat([self._noise(x[idx], sample_ids[idx], seed, r) for r in group])
            target = None if runs[0] is None else torch.cat([runs[r][idx] for r in group])
            still, x_adv = apgd_run(model, x[idx][rows], y[idx][rows], self.eps, self.steps, self.loss, noise,
                                    target, self.rho, self.eot, self.early_stop, group=rows)
            return ~still, x_adv

        side_by_side = self.side_by_side and self.start_noise is None  # reference RNG: the reference's order
        return run_all(x, active, len(runs), side_by_side, attack)

    def _noise(self, x: Tensor, ids: Tensor, seed: int, run: int) -> Tensor:
        if self.start_noise is not None:
            return self.start_noise(x, run)
        stream = 1000 + 97 * run + {"ce": 1, "dlr": 2, "dlr-targeted": 3}[self.loss]
        return per_sample_uniform(ids, tuple(x.shape[1:]), seed, stream).to(x.dtype) * 2 - 1


register_attack("apgd-ce", "APGD with CE loss, 100 iterations, 1 restart (AutoAttack standard)")(
    lambda eps: APGD(eps, "ce", component="apgd-ce"))
register_attack("apgd-dlr", "APGD with DLR loss, 100 iterations, 1 restart")(
    lambda eps: APGD(eps, "dlr", component="apgd-dlr"))
register_attack("apgd-t", "APGD-T: targeted DLR, 9 targets x 1 restart, 100 iterations (AutoAttack standard)")(
    lambda eps: APGD(eps, "dlr-targeted", component="apgd-t"))
