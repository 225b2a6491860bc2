"""`--launcher ray` on a real local Ray instance (one for the module): the same runs and bit-identical results
as inline, a hot-started run after its base, and a run whose Ray worker is killed retried to the same end."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.test_launch import runs, same_results

if importlib.util.find_spec("ray") is None:  # not importorskip: Ray must be imported after the env below is set
    pytest.skip("Ray is not installed (pip install 'fairbench-at[ray]')", allow_module_level=True)

DIGITS = ["--dataset", "digits", "--eval-per-class", "5", "--eval-last", "1"]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (run_ray uses a Ray already initialised here), on 127.0.0.1
    without token auth (which would write a token under the home folder)."""
    from fairbench import rayrun

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv(rayrun.LOOPBACK_ENV, "0")
        ray, started = rayrun.connect(None)
        assert started
        try:
            yield ray
        finally:
            ray.shutdown()


def test_ray_grid_matches_inline_and_runs_the_base_first(ray_local, tmp_path, capsys):
    grid = ["run", "--methods", "trades,frl", *DIGITS, "--seeds", "1", "--epochs", "2", "--hot-start-epochs", "2",
            "--train-per-class", "20"]
    code, _, err = run_cli([*grid, "--threads", "1", "--out", str(tmp_path / "A")], capsys)
    assert code == 0, err
    code, _, err = run_cli([*grid, "--launcher", "ray", "--cpus-per-run", "1", "--out", str(tmp_path / "B")], capsys)
    assert code == 0, err
    assert "ray: 2 run(s) submitted" in err

    same_results(tmp_path / "A", tmp_path / "B")
    assert len(runs(tmp_path / "B")) == 2
    frl_log = next((tmp_path / "B" / "logs").glob("frl_*.log")).read_text()
    assert "finished earlier, skipped" in frl_log  # FRL's TRADES base had finished when FRL started
    assert "threads=1" in frl_log
    code, out, err = run_cli(["status", "--results", str(tmp_path / "B"), "--format", "json"], capsys)
    assert code == 0, err
    assert sorted(s["state"] for s in json.loads(out)) == ["done", "done"]

    code, _, err = run_cli([*grid, "--launcher", "ray", "--out", str(tmp_path / "B")], capsys)
    assert code == 0 and "0 run(s) trained or evaluated now, 2 finished earlier" in err


def test_ray_retries_a_killed_worker_and_ends_bit_identical(ray_local, tmp_path, capsys):
    grid = ["run", "--methods", "trades", *DIGITS, "--seeds", "1", "--epochs", "4", "--train-per-class", "100"]
    code, _, err = run_cli([*grid, "--threads", "1", "--out", str(tmp_path / "A")], capsys)
    assert code == 0, err

    killed: list[int] = []
    stop = threading.Event()

    def kill_after_first_epoch(runs: Path) -> None:
        """SIGKILL the Ray worker holding the run once epoch 1 is done and the run is not finished."""
        while not stop.is_set():
            for progress in runs.glob("*/progress.json"):
                try:
                    epoch = json.loads(progress.read_text())["epoch"]
                    pid = json.loads((progress.parent / "run.lock").read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                if 1 <= epoch < 4 and not (progress.parent / "classwise.parquet").exists():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_epoch, args=(tmp_path / "B" / "runs",), daemon=True)
    killer.start()
    try:
        code, _, err = run_cli([*grid, "--launcher", "ray", "--max-retries", "1", "--out", str(tmp_path / "B")],
                               capsys)
    finally:
        stop.set()
        killer.join()
    assert killed, "the run ended before its worker could be killed"
    assert code == 0, err

    same_results(tmp_path / "A", tmp_path / "B")
    (run_id,) = runs(tmp_path / "B")
    log = (tmp_path / "B" / "logs" / f"{run_id}.log").read_text()
    assert log.count("--- ray task on") == 2  # the killed attempt and its retry
    last = max((tmp_path / "A" / "runs" / run_id / "checkpoints").glob("*.pt")).name
    model_a, model_b = (torch.load(out / "runs" / run_id / "checkpoints" / last, weights_only=False)["model"]
                        for out in (tmp_path / "A", tmp_path / "B"))
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
