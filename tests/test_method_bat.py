"""BAT against docs/methods/bat.md: early-stopped searches versus a literal per-sample loop, the outer loss."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairbench.methods.bat import Bat, BatConfig, kl_to_uniform

from fairbench.adversaries import clean_logits, early_stopped_search, inner_attack, kl_per_sample, start_point
from fairbench.method import Batch
from fairbench.models import create_model
from tests.conftest import make_context

K = 10


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    """The tiny smallcnn after a few clean SGD steps, so that samples flip at different steps of a search."""
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=10, image_shape=(1, 8, 8))
    x = torch.from_numpy(digits.train.images).float() / 255
    y = torch.from_numpy(digits.train.labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.train()


@pytest.fixture
def case(trained, digits_batch):
    """float64 model and batch (bits independent of batch size), every 8th label wrong, radii 0.02 to 0.4."""
    model = copy.deepcopy(trained).double()
    x, y, _ = digits_batch
    x, y = x.double(), y.clone()
    y[::8] = (y[::8] + 1) % 10
    eps = torch.linspace(0.02, 0.4, len(x), dtype=torch.float64)
    start = start_point(x, eps, "normal", torch.Generator().manual_seed(1)).clamp(0, 1)
    return model, x, y, eps, eps / 4, start


def _kl_step(model, x0, x, ref, eps, alpha):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(kl_per_sample(ref, model(x)).sum(), x)
    return torch.min(torch.max(x.detach() + alpha * grad.sign(), x0 - eps), x0 + eps).clamp(0, 1)


def _wrong(model, x, y) -> bool:
    with torch.no_grad():
        return model(x).argmax(1).item() != y


def reference_last_clean(model, x0, y, ref, start, eps, alpha, steps):
    """stop_to_lastclean for one sample: return the previous iterate at the first misclassified check."""
    previous = current = start
    for k in range(steps):
        if _wrong(model, current, y):
            return previous, max(k - 1, 0)
        previous, current = current, _kl_step(model, x0, current, ref, eps, alpha)
    return current, steps


def reference_first_adv(model, x0, y, ref, start, eps, alpha, steps, tau=1):
    """stop_to_firstadv for one sample: the FAT counter, never reset."""
    current, counter = start, tau
    for k in range(steps):
        if _wrong(model, current, y):
            if counter == 0:
                return current, k
            counter -= 1
        current = _kl_step(model, x0, current, ref, eps, alpha)
    return current, steps


def test_searches_match_a_per_sample_loop(case):
    model, x, y, eps, alpha, start = case
    model.eval()
    ref = clean_logits(model, x)
    out = early_stopped_search(model, x, y, ref, eps=eps, alpha=alpha, steps=K, generator=None, start=start)
    for i in range(len(x)):
        args = (model, x[i:i + 1], y[i].item(), ref[i:i + 1], start[i:i + 1], eps[i], alpha[i], K)
        lc, lc_step = reference_last_clean(*args)
        fa, fa_step = reference_first_adv(*args)
        assert (out.last_clean_step[i].item(), out.first_adv_step[i].item()) == (lc_step, fa_step), i
        assert torch.equal(out.last_clean[i:i + 1], lc) and torch.equal(out.first_adv[i:i + 1], fa), i
    wrong_at_start = model(start).argmax(1) != y
    assert wrong_at_start.any() and (~wrong_at_start).any()
    assert torch.equal(out.last_clean[wrong_at_start], start[wrong_at_start])  # x^lc = x^(0)
    assert (out.first_adv_step[wrong_at_start] >= 1).all()  # x^fa takes at least one step
    flipped_later = ~wrong_at_start & (out.last_clean_step < K)
    assert flipped_later.any() and (out.last_clean_step == K).any()  # every case is exercised


def test_stopped_samples_take_no_further_steps(case):
    model, x, y, eps, alpha, start = case
    ref = clean_logits(model, x)
    short = early_stopped_search(model, x, y, ref, eps=eps, alpha=alpha, steps=5, generator=None, start=start)
    long = early_stopped_search(model, x, y, ref, eps=eps, alpha=alpha, steps=K, generator=None, start=start)
    fa_stopped, lc_stopped = short.first_adv_step < 5, short.last_clean_step < 5
    assert fa_stopped.any() and (~fa_stopped).any()
    assert torch.equal(long.first_adv[fa_stopped], short.first_adv[fa_stopped])
    assert torch.equal(long.last_clean[lc_stopped], short.last_clean[lc_stopped])
    for out in (short, long):
        for point, taken in ((out.last_clean, out.last_clean_step), (out.first_adv, out.first_adv_step)):
            assert ((point - start).abs().flatten(1).amax(1) <= taken * alpha + 1e-12).all()
        stopped = out.first_adv_step < (5 if out is short else K)
        assert (out.first_adv_step[stopped] > out.last_clean_step[stopped]).all()


def test_never_flipping_samples_end_at_the_trades_point(case):
    model, x, y, eps, alpha, start = case
    ref = clean_logits(model, x)
    out = early_stopped_search(model, x, y, ref, eps=eps, alpha=alpha, steps=K, generator=None, start=start)
    trades = inner_attack(model, x, ref, eps=eps, alpha=alpha, steps=K, generator=None, start=start)
    never = out.last_clean_step == K
    assert never.any()
    assert torch.equal(out.last_clean[never], trades[never])
    assert torch.equal(out.first_adv[never], trades[never])


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 10)])
def test_points_in_ball_and_box_batchnorm_untouched_any_image_size(trained, digits_batch, shape):
    x, y, _ = digits_batch
    if shape == (1, 8, 8):
        model = trained
    else:
        torch.manual_seed(0)
        model, x = create_model("smallcnn", 10, shape).train(), torch.rand(len(x), *shape)
    before = _buffers(model)
    lc, fa = Bat(BatConfig(eps=0.1, alpha=0.03)).adversaries(model, x, y, make_context(memory=False))
    assert model.training and all(torch.equal(before[k], v) for k, v in _buffers(model).items())
    for point in (lc.last_clean, fa.first_adv):
        assert point.shape == x.shape and (point >= 0).all() and (point <= 1).all()
        assert ((point - x).abs().amax() <= 0.1 + 1e-6)


def test_two_independent_searches_last_clean_start_drawn_first(case):
    model, x, y, _, _, _ = case
    cfg = BatConfig(eps=0.2, alpha=0.05)
    ctx = make_context(memory=False, seed=5)
    lc, fa = Bat(cfg).adversaries(model, x, y, ctx)
    gen = torch.Generator().manual_seed(5)
    starts = [start_point(x, torch.tensor(cfg.eps), "normal", gen).clamp(0, 1) for _ in range(2)]
    assert not torch.equal(starts[0], starts[1])
    ref = clean_logits(model, x)
    for start, got in zip(starts, (lc, fa)):
        alone = early_stopped_search(model, x, y, ref, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                                     generator=None, start=start)
        assert all(torch.equal(a, b) for a, b in zip(alone, got))


def test_outer_loss_is_the_direct_formula_with_forwards_in_official_order(trained, digits_batch):
    x, y, idx = digits_batch
    model, reference = copy.deepcopy(trained), copy.deepcopy(trained)
    method = Bat(BatConfig(beta=6.0))
    ctx = make_context(memory=False, seed=3)
    out = method.training_loss(model, Batch(x, y, idx), ctx)

    lc, fa = method.adversaries(reference, x, y, make_context(memory=False, seed=3))
    z_lc, z_fa, z = reference(lc.last_clean), reference(fa.first_adv), reference(x)
    p_lc, p_fa = F.softmax(z_lc, 1), F.softmax(z_fa, 1)
    entropy = lambda p: -(p * p.log()).sum(1)  # noqa: E731
    expected = (F.cross_entropy(z_lc, y)
                + 6.0 * F.kl_div(F.log_softmax(z_fa, 1), F.softmax(z, 1), reduction="batchmean")
                + (math.log(10) - entropy(p_lc)).mean() + (math.log(10) - entropy(p_fa)).mean())
    assert torch.allclose(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(_buffers(model).values(), _buffers(reference).values()))
    assert {"ce_lc", "kl_fa", "kl_uniform", "lc_step", "fa_step"} <= out.log.keys()


def test_uniform_terms_are_log_c_minus_entropy_and_vanish_for_constant_logits(digits_batch):
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)) * 3
    p = F.softmax(logits, 1)
    assert torch.allclose(kl_to_uniform(logits), math.log(10) + (p * p.log()).sum(1), atol=1e-6)
    assert (kl_to_uniform(logits) >= 0).all()
    x, y, idx = digits_batch
    constant = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(constant[1].weight), nn.init.zeros_(constant[1].bias)
    loss = Bat().training_loss(constant, Batch(x, y, idx), make_context(memory=False)).loss
    assert torch.allclose(loss, torch.tensor(math.log(10)))  # CE log C, every KL 0
