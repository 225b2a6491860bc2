"""Issue 13, item 9: what a new user ran into, each as the real command on tiny digits runs (a few epochs, a
few images per class, one thread): a message that says what happened and what to do, nothing written
before lost or silently replaced."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import run_cli
from tests.test_bad_input import assert_refused, fingerprint

TINY = ["--epochs", "2", "--train-per-class", "20", "--eval-per-class", "5", "--eval-last", "2", "--threads", "1"]
REPO = Path(__file__).resolve().parents[1]


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A results folder with one finished 2-epoch TRADES run on digits (pgd20 on 50 test samples)."""
    from fairbench.runner import run_one
    from fairbench.spec import RunSpec

    out = tmp_path_factory.mktemp("finished")
    run_one(RunSpec(method="trades", dataset="digits", epochs=2, train_per_class=20, eval_per_class=5,
                    eval_last=2), out)
    return out


@pytest.fixture
def results(finished, tmp_path) -> Path:
    """A copy of the finished results, for tests that change them."""
    shutil.copytree(finished, tmp_path / "res")
    return tmp_path / "res"


def run_folder(results: Path) -> Path:
    (folder,) = (results / "runs").iterdir()
    return folder


def stored_sizes(folder: Path, suite: str = "pgd20") -> dict[int, int]:
    samples = pd.read_parquet(folder / "samples.parquet")
    return samples[samples.suite == suite].groupby("epoch").size().to_dict()


# ---------------------------------------------------------------------------------------------- a

def test_a_smaller_evaluation_never_replaces_a_larger_one_without_force(results, capsys):
    folder = run_folder(results)
    before = fingerprint(folder)
    code, _, err = run_cli(["eval", str(folder), "--attack", "pgd20", "--n-examples", "20", "--threads", "1"], capsys)
    assert_refused(code, err, "this evaluation has 20 test samples and would replace stored rows of a larger one "
                              "(pgd20 of epoch(s) 1, 2 on 50 test samples)")
    assert "--force" in one_line(err) and "Nothing was changed" in one_line(err)
    assert fingerprint(folder) == before
    code, _, err = run_cli(["eval", str(folder), "--attack", "pgd20", "--n-examples", "20", "--threads", "1",
                            "--force"], capsys)
    assert code == 0, err
    assert stored_sizes(folder) == {1: 20, 2: 20}


def test_a_larger_or_equal_evaluation_still_replaces(results, capsys):
    folder = run_folder(results)
    code, _, err = run_cli(["eval", str(folder), "--attack", "pgd20", "--n-examples", "50", "--checkpoints",
                            "final", "--threads", "1"], capsys)
    assert code == 0, err
    assert stored_sizes(folder) == {1: 50, 2: 50}


# ---------------------------------------------------------------------------------------------- b

@pytest.mark.parametrize("fmt", ["md", "csv"])
def test_b_compare_paper_refuses_smoke_results(results, tmp_path, capsys, fmt):
    output = tmp_path / f"cmp.{fmt}"
    code, out, err = run_cli(["table", "--results", str(results), "--paper", "table1", "--compare", "paper",
                              "--format", fmt, "-o", str(output)], capsys)
    assert_refused(code, err, "these results (digits / smallcnn / PGD-20) differ from what the published table1 "
                              "numbers measured (table1a: CIFAR-10 / ResNet-18 / AutoAttack")
    assert "in dataset, architecture and attack" in one_line(err) and "nothing was compared" in one_line(err)
    assert " vs " not in out and not output.exists()
    code, out, err = run_cli(["table", "--results", str(results), "--paper", "table1", "--format", "md"], capsys)
    assert code == 0 and "TRADES" in out, err  # the layout alone still works


def test_b_compare_paper_refuses_another_attack(tmp_path, capsys):
    from tests.test_paper import synthetic

    frame = synthetic(("trades", "trix"))
    frame = pd.concat([frame, frame[frame.attack == "aa"].assign(attack="pgd20")], ignore_index=True)
    (tmp_path / "runs" / "all").mkdir(parents=True)
    frame.to_parquet(tmp_path / "runs" / "all" / "classwise.parquet")
    args = ["table", "--results", str(tmp_path), "--paper", "table1a", "--compare", "paper", "--format", "md"]
    code, out, err = run_cli([*args, "--attack", "pgd20"], capsys)
    assert_refused(code, err, "(CIFAR-10 / ResNet-18 / PGD-20) differ from what the published table1a numbers "
                              "measured (table1a: CIFAR-10 / ResNet-18 / AutoAttack) in attack,")
    code, out, err = run_cli(args, capsys)
    assert code == 0 and " vs 82.17 (" in out, err  # the paper's own setting is compared


