"""Class-wise evaluation of a model fairbench did not train (`fairbench eval --model MODULE:FACTORY`,
`fairbench.evaluate(model, ...)`): the same attacks, per-sample records, per-class counts and automatic checks
as a trained run's evaluation, written as a run folder so `fairbench table` and `plot` show it beside the
trained methods.

The model takes images in [0, 1] and returns logits, with any normalisation inside it (what RobustBench
requires of its models, and what every fairbench architecture does). An external model is one checkpoint:
its rows carry epoch 0, architecture `external` and protocol `external`, so tables give it its own group
(rho against TRADES needs TRADES trained under the same protocol, which an outside model never has).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import re
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn

from fairbench.data import load_dataset
from fairbench.data.base import Dataset
from fairbench.data.loader import eval_batches
from fairbench.engine import Reporter, SilentReporter, select_device
from fairbench.errors import FairbenchError, first_line
from fairbench.evalchecks import epoch_checks, model_flags
from fairbench.evalrun import (
    PARTIAL,
    classwise_table,
    eval_split,
    evaluate_resumable,
    keep_larger,
    merge_results,
    partial_name,
    suite_eps,
)
from fairbench.evaluation import evaluate_split
from fairbench.lock import RunLock
from fairbench.results import RUN_JSON, read_run_json, refuse_other_data, run_dir

EXTERNAL = "external"
"""The architecture and protocol of an outside model's rows."""
EPOCH = 0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass
class Evaluation:
    """What an evaluation of one model returns: per-sample records (one row per test sample and suite),
    per-class counts in the layout of `classwise.parquet`, the automatic checks, and the run folder written
    (None when nothing was written)."""

    samples: pd.DataFrame
    classwise: pd.DataFrame
    checks: dict
    folder: Path | None = None


