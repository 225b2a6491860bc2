"""CFA against docs/methods/cfa.md §5: CCM/CCR and their timing, t_k, the normalised TRADES loss, FAWA, a real run."""
from __future__ import annotations

import copy
import io

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fairbench.methods.cfa import Cfa, CfaConfig
from fairbench.methods.trades import Trades, TradesConfig

from fairbench.adversaries import clean_logits, inner_attack, trades_loss
from fairbench.averaging import WeightAverage
from fairbench.calibration import RobustTally, calibrated_radius, calibrated_trades_loss, calibrated_weight
from fairbench.checkpoint import list_checkpoints
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit, eval_batches, stratified_subset
from fairbench.evaluation import margins
from fairbench.method import Batch
from fairbench.models import create_model
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve
from tests.conftest import build_method, make_context

EPS = 8 / 255


def build(cls: type, digits, epochs: int = 20, **overrides) -> tuple[object, object]:
    """As the engine builds it (its validation split: the first 2% of each class), validation PGD shortened."""
    return build_method(cls, digits, cls.Config(**{"val_steps": 2, **overrides}), epochs=epochs)


def _method(digits, **overrides) -> tuple[Cfa, object]:
    return build(Cfa, digits, **overrides)


def trades_reference(model, batch: Batch, seed: int, steps: int) -> torch.Tensor:
    """The TRADES method's loss at radius 8/255 and step 2/255 on a copy of `model`, attack noise from `seed`."""
    ctx = make_context(memory=False)
    ctx.generator.manual_seed(seed)
    method = Trades(TradesConfig(eps=EPS, alpha=2 / 255, steps=steps))
    return method.training_loss(copy.deepcopy(model), batch, ctx).loss


T = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0])


def test_ccm_ccr_by_hand_and_their_timing(tiny_model, digits):
    method, ctx = _method(digits, averaging="off")
    method.t = T.clone()
    method.on_epoch_start(10, tiny_model, ctx)  # 1-indexed epoch 10 = the code's epoch 9 < begin: the constants
    assert torch.equal(method.eps, torch.full((10,), EPS)) and torch.allclose(method.b, torch.full((10,), 6 / 7))
    method.on_epoch_start(11, tiny_model, ctx)  # = the code's epoch 10 >= begin: calibrated from the previous t
    assert torch.allclose(method.eps, (0.5 + T) * EPS)
    assert method.eps[0].item() == pytest.approx(4 / 255) and method.eps[9].item() == pytest.approx(12 / 255)
    assert method.eps[5].item() == pytest.approx(EPS)
    b = method.b
    assert [b[k].item() for k in (0, 5, 9)] == pytest.approx([3 / 4, 6 / 7, 0.9])
    assert ((b > 0) & (b < 1)).all() and (b.diff() > 0).all() and (method.eps.diff() > 0).all()
    assert torch.allclose(calibrated_weight(T, 0.5, 6.0), (0.5 + T) * 6 / (1 + (0.5 + T) * 6))


def test_switches_and_edge_cases(tiny_model, digits):
    for kw, eps_varies, b_varies in (({"ccm": False}, False, True), ({"ccr": False}, True, False)):
        method, ctx = _method(digits, averaging="off", **kw)
        method.t = T.clone()
        method.on_epoch_start(11, tiny_model, ctx)
        assert (method.eps.unique().numel() > 1) == eps_varies and (method.b.unique().numel() > 1) == b_varies
    method, ctx = _method(digits, averaging="off", lambda1=1.0, begin=0)
    method.on_epoch_start(1, tiny_model, ctx)  # begin 0: epoch 1 still has no statistics, so it stays uniform
    assert torch.equal(method.eps, torch.full((10,), EPS))
    method.t = torch.zeros(10)
    method.on_epoch_start(2, tiny_model, ctx)
    assert torch.allclose(method.eps, torch.full((10,), EPS))  # lambda1 = 1, t = 0: eps_k = eps
    assert torch.allclose(calibrated_radius(torch.tensor([0.3, 0.7]), 0.5, EPS), torch.tensor([0.8, 1.2]) * EPS)


def test_t_from_known_logits(tiny_model, digits):
    method, ctx = _method(digits, averaging="off")
    method.on_epoch_start(1, tiny_model, ctx)
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    method.tally.record(F.one_hot(pred, 10).float() * 5, y)
    method.tally.record(F.one_hot(torch.tensor([3, 4]), 10).float(), torch.tensor([3, 5]))
    method.on_epoch_end(1, tiny_model, ctx)
    expected = torch.zeros(10)
    expected[:4] = torch.tensor([1.0, 1.0, 2.0, 1.0])
    assert torch.allclose(method.t, expected * 10 / 8)  # C * correct_k / N, N = 8 samples seen


