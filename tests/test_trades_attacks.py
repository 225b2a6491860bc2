"""The shared training adversary and loss against the documented invariants (docs/methods/trades.md §5)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from fairbench.methods.dafa import Dafa, DafaConfig
from fairbench.methods.trades import Trades
from fairbench.methods.trix import Trix, TrixConfig

from fairbench.adversaries import clean_logits, inner_attack, kl_per_sample, start_point, trades_loss
from fairbench.method import Batch
from fairbench.trades_family import TradesConfig
from tests.conftest import make_context


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_attack_stays_in_ball_and_box_and_leaves_batchnorm_alone(tiny_model, digits_batch):
    x, y, _ = digits_batch
    model = tiny_model.train()
    before = _buffers(model)
    gen = torch.Generator().manual_seed(0)
    eps = torch.full((len(x),), 0.031)
    eps[y == 0] = 0.062
    x_adv = inner_attack(model, x, clean_logits(model, x), eps=eps, alpha=eps / 4, steps=10, generator=gen)
    assert model.training
    after = _buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (x_adv >= 0).all() and (x_adv <= 1).all()
    linf = (x_adv - x).abs().flatten(1).amax(1)
    assert (linf <= eps + 1e-6).all()
    assert (linf[y == 0] > 0.031 + 1e-4).any()  # the doubled radius is used


def test_attack_ascends_kl(tiny_model, digits_batch):
    x, y, _ = digits_batch
    model = tiny_model.eval()
    ref = clean_logits(model, x)
    start = start_point(x, torch.tensor(0.0), "normal", torch.Generator().manual_seed(1))
    x_adv = inner_attack(model, x, ref, eps=0.1, alpha=0.02, steps=10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert kl_per_sample(ref, model(x_adv)).mean() > kl_per_sample(ref, model(start)).mean()


def test_zero_steps_is_ce_plus_beta_kl_at_the_start_point(tiny_model, digits_batch):
    x, y, idx = digits_batch
    model = tiny_model.train()
    method = Trades(TradesConfig(steps=0, beta=6.0))
    ctx = make_context(memory=False)
    ctx.generator.manual_seed(7)
    reference = copy.deepcopy(model)
    loss = method.training_loss(model, Batch(x, y, idx), ctx).loss

    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    logits, logits_adv = reference(x), reference(start)
    expected = F.cross_entropy(logits, y) + 6.0 * F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1),
                                                           reduction="batchmean")
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_beta_zero_is_clean_cross_entropy(tiny_model, digits_batch):
    x, y, _ = digits_batch
    model = tiny_model.train()
    loss, logits, _ = trades_loss(model, x, x.flip(0), y, beta=0.0)
    assert torch.allclose(loss, F.cross_entropy(logits, y))


def test_kl_target_is_not_detached(tiny_model, digits_batch):
    x, y, _ = digits_batch
    model = tiny_model.train()
    x_adv = (x + 0.03).clamp(0, 1)
    loss, logits, logits_adv = trades_loss(model, x, x_adv, y, beta=1.0)
    kl_only = kl_per_sample(logits, logits_adv).mean()
    grad_full = torch.autograd.grad(kl_only, logits, retain_graph=True)[0]
    grad_detached = torch.autograd.grad(kl_per_sample(logits.detach(), logits_adv).mean(), logits_adv)[0]
    assert grad_full.abs().sum() > 0 and grad_detached.abs().sum() > 0


def _loss_and_params(method, model, batch, ctx, seed):
    m = copy.deepcopy(model)
    ctx.generator.manual_seed(seed)
    loss = method.training_loss(m, batch, ctx).loss
    return loss


def test_dafa_with_unit_weights_is_trades(tiny_model, digits_batch):
    x, y, idx = digits_batch
    batch = Batch(x, y, idx)
    trades = Trades(TradesConfig(steps=3))
    dafa = Dafa(DafaConfig(steps=3, warmup=1))
    ctx = make_context(epoch=2)
    trades.setup(ctx), dafa.setup(ctx)
    assert torch.equal(_loss_and_params(trades, tiny_model, batch, ctx, 3),
                       _loss_and_params(dafa, tiny_model, batch, ctx, 3))


def test_trix_all_untargeted_equals_dafa(tiny_model, digits_batch):
    """lam_batch = 0 makes every split weight 1, none below the mean: TRIX is then DAFA (its target draw comes
    after the start noise and is not used)."""
    x, y, idx = digits_batch
    batch = Batch(x, y, idx)
    weights = torch.linspace(0.5, 1.5, 10)
    dafa, trix = Dafa(DafaConfig(steps=3, warmup=1)), Trix(TrixConfig(steps=3, warmup=1))
    forced = Trix(TrixConfig(steps=3, warmup=1, lam_batch=0.0))
    ctx = make_context(epoch=2)
    for method in (dafa, trix, forced):
        method.setup(ctx)
        method.dafa.weights = weights.clone()
    assert torch.equal(_loss_and_params(dafa, tiny_model, batch, ctx, 5),
                       _loss_and_params(forced, tiny_model, batch, ctx, 5))
    # the real split targets some samples and changes the loss
    assert not torch.equal(_loss_and_params(dafa, tiny_model, batch, ctx, 5),
                           _loss_and_params(trix, tiny_model, batch, ctx, 5))


def test_targeted_steps_raise_target_probability(tiny_model, digits_batch):
    x, y, _ = digits_batch
    model = tiny_model.eval()
    targets = (y + 1) % 10
    mask = torch.ones_like(y, dtype=torch.bool)
    ref = clean_logits(model, x)
    x_adv = inner_attack(model, x, ref, eps=0.1, alpha=0.02, steps=10, generator=torch.Generator().manual_seed(2),
                         targets=targets, targeted=mask)
    with torch.no_grad():
        before = F.cross_entropy(model(x), targets)
        after = F.cross_entropy(model(x_adv), targets)
    assert after < before


def test_dafa_weights_switch_on_after_warmup_and_memory_is_complete(tiny_model, digits):
    from fairbench.data.loader import DeviceSplit, train_batches

    split = DeviceSplit.from_arrays(digits.train, torch.device("cpu"))
    small = split.subset(torch.arange(96))
    method = Dafa(DafaConfig(steps=1, warmup=1))
    ctx = make_context(num_train=96, epochs=3)
    method.setup(ctx)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    for epoch in (1, 2):
        ctx.epoch = epoch
        for x, y, pos in train_batches(small, 32, digits.augment, torch.Generator().manual_seed(epoch)):
            assert torch.equal(method.dafa.weights, torch.ones(10)) or epoch == 2
            out = method.training_loss(tiny_model.train(), Batch(x, y, pos), ctx)
            opt.zero_grad(), out.loss.backward(), opt.step()
            if epoch == 1:
                assert torch.equal(ctx.memory.probs[pos].sum(1), ctx.memory.probs[pos].sum(1))
        if epoch == 1:
            assert torch.equal(ctx.memory.written, torch.ones(96, dtype=torch.int32))  # every index exactly once
            assert torch.allclose(ctx.memory.probs.sum(1), torch.ones(96))
        method.on_epoch_end(epoch, tiny_model, ctx)
        if epoch == 1:
            frozen = method.dafa.weights.clone()
            assert not torch.equal(frozen, torch.ones(10))
            assert float(frozen.sum()) == float(frozen.sum())  # finite
    assert torch.equal(method.dafa.weights, frozen)  # computed once, never updated
