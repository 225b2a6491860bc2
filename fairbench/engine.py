"""The training loop: epochs x batches, per-epoch seeding, checkpoints, resume, NaN guard.

Per epoch the data order, augmentation and attack noise come from generators seeded by
(seed, epoch), so a run resumed from the checkpoint of epoch e continues bit-identically on CPU.
Nothing in a step synchronises with the host; the loss is read only at log intervals.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from fairbench.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fairbench.data.base import Dataset
from fairbench.data.loader import DeviceSplit, hold_out, stratified_subset, train_batches
from fairbench.errors import FairbenchError, NonFiniteLossError, first_line
from fairbench.method import Batch, FairAT, RunContext, SampleMemory, Services
from fairbench.models import create_model
from fairbench.schedules import lr_factor
from fairbench.spec import ResolvedRun


class Reporter(Protocol):
    def run_started(self, run_id: str, epochs: int, batches: int, start_epoch: int) -> None: ...
    def batch_progress(self, epoch: int, batch: int, loss: float, images_per_s: float) -> None: ...
    def epoch_done(self, epoch: int, loss: float, images_per_s: float, seconds: float, log: dict) -> None: ...
    def eval_progress(self, what: str, done: int, total: int, seconds: float) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def run_started(self, *a, **k) -> None: ...
    def batch_progress(self, *a, **k) -> None: ...
    def epoch_done(self, *a, **k) -> None: ...
    def eval_progress(self, *a, **k) -> None: ...
    def message(self, text: str) -> None: ...


def select_device(name: str) -> torch.device:
    """The torch device `--device NAME` means; a name this machine cannot run on is refused by its name
    (before anything is written), not left to fail inside torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise FairbenchError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise FairbenchError(f"--device {name!r}: fairbench runs on cpu or CUDA GPUs; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FairbenchError(f"--device {name} was asked for but no CUDA GPU is visible here; use --device cpu "
                                 f"(or auto, which takes a GPU when there is one)")
        if device.index is not None and device.index >= count:
            raise FairbenchError(f"--device {name} was asked for but only {count} CUDA GPU(s) are visible "
                                 f"(cuda:0..cuda:{count - 1}); use one of those or --device cuda")
    return device


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from small integers (seed, epoch, stream)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
    return h


def training_splits(dataset: Dataset, services: Services, device: torch.device,
                    train_per_class: int | None = None) -> tuple[DeviceSplit, DeviceSplit | None]:
    """(training split, validation split): the first `train_per_class` samples of each class (all without it),
    less the share of each class the method's `services.validation` holds out (None when it asks for none)."""
    labels = dataset.train.labels
    positions = np.arange(len(labels))
    if train_per_class:
        positions = stratified_subset(labels, dataset.num_classes, train_per_class)
    full = DeviceSplit.from_arrays(dataset.train, device)
    spec = services.validation
    if spec is None:
        return full.subset(torch.as_tensor(positions, device=device)), None
    keep, val = hold_out(labels[positions], dataset.num_classes, spec.fraction, spec.position)
    return (full.subset(torch.as_tensor(positions[keep], device=device)),
            full.subset(torch.as_tensor(positions[val], device=device)))


def build_context(services: Services, num_classes: int, device: torch.device, epochs: int, num_train: int,
                  val_split: DeviceSplit | None = None, eval_batch_size: int = 256) -> RunContext:
    """The context a method trains with: a generator on the device and exactly the services it declares.

    The one place a `RunContext` is made (the engine, and the tests through `tests/conftest.py`), so a method
    tested against it is tested against what the engine gives it.
    """
    if services.validation is not None and val_split is None:
        raise ValueError("the method declares a validation split; pass the one `training_splits` held out")
    return RunContext(
        num_classes=num_classes, device=device, epochs=epochs, generator=torch.Generator(device=device),
        memory=SampleMemory(num_train, num_classes, device) if services.sample_memory else None,
        val_split=val_split, eval_batch_size=eval_batch_size,
    )


