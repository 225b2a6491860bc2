"""WAT (docs/methods/wat.md §5): cost normalisation, cumulative Hedge weights, the weighted loss."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from fairbench.methods.wat import ValidationLosses, Wat, epoch_costs, hedge_weights

from fairbench.adversaries import clean_logits, inner_attack, trades_loss
from fairbench.method import Batch
from fairbench.registry import get_method_class
from fairbench.runner import run_one
from fairbench.spec import RunSpec
from tests.conftest import build_method

CPU = torch.device("cpu")


def wat_setup(digits, **overrides):
    return build_method(Wat, digits, dataclasses.replace(Wat.Config(), **overrides))


# -- costs and weights -------------------------------------------------------------------------------------

def test_official_and_exact_cost_normalisation():
    losses = ValidationLosses(torch.tensor([6.0, 3.0]), torch.tensor(9.0), torch.tensor([3.0, 3.0]),
                              batches=2)
    assert torch.allclose(epoch_costs(losses, "official", 4), torch.tensor([2 * 6 / 8, 2 * 3 / 8, 9 / 8]))
    assert torch.allclose(epoch_costs(losses, "exact_mean", 4), torch.tensor([2.0, 1.0, 1.5]))


def test_cifar10_official_costs_are_exact_means_times_3000_over_3072():
    """|V| = 3000 in batches of 128: n_b * B = 24 * 128 = 3072."""
    per_class = torch.linspace(100.0, 400.0, 10)
    losses = ValidationLosses(per_class, per_class.sum(), torch.full((10,), 300.0), batches=24)
    ratio = epoch_costs(losses, "official", 128) / epoch_costs(losses, "exact_mean", 128)
    assert torch.allclose(ratio, torch.full((11,), 3000 / 3072))


def test_hand_example_of_the_spec():
    """C = 2, eta 0.1, c = (2, 1, 1.5): w = (0.70026, 0.63362, 0.66611), sum 2."""
    w = hedge_weights(torch.tensor([2.0, 1.0, 1.5]), 0.1)
    assert torch.allclose(w, torch.tensor([0.70026, 0.63362, 0.66611]), atol=1e-5)
    assert torch.allclose(w.sum(), torch.tensor(2.0))


def test_weights_sum_to_c_positive_monotone_and_stable():
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        s = torch.rand(11, generator=gen) * 50
        w = hedge_weights(s, 0.1)
        assert torch.allclose(w.sum(), torch.tensor(10.0)) and (w > 0).all()
        assert torch.equal(torch.argsort(w), torch.argsort(s))            # larger cost, larger weight
    huge = hedge_weights(torch.tensor([1e4, 2e4, 0.0]), 0.1)             # raw exp would overflow
    assert torch.isfinite(huge).all() and torch.allclose(huge, torch.tensor([0.0, 2.0, 0.0]))


def test_eta_zero_gives_c_over_c_plus_one_and_permutation_permutes():
    assert torch.allclose(hedge_weights(torch.rand(11), 0.0), torch.full((11,), 10 / 11))
    s = torch.tensor([3.0, 1.0, 2.0, 0.5])
    perm = torch.tensor([2, 0, 1])
    permuted = torch.cat([s[:3][perm], s[3:]])
    assert torch.allclose(hedge_weights(permuted, 0.1), torch.cat([hedge_weights(s, 0.1)[:3][perm],
                                                                     hedge_weights(s, 0.1)[3:]]))


def test_first_epoch_weights_are_all_ones_and_loss_is_twice_trades(tiny_model, digits, digits_batch):
    x, y, idx = digits_batch
    method, ctx = wat_setup(digits, steps=3)
    assert torch.equal(method.weights, torch.ones(11)) and torch.equal(method.costs, torch.zeros(11))
    model_a, model_b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    ctx.generator.manual_seed(4)
    loss = method.training_loss(model_a, Batch(x, y, idx), ctx).loss
    x_adv = inner_attack(model_b, x, clean_logits(model_b, x), eps=0.031, alpha=0.007, steps=3,
                         generator=torch.Generator().manual_seed(4))
    expected, _, _ = trades_loss(model_b, x, x_adv, y, beta=6.0)
    assert torch.allclose(loss, 2 * expected, rtol=1e-5)


def test_loss_equals_per_sample_and_official_two_term_forms(tiny_model, digits, digits_batch):
    x, y, idx = digits_batch
    method, ctx = wat_setup(digits, steps=3)
    weights = hedge_weights(torch.linspace(0.0, 5.0, 11), 0.1)
    method.load_state_dict({"costs": torch.linspace(0.0, 5.0, 11), "weights": weights})
    model_a, model_b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    ctx.generator.manual_seed(9)
    loss = method.training_loss(model_a, Batch(x, y, idx), ctx).loss

    x_adv = inner_attack(model_b, x, clean_logits(model_b, x), eps=0.031, alpha=0.007, steps=3,
                         generator=torch.Generator().manual_seed(9))
    logits, logits_adv = model_b(x), model_b(x_adv)
    ce = F.cross_entropy(logits, y, reduction="none")
    kl = (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - F.log_softmax(logits_adv, 1))).sum(1)
    per_sample = ((weights[y] + weights[10]) * (ce + 6.0 * kl)).sum() / len(y)
    nat = sum(ce[y == k].sum() * weights[k] for k in range(10))       # the official per-class loop
    bndy = sum(kl[y == k].sum() * weights[k] for k in range(10))
    official = (nat + 6.0 * bndy) / len(y) + (ce.mean() + 6.0 * kl.sum() / len(y)) * weights[10]
    assert torch.allclose(loss, per_sample, rtol=1e-5) and torch.allclose(loss, official, rtol=1e-5)


# -- the epoch-end update on a real model ------------------------------------------------------------------

def direct_costs(model, split, seed: int, batch_size: int) -> torch.Tensor:
    """The official validate(): per-batch TRADES attack and eval-mode losses, per-class sums over n_b * B."""
    gen = torch.Generator().manual_seed(seed)
    nat, bndy, n_b = torch.zeros(11), torch.zeros(11), 0
    model.eval()
    for start in range(0, len(split), batch_size):
        x = split.images[start:start + batch_size].float() / 255
        y = split.labels[start:start + batch_size]
        x_adv = inner_attack(model, x, clean_logits(model, x), eps=0.031, alpha=0.007, steps=2, generator=gen)
        with torch.no_grad():
            logits, logits_adv = model(x), model(x_adv)
        ce = F.cross_entropy(logits, y, reduction="none")
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="none").sum(1)
        for k in range(10):
            nat[k] += ce[y == k].sum()
            bndy[k] += kl[y == k].sum()
        nat[10] += ce.sum() / 10
        bndy[10] += kl.sum() / 10
        n_b += 1
    model.train()
    return (nat / (n_b * batch_size) * 10) + 6.0 * (bndy / (n_b * batch_size) * 10)


def test_epoch_end_accumulates_costs_and_sets_softmax_weights(tiny_model, digits):
    model = tiny_model.train()
    method, ctx = wat_setup(digits, steps=2, val_batch_size=16)   # 88 samples: n_b * B = 96
    before = copy.deepcopy(model.state_dict())
    costs = []
    for epoch, seed in ((1, 11), (2, 12)):
        ctx.generator.manual_seed(seed)
        method.on_epoch_end(epoch, model, ctx)
        costs.append(direct_costs(copy.deepcopy(model), ctx.val_split, seed, 16))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k                                # eval mode: BatchNorm untouched
    assert torch.allclose(method.costs, costs[0] + costs[1], rtol=1e-5)
    factor = (0.1 * (costs[0] + costs[1])).exp()
    assert torch.allclose(method.weights, 10 * factor / factor.sum(), rtol=1e-5)
    assert torch.allclose(method.weights.sum(), torch.tensor(10.0))


def test_state_round_trip(tiny_model, digits):
    method, ctx = wat_setup(digits, steps=1)
    method.on_epoch_end(1, tiny_model, ctx)
    fresh, _ = wat_setup(digits)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.costs, method.costs) and torch.equal(fresh.weights, method.weights)


def test_registration_and_protocol():
    cls = get_method_class("wat")
    assert cls is Wat and cls.hot_start is None
    assert (cls.services.validation.fraction, cls.services.validation.position) == (0.06, "last")
    assert cls.official_protocol == {"arch": "resnet18", "epochs": 100, "batch_size": 128, "lr": 0.1,
                                     "schedule": "trades", "weight_decay": 2e-4, "nesterov": False,
                                     "momentum": 0.9}
    cfg = Wat.Config()
    assert (cfg.eta, cfg.beta, cfg.eps, cfg.alpha, cfg.steps) == (0.1, 6.0, 0.031, 0.007, 10)
    assert (cfg.normaliser, cfg.val_batch_size, cfg.init) == ("official", 128, "normal")


# -- a real run ------------------------------------------------------------------------------------------

def test_tiny_run(tmp_path):
    spec = RunSpec(method="wat", dataset="digits", epochs=2, train_per_class=20, eval_per_class=5,
                   eval_last=1, overrides={"steps": "2"})
    outcome = run_one(spec, tmp_path)
    assert outcome.status == "done" and (outcome.folder / "classwise.parquet").is_file()
    meta = json.loads((outcome.folder / "run.json").read_text())
    assert meta["num_train"] == 190
    state = meta["method_state"]
    assert sum(state["weights"]) == pytest.approx(10.0, rel=1e-5) and min(state["costs"]) > 0