def load_model(ref: str, weights: str | Path | None = None) -> nn.Module:
    """Build `MODULE:FACTORY` (called without arguments; the current folder is importable) and load
    `weights` into it: a state_dict, or a dict holding one under `state_dict` or `model`, with or without the
    `module.` prefix DataParallel adds; read with weights_only=True, so a file cannot run code."""
    module_name, _, factory = ref.partition(":")
    if not module_name or not factory:
        raise FairbenchError(f"--model expects MODULE:FACTORY (a module on the Python path and a function in it "
                             f"that returns the model), got {ref!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise FairbenchError(f"--model {ref}: cannot import {module_name} ({err}); run from the folder that holds "
                             "it or add that folder to PYTHONPATH") from err
    build = getattr(module, factory, None)
    if not callable(build):
        raise FairbenchError(f"--model {ref}: {module_name} has no function {factory!r}")
    model = build()
    if not isinstance(model, nn.Module):
        raise FairbenchError(f"--model {ref}: {factory}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, Path(weights))
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader error: not a plain tensor file
        raise FairbenchError(f"--weights {path} cannot be read as plain tensors ({first_line(err)}); save it with "
                             "torch.save(model.state_dict(), path)") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise FairbenchError(f"--weights {path} holds {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise FairbenchError(f"--weights {path} does not fit the model ({first_line(err)})") from err


def model_digest(model: nn.Module) -> str:
    """10 hex digits over the model's class and every parameter and buffer: other weights, another run id."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:10]


def evaluate_model(model: nn.Module, dataset: str, attacks: tuple[str, ...] | list[str] = ("pgd20", "aa"),
                   eps: float = 8 / 255, n_examples: int | None = None, data_dir: str | Path | None = None,
                   device: str = "auto", batch_size: int = 256, name: str = "model", out: str | Path | None = None,
                   seed: int = 0, force: bool = False, reporter: Reporter | None = None) -> Evaluation:
    """Evaluate `model` class-wise on `dataset`'s test set (or about `n_examples` images, stratified by class)
    under `attacks` at radius `eps`. With `out`, the results go to OUT/runs/<name>_<dataset>_external_<digest>/
    like a trained run's (a later call adds suites; rows on fewer samples replace larger ones only with
    `force`)."""
    reporter = reporter or SilentReporter()
    if not _NAME.match(name):
        raise FairbenchError(f"--name must be letters, digits, '.', '_' or '-' (it names a folder), got {name!r}")
    if n_examples is not None and n_examples < 1:
        raise FairbenchError(f"--n-examples must be at least 1, got {n_examples}")
    if eps < 0:
        raise FairbenchError(f"--eps must be >= 0, got {eps}")
    data = load_dataset(dataset, data_dir)
    target = select_device(device)
    model = model.to(target).eval()
    per_class = max(1, n_examples // data.num_classes) if n_examples else None
    split = eval_split(data, target, per_class)
    attacks = [a for a in attacks if a != "clean"]
    run_id = f"{name}_{dataset}_{EXTERNAL}_{model_digest(model)}"
    labels = {"run_id": run_id, "method": name, "dataset": dataset, "arch": EXTERNAL, "protocol": EXTERNAL,
              "seed": 0, "method_source": EXTERNAL, "method_version": ""}
    folder = run_dir(Path(out), run_id) if out is not None else None
    reporter.message(f"{run_id}: {', '.join(['clean', *attacks])} on {len(split)} test samples")
    x, y, _ = next(eval_batches(split, batch_size))
    _check_outputs(model, x, data.num_classes, dataset)
    flags = model_flags(model, x, y)
    eps_of = suite_eps(attacks, eps)
    if folder is None:
        samples = evaluate_split(model, split, attacks, eps, batch_size, seed)
        checks = _checks(samples, flags, eps_of, reporter)
        samples.insert(0, "epoch", EPOCH)
        return Evaluation(samples, classwise_table(samples, labels, data.class_names, eps_of), checks)
    with RunLock(folder, "evaluation", say=reporter.message).hold(True):
        if (folder / RUN_JSON).is_file():
            refuse_other_data(read_run_json(folder), folder.name, "was evaluated", dataset, data.fingerprint,
                              "Point --data-dir at that data, or use another --out")
        if (folder / "samples.parquet").is_file():
            keep_larger(folder, [EPOCH], attacks, len(split), force, reporter)
        t0 = time.perf_counter()
        partial = folder / PARTIAL / partial_name(EPOCH, attacks, eps, "fp32")
        samples = evaluate_resumable(model, split, attacks, eps, batch_size, seed, partial)
        checks = _checks(samples, flags, eps_of, reporter)
        samples.insert(0, "epoch", EPOCH)
        samples, classwise = _write(folder, samples, labels, data, attacks, eps, checks,
                                    time.perf_counter() - t0, type(model).__qualname__)
    return Evaluation(samples, classwise, checks, folder)


def _check_outputs(model: nn.Module, x: torch.Tensor, num_classes: int, dataset: str) -> None:
    """One forward on two test images: a model that does not fit the dataset fails here, by name."""
    try:
        with torch.no_grad():
            logits = model(x[:2])
    except Exception as err:  # noqa: BLE001 - whatever the model raises, the cause is the input it got
        raise FairbenchError(f"the model fails on {dataset}'s images (batches of shape {tuple(x.shape[1:])}, values "
                             f"in [0, 1]): {type(err).__name__}: {first_line(err)}") from err
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(x[:2]), num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise FairbenchError(f"the model returns {shape} for 2 {dataset} images; it must return logits of shape "
                             f"(batch, {num_classes})")


def _checks(samples: pd.DataFrame, flags: dict, eps_of: dict[str, float], reporter: Reporter) -> dict:
    """The automatic checks of the one checkpoint, keyed like a run's (by epoch), warnings printed."""
    checks = {str(EPOCH): epoch_checks(samples, flags, eps_of)}
    for line in checks[str(EPOCH)]["warnings"]:
        reporter.message(f"  warning: {line}")
    return checks


def _write(folder: Path, samples: pd.DataFrame, labels: dict, data: Dataset, attacks: list[str], eps: float,
           checks: dict, seconds: float, model_class: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge into the run folder's files (the caller holds its lock; an earlier evaluation's suites stay)."""
    meta = read_run_json(folder) if (folder / RUN_JSON).is_file() else {
        "run_id": labels["run_id"], "external": True,
        "spec": {"method": labels["method"], "dataset": labels["dataset"], "seed": 0},
        "config": {"arch": EXTERNAL}, "protocol_id": EXTERNAL, "model_class": model_class,
        "data_fingerprint": data.fingerprint(), "attacks": {}, "evaluations": []}
    return merge_results(folder, samples, labels, data.class_names, meta, attacks, eps, seconds, checks=checks)
