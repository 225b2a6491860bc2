"""One run end to end: resolve, train (or resume), evaluate the last k checkpoints, write results."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fairbench import __version__
from fairbench.attacks.registry import create_attack
from fairbench.checkpoint import checkpoint_path, list_checkpoints, prune_checkpoints
from fairbench.data import data_fingerprint, default_data_root, load_dataset
from fairbench.engine import Reporter, SilentReporter, Trainer, select_device
from fairbench.errors import FairbenchError
from fairbench.evalrun import PARTIAL, classwise_table, eval_split, evaluate_epochs, partial_name, run_labels, suite_eps
from fairbench.files import remove_stale_temporaries
from fairbench.lock import RunLock
from fairbench.records import with_run_labels
from fairbench.registry import get_method_class
from fairbench.results import HISTORY, is_damaged, is_finished, refuse_other_data, run_dir, write_json, write_parquet
from fairbench.spec import ResolvedRun, RunSpec, hot_start_base, provenance, resolve
from fairbench.tracking import HeldOutAccuracy, history_frame, open_tracker


@dataclass
class RunOutcome:
    run_id: str
    folder: Path
    status: str
    """'done' (trained and evaluated now) or 'skipped' (a finished run with this config exists)."""


def run_one(spec: RunSpec, out: Path, resume: bool = False, reporter: Reporter | None = None,
            keep_last: int = 5, after_batch=None, wait: bool = True) -> RunOutcome:
    """Train and evaluate one run under its run lock. A run held by another live process is waited for
    (`wait`) or refused with `RunLockedError`; a finished run is skipped, also when another process
    finished it while this one waited."""
    reporter = reporter or SilentReporter()
    spec = with_hot_start(spec, out, resume, reporter, keep_last, wait)
    resolved = resolve(spec)
    folder = run_dir(out, resolved.run_id)
    if is_finished(folder):
        check_same_data(folder, spec)
        reporter.message(f"{resolved.run_id}: finished earlier, skipped")
        tidy_finished(folder, resolved.spec)
        return RunOutcome(resolved.run_id, folder, "skipped")
    with RunLock(folder, "training", say=reporter.message).hold(wait) as lock:
        if is_finished(folder):
            reporter.message(f"{resolved.run_id}: finished by another process, skipped")
            return RunOutcome(resolved.run_id, folder, "skipped")
        if is_damaged(folder):
            if rebuild_classwise(folder, resolved):
                reporter.message(f"{resolved.run_id}: classwise.parquet could not be read; rebuilt it from the "
                                 f"run's per-sample records")
                return RunOutcome(resolved.run_id, folder, "done")
            reporter.message(f"{resolved.run_id}: classwise.parquet and the per-sample records could not be "
                             f"read; evaluating the run again from its checkpoints")
            resume = True
        return _train_and_evaluate(spec, resolved, folder, resume, reporter, keep_last, after_batch, lock)


def _train_and_evaluate(spec: RunSpec, resolved: ResolvedRun, folder: Path, resume: bool, reporter: Reporter,
                        keep_last: int, after_batch, lock: RunLock) -> RunOutcome:
    dataset = load_dataset(spec.dataset, spec.data_dir)
    device = select_device(spec.device)
    trainer = Trainer.build(resolved, dataset, device)
    ckpt_dir = folder / "checkpoints"
    for stale in remove_stale_temporaries(folder):
        reporter.message(f"{resolved.run_id}: removed {stale.name}, left by an interrupted write")
    prune_checkpoints(ckpt_dir, max(keep_last, spec.eval_last))
    existing = list_checkpoints(ckpt_dir)
    if existing and not resume:
        raise FairbenchError(
            f"{folder} already holds checkpoints up to epoch {max(existing)}; pass --resume to continue that "
            f"run, or choose another --out. Nothing was overwritten.")
    start_epoch = trainer.resume_epoch(ckpt_dir) if resume else 0
    if start_epoch == 0 and spec.init_from:
        load_start_weights(trainer, Path(spec.init_from))
    if start_epoch:
        reporter.message(f"{resolved.run_id}: resuming after epoch {start_epoch}")
    else:
        for note in other_lengths(folder, resolved):
            reporter.message(note)

    def guarded(epoch: int, batch: int) -> None:
        if lock.lost:
            lock.check()  # another process took the run over: stop before the next checkpoint
        if after_batch is not None:
            after_batch(epoch, batch)

    t0 = time.perf_counter()
    stats = {}
    if start_epoch < resolved.epochs:
        with watched(trainer, spec, folder, start_epoch, reporter):
            stats = trainer.fit(ckpt_dir, start_epoch, reporter, keep_last=max(keep_last, spec.eval_last),
                                after_batch=guarded)
    if trainer.history:
        write_parquet(folder / HISTORY, history_frame(trainer.history, run_labels(resolved)))
    train_wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    classwise, samples, evaluated, checks = evaluate_checkpoints(trainer, resolved, dataset, folder, reporter)
    eval_wall = time.perf_counter() - t1
    metadata = run_metadata(resolved, trainer, device, stats, train_wall, eval_wall, evaluated)
    metadata["checks"] = checks
    metadata["data_fingerprint"] = dataset.fingerprint()
    lock.check()
    write_parquet(folder / "samples.parquet", with_run_labels(samples, run_labels(resolved)))
    write_json(folder / "run.json", metadata)
    write_parquet(folder / "classwise.parquet", classwise, metadata)
    shutil.rmtree(folder / PARTIAL, ignore_errors=True)
    reporter.message(f"{resolved.run_id}: wrote {folder / 'classwise.parquet'}")
    return RunOutcome(resolved.run_id, folder, "done")


@contextlib.contextmanager
def watched(trainer: Trainer, spec: RunSpec, folder: Path, start_epoch: int, reporter: Reporter):
    """`--track-every N` and `--track KIND` for the epochs this process trains: the held-out class-wise
    accuracy goes into each epoch's history record, then the record to the tracker (closed on the way out)."""
    observers = []
    if spec.track_every:
        observers.append(HeldOutAccuracy(spec.track_every, trainer.resolved.epochs, spec.eval_eps,
                                         spec.eval_batch_size, spec.seed))
    tracker = None
    if spec.track:
        tracker = open_tracker(spec.track, folder.parent.parent, trainer.resolved.run_id, start_epoch,
                               trainer.resolved.as_dict(), reporter.message)
        names = trainer.dataset.class_names
        observers.append(lambda record, _: tracker.log(record, names))
    trainer.epoch_observers = observers
    try:
        yield
    finally:
        trainer.epoch_observers = []
        if tracker is not None:
            tracker.close()


