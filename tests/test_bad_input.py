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


# ----------------------------------------------------------------------- damaged results in plot and table

def run_cli_warned(args: list[str], capsys) -> tuple[int, str, str]:
    """`run_cli` with the warnings it raised appended to stderr, as the console script prints them."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(args, capsys)
    return code, out, err + "".join(f"warning: {w.message}\n" for w in caught)


def damaged_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A results folder holding a copy of the finished run (the module's run stays intact)."""
    copy = tmp_path / "results" / "runs" / finished_run.name
    shutil.copytree(finished_run, copy)
    return copy


@pytest.mark.parametrize("content", ['{"run_id": "x", "spe', "", "null", "[1, 2]", '{"run_id": "x"}'],
                         ids=["truncated", "empty", "null", "list", "no spec"])
def test_plot_names_a_damaged_run_json(finished_run, tmp_path, capsys, content):
    run = damaged_copy(finished_run, tmp_path)
    (run / "run.json").write_text(content)
    before = fingerprint(run)
    code, _, err = run_cli_warned(["plot", "--results", str(tmp_path / "results"), "--kind", "classwise"], capsys)
    assert_refused(code, err, f"{run / 'run.json'} is damaged")
    assert "no finished runs under" in err and fingerprint(run) == before


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_truncated_per_sample_records_in_table_union_and_confusion_plot(finished_run, tmp_path, capsys):
    run = damaged_copy(finished_run, tmp_path)
    truncate(run / "samples.parquet")
    before = fingerprint(run)
    code, out, err = run_cli_warned(["table", "--results", str(tmp_path / "results"), "--union", "--format", "md"], capsys)
    assert code == 0 and "Traceback" not in err and "| trades |" in out  # the run's own rows stay
    assert f"per-sample records {run / 'samples.parquet'} cannot be read" in " ".join(err.split())
    code, _, err = run_cli_warned(["plot", "--results", str(tmp_path / "results"), "--kind", "confusion"], capsys)
    assert_refused(code, err, f"its per-sample records {run / 'samples.parquet'} cannot be read")
    assert fingerprint(run) == before


def test_truncated_per_class_table_in_table_and_plot(finished_run, tmp_path, capsys):
    run = damaged_copy(finished_run, tmp_path)
    truncate(run / "classwise.parquet")
    before = fingerprint(run)
    code, _, err = run_cli_warned(["table", "--results", str(tmp_path / "results"), "--union"], capsys)
    assert_refused(code, err, f"skipping unreadable results file {run / 'classwise.parquet'}")
    code, _, err = run_cli_warned(["plot", "--results", str(tmp_path / "results"), "--kind", "confusion"], capsys)
    assert_refused(code, err, f"its per-class table {run / 'classwise.parquet'} cannot be read")
    assert fingerprint(run) == before


