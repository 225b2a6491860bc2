"""FRL (docs/methods/frl.md §5): multiplier updates, weights, radii and loss, on real tiny models."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fairbench.methods.frl import (
    Frl,
    FrlConfig,
    FrlRw,
    class_rates,
    class_weights,
    normalize_multiplier,
    radius_factor,
    rate1_at,
    update_multipliers,
)

from fairbench.adversaries import clean_logits, inner_attack, trades_loss
from fairbench.method import Batch
from fairbench.registry import get_method_class
from fairbench.results import run_dir
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve
from tests.conftest import build_method

CPU = torch.device("cpu")


def frl_setup(cls, digits, **overrides):
    return build_method(cls, digits, dataclasses.replace(cls.Config(), **overrides))


def official_weights(lam: torch.Tensor) -> torch.Tensor:
    """The official cost_sensitive loop, written for any C: 1/C + (C-1)/C lam_i - 1/C sum_{j != i} lam_j."""
    c = len(lam)
    out = torch.full((c,), 1 / c)
    for i in range(c):
        for j in range(c):
            out[i] += (c - 1) / c * lam[i] if i == j else -lam[j] / c
    return out


# -- N(v), weights, radius factor, rate schedule -----------------------------------------------------------

def test_normalize_clamps_then_rescales_to_lim():
    clamped = normalize_multiplier(torch.tensor([-0.1, 0.2, 0.1]), 0.5)
    rescaled = normalize_multiplier(torch.tensor([0.4, 0.4, -1.0]), 0.5)
    assert torch.allclose(clamped, torch.tensor([0.0, 0.2, 0.1]))
    assert torch.allclose(rescaled, torch.tensor([0.25, 0.25, 0.0]))
    assert torch.equal(normalize_multiplier(torch.zeros(4), 0.5), torch.zeros(4))


def test_normalize_nonnegative_bounded_idempotent():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = normalize_multiplier(torch.randn(10, generator=gen), 0.5)
        assert (v >= 0).all() and v.sum() <= 0.5 + 1e-6
        assert torch.allclose(normalize_multiplier(v, 0.5), v)


def test_weights_sum_to_one_match_official_loop_and_stay_positive():
    gen = torch.Generator().manual_seed(1)
    for c in (3, 10, 100):
        lam = normalize_multiplier(torch.rand(c, generator=gen) * 2, 0.5)
        w = class_weights(lam)
        assert torch.allclose(w.sum(), torch.tensor(1.0))
        assert torch.allclose(w, official_weights(lam), atol=1e-6)
        assert (w > 0).all()


def test_hand_example_of_the_spec():
    """C = 3, lim 0.5, rate1 0.05, g0 (0.4, -0.1, -0.3): lam0 = (0.02, 0, 0), w0 = (0.34667, 0.32667, ..)."""
    zeros = torch.zeros(3)
    lam0, lam1, lam2 = update_multipliers((zeros, zeros, zeros), torch.tensor([0.4, -0.1, -0.3]), zeros, 0.05,
                                          FrlConfig())
    assert torch.allclose(lam0, torch.tensor([0.02, 0.0, 0.0]))
    assert torch.allclose(class_weights(lam0), torch.tensor([0.34667, 0.32667, 0.32667]), atol=1e-5)
    assert torch.equal(lam1, zeros) and torch.equal(lam2, zeros)


def test_factor_two_on_lam1_and_lam2_unprojected():
    zeros = torch.zeros(3)
    g1 = torch.tensor([0.1, -0.05, -0.05])
    _, lam1, lam2 = update_multipliers((zeros, zeros, zeros), zeros, g1, 0.05, FrlConfig())
    assert torch.allclose(lam1, torch.tensor([0.01, 0.0, 0.0]))       # N(2 * 0.05 * g1)
    assert torch.allclose(lam2, torch.tensor([0.02, -0.01, -0.01]))    # 0.2 * g1, negative entries kept
    _, _, lam2_rw = update_multipliers((zeros, zeros, zeros), zeros, g1, 0.05, FrlRw.Config())
    assert torch.equal(lam2_rw, zeros)                                  # FRL-RW: lam2 stays 0


def test_lone_violating_class_gains_weight_even_when_rescaled():
    lam = torch.tensor([0.1, 0.2, 0.2])                                  # sum 0.5 = lim already
    g = torch.tensor([0.3, -0.1, -0.1])
    lam0, lam1, lam2 = update_multipliers((lam, lam, torch.zeros(3)), g, g, 0.05, FrlConfig())
    for new in (lam0, lam1):
        assert torch.allclose(new.sum(), torch.tensor(0.5))
        assert class_weights(new)[0] > class_weights(lam)[0]
    assert radius_factor(lam2, 0.98, 3.0)[0] > 1.0


def test_radius_factor_clamped_to_098_and_3():
    rho = radius_factor(torch.tensor([-1.0, -0.0102, 0.0, 0.1, 1.0]), 0.98, 3.0)
    assert torch.allclose(rho, torch.tensor([0.98, 0.98, 1.0, math.exp(0.2), 3.0]))
    assert radius_factor(torch.tensor([-0.0100]), 0.98, 3.0) > 0.98   # the floor binds from lam2 < -0.0101


def test_rate1_halves_before_epochs_40_and_80():
    assert [rate1_at(e, 0.05, 40) for e in (1, 39, 40, 41, 79, 80, 120)] == \
        [0.05, 0.05, 0.025, 0.025, 0.025, 0.0125, 0.00625]
    assert rate1_at(200, 0.05, 0) == 0.05


def test_rate_halving_applies_in_the_epoch_40_update(tiny_model, digits):
    """Same model, same validation draws (ctx.epoch fixed): the epoch-40 step is half the epoch-39 step."""
    lams = {}
    for epoch in (39, 40):
        method, ctx = frl_setup(Frl, digits, tau0=0.0, tau1=0.0, rate1=0.01, val_steps=2)
        method.on_epoch_start(epoch, tiny_model, ctx)
        lams[epoch] = method.lam0
    assert lams[39].sum() > 0 and lams[39].sum() < 0.5                  # no rescaling involved
    assert torch.allclose(lams[40] * 2, lams[39])


# -- validation errors -------------------------------------------------------------------------------------

def test_class_rates_official_boundary_error_can_be_negative():
    labels = np.array([0, 0, 1, 1, 1, 1])
    clean_ok = np.array([1, 1, 1, 0, 0, 0], dtype=float)
    adv_ok = np.array([0, 1, 0, 1, 1, 0], dtype=float)        # two clean-wrong samples of class 1 survive PGD
    rates = class_rates(labels, clean_ok, adv_ok, 3, CPU)
    assert torch.allclose(rates.clean, torch.tensor([0.0, 0.75, 0.5]))       # class 2 absent: overall rate
    assert torch.allclose(rates.boundary, torch.tensor([0.5, -0.25, 0.0]))
    assert torch.allclose(rates.clean_total, torch.tensor(0.5))
    assert torch.allclose(rates.boundary_total, torch.tensor(0.0))


def test_large_tau_keeps_uniform_weights_and_rwrm_radius_drifts_to_floor(tiny_model, digits):
    """docs/methods/frl.md §5: tau = 1 makes every g negative, so w = 1/C; RWRM's unprojected lam2 pulls rho to
    0.98."""
    for cls, rho in ((Frl, 0.98), (FrlRw, 1.0)):
        method, ctx = frl_setup(cls, digits, tau0=1.0, tau1=1.0, val_steps=2)
        method.on_epoch_start(1, tiny_model, ctx)
        assert torch.equal(method.lam0, torch.zeros(10)) and torch.equal(method.lam1, torch.zeros(10))
        assert torch.allclose(method.w0, torch.full((10,), 0.1))
        assert torch.allclose(method.w1, torch.full((10,), 0.1))
        assert torch.allclose(method.rho, torch.full((10,), rho))
        assert cls is FrlRw or (method.lam2 < -0.0101).all()


def test_validation_uses_the_pre_epoch_model_in_eval_mode(tiny_model, digits):
    method, ctx = frl_setup(Frl, digits, tau0=0.0, tau1=0.0, val_steps=2)
    before = copy.deepcopy(tiny_model.state_dict())
    method.on_epoch_start(1, tiny_model, ctx)
    assert tiny_model.training
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k                     # BatchNorm statistics untouched
    assert method.lam0.sum() > 0 or method.lam1.sum() > 0       # tau 0: some class violates


# -- the training step -------------------------------------------------------------------------------------

def with_multipliers(method: Frl, lam0, lam1, lam2) -> None:
    method.load_state_dict({"lam0": lam0, "lam1": lam1, "lam2": lam2})


def test_loss_is_weighted_mean_of_ce_and_kl(tiny_model, digits, digits_batch):
    x, y, idx = digits_batch
    method, ctx = frl_setup(Frl, digits, steps=3)
    lam0 = normalize_multiplier(torch.linspace(-0.2, 0.3, 10), 0.5)
    lam1 = normalize_multiplier(torch.linspace(0.3, -0.2, 10), 0.5)
    lam2 = torch.linspace(-0.3, 0.6, 10)
    with_multipliers(method, lam0, lam1, lam2)
    model_a, model_b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)

    ctx.generator.manual_seed(7)
    loss = method.training_loss(model_a, Batch(x, y, idx), ctx).loss

    eps = torch.clamp(torch.exp(2 * lam2), 0.98, 3.0)[y] * (8 / 255)
    gen = torch.Generator().manual_seed(7)
    x_adv = inner_attack(model_b, x, clean_logits(model_b, x), eps=eps, alpha=eps.max() / 4, steps=3,
                         generator=gen)
    assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    w0, w1 = official_weights(lam0)[y], official_weights(lam1)[y]
    logits, logits_adv = model_b(x), model_b(x_adv)
    ce = F.cross_entropy(logits, y, reduction="none")
    kl = (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - F.log_softmax(logits_adv, 1))).sum(1)
    expected = (w0 * ce).sum() / w0.sum() + 1.5 * (w1 * kl).sum() / w1.sum()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_rwrm_step_is_a_quarter_of_the_largest_radius_in_the_batch(tiny_model, digits, digits_batch):
    x, y, idx = digits_batch
    method, ctx = frl_setup(Frl, digits, steps=3)
    with_multipliers(method, torch.zeros(10), torch.zeros(10), torch.linspace(-0.1, 0.4, 10))
    assert torch.allclose(method.attack_step(method.rho[y] * (8 / 255)), method.rho[y].max() * 2 / 255)
    ctx.generator.manual_seed(3)
    got = method.adversarial(tiny_model, Batch(x, y, idx), ctx)
    eps = method.rho[y] * (8 / 255)
    want = inner_attack(tiny_model, x, clean_logits(tiny_model, x), eps=eps, alpha=eps.max() / 4, steps=3,
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_rw_with_uniform_weights_equals_trades_with_frl_beta(tiny_model, digits, digits_batch):
    """docs/methods/frl.md §5: weights 1/C make both weighted means plain means: the TRADES loss (beta 1.5,
    alpha 2/255)."""
    x, y, idx = digits_batch
    method, ctx = frl_setup(FrlRw, digits, steps=3)
    model_a, model_b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    ctx.generator.manual_seed(5)
    loss = method.training_loss(model_a, Batch(x, y, idx), ctx).loss
    x_adv = inner_attack(model_b, x, clean_logits(model_b, x), eps=8 / 255, alpha=2 / 255, steps=3,
                         generator=torch.Generator().manual_seed(5))
    expected, _, _ = trades_loss(model_b, x, x_adv, y, beta=1.5)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_state_round_trip_rederives_weights(tiny_model, digits):
    method, _ = frl_setup(Frl, digits)
    with_multipliers(method, torch.full((10,), 0.05), torch.zeros(10), torch.full((10,), 0.2))
    state = method.state_dict()
    fresh, _ = frl_setup(Frl, digits)
    fresh.load_state_dict(state)
    for key in ("lam0", "lam1", "lam2", "w0", "w1", "rho"):
        assert torch.equal(getattr(fresh, key), state[key]), key
    assert torch.allclose(fresh.rho, torch.full((10,), math.exp(0.4)))


def test_registration_and_protocol():
    frl, rw = get_method_class("frl"), get_method_class("frl-rw")
    assert frl is Frl and rw is FrlRw
    for cls in (frl, rw):
        assert cls.hot_start == "trades"
        assert (cls.services.validation.fraction, cls.services.validation.position) == (0.06, "last")
        assert cls.official_protocol == {"epochs": 40, "lr": 0.001, "schedule": "constant",
                                         "weight_decay": 5e-4, "nesterov": False, "momentum": 0.9}
    rwrm, rwc = Frl.Config(), FrlRw.Config()
    assert (rwrm.beta, rwrm.tau0, rwrm.tau1, rwrm.rate1, rwrm.rate2, rwrm.lim) == \
        (1.5, 0.07, 0.07, 0.05, 0.2, 0.5)
    assert (rwrm.remargin, rwrm.step_rule, rwrm.rho_min, rwrm.rho_max) == (True, "max_radius", 0.98, 3.0)
    assert (rwc.tau0, rwc.tau1, rwc.rate2, rwc.remargin, rwc.step_rule) == (0.1, 0.1, 0.1, False, "fixed")
    assert (rwrm.eps, rwrm.alpha, rwrm.steps, rwrm.val_steps, rwrm.val_alpha) == \
        (8 / 255, 2 / 255, 10, 20, 2 / 255)


# -- a real run ------------------------------------------------------------------------------------------

def test_tiny_run_fine_tunes_its_trades_hot_start(tmp_path):
    spec = RunSpec(method="frl", dataset="digits", epochs=2, hot_start_epochs=2, train_per_class=20,
                   eval_per_class=5, eval_last=1, overrides={"steps": "2"})
    outcome = run_one(spec, tmp_path)
    assert outcome.status == "done" and (outcome.folder / "classwise.parquet").is_file()
    base = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("trades_digits_")]
    assert len(base) == 1 and (base[0] / "classwise.parquet").is_file()
    meta = json.loads((outcome.folder / "run.json").read_text())
    assert meta["config"]["init_from"].startswith(base[0].name + "/")
    config = meta["config"]
    assert (config["lr"], config["schedule"], config["epochs"]) == (0.001, "constant", 2)
    assert meta["num_train"] == 190                                       # 1 of 20 per class held out
    assert sum(meta["method_state"]["w0"]) == pytest.approx(1.0, abs=1e-5)
    frame = pd.read_parquet(outcome.folder / "classwise.parquet")
    assert set(frame["attack"]) == {"clean", "pgd20"} and frame["n"].sum() == 100
    assert resolve(spec).run_id != outcome.run_id                         # the id includes the hot start
    assert run_dir(tmp_path, outcome.run_id) == outcome.folder
