"""DAFA's class weights and the Table 2 ablations (docs/methods/dafa.md §5, docs/methods/trix.md §5).

DAFA's weights scale the clean CE term only (checked against the loss written out by hand) and each sample's
radius and step; `dafa-uniform`, `trix-uniform` and `trix-basic` differ from their parents exactly where the
TRIX paper's ablation says: in the CE weights, in the radius, in the sample memory, and nowhere else.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from fairbench.methods import dafa as dafa_module
from fairbench.methods import trix as trix_module
from fairbench.methods.dafa import Dafa, DafaUniform
from fairbench.methods.trix import Trix, TrixBasic, TrixUniform

from fairbench.method import Batch, Services
from tests.conftest import build_method, make_context

WEIGHTS = torch.tensor([3.0, 0.5, 1.5, 0.8, 1.2, 0.6, 1.4, 0.7, 1.3, 0.0])
"""Non-uniform class weights (one of them 0: that class's CE term vanishes under DAFA)."""


def _with_weights(cls, weights: torch.Tensor = WEIGHTS, **config):
    """A method of `cls` after its warm-up (epoch 2 of 4, warmup 1) holding the global class weights `weights`."""
    method = cls(dataclasses.replace(cls.Config(), warmup=1, **config))
    ctx = make_context(epoch=2, memory=bool(method.services.sample_memory))
    method.setup(ctx)
    method.dafa.weights = weights.clone()
    return method, ctx


def _step(method, ctx, model, batch: Batch, seed: int = 5):
    """(loss, the adversarial points and the radius and step the method attacked with) of one training step on
    a copy of `model`, the generator seeded with `seed`."""
    seen = {}
    module = trix_module if isinstance(method, Trix) else dafa_module
    attack = module.inner_attack

    def spy(*args, **kwargs):
        seen.update(eps=kwargs["eps"], alpha=kwargs["alpha"])
        seen["x_adv"] = attack(*args, **kwargs)
        return seen["x_adv"]

    ctx.generator.manual_seed(seed)
    mp = pytest.MonkeyPatch()
    mp.setattr(module, "inner_attack", spy)
    try:
        out = method.training_loss(copy.deepcopy(model).train(), batch, ctx)
    finally:
        mp.undo()
    return out, seen


def _seeded(ctx, seed: int):
    ctx.generator.manual_seed(seed)
    return ctx


def _clean_ce(model, batch: Batch) -> torch.Tensor:
    """Per-sample CE of the train-mode clean forward (batch statistics: the same values the loss sees)."""
    return F.cross_entropy(copy.deepcopy(model).train()(batch.x).float(), batch.y, reduction="none")


# -- DAFA ---------------------------------------------------------------------------------------------------

def test_dafa_class_weights_scale_the_clean_ce_term_and_only_it(tiny_model, digits_batch):
    """With steps = 0 the adversarial point is the uniform start in each sample's ball of radius W[y_i] eps, drawn
    from the seeded generator, so the whole loss can be written out by hand:
    (1/B) sum_i W[y_i] CE_i + beta (1/B) sum_i KL_i. A large eps makes the KL term large enough to tell apart."""
    x, y, idx = digits_batch
    batch = Batch(x, y, idx)
    method, ctx = _with_weights(Dafa, steps=0, init="uniform", eps=0.3)
    loss = method.training_loss(copy.deepcopy(tiny_model).train(), batch, _seeded(ctx, 11)).loss

    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(11)) * 2 - 1
    start = (x + 0.3 * WEIGHTS[y].view(-1, 1, 1, 1) * noise).clamp(0, 1)
    model = copy.deepcopy(tiny_model).train()
    logits_adv, logits = model(start).float(), model(x).float()
    ce = F.cross_entropy(logits, y, reduction="none")
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="none").sum(1)
    w, b, beta = WEIGHTS[y], len(y), method.config.beta
    expected = (w * ce).sum() / b + beta * kl.sum() / b
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    # the test can tell the alternatives apart: unweighted CE, weights on the whole loss, normalising by sum(w)
    for wrong in (ce.mean() + beta * kl.mean(), (w * (ce + beta * kl)).mean(),
                  (w * ce).sum() / w.sum() + beta * kl.mean()):
        assert not torch.allclose(loss, wrong, rtol=1e-4)


def test_dafa_class_weights_scale_each_samples_radius_and_step(tiny_model, digits_batch):
    x, y, idx = digits_batch
    method, ctx = _with_weights(Dafa, steps=3)
    _, seen = _step(method, ctx, tiny_model, Batch(x, y, idx))
    cfg = method.config
    assert torch.allclose(seen["eps"], cfg.eps * WEIGHTS[y]) and torch.allclose(seen["alpha"], cfg.alpha * WEIGHTS[y])
    linf = (seen["x_adv"] - x).abs().flatten(1).amax(1)
    assert (linf <= cfg.eps * WEIGHTS[y] + 1e-6).all()
    assert (linf[y == 0] > cfg.eps + 1e-4).any()  # class 0 (weight 3) moves beyond the unweighted radius


