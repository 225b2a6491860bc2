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


def canonical_order(samples: pd.DataFrame, suites: list[str]) -> pd.DataFrame:
    """Records sorted by (suite as listed after clean, cascade position, sample index): the same frame
    whatever the batch size or chunking."""
    rank = samples["suite"].map({name: i for i, name in enumerate(["clean", *suites])})
    order = np.lexsort((samples["sample_idx"].to_numpy(), samples["order"].to_numpy(), rank.to_numpy()))
    return samples.iloc[order].reset_index(drop=True)


def _suite(attack: str | EvalAttack, eps: float) -> tuple[str, EvalAttack]:
    if isinstance(attack, str):
        return attack, create_attack(attack, eps)
    return attack.name or type(attack).__name__.lower(), attack


def robust_flags(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per (suite, sample): correct = clean-correct and no component of the suite succeeded. Where
    both `aa` and the experimental `a3` ran (at the same radius label), a derived suite `aa+a3` is robust
    under both: the informative number for A3 (evaluation.md 8.1)."""
    clean_ok, labels = _clean_verdicts(samples)
    frames = [pd.DataFrame({"suite": "clean", "sample_idx": clean_ok.index, "label": labels.values,
                            "correct": clean_ok.values})]
    attacked = samples[samples.suite != "clean"]
    if len(attacked):
        broken = attacked.groupby(["suite", "sample_idx"], sort=False)["success"].any().reset_index()
        broken["label"] = labels.loc[broken.sample_idx].values
        broken["correct"] = clean_ok.loc[broken.sample_idx].values & ~broken["success"].values
        frames.append(broken[["suite", "sample_idx", "label", "correct"]])
        frames.extend(_unions(broken))
    return pd.concat(frames, ignore_index=True)


def _clean_verdicts(samples: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(clean-correct, label), indexed by sample_idx."""
    clean = samples[samples.suite == "clean"].set_index("sample_idx")
    return ~clean["success"], clean["label"]


def _unions(flags: pd.DataFrame) -> list[pd.DataFrame]:
    out = []
    suites = set(flags["suite"])
    for a3 in sorted(s for s in suites if s.split("@")[0] == "a3"):
        label = a3.partition("@")[2]
        aa = "aa" + ("@" + label if label else "")
        if aa in suites:
            out.append(robust_under_all(flags, [aa, a3], f"{aa}+a3"))
    return out


def robust_under_all(flags: pd.DataFrame, suites: list[str], name: str) -> pd.DataFrame:
    """Robust flags of the derived suite `name`: one row per sample every one of `suites` attacked, correct
    where it is robust under all of them (evaluation.md 9.2: unions across suites AND the robust flags)."""
    runs = flags[flags["suite"].isin(suites)]
    wide = runs.pivot(index="sample_idx", columns="suite", values="correct")[list(suites)].dropna()
    labels = runs.drop_duplicates("sample_idx").set_index("sample_idx")["label"]
    return pd.DataFrame({"suite": name, "sample_idx": wide.index, "label": labels.loc[wide.index].to_numpy(),
                         "correct": wide.astype(bool).all(axis=1).to_numpy()})


def union_of_suites(flags: pd.DataFrame) -> pd.DataFrame | None:
    """Robust under every attack suite run at the run's radius (evaluation.md 0.3), named by the suites in
    alphabetical order (`aa+pgd20`, whatever order they were run in): one row per sample that all of them
    attacked; None with fewer than two such suites. Suites at another radius (`aa@4/255`) and derived ones
    (`aa+a3`) do not take part."""
    suites = sorted(s for s in set(flags["suite"]) if s != "clean" and "@" not in s and "+" not in s)
    return robust_under_all(flags, suites, "+".join(suites)) if len(suites) >= 2 else None


def cascade_prefixes(samples: pd.DataFrame) -> pd.DataFrame | None:
    """Robust after the first k components of each suite with several (evaluation.md 9.2: "after APGD-CE",
    "after APGD-CE + APGD-T", ...), as suites named after their last component, `aa:apgd-t`; the whole
    cascade is the suite itself. None where no suite has several components."""
    clean_ok, labels = _clean_verdicts(samples)
    frames = []
    for suite, records in samples[samples.suite != "clean"].groupby("suite", sort=False):
        components = records.drop_duplicates("order").sort_values("order")["component"].tolist()
        if len(components) < 2:
            continue
        broken = records.pivot_table(index="sample_idx", columns="order", values="success", aggfunc="any")
        broken = broken.sort_index(axis=1).fillna(False).astype(bool).cummax(axis=1)  # by one of the first k
        for k, component in enumerate(components[:-1]):
            frames.append(pd.DataFrame({
                "suite": f"{suite}:{component}", "sample_idx": broken.index,
                "label": labels.loc[broken.index].to_numpy(),
                "correct": clean_ok.loc[broken.index].to_numpy() & ~broken.iloc[:, k].to_numpy()}))
    return pd.concat(frames, ignore_index=True) if frames else None


def per_class_counts(samples: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """(suite, class_id, n, correct) for every class, including classes with zero correct."""
    return class_counts(robust_flags(samples), num_classes)


def class_counts(flags: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """`per_class_counts` from robust flags (one row per suite and sample)."""
    rows = []
    for suite, group in flags.groupby("suite", sort=False):
        labels = group["label"].to_numpy().astype(np.int64)
        n = np.bincount(labels, minlength=num_classes)
        correct = np.bincount(labels, weights=group["correct"].to_numpy(), minlength=num_classes).astype(np.int64)
        rows.append(pd.DataFrame({"attack": suite, "class_id": np.arange(num_classes), "n": n, "correct": correct}))
    return pd.concat(rows, ignore_index=True)


def classwise_accuracy(model: nn.Module, split: DeviceSplit, num_classes: int, attack: str | EvalAttack | None,
                       batch_size: int, seed: int = 0, eps: float = 8 / 255) -> Tensor:
    """Per-class accuracy (C,) on `split`, clean (attack None) or under an attack (on the device)."""
    samples = evaluate_split(model, split, [] if attack is None else [attack], eps, batch_size, seed)
    counts = per_class_counts(samples, num_classes)
    counts = counts[counts.attack == ("clean" if attack is None else _suite(attack, eps)[0])]
    acc = counts["correct"].to_numpy() / np.maximum(counts["n"].to_numpy(), 1)
    return torch.tensor(acc, dtype=torch.float32, device=split.labels.device)
