"""Launchers on real runs: the local pool gives the sequential results, two launchers on one grid train
each run once, a killed worker is retried and ends bit-identical, FRL waits for its base; plan, status,
--index and concurrent evaluations."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from fairbench.lock import RunLock
from fairbench.plan import train_plan
from fairbench.spec import RunSpec
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

GRID = ["--methods", "trades,frl,dafa", "--seeds", "2", "--epochs", "3", "--hot-start-epochs", "3",
        "--train-per-class", "30", "--eval-per-class", "5", "--eval-last", "2", "--set", "steps=2"]


def fairbench(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    """The command line in its own process (one intra-op thread: tests run several at once on 2 cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FAIRBENCH_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "fairbench.cli", *args], env=env, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def runs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "runs").iterdir())


def same_results(a: Path, b: Path) -> None:
    assert runs(a) == runs(b)
    for run_id in runs(a):
        for name in ("classwise.parquet", "samples.parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(a / "runs" / run_id / name),
                                          pd.read_parquet(b / "runs" / run_id / name))


def trainings(out: Path, run_id: str) -> int:
    """How many times a run was trained from its start (each start prints 'RUN: E epochs x B batches')."""
    return (out / "logs" / f"{run_id}.log").read_text().count(f"{run_id}: 3 epochs x")


def test_plan_dedups_hot_start_bases_and_orders_them_first(tmp_path):
    specs = [RunSpec(method=m, dataset="digits", seed=s, epochs=3, hot_start_epochs=3)
             for m in ("frl", "trades", "frl") for s in (1, 2)]
    plan = train_plan(specs, tmp_path)
    assert [t.spec.method for t in plan.tasks] == ["trades", "frl", "trades", "frl"]
    assert [t.index for t in plan.tasks] == [0, 1, 2, 3]
    assert plan.tasks[1].needs == (plan.tasks[0].run_id,) and plan.tasks[3].needs == (plan.tasks[2].run_id,)
    assert plan.tasks[0].spec.seed == 1 and plan.tasks[2].spec.seed == 2


def test_local_pool_gives_the_sequential_results(tmp_path, capsys):
    # on CPU the weight gradients' summation order depends on the thread count: compare like with like
    code, _, err = run_cli(["run", *GRID, "--out", str(tmp_path / "seq"), "--threads", "1", "-q"], capsys)
    assert code == 0, err
    out = finish(fairbench("run", *GRID, "--out", str(tmp_path / "pool"), "--workers", "2"))
    assert "local pool: 2 worker(s), 1 thread(s) each" in out
    assert len(set(re.findall(r"started \(worker \d, pid (\d+)\)", out))) == 2  # 6 runs, 2 processes reused
    same_results(tmp_path / "seq", tmp_path / "pool")
    assert len(runs(tmp_path / "pool")) == 6  # trades, frl, dafa x 2 seeds: FRL's base is the grid's TRADES run
    for frl in (r for r in runs(tmp_path / "pool") if r.startswith("frl")):
        log = (tmp_path / "pool" / "logs" / f"{frl}.log").read_text()
        assert "finished earlier, skipped" in log  # its base was done before it started
    code, text, _ = run_cli(["status", "--results", str(tmp_path / "pool"), "--format", "json"], capsys)
    assert code == 0 and [s["state"] for s in json.loads(text)] == ["done"] * 6
    again = finish(fairbench("run", *GRID, "--out", str(tmp_path / "pool"), "--workers", "2"))
    assert "0 run(s) trained or evaluated now, 6 finished earlier" in again


def test_two_launchers_on_one_grid_train_each_run_once(tmp_path):
    out = tmp_path / "shared"
    first = fairbench("run", *GRID, "--out", str(out), "--workers", "1")
    second = fairbench("run", *GRID, "--out", str(out), "--gpus", "0,1", "--runs-per-gpu", "1")
    logs = finish(first) + finish(second)
    assert len(runs(out)) == 6
    for run_id in runs(out):
        assert trainings(out, run_id) == 1, run_id
    assert "finished by another process" in logs or "held by" in logs
    worker_logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "CUDA_VISIBLE_DEVICES=0" in worker_logs or "CUDA_VISIBLE_DEVICES=1" in worker_logs


