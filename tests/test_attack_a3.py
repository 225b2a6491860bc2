"""A3 (experimental): its schedule pieces, OSD's choice, and its behaviour on a real model."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from fairbench.attacks.a3 import A3, BIAS, DISCARD, OPENING, cosine_step, n_targets, osd_select
from fairbench.attacks.registry import DESCRIPTIONS, create_attack
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from fairbench.evaluation import evaluate_split
from fairbench.records import per_class_counts, robust_flags
from fairbench.spec import RunSpec
from tests.attack_fixtures import trained_digits_model


def test_cosine_step_runs_from_eps_to_its_floor():
    eps = 8 / 255
    assert cosine_step(0, 15, eps) == pytest.approx(eps)
    assert cosine_step(16, 15, eps) == pytest.approx(0.001 * eps)  # long phase: floor 0.001 eps
    assert cosine_step(9, 8, eps) == pytest.approx(0.1 * eps)  # short phase (<= 10 steps): floor 0.1 eps
    steps = [cosine_step(s, 15, eps) for s in range(16)]
    assert steps == sorted(steps, reverse=True)


def test_schedule_and_target_counts():
    assert len(OPENING) + len(DISCARD) == len(OPENING) + len(BIAS) == 13
    assert [r.restarts for r in DISCARD][-3:] == [4, 4, 50] and DISCARD[-1].alpha == 0.03
    assert [r.k_pgd for r in BIAS][:2] == [15, 20]  # max_iter + K_adi
    assert (n_targets(10, False), n_targets(10, True), n_targets(100, False), n_targets(200, True)) == (9, 4, 14, 20)
    assert n_targets(3, False) == 2


def test_osd_attacks_the_live_samples_with_the_largest_loss():
    loss = torch.tensor([0.5, -1.0, 2.0, 0.1, 3.0, 2.0, -5.0])
    live = torch.tensor([True, True, True, True, False, True, True])
    assert osd_select(live, loss, 0.5, 1).tolist() == [0, 2, 5]  # returned in index order
    assert osd_select(live, loss, 0.1, 2).tolist() == [2, 5]  # at least min_attacked
    assert osd_select(live, loss, 0.03, 100).tolist() == [0, 1, 2, 3, 5, 6]  # fewer live than the minimum


def test_a3_on_a_trained_model_is_experimental_reproducible_and_stronger_than_pgd20():
    assert "EXPERIMENTAL" in DESCRIPTIONS["a3"] and "a3" not in RunSpec(method="trades", dataset="digits").attacks
    assert create_attack("a3", 0.1).settings()["experimental"] is True
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(24))
    a3 = A3(0.08, min_attacked=4)  # the official 100 would attack every sample of this small chunk
    first = evaluate_split(model, split, [a3, "pgd20"], 0.08, 24, seed=3)
    again = evaluate_split(model, split, [a3], 0.08, 24, seed=3)
    pd.testing.assert_frame_equal(first[first.suite != "pgd20"].reset_index(drop=True), again)
    flags = robust_flags(first).groupby("suite").correct.sum()
    assert flags["a3"] <= flags["pgd20"] < flags["clean"]
    won = first[(first.suite == "a3") & first.success]
    assert len(won) and (won.linf <= 0.08 + 1e-6).all()


def test_aa_and_a3_records_give_the_union_suite():
    """'aa+a3' is robust only where both suites left the sample standing (here PGD-20's records play 'aa')."""
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(30))
    samples = evaluate_split(model, split, [A3(0.08, min_attacked=4), "apgd-ce"], 0.08, 30, seed=1)
    samples["suite"] = samples["suite"].replace({"apgd-ce": "aa"})
    flags = robust_flags(samples).pivot(index="sample_idx", columns="suite", values="correct")
    assert "aa+a3" in flags and flags["aa"].sum() > 0
    assert (flags["aa+a3"] == (flags["aa"] & flags["a3"])).all()
    counts = per_class_counts(samples, 10).groupby("attack").correct.sum()
    assert counts["aa+a3"] == int((flags["aa"] & flags["a3"]).sum()) <= min(counts["aa"], counts["a3"])