def test_similarity_plot_with_an_unreadable_checkpoint(tmp_path, capsys):
    """run.json describes a large similarity matrix by shape only (CIFAR-100's 100 x 100), so the figure
    reads it from the last checkpoint; a damaged one is named, not a pickle traceback."""
    from fairbench.runner import run_one
    from fairbench.spec import RunSpec

    folder = run_one(RunSpec(method="dafa", dataset="digits", epochs=2, train_per_class=20, eval_per_class=5,
                             eval_last=1, overrides={"warmup": 1}), tmp_path / "results").folder
    meta = json.loads((folder / "run.json").read_text())
    assert "similarity" in meta["method_state"]
    meta["method_state"]["similarity"] = "tensor of shape (10, 10)"
    (folder / "run.json").write_text(json.dumps(meta))
    (folder / "checkpoints" / "epoch_0002.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli_warned(["plot", "--results", str(tmp_path / "results"), "--kind", "similarity"], capsys)
    assert_refused(code, err, f"{folder / 'checkpoints' / 'epoch_0002.pt'} cannot be read")


# ------------------------------------------------------------------------------ where results are written

def read_only(folder: Path) -> bool:
    """Make `folder` refuse new files, also for root (immutable attribute); False where that is impossible."""
    import os
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def test_read_only_out_is_refused_before_training(tmp_path, capsys):
    import subprocess

    out = tmp_path / "locked"
    if not read_only(out):
        pytest.skip("cannot make a folder read-only here (not root, no chattr)")
    try:
        code, _, err = run_cli(["run", *TINY, "--out", str(out / "x")], capsys)
        assert_refused(code, err, f"--out {out / 'x'}: cannot write in {out}")
        assert "Nothing was started" in err and not any(out.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
        out.chmod(0o755)


def test_full_disk_says_so_and_resume_continues(tmp_path):
    """A file-size limit (what a full disk looks like to a writer) stops the run with a message naming the
    file, the folder to free and --resume; the same command with --resume then finishes the run."""
    import resource
    import subprocess
    import sys

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # a checkpoint is ~0.8 MB

    argv = [sys.executable, "-m", "fairbench.cli", "run", *TINY, "--out", str(tmp_path / "out"), "--threads", "1",
            "-q"]
    full = subprocess.run(argv, preexec_fn=limited, capture_output=True, text=True, timeout=300)
    text = " ".join(full.stderr.split())
    assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr
    assert "the disk is full or a file-size limit was reached" in text and "--resume" in text, text
    assert not list((tmp_path / "out").rglob(".*.tmp"))  # no half-written file left
    again = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert list((tmp_path / "out" / "runs").glob("*/classwise.parquet"))


# ------------------------------------------------------------------------------- results from other data

def subset_npz(folder: Path, bump: int = 0) -> None:
    """A tiny dataset in the CIFAR-10 exact-subset format (10 classes x 6 train / 3 test images)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = folder / "cifar10-exact-subset" / "cifar10_exact_subset.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    train = rng.integers(0, 256, size=(60, 3072), dtype=np.uint8)
    train[0, 0] = (int(train[0, 0]) + bump) % 256
    np.savez(path, train_data=train, train_labels=np.repeat(np.arange(10), 6),
             test_data=rng.integers(0, 256, size=(30, 3072), dtype=np.uint8), test_labels=np.repeat(np.arange(10), 3),
             label_names=np.array([f"c{i}" for i in range(10)]))


def test_a_finished_run_is_not_skipped_on_other_data(tmp_path, capsys):
    good, broken = tmp_path / "good", tmp_path / "broken"
    subset_npz(good)
    subset_npz(broken, bump=1)  # one pixel differs
    grid = ["--methods", "trades", "--dataset", "cifar10-subset", "--arch", "smallcnn", "--epochs", "1",
            "--eval-per-class", "2", "--eval-last", "1", "--out", str(tmp_path / "out"), "-q"]
    assert run_cli(["run", *grid, "--data-dir", str(good)], capsys)[0] == 0
    (folder,) = (tmp_path / "out" / "runs").iterdir()
    recorded = json.loads((folder / "run.json").read_text())["data_fingerprint"]
    before = fingerprint(folder)
    code, _, err = run_cli(["run", *grid, "--data-dir", str(broken)], capsys)
    assert_refused(code, err, f"{folder.name} finished earlier on other cifar10-subset data")
    assert recorded in err and fingerprint(folder) == before
    code, _, err = run_cli(["eval", str(folder), "--attack", "cw20", "--data-dir", str(broken)], capsys)
    assert_refused(code, err, f"{folder.name} was trained on other cifar10-subset data")
    assert fingerprint(folder) == before
    assert run_cli(["run", *grid, "--data-dir", str(good)], capsys)[0] == 0  # the same data: skipped as finished
    assert fingerprint(folder) == before


def test_eval_refuses_to_merge_into_truncated_per_sample_records(finished_run, tmp_path, capsys):
    run = damaged_copy(finished_run, tmp_path)
    truncate(run / "samples.parquet")
    before = fingerprint(run)
    code, _, err = run_cli(["eval", str(run), "--attack", "cw20", "--checkpoints", "final"], capsys)
    assert_refused(code, err, f"{run / 'samples.parquet'} cannot be read")
    assert fingerprint(run) == before
