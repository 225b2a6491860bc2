"""PGD-AT and TARGETED TRADES: the adversaries' objectives, outer losses, plumbing equivalence."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from fairbench.methods.pgd_at import PgdAt, PgdAtConfig
from fairbench.methods.targeted_trades import TargetedTrades

from fairbench.adversaries import clean_logits, inner_attack, start_point, trades_loss
from fairbench.classweights import random_wrong_targets
from fairbench.method import Batch
from fairbench.trades_family import TradesConfig
from tests.conftest import make_context


def _pgd(model, x, y, steps: int, seed: int = 1, cfg: PgdAtConfig = PgdAtConfig()):
    gen = torch.Generator().manual_seed(seed)
    return inner_attack(model, x, None, eps=cfg.eps, alpha=cfg.alpha, steps=steps, generator=gen,
                        init="uniform", untargeted="ce", labels=y)


def test_pgd_ce_increases_along_the_attack(tiny_model, digits_batch):
    x, y, _ = digits_batch
    model = tiny_model.eval()
    points = [_pgd(model, x, y, k) for k in (0, 1, 3, 10)]  # prefixes of one trajectory (same start)
    with torch.no_grad():
        ce = [F.cross_entropy(model(point), y).item() for point in points]
    assert ce == sorted(ce) and ce[-1] > ce[0] + 1e-3


def test_pgd_start_is_uniform_in_the_ball_and_points_are_feasible(tiny_model, digits_batch):
    x, y, _ = digits_batch
    eps = PgdAtConfig().eps
    start = _pgd(tiny_model, x, y, 0)
    inside = (x > eps) & (x < 1 - eps)  # pixels whose ball is not cut by the box
    delta = (start - x)[inside] / eps
    assert delta.abs().max() <= 1 and abs(delta.mean()) < 0.05 and abs(delta.abs().mean() - 0.5) < 0.05
    x_adv = _pgd(tiny_model, x, y, 10)
    assert (x_adv >= 0).all() and (x_adv <= 1).all() and ((x_adv - x).abs().amax() <= eps + 1e-6)


def test_pgd_at_loss_is_ce_at_x_adv_in_train_mode(tiny_model, digits_batch):
    x, y, idx = digits_batch
    model, reference = tiny_model.train(), copy.deepcopy(tiny_model)
    ctx = make_context(memory=False, seed=4)
    loss = PgdAt().training_loss(model, Batch(x, y, idx), ctx).loss
    x_adv = _pgd(reference, x, y, 10, seed=4)
    assert reference.training
    assert torch.allclose(loss, F.cross_entropy(reference(x_adv), y), rtol=1e-6, atol=1e-7)


def test_targets_are_wrong_classes_for_every_sample(digits_batch):
    """The targets TARGETED TRADES (and TRIX) draw: never the label, every wrong class reachable."""
    _, y, _ = digits_batch
    ctx = make_context(memory=False)
    seen = torch.zeros(10, 10, dtype=torch.long)
    for _ in range(50):
        targets = random_wrong_targets(y, 10, ctx.generator)
        assert (targets != y).all()
        seen.index_put_((y, targets), torch.ones_like(y), accumulate=True)
    present = torch.unique(y)
    off_diagonal = ~torch.eye(10, dtype=torch.bool)[present]
    assert (seen[present][off_diagonal] > 0).all()  # every wrong class is drawn


def test_equals_trix_targeted_branch_for_every_sample(tiny_model, digits_batch):
    """docs/methods/targeted-trades.md: TRIX's targeted branch (noise first, then targets, targeted CE descent,
    TRADES loss) for everyone."""
    x, y, idx = digits_batch
    model = tiny_model.train()
    batch = Batch(x, y, idx)
    out = TargetedTrades().training_loss(copy.deepcopy(model), batch, make_context(memory=False, seed=9))
    assert torch.equal(out.log["targeted"], torch.tensor(1.0))

    cfg, gen = TradesConfig(), torch.Generator().manual_seed(9)  # by hand: noise first, then targets
    start = start_point(x, torch.tensor(cfg.eps), "normal", gen)
    logits = clean_logits(model, x)
    targets = random_wrong_targets(y, 10, gen)
    x_adv = inner_attack(model, x, logits, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, generator=None,
                         targets=targets, targeted=torch.ones_like(y, dtype=torch.bool), start=start)
    assert torch.equal(out.loss, trades_loss(copy.deepcopy(model), x, x_adv, y, cfg.beta)[0])


def test_target_probability_rises(tiny_model, digits_batch):
    x, y, _ = digits_batch
    model = tiny_model.eval()
    gen = torch.Generator().manual_seed(2)
    start = start_point(x, torch.tensor(0.031), "normal", gen)
    targets = random_wrong_targets(y, 10, gen)
    x_adv = inner_attack(model, x, clean_logits(model, x), eps=0.031, alpha=0.007, steps=10, generator=None,
                         targets=targets, targeted=torch.ones_like(y, dtype=torch.bool), start=start)
    with torch.no_grad():
        p_start = F.softmax(model(start), 1).gather(1, targets[:, None])
        p_adv = F.softmax(model(x_adv), 1).gather(1, targets[:, None])
    assert p_adv.mean() > p_start.mean() and (p_adv > p_start).float().mean() > 0.9
