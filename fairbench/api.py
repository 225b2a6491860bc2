"""fairbench from Python, for notebooks and scripts: the functions the command line runs.

    import fairbench
    run = fairbench.train("trix", dataset="digits", seed=1, epochs=5, out="results")
    result = fairbench.evaluate(my_model, dataset="cifar10", attacks=("pgd20", "aa"), n_examples=1000)
    table = fairbench.fairness_table("results")
    stats = fairbench.statistics_table("results")

`train` takes the run options of `fairbench run` as keywords (`epochs=`, `train_per_class=`, `arch=`, ...)
and the method's hyperparameters as the remaining keywords (`beta=3.0`, as `--set beta=3.0`); it gives the
same run id, files, skipping and resuming as the command line, because it runs the same plan in the same way.
`evaluate` is RobustBench's `benchmark()` made class-wise: per-sample records and per-class counts of any
model that takes [0, 1] images.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from fairbench.errors import FairbenchError


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """One finished run: its id, its folder and its per-class table (classwise.parquet)."""

    run_id: str
    folder: Path
    classwise: pd.DataFrame


def train(method: str, dataset: str = "digits", seed: int = 1, out: str | Path = "results", resume: bool = True,
          quiet: bool = True, **options: Any) -> TrainedRun:
    """Train and evaluate one run (and its hot-start base, for FRL) as `fairbench run` does; a finished run is
    skipped and a partial one resumes (`resume=False` refuses to continue one, as the command without
    --resume). Keywords that are `RunSpec` fields set the run; the others are the method's hyperparameters."""
    from rich.console import Console

    from fairbench.launch import run_inline
    from fairbench.plan import train_plan
    from fairbench.progress import RichReporter
    from fairbench.results import run_dir
    from fairbench.spec import RunSpec, check_overrides, check_spec

    fields = {f.name for f in dataclasses.fields(RunSpec)}
    run_options = {k: v for k, v in options.items() if k in fields}
    overrides = {**run_options.pop("overrides", {}), **{k: v for k, v in options.items() if k not in fields}}
    if "attacks" in run_options:
        run_options["attacks"] = tuple(run_options["attacks"])
    spec = RunSpec(method=method, dataset=dataset, seed=seed, overrides=overrides, **run_options)
    check_overrides(overrides, [method])
    check_spec(spec)
    plan = train_plan([spec], Path(out))
    console = Console(stderr=True)
    with RichReporter(console, quiet=quiet) as reporter:
        summary = run_inline(plan, reporter, console, resume=resume)
    if summary.failed:
        raise FairbenchError("; ".join(f"{run}: {why}" for run, why in summary.failed.items()))
    run_id = plan.tasks[-1].run_id
    folder = run_dir(Path(out), run_id)
    return TrainedRun(run_id, folder, pd.read_parquet(folder / "classwise.parquet"))


def evaluate(model, dataset: str = "cifar10", attacks: Sequence[str] = ("pgd20", "aa"), eps: float = 8 / 255,
             n_examples: int | None = None, data_dir: str | Path | None = None, device: str = "auto",
             batch_size: int = 256, name: str = "model", out: str | Path | None = None, force: bool = False):
    """Class-wise robustness of any model taking [0, 1] images (normalisation inside): an `Evaluation` with
    per-sample records (`samples`), per-class counts (`classwise`, the layout of classwise.parquet) and the
    automatic checks; with `out`, also written as a run folder that `fairbench table` and `plot` show."""
    from fairbench.external import evaluate_model

    return evaluate_model(model, dataset, tuple(attacks), eps, n_examples, data_dir, device, batch_size, name, out,
                          force=force)


def load_model(ref: str, weights: str | Path | None = None):
    """`MODULE:FACTORY` built and `weights` loaded, as `fairbench eval --model ... --weights ...` does."""
    from fairbench.external import load_model as load

    return load(ref, weights)


def load_results(results: str | Path = "results", union: bool = False, cascade: bool = False) -> pd.DataFrame:
    """Every run's per-class rows under `results` in one frame (run x checkpoint x attack x class)."""
    from fairbench.tables import load_results as load

    return load(results, union=union, cascade=cascade)


def fairness_table(results: str | Path | pd.DataFrame = "results", last_k: int | None = 5, worst: str = "min",
                   baseline: str = "trades", attacks: Sequence[str] | None = None) -> pd.DataFrame:
    """`fairbench table` as a frame: mean/std over seeds of clean and robust average and worst-class accuracy
    and rho against `baseline`, per (dataset, arch, protocol, attack, method)."""
    from fairbench import tables

    frame = results if isinstance(results, pd.DataFrame) else tables.load_results(results)
    return tables.fairness_table(frame, last_k=last_k, worst=worst, baseline=baseline, attacks=attacks)


def statistics_table(results: str | Path | pd.DataFrame = "results", last_k: int | None = 5, worst: str = "min",
                     baseline: str = "trades", attacks: Sequence[str] | None = None):
    """`fairbench table --stats` as frames (`StatsReport.methods`, `.runs`): 95% intervals over seeds, paired
    differences against `baseline` with p-values, the worst class per seed and, from a results folder, a
    bootstrap over test samples of each run's worst-class accuracy (docs/statistics.md)."""
    from fairbench import stats, tables

    folder = None if isinstance(results, pd.DataFrame) else Path(results)
    frame = results if folder is None else tables.load_results(folder)
    return stats.statistics_table(frame, folder, last_k=last_k, worst=worst, baseline=baseline, attacks=attacks)