def test_loss_and_statistics_against_direct_computation(tiny_model, digits_batch, digits):
    x, y, idx = digits_batch
    method, ctx = _method(digits, averaging="off", steps=3)
    method.t = torch.linspace(0.1, 0.9, 10)
    method.on_epoch_start(11, tiny_model, ctx)
    reference = copy.deepcopy(tiny_model)
    ctx.generator.manual_seed(5)
    loss = method.training_loss(tiny_model, Batch(x, y, idx), ctx).loss

    eps_i = (0.5 + method.t[y]) * EPS
    x_adv = inner_attack(reference, x, clean_logits(reference, x), eps=eps_i, alpha=2 / 255, steps=3,
                         generator=torch.Generator().manual_seed(5))
    logits, logits_adv = reference(x), reference(x_adv)
    b = calibrated_weight(method.t, 0.5, 6.0)[y]
    ce = F.cross_entropy(logits, y, reduction="none")
    kl = (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - F.log_softmax(logits_adv, 1))).sum(1)
    assert torch.allclose(loss, ((1 - b) * ce + b * kl).mean(), rtol=1e-5, atol=1e-7)
    hits = (logits_adv.argmax(1) == y).float()
    assert torch.equal(method.tally.correct, torch.zeros(10).index_add_(0, y, hits))
    assert method.tally.seen == len(y)
    linf = (x_adv - x).abs().flatten(1).amax(1)
    assert (linf <= eps_i + 1e-6).all() and (x_adv >= 0).all() and (x_adv <= 1).all()


def test_normalised_loss_is_trades_over_one_plus_beta(tiny_model, digits_batch, digits):
    x, y, idx = digits_batch
    x_adv = (x + 0.02 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))).clamp(0, 1)
    model = tiny_model.train()
    cfa, _, _ = calibrated_trades_loss(model, x, x_adv, y, torch.full((len(y),), 6 / 7))
    trades, _, _ = trades_loss(model, x, x_adv, y, 6.0)
    assert torch.allclose(cfa * 7, trades, rtol=1e-5)

    losses = {}
    for normalised in (True, False):
        method, ctx = _method(digits, averaging="off", steps=2, normalised_trades=normalised)
        model = copy.deepcopy(tiny_model)
        method.on_epoch_start(1, model, ctx)
        ctx.generator.manual_seed(3)
        losses[normalised] = method.training_loss(model, Batch(x, y, idx), ctx).loss
    assert torch.allclose(losses[False], 7 * losses[True], rtol=1e-6)


def test_uniform_settings_reproduce_trades_with_step_2_over_255(tiny_model, digits_batch, digits):
    """lambda1 = 1 and t = 0 give eps_k = eps: without CCR and normalisation, CFA is TRADES (alpha 2/255)."""
    x, y, idx = digits_batch
    method, ctx = _method(digits, averaging="off", steps=3, lambda1=1.0, ccr=False,
                          normalised_trades=False, begin=1)
    method.t = torch.zeros(10)
    model = copy.deepcopy(tiny_model)
    method.on_epoch_start(2, model, ctx)
    ctx.generator.manual_seed(9)
    ours = method.training_loss(model, Batch(x, y, idx), ctx).loss
    assert torch.allclose(ours, trades_reference(tiny_model, Batch(x, y, idx), seed=9, steps=3), rtol=1e-5)


def test_fawa_copy_decay_fallback_and_resume(tiny_model, digits_batch, digits):
    x, y, idx = digits_batch
    method, ctx = _method(digits, threshold=1.01, steps=1)
    method.on_epoch_start(1, tiny_model, ctx)
    method.on_epoch_end(1, tiny_model, ctx)
    assert not method.averager.average.started and 0 <= method.averager.last_score <= 1
    with pytest.warns(UserWarning, match="FAWA never started"):
        assert method.eval_model(tiny_model) is tiny_model

    method, ctx = _method(digits, threshold=0.0, steps=1)
    method.on_epoch_start(1, tiny_model, ctx)
    method.on_epoch_end(1, tiny_model, ctx)  # accepted: FAWA becomes a bit-identical copy
    first = copy.deepcopy(method.averager.average.weights)
    assert all(torch.equal(first[k], v) for k, v in tiny_model.state_dict().items())
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    method.on_epoch_start(2, tiny_model, ctx)
    loss = method.training_loss(tiny_model, Batch(x, y, idx), ctx).loss
    opt.zero_grad(), loss.backward(), opt.step()
    method.on_epoch_end(2, tiny_model, ctx)
    w = tiny_model.state_dict()["fc.weight"]
    assert torch.equal(method.averager.average.weights["fc.weight"], first["fc.weight"] * 0.88 + w * (1 - 0.88))
    fawa = method.eval_model(tiny_model)
    assert fawa is not tiny_model
    assert torch.equal(fawa.state_dict()["fc.weight"], method.averager.average.weights["fc.weight"])

    buffer = io.BytesIO()  # the checkpoint path: torch.save, then a weights-only load
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = _method(digits, threshold=0.0, steps=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.t, method.t) and torch.equal(fresh.b, method.b)
    with torch.no_grad():
        assert torch.equal(fresh.eval_model(tiny_model).eval()(x), fawa.eval()(x))


