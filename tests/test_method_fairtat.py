"""FAIR-TAT (TRADES adaptation) against docs/methods/fairtat.md §5: CFPS and q, targets, radius, losses, a real run."""
from __future__ import annotations

import copy
import io
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fairbench.methods.fairtat import (
    FairTat,
    FairTatConfig,
    official_collision_targets,
    restricted_targets,
    target_distribution,
)
from scipy.stats import chi2

from fairbench.adversaries import inner_attack, per_sample, start_point
from fairbench.checkpoint import list_checkpoints
from fairbench.method import Batch
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve
from tests.test_method_cfa import EPS, build, trades_reference


def _method(digits, **overrides) -> tuple[FairTat, object]:
    return build(FairTat, digits, **overrides)


def _record(method: FairTat, y: list[int], pred: list[int]) -> None:
    method.tally.record(F.one_hot(torch.tensor(pred), 10).float() * 3, torch.tensor(y))


def test_cfps_q_and_radius_from_known_predictions(tiny_model, digits):
    method, ctx = _method(digits)
    method.on_epoch_start(1, tiny_model, ctx)  # epoch 1: uniform radius, uniform targets
    assert torch.equal(method.eps, torch.full((10,), EPS)) and torch.allclose(method.q, torch.full((10,), 0.1))
    _record(method, y=[0, 0, 1, 2, 3, 3], pred=[0, 1, 1, 1, 0, 3])
    method.on_epoch_end(1, tiny_model, ctx)
    acc = torch.zeros(10)
    acc[[0, 1, 3]] = 10 / 6  # C * correct_k / N
    cfps = torch.zeros(10)
    cfps[:2] = torch.tensor([1 / 3, 2 / 3])  # errors predicted as 0: one, as 1: two, of three errors
    assert torch.allclose(method.acc, acc) and torch.allclose(method.cfps, cfps)
    assert method.cfps.sum().item() == pytest.approx(1.0)

    method.on_epoch_start(2, tiny_model, ctx)  # begin = 1 (the code's 0-indexed epoch 1): calibrated
    assert torch.allclose(method.eps, (0.5 + acc) * EPS)
    expected_q = torch.exp(2 * cfps) / torch.exp(2 * cfps).sum()
    assert torch.allclose(method.q, expected_q) and method.q.sum().item() == pytest.approx(1.0)
    assert (method.q.max() / method.q.min()).item() <= math.e ** 2 + 1e-5

    _record(method, y=[4, 5], pred=[4, 5])  # no error this epoch: CFPS, hence q, stay as they were
    method.on_epoch_end(2, tiny_model, ctx)
    method.on_epoch_start(3, tiny_model, ctx)
    assert torch.allclose(method.cfps, cfps) and torch.allclose(method.q, expected_q)


def test_begin_and_random_target_timing(tiny_model, digits):
    method, ctx = _method(digits, begin=3)
    method.acc, method.cfps = torch.full((10,), 0.5), torch.linspace(0, 0.2, 10)
    method.on_epoch_start(3, tiny_model, ctx)
    assert torch.equal(method.eps, torch.full((10,), EPS)) and torch.allclose(method.q, torch.full((10,), 0.1))
    method.on_epoch_start(4, tiny_model, ctx)
    assert torch.allclose(method.eps, torch.full((10,), EPS))  # acc 0.5, lambda_r 0.5: eps_k = eps
    assert not torch.allclose(method.q, torch.full((10,), 0.1))
    method, ctx = _method(digits, random_target=True)
    method.cfps = torch.linspace(0, 0.2, 10)
    method.on_epoch_start(5, tiny_model, ctx)
    assert torch.allclose(method.q, torch.full((10,), 0.1))


