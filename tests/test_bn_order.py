"""Order of the train-mode forwards of each loss, seen through BatchNorm's running statistics.

Every train-mode forward updates the running statistics, so one training step leaves the buffers of the
official code's order only if the method forwards its batches in that order. The DAFA and TRIX code (and
their TRADES baseline) forward the adversarial batch first; the CFA, FRL and WAT code the clean batch first.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from fairbench.adversaries import trades_loss
from fairbench.method import Batch
from fairbench.registry import get_method_class
from fairbench.spec import RunSpec, resolve
from tests.conftest import build_method

ADVERSARIAL_FIRST = ("trades", "dafa", "dafa-uniform", "trix", "trix-basic", "trix-uniform", "targeted-trades")
CLEAN_FIRST = ("cfa", "frl", "frl-rw", "wat", "fairtat")


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _config(name: str, **changes):
    """The method's defaults with a short attack (and DAFA's warm-up at epoch 1, so its memory is filled)."""
    config = get_method_class(name).Config()
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, steps=2, **({"warmup": 1} if "warmup" in fields else {}), **changes)


def _one_step(name: str, model: nn.Module, digits, batch: Batch, **changes):
    """One `training_loss` on `model` in train mode; returns (loss, train-mode inputs in forward order, ctx)."""
    method, ctx = build_method(get_method_class(name), digits, _config(name, **changes), epochs=20)
    ctx.generator.manual_seed(11)
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()) if m.training else None)
    try:
        loss = method.training_loss(model.train(), batch, ctx).loss
    finally:
        hook.remove()
    return loss, seen, ctx


def _replayed(model: nn.Module, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Running statistics after train-mode forwards of `inputs`, in that order, on a copy of `model`."""
    replay = copy.deepcopy(model).train()
    with torch.no_grad():
        for x in inputs:
            replay(x)
    return _buffers(replay)


def _check_order(name: str, model: nn.Module, digits, digits_batch, adversarial_first: bool) -> None:
    x, y, idx = digits_batch
    start = copy.deepcopy(model)
    _, seen, _ = _one_step(name, model, digits, Batch(x, y, idx))
    assert len(seen) == 2 and sum(torch.equal(s, x) for s in seen) == 1  # one clean, one adversarial forward
    x_adv = next(s for s in seen if not torch.equal(s, x))
    official = [x_adv, x] if adversarial_first else [x, x_adv]
    after = _buffers(model)
    assert _same(after, _replayed(start, official))
    assert not _same(after, _replayed(start, official[::-1]))  # the order is visible in the buffers


@pytest.mark.parametrize("name", ADVERSARIAL_FIRST)
def test_trades_family_forwards_adversarial_then_clean(name, tiny_model, digits, digits_batch):
    _check_order(name, tiny_model, digits, digits_batch, adversarial_first=True)


def test_resnet18_step_matches_adversarial_then_clean(digits, digits_batch):
    """The issue's model: ResNet-18 (here on 8x8 digits), whose running statistics drifted after one step."""
    from fairbench.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, image_shape=(1, 8, 8))
    _check_order("dafa", model, digits, digits_batch, adversarial_first=True)


@pytest.mark.parametrize("name", CLEAN_FIRST)
def test_methods_whose_code_forwards_clean_first_keep_that_order(name, tiny_model, digits, digits_batch):
    _check_order(name, tiny_model, digits, digits_batch, adversarial_first=False)


@pytest.mark.parametrize("name", ["trades", "trix"])
def test_order_changes_nothing_but_the_running_statistics(name, tiny_model, digits, digits_batch):
    """Same loss, same parameter gradients and the same random draws in either order."""
    x, y, idx = digits_batch
    results = []
    for order in ("adversarial_first", "clean_first"):
        model = copy.deepcopy(tiny_model)
        loss, _, ctx = _one_step(name, model, digits, Batch(x, y, idx), forward_order=order)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((loss.detach(), grads, ctx.generator.get_state(), _buffers(model)))
    (loss_a, grads_a, rng_a, bn_a), (loss_c, grads_c, rng_c, bn_c) = results
    assert torch.equal(loss_a, loss_c)
    assert all(torch.equal(a, c) for a, c in zip(grads_a, grads_c))
    assert torch.equal(rng_a, rng_c)
    assert not _same(bn_a, bn_c)


def test_trades_loss_keeps_clean_first_for_callers_that_do_not_choose(tiny_model, digits_batch):
    """Plugins calling `trades_loss` without `order` keep the order (and results) they had."""
    x, y, _ = digits_batch
    x_adv = (x + 0.03).clamp(0, 1)
    start = copy.deepcopy(tiny_model)
    trades_loss(tiny_model.train(), x, x_adv, y, beta=6.0)
    assert _same(_buffers(tiny_model), _replayed(start, [x, x_adv]))


@pytest.mark.parametrize("name", ADVERSARIAL_FIRST + CLEAN_FIRST)
def test_forward_order_is_part_of_the_run_id_of_the_trades_family(name):
    """Results from before the order changed are not found under the new ids."""
    config = resolve(RunSpec(name, "digits")).as_dict()["method_config"]
    assert config.get("forward_order") == ("adversarial_first" if name in ADVERSARIAL_FIRST else None)