# ---------------------------------------------------------------------------------------------- c

def test_c_grid_options_override_the_config(tmp_path, capsys):
    config = REPO / "benchmarks" / "paper" / "table1.toml"
    code, out, err = run_cli(["plan", "--config", str(config), "--scale", "smoke", "--methods", "trades,trix",
                              "--epochs", "3", "--seeds", "2,", "--format", "json", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    specs = [t["args"]["spec"] for t in json.loads(out)]
    assert [(s["method"], s["seed"], s["epochs"]) for s in specs] == [("trades", 2, 3), ("trix", 2, 3)]
    assert {s["train_per_class"] for s in specs} == {100}  # the rest of the smoke scale stays
    assert specs[0]["overrides"] == {"warmup": "3", "steps": "2"}  # cfa.begin left with CFA
    assert "--methods, --seeds, --epochs from the command line override the config's values" in one_line(err)


def test_c_config_without_grid_options_is_unchanged(tmp_path, capsys):
    config = REPO / "benchmarks" / "paper" / "table1.toml"
    code, out, err = run_cli(["plan", "--config", str(config), "--scale", "smoke", "--format", "json"], capsys)
    assert code == 0, err
    specs = [t["args"]["spec"] for t in json.loads(out)]
    assert len(specs) == 8 and {s["epochs"] for s in specs} == {6} and "override" not in err


# ---------------------------------------------------------------------------------------------- d

def test_d_every_dataset_is_checked_before_the_first_run_trains(tmp_path, capsys):
    config = tmp_path / "grid.toml"
    config.write_text('[grid]\nmethods = ["trades"]\ndatasets = ["digits", "cifar10"]\narchs = ["smallcnn"]\n'
                      'epochs = 2\ntrain_per_class = 20\neval_per_class = 5\neval_last = 1\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["run", "--config", str(config), "--data-dir", str(empty), "--threads", "1",
                            "--out", str(tmp_path / "out")], capsys)
    assert_refused(code, err, "the grid needs cifar10, whose files are missing; nothing was trained")
    assert f"fairbench download cifar10 --data-dir {empty}" in one_line(err)
    assert not (tmp_path / "out" / "runs").exists()


# ---------------------------------------------------------------------------------------------- e

@pytest.mark.parametrize("methods, waiting", [("trades", ""), ("trades,pgd-at", "1 not started")],
                         ids=["single run", "grid"])
def test_e_ctrl_c_says_what_is_checkpointed_and_how_to_continue(tmp_path, methods, waiting):
    out = tmp_path / "out"
    args = ["run", "--methods", methods, "--epochs", "100", "--train-per-class", "20", "--eval-per-class", "5",
            "--threads", "1", "--out", str(out)]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # this checkout's fairbench
    proc = subprocess.Popen([sys.executable, "-m", "fairbench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    start = time.monotonic()
    while not list(out.glob("runs/*/checkpoints/epoch_0001.pt")):
        assert proc.poll() is None and time.monotonic() - start < 120, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "aborted" not in err
    run_id = next((out / "runs").iterdir()).name
    assert re.search(rf"{run_id}: epoch\(s\) 1(-\d+)? of 100 checkpointed; it continues after epoch \d+", err), err
    assert waiting in err
    command = next(line for line in err.splitlines() if line.startswith("continue with: "))
    assert shlex.split(command.removeprefix("continue with: ")) == ["fairbench", *args, "--resume"]


# ---------------------------------------------------------------------------------------------- f

def test_f_eval_reads_the_data_root_the_run_was_trained_with(tmp_path, capsys, monkeypatch):
    from tests.test_data_readers import make_cifar10

    make_cifar10(tmp_path / "data")
    monkeypatch.delenv("FAIRBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["run", "--methods", "trades", "--dataset", "cifar10", "--arch", "smallcnn",
                            "--epochs", "1", "--eval-last", "1", "--threads", "1", "--data-dir", "data",
                            "--out", "res"], capsys)
    assert code == 0, err
    folder = run_folder(tmp_path / "res")
    assert json.loads((folder / "run.json").read_text())["data_dir"] == str((tmp_path / "data").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # ./data is not there: the hint in run.json is what finds it
    code, _, err = run_cli(["eval", str(folder), "--attack", "cw20", "--threads", "1"], capsys)
    assert code == 0, err
    assert "cw20" in set(pd.read_parquet(folder / "samples.parquet").suite)
    before = fingerprint(folder)
    code, _, err = run_cli(["eval", str(folder), "--attack", "cw20", "--threads", "1", "--data-dir", "nodata"],
                           capsys)  # --data-dir still overrides the hint
    assert_refused(code, err, "fairbench download cifar10 --data-dir nodata")
    assert fingerprint(folder) == before


# ---------------------------------------------------------------------------------------------- g

def test_g_a_renamed_checkpoint_inside_a_run_says_what_eval_takes(results, capsys):
    folder = run_folder(results)
    renamed = folder / "checkpoints" / "best.pt"
    shutil.copy(folder / "checkpoints" / "epoch_0002.pt", renamed)
    code, _, err = run_cli(["eval", str(renamed), "--attack", "pgd20"], capsys)
    assert_refused(code, err, "takes a run folder, a results folder or a checkpoint RUN/checkpoints/epoch_NNNN.pt")
    assert "lies in a run's checkpoints folder but is not named epoch_NNNN.pt" in one_line(err)
    assert f"evaluate the run folder {folder} with --checkpoints EPOCH" in one_line(err)


def test_g_a_plain_state_dict_says_what_eval_takes(results, tmp_path, capsys):
    state = torch.load(run_folder(results) / "checkpoints" / "epoch_0002.pt", weights_only=True)["model"]
    plain = tmp_path / "model.pt"
    torch.save(state, plain)
    code, _, err = run_cli(["eval", str(plain), "--attack", "pgd20"], capsys)
    assert_refused(code, err, "takes a run folder, a results folder or a checkpoint RUN/checkpoints/epoch_NNNN.pt")
    assert "a plain state_dict, says neither method, dataset nor architecture" in one_line(err)


# ---------------------------------------------------------------------------------------------- h

@pytest.mark.parametrize("device, expected", [
    ("cuda:1", "--device cuda:1 was asked for but"),
    ("cuda", "--device cuda was asked for but no CUDA GPU is visible"),
    ("gpu7", "--device 'gpu7' is not a device; use auto, cpu, cuda or cuda:N"),
    ("mps", "--device 'mps': fairbench runs on cpu or CUDA GPUs"),
])
def test_h_an_unavailable_device_is_named_before_anything_is_written(tmp_path, capsys, device, expected):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    if device == "cuda:1" and torch.cuda.device_count() > 1:
        pytest.skip("cuda:1 exists here")
    code, _, err = run_cli(["run", "--methods", "trades", *TINY, "--device", device, "--out", str(tmp_path)],
                           capsys)
    assert_refused(code, err, expected)
    assert not (tmp_path / "runs").exists()


def test_h_eval_names_the_device_too(results, capsys):
    if torch.cuda.device_count() > 1:
        pytest.skip("cuda:1 exists here")
    folder = run_folder(results)
    before = fingerprint(folder)
    code, _, err = run_cli(["eval", str(folder), "--attack", "pgd20", "--device", "cuda:1"], capsys)
    assert_refused(code, err, "--device cuda:1 was asked for but")
    assert fingerprint(folder) == before


# ---------------------------------------------------------------------------------------------- i

def test_i_a_longer_run_of_a_finished_one_says_it_starts_a_new_run(results, capsys):
    old = run_folder(results).name
    code, _, err = run_cli(["run", "--methods", "trades", *TINY[2:], "--epochs", "3", "--out", str(results)], capsys)
    assert code == 0, err
    new = next(p.name for p in (results / "runs").iterdir() if p.name != old)
    assert (f"note: a finished 2-epoch run of these settings exists ({old}); this starts a new 3-epoch run from "
            f"epoch 1 under {new}") in one_line(err)
    assert (results / "runs" / new / "classwise.parquet").is_file()  # a note, not an error: the run proceeds