@dataclass
class Trainer:
    """Everything a run needs in memory; built once, then `fit` runs the remaining epochs."""

    resolved: ResolvedRun
    dataset: Dataset
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: FairAT
    ctx: RunContext
    train_split: DeviceSplit
    amp: bool
    channels_last: bool
    history: list = field(default_factory=list)
    """One `epoch_record` per trained epoch, kept in every checkpoint so a resumed run has all of them."""
    epoch_observers: list = field(default_factory=list)
    """Called with (record, trainer) after each epoch, before the checkpoint (they may add to the record)."""

    @classmethod
    def build(cls, resolved: ResolvedRun, dataset: Dataset, device: torch.device) -> "Trainer":
        spec = resolved.spec
        torch.manual_seed(mix_seed(spec.seed, 0, 7))
        method = resolved.method_cls(resolved.method_config)
        train_split, val_split = training_splits(dataset, method.services, device, spec.train_per_class)
        model = create_model(resolved.arch, dataset.num_classes, dataset.image_shape).to(device)
        channels_last = spec.channels_last if spec.channels_last is not None else device.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optim = resolved.optim
        optimizer = torch.optim.SGD(model.parameters(), lr=optim["lr"], momentum=optim["momentum"],
                                    nesterov=optim["nesterov"], weight_decay=optim["weight_decay"])
        ctx = build_context(method.services, dataset.num_classes, device, resolved.epochs, len(train_split),
                            val_split, spec.eval_batch_size)
        method.setup(ctx)
        amp = spec.amp if spec.amp is not None else device.type == "cuda"
        return cls(resolved, dataset, device, model, optimizer, method, ctx, train_split, amp, channels_last)

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"run_id": self.resolved.run_id, "config_hash": self.resolved.config_hash,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(), "torch_rng": torch.get_rng_state(),
                "history": list(self.history)}

    def restore(self, state: dict, source: Path | str = "checkpoint") -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state["method"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise FairbenchError(
                f"{source} does not fit this run's model or method ({first_line(err)}); it was written by another "
                f"fairbench version or configuration: choose another --out folder, or remove the run folder to "
                f"train it again") from err
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state.get("history", []))  # checkpoints from before the history have none

    def resume_epoch(self, folder: Path) -> int:
        """Load the newest checkpoint in `folder`; returns the last finished epoch (0 if none)."""
        found = list_checkpoints(folder)
        if not found:
            return 0
        epoch, path = max(found.items())
        state = load_checkpoint(path, self.resolved.run_id, self.resolved.config_hash)
        self.restore(state, path)
        return epoch

    # -- training ----------------------------------------------------------------------------------
    def fit(self, folder: Path, start_epoch: int, reporter: Reporter, keep_last: int = 5,
            log_every: int = 25, after_batch: Callable[[int, int], None] | None = None) -> dict:
        """Train epochs start_epoch+1 .. E, checkpointing each; returns throughput statistics."""
        resolved, spec = self.resolved, self.resolved.spec
        batches = -(-len(self.train_split) // resolved.batch_size)
        reporter.run_started(resolved.run_id, resolved.epochs, batches, start_epoch)
        batch_ids = torch.arange(batches, device=self.device)
        images_seen, train_seconds = 0, 0.0
        for epoch in range(start_epoch + 1, resolved.epochs + 1):
            torch.manual_seed(mix_seed(spec.seed, epoch, 2))
            data_gen = torch.Generator(device=self.device).manual_seed(mix_seed(spec.seed, epoch, 0))
            self.ctx.generator.manual_seed(mix_seed(spec.seed, epoch, 1))
            self.ctx.epoch = epoch
            for group in self.optimizer.param_groups:
                group["lr"] = resolved.optim["lr"] * lr_factor(resolved.optim["schedule"], epoch, resolved.epochs)
            self.method.on_epoch_start(epoch, self.model, self.ctx)
            self.model.train()
            loss_sum = torch.zeros((), device=self.device)
            first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
            log_sums: dict[str, torch.Tensor] = {}
            start = time.perf_counter()
            seen = 0
            for b, (x, y, pos) in enumerate(train_batches(self.train_split, resolved.batch_size,
                                                            self.dataset.augment, data_gen, self.channels_last)):
                with self._autocast():
                    out = self.method.training_loss(self.model, Batch(x, y, pos), self.ctx)
                loss = out.loss.float()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), batch_ids[b], first_bad)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_sum += loss.detach()
                for k, v in out.log.items():
                    log_sums[k] = log_sums.get(k, 0) + v.detach().float()
                seen += len(y)
                if after_batch is not None:
                    after_batch(epoch, b)
                if (b + 1) % log_every == 0:
                    self._check_finite(first_bad, epoch)
                    reporter.batch_progress(epoch, b + 1, float(loss_sum) / (b + 1), seen / (time.perf_counter() - start))
            self._check_finite(first_bad, epoch)
            seconds = time.perf_counter() - start
            images_seen, train_seconds = images_seen + seen, train_seconds + seconds
            self.method.on_epoch_end(epoch, self.model, self.ctx)
            logs = {k: float(v) / batches for k, v in log_sums.items()}
            record = epoch_record(epoch, float(loss_sum) / batches, self.optimizer.param_groups[0]["lr"],
                                  seen / seconds, seconds, logs, self.method.state_dict(), self.dataset.num_classes)
            for observe in self.epoch_observers:  # tracking: held-out class-wise accuracy, experiment trackers
                observe(record, self)
            self.history.append(record)
            save_checkpoint(folder, epoch, self.state(), keep_last)
            reporter.epoch_done(epoch, record["loss"], record["images_per_s"], seconds, logs)
        return {"train_seconds": train_seconds, "images_per_s": images_seen / train_seconds if train_seconds else None}

    def _check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        bad = int(first_bad)
        if bad >= 0:
            raise NonFiniteLossError(
                f"loss became NaN/inf at epoch {epoch}, batch {bad + 1}; stopped without writing a checkpoint "
                f"for this epoch, the last good one is kept. Lower the learning rate or check the method's settings.")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def epoch_record(epoch: int, loss: float, lr: float, images_per_s: float, seconds: float, parts: dict[str, float],
                 method_state: dict, num_classes: int) -> dict:
    """What one epoch did, for the run's history: loss and its logged parts, learning rate, speed, and the
    method's per-class state (every 1-D state tensor with one entry per class: DAFA/TRIX class weights, CFA's
    per-class radii, FRL's multipliers)."""
    per_class = {k: [float(x) for x in v.detach().float().cpu()] for k, v in method_state.items()
                 if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == num_classes and v.is_floating_point()}
    return {"epoch": epoch, "loss": loss, "lr": float(lr), "images_per_s": images_per_s, "seconds": seconds,
            "parts": dict(parts), "class_state": per_class, "tracked": {}}