def test_killed_worker_is_retried_and_ends_bit_identical(tmp_path, capsys):
    grid = ["--methods", "trades", "--epochs", "5", "--eval-per-class", "5", "--eval-last", "1", "--set", "steps=2"]
    code, _, err = run_cli(["run", *grid, "--out", str(tmp_path / "ref"), "-q"], capsys)
    assert code == 0, err
    (run_id,) = runs(tmp_path / "ref")
    folder = tmp_path / "pool" / "runs" / run_id
    launcher = fairbench("run", *grid, "--out", str(tmp_path / "pool"), "--workers", "1", "--max-retries", "1")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            progress = json.loads((folder / "progress.json").read_text())
            if progress["epoch"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    pid = json.loads((folder / "run.lock").read_text())["pid"]
    code, text, _ = run_cli(["status", "--results", str(tmp_path / "pool"), "--format", "json"], capsys)
    (state,) = json.loads(text)
    assert state["state"] == "running" and f":{pid}, heartbeat" in state["detail"] and state["epoch"] >= 2
    os.kill(pid, signal.SIGKILL)  # mid-epoch, no chance to clean up: its lock file stays behind
    out = finish(launcher)
    assert "signal SIGKILL; retrying from its last checkpoint (1/1)" in out
    log = (tmp_path / "pool" / "logs" / f"{run_id}.log").read_text()
    assert "taking over the stale lock" in log and "resuming after epoch" in log
    ref = torch.load(tmp_path / "ref" / "runs" / run_id / "checkpoints" / "epoch_0005.pt", weights_only=True)
    got = torch.load(folder / "checkpoints" / "epoch_0005.pt", weights_only=True)
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    same_results(tmp_path / "ref", tmp_path / "pool")


def test_ctrl_c_stops_the_pool_and_a_rerun_continues(tmp_path, capsys):
    grid = ["--methods", "trades", "--epochs", "4", "--eval-per-class", "5", "--eval-last", "1", "--set", "steps=2",
            "--out", str(tmp_path), "--workers", "1"]
    launcher = fairbench("run", *grid)
    progress = next(iter(tmp_path.glob("runs/*/progress.json")), None)
    deadline = time.time() + 120
    while time.time() < deadline and (progress is None or json.loads(progress.read_text() or "{}").get("epoch", 0) < 1):
        time.sleep(0.05)
        progress = next(iter(tmp_path.glob("runs/*/progress.json")), None)
    launcher.send_signal(signal.SIGINT)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 130 and "interrupted" in out
    code, text, _ = run_cli(["status", "--results", str(tmp_path), "--format", "json"], capsys)
    (state,) = json.loads(text)
    assert state["state"] == "partial" and 1 <= state["epoch"] < 4  # the worker let go of its lock
    assert not (progress.parent / "run.lock").exists()
    again = finish(fairbench("run", *grid))
    assert "1 run(s) trained or evaluated now" in again
    assert f"resuming after epoch {state['epoch']}" in (tmp_path / "logs" / f"{state['run_id']}.log").read_text()


def test_evaluations_of_a_grid_run_in_the_pool(tmp_path, capsys):
    grid = ["--methods", "trades,dafa", "--epochs", "2", "--train-per-class", "20", "--eval-per-class", "5",
            "--eval-last", "1", "--out", str(tmp_path)]
    assert run_cli(["run", *grid, "-q"], capsys)[0] == 0
    out = finish(fairbench("eval", str(tmp_path), "--attack", "cw20", "--checkpoints", "final", "--n-examples", "20",
                           "--workers", "2"))
    assert "2 run(s) trained or evaluated now" in out
    for run_id in runs(tmp_path):
        samples = pd.read_parquet(tmp_path / "runs" / run_id / "samples.parquet")
        assert (samples.suite == "cw20").sum() == 20
        assert "cw20" in (tmp_path / "logs" / f"{run_id}.eval.log").read_text()


def test_index_runs_one_plan_entry_and_commands_replay_it(tmp_path, capsys):
    grid = ["--methods", "trades,frl", "--epochs", "2", "--hot-start-epochs", "2", "--train-per-class", "20",
            "--eval-per-class", "5", "--eval-last", "1", "--out", str(tmp_path)]
    code, text, _ = run_cli(["plan", *grid, "--format", "json"], capsys)
    entries = json.loads(text)
    assert [e["args"]["spec"]["method"] for e in entries] == ["trades", "frl"]
    assert entries[1]["needs"] == [entries[0]["run_id"]] and entries[1]["status"]["state"] == "pending"
    code, text, _ = run_cli(["plan", *grid, "--format", "commands"], capsys)
    lines = text.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("--index 1")
    # entry 1 (FRL) first: its base is not trained yet, so it is trained here, under its own lock
    code, _, err = run_cli(shlex.split(lines[1])[1:], capsys)
    assert code == 0, err
    assert sorted(runs(tmp_path)) == sorted(e["run_id"] for e in entries)
    code, _, err = run_cli([*shlex.split(lines[0])[1:]], capsys)
    assert code == 0 and "finished earlier, skipped" in err
    code, _, err = run_cli(["run", *grid, "--index", "2"], capsys)
    assert code == 2 and "outside the plan (entries 0..1)" in err and "Traceback" not in err
    code, text, _ = run_cli(["plan", *grid, "--format", "sbatch", "--cpus-per-run", "4", "--time", "2:00:00",
                             "--slurm-arg", "account=lab"], capsys)
    assert "#SBATCH --array=0-1" in text and "#SBATCH --cpus-per-task=4" in text and "#SBATCH --time=120" in text
    assert "#SBATCH --account=lab" in text and "--index $SLURM_ARRAY_TASK_ID" in text


def test_failed_run_is_reported_with_its_log(tmp_path, capsys):
    grid = ["--methods", "trades", "--epochs", "2", "--train-per-class", "20", "--eval-per-class", "5",
            "--eval-last", "1", "--lr", "1e12", "--out", str(tmp_path)]
    proc = fairbench("run", *grid, "--workers", "1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "failed" in out and "NaN" in out and "log:" in out
    code, text, _ = run_cli(["status", "--results", str(tmp_path), "--format", "json"], capsys)
    (state,) = json.loads(text)
    assert state["state"] == "failed" and "NaN" in state["detail"]
    assert any("NaN" in line for line in state["log_tail"])


def test_concurrent_evaluations_of_one_run_lose_nothing(tmp_path, capsys):
    grid = ["--methods", "trades", "--epochs", "2", "--train-per-class", "20", "--eval-per-class", "5",
            "--eval-last", "2", "--out", str(tmp_path), "-q"]
    assert run_cli(["run", *grid], capsys)[0] == 0
    (run_id,) = runs(tmp_path)
    folder = tmp_path / "runs" / run_id
    logs = [tmp_path / f"{attack}.out" for attack in ("cw20", "pgd100")]
    with RunLock(folder, "test").hold(wait=False) as lock:  # both evaluations meet a held run, then race
        evals = [fairbench("eval", str(folder), "--attack", log.stem, "--checkpoints", "all", "--n-examples", "50",
                           stdout=log.open("w"))
                 for log in logs]
        deadline = time.time() + 60
        while not all("holds it" in log.read_text() for log in logs) and time.time() < deadline:
            time.sleep(0.1)
    assert not lock.held
    for proc, log in zip(evals, logs):
        assert proc.wait(timeout=120) == 0, log.read_text()
    meta = json.loads((folder / "run.json").read_text())
    assert sorted(e["attacks"][0] for e in meta["evaluations"]) == ["cw20", "pgd100"]
    assert {"cw20", "pgd100", "pgd20"} <= set(meta["attacks"])
    samples = pd.read_parquet(folder / "samples.parquet")
    assert set(samples.suite) == {"clean", "pgd20", "cw20", "pgd100"}
    assert (samples.groupby("suite").size() == 100).all()  # 2 epochs x 50 samples each, none lost
