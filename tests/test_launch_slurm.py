"""The Slurm launcher on a real single-node Slurm (`.ci/slurm.sh up`, which `.ci/run` starts): a grid with a
hot start gives the inline results, and a preempted job is requeued and its run ends bit-identical."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import run_cli
from tests.test_launch import fairbench, finish, runs, same_results

pytestmark = pytest.mark.slow
pytest.importorskip("submitit", reason="the Slurm launcher needs submitit (pip install 'fairbench-at[slurm]')")

STATE = Path(os.environ.get("FAIRBENCH_SLURM_DIR", "/tmp/fairbench-slurm"))


@pytest.fixture(scope="module")
def slurm():
    """The environment of the test cluster (SLURM_CONF, the sacct stand-in on PATH), read from its env.sh."""
    env_file = STATE / "env.sh"
    if not env_file.is_file():
        pytest.skip(f"no test Slurm cluster ({env_file} missing): run `.ci/slurm.sh up` first (root, apt-get)")
    exported = subprocess.run(["bash", "-c", f"source {env_file} && env -0"], capture_output=True, check=True).stdout
    env = dict(item.split("=", 1) for item in exported.decode().split("\0") if "=" in item)
    if subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode != 0:
        pytest.skip("the test Slurm cluster does not answer: run `.ci/slurm.sh up`")
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("SLURM_CONF", "PATH")})
    yield env
    os.environ.clear()
    os.environ.update(saved)


def wait_for(condition, seconds: float) -> bool:
    """Poll `condition` until it holds or `seconds` pass; says whether it held."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def progress_epoch(folder: Path) -> int:
    try:
        return int(json.loads((folder / "progress.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def job_logs(out: Path) -> str:
    """Everything the jobs under `out` printed, for the test's own checks and its failure messages."""
    files = sorted((out / "slurm" / "slurm").rglob("*_log.*"))
    return "".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in files)


def test_slurm_grid_with_a_hot_start_gives_the_inline_results(slurm, tmp_path, capsys):
    grid = ["--methods", "trades,frl", "--epochs", "2", "--hot-start-epochs", "2", "--train-per-class", "20",
            "--eval-per-class", "5", "--eval-last", "1"]
    assert run_cli(["run", *grid, "--out", str(tmp_path / "inline"), "--threads", "1", "-q"], capsys)[0] == 0
    out = finish(fairbench("run", *grid, "--out", str(tmp_path / "slurm"), "--launcher", "slurm", "--wait",
                           "--time", "10", "--cpus-per-run", "1"))
    jobs = dict(re.findall(r"submitted (\S+): job (\S+)", out))
    assert len(jobs) == 2
    frl = next(r for r in jobs if r.startswith("frl"))
    trades = next(r for r in jobs if r.startswith("trades"))
    submission = next((tmp_path / "slurm" / "slurm").glob(f"{jobs[frl]}/*_submission.sh")).read_text()
    assert f"--dependency=afterok:{jobs[trades]}" in submission  # FRL's job waits for its base's job
    same_results(tmp_path / "inline", tmp_path / "slurm")
    again = finish(fairbench("run", *grid, "--out", str(tmp_path / "slurm"), "--launcher", "slurm"))
    assert "submitted 0 run(s), 2 finished earlier" in again or "2 finished earlier" in again


def test_preempted_slurm_job_is_requeued_and_resumes_bit_identical(slurm, tmp_path, capsys):
    grid = ["--methods", "trades", "--epochs", "8", "--eval-per-class", "5", "--eval-last", "1", "--set", "steps=2"]
    assert run_cli(["run", *grid, "--out", str(tmp_path / "ref"), "--threads", "1", "-q"], capsys)[0] == 0
    (run_id,) = runs(tmp_path / "ref")
    out = finish(fairbench("run", *grid, "--out", str(tmp_path / "slurm"), "--launcher", "slurm", "--time", "10"))
    (job,) = re.findall(rf"submitted {run_id}: job (\S+)", out)
    folder = tmp_path / "slurm" / "runs" / run_id
    assert wait_for(lambda: progress_epoch(folder) >= 1, 180), f"job {job} never ended an epoch:\n{job_logs(tmp_path)}"
    # What a preemption looks like to the job: SIGTERM (ignored by submitit), then the USR2 that Slurm sends
    # ahead of the end (--signal): the job checkpoints, requeues itself and exits. USR2 waits for SIGTERM to be
    # handled: sent together, SIGTERM can land on the `scontrol requeue` that USR2 started. Slurm starts the
    # requeued job once the old job's credential has expired (cred_expire + 1 s on the test cluster); starting
    # it earlier by hand (scontrol update StartTime=now) makes slurmctld kill it ("Job credential revoked").
    subprocess.run(["scancel", job, "--signal", "SIGTERM"], check=True)
    assert wait_for(lambda: "Bypassing signal SIGTERM" in job_logs(tmp_path), 30), job_logs(tmp_path)
    subprocess.run(["scancel", job, "--signal", "USR2"], check=True)
    assert wait_for(lambda: f"Requeued job {job}" in job_logs(tmp_path), 60), job_logs(tmp_path)
    assert wait_for(lambda: (folder / "classwise.parquet").is_file(), 240), job_logs(tmp_path)
    logs = job_logs(tmp_path)
    assert logs.count("Starting with JobEnvironment") == 2 and "resuming after epoch" in logs, logs
    assert "retrying from the last checkpoint" not in logs, logs  # resumed by the requeued job, not in-process
    ref = torch.load(tmp_path / "ref" / "runs" / run_id / "checkpoints" / "epoch_0008.pt", weights_only=True)
    got = torch.load(folder / "checkpoints" / "epoch_0008.pt", weights_only=True)
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ref" / "runs" / run_id / "classwise.parquet"),
                                  pd.read_parquet(folder / "classwise.parquet"))


def test_plain_sbatch_array_script_runs_the_plan(slurm, tmp_path, capsys):
    grid = ["--methods", "trades,frl", "--epochs", "2", "--hot-start-epochs", "2", "--train-per-class", "20",
            "--eval-per-class", "5", "--eval-last", "1"]
    assert run_cli(["run", *grid, "--out", str(tmp_path / "inline"), "--threads", "1", "-q"], capsys)[0] == 0
    code, script, _ = run_cli(["plan", *grid, "--out", str(tmp_path / "array"), "--format", "sbatch",
                               "--time", "10"], capsys)
    assert code == 0
    (tmp_path / "grid.sbatch").write_text(script)
    done = subprocess.run(["sbatch", "--wait", "grid.sbatch"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-fairbench-*.log"))
    assert done.returncode == 0, done.stderr + logs
    # both array tasks started at once: FRL's task found its base held by task 0 and waited for it
    same_results(tmp_path / "inline", tmp_path / "array")
