"""Shared fixtures: tiny real data and a tiny real model, so tests exercise the real code path in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fairbench.data import load_dataset
from fairbench.engine import build_context, training_splits
from fairbench.method import FairAT, RunContext, Services
from fairbench.models import create_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return create_model("smallcnn", num_classes=10, image_shape=(1, 8, 8))


@pytest.fixture
def digits_batch(digits):
    x = torch.from_numpy(digits.train.images[:32]).float() / 255
    y = torch.from_numpy(digits.train.labels[:32])
    return x, y, torch.arange(32)


def make_context(num_classes: int = 10, num_train: int = 64, epochs: int = 4, epoch: int = 1,
                 memory: bool = True, seed: int = 0) -> RunContext:
    """A bare context from the engine's own `build_context` (no validation split), for tests of single steps."""
    ctx = build_context(Services(sample_memory=memory), num_classes, torch.device("cpu"), epochs, num_train)
    ctx.epoch = epoch
    ctx.generator.manual_seed(seed)
    return ctx


def build_method(cls: type[FairAT], dataset, config=None, *, epochs: int = 4, epoch: int = 1, seed: int = 0,
                 train_per_class: int | None = None) -> tuple[FairAT, RunContext]:
    """A method set up as `Trainer.build` sets it up, through the engine's own functions: the training and
    validation splits of `dataset` (`training_splits`), the context with the services the method declares
    (`build_context`), then `setup`. The generator is seeded with `seed` and the epoch set, as `fit` does."""
    method = cls(config if config is not None else cls.Config())
    cpu = torch.device("cpu")
    train, val = training_splits(dataset, method.services, cpu, train_per_class)
    ctx = build_context(method.services, dataset.num_classes, cpu, epochs, len(train), val)
    ctx.epoch = epoch
    ctx.generator.manual_seed(seed)
    method.setup(ctx)
    return method, ctx


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`fairbench ARGS` in this process, as the console script runs it: (exit code, stdout, stderr)."""
    import sys

    from fairbench.cli import main

    old, sys.argv = sys.argv, ["fairbench", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
