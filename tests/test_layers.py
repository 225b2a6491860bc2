"""Layers that only point down: reporting reads results without importing evaluation or training code (and
without torch), evaluation attacks never import training, and the harness never imports a method file."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
REPORTING = ["tables", "paper", "plots", "stats", "records", "results", "metrics"]
"""Tables, paper layouts, figures and statistics, and the torch-free rules and files they read."""
TRAINING = {"engine", "method", "runner", "worker", "launch", "slurm", "rayrun", "adversaries", "trades_family",
            "calibration", "classweights", "averaging", "methods", "api", "cli"}
EVALUATION = {"evaluation", "evalrun", "evalchecks", "external", "export", "precision_ab", "attacks"}


def imported_modules(path: Path) -> set[str]:
    """Every `fairbench.X` / `methods.X` a file imports, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("fairbench", "methods")}


def first_level(name: str) -> str:
    """`fairbench.attacks.pgd` -> `attacks`; `fairbench.methods.trades` / `methods.x` -> `methods`."""
    parts = name.split(".")
    return "methods" if parts[0] == "methods" else (parts[1] if len(parts) > 1 else "")


@pytest.mark.parametrize("module", REPORTING)
def test_reporting_imports_neither_training_nor_evaluation(module):
    reached = {first_level(n) for n in imported_modules(ROOT / "fairbench" / f"{module}.py")}
    assert not reached & (TRAINING | EVALUATION), f"fairbench.{module} imports {sorted(reached & (TRAINING | EVALUATION))}"


def test_reporting_modules_do_not_import_torch():
    code = ("import sys\nimport fairbench.tables, fairbench.paper, fairbench.plots, fairbench.stats, "
            "fairbench.records, fairbench.results, fairbench.metrics\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('fairbench.engine')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_evaluation_attacks_do_not_import_training():
    for path in sorted((ROOT / "fairbench" / "attacks").glob("*.py")):
        if path.name == "training.py":  # the moved name: it only re-exports fairbench.adversaries
            continue
        reached = {first_level(n) for n in imported_modules(path)}
        assert not reached & TRAINING, f"{path.name} imports {sorted(reached & TRAINING)}"


def test_the_harness_never_imports_a_method_file():
    for path in sorted((ROOT / "fairbench").rglob("*.py")):
        if path.name == "registry.py":  # loads the built-in methods by name, the one way in
            continue
        assert "methods" not in {first_level(n) for n in imported_modules(path)}, path


def test_a_method_imports_only_the_harness():
    for path in sorted((ROOT / "methods").glob("*.py")):
        reached = {first_level(n) for n in imported_modules(path)}
        assert not reached & {"methods", "cli", "runner", "worker", "launch", "api", "tables", "paper", "plots"}, \
            f"{path.name} imports {sorted(reached)}"
