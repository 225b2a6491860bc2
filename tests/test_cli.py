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
    rows = md_rows(table.stdout)
    assert set(rows) == {"trades", "dafa", "trix"}
    assert rows["trades"]["rho_clean"] == rows["trades"]["rho_rob"] == "0.00"  # the baseline's own rho
    for method in ("dafa", "trix"):
        assert rows[method]["seeds"] == "2" and " ± " in rows[method]["robust worst"]
        note = " ".join(line for line in table.stdout.splitlines() if line.startswith(f"- {method}: "))
        for column in ("rho_clean", "rho_rob"):  # a number, or n/a with the note that says why
            cell = rows[method][column]
            assert f"{column} undefined" in note if cell == "n/a" else float(cell) == float(cell)

    rich = subprocess.run(["fairbench", "table", "--results", str(out)], capture_output=True, text=True)
    assert rich.returncode == 0 and "trix" in rich.stdout


def md_rows(text: str) -> dict[str, dict[str, str]]:
    """method -> {column header: cell} of a markdown table printed by `fairbench table --format md`."""
    header, rows = None, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if not cells or cells[0].startswith("---"):
            continue
        if cells[0] == "method":
            header = cells
        else:
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def rich_rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells (wrapped lines joined, spaces dropped) of a rich table with row lines."""
    rows, current = {}, None
    for line in text.splitlines():
        if not line.startswith("│"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if current is None:
            current = rows.setdefault(cells[0], [""] * (len(cells) - 1))
        for i, cell in enumerate(cells[1:]):
            current[i] += cell.replace(" ", "")
    return rows


def test_methods_lists_builtins_with_defaults(capsys):
    from fairbench import __version__
    from fairbench.registry import list_methods

    code, out, _ = fairbench(["methods"], capsys)
    assert code == 0
    rows = rich_rows(out)
    assert sorted(rows) == list_methods()  # every method once, in name order
    assert all(source == f"fairbench{__version__}" for source, _, _ in rows.values())  # built-ins
    assert "warmup=70," in rows["dafa"][2] and "lam=1.0," in rows["dafa"][2]
    assert "lam_batch=1.0" in rows["trix"][2] and "warmup" not in rows["trades"][2]


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


# --------------------------------------------------------------------- run options from the RunSpec fields

def help_records(command_name: str) -> dict[str, tuple[str, str]]:
    """Parameter name -> (flags, help text) of a command's options, as its --help prints them (unwrapped)."""
    import click

    from fairbench.cli import cli

    command = cli.commands[command_name]
    ctx = click.Context(command, info_name=command_name)
    return {p.name: p.get_help_record(ctx) for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("command", ["run", "plan"])
def test_help_lists_every_runspec_field_with_its_docstring(command, capsys):
    """`fairbench run --help` is generated from the run fields: an option per RunSpec field, its help line the
    field's docstring."""
    import dataclasses

    from fairbench.overrides import field_docs
    from fairbench.runspec import RunSpec, run_options

    code, out, _ = fairbench([command, "--help"], capsys)
    assert code == 0
    docs, records, printed = field_docs(RunSpec), help_records(command), "".join(out.split())
    with_cli = {o.name: o for o in run_options()}
    for f in dataclasses.fields(RunSpec):
        assert f.name in with_cli and docs.get(f.name), f"RunSpec.{f.name} has no option or no docstring"
        doc, (flags, text) = " ".join(docs[f.name].split()), records[f.name]
        assert with_cli[f.name].flag in flags.split("/")[0] and text.startswith(doc), f.name
        assert "".join(doc.split()) in printed, f.name  # the help as printed (wrapped) holds the docstring


def planned(args: list[str], tmp_path, capsys):
    """The resolved run of a one-run grid, as `fairbench plan` names it."""
    import json

    from fairbench.runspec import RunSpec
    from fairbench.spec import resolve

    code, out, err = fairbench(["plan", *args, "--format", "json", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    (task,) = json.loads(out)
    return resolve(RunSpec.from_dict(task["args"]["spec"]))


def test_momentum_and_nesterov_reach_the_run_from_the_command_line_and_the_grid(tmp_path, capsys):
    import json

    config = tmp_path / "grid.toml"
    config.write_text('[grid]\nmethods = ["trades"]\ndatasets = ["digits"]\nmomentum = 0.5\nnesterov = false\n')
    default = planned(["--methods", "trades"], tmp_path, capsys)
    option = planned(["--methods", "trades", "--momentum", "0.5", "--no-nesterov"], tmp_path, capsys)
    grid = planned(["--config", str(config)], tmp_path, capsys)
    assert (default.optim["momentum"], default.optim["nesterov"]) == (0.9, True)
    assert (option.optim["momentum"], option.optim["nesterov"]) == (grid.optim["momentum"], grid.optim["nesterov"]) \
        == (0.5, False)
    assert option.run_id == grid.run_id != default.run_id
    assert planned(["--methods", "trades", "--momentum", "1/2", "--no-nesterov"], tmp_path, capsys).run_id == \
        option.run_id  # a number may be written as a fraction, and the run is the same
    code, out, err = fairbench(["plan", "--config", str(config), "--momentum", "0.8", "--format", "json", "--out",
                                str(tmp_path / "out")], capsys)  # beside --config, the option wins
    assert code == 0 and json.loads(out)[0]["args"]["spec"]["momentum"] == 0.8
    assert "--momentum from the command line override the config's values" in " ".join(err.split())


@pytest.mark.parametrize("args, line, expected", [
    (["--momentum", "-1"], None, "--momentum must be >= 0"),
    (["--momentum", "fast"], None, "Invalid value for '--momentum': 'fast' is not a number"),
    ([], 'nesterov = "yes"', "grid key nesterov expects true or false, got 'yes'"),
    ([], "momentum = -1", "--momentum must be >= 0"),
    ([], 'lr = "1/0"', "grid key lr expects a number or a fraction"),
    ([], "channels_last = true", "unknown grid key 'channels_last'"),  # the machine's, not the grid's
])
def test_bad_momentum_and_nesterov_are_refused(args, line, expected, tmp_path, capsys):
    grid = ["--methods", "trades"]
    if line:
        config = tmp_path / "grid.toml"
        config.write_text(f'[grid]\nmethods = ["trades"]\ndatasets = ["digits"]\n{line}\n')
        grid = ["--config", str(config)]
    code, _, err = fairbench(["plan", *grid, *args, "--out", str(tmp_path)], capsys)
    assert code == 2 and expected in " ".join(err.split())
