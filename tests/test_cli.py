"""The command line as a user runs it: end to end on digits, and clear errors for bad input."""
from __future__ import annotations

import subprocess

import pandas as pd
import pytest
from tests.conftest import run_cli


TINY = ["--epochs", "3", "--train-per-class", "30", "--eval-per-class", "10", "--set", "warmup=1",
        "--set", "steps=2", "--eval-last", "2"]


fairbench = run_cli  # the command line in this process


@pytest.mark.slow
def test_run_then_table_end_to_end(tmp_path):
    """The README's main command at a tiny scale, as separate processes through the console script."""
    out = tmp_path / "results"
    run = subprocess.run(["fairbench", "run", "--methods", "trades,dafa,trix", "--dataset", "digits",
                          "--seeds", "2", *TINY, "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    files = sorted(out.glob("runs/*/classwise.parquet"))
    assert len(files) == 6
    frame = pd.concat(pd.read_parquet(f) for f in files)
    assert set(frame.method) == {"trades", "dafa", "trix"} and set(frame.seed) == {1, 2}
    assert set(frame.attack) == {"clean", "pgd20"} and frame.protocol.nunique() == 1
    for f in files:
        assert (f.parent / "samples.parquet").is_file() and (f.parent / "run.json").is_file()

    table = subprocess.run(["fairbench", "table", "--results", str(out), "--format", "md"],
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    lines = {line.split("|")[1].strip(): line for line in table.stdout.splitlines() if line.startswith("| ")}
    assert {"trades", "dafa", "trix"} <= set(lines)
    assert "rho_rob" in table.stdout and "±" in lines["trix"]
    assert lines["trades"].count("0.00") >= 2  # the baseline's own rho

    rich = subprocess.run(["fairbench", "table", "--results", str(out)], capture_output=True, text=True)
    assert rich.returncode == 0 and "trix" in rich.stdout


def test_methods_lists_builtins_with_defaults(capsys):
    code, out, _ = fairbench(["methods"], capsys)
    assert code == 0
    for name in ("trades", "dafa", "trix", "trix-basic", "trix-uniform", "dafa-uniform"):
        assert name in out
    assert "warmup=70" in out and "fairbench" in out


def test_describe_shows_field_meaning(capsys):
    code, out, _ = fairbench(["describe", "trix"], capsys)
    assert code == 0 and "lam_batch" in out and "warmup" in out


@pytest.mark.parametrize("args, expected", [
    (["run", "--methods", "trixx"], "unknown method 'trixx'; choose one of:"),
    (["run", "--methods", "trix", "--dataset", "cifar11"], "unknown dataset 'cifar11'; choose one of:"),
    (["run", "--methods", "trix", "--arch", "resnet19"], "unknown arch 'resnet19'; choose one of:"),
    (["run", "--methods", "trix", "--set", "warmupp=3"], "unknown option 'warmupp'; choose one of:"),
    (["run", "--methods", "trades", "--set", "warmup=3"], "unknown option 'warmup'"),
    (["run", "--methods", "trix", "--set", "warmup=abc"], "warmup expects an integer"),
    (["run", "--methods", "trix", "--attack", "pgd21"], "unknown attack 'pgd21'; choose one of:"),
    (["run", "--methods", "trix", "--seeds", "two"], "--seeds expects a count"),
])
def test_bad_input_gives_clear_error(args, expected, capsys, tmp_path):
    code, _, err = fairbench([*args, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert expected in " ".join(err.split())
    assert not any(tmp_path.iterdir())  # nothing written


def test_missing_data_names_path_and_fetch_command(capsys, tmp_path):
    code, _, err = fairbench(["run", "--methods", "trades", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                              "--out", str(tmp_path / "out")], capsys)
    text = " ".join(err.split())
    assert code == 2 and "cifar-10-batches-py" in text and "fairbench download cifar10" in text


def test_table_without_results_says_what_to_do(capsys, tmp_path):
    code, _, err = fairbench(["table", "--results", str(tmp_path)], capsys)
    assert code == 2 and "fairbench run" in err


CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks" / "paper"


@pytest.mark.slow
def test_paper_config_smoke_grid_runs_and_skips_finished_runs(tmp_path):
    out = tmp_path / "grid"
    cmd = ["fairbench", "run", "--config", str(CONFIGS / "table2.toml"), "--scale", "smoke", "--out", str(out), "-q"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    frame = pd.concat(pd.read_parquet(f) for f in out.glob("runs/*/classwise.parquet"))
    assert set(frame.method) == {"trades", "trix-basic", "trix-uniform", "dafa-uniform", "dafa", "trix"}
    again = subprocess.run([*cmd[:-1]], capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr.count("finished earlier, skipped") == 6


def test_every_paper_config_resolves_at_both_scales():
    from fairbench.grid import grid_specs, load_config
    from fairbench.spec import resolve

    configs = sorted(CONFIGS.glob("*.toml"))
    assert {c.stem for c in configs} >= {"table1", "table2", "table3", "table4", "tinyimagenet"}
    for path in configs:
        for scale in (None, "smoke"):
            specs = grid_specs(load_config(path), scale)
            assert specs and all(resolve(s).run_id for s in specs)
    full = grid_specs(load_config(CONFIGS / "table1.toml"))
    assert len(full) == 8 * 3 * 5 and {s.dataset for s in full} == {"cifar10", "cifar100", "stl10"}


def test_config_errors_are_clear(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\nmethods = ["trades"]\ndatasets = ["digits"]\nepochz = 3\n')
    code, _, err = fairbench(["run", "--config", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown grid key 'epochz'" in " ".join(err.split())
    code, _, err = fairbench(["run", "--config", str(CONFIGS / "table2.toml"), "--scale", "tiny"], capsys)
    assert code == 2 and "unknown scale 'tiny'; choose one of: smoke" in " ".join(err.split())
    code, _, err = fairbench(["run", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--config" in err
