"""Evaluating finished runs: resumable chunks, new suites merged into the results, checkpoint choice."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from fairbench.errors import FairbenchError
from fairbench.evalrun import evaluate_resumable, evaluate_run, select_epochs
from fairbench.records import robust_flags, union_of_suites
from fairbench.results import run_dir
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve
from fairbench.tables import load_results
from tests.attack_fixtures import trained_digits_model


def test_interrupted_evaluation_resumes_without_redoing_chunks(tmp_path):
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(60))
    full = evaluate_resumable(model, split, ["apgd-ce"], 8 / 255, 16, 0, tmp_path / "a")
    part = tmp_path / "b"
    evaluate_resumable(model, split, ["apgd-ce"], 8 / 255, 16, 0, part)
    chunks = sorted(part.iterdir())
    assert len(chunks) == 4
    chunks[-1].unlink(), chunks[1].unlink()  # as if killed before these chunks were written
    kept = {p: os.stat(p).st_mtime_ns for p in (chunks[0], chunks[2])}
    resumed = evaluate_resumable(model, split, ["apgd-ce"], 8 / 255, 16, 0, part)
    pd.testing.assert_frame_equal(full, resumed)
    assert all(os.stat(p).st_mtime_ns == t for p, t in kept.items())  # finished chunks were not redone


def test_eval_adds_a_suite_to_a_finished_run(tmp_path):
    spec = RunSpec(method="trades", dataset="digits", epochs=3, batch_size=64, train_per_class=40,
                   eval_per_class=10, eval_last=2, overrides={"steps": "2"})
    run_one(spec, tmp_path)
    folder = run_dir(tmp_path, resolve(spec).run_id)
    before = pd.read_parquet(folder / "classwise.parquet")
    evaluate_run(folder, ["apgd-ce"], checkpoints="final", per_class=5)
    after = pd.read_parquet(folder / "classwise.parquet")
    new = after[after.attack == "apgd-ce"]
    assert set(new.epoch) == {3} and new.n.sum() == 50
    old = after[after.attack != "apgd-ce"].sort_values(["epoch", "attack", "class_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(old, before.sort_values(["epoch", "attack", "class_id"]).reset_index(drop=True),
                                  check_like=True)  # the clean and pgd20 counts are unchanged
    samples = pd.read_parquet(folder / "samples.parquet")
    assert set(samples.suite) == {"clean", "pgd20", "apgd-ce"}
    # `fairbench table --union`: robust under both suites, on the 50 samples both attacked at epoch 3
    assert "apgd-ce+pgd20" not in set(load_results(tmp_path).attack)
    union = load_results(tmp_path, union=True).query("attack == 'apgd-ce+pgd20'")
    last = samples[samples.epoch == 3]
    clean_ok = set(last[(last.suite == "clean") & ~last.success].sample_idx)
    broken = last[last.suite != "clean"].groupby(["sample_idx", "suite"]).success.any().unstack().dropna()
    assert set(union.epoch) == {3} and union.n.sum() == len(broken) == 50
    assert 0 < union.correct.sum() < 50
    assert union.correct.sum() == sum(i in clean_ok and not row.any() for i, row in broken.iterrows())
    assert (union.set_index("class_id").correct <= new.set_index("class_id").correct).all()
    flags = robust_flags(last)  # the name and the flags do not depend on the order the suites were run in
    forward, backward = union_of_suites(flags), union_of_suites(flags.iloc[::-1])
    pd.testing.assert_frame_equal(forward, backward.sort_values("sample_idx").reset_index(drop=True))
    assert not (folder / "partial_eval").exists()
    evaluate_run(folder, ["apgd-ce"], checkpoints="final", per_class=5)  # again: replaced, not duplicated
    assert len(pd.read_parquet(folder / "classwise.parquet")) == len(after)


def test_select_epochs():
    assert select_epochs([1, 2, 3, 4, 5, 6], "last5") == [2, 3, 4, 5, 6]
    assert select_epochs([1, 2, 3], "final") == [3]
    assert select_epochs([1, 2, 3], "1,3") == [1, 3]
    with pytest.raises(FairbenchError, match="available"):
        select_epochs([1, 2, 3], "7")


def test_another_radius_never_relabels_existing_rows(tmp_path):
    spec = RunSpec(method="trades", dataset="digits", epochs=2, batch_size=64, train_per_class=20,
                   eval_per_class=5, eval_last=2, overrides={"steps": "1"})
    run_one(spec, tmp_path)
    folder = run_dir(tmp_path, resolve(spec).run_id)
    evaluate_run(folder, ["pgd20"], checkpoints="final", eps=16 / 255)
    table = pd.read_parquet(folder / "classwise.parquet")
    assert set(table.loc[table.attack == "pgd20", "eps"]) == {8 / 255}
    assert set(table.loc[table.attack == "pgd20@16/255", "eps"]) == {16 / 255}
    assert sorted(table.loc[table.attack == "pgd20", "epoch"].unique()) == [1, 2]
