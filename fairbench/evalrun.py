"""Evaluating a run's checkpoints: resumable at chunk granularity, and extendable with new attacks later.

Chunk records are written under ``<run>/partial_eval/`` as they finish; a killed evaluation skips the
finished chunks when it is started again (per-sample random streams make the result identical).
`fairbench eval` adds suites (e.g. AutoAttack) to finished runs without retraining.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from fairbench.attacks.registry import create_attack
from fairbench.attacks.search import SearchSettings
from fairbench.checkpoint import list_checkpoints, load_checkpoint
from fairbench.data import DataNotFoundError, load_dataset
from fairbench.data.base import Dataset
from fairbench.data.loader import DeviceSplit, eval_batches, stratified_subset
from fairbench.engine import Reporter, SilentReporter, Trainer, select_device
from fairbench.errors import FairbenchError
from fairbench.evalchecks import epoch_checks, model_flags
from fairbench.evaluation import evaluate_split
from fairbench.lock import RunLock
from fairbench.records import canonical_order, eps_suite_name, per_class_counts, with_run_labels
from fairbench.results import (
    CLASSWISE_COLUMNS,
    damaged_run_json,
    read_run_json,
    readable,
    refuse_other_data,
    write_json,
    write_parquet,
)
from fairbench.spec import ResolvedRun, RunSpec, provenance, resolve

PARTIAL = "partial_eval"


def evaluate_resumable(model: nn.Module, split: DeviceSplit, attacks: list[str], eps: float, batch_size: int,
                       seed: int, partial_dir: Path, search: SearchSettings = SearchSettings(),
                       progress: Callable[[int, int, float], None] | None = None) -> pd.DataFrame:
    """`evaluate_split` chunk by chunk, each chunk's records saved as soon as it is done; `progress(done,
    total, seconds)` after each chunk evaluated here."""
    frames = []
    t0 = time.perf_counter()
    for start in range(0, len(split), batch_size):
        first = int(split.index[start])
        path = partial_dir / f"chunk_{first:08d}_{len(split)}.parquet"
        if path.is_file():
            frames.append(pd.read_parquet(path))
            continue
        stop = min(start + batch_size, len(split))
        chunk = split.subset(torch.arange(start, stop, device=split.labels.device))
        frame = evaluate_split(model, chunk, attacks, eps, batch_size, seed, search)
        write_parquet(path, frame)
        frames.append(frame)
        if progress is not None:
            progress(stop, len(split), time.perf_counter() - t0)
    return canonical_order(pd.concat(frames, ignore_index=True), attacks)


def eval_split(dataset: Dataset, device: torch.device, per_class: int | None) -> DeviceSplit:
    """The test images evaluated: all, or the first `per_class` of each class (stratified)."""
    index = stratified_subset(dataset.test.labels, dataset.num_classes, per_class) if per_class else None
    full = DeviceSplit.from_arrays(dataset.test, device)
    return full if index is None else full.subset(torch.as_tensor(index, device=device))


def partial_name(epoch: int, attacks: list[str], eps: float, precision: str) -> str:
    """The folder of one epoch's resumable chunk records under `<run>/partial_eval/`."""
    return f"epoch_{epoch:04d}_{'+'.join(attacks)}_{eps:.8f}_{precision}"


def evaluate_epochs(trainer: Trainer, epochs: list[int], attacks: list[str], eps: float, split: DeviceSplit,
                    folder: Path, reporter: Reporter, precision: str | None = None) -> tuple[pd.DataFrame, dict]:
    """(per-sample records with an `epoch` column, the automatic checks per epoch) of `attacks` on each
    checkpoint epoch, searching in `precision` (default: the run's). Raised checks are printed."""
    resolved = trainer.resolved
    precision = precision or resolved.spec.attack_precision
    search = SearchSettings(precision=precision)
    found = list_checkpoints(folder / "checkpoints")
    frames, checks = [], {}
    for epoch in epochs:
        t0 = time.perf_counter()
        trainer.restore(load_checkpoint(found[epoch], resolved.run_id, resolved.config_hash, resuming=False),
                        found[epoch])
        model = trainer.method.eval_model(trainer.model)
        x, y, _ = next(eval_batches(split, resolved.spec.eval_batch_size))
        flags = model_flags(model, x, y)
        part = folder / PARTIAL / partial_name(epoch, attacks, eps, precision)
        samples = evaluate_resumable(model, split, attacks, eps, resolved.spec.eval_batch_size,
                                     resolved.spec.seed, part, search,
                                     lambda done, total, s, e=epoch: reporter.eval_progress(f"epoch {e}", done, total, s))
        checks[str(epoch)] = epoch_checks(samples, flags, suite_eps(attacks, eps))
        samples.insert(0, "epoch", epoch)
        frames.append(samples)
        reporter.message(f"  evaluated epoch {epoch} ({', '.join(['clean', *attacks])}) "
                         f"in {time.perf_counter() - t0:.1f}s")
        for line in checks[str(epoch)]["warnings"]:
            reporter.message(f"  warning (epoch {epoch}): {line}")
    return pd.concat(frames, ignore_index=True), checks


def classwise_table(samples: pd.DataFrame, labels: dict[str, object], class_names: tuple[str, ...],
                    eps_of: dict[str, float]) -> pd.DataFrame:
    """The long per-class table (one row per epoch x attack x class) from per-sample records; `labels` are
    the columns that name the run (`run_labels`)."""
    frames = []
    for epoch, group in samples.groupby("epoch", sort=True):
        counts = per_class_counts(group, len(class_names))
        counts["epoch"] = epoch
        frames.append(counts)
    table = pd.concat(frames, ignore_index=True)
    table = table.assign(
        eps=table["attack"].map(lambda a: eps_of.get(a, eps_of.get(a.split("+")[0]))).astype(float),
        class_name=np.asarray(class_names, dtype=object)[table["class_id"].to_numpy()], **labels)
    return table[CLASSWISE_COLUMNS]


def run_labels(resolved: ResolvedRun) -> dict[str, object]:
    """The columns that name a trained run in its per-class table."""
    spec = resolved.spec
    return {"run_id": resolved.run_id, "method": spec.method, "dataset": spec.dataset, "arch": resolved.arch,
            "protocol": resolved.protocol_id, "seed": spec.seed, **provenance(resolved)}


def suite_eps(attacks: list[str], eps: float) -> dict[str, float]:
    return {"clean": 0.0, **{a: create_attack(a, eps).eps for a in attacks if a != "clean"}}


def select_epochs(available: list[int], which: str) -> list[int]:
    """'last5' (any lastN), 'final', 'all', or a comma list of epochs."""
    if which == "all":
        return available
    if which == "final":
        return available[-1:]
    if which.startswith("last") and which[4:].isdigit() and int(which[4:]) > 0:
        return available[-int(which[4:]):]
    try:
        wanted = [int(e) for e in which.split(",")]
    except ValueError as err:
        raise FairbenchError(f"--checkpoints expects last5, final, all or epochs like 146,150; got {which!r}") from err
    missing = [e for e in wanted if e not in available]
    if missing:
        raise FairbenchError(f"no checkpoint for epoch(s) {missing}; available: {available}")
    return wanted


EVAL_TAKES = ("`fairbench eval` takes a run folder, a results folder or a checkpoint RUN/checkpoints/epoch_NNNN.pt "
              "written by `fairbench run`")


def checkpoint_epoch(path: Path) -> int:
    """The epoch of a checkpoint file inside a run folder (RUN/checkpoints/epoch_NNNN.pt). Anything else is
    refused with what eval takes: a file alone says neither method, dataset nor arch (run.json does)."""
    found = list_checkpoints(path.parent)
    epoch = next((e for e, p in found.items() if p.name == path.name), None)
    in_run = path.parent.name == "checkpoints" and (path.parent.parent / "run.json").is_file()
    if epoch is not None and in_run:
        return epoch
    if in_run:
        raise FairbenchError(f"{path}: {EVAL_TAKES}; this file lies in a run's checkpoints folder but is not named "
                             f"epoch_NNNN.pt (renamed?). Give it back its epoch_NNNN.pt name, or evaluate the run "
                             f"folder {path.parent.parent} with --checkpoints EPOCH")
    raise FairbenchError(f"{path}: {EVAL_TAKES}; this file is none of them (a checkpoint outside its run folder, or a "
                         f"plain state_dict, says neither method, dataset nor architecture: eval reads those from "
                         f"the run's run.json). Evaluate the run folder it came from")


def load_run_spec(folder: Path) -> tuple[RunSpec, dict]:
    meta = read_run_json(folder)
    try:
        return RunSpec.from_dict(meta["spec"]), meta
    except (TypeError, ValueError) as err:
        raise damaged_run_json(folder, f"its run spec does not fit this fairbench: {err}") from err


@dataclasses.dataclass
class OpenedRun:
    """A finished run ready to evaluate: its stored spec and metadata, model builder and test split."""

    folder: Path
    meta: dict
    resolved: ResolvedRun
    dataset: Dataset
    trainer: Trainer
    epochs: list[int]
    split: DeviceSplit


def open_run(folder: Path, checkpoints: str, per_class: int | None = None, data_dir: str | None = None,
             device: str = "auto", n_examples: int | None = None) -> OpenedRun:
    """Load a finished run (its folder, or one of its checkpoint files for that epoch) for evaluation on
    the chosen checkpoints and test samples (`per_class`, or about `n_examples` stratified)."""
    folder = Path(folder)
    if folder.suffix == ".pt":  # a checkpoint file: evaluate that epoch of its run
        checkpoints, folder = str(checkpoint_epoch(folder)), folder.parent.parent
    spec, meta = load_run_spec(folder)
    spec = dataclasses.replace(spec, data_dir=data_dir or spec.data_dir, device=device)
    resolved = resolve(spec)
    if resolved.run_id != meta["run_id"]:
        raise FairbenchError(f"{folder}: the stored configuration resolves to {resolved.run_id}, not "
                             f"{meta['run_id']} (another fairbench version?); evaluate with the version that trained it")
    dataset = load_run_dataset(spec, meta, folder)
    refuse_other_data(meta, folder.name, "was trained", spec.dataset, dataset.fingerprint,
                      "Point --data-dir at the data it was trained on")
    trainer = Trainer.build(resolved, dataset, select_device(device))
    epochs = select_epochs(sorted(list_checkpoints(folder / "checkpoints")), checkpoints)
    if n_examples and not per_class:  # about N images: the first N/C of each class
        per_class = max(1, n_examples // dataset.num_classes)
    split = eval_split(dataset, trainer.device, per_class)
    return OpenedRun(folder, meta, resolved, dataset, trainer, epochs, split)


def load_run_dataset(spec: RunSpec, meta: dict, folder: Path) -> Dataset:
    """The run's dataset from --data-dir if given, else from the data root the run was trained with
    (run.json's `data_dir` hint), else the default root."""
    hint = meta.get("data_dir") if not spec.data_dir else None
    try:
        return load_dataset(spec.dataset, spec.data_dir or hint)
    except DataNotFoundError as err:
        if not hint:
            raise
        raise DataNotFoundError(f"{err} (the data root {hint} is the one {folder.name} was trained with, from its "
                                f"run.json; pass --data-dir to read the data from elsewhere)") from err


def evaluate_run(folder: Path, attacks: list[str], checkpoints: str = "last5", per_class: int | None = None,
                 eps: float | None = None, data_dir: str | None = None, device: str = "auto",
                 reporter: Reporter | None = None, label_eps: bool = False,
                 n_examples: int | None = None, precision: str | None = None, wait: bool = True,
                 force: bool = False) -> Path:
    """Add the records of `attacks` on the chosen checkpoints of a finished run to its result files, under
    the run's lock (a second evaluation of the same run waits, or with `wait` off raises `RunLockedError`):
    its files are read after the lock is taken, so concurrent evaluations never lose each other's rows.
    Rows of a suite on more test samples than this evaluation has are replaced only with `force`.

    `label_eps`: store each suite as `eps_suite_name` (e.g. 'pgd20@4/255'), so evaluations at several radii
    (an eps sweep) sit side by side instead of replacing each other and the run's own 'pgd20' rows. A radius
    other than the run's own always gets such names, so rows of one suite name never mix two radii.
    """
    reporter = reporter or SilentReporter()
    folder = Path(folder)
    run_folder = folder.parent.parent if folder.suffix == ".pt" else folder
    with RunLock(run_folder, "evaluation", say=reporter.message).hold(wait):
        return _evaluate_locked(folder, attacks, checkpoints, per_class, eps, data_dir, device, reporter,
                                label_eps, n_examples, precision, force)


def _evaluate_locked(folder: Path, attacks: list[str], checkpoints: str, per_class: int | None, eps: float | None,
                     data_dir: str | None, device: str, reporter: Reporter, label_eps: bool,
                     n_examples: int | None, precision: str | None, force: bool = False) -> Path:
    run = open_run(folder, checkpoints, per_class, data_dir, device, n_examples)
    records = run.folder / "samples.parquet"
    if records.is_file() and not readable(records):
        raise FairbenchError(f"{records} cannot be read (a damaged copy or an interrupted transfer); the new records "
                             "would be merged into it and its own records lost. Restore it from a copy, or train the "
                             "run again under another --out. Nothing was changed.")
    spec = run.resolved.spec
    eps = spec.eval_eps if eps is None else eps
    label_eps = label_eps or eps != spec.eval_eps
    names = None
    if label_eps:
        names = {a: eps_suite_name(a, e) for a, e in suite_eps(attacks, eps).items() if a != "clean"}
    suites = [(names or {}).get(a, a) for a in attacks if a != "clean"]
    keep_larger(run.folder, run.epochs, suites, len(run.split), force, reporter)
    reporter.message(f"{run.resolved.run_id}: {', '.join(attacks)} on epochs {run.epochs}, "
                     f"{len(run.split)} test samples")
    t0 = time.perf_counter()
    precision = precision or spec.attack_precision
    samples, checks = evaluate_epochs(run.trainer, run.epochs, [a for a in attacks if a != "clean"], eps, run.split,
                                      run.folder, reporter, precision)
    if names:
        samples["suite"] = samples["suite"].map(lambda suite: names.get(suite, suite))
    merge_results(run.folder, samples, run_labels(run.resolved), run.dataset.class_names, run.meta, attacks, eps,
                  time.perf_counter() - t0, names, precision, checks)
    return run.folder


def keep_larger(folder: Path, epochs: list[int], suites: list[str], count: int, force: bool,
                reporter: Reporter) -> None:
    """Refuse, before any attack runs, to replace stored rows of a suite on more test samples than `count`
    (a quick `--n-examples 50` would silently shrink a 1,000-sample AutoAttack evaluation); `force` replaces."""
    try:
        stored = pd.read_parquet(folder / "samples.parquet", columns=["epoch", "suite"])
    except Exception:  # noqa: BLE001 - an unreadable file is the merge's to report, not this check's
        return
    sizes = stored[stored["epoch"].isin(epochs) & stored["suite"].isin(suites)].groupby(["suite", "epoch"]).size()
    larger = sizes[sizes > count]
    if larger.empty:
        return
    what = "; ".join(f"{suite} of epoch(s) {', '.join(str(e) for e in g.index.get_level_values('epoch'))} on "
                     f"{'/'.join(sorted({str(n) for n in g}))} test samples"
                     for suite, g in larger.groupby(level="suite"))
    most = int(larger.max())
    if force:
        reporter.message(f"  --force: replacing the stored rows ({what}) with rows on {count} test samples")
        return
    raise FairbenchError(f"{folder}: this evaluation has {count} test samples and would replace stored rows of a "
                         f"larger one ({what}). Nothing was changed. Evaluate at least {most} samples "
                         f"(--n-examples {most}, or no --n-examples for the whole test set), or pass --force to "
                         f"replace them with the {count}-sample rows")


def merge_samples(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """New suites replace their (epoch, suite) rows; clean records are a union (they never change, and a
    later evaluation may cover a different subset of the test set)."""
    new_attacks = new[new.suite != "clean"]
    replaced = set(zip(new_attacks["epoch"], new_attacks["suite"]))
    keep = old[[(e, s) not in replaced for e, s in zip(old["epoch"], old["suite"])]]
    old_clean = set(zip(keep.loc[keep.suite == "clean", "epoch"], keep.loc[keep.suite == "clean", "sample_idx"]))
    new_clean = new[new.suite == "clean"]
    new_clean = new_clean[[(e, i) not in old_clean for e, i in zip(new_clean["epoch"], new_clean["sample_idx"])]]
    return pd.concat([keep, new_clean, new_attacks], ignore_index=True)


def merge_results(folder: Path, samples: pd.DataFrame, labels: dict[str, object], class_names: tuple[str, ...],
                  meta: dict, attacks: list[str], eps: float, seconds: float,
                  suite_names: dict[str, str] | None = None, precision: str = "auto",
                  checks: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge the new records into the run's files (a first evaluation starts them) and recompute its per-class
    table, atomically; returns the merged (records, per-class table). `labels` name the run (`run_labels`).

    `suite_names` maps an attack to the suite name its records carry (eps sweeps); default: the attack's name.
    """
    names = suite_names or {}
    stored = folder / "samples.parquet"
    merged = merge_samples(pd.read_parquet(stored), samples) if stored.is_file() else samples
    eps_of = {**{name: float(s["eps"]) for name, s in meta.get("attacks", {}).items() if "eps" in s},
              **{names.get(a, a): e for a, e in suite_eps(attacks, eps).items()}}
    classwise = classwise_table(merged, labels, class_names, eps_of)
    meta = dict(meta)
    meta.setdefault("attacks", {}).update(
        {names.get(a, a): create_attack(a, eps).settings() for a in attacks if a != "clean"})
    evaluation = {"attacks": attacks, "eps": eps, "seconds": seconds, "attack_precision": precision,
                  "epochs": sorted(set(samples["epoch"].tolist()))}
    if names:
        evaluation["suites"] = [names.get(a, a) for a in attacks]
    if checks is not None:
        evaluation["checks"] = checks
    same = {k: evaluation.get(k) for k in ("attacks", "eps", "attack_precision", "epochs", "suites")}
    earlier = [e for e in meta.get("evaluations", []) if {k: e.get(k) for k in same} != same]
    meta["evaluations"] = [*earlier, evaluation]  # rerun after a kill between the files: one entry, not two
    write_parquet(stored, with_run_labels(merged, labels))
    write_json(folder / "run.json", meta)
    write_parquet(folder / "classwise.parquet", classwise, meta)
    shutil.rmtree(folder / PARTIAL, ignore_errors=True)
    return merged, classwise
