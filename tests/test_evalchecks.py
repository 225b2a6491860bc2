"""The automatic checks of an evaluation (docs/evaluation.md §11): each flag is raised by a model that has
the property and not by an ordinary one; an attack that touches the model stops the evaluation."""
from __future__ import annotations

import copy
import dataclasses
import json

import pandas as pd
import pytest
import torch
import torch.nn as nn

from fairbench.attacks.apgd import APGD
from fairbench.attacks.autoattack import AutoAttack
from fairbench.attacks.registry import ComponentOutput, EvalAttack
from fairbench.attacks.square import Square
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from fairbench.evalchecks import (
    ModelStateChangedError,
    epoch_checks,
    model_flags,
    robust_accuracy,
    suite_flags,
    warnings_for,
)
from fairbench.evaluation import evaluate_split
from fairbench.results import run_dir, write_json
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve
from tests.attack_fixtures import digits_test, trained_digits_model
from tests.conftest import run_cli


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner


class Noisy(Wrapped):
    def forward(self, x):
        return self.inner(x) + torch.randn(len(x), 10)


class Softmax(Wrapped):
    def forward(self, x):
        return self.inner(x).softmax(1)


class Purifying(Wrapped):
    """A 'dynamic' defence: one gradient step on the input inside the forward."""

    def forward(self, x):
        with torch.enable_grad():
            u = x.detach().requires_grad_(True)
            g, = torch.autograd.grad(self.inner(u).logsumexp(1).sum(), u)
        return self.inner(x - 0.01 * g.sign())


class BatchNormalised(Wrapped):
    """Normalises with the batch's own statistics (as BatchNorm in train mode does)."""

    def forward(self, x):
        return self.inner((x - x.mean(0, keepdim=True)) / (x.std(0, correction=0, keepdim=True) + 1e-3) * 0.3 + 0.3)


class Thresholded(Wrapped):
    """Shattered gradients: the input is binarised, so its gradient is zero everywhere."""

    def forward(self, x):
        return self.inner((x > 0.5).float())


def digits_split(n: int) -> DeviceSplit:
    return DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(n))


def test_an_ordinary_model_raises_no_model_flag():
    x, y = digits_test(40)
    flags = model_flags(trained_digits_model(), x, y)
    assert flags == {"randomised": False, "probabilities": False, "dynamic": False, "batch_dependent": False,
                     "zero_gradient_samples": 0}
    assert warnings_for(flags, {}) == []


@pytest.mark.parametrize("wrapper, flag", [(Noisy, "randomised"), (Softmax, "probabilities"),
                                           (Purifying, "dynamic"), (BatchNormalised, "batch_dependent")])
def test_each_model_flag_is_raised_by_a_model_with_the_property(wrapper, flag):
    x, y = digits_test(40)
    flags = model_flags(wrapper(trained_digits_model()), x, y)
    assert flags[flag] is True
    assert [k for k, v in flags.items() if v is True] == [flag]
    assert len(warnings_for(flags, {})) == 1


def test_zero_gradients_are_counted_and_gradient_masking_shows_in_the_records():
    """A binarised input: APGD's gradients vanish, black-box Square still breaks samples after it."""
    model = Thresholded(trained_digits_model())
    x, y = digits_test(60)
    flags = model_flags(model, x, y)
    correct = int((model(x).argmax(1) == y).sum())
    assert flags["zero_gradient_samples"] == correct > 30

    @dataclasses.dataclass
    class WhiteThenBlackBox(AutoAttack):
        def components(self):
            return [APGD(self.eps, "ce", steps=10, component="apgd-ce"), Square(self.eps, n_queries=300)]

    cascade = WhiteThenBlackBox(0.3)
    cascade.name = "aa"
    samples = evaluate_split(model, digits_split(60), [cascade], 0.3, 60, seed=0, search=None)
    suites = suite_flags(samples, {"aa": 0.3})
    prefix = suites["aa"]["prefix_robust"]
    assert list(prefix) == ["apgd-ce", "square"] and suites["aa"]["square_drop"] > 0.002
    assert suites["aa"]["square_drop"] == pytest.approx(prefix["apgd-ce"] - prefix["square"])
    lines = warnings_for(flags, suites)
    assert any("all-zero input gradient" in line for line in lines)
    assert any("Square lowered robust accuracy" in line for line in lines)


