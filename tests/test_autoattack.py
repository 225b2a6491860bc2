"""AutoAttack as a suite: cascade invariants, known answers on a linear model, the CLI on a digits run."""
from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import torch
import torch.nn as nn

from fairbench.attacks.a3 import A3
from fairbench.attacks.apgd import APGD
from fairbench.attacks.autoattack import AutoAttack
from fairbench.attacks.pgd import PGD
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from fairbench.evaluation import evaluate_split
from fairbench.records import per_class_counts, robust_flags
from tests.attack_fixtures import trained_digits_model

EPS = 0.1


@pytest.fixture(scope="module")
def records():
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(40))
    aa = AutoAttack(EPS)
    return model, split, evaluate_split(model, split, ["pgd20", aa], EPS, batch_size=40, seed=2)


def test_cascade_prefixes_never_increase_and_robust_is_at_most_clean(records):
    _, _, samples = records
    aa = samples[samples.suite == "autoattack"]
    assert list(aa.component.unique()) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    clean_ok = ~samples[samples.suite == "clean"].set_index("sample_idx").success
    standing = clean_ok.copy()
    prefix = [int(standing.sum())]
    for comp in ["apgd-ce", "apgd-t", "fab-t", "square"]:
        rows = aa[aa.component == comp].set_index("sample_idx")
        assert (rows.attempted == standing.loc[rows.index]).all()  # each component attacks only the survivors
        standing &= ~rows.success
        prefix.append(int(standing.sum()))
    assert prefix == sorted(prefix, reverse=True) and prefix[1] < prefix[0]
    counts = per_class_counts(samples, 10)
    clean = counts[counts.attack == "clean"].set_index("class_id").correct
    robust = counts[counts.attack == "autoattack"].set_index("class_id").correct
    assert (robust <= clean).all() and robust.sum() == prefix[-1]
    linf = aa[aa.success].linf
    assert (linf <= EPS + 1e-7).all() and (linf > 0.5 * EPS).any()


def test_aa_is_at_least_as_strong_as_pgd20(records):
    _, _, samples = records
    flags = robust_flags(samples).pivot(index="sample_idx", columns="suite", values="correct")
    assert flags["autoattack"].sum() <= flags["pgd20"].sum()


def test_same_flags_with_another_batch_size(records):
    model, split, samples = records
    other = evaluate_split(model, split, [AutoAttack(EPS)], EPS, batch_size=13, seed=2)
    a = robust_flags(samples[samples.suite != "pgd20"]).sort_values(["suite", "sample_idx"]).reset_index(drop=True)
    b = robust_flags(other).sort_values(["suite", "sample_idx"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_eps_zero_gives_clean_accuracy():
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(30))
    samples = evaluate_split(model, split, ["apgd-ce", "square"], 0.0, batch_size=30, seed=0)
    counts = per_class_counts(samples, 10).groupby("attack").correct.sum()
    assert counts["apgd-ce"] == counts["clean"] == counts["square"]


def linear_problem(c: int, n: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, c))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(c, 16, generator=gen))
        model[1].bias.copy_(torch.randn(c, generator=gen) * 0.1)
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=gen)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)  # every sample clean-correct
    w = model[1].weight
    gaps = (z.gather(1, y[:, None]) - z)  # z_y - z_j
    norms = (w[y][:, None, :] - w[None]).abs().sum(2)  # ||w_y - w_j||_1
    radius = torch.where(torch.arange(c)[None] == y[:, None], torch.inf, gaps / norms).amin(1)
    return model.eval(), x, y, radius


@pytest.mark.parametrize("make", [lambda eps: APGD(eps, "ce", steps=100),
                                  lambda eps: PGD(eps, steps=20, alpha=eps / 8),
                                  lambda eps: A3(eps)])
def test_known_answers_on_a_two_class_linear_model(make):
    """With two classes the sign of the CE gradient is the optimal L-inf direction and the box never binds,
    so exactly the samples with radius < eps can be broken (docs/evaluation.md §15)."""
    model, x, y, radius = linear_problem(2)
    for p in model.parameters():
        p.requires_grad_(False)
    eps = float(radius.median())
    out = next(make(eps).run(model, x, y, torch.arange(len(y)), 0, torch.ones(len(y), dtype=torch.bool)))
    broken = model(out.x_adv).argmax(1) != y
    assert not broken[radius > eps * (1 + 1e-6)].any()  # soundness
    assert broken[radius < 0.9 * eps].all() and (radius < 0.9 * eps).sum() > 20  # completeness


@pytest.mark.slow
def test_fairbench_eval_aa_on_a_digits_run(tmp_path):
    out = tmp_path / "results"
    subprocess.run(["fairbench", "run", "-m", "trades", "--epochs", "2", "--train-per-class", "30",
                    "--eval-per-class", "10", "--set", "steps=2", "--eval-last", "1", "--out", str(out), "-q"],
                   check=True, capture_output=True)
    ev = subprocess.run(["fairbench", "eval", str(out), "--attack", "aa", "--checkpoints", "final",
                         "--n-examples", "20", "-q"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    table = subprocess.run(["fairbench", "table", "--results", str(out), "--format", "csv"],
                           capture_output=True, text=True, check=True).stdout
    assert "aa" in set(pd.read_csv(__import__("io").StringIO(table)).attack)
