"""Every registered method through the command line, as a user runs it: `fairbench run` trains it for two epochs on
digits, evaluates the last checkpoint, and writes per-class rows that carry the method."""
from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from fairbench.registry import get_method_class, list_methods
from tests.conftest import run_cli

EPOCHS, EVAL_PER_CLASS, CLASSES = 2, 3, 10


def _tiny_args(name: str) -> list[str]:
    """The smallest run that still passes through every hook of the method: one attack step, per-class state
    switched on in the second epoch, FAWA fed by a validation split, FRL's TRADES hot start of one epoch."""
    cls = get_method_class(name)
    fields = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    sets = {"steps": 1, "warmup": 1, "begin": 1}
    args = ["--train-per-class", "10"]
    if fields.get("averaging") == "fawa":  # 2% of 30 per class: one validation image each
        sets["threshold"] = 0
        args = ["--train-per-class", "30"]
    if cls.hot_start:
        args += ["--hot-start-epochs", "1"]
    for key, value in sets.items():
        if key in fields:
            args += ["--set", f"{key}={value}"]
    return args


@pytest.mark.parametrize("name", list_methods())
def test_method_trains_evaluates_and_writes_its_rows(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "results"
    code, _, err = run_cli(["run", "--methods", name, "--dataset", "digits", "--epochs", str(EPOCHS),
                            "--eval-per-class", str(EVAL_PER_CLASS), "--eval-last", "1", "--threads", "1",
                            *_tiny_args(name), "--out", str(out)], capsys)
    assert code == 0, err
    tables = {path.parent: pd.read_parquet(path) for path in out.glob("runs/*/classwise.parquet")}
    own = [folder for folder, table in tables.items() if (table["method"] == name).any()]
    assert len(own) == 1, f"{name}: per-class tables {sorted(p.name for p in tables)}"
    rows = tables[own[0]]
    assert set(rows["method"]) == {name} and set(rows["dataset"]) == {"digits"}
    assert set(rows["epoch"]) == {EPOCHS} and set(rows["attack"]) == {"clean", "pgd20"}
    assert len(rows) == 2 * CLASSES and rows["n"].sum() == 2 * CLASSES * EVAL_PER_CLASS
    assert (rows["correct"] <= rows["n"]).all()
    meta = json.loads((own[0] / "run.json").read_text())
    assert meta["run_id"] == own[0].name and meta["spec"]["method"] == name
    if get_method_class(name).hot_start:  # FRL: its TRADES base trained first, and recorded as the start
        base = [f for f in tables if f != own[0]]
        assert len(base) == 1 and set(tables[base[0]]["method"]) == {"trades"}
        assert meta["config"]["init_from"].startswith(base[0].name + "/")
