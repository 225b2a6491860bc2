"""APGD-CE / APGD-DLR / APGD-T: exact agreement with torchattacks' components in reference-RNG mode,
the loss formulas, the step-size schedule, and invariants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fairbench.attacks.apgd import APGD, checkpoint_windows, dlr_loss, dlr_targeted_loss
from fairbench.attacks.pgd import project
from tests.attack_fixtures import digits_test, trained_digits_model

EPS = 8 / 255


def reference_noise(x: torch.Tensor, run: int) -> torch.Tensor:
    """torchattacks' draw order: one reseed per call (done by the test), then U(-1,1) of the subset shape."""
    return 2 * torch.rand(x.shape) - 1


def paper_checkpoints(n: int) -> list[int]:
    p = [0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    return [int(np.ceil(round(v * n, 9))) for v in p[1:]]  # round away float noise (0.57*100)


def test_checkpoint_schedule():
    assert checkpoint_windows(100) == [22, 19, 16, 13, 10, 7, 6, 6]
    assert np.cumsum(checkpoint_windows(100)).tolist() == [22, 41, 57, 70, 80, 87, 93, 99]
    assert np.cumsum(checkpoint_windows(100)).tolist() == paper_checkpoints(100)[:8]
    assert checkpoint_windows(10)[:3] == [2, 1, 1]
    assert sum(checkpoint_windows(7)) <= 7


def test_losses_match_formulas_and_are_shift_scale_invariant():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=gen)
    t = (y + 1) % 10
    s = z.sort(1)[0]
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    expected = -(z.gather(1, y[:, None]).squeeze(1) - other) / (s[:, -1] - s[:, -3] + 1e-12)
    assert torch.allclose(dlr_loss(z, y), expected)
    expected_t = -(z.gather(1, y[:, None]).squeeze(1) - z.gather(1, t[:, None]).squeeze(1)) / (
        s[:, -1] - (s[:, -3] + s[:, -4]) / 2 + 1e-12)
    assert torch.allclose(dlr_targeted_loss(z, y, t), expected_t)
    assert torch.allclose(dlr_loss(3 * z + 5, y), dlr_loss(z, y))
    assert torch.allclose(dlr_targeted_loss(3 * z + 5, y, t), dlr_targeted_loss(z, y, t))
    ties = torch.zeros(4, 10, dtype=torch.float64)
    assert torch.isfinite(dlr_loss(ties, torch.zeros(4, dtype=torch.long))).all()


torchattacks = pytest.importorskip("torchattacks", reason="torchattacks 3.5.1 (test-only, --no-deps) is absent")


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_equals_torchattacks(loss):
    model = trained_digits_model()
    x, y = digits_test(48)
    ref = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=100, n_restarts=2, loss=loss, rho=0.75, seed=0)
    ref_correct, ref_adv = ref.perturb(x, y)
    active = model(x).argmax(1) == y
    torch.manual_seed(0)
    ours = APGD(EPS, loss, steps=100, restarts=2, start_noise=reference_noise, early_stop=False)
    adv = ours.perturb(model, x, y, torch.arange(len(y)), seed=0, active=active)
    our_correct = model(adv).argmax(1) == y
    assert torch.equal(our_correct, ref_correct)
    assert (~our_correct).sum() > 0 and our_correct.sum() > 0  # the test separates robust from broken
    assert torch.equal(adv, ref_adv)
    torch.manual_seed(0)  # early stop: the same flags, other (earlier) adversarial points
    fast = APGD(EPS, loss, steps=100, restarts=2, start_noise=reference_noise, early_stop=True)
    assert torch.equal(model(fast.perturb(model, x, y, torch.arange(len(y)), 0, active)).argmax(1) == y, ref_correct)


def test_apgd_targeted_equals_torchattacks():
    model = trained_digits_model()
    x, y = digits_test(48)
    ref = torchattacks.APGDT(model, norm="Linf", eps=4 / 255, steps=100, n_restarts=1, n_classes=10, seed=0)
    ref_correct, ref_adv = ref.perturb(x, y)
    active = model(x).argmax(1) == y
    torch.manual_seed(0)
    ours = APGD(4 / 255, "dlr-targeted", steps=100, n_targets=9, start_noise=reference_noise, early_stop=False)
    adv = ours.perturb(model, x, y, torch.arange(len(y)), seed=0, active=active)
    our_correct = model(adv).argmax(1) == y
    assert torch.equal(our_correct, ref_correct)
    assert torch.equal(adv, ref_adv)


def test_invariants_feasible_eps_zero_and_batch_independent():
    model = trained_digits_model()
    x, y = digits_test(40)
    active = model(x).argmax(1) == y
    attack = APGD(EPS, "ce", steps=20)
    adv = attack.perturb(model, x, y, torch.arange(40), seed=3, active=active)
    assert torch.equal(project(adv, x, EPS), adv)
    assert torch.equal(adv[~active], x[~active])  # inactive samples untouched
    halves = torch.cat([attack.perturb(model, x[s], y[s], torch.arange(40)[s], seed=3, active=active[s])
                        for s in (slice(0, 13), slice(13, 40))])
    assert torch.equal((model(adv).argmax(1) == y), (model(halves).argmax(1) == y))
    zero = APGD(0.0, "ce", steps=10).perturb(model, x, y, torch.arange(40), seed=3, active=active)
    assert torch.equal(model(zero).argmax(1) == y, active)