def test_tally_counts_false_positives():
    tally = RobustTally(3, torch.device("cpu"))
    y, pred = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 2, 2, 1])
    tally.record(F.one_hot(pred, 3).float(), y)
    share, any_error = tally.false_positive_share()
    assert torch.allclose(share, torch.tensor([0.0, 1 / 3, 2 / 3])) and bool(any_error)


def test_official_protocol_and_defaults():
    cfg = CfaConfig()
    assert (cfg.lambda1, cfg.lambda2, cfg.begin, cfg.decay, cfg.threshold) == (0.5, 0.5, 10, 0.88, 0.24)
    assert (cfg.beta, cfg.eps, cfg.alpha, cfg.steps) == (6.0, EPS, 2 / 255, 10)
    assert cfg.normalised_trades and cfg.averaging == "fawa"
    assert Cfa.services.validation.fraction == 0.02 and Cfa.services.validation.position == "first"
    official = resolve(RunSpec(method="cfa", dataset="cifar10", protocol="official"))
    assert (official.arch, official.epochs, official.batch_size) == ("preact_resnet18", 200, 128)
    assert official.optim == {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
                              "schedule": "madry"}


def test_tiny_run_evaluates_the_fawa_model(tmp_path):
    spec = RunSpec(method="cfa", dataset="digits", epochs=3, train_per_class=40, eval_per_class=10, eval_last=2,
                   attacks=("clean",),
                   overrides={"steps": "2", "begin": "2", "threshold": "0.0"})
    outcome = run_one(spec, tmp_path / "a")
    assert outcome.status == "done" and (outcome.folder / "classwise.parquet").is_file()
    assert set(pd.read_parquet(outcome.folder / "classwise.parquet")["epoch"]) == {2, 3}
    _killed_and_resumed_run_matches(spec, tmp_path, outcome.folder)

    state = torch.load(list_checkpoints(outcome.folder / "checkpoints")[3], weights_only=True)
    assert state["method"]["averaging"]["updates"] == 3  # threshold 0: every epoch absorbed
    assert not torch.equal(state["method"]["eps"], torch.full((10,), EPS))  # epoch 3 > begin: calibrated radius
    raw = create_model("smallcnn", 10, (1, 8, 8))
    raw.load_state_dict(state["model"])
    average = WeightAverage(0.88)
    average.load_state_dict(state["method"]["averaging"])
    fawa = average.averaged_model(raw)
    samples = pd.read_parquet(outcome.folder / "samples.parquet")
    clean = samples[(samples.suite == "clean") & (samples.epoch == 3)].set_index("sample_idx")
    test = load_dataset("digits").test  # the evaluated subset: the first 10 test samples of each class
    index = torch.as_tensor(stratified_subset(test.labels, 10, 10))
    split = DeviceSplit.from_arrays(test, torch.device("cpu")).subset(index)
    got = {name: _margins(model, split) for name, model in (("fawa", fawa), ("raw", raw))}
    recorded = clean.loc[got["fawa"].index, "margin"].to_numpy()
    assert np.allclose(recorded, got["fawa"].to_numpy(), atol=1e-5)
    assert not np.allclose(recorded, got["raw"].to_numpy(), atol=1e-3)


class _Interrupt(KeyboardInterrupt):
    pass


def _killed_and_resumed_run_matches(spec: RunSpec, tmp_path, reference) -> None:
    """FAWA weights are checkpointed: a run killed in epoch 3 and resumed ends with the same average and rows."""
    def kill(epoch: int, batch: int) -> None:
        if epoch == 3 and batch == 1:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        run_one(spec, tmp_path / "b", after_batch=kill)
    resumed = run_one(spec, tmp_path / "b", resume=True).folder
    a, b = (torch.load(list_checkpoints(f / "checkpoints")[3], weights_only=True)["method"]["averaging"]
            for f in (reference, resumed))
    assert a["updates"] == b["updates"] and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    pd.testing.assert_frame_equal(pd.read_parquet(reference / "classwise.parquet"),
                                  pd.read_parquet(resumed / "classwise.parquet"))


def _margins(model, split) -> pd.Series:
    model.eval()
    parts, ids = [], []
    with torch.no_grad():
        for xb, yb, ib in eval_batches(split, 256):
            parts.append(margins(model(xb).float(), yb))
            ids.append(ib)
    return pd.Series(torch.cat(parts).numpy(), index=torch.cat(ids).numpy())
