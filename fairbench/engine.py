"""The training loop: epochs x batches, per-epoch seeding, checkpoints, resume, NaN guard.

Per epoch the data order, augmentation and attack noise come from generators seeded by
(seed, epoch), so a run resumed from the checkpoint of epoch e continues bit-identically on CPU.
Nothing in a step synchronises with the host; the loss is read only at log intervals.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from fairbench.checkpoint import first_line, list_checkpoints, load_checkpoint, save_checkpoint
from fairbench.data.base import Dataset
from fairbench.data.loader import DeviceSplit, hold_out, stratified_subset, train_batches
from fairbench.errors import FairbenchError, NonFiniteLossError
from fairbench.method import Batch, FairAT, RunContext, SampleMemory
from fairbench.models import create_model
from fairbench.schedules import lr_factor
from fairbench.spec import ResolvedRun


class Reporter(Protocol):
    def run_started(self, run_id: str, epochs: int, batches: int, start_epoch: int) -> None: ...
    def batch_progress(self, epoch: int, batch: int, loss: float, images_per_s: float) -> None: ...
    def epoch_done(self, epoch: int, loss: float, images_per_s: float, seconds: float, log: dict) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def run_started(self, *a, **k) -> None: ...
    def batch_progress(self, *a, **k) -> None: ...
    def epoch_done(self, *a, **k) -> None: ...
    def message(self, text: str) -> None: ...


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise FairbenchError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FairbenchError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from small integers (seed, epoch, stream)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
    return h


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

    @classmethod
    def build(cls, resolved: ResolvedRun, dataset: Dataset, device: torch.device) -> "Trainer":
        spec = resolved.spec
        torch.manual_seed(mix_seed(spec.seed, 0, 7))
        labels = dataset.train.labels
        positions = np.arange(len(labels))
        if spec.train_per_class:
            positions = stratified_subset(labels, dataset.num_classes, spec.train_per_class)
        method = resolved.method_cls(resolved.method_config)
        val_split = None
        if method.validation is not None:
            keep, val = hold_out(labels[positions], dataset.num_classes, method.validation.fraction,
                                 method.validation.position)
            full = DeviceSplit.from_arrays(dataset.train, device)
            val_split = full.subset(torch.as_tensor(positions[val], device=device))
            positions = positions[keep]
        train_split = DeviceSplit.from_arrays(dataset.train, device).subset(torch.as_tensor(positions, device=device))
        model = create_model(resolved.arch, dataset.num_classes, dataset.image_shape).to(device)
        channels_last = spec.channels_last if spec.channels_last is not None else device.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optim = resolved.optim
        optimizer = torch.optim.SGD(model.parameters(), lr=optim["lr"], momentum=optim["momentum"],
                                    nesterov=optim["nesterov"], weight_decay=optim["weight_decay"])
        ctx = RunContext(
            num_classes=dataset.num_classes, device=device, epochs=resolved.epochs, dataset=dataset.name,
            class_names=dataset.class_names, dafa_lambda=_dafa_lambda(dataset.name), num_train=len(train_split),
            generator=torch.Generator(device=device), val_split=val_split, eval_batch_size=spec.eval_batch_size,
            memory=SampleMemory(len(train_split), dataset.num_classes, device) if "sample_memory" in method.needs else None,
            model=model,
        )
        method.setup(ctx)
        amp = spec.amp if spec.amp is not None else device.type == "cuda"
        return cls(resolved, dataset, device, model, optimizer, method, ctx, train_split, amp, channels_last)

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"run_id": self.resolved.run_id, "config_hash": self.resolved.config_hash,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(), "torch_rng": torch.get_rng_state()}

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
            self.method.on_epoch_start(epoch, self.ctx)
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
            self.method.on_epoch_end(epoch, self.ctx)
            save_checkpoint(folder, epoch, self.state(), keep_last)
            logs = {k: float(v) / batches for k, v in log_sums.items()}
            reporter.epoch_done(epoch, float(loss_sum) / batches, seen / seconds, seconds, logs)
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


def _dafa_lambda(dataset: str) -> float:
    from fairbench.data import get_dataset_info

    return get_dataset_info(dataset).dafa_lambda