def _chi_square_pvalue(y: torch.Tensor, t: torch.Tensor, q: torch.Tensor) -> float:
    """Goodness of fit of the (label, target) counts to q restricted to c != y, renormalised."""
    counts = torch.zeros(10, 10).index_put_((y, t), torch.ones(len(y)), accumulate=True)
    restricted = q.expand(10, 10) * (1 - torch.eye(10))
    expected = restricted / restricted.sum(1, keepdim=True) * torch.bincount(y, minlength=10)[:, None]
    off = ~torch.eye(10, dtype=torch.bool)
    stat = ((counts - expected)[off] ** 2 / expected[off]).sum().item()
    return float(chi2.sf(stat, df=10 * 8))


def test_targets_never_equal_labels_and_follow_q_restricted_to_wrong_classes():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(40000) % 10
    q = target_distribution(torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.03, 0.02, 0.0]), 2.0)
    t = restricted_targets(y, q, gen)
    assert not (t == y).any()
    assert _chi_square_pvalue(y, t, q) > 1e-3
    uniform = torch.full((10,), 0.1)  # epoch 1: uniform over the nine wrong classes
    t = restricted_targets(y, uniform, gen)
    assert not (t == y).any() and _chi_square_pvalue(y, t, uniform) > 1e-3
    assert _chi_square_pvalue(y, t, q) < 1e-6  # the test can tell q from uniform


def test_official_collision_rule_keeps_a_single_collision():
    q = torch.tensor([0.99] + [0.01 / 9] * 9)
    single, pair = torch.tensor([0, 5, 6, 7]), torch.tensor([0, 0, 6, 7])
    t = official_collision_targets(single, q, torch.Generator().manual_seed(1))
    assert t[0] == 0  # the lone collision is left in place (the code's quirk)
    t = official_collision_targets(pair, q, torch.Generator().manual_seed(1))
    assert (t[:2] != 0).all()  # two collisions: both redrawn
    assert (restricted_targets(single, q, torch.Generator().manual_seed(1)) != single).all()


def _reference_adversary(model, x, y, eps_i, q, seed: int, steps: int):
    """The adaptation written out: normal start, then targets from q restricted, then targeted CE descent."""
    gen = torch.Generator().manual_seed(seed)
    start = start_point(x, per_sample(eps_i, x), "normal", gen)
    targets = restricted_targets(y, q, gen)
    x_adv = inner_attack(model, x, None, eps=eps_i, alpha=2 / 255, steps=steps, generator=gen, targets=targets,
                         targeted=torch.ones_like(y, dtype=torch.bool), start=start, untargeted="ce", labels=y)
    return x_adv, targets


def test_loss_forms_against_direct_computation(tiny_model, digits_batch, digits):
    x, y, idx = digits_batch
    losses = {}
    for normalised in (False, True):
        model = copy.deepcopy(tiny_model)
        method, ctx = _method(digits, steps=3, normalised_trades=normalised)
        method.acc, method.cfps = torch.linspace(0.2, 0.8, 10), torch.linspace(0, 0.2, 10)
        method.on_epoch_start(2, model, ctx)
        reference = copy.deepcopy(model)
        ctx.generator.manual_seed(4)
        losses[normalised] = method.training_loss(model, Batch(x, y, idx), ctx).loss
    eps_i = (0.5 + method.acc[y]) * EPS
    x_adv, _ = _reference_adversary(reference, x, y, eps_i, method.q, seed=4, steps=3)
    logits, logits_adv = reference(x), reference(x_adv)
    kl = (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - F.log_softmax(logits_adv, 1))).sum(1)
    expected = F.cross_entropy(logits, y) + 6.0 * kl.mean()
    assert torch.allclose(losses[False], expected, rtol=1e-5)
    assert torch.allclose(losses[True], expected / 7, rtol=1e-5)  # CFA's normalised form, b = 6/7
    hits = (logits_adv.argmax(1) == y).float()
    assert torch.equal(method.tally.correct, torch.zeros(10).index_add_(0, y, hits))


