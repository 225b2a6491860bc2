"""Shared fixtures: tiny real data and a tiny real model, so tests exercise the real code path in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fairbench.data import load_dataset
from fairbench.method import RunContext, SampleMemory
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
    gen = torch.Generator().manual_seed(seed)
    return RunContext(num_classes=num_classes, device=torch.device("cpu"), epochs=epochs, dataset="digits",
                      class_names=tuple(str(i) for i in range(num_classes)), dafa_lambda=1.0, num_train=num_train,
                      epoch=epoch, generator=gen,
                      memory=SampleMemory(num_train, num_classes, torch.device("cpu")) if memory else None)


def setup_method(cls, model, digits, config=None, **context):
    """A method set up as the engine does: the services it declares (sample memory, a real validation
    split of 60 digits) and `ctx.model`."""
    from fairbench.data.loader import DeviceSplit

    method = cls(config if config is not None else cls.Config())
    ctx = make_context(memory="sample_memory" in cls.needs, **context)
    ctx.model = model
    if cls.validation is not None:
        ctx.val_split = DeviceSplit.from_arrays(digits.train, torch.device("cpu")).subset(torch.arange(1000, 1060))
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
