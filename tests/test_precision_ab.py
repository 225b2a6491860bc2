"""The bf16 A/B check (docs/evaluation.md §12): its verdict on real records, the command, and the table's
warning about bf16 suites that were never checked."""
from __future__ import annotations

import json

import torch

from fairbench.attacks.search import SearchSettings
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from fairbench.evaluation import evaluate_split
from fairbench.precision_ab import MAX_OVERALL_POINTS, compare, unchecked_bf16
from fairbench.results import run_dir
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve
from tests.attack_fixtures import trained_digits_model
from tests.conftest import run_cli


def test_verdict_on_real_records_and_on_a_class_the_search_breaks():
    model = trained_digits_model()
    split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(80))
    fp32 = evaluate_split(model, split, ["pgd20"], 0.05, 80, seed=0)
    bf16 = evaluate_split(model, split, ["pgd20"], 0.05, 80, seed=0, search=SearchSettings(precision="bf16"))
    ab = compare(fp32, bf16, "pgd20", 10, epoch=1)
    assert ab.n == 80 and 0 < ab.fp32 < 100 and len(ab.classes) == 10
    assert ab.passed == (abs(ab.diff) <= MAX_OVERALL_POINTS and not ab.failures())
    # a search that breaks every sample of class 3 is out of bounds for that class and overall
    broken = fp32.copy()
    label = broken.set_index("sample_idx").query("suite == 'clean'")["label"]
    three = broken["sample_idx"].map(label).eq(3) & broken["suite"].eq("pgd20")
    broken.loc[three, "success"] = True
    bad = compare(fp32, broken, "pgd20", 10, epoch=1)
    robust_three = next(c for c in ab.classes if c["class_id"] == 3)["fp32"]
    assert robust_three > 0 and not bad.passed
    assert any(f.startswith("class 3 ") for f in bad.failures()) and "FAILED" in bad.summary()
    assert not any(f.startswith("class 4 ") for f in bad.failures())


def test_ab_check_command_records_its_result_and_silences_the_table_warning(tmp_path, capsys):
    spec = RunSpec(method="trades", dataset="digits", epochs=2, batch_size=64, train_per_class=30,
                   eval_per_class=5, eval_last=1, overrides={"steps": "2"})
    run_one(spec, tmp_path)
    folder = run_dir(tmp_path, resolve(spec).run_id)
    assert unchecked_bf16(tmp_path) == []  # fp32 only so far
    code, _, err = run_cli(["eval", str(folder), "--attack", "apgd-ce", "--checkpoints", "final",
                            "--n-examples", "30", "--attack-precision", "bf16", "-q"], capsys)
    assert code == 0, err
    warned = unchecked_bf16(tmp_path)
    assert len(warned) == 1 and "apgd-ce was searched in bf16" in warned[0]
    code, out, err = run_cli(["ab-check", str(folder), "--attack", "apgd-ce", "--n-examples", "40"], capsys)
    record = json.loads((folder / "run.json").read_text())["precision_ab"][-1]
    assert record["suite"] == "apgd-ce" and record["n"] == 40 and len(record["classes"]) == 10
    assert code == (0 if record["passed"] else 1) and "apgd-ce at epoch 2 on 40 samples" in out
    assert (unchecked_bf16(tmp_path) == []) == record["passed"]
    assert not (folder / "partial_eval").exists()