def check_same_data(folder: Path, spec: RunSpec) -> None:
    """A finished run is only skipped when the data it would train on now is the data it was trained on (its
    run.json records the fingerprint); a run from before fingerprints were recorded is taken as it is."""
    try:
        meta = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(meta, dict):
        refuse_other_data(meta, folder.name, "finished earlier", spec.dataset,
                          lambda: data_fingerprint(spec.dataset, spec.data_dir),
                          f"Point --data-dir at the data the run was trained on (read now: "
                          f"{spec.data_dir or default_data_root()}), or train on this data under another --out")


def other_lengths(folder: Path, resolved: ResolvedRun) -> list[str]:
    """Notes on finished runs beside `folder` with the same settings but another number of epochs: --epochs 6
    after a 5-epoch run starts a new run from scratch, where a user may have expected one more epoch."""
    def settings(config: dict) -> str:
        return json.dumps({k: v for k, v in config.items() if k != "epochs"}, sort_keys=True, default=str)

    mine = settings(json.loads(json.dumps(resolved.as_dict(), default=str)))
    prefix = resolved.run_id.rsplit("_", 1)[0] + "_"
    notes = []
    for other in sorted(folder.parent.glob(prefix + "*")):
        if other == folder or not is_finished(other):
            continue
        try:
            config = json.loads((other / "run.json").read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(config, dict) and settings(config) == mine:
            notes.append(f"note: a finished {config.get('epochs')}-epoch run of these settings exists ({other.name}); "
                         f"this starts a new {resolved.epochs}-epoch run from epoch 1 under {folder.name}; it does "
                         f"not continue that one (the learning-rate schedule follows the run's length)")
    return notes


def rebuild_classwise(folder: Path, resolved: ResolvedRun) -> bool:
    """Write a damaged per-class table again from the intact per-sample records and run.json (every suite,
    also those `fairbench eval` added); False when those cannot be read either."""
    try:
        samples = pd.read_parquet(folder / "samples.parquet")
        meta = json.loads((folder / "run.json").read_text())
        eps_of = {"clean": 0.0, **{name: float(s["eps"]) for name, s in meta["attacks"].items()}}
    except Exception:  # noqa: BLE001 - anything unreadable means: evaluate again from the checkpoints
        return False
    names = load_dataset(resolved.spec.dataset, resolved.spec.data_dir).class_names
    write_parquet(folder / "classwise.parquet", classwise_table(samples, run_labels(resolved), names, eps_of), meta)
    return True


def tidy_finished(folder: Path, spec: RunSpec) -> None:
    """Remove what a kill after the last result file left in a finished run: temporaries, and the chunk
    records of the run's own evaluation (those of a killed `fairbench eval` stay: it resumes from them).
    Skipped while another process works on the run."""
    attacks = [a for a in spec.attacks if a != "clean"]
    own = [folder / PARTIAL / partial_name(e, attacks, spec.eval_eps, spec.attack_precision)
           for e in list_checkpoints(folder / "checkpoints")]
    own = [p for p in own if p.is_dir()]
    if not own and not any(folder.glob(".*.tmp")):
        return
    lock = RunLock(folder, "tidying")
    if lock.try_acquire() is not None:
        return
    try:
        remove_stale_temporaries(folder)
        for path in own:
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            (folder / PARTIAL).rmdir()  # only when nothing else is left in it
    finally:
        lock.release()


def with_hot_start(spec: RunSpec, out: Path, resume: bool, reporter: Reporter, keep_last: int,
                   wait: bool = True) -> RunSpec:
    """For a method with `hot_start`, train (or find, or wait for) that method's run on the same data, arch
    and seed under the common protocol, and start from its final checkpoint."""
    cls = get_method_class(spec.method)
    if not cls.hot_start or spec.init_from:
        return spec
    base = hot_start_base(spec)
    reporter.message(f"{spec.method} starts from a {cls.hot_start} run (hot start)")
    run_one(base, out, resume=resume, reporter=reporter, keep_last=keep_last, wait=wait)
    return hot_started(spec, out)


def hot_started(spec: RunSpec, out: Path) -> RunSpec:
    """`spec` starting from the final checkpoint of its hot-start base run under `out` (the path is known
    before the base is trained, so a plan knows the run id in advance)."""
    base = resolve(hot_start_base(spec))
    final = checkpoint_path(run_dir(out, base.run_id) / "checkpoints", base.epochs)
    return dataclasses.replace(spec, init_from=str(final))


def load_start_weights(trainer: Trainer, path: Path) -> None:
    """Model weights from a fairbench checkpoint (file or run folder) or a plain state_dict file."""
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise FairbenchError(f"--init-from {path}: no checkpoints in that folder")
        path = max(found.items())[1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        trainer.model.load_state_dict(state.get("model", state))
    except FileNotFoundError as err:
        raise FairbenchError(f"--init-from {path}: file not found") from err
    except Exception as err:
        raise FairbenchError(f"--init-from {path}: cannot load model weights for {trainer.resolved.arch} ({err})") from err


def evaluate_checkpoints(trainer: Trainer, resolved: ResolvedRun, dataset, folder: Path,
                         reporter: Reporter) -> tuple[pd.DataFrame, pd.DataFrame, list[int], dict]:
    """Clean + every attack suite on each of the last `eval_last` checkpoints (resumable per chunk):
    (per-class table, per-sample records, epochs, automatic checks per epoch)."""
    spec = resolved.spec
    found = list_checkpoints(folder / "checkpoints")
    if not found or max(found) != resolved.epochs:
        raise FairbenchError(f"training of {resolved.run_id} did not finish (checkpoints: {sorted(found)})")
    epochs = sorted(found)[-spec.eval_last:]
    split = eval_split(dataset, trainer.device, spec.eval_per_class)
    attacks = [a for a in spec.attacks if a != "clean"]
    samples, checks = evaluate_epochs(trainer, epochs, attacks, spec.eval_eps, split, folder, reporter)
    classwise = classwise_table(samples, run_labels(resolved), dataset.class_names, suite_eps(attacks, spec.eval_eps))
    return classwise, samples, epochs, checks


def state_summary(state: dict) -> dict:
    """The method's per-class state for the metadata (weights, radii, similarity); large or nested
    entries (averaged model weights) are described by shape only."""
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            out[key] = value.tolist() if value.numel() <= 1024 else f"tensor{list(value.shape)}"
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        else:
            out[key] = f"<{type(value).__name__}>"
    return out


def data_root_hint(data_dir: str | None) -> str | None:
    """The --data-dir a run was trained with, absolute: `fairbench eval` reads the data from there when it is
    given none (a hint kept beside the spec, not part of the run id: the same run may move between roots)."""
    return str(Path(data_dir).expanduser().resolve()) if data_dir else None


def run_metadata(resolved: ResolvedRun, trainer: Trainer, device: torch.device, stats: dict,
                 train_wall: float, eval_wall: float, evaluated: list[int]) -> dict:
    spec = resolved.spec
    return {
        "run_id": resolved.run_id, "config_hash": resolved.config_hash, "protocol_id": resolved.protocol_id,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("data_dir", "device")},
        "data_dir": data_root_hint(spec.data_dir),
        "protocol": resolved.protocol, "config": resolved.as_dict(), **provenance(resolved),
        "method_state": state_summary(trainer.method.state_dict()),
        "attacks": {a: create_attack(a, spec.eval_eps).settings() for a in spec.attacks if a != "clean"},
        "attack_precision": spec.attack_precision,
        "evaluated_epochs": evaluated, "num_train": len(trainer.train_split),
        "num_params": sum(p.numel() for p in trainer.model.parameters()),
        "amp_bf16": trainer.amp, "channels_last": trainer.channels_last, "intra_op_threads": torch.get_num_threads(),
        "versions": {"fairbench": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "train_wall_s": train_wall, "eval_wall_s": eval_wall, **stats,
    }