def test_record_flags_on_real_records():
    model = trained_digits_model()
    samples = evaluate_split(model, digits_split(60), ["pgd20", "apgd-ce"], 0.1, 60, seed=0)
    clean_acc = float((~samples[samples.suite == "clean"].success).mean())
    suites = suite_flags(samples, {"pgd20": 0.1, "apgd-ce": 0.1})
    apgd = suites["apgd-ce"]
    assert robust_accuracy(apgd) < clean_acc - 0.2  # this undefended model is broken at eps 0.1
    assert 0.05 < apgd["max_linf"] <= 0.1 + 1e-7
    assert apgd["linf_far_below_eps"] is False and "square_drop" not in apgd
    # told a radius 4x larger than the attack used, the record check suspects an eps-unit error
    wrong = suite_flags(samples, {"apgd-ce": 0.4})
    assert wrong["apgd-ce"]["linf_far_below_eps"] is True
    assert any("right units" in line for line in warnings_for({}, wrong))
    # AutoAttack weaker than PGD-20 is flagged (here: PGD-20's records posing as 'aa' against a perfect PGD)
    swapped = {"aa": suites["pgd20"], "pgd20": {"prefix_robust": {"pgd": 0.0}}}
    assert any("above PGD-20" in line for line in warnings_for({}, swapped))
    assert not any("above PGD-20" in line for line in warnings_for({}, {"aa": apgd, "pgd20": suites["pgd20"]}))


class TrainModeAttack(EvalAttack):
    """A broken attack: runs the model in train mode (BatchNorm statistics move), optionally switching back."""

    name = "broken"

    def __init__(self, eps: float, switch_back: bool):
        super().__init__(eps)
        self.switch_back = switch_back

    def run(self, model, x, y, sample_ids, seed, active):
        model.train()
        model(x + 0.01)
        if self.switch_back:
            model.eval()
        yield ComponentOutput("broken", x.clone())


@pytest.mark.parametrize("switch_back, message", [(False, "train mode"), (True, "buffers")])
def test_an_attack_that_changes_the_model_stops_the_evaluation(switch_back, message):
    model = copy.deepcopy(trained_digits_model())
    with pytest.raises(ModelStateChangedError, match=message):
        evaluate_split(model, digits_split(20), [TrainModeAttack(0.1, switch_back)], 0.1, 20, search=None)


def test_a_run_stores_its_checks_and_the_table_command_shows_raised_ones(tmp_path, capsys):
    spec = RunSpec(method="trades", dataset="digits", epochs=2, batch_size=64, train_per_class=30,
                   eval_per_class=5, eval_last=1, overrides={"steps": "2"})
    run_one(spec, tmp_path)
    folder = run_dir(tmp_path, resolve(spec).run_id)
    meta = json.loads((folder / "run.json").read_text())
    checks = meta["checks"]["2"]
    assert checks["model"]["randomised"] is False and checks["model"]["dynamic"] is False
    assert set(checks["suites"]) == {"pgd20"} and len(checks["suites"]["pgd20"]["prefix_robust"]) == 1
    assert isinstance(checks["warnings"], list)
    # a later evaluation whose model raised a flag (a softmax head): `fairbench table` reports it
    x, y = digits_test(30)
    raised = epoch_checks(pd.read_parquet(folder / "samples.parquet").query("epoch == 2"),
                          model_flags(Softmax(trained_digits_model()), x, y), {})
    meta.setdefault("evaluations", []).append({"attacks": ["pgd20"], "checks": {"2": raised}})
    write_json(folder / "run.json", meta)
    code, out, err = run_cli(["table", "--results", str(tmp_path), "--format", "md"], capsys)
    assert code == 0 and "trades" in out
    assert f"check: {meta['run_id']} epoch 2: the model outputs probabilities" in " ".join(err.split())
