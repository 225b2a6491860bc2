"""Contract over every registered method: a tiny real step, finite loss, exact state round-trip and resume."""
from __future__ import annotations

import copy

import pytest
import torch

from fairbench.method import Batch, FairAT
from fairbench.registry import get_method_class, list_methods
from tests.conftest import setup_method


def _setup(name: str, model, digits, ctx_epochs: int = 4):
    """The engine's order: build, context (with the services the method declares), setup."""
    cls = get_method_class(name)
    config = cls.Config()
    if hasattr(config, "warmup"):
        import dataclasses

        config = dataclasses.replace(config, warmup=1, steps=2)
    elif hasattr(config, "steps"):
        import dataclasses

        config = dataclasses.replace(config, steps=2)
    return setup_method(cls, model, digits, config, epochs=ctx_epochs)


def _step(method: FairAT, model, batch: Batch, ctx, opt) -> torch.Tensor:
    out = method.training_loss(model, batch, ctx)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    return out.loss.detach()


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, tiny_model, digits_batch, digits):
    cls = get_method_class(name)
    assert issubclass(cls, FairAT) and cls.name == name and cls.description
    model = tiny_model.train()
    method, ctx = _setup(name, model, digits)
    x, y, idx = digits_batch
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    # epoch 1 (the warm-up epoch for DAFA-style methods): a real step, finite loss, training mode kept
    method.on_epoch_start(1, ctx)
    model.train()
    loss = _step(method, model, Batch(x, y, idx), ctx, opt)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.training
    method.on_epoch_end(1, ctx)

    # snapshot everything a checkpoint holds, then take the next step twice: uninterrupted and resumed
    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "method": copy.deepcopy(method.state_dict())}
    ctx.epoch = 2
    model.train()
    ctx.generator.manual_seed(123)
    loss_a = _step(method, model, Batch(x, y, idx), ctx, opt)
    weights_a = [p.detach().clone() for p in model.parameters()]

    fresh, ctx_b = _setup(name, model, digits)
    ctx_b.epoch = 2
    fresh.load_state_dict(saved["method"])
    assert _same_state(fresh.state_dict(), saved["method"])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    model.train()
    ctx_b.generator.manual_seed(123)
    loss_b = _step(fresh, model, Batch(x, y, idx), ctx_b, opt)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(weights_a, model.parameters()):
        assert torch.equal(a, b.detach())
    assert fresh.eval_model(model) is not None


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_unknown_method_lists_choices():
    from fairbench.errors import UnknownNameError

    with pytest.raises(UnknownNameError) as err:
        get_method_class("trixx")
    assert "trades" in str(err.value) and "trix" in str(err.value)


def test_builtins_present():
    assert {"trades", "dafa", "trix", "trix-basic", "trix-uniform", "dafa-uniform"} <= set(list_methods())
