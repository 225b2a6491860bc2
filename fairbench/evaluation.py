"""Class-wise evaluation: one record per (suite, component, sample), verified in strict fp32.

Tables are built from these records (`per_class_counts`), never by re-scoring adversarial inputs.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import ContextManager

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from fairbench.allocator import keep_freed_memory
from fairbench.attacks.pgd import project
from fairbench.attacks.registry import EvalAttack, create_attack
from fairbench.attacks.search import SearchSettings, search_model, tf32_allowed
from fairbench.attacks.square import margin as margins
from fairbench.data.loader import DeviceSplit, eval_batches
from fairbench.evalchecks import ModelState, frozen_for_attack
from fairbench.records import canonical_order, per_class_counts


class InfeasibleAdversarialError(RuntimeError):
    """An attack returned a point outside the eps-ball or the [0, 1] box: a bug in the attack."""


def strict_fp32(device: torch.device | None = None) -> ContextManager[None]:
    """TF32 off for the verdict (allowed for search only)."""
    return tf32_allowed(False, device)


@torch.no_grad()
def _verdict(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    with strict_fp32(x.device):
        logits = model(x.float()).float()
    return logits.argmax(1), margins(logits, y)


def _records(suite: str, component: str, order: int, ids: Tensor, y: Tensor, attempted: Tensor,
             success: Tensor, success_any: Tensor, pred: Tensor, margin: Tensor, linf: Tensor,
             queries: Tensor | None = None) -> dict[str, np.ndarray]:
    n = len(ids)
    return {
        "suite": np.full(n, suite, dtype=object), "component": np.full(n, component, dtype=object),
        "order": np.full(n, order, dtype=np.int8), "sample_idx": ids.cpu().numpy().astype(np.int32),
        "label": y.cpu().numpy().astype(np.int16), "attempted": attempted.cpu().numpy(),
        "success": success.cpu().numpy(), "success_any": success_any.cpu().numpy(),
        "pred": pred.cpu().numpy().astype(np.int16), "margin": margin.cpu().numpy().astype(np.float32),
        "linf": linf.cpu().numpy().astype(np.float32),
        "queries": (np.full(n, -1, dtype=np.int32) if queries is None else queries.cpu().numpy().astype(np.int32)),
    }


def _attack_batch(model: nn.Module, searcher: nn.Module, suite: str, attack: EvalAttack, x: Tensor, y: Tensor,
                  ids: Tensor, clean_correct: Tensor, seed: int) -> list[dict[str, np.ndarray]]:
    """Run a suite's components in cascade order, searching with `searcher`. `robust` is updated in place
    after each component's verification by `model` in strict fp32, so the next component attacks only
    the samples still standing."""
    out = []
    robust = clean_correct.clone()
    for order, comp in enumerate(attack.run(searcher, x, y, ids, seed, robust), start=1):
        attempted = robust.clone()
        x_adv = project(comp.x_adv, x, attack.eps)  # canonicalise (a no-op for PGD, APGD, Square)
        if not torch.equal(project(x_adv, x, attack.eps), x_adv) or not torch.isfinite(x_adv).all():
            raise InfeasibleAdversarialError(f"{suite}/{comp.component} returned a point outside the feasible set")
        pred, margin = _verdict(model, x_adv, y)
        success = attempted & (pred != y)
        any_ = success if comp.success_any is None else attempted & (comp.success_any | success)
        linf = (x_adv.double() - x.double()).abs().flatten(1).amax(1)
        out.append(_records(suite, comp.component, order, ids, y, attempted, success, any_, pred, margin, linf,
                            comp.queries))
        robust &= ~success
    return out


MIN_SHARD = 16  # samples per CPU shard; smaller shards are not worth a thread


def cpu_shards(device: torch.device, n: int, workers: int | None) -> int:
    """Shards a chunk of n samples is attacked in, side by side. On a CPU, one single-threaded shard per core
    beats intra-op parallelism for the small per-step batches of attacks (2 cores: FAB-T 1.24x, APGD-T and
    Square about even); per-sample random streams make the records identical. On a GPU: one."""
    if workers is None:
        workers = min(torch.get_num_threads(), 8) if device.type == "cpu" else 1
    return max(1, min(workers, n // MIN_SHARD))


def _attack_sharded(model: nn.Module, searcher: nn.Module, suite: str, attack: EvalAttack, x: Tensor,
                    y: Tensor, ids: Tensor, clean_correct: Tensor, seed: int,
                    shards: int) -> list[dict[str, np.ndarray]]:
    """`_attack_batch` on `shards` contiguous parts of the chunk in threads, one intra-op thread each."""

    def part(rows: Tensor | slice) -> list[dict[str, np.ndarray]]:
        with torch.enable_grad():  # grad mode is per thread
            return _attack_batch(model, searcher, suite, attack, x[rows], y[rows], ids[rows], clean_correct[rows],
                                 seed)

    if shards == 1:
        return part(slice(None))
    keep_freed_memory()  # the shards' per-thread heaps would hand their pages back every iteration
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(shards) as pool:
            results = list(pool.map(part, torch.arange(len(x), device=x.device).tensor_split(shards)))
    finally:
        torch.set_num_threads(threads)
    return [records for result in results for records in result]


def evaluate_split(model: nn.Module, split: DeviceSplit, attacks: list[str | EvalAttack], eps: float,
                   batch_size: int = 256, seed: int = 0, search: SearchSettings | None = SearchSettings(),
                   workers: int | None = None) -> pd.DataFrame:
    """Per-sample records for `clean` and every attack suite in `attacks` (registered names at radius `eps`,
    or `EvalAttack` instances, recorded under their `name` or class name), in eval mode. Attacks search
    with the model prepared by `search` (None: the model itself); verdicts always use the model itself.
    `workers`: CPU shards per chunk (`cpu_shards`; default one per core, the records do not depend on it)."""
    suites = [_suite(a, eps) for a in attacks if a != "clean"]
    parts: list[dict[str, np.ndarray]] = []
    with frozen_for_attack(model):
        searcher = search_model(model, search) if suites else model
        states = [(m, ModelState.capture(m)) for m in {id(model): model, id(searcher): searcher}.values()]
        for x, y, ids in eval_batches(split, batch_size):
            pred, margin = _verdict(model, x, y)
            correct = pred == y
            no = torch.zeros_like(correct)
            parts.append(_records("clean", "clean", 0, ids, y, torch.ones_like(correct), ~correct, no,
                                  pred, margin, torch.zeros(len(y), device=y.device)))
            shards = cpu_shards(x.device, len(x), workers)
            for name, attack in suites:
                parts.extend(_attack_sharded(model, searcher, name, attack, x, y, ids, correct, seed,
                                             shards if attack.shardable else 1))
                for m, state in states:
                    state.verify(m, f"the {name} attack")
    frame = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return canonical_order(frame, [n for n, _ in suites])


def _suite(attack: str | EvalAttack, eps: float) -> tuple[str, EvalAttack]:
    if isinstance(attack, str):
        return attack, create_attack(attack, eps)
    return attack.name or type(attack).__name__.lower(), attack


def classwise_accuracy(model: nn.Module, split: DeviceSplit, num_classes: int, attack: str | EvalAttack | None,
                       batch_size: int, seed: int = 0, eps: float = 8 / 255) -> Tensor:
    """Per-class accuracy (C,) on `split`, clean (attack None) or under an attack (on the device)."""
    samples = evaluate_split(model, split, [] if attack is None else [attack], eps, batch_size, seed)
    counts = per_class_counts(samples, num_classes)
    counts = counts[counts.attack == ("clean" if attack is None else _suite(attack, eps)[0])]
    acc = counts["correct"].to_numpy() / np.maximum(counts["n"].to_numpy(), 1)
    return torch.tensor(acc, dtype=torch.float32, device=split.labels.device)
