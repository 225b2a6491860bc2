"""Bad input through the command line: a message that says what to do, a non-zero exit, no traceback, and
nothing written before left changed. Each case is a real CLI call in this process."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

TINY = ["--methods", "trades", "--epochs", "2", "--train-per-class", "20", "--eval-per-class", "5", "--eval-last", "1"]

RUN_CASES = [
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--set", "eps=-1"], "eps is a radius, step, weight or count and must be >= 0"),
    (["--set", "steps=-2"], "steps is a radius, step, weight or count and must be >= 0"),
    (["--eps", "-1"], "--eps must be >= 0"),
    (["--train-per-class", "0"], "--train-per-class must be >= 1"),
    (["--train-per-class", "-3"], "--train-per-class must be >= 1"),
    (["--eval-per-class", "0"], "--eval-per-class must be >= 1"),
    (["--eval-last", "0"], "--eval-last must be >= 1"),
    (["--eval-last", "-2"], "--eval-last must be >= 1"),
    (["--seeds", "0,-3"], "seeds are integers >= 0"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--methods", "frl", "--hot-start-epochs", "0"], "--hot-start-epochs must be >= 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
]

TOML_CASES = [
    ('epochs = "abc"', "grid key epochs expects an integer, got 'abc'"),
    ("epochs = 2.5", "grid key epochs expects an integer, got 2.5"),
    ('train_per_class = "ten"', "grid key train_per_class expects an integer"),
    ('lr = "fast"', "grid key lr expects a number"),
    ('eval_last = "all"', "grid key eval_last expects an integer"),
    ('seeds = ["x"]', "grid key seeds expects a list of integers >= 0"),
    ("seeds = [1.5]", "grid key seeds expects a list of integers >= 0"),
    ("seeds = [-1]", "grid key seeds expects a list of integers >= 0"),
    ("seeds = []", "the grid holds no runs"),
    ("epochs = 0", "--epochs must be >= 1"),
]


def assert_refused(code: int, err: str, expected: str) -> None:
    text = " ".join(err.split())
    assert code != 0, text
    assert "Traceback" not in err and expected in text, text


@pytest.mark.parametrize("extra, expected", RUN_CASES, ids=[" ".join(c[0]) for c in RUN_CASES])
def test_bad_run_options_are_refused_before_anything_is_written(tmp_path, capsys, extra, expected):
    args = dict(zip(TINY[::2], TINY[1::2]))
    args.update(dict(zip(extra[::2], extra[1::2])) if extra[0] != "--set" else {})
    argv = [w for kv in args.items() for w in kv] + (extra if extra[0] == "--set" else [])
    code, _, err = run_cli(["run", *argv, "--out", str(tmp_path / "out")], capsys)
    assert_refused(code, err, expected)
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("line, expected", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_bad_grid_values_are_refused(tmp_path, capsys, line, expected):
    config = tmp_path / "grid.toml"
    config.write_text(f'[grid]\nmethods = ["trades"]\ndatasets = ["digits"]\n{line}\n')
    code, _, err = run_cli(["run", "--config", str(config), "--out", str(tmp_path / "out")], capsys)
    assert_refused(code, err, expected)
    assert not (tmp_path / "out" / "runs").exists()


def test_a_string_where_a_list_belongs_is_refused(tmp_path, capsys):
    config = tmp_path / "grid.toml"
    config.write_text('[grid]\nmethods = "trades"\ndatasets = ["digits"]\n')
    code, _, err = run_cli(["plan", "--config", str(config)], capsys)
    assert_refused(code, err, "grid key methods expects a list of names, like [\"trades\"], got 'trades'")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from fairbench.runner import run_one
    from fairbench.spec import RunSpec

    out = tmp_path_factory.mktemp("finished")
    outcome = run_one(RunSpec(method="trades", dataset="digits", epochs=2, train_per_class=20, eval_per_class=5,
                              eval_last=1), out)
    return outcome.folder


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "failed.json"}


@pytest.mark.parametrize("extra, expected", [
    (["--n-examples", "0"], "--n-examples must be at least 1"),
    (["--n-examples", "-5"], "--n-examples must be at least 1"),
    (["--eps", "-1"], "--eps must be >= 0"),
    (["--checkpoints", "last0"], "--checkpoints expects last5, final, all or epochs"),
    (["--checkpoints", "7"], "no checkpoint for epoch(s) [7]"),
])
def test_bad_eval_options_are_refused(finished_run, capsys, extra, expected):
    before = fingerprint(finished_run)
    code, _, err = run_cli(["eval", str(finished_run), "--attack", "pgd20", *extra], capsys)
    assert_refused(code, err, expected)
    assert fingerprint(finished_run) == before


@pytest.mark.parametrize("name", ["epoch_abc.pt", "model.pt", "epoch_0002.pt"])
def test_eval_of_a_checkpoint_outside_a_run_says_what_eval_takes(finished_run, tmp_path, capsys, name):
    stray = tmp_path / name
    shutil.copy(finished_run / "checkpoints" / "epoch_0002.pt", stray)
    code, _, err = run_cli(["eval", str(stray), "--attack", "pgd20"], capsys)
    assert_refused(code, err, "takes a run folder, a results folder or a checkpoint RUN/checkpoints/epoch_NNNN.pt")
    assert not (tmp_path / "run.lock").exists() and not (tmp_path.parent / "run.lock").exists()


@pytest.mark.parametrize("content, expected", [
    ('{"run_id": "x", "spe', "not readable JSON"),
    ("", "not readable JSON"),
    ("null", "no run_id or run spec in it"),
    ("[1, 2]", "no run_id or run spec in it"),
    ('{"run_id": "x"}', "no run_id or run spec in it"),
    ('{"run_id": "x", "spec": {"method": "trades", "dataset": "digits", "colour": "red"}}', "its run spec does not fit"),
], ids=["truncated", "empty", "null", "list", "no spec", "unknown key"])
def test_damaged_run_json_is_named_in_eval(finished_run, tmp_path, capsys, content, expected):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    (copy / "run.json").write_text(content)
    before = fingerprint(copy)
    code, _, err = run_cli(["eval", str(copy), "--attack", "pgd20"], capsys)
    assert_refused(code, err, f"{copy / 'run.json'} is damaged ({expected}")
    assert fingerprint(copy) == before


def test_result_files_are_readable_by_the_group_and_others(finished_run):
    for name in ("classwise.parquet", "samples.parquet", "run.json", "checkpoints/epoch_0002.pt"):
        assert (finished_run / name).stat().st_mode & 0o044 == 0o044, name


def test_rerun_of_an_evaluation_keeps_one_entry(finished_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    for _ in range(2):
        assert run_cli(["eval", str(copy), "--attack", "cw20", "--checkpoints", "final", "--n-examples", "20"],
                       capsys)[0] == 0
    entries = json.loads((copy / "run.json").read_text())["evaluations"]
    assert [e["attacks"] for e in entries] == [["cw20"]]
