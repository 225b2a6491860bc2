"""FAWA / EMA weight averaging (docs/methods/cfa.md §2.5): first copy, decay, integer buffers, cached eval model,
resume."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fairbench.attacks.pgd import PGD
from fairbench.averaging import ModelAverager, WeightAverage, worst_class_robust_accuracy
from fairbench.data.loader import DeviceSplit
from tests.conftest import make_context


def _train_forward(model: nn.Module, x: torch.Tensor, shift: float = 0.0) -> None:
    """Change the weights and the BatchNorm running statistics, as a training epoch would."""
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
        model(x)


def test_first_update_copies_the_whole_state(tiny_model, digits_batch):
    x, _, _ = digits_batch
    _train_forward(tiny_model, x)
    avg = WeightAverage(0.88)
    assert not avg.started
    avg.update(tiny_model)
    state = tiny_model.state_dict()
    assert avg.started and avg.weights.keys() == state.keys()
    assert any("running_mean" in k for k in state) and any("num_batches_tracked" in k for k in state)
    for k, v in state.items():
        assert torch.equal(avg.weights[k], v)
        assert avg.weights[k].data_ptr() != v.data_ptr()  # a copy, not a view of the live weights


def test_decay_rule_on_floats_and_integer_counter_is_a_no_op(tiny_model, digits_batch):
    x, _, _ = digits_batch
    _train_forward(tiny_model, x)
    avg = WeightAverage(0.88)
    avg.update(tiny_model)
    first = copy.deepcopy(avg.weights)
    _train_forward(tiny_model, x, shift=0.01)
    current = tiny_model.state_dict()
    avg.update(tiny_model)
    for k, v in current.items():
        if v.is_floating_point():
            assert torch.equal(avg.weights[k], first[k] * 0.88 + v * (1 - 0.88)), k
        else:
            assert torch.equal(avg.weights[k], first[k]), k  # num_batches_tracked keeps the first copy
            assert not torch.equal(v, first[k])


def test_decay_by_hand():
    lin = nn.Linear(1, 1, bias=False)
    avg = WeightAverage(0.88)
    for value in (1.0, 3.0, 3.0):
        with torch.no_grad():
            lin.weight.fill_(value)
        avg.update(lin)
    # 1 -> 0.88*1 + 0.12*3 = 1.24 -> 0.88*1.24 + 0.12*3 = 1.4512
    assert avg.weights["weight"].item() == pytest.approx(1.4512, abs=1e-6)
    zero = WeightAverage(0.0)
    for value in (1.0, 5.0):
        with torch.no_grad():
            lin.weight.fill_(value)
        zero.update(lin)
    assert zero.weights["weight"].item() == 5.0  # d = 0: always the latest absorbed weights


def test_averaged_model_is_a_cached_copy(tiny_model, digits_batch):
    x, _, _ = digits_batch
    avg = WeightAverage(0.5)
    with pytest.raises(RuntimeError):
        avg.averaged_model(tiny_model)
    avg.update(tiny_model)
    _train_forward(tiny_model, x, shift=0.05)
    avg.update(tiny_model)
    live = copy.deepcopy(tiny_model.state_dict())
    model = avg.averaged_model(tiny_model)
    assert model is not tiny_model and avg.averaged_model(tiny_model) is model
    for k, v in model.state_dict().items():
        assert torch.equal(v, avg.weights[k])
        assert torch.equal(tiny_model.state_dict()[k], live[k])  # the training model is untouched
    snapshot = avg.state_dict()["weights"]
    _train_forward(tiny_model, x, shift=0.05)
    avg.update(tiny_model)
    assert avg.averaged_model(tiny_model) is model  # same module, reloaded with the new average
    assert all(torch.equal(v, avg.weights[k]) for k, v in model.state_dict().items())
    assert not torch.equal(snapshot["fc.weight"], avg.weights["fc.weight"])  # earlier snapshots stay valid


def test_state_round_trip_gives_the_same_averaged_model(tiny_model, digits_batch):
    x, _, _ = digits_batch
    avg = WeightAverage(0.88)
    avg.update(tiny_model)
    _train_forward(tiny_model, x, shift=0.02)
    avg.update(tiny_model)
    restored = WeightAverage(0.88)
    restored.load_state_dict(copy.deepcopy(avg.state_dict()), torch.device("cpu"))
    assert restored.updates == 2
    a, b = avg.averaged_model(tiny_model).eval(), restored.averaged_model(tiny_model).eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _boom() -> float:
    raise AssertionError("the validation score must not be computed")


def test_fawa_accepts_only_epochs_over_the_threshold(tiny_model, digits_batch):
    x, _, _ = digits_batch
    fawa = ModelAverager("fawa", 0.88, 0.24, "cfa")
    assert not fawa.after_epoch(tiny_model, lambda: 0.2)
    assert not fawa.average.started and fawa.last_score == 0.2
    with pytest.warns(UserWarning, match="FAWA never started"):
        assert fawa.eval_model(tiny_model) is tiny_model
    assert fawa.after_epoch(tiny_model, lambda: 0.24)  # >= threshold: the first acceptance copies
    first = copy.deepcopy(fawa.average.weights)
    assert all(torch.equal(first[k], v) for k, v in tiny_model.state_dict().items())
    _train_forward(tiny_model, x, shift=0.03)
    assert not fawa.after_epoch(tiny_model, lambda: 0.1)  # rejected: unchanged
    assert all(torch.equal(first[k], v) for k, v in fawa.average.weights.items())
    assert fawa.after_epoch(tiny_model, lambda: 0.5)
    w = tiny_model.state_dict()["fc.weight"]
    assert torch.equal(fawa.average.weights["fc.weight"], first["fc.weight"] * 0.88 + w * (1 - 0.88))
    assert fawa.eval_model(tiny_model) is not tiny_model


def test_ema_absorbs_every_epoch_and_off_keeps_the_model(tiny_model, digits_batch):
    x, _, _ = digits_batch
    ema = ModelAverager("ema", 0.5, 0.24, "cfa")
    with pytest.warns(UserWarning, match="EMA never started"):
        ema.eval_model(tiny_model)
    ema.after_epoch(tiny_model, _boom)
    before = tiny_model.state_dict()["fc.weight"].clone()
    _train_forward(tiny_model, x, shift=0.1)
    ema.after_epoch(tiny_model, _boom)
    assert ema.average.updates == 2
    assert torch.allclose(ema.average.weights["fc.weight"], (before + tiny_model.state_dict()["fc.weight"]) / 2)
    off = ModelAverager("off", 0.5, 0.24, "cfa")
    assert not off.after_epoch(tiny_model, _boom) and off.eval_model(tiny_model) is tiny_model


def test_validation_score_is_the_worst_class_pgd_accuracy(tiny_model, digits):
    ctx = make_context()
    ctx.val_split = DeviceSplit.from_arrays(digits.train, torch.device("cpu")).subset(torch.arange(40))
    score = worst_class_robust_accuracy(ctx, tiny_model, 8 / 255, 2 / 255, 3)
    per_class = ctx.classwise_accuracy(tiny_model, ctx.val_split, PGD(8 / 255, steps=3, alpha=2 / 255))
    assert score == float(per_class.min())
    ctx.val_split = ctx.val_split.subset(torch.arange(0))
    with pytest.raises(ValueError, match="validation split"):
        worst_class_robust_accuracy(ctx, tiny_model, 8 / 255, 2 / 255, 3)