def test_dafa_uniform_drops_the_ce_weights_and_keeps_the_radius(tiny_model, digits_batch):
    """dafa-uniform attacks exactly as DAFA (same points) and its loss is DAFA's plus (1/B) sum_i (1 - W_i) CE_i."""
    assert _changed_fields(Dafa, DafaUniform) == {"weight_loss": (True, False)}
    assert DafaUniform.services == Dafa.services
    x, y, idx = digits_batch
    batch = Batch(x, y, idx)
    dafa, ctx = _with_weights(Dafa, steps=2)
    uniform, ctx_u = _with_weights(DafaUniform, steps=2)
    out, seen = _step(dafa, ctx, tiny_model, batch)
    out_u, seen_u = _step(uniform, ctx_u, tiny_model, batch)
    assert torch.equal(seen["x_adv"], seen_u["x_adv"]) and torch.equal(seen["eps"], seen_u["eps"])
    ce = _clean_ce(tiny_model, batch)
    assert torch.allclose(out_u.loss - out.loss, ((1 - WEIGHTS[y]) * ce).mean(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(out_u.loss, out.loss)


# -- TRIX and its ablations -------------------------------------------------------------------------------

def _changed_fields(parent, child) -> dict:
    a, b = dataclasses.asdict(parent.Config()), dataclasses.asdict(child.Config())
    assert a.keys() == b.keys()
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def test_ablation_configs_differ_from_trix_only_in_the_weight_switches():
    assert _changed_fields(Trix, TrixUniform) == {"weight_loss": (True, False)}
    assert _changed_fields(Trix, TrixBasic) == {"weight_loss": (True, False), "weight_radius": (True, False)}
    assert TrixUniform.services == Trix.services == Services(sample_memory=True)
    assert TrixBasic.services == Services()  # no global weights, so no warm-up memory


def test_trix_uniform_drops_the_ce_weights_and_keeps_radius_split_and_targets(tiny_model, digits_batch):
    x, y, idx = digits_batch
    batch = Batch(x, y, idx)
    trix, ctx = _with_weights(Trix, steps=2)
    uniform, ctx_u = _with_weights(TrixUniform, steps=2)
    out, seen = _step(trix, ctx, tiny_model, batch)
    out_u, seen_u = _step(uniform, ctx_u, tiny_model, batch)
    assert 0 < float(out.log["targeted"]) < 1 and torch.equal(out.log["targeted"], out_u.log["targeted"])
    assert torch.equal(seen["x_adv"], seen_u["x_adv"]) and torch.equal(seen["eps"], seen_u["eps"])
    ce = _clean_ce(tiny_model, batch)
    assert torch.allclose(out_u.loss - out.loss, ((1 - WEIGHTS[y]) * ce).mean(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(out_u.loss, out.loss)


def test_trix_basic_is_trix_without_any_weights(tiny_model, digits_batch):
    """trix-basic ignores the global weights: it equals TRIX with weights 1 (same split, targets, points and
    loss) and differs from TRIX with non-uniform weights in the radius."""
    x, y, idx = digits_batch
    batch = Batch(x, y, idx)
    basic, ctx_b = _with_weights(TrixBasic, steps=2)
    unweighted, ctx_1 = _with_weights(Trix, torch.ones(10), steps=2)
    weighted, ctx_w = _with_weights(Trix, steps=2)
    out_b, seen_b = _step(basic, ctx_b, tiny_model, batch)
    out_1, seen_1 = _step(unweighted, ctx_1, tiny_model, batch)
    out_w, seen_w = _step(weighted, ctx_w, tiny_model, batch)
    assert torch.equal(out_b.loss, out_1.loss) and torch.equal(seen_b["x_adv"], seen_1["x_adv"])
    assert seen_b["eps"] == basic.config.eps and seen_b["alpha"] == basic.config.alpha  # scalars: never scaled
    assert 0 < float(out_b.log["targeted"]) < 1 and torch.equal(out_b.log["targeted"], out_w.log["targeted"])
    assert not torch.equal(seen_b["x_adv"], seen_w["x_adv"])


def test_only_trix_and_trix_uniform_switch_their_weights_on_after_the_warmup(tiny_model, digits, digits_batch):
    """Through the engine's own context: the warm-up epoch records adversarial predictions where a sample memory
    is declared; trix-basic declares none, so its weights stay 1."""
    x, y, idx = digits_batch
    weights = {}
    for cls in (Trix, TrixUniform, TrixBasic):
        config = dataclasses.replace(cls.Config(), warmup=1, steps=1)
        method, ctx = build_method(cls, digits, config, epochs=3, epoch=1)
        method.training_loss(copy.deepcopy(tiny_model).train(), Batch(x, y, idx), ctx)
        method.on_epoch_end(1, tiny_model, ctx)
        weights[cls.name] = method.dafa.weights
    assert not torch.equal(weights["trix"], torch.ones(10))
    assert torch.equal(weights["trix-uniform"], weights["trix"])  # the same split, points and memory
    assert torch.equal(weights["trix-basic"], torch.ones(10))


def test_trix_with_the_split_off_is_dafa_with_the_same_weights(tiny_model, digits_batch):
    """lam_batch = 0 makes every split weight 1, so nobody is targeted: TRIX is then DAFA (same points, loss)."""
    x, y, idx = digits_batch
    batch = Batch(x, y, idx)
    dafa, ctx_d = _with_weights(Dafa, steps=2)
    trix, ctx_t = _with_weights(Trix, steps=2, lam_batch=0.0)
    out_d, seen_d = _step(dafa, ctx_d, tiny_model, batch)
    out_t, seen_t = _step(trix, ctx_t, tiny_model, batch)
    assert float(out_t.log["targeted"]) == 0.0
    assert torch.equal(seen_d["x_adv"], seen_t["x_adv"]) and torch.equal(out_d.loss, out_t.loss)
