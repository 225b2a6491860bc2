"""Engine services a method can ask for: a held-out validation split and class-wise accuracy on it."""
from __future__ import annotations

import numpy as np
import torch
from fairbench.methods.trades import Trades

from fairbench.attacks.pgd import PGD
from fairbench.data.loader import hold_out
from fairbench.engine import Trainer
from fairbench.method import Services, ValidationSpec
from fairbench.spec import ResolvedRun, RunSpec
from fairbench.trades_family import TradesConfig


class ValidatedTrades(Trades):
    """TRADES that records class-wise validation accuracy after every epoch (as FRL/WAT/CFA need)."""

    services = Services(validation=ValidationSpec(fraction=0.1, position="last"))

    def setup(self, ctx):
        self.history = []

    def on_epoch_end(self, epoch, model, ctx):
        self.history.append(ctx.classwise_accuracy(model, ctx.val_split, attack=PGD(8 / 255, steps=5, alpha=2 / 255)))


def test_validation_split_is_held_out_per_class(digits, tmp_path):
    spec = RunSpec(method="trades", dataset="digits", epochs=2, batch_size=64, eval_last=1)
    resolved = ResolvedRun(spec, "smallcnn", 2, 64, TradesConfig(steps=1), ValidatedTrades)
    trainer = Trainer.build(resolved, digits, torch.device("cpu"))
    val, train = trainer.ctx.val_split, trainer.train_split
    assert len(val) + len(train) == len(digits.train)
    assert not set(val.index.tolist()) & set(train.index.tolist())
    counts = np.bincount(digits.train.labels, minlength=10)
    val_counts = np.bincount(val.labels.numpy(), minlength=10)
    assert np.array_equal(val_counts, np.round(0.1 * counts).astype(int))
    # "last": the held-out samples are each class's last ones in dataset order
    for k in range(10):
        members = np.flatnonzero(digits.train.labels == k)
        assert set(val.index[val.labels == k].tolist()) == set(members[-val_counts[k]:].tolist())
    assert trainer.ctx.memory is None  # no service it did not declare

    trainer.fit(tmp_path, 0, reporter=__import__("fairbench.engine", fromlist=["SilentReporter"]).SilentReporter())
    assert len(trainer.method.history) == 2
    acc = trainer.method.history[-1]
    assert acc.shape == (10,) and ((acc >= 0) & (acc <= 1)).all()
    clean = trainer.ctx.classwise_accuracy(trainer.model, val)
    assert (acc <= clean + 1e-6).all()


def test_hold_out_first_position():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    train, val = hold_out(labels, 2, 0.4, "first")
    assert val.tolist() == [0, 1, 2, 3] and train.tolist() == [4, 5, 6, 7, 8, 9]
