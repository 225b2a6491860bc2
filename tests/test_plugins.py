"""External methods: a real entry point in a temporary distribution, listed and trained by the CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "example_plugin" / "fairbench_example_plugin.py"


def make_distribution(site: Path, entry: str = "balanced-trades = fairbench_example_plugin:BalancedTrades") -> None:
    """A minimal installed distribution: the module plus a dist-info with an entry_points.txt."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE, site / FIXTURE.name)
    info = site / "fairbench_example_plugin-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fairbench-example-plugin\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[fairbench.methods]\n{entry}\n")


def env_with(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "250"
    return env


@pytest.mark.slow
def test_entry_point_method_is_listed_and_trained(tmp_path):
    site = tmp_path / "site"
    make_distribution(site)
    listed = subprocess.run(["fairbench", "methods"], capture_output=True, text=True, env=env_with(site))
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "balanced-trades" in line)
    assert "fairbench-example-plugin" in listed.stdout and "0.3" in listed.stdout and row

    out = tmp_path / "results"
    run = subprocess.run(["fairbench", "run", "--methods", "trades,balanced-trades", "--epochs", "2",
                          "--train-per-class", "20", "--eval-per-class", "5", "--set", "steps=1",
                          "--eval-last", "1", "--out", str(out)],
                         capture_output=True, text=True, env=env_with(site))
    assert run.returncode == 0, run.stderr
    frame = pd.concat(pd.read_parquet(p) for p in out.glob("runs/*/classwise.parquet"))
    plugin_rows = frame[frame.method == "balanced-trades"]
    assert len(plugin_rows) and set(plugin_rows.method_source) == {"fairbench-example-plugin"}
    assert set(plugin_rows.method_version) == {"0.3"}


def test_builtin_wins_a_name_clash_and_broken_plugin_only_breaks_its_runs(tmp_path, monkeypatch):
    site = tmp_path / "site"
    make_distribution(site, entry="trades = fairbench_example_plugin:BalancedTrades\n"
                                  "broken = fairbench_example_plugin_missing:Nothing")
    monkeypatch.syspath_prepend(str(site))
    import importlib

    from fairbench import registry
    from fairbench.errors import FairbenchError

    importlib.invalidate_caches()
    with pytest.warns(UserWarning, match="clashes with a built-in"):
        names = registry.list_methods()
    assert "broken" in names
    assert registry.get_method_class("trades").__module__ == "fairbench.methods.trades"
    with pytest.warns(UserWarning):
        with pytest.raises(FairbenchError, match="fairbench-example-plugin"):
            registry.get_method_class("broken")
    sys.modules.pop("fairbench_example_plugin", None)


def contributing_template() -> str:
    """The plugin pyproject.toml that CONTRIBUTING.md tells people to write."""
    text = (Path(__file__).parents[1] / "CONTRIBUTING.md").read_text()
    start = text.index("```toml\n# my-plugin/pyproject.toml") + len("```toml\n")
    return text[start:text.index("```", start)]


@pytest.mark.slow
def test_contributing_plugin_template_installs_and_depends_on_this_distribution(tmp_path):
    """The template builds with pip, its dependency names the distribution that is installed here (not the
    unrelated `fairbench` on PyPI), and the installed plugin is listed and described."""
    import tomllib
    from importlib.metadata import distribution

    from fairbench import DISTRIBUTION

    template = contributing_template()
    project = tomllib.loads(template)["project"]
    assert project["dependencies"] == [DISTRIBUTION] and distribution(DISTRIBUTION).files
    plugin = tmp_path / "my-plugin"
    plugin.mkdir()
    (plugin / "pyproject.toml").write_text(template)
    (plugin / "fairbench_mymethod.py").write_text(FIXTURE.read_text() + "\n\nMyMethod = BalancedTrades\n")
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                                "--target", str(site), str(plugin)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    listed = subprocess.run(["fairbench", "methods"], capture_output=True, text=True, env=env_with(site))
    assert listed.returncode == 0 and "mymethod" in listed.stdout and "fairbench-mymethod" in listed.stdout
    described = subprocess.run(["fairbench", "describe", "mymethod"], capture_output=True, text=True,
                               env=env_with(site))
    assert described.returncode == 0 and "temperature" in described.stdout, described.stderr


def test_unpackaged_plugins_in_every_command_that_names_methods(tmp_path, monkeypatch, capsys):
    """`--plugins module` (a decorated class, not installed) works for methods and describe, not only run."""
    from tests.conftest import run_cli

    module = tmp_path / "my_local_method.py"
    module.write_text(FIXTURE.read_text().replace("class BalancedTrades(FairAT):",
                                                  '@register_method("local-balanced")\nclass BalancedTrades(FairAT):')
                      .replace("from fairbench.method import", "from fairbench.registry import register_method\n"
                                                                 "from fairbench.method import"))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run_cli(["methods", "--plugins", "my_local_method"], capsys)
    assert code == 0 and "local-balanced" in out
    code, out, _ = run_cli(["describe", "local-balanced", "--plugins", "my_local_method"], capsys)
    assert code == 0 and "temperature" in out
    for command in ("run", "plan", "eval", "table"):
        code, out, _ = run_cli([command, "--help"], capsys)
        assert code == 0 and "--plugins" in out, command
    from fairbench import registry

    registry._LOCAL.pop("local-balanced", None)
    sys.modules.pop("my_local_method", None)