def test_targeted_attack_stays_in_class_radius_and_raises_the_target(tiny_model, digits_batch, digits):
    x, y, _ = digits_batch
    method, ctx = _method(digits, steps=10)
    method.acc, method.cfps = torch.linspace(0.0, 1.0, 10), torch.linspace(0, 0.2, 10)
    method.on_epoch_start(2, tiny_model, ctx)
    ctx.generator.manual_seed(2)
    x_adv, targets = method.adversarial(tiny_model, x, y, ctx)
    eps_i = method.eps[y]
    linf = (x_adv - x).abs().flatten(1).amax(1)
    assert (linf <= eps_i + 1e-6).all() and (x_adv >= 0).all() and (x_adv <= 1).all()
    assert (linf[y == 9] > EPS).any()  # the largest class radius (1.5 eps) is used
    tiny_model.eval()
    with torch.no_grad():
        p_clean = F.softmax(tiny_model(x), 1).gather(1, targets[:, None])
        p_adv = F.softmax(tiny_model(x_adv), 1).gather(1, targets[:, None])
    assert p_adv.mean() > p_clean.mean()


def test_untargeted_with_uniform_radius_is_trades_exactly(tiny_model, digits_batch, digits):
    x, y, idx = digits_batch
    method, ctx = _method(digits, steps=3, untargeted=True)
    model = copy.deepcopy(tiny_model)
    method.on_epoch_start(1, model, ctx)
    ctx.generator.manual_seed(6)
    ours = method.training_loss(model, Batch(x, y, idx), ctx).loss
    assert torch.equal(ours, trades_reference(tiny_model, Batch(x, y, idx), seed=6, steps=3))


def test_state_round_trip_and_optional_averaging(tiny_model, digits_batch, digits):
    x, _, _ = digits_batch
    method, ctx = _method(digits)
    assert method.eval_model(tiny_model) is tiny_model  # averaging off by default: the last model
    method, ctx = _method(digits, averaging="fawa", threshold=0.0)
    method.on_epoch_start(1, tiny_model, ctx)
    _record(method, y=[0, 1], pred=[1, 1])
    method.on_epoch_end(1, tiny_model, ctx)
    averaged = method.eval_model(tiny_model)
    assert averaged is not tiny_model
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = _method(digits, averaging="fawa", threshold=0.0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(getattr(fresh, k), getattr(method, k)) for k in ("acc", "cfps", "eps", "q"))
    with torch.no_grad():
        assert torch.equal(fresh.eval_model(tiny_model).eval()(x), averaged.eval()(x))


def test_official_protocol_and_defaults():
    cfg = FairTatConfig()
    assert (cfg.lambda_r, cfg.begin, cfg.cfps_scale, cfg.beta, cfg.eps, cfg.alpha, cfg.steps) == \
        (0.5, 1, 2.0, 6.0, EPS, 2 / 255, 10)
    assert (cfg.averaging, cfg.decay, cfg.threshold, cfg.collisions, cfg.normalised_trades) == \
        ("off", 0.85, 0.2, "redraw", False)
    assert "adaptation" in FairTat.description
    official = resolve(RunSpec(method="fairtat", dataset="cifar10", protocol="official"))
    assert (official.arch, official.epochs, official.optim["schedule"], official.optim["weight_decay"]) == \
        ("preact_resnet18", 200, "madry", 5e-4)


def test_tiny_run(tmp_path):
    spec = RunSpec(method="fairtat", dataset="digits", epochs=3, train_per_class=40, eval_per_class=10,
                   eval_last=2, overrides={"steps": "2"})
    outcome = run_one(spec, tmp_path)
    assert outcome.status == "done" and (outcome.folder / "classwise.parquet").is_file()
    frame = pd.read_parquet(outcome.folder / "classwise.parquet")
    assert set(frame["epoch"]) == {2, 3} and frame["n"].sum() == 2 * 2 * 100
    state = torch.load(list_checkpoints(outcome.folder / "checkpoints")[3], weights_only=True)["method"]
    assert state["q"].sum().item() == pytest.approx(1.0)
    assert not torch.allclose(state["q"], torch.full((10,), 0.1))  # epoch 3 draws its targets from CFPS
    assert not torch.equal(state["eps"], torch.full((10,), EPS))
