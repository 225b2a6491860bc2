"""The Python API (`fairbench.train`, `evaluate`, `load_results`, `fairness_table`, `statistics_table`) and the
evaluation of a model fairbench did not train (`fairbench eval --model`): the API gives the command line's
numbers, an outside model's rows sit in the same tables, and bad input is refused clearly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import fairbench
from tests.conftest import run_cli
from tests.fixtures.external_model import Normalised, trained_digits_net

pytestmark = pytest.mark.slow
TINY = dict(epochs=2, train_per_class=20, eval_per_class=5, eval_last=1)
MODEL = "tests.fixtures.external_model:digits_net"


def test_train_through_the_api_gives_the_command_lines_run(tmp_path, capsys):
    run = fairbench.train("trades", dataset="digits", seed=1, out=tmp_path / "api", steps=2, **TINY)
    code, _, err = run_cli(["run", "--methods", "trades", "--epochs", "2", "--train-per-class", "20",
                            "--eval-per-class", "5", "--eval-last", "1", "--set", "steps=2",
                            "--out", str(tmp_path / "cli"), "-q"], capsys)
    assert code == 0, err
    (cli_folder,) = (tmp_path / "cli" / "runs").iterdir()
    assert run.run_id == cli_folder.name
    pd.testing.assert_frame_equal(run.classwise, pd.read_parquet(cli_folder / "classwise.parquet"))
    pd.testing.assert_frame_equal(fairbench.fairness_table(tmp_path / "api"), fairbench.fairness_table(tmp_path / "cli"))
    again = fairbench.train("trades", dataset="digits", seed=1, out=tmp_path / "api", steps=2, **TINY)
    assert again.run_id == run.run_id  # finished: skipped, same files


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A trained outside model's weights as a DataParallel checkpoint: {'state_dict': {'module.*': ...}}."""
    path = tmp_path_factory.mktemp("outside") / "net.pt"
    state = {f"module.{k}": v for k, v in trained_digits_net().state_dict().items()}
    torch.save({"state_dict": state, "epoch": 30}, path)
    return path


def test_outside_model_through_the_cli_sits_beside_trained_runs(weights, tmp_path, capsys):
    results = tmp_path / "results"
    fairbench.train("trades", dataset="digits", out=results, steps=2, **TINY)
    code, _, err = run_cli(["eval", "--model", MODEL, "--weights", str(weights), "--dataset", "digits", "--name",
                            "MyNet", "--attack", "pgd20", "--n-examples", "100", "--out", str(results), "-q"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["table", "--results", str(results), "--format", "csv"], capsys)
    assert code == 0, err
    table = pd.read_csv(__import__("io").StringIO(out))
    assert {"trades", "MyNet"} <= set(table["method"]) and "external" in set(table["arch"])
    mine = table[table["method"] == "MyNet"].iloc[0]
    assert mine["clean_avg_mean"] > 50 and mine["rob_avg_mean"] < mine["clean_avg_mean"]
    # the API on the same model and samples gives the rows the command wrote
    model = fairbench.load_model(MODEL, weights)
    result = fairbench.evaluate(model, dataset="digits", attacks=("pgd20",), n_examples=100, name="MyNet")
    (folder,) = [p for p in (results / "runs").iterdir() if p.name.startswith("MyNet_")]
    written = pd.read_parquet(folder / "classwise.parquet")
    pd.testing.assert_frame_equal(result.classwise.reset_index(drop=True), written.reset_index(drop=True))
    assert set(result.samples["suite"]) == {"clean", "pgd20"} and len(result.samples) == 2 * 100
    # a later call adds a suite and keeps the first
    code, _, err = run_cli(["eval", "--model", MODEL, "--weights", str(weights), "--dataset", "digits", "--name",
                            "MyNet", "--attack", "cw20", "--n-examples", "100", "--out", str(results), "-q"], capsys)
    assert code == 0, err
    assert set(pd.read_parquet(folder / "classwise.parquet")["attack"]) == {"clean", "pgd20", "cw20"}
    code, _, err = run_cli(["eval", str(results), "--attack", "cw20", "--checkpoints", "final", "-q"], capsys)
    assert code == 0 and "an outside model's evaluation, left out" in err


class Noisy(Normalised):
    def forward(self, x):
        return super().forward(x) + torch.randn(x.shape[0], 10)


def test_evaluation_checks_apply_to_outside_models():
    result = fairbench.evaluate(Noisy(), dataset="digits", attacks=("pgd20",), n_examples=50)
    assert any("random" in w for w in result.checks["0"]["warnings"]), result.checks


@pytest.mark.parametrize("args, expected", [
    (["--model", MODEL, "--name", "x"], "needs --dataset too"),
    (["--model", "no_colon", "--dataset", "digits", "--name", "x"], "--model expects MODULE:FACTORY"),
    (["--model", "tests.fixtures.external_model:nothing", "--dataset", "digits", "--name", "x"], "has no function"),
    (["--model", MODEL, "--dataset", "digits", "--name", "a/b"], "--name must be letters"),
    (["--model", MODEL, "--dataset", "cifar10-subset", "--name", "x", "--data-dir", "/nonexistent"], "cifar10"),
], ids=["no dataset", "no factory", "unknown factory", "bad name", "missing data"])
def test_bad_outside_model_input_is_refused(tmp_path, capsys, args, expected):
    code, _, err = run_cli(["eval", *args, "--out", str(tmp_path / "r")], capsys)
    assert code != 0 and "Traceback" not in err and expected in " ".join(err.split()), err
    assert not (tmp_path / "r" / "runs").exists()


def test_weights_that_do_not_fit_and_a_model_of_the_wrong_shape(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    code, _, err = run_cli(["eval", "--model", MODEL, "--weights", str(tmp_path / "other.pt"), "--dataset", "digits",
                            "--name", "x", "--out", str(tmp_path / "r")], capsys)
    assert code != 0 and "does not fit the model" in err
    with pytest.raises(fairbench.errors.FairbenchError, match=r"logits of shape \(batch, 10\)"):
        fairbench.evaluate(Normalised(num_classes=3), dataset="digits", attacks=("pgd20",), n_examples=20)


def test_notebook_script_runs_through_the_api_alone(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "api_example.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "results"), "--epochs", "2",
                           "--train-per-class", "20"], capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MyNet PGD-20 accuracy per class" in done.stdout and "dafa  pgd20" in done.stdout
    assert "vs trades: avg" in done.stdout and "p=" in done.stdout
