"""Square: exact agreement with torchattacks in reference-RNG mode, the p-schedule, invariants."""
from __future__ import annotations

import pytest
import torch

from fairbench.attacks.pgd import project
from fairbench.attacks.square import Square, p_schedule
from tests.attack_fixtures import digits_test, trained_digits_model


def test_p_schedule_and_window_sides():
    sides = [max(int(round((p_schedule(i, 0.8, 5000, False) * 32 * 32) ** 0.5)), 1)
             for i in (0, 10, 11, 50, 51, 200, 201, 500, 501, 1000, 1001, 2000, 2001, 4000, 4001, 4999)]
    assert sides == [29, 29, 20, 20, 14, 14, 10, 10, 7, 7, 5, 5, 4, 4, 3, 3]
    assert p_schedule(4999, 0.8, 5000, True) == 0.8 / 512  # rescaling compresses the schedule two-fold


def test_invariants_feasible_queries_and_batch_independent():
    model = trained_digits_model()
    x, y = digits_test(40)
    active = model(x).argmax(1) == y
    attack = Square(16 / 255, n_queries=100)
    adv, queries = attack.perturb(model, x, y, torch.arange(40), seed=1, active=active)
    assert torch.equal(project(adv, x, 16 / 255), adv)
    assert torch.equal(adv[~active], x[~active]) and (queries[~active] == 0).all()
    broken = (model(adv).argmax(1) != y) & active
    assert broken.any() and (queries[active & ~broken] == 101).all() and (queries[broken] <= 101).all()
    parts = [attack.perturb(model, x[s], y[s], torch.arange(40)[s], seed=1, active=active[s]) for s in
             (slice(0, 9), slice(9, 40))]
    assert torch.equal(torch.cat([p[0] for p in parts]), adv)
    assert torch.equal(torch.cat([p[1] for p in parts]), queries)


def test_square_equals_torchattacks():
    torchattacks = pytest.importorskip("torchattacks", reason="torchattacks 3.5.1 (test-only) is absent")
    model = trained_digits_model()
    x, y = digits_test(48)
    ref = torchattacks.Square(model, norm="Linf", eps=8 / 255, n_queries=300, n_restarts=1, p_init=0.8,
                              loss="margin", resc_schedule=False, seed=0)
    ref_adv = ref.perturb(x, y)
    ref_correct = model(ref_adv).argmax(1) == y
    active = model(x).argmax(1) == y
    torch.manual_seed(0)
    adv, _ = Square(8 / 255, n_queries=300, reference_rng=True).perturb(model, x, y, torch.arange(48), 0, active)
    correct = model(adv).argmax(1) == y
    assert torch.equal(correct, ref_correct) and (~correct & active).any()
    assert torch.equal(adv[~correct], ref_adv[~correct])
