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
