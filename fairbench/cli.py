"""The `fairbench` command line: run, table, methods, datasets, archs, attacks, download."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fairbench import DISTRIBUTION
from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.files import check_writable
from fairbench.overrides import ATTACK_PRECISIONS, field_docs, parse_number
from fairbench.runspec import RunOption, from_command_line, run_option, run_options

console = Console()
err_console = Console(stderr=True)


def _load_plugins(plugins: tuple[str, ...]) -> None:
    from fairbench.registry import import_plugins

    env = [m for m in os.environ.get("FAIRBENCH_PLUGINS", "").split(",") if m.strip()]
    import_plugins([*env, *[m for p in plugins for m in p.split(",") if m.strip()]])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name=DISTRIBUTION)
def cli() -> None:
    """fairbench: train fairness-aware adversarial training methods, evaluate them class-wise, compare them."""
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warning: ...` on the terminal: a warning is for the user, its source line is not."""
    return f"warning: {message}\n"


def _options(*decorators):
    """Apply click options in order: each option is declared once and shared by the commands that take it."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


PLUGINS_OPTION = click.option("--plugins", multiple=True, help="Import these modules first (unpackaged local "
                              "methods); also $FAIRBENCH_PLUGINS, comma-separated.")
"""Shared by every command that names methods (run, plan, eval, table, paper, methods, describe)."""


class _Number(click.ParamType):
    """A float as written: 0.031, 2e-3 or 8/255. Checked here and kept as text (what `plan --format commands`
    repeats); `runspec.from_command_line` turns it into the number."""
    name = "number"

    def convert(self, value, param, ctx):
        try:
            parse_number(str(value))
        except FairbenchError as err:
            self.fail(str(err), param, ctx)
        return str(value)


class _FieldOption(click.Option):
    """A RunSpec field's option; where the field names a registry (datasets, schedules), the help ends with its
    names, looked up only when the help is shown."""

    def __init__(self, *args, names: Callable[[], Sequence[str]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.names = names

    def get_help_record(self, ctx: click.Context):
        if self.names is None:
            return super().get_help_record(ctx)
        plain, self.help = self.help, f"{self.help} One of: {', '.join(self.names())}."
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = plain


def _field_option(option: RunOption):
    """The click option of one RunSpec field: flag, default, type and help (the field's docstring) from its
    RunOption, so each run option is declared once, on the field (fairbench.runspec)."""
    flag = f"{option.flag}/--no-{option.flag[2:]}" if option.kind is bool else option.flag
    names = option.choices if callable(option.choices) else None
    return click.option(flag, *filter(None, [option.short]), option.name, cls=_FieldOption, names=names,
                        type=_click_type(option), default=option.default, multiple=option.multiple,
                        metavar=option.metavar, show_default=option.default not in (None, ()), help=option.help)


def _click_type(option: RunOption) -> click.ParamType | None:
    """Fixed choices are checked by click; a field with its own parser (seeds, --set) or a list takes text."""
    if option.choices and not callable(option.choices):
        return click.Choice(option.choices)
    if option.parse or option.axis or option.kind is bool:
        return None
    return {int: click.INT, float: _Number()}.get(option.kind)


GRID_OPTIONS = _options(
    click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                 help="A grid config (benchmarks/paper/<table>.toml). Grid options given with it (--methods, "
                      "--epochs, --seeds, ...) override the config's values."),
    click.option("--scale", default=None, help="A named scale of the config, e.g. smoke (the same grid, tiny, on CPU)."),
    *(_field_option(o) for o in run_options()),
    click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False)),
    PLUGINS_OPTION,
)
"""Which runs a grid holds (shared by `run` and `plan`)."""

SLURM_OPTIONS = _options(
    click.option("--partition", default=None, help="Slurm: the partition to submit to."),
    click.option("--time", "time_limit", default=None, metavar="MINUTES|HH:MM:SS",
                 help="Slurm: time limit per job; a job that reaches it is requeued and resumes exactly."),
    click.option("--gpus-per-run", type=int, default=None, help="Slurm/Ray: GPUs per run (default: 0)."),
    click.option("--cpus-per-run", type=int, default=None, help="Slurm/Ray: CPU cores per run (default: 1)."),
    click.option("--mem", default=None, metavar="SIZE", help="Slurm: memory per run, e.g. 32G."),
    click.option("--slurm-arg", "slurm_args", multiple=True, metavar="KEY=VALUE",
                 help="Slurm: any other sbatch option, e.g. --slurm-arg account=lab --slurm-arg qos=high."),
)
"""Resources of one run on a cluster (shared by `run`, `eval` and `plan --format sbatch`)."""

LAUNCH_OPTIONS = _options(
    click.option("--launcher", type=click.Choice(["inline", "local", "slurm", "ray"]), default=None,
                 help="Where runs execute: inline (this process, one at a time; the default), local (a pool of "
                      "worker processes; the default with --workers or --gpus), slurm (submitit), ray."),
    click.option("--workers", type=int, default=None,
                 help="Local pool: N CPU worker processes, each with its share of the cores as threads."),
    click.option("--gpus", default=None, metavar="0,1,2,3", help="Local pool: one run per GPU (CUDA_VISIBLE_DEVICES)."),
    click.option("--runs-per-gpu", type=int, default=1, show_default=True, help="Local pool: runs sharing one GPU."),
    click.option("--threads", type=int, default=None,
                 help="Intra-op threads per run (default: torch's inline, every core unless $OMP_NUM_THREADS says "
                      "otherwise; cores/workers in the local pool). On CPU, results are bit-identical between runs "
                      "with the same thread count."),
    click.option("--max-retries", type=int, default=1, show_default=True,
                 help="Retry a crashed run this many times from its last checkpoint."),
    SLURM_OPTIONS,
    click.option("--wait/--no-wait", "wait_jobs", default=False,
                 help="Slurm/Ray: block until every run ended, showing progress (Slurm default: submit and return)."),
    click.option("--address", default=None, help="Ray: the address of a running cluster (default: start a local one)."),
)
"""How runs are spread over processes, GPUs and clusters (shared by `run` and `eval`)."""


@cli.command()
@GRID_OPTIONS
@LAUNCH_OPTIONS
@click.option("--index", type=int, default=None, metavar="K",
              help="Run only entry K of the plan (`fairbench plan` lists them), e.g. $SLURM_ARRAY_TASK_ID; a partial "
                   "run resumes, a finished one is skipped.")
@click.option("--resume", is_flag=True, help="Continue runs from their last checkpoint (launchers always do).")
@click.option("--quiet", "-q", is_flag=True)
def run(index, resume, quiet, **opts) -> None:
    """Train every (method, seed) on DATASET, evaluate the last checkpoints, write per-class parquet."""
    plan = _grid_plan(opts)
    if index is None:
        _check_here(plan, opts, opts["device"])
    check_writable(Path(opts["out"]), "--out")
    if index is not None:
        _run_index(plan, index, quiet, opts["threads"])
        return
    _launch(plan, opts, quiet, resume)


@cli.command(name="plan")
@GRID_OPTIONS
@SLURM_OPTIONS
@click.option("--format", "fmt", type=click.Choice(["table", "json", "commands", "sbatch"]), default="table",
              show_default=True, help="table: runs with id, dependencies and status; json: the same for scripts; "
                                      "commands: one `fairbench run ... --index K` line per run (GNU parallel); "
                                      "sbatch: a Slurm array script running the same lines.")
def plan_cmd(fmt, **opts) -> None:
    """The unique runs of a grid (hot-start bases included) with run id, dependencies and status."""
    from fairbench.plan import run_state

    plan = _grid_plan(opts)
    out = Path(opts["out"])
    states = [run_state(out, t.run_id, t.epochs) for t in plan.tasks]
    if fmt == "json":
        click.echo(json.dumps([{**t.to_dict(), "status": s.to_dict()} for t, s in zip(plan.tasks, states)], indent=1))
    elif fmt in ("commands", "sbatch"):
        from fairbench.slurm import sbatch_script

        base = _replay(click.get_current_context(), exclude=("partition", "time_limit", "gpus_per_run",
                                                              "cpus_per_run", "mem", "slurm_args"))
        if fmt == "commands":
            for task in plan.tasks:
                click.echo(f"{base} --index {task.index}")
        else:
            click.echo(sbatch_script(plan, f"{base} --index $SLURM_ARRAY_TASK_ID", _slurm_resources(opts)))
    else:
        console.print(_plan_table(plan, states))


@cli.command()
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["rich", "json"]), default="rich", show_default=True)
@click.option("--log-lines", type=int, default=5, show_default=True, help="Last lines of each failed run's log.")
def status(results_dir, fmt, log_lines) -> None:
    """Each run under a results folder: done, partial (epoch k of E), running (host:pid, heartbeat age),
    failed (with its log's last lines) or pending (planned by a launcher, not started)."""
    from fairbench.plan import failure_log, run_states
    from fairbench.progress import format_duration

    out = Path(results_dir)
    states = run_states(out)
    if fmt == "json":
        click.echo(json.dumps([{**s.to_dict(), "log_tail": failure_log(out, s.run_id) if s.state == "failed" else []}
                               for s in states], indent=1))
        return
    if not states:
        raise FairbenchError(f"no runs under {out} (neither run folders nor saved plans); start one with `fairbench run`")
    t = Table(title=f"fairbench status: {out}", title_justify="left")
    for col in ("run id", "state", "epoch", "img/s", "ETA", "detail"):
        t.add_column(col, overflow="fold", no_wrap=col != "detail")
    colours = {"done": "green", "running": "cyan", "failed": "red", "partial": "yellow", "damaged": "magenta",
               "pending": "dim"}
    for s in states:
        detail = s.detail
        if s.state == "failed":
            detail = "\n".join([detail, *failure_log(out, s.run_id)[-log_lines:]]) if log_lines else detail
        t.add_row(s.run_id, f"[{colours[s.state]}]{s.state}[/]", f"{s.epoch}/{s.epochs}" if s.epochs else "",
                  f"{s.images_per_s:,.0f}" if s.images_per_s else "", format_duration(s.eta_s), escape(detail))
    console.print(t)
    counts = {k: sum(s.state == k for s in states) for k in colours}
    console.print(", ".join(f"{v} {k}" for k, v in counts.items() if v), highlight=False)


def _grid_plan(opts: dict):
    """The plan of the runs the grid options name; every name and option checked before anything runs."""
    from fairbench.plan import train_plan

    _load_plugins(opts["plugins"])
    if opts["config_path"]:
        from fairbench.grid import grid_name, grid_specs, load_config

        config = load_config(opts["config_path"])
        grid, given = _config_overrides(opts)
        machine = {o.name: from_command_line(o, opts[o.name]) for o in run_options() if o.scope == "machine"}
        specs = grid_specs(config, opts["scale"], grid, **machine)
        name = grid_name(config, opts["scale"])
        if given:
            err_console.print(f"{opts['config_path']}: {', '.join(given)} from the command line override the "
                              f"config's values", highlight=False, soft_wrap=True)
    elif not opts["method"]:
        raise FairbenchError("name the methods (--methods trades,dafa,trix) or a grid (--config benchmarks/paper/table1.toml)")
    else:
        if opts["scale"]:
            raise FairbenchError("--scale needs --config")
        specs, name = _cli_specs(opts), "grid"
    if not specs:
        raise FairbenchError("the grid holds no runs (check its methods, datasets and seeds)")
    return train_plan(specs, Path(opts["out"]), _plugin_names(opts["plugins"]), name)


def _config_overrides(opts: dict) -> tuple[dict, list[str]]:
    """(grid keys, flags) of the grid options given on the command line beside --config: they replace the
    config's values (after --scale), so `--config table1.toml --scale smoke --methods trix` is the smoke grid
    with TRIX only. Defaults never override."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}, []
    keyed = {o.name: o for o in run_options() if o.grid_key}
    given = [p for p in ctx.command.params if p.name in keyed and ctx.get_parameter_source(p.name) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)]
    grid = {keyed[p.name].grid_key: from_command_line(keyed[p.name], opts[p.name]) for p in given}
    return grid, [p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0] for p in given]


def _plugin_names(plugins: tuple[str, ...]) -> tuple[str, ...]:
    env = [m for m in os.environ.get("FAIRBENCH_PLUGINS", "").split(",") if m.strip()]
    return tuple([*env, *[m.strip() for p in plugins for m in p.split(",") if m.strip()]])


def _run_index(plan, index: int, quiet: bool, threads: int | None) -> None:
    """`--index K`: entry K of the plan in this process (waits for a run another process holds)."""
    from fairbench.progress import RichReporter
    from fairbench.worker import execute, intra_op_threads

    task = plan.task(index)
    with _on_interrupt(plan, [task], add_resume=False), RichReporter(err_console, quiet=quiet) as reporter, \
            intra_op_threads(threads):
        reporter.message(f"[{index}/{len(plan.tasks) - 1}] {task.label}: {task.run_id}")
        status = execute(task, plan.out, reporter, wait=True)
    if not quiet:
        err_console.print(f"{task.run_id}: {status}")


def _launch(plan, opts: dict, quiet: bool, resume: bool = True) -> None:
    """Run a plan with the launcher the options choose; exit status 1 when any run failed."""
    from fairbench.launch import LocalPool, parse_gpus, run_inline
    from fairbench.progress import RichReporter
    from fairbench.worker import intra_op_threads

    launcher = _launcher(opts)
    if opts["workers"] is not None and opts["workers"] < 1:
        raise FairbenchError(f"--workers must be at least 1, got {opts['workers']}")
    if opts["threads"] is not None and opts["threads"] < 1:
        raise FairbenchError(f"--threads must be at least 1, got {opts['threads']}")
    if launcher == "inline":
        with _on_interrupt(plan, plan.tasks, add_resume=not resume), \
                RichReporter(err_console, quiet=quiet) as reporter, intra_op_threads(opts["threads"]):
            summary = run_inline(plan, reporter, err_console, resume)
    elif launcher == "local":
        summary = LocalPool(plan, plan.save(), workers=opts["workers"], gpus=parse_gpus(opts["gpus"]),
                            runs_per_gpu=opts["runs_per_gpu"], max_retries=opts["max_retries"],
                            console=err_console, threads=opts["threads"]).run()
    elif launcher == "slurm":
        from fairbench.slurm import submit_slurm

        summary = submit_slurm(plan, plan.save(), _slurm_resources(opts), opts["wait_jobs"], opts["max_retries"],
                               err_console)
    else:
        from fairbench.rayrun import run_ray

        summary = run_ray(plan, plan.save(), opts["address"], opts["gpus_per_run"] or 0, opts["cpus_per_run"] or 1,
                          opts["max_retries"], err_console)
    if not quiet or summary.failed:
        summary.report(err_console, plan.out)
    if summary.interrupted and launcher == "local":  # the report above said "interrupted" unless quiet
        note = _interrupted_note(plan, plan.tasks, add_resume=False)
        err_console.print(note if quiet else note.removeprefix("interrupted.\n"), highlight=False, soft_wrap=True)
    if summary.exit_code:
        sys.exit(summary.exit_code)


@contextlib.contextmanager
def _on_interrupt(plan, tasks: list, add_resume: bool):
    """Ctrl-C in this process: instead of a bare `aborted`, which epochs are checkpointed and the exact
    command that continues (exit status 130)."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(_interrupted_note(plan, tasks, add_resume), highlight=False, soft_wrap=True)
        sys.exit(130)


def _interrupted_note(plan, tasks: list, add_resume: bool) -> str:
    """Where each run of `tasks` stands after an interruption, and the command line that continues them."""
    from fairbench.checkpoint import list_checkpoints
    from fairbench.results import is_finished
    from fairbench.worker import task_folder

    lines, finished, waiting = ["interrupted."], 0, 0
    for task in tasks:
        folder = task_folder(task, plan.out)
        if task.kind == "train" and is_finished(folder):
            finished += 1
        elif task.kind == "train" and (epochs := sorted(list_checkpoints(folder / "checkpoints"))):
            lines.append(f"  {task.run_id}: epoch(s) {_epoch_ranges(epochs)} of {task.epochs} checkpointed; it "
                         f"continues after epoch {epochs[-1]}")
        elif task.kind == "eval":
            if any((folder / "partial_eval").glob("*/*.parquet")):
                lines.append(f"  {task.run_id}: evaluation partly done; its finished chunks are kept under "
                             f"{folder / 'partial_eval'}")
        else:
            waiting += 1
    counts = [f"{finished} run(s) finished"] if finished else []
    counts += [f"{waiting} not started (nothing checkpointed)"] if waiting else []
    if counts:
        lines.append(f"  {', '.join(counts)}")
    words = ["fairbench", *sys.argv[1:]]
    if add_resume and "--resume" not in words:
        words.append("--resume")
    lines.append(f"continue with: {shlex.join(words)}")
    return "\n".join(lines)


def _epoch_ranges(epochs: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts, start = [], epochs[0]
    for prev, cur in zip(epochs, [*epochs[1:], None]):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def _launcher(opts: dict) -> str:
    return opts["launcher"] or ("local" if opts["workers"] or opts["gpus"] else "inline")


def _check_here(plan, opts: dict, device: str) -> None:
    """Before the first run starts on this machine (inline or a local pool): the device exists here and every
    dataset of the plan has its files, so a grid never trains one dataset for days and then stops at the
    next one's missing files. Cluster launchers skip this: their nodes may differ from this host."""
    if _launcher(opts) not in ("inline", "local"):
        return
    from fairbench.data import DataNotFoundError, check_dataset_files
    from fairbench.engine import select_device

    if not opts["gpus"]:  # a pool with --gpus gives each worker its own GPU as cuda:0
        select_device(device)
    missing = {}
    for spec in (t.spec for t in plan.tasks if t.kind == "train"):
        try:
            check_dataset_files(spec.dataset, spec.data_dir)
        except DataNotFoundError as err:
            missing.setdefault(spec.dataset, str(err))
    if missing:
        raise FairbenchError(f"the grid needs {', '.join(missing)}, whose files are missing; nothing was trained. "
                             + " ".join(f"{name}: {why}" for name, why in missing.items()))
    from fairbench.results import is_finished, run_dir
    from fairbench.runner import check_same_data

    for task in plan.tasks:  # a finished run is skipped only on the data it was trained on
        if task.kind == "train" and is_finished(run_dir(plan.out, task.run_id)):
            check_same_data(run_dir(plan.out, task.run_id), task.spec)


def _slurm_resources(opts: dict):
    from fairbench.slurm import SlurmResources

    return SlurmResources.from_options(opts["partition"], opts["time_limit"], opts["gpus_per_run"],
                                       opts["cpus_per_run"], opts["mem"], opts["slurm_args"])


def _replay(ctx: click.Context, exclude: tuple[str, ...] = ()) -> str:
    """`fairbench run` with the grid options given on this command line (for --format commands|sbatch)."""
    words = ["fairbench", "run"]
    for param in ctx.command.params:
        name = param.name
        if name in exclude or name not in GRID_PARAMS:
            continue
        if ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        flag = param.opts[-1] if param.opts[-1].startswith("--") else param.opts[0]
        if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
            words.append(flag if value else param.secondary_opts[0])
        elif isinstance(value, tuple):
            words.extend(w for v in value for w in (flag, v))
        else:
            words.extend((flag, str(value)))
    return shlex.join(words)


GRID_PARAMS = ("config_path", "scale", *(o.name for o in run_options()), "out", "plugins")


def _plan_table(plan, states) -> Table:
    t = Table(title=f"plan {plan.name}: {len(plan.tasks)} run(s) under {plan.out}", title_justify="left")
    for col in ("#", "run id", "needs", "epochs", "status"):
        t.add_column(col, overflow="fold", no_wrap=col == "run id")
    for task, s in zip(plan.tasks, states):
        needs = ", ".join(f"#{_index_of(plan, n)}" for n in task.needs)
        progress = f" ({s.epoch}/{s.epochs})" if s.state in ("partial", "running", "failed") else ""
        t.add_row(str(task.index), task.run_id, needs, str(task.epochs), s.state + progress)
    return t


def _index_of(plan, run_id: str) -> int:
    return next(t.index for t in plan.tasks if t.run_id == run_id)


def _cli_specs(opts: dict) -> list:
    """The runs the grid options name without --config: one per method and seed, every RunSpec field from its
    option."""
    from fairbench.grid import run_specs

    return run_specs({o.name: from_command_line(o, opts[o.name]) for o in run_options()})


@cli.command(name="eval")
@click.argument("targets", nargs=-1, type=click.Path(exists=True))
@click.option("--model", "model_ref", default=None, metavar="MODULE:FACTORY",
              help="Evaluate a model fairbench did not train: FACTORY() in MODULE returns it (inputs in [0, 1], "
                   "normalisation inside, logits out); needs --dataset and --name.")
@click.option("--weights", default=None, type=click.Path(exists=True, dir_okay=False),
              help="With --model: a state_dict to load (also under a `state_dict`/`model` key, `module.` prefixes "
                   "accepted; read with weights_only=True).")
@click.option("--dataset", "model_dataset", default=None, help="With --model: the test set to evaluate on.")
@click.option("--name", "model_name", default=None, help="With --model: the label of its rows in tables and plots.")
@click.option("--out", "model_out", default="results", show_default=True, type=click.Path(file_okay=False),
              help="With --model: the results folder its run folder goes to.")
@click.option("--attack", default="pgd20,aa", show_default=True, help="Comma-separated suites (see `fairbench attacks`).")
@click.option("--checkpoints", default="last5", show_default=True, help="last5 (lastN), final, all, or epochs 146,150.")
@click.option("--n-examples", type=int, default=None,
              help="Evaluate a class-stratified subset of about N test images (the first N/C of each class).")
@click.option("--eps", "eval_eps", default=None, help="L-inf radius (default: the run's, 8/255).")
@click.option("--eps-sweep", default=None, metavar="E1,E2,...",
              help="Evaluate at each radius, in /255 (0,2,4,8,16,32); rows are stored as SUITE@E/255 "
                   "(`fairbench plot --kind eps`). Without --attack, sweeps pgd20 only.")
@click.option("--attack-precision", type=click.Choice(ATTACK_PRECISIONS), default=None,
              help=run_option("attack_precision").help + " Default: the run's.")
@click.option("--data-dir", default=None, help="Dataset root (default: the one each run was trained with, from its "
                                               "run.json; else $FAIRBENCH_DATA or ./data).")
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True,
              help="Replace stored rows of a suite even when they cover more test samples than this evaluation.")
@LAUNCH_OPTIONS
@PLUGINS_OPTION
@click.option("--quiet", "-q", is_flag=True)
def eval_cmd(targets, model_ref, weights, model_dataset, model_name, model_out, attack, checkpoints, n_examples,
             eval_eps, eps_sweep, attack_precision, data_dir, device, force, plugins, quiet, **launch) -> None:
    """Evaluate finished runs (RUN_DIR, a checkpoint file, or a results folder) and add the rows to their results;
    or, with --model, a model fairbench did not train.

    A killed evaluation resumes where it stopped when started again. Many runs are a grid of evaluations:
    --workers/--gpus/--launcher spread them like `fairbench run` does.
    """
    _load_plugins(plugins)
    if model_ref or weights or model_dataset or model_name:
        _eval_external(targets, model_ref, weights, model_dataset, model_name, model_out, attack, n_examples,
                       eval_eps, data_dir, device, force, quiet)
        return
    if not targets:
        raise FairbenchError("name what to evaluate: a run folder, a checkpoint file or a results folder, or a "
                             "model with --model MODULE:FACTORY --dataset D --name LABEL")
    from fairbench.plan import eval_plan

    source = click.get_current_context().get_parameter_source("attack")
    if eps_sweep and source == click.core.ParameterSource.DEFAULT:
        attack = "pgd20"  # the paper's Figure 3; AutoAttack at six radii is rarely what was meant
    attacks = [a.strip() for a in attack.split(",") if a.strip()]
    from fairbench.attacks.registry import create_attack

    for a in attacks:
        if a != "clean":
            create_attack(a, 8 / 255)
    radii = _eps_sweep(eps_sweep, eval_eps, attacks) if eps_sweep else [
        parse_number(eval_eps) if eval_eps else None]
    if radii[0] is not None and radii[0] < 0:
        raise FairbenchError(f"--eps must be >= 0, got {eval_eps}")
    if n_examples is not None and n_examples < 1:
        raise FairbenchError(f"--n-examples must be at least 1 (or left out for the whole test set), got {n_examples}")
    from fairbench.evalrun import checkpoint_epoch
    from fairbench.results import RUN_JSON, find_runs

    folders = []
    for target in map(Path, targets):
        if target.is_file():
            checkpoint_epoch(target)  # only RUN/checkpoints/epoch_NNNN.pt; says what eval takes otherwise
        if target.is_file() or (target / RUN_JSON).is_file():
            if _is_external(target):
                raise FairbenchError(f"{target} holds an outside model's evaluation; evaluate that model again "
                                     "with `fairbench eval --model MODULE:FACTORY --dataset D --name LABEL`")
            folders.append(target)
            continue
        found = find_runs(target)  # a results folder: every finished run under it
        for folder, _ in (f for f in found if f[1].get("external")):
            err_console.print(f"{folder.name}: an outside model's evaluation, left out (evaluate it again with "
                              "`fairbench eval --model ...`)", highlight=False)
        folders.extend([folder for folder, meta in found if not meta.get("external")] or
                       ([] if found else [target]))
    if not folders:
        raise FairbenchError("nothing to evaluate: the folders hold only outside models' evaluations")
    first = folders[0].parent.parent if folders[0].suffix == ".pt" else folders[0]
    out = first.parent.parent if first.parent.name == "runs" else first.parent
    options = {"attacks": attacks, "checkpoints": checkpoints, "data_dir": data_dir, "device": device,
               "label_eps": bool(eps_sweep), "n_examples": n_examples, "precision": attack_precision, "radii": radii,
               "force": force}
    plan = eval_plan(folders, options, out, _plugin_names(plugins))
    _check_here(plan, launch, device)
    _launch(plan, launch, quiet)


def _is_external(folder: Path) -> bool:
    """A run folder written by `fairbench eval --model` (no training spec to evaluate it from)."""
    try:
        return bool(json.loads((folder / "run.json").read_text()).get("external"))
    except (OSError, ValueError, AttributeError):
        return False


def _eval_external(targets, model_ref, weights, dataset, name, out, attack, n_examples, eval_eps, data_dir, device,
                   force, quiet) -> None:
    """`fairbench eval --model MODULE:FACTORY --dataset D --name LABEL`: one model, class-wise, into OUT."""
    from fairbench.external import evaluate_model, load_model
    from fairbench.progress import RichReporter

    missing = [opt for opt, value in (("--model", model_ref), ("--dataset", dataset), ("--name", name)) if not value]
    if missing:
        raise FairbenchError(f"evaluating an outside model needs {', '.join(missing)} too "
                             "(--model MODULE:FACTORY --dataset D --name LABEL [--weights FILE])")
    if targets:
        raise FairbenchError("--model evaluates one model; leave out the run folders (evaluate them in another call)")
    check_writable(Path(out), "--out")
    model = load_model(model_ref, weights)
    attacks = [a.strip() for a in attack.split(",") if a.strip()]
    eps = parse_number(eval_eps) if eval_eps else 8 / 255
    with RichReporter(err_console, quiet=quiet) as reporter:
        result = evaluate_model(model, dataset, attacks, eps, n_examples, data_dir, device, name=name, out=out,
                                force=force, reporter=reporter)
    if not quiet:
        err_console.print(f"wrote {result.folder / 'classwise.parquet'}", highlight=False)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["robustbench"]), default="robustbench", show_default=True,
              help="robustbench: the weights as a plain state_dict and RobustBench's model-info JSON.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for NAME.pt and NAME.json.")
@click.option("--name", default=None, help="The model's name (file names and the JSON's name) [the run id].")
@click.option("--checkpoint", default="final", show_default=True, help="final, or an epoch.")
@click.option("--data-dir", default=None, help="Dataset root (default: the one the run was trained with).")
@click.option("--force", is_flag=True, help="Replace an earlier export of the same name.")
def export(run_dir, fmt, out, name, checkpoint, data_dir, force) -> None:
    """Export a finished run: RobustBench's files, numbers from the run's own AutoAttack records on the full
    test set (`fairbench eval RUN --attack aa --checkpoints final` first)."""
    from fairbench.export import export_robustbench

    epoch = None if checkpoint == "final" else parse_epoch(checkpoint, "--checkpoint")
    paths = export_robustbench(Path(run_dir), Path(out), name, epoch, data_dir, force)
    console.print(f"wrote {paths.weights} and {paths.info}", highlight=False)


def parse_epoch(text: str, option: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise FairbenchError(f"{option} expects final or an epoch number >= 1, got {text!r}")
    return int(text)


@cli.command(name="ab-check")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--attack", default="aa", show_default=True, help="The suite to check.")
@click.option("--checkpoint", default="final", show_default=True, help="final, or an epoch.")
@click.option("--n-examples", type=int, default=1000, show_default=True, help="About N class-stratified test images.")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def ab_check(run_dir, attack, checkpoint, n_examples, data_dir, device) -> None:
    """Attack one checkpoint in fp32 and in bf16 and compare (docs/evaluation.md §12), before tables use bf16.

    Passes within 0.3 points overall and within 2 binomial standard errors per class; the result is stored
    in the run's run.json. Exit status 1 if it fails: keep fp32 for this dataset and architecture.
    """
    from fairbench.attacks.registry import create_attack
    from fairbench.precision_ab import run_precision_ab
    from fairbench.progress import RichReporter

    create_attack(attack, 8 / 255)  # an unknown name fails before any work
    with RichReporter(err_console) as reporter:
        ab = run_precision_ab(Path(run_dir), attack, checkpoint, n_examples, data_dir, device, reporter)
    click.echo(ab.summary())
    if not ab.passed:
        sys.exit(1)


def _eps_sweep(text: str, eval_eps: str | None, attacks: list[str]) -> list[float]:
    """'0,2,4,8' -> radii k/255 (an entry with '/' is taken as written); every attack must use them."""
    from fairbench.attacks.registry import create_attack

    if eval_eps:
        raise FairbenchError("--eps and --eps-sweep exclude each other; put every radius in --eps-sweep")
    radii = [parse_number(e) if "/" in e else parse_number(e) / 255 for e in text.split(",") if e.strip()]
    if not radii or min(radii) < 0:
        raise FairbenchError(f"--eps-sweep expects radii >= 0 in /255, like 0,2,4,8,16,32; got {text!r}")
    for a in (a for a in attacks if a != "clean"):
        if len({create_attack(a, e).eps for e in radii}) < len(set(radii)):
            raise FairbenchError(f"attack {a!r} has a fixed radius and ignores --eps-sweep; sweep pgd20")
    return radii


TABLE_OPTIONS = _options(
    click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(file_okay=False)),
    click.option("--last-k", type=int, default=5, show_default=True,
                 help="Average each run over its last k checkpoints."),
    click.option("--baseline", default="trades", show_default=True,
                 help="Method rho (and --stats' paired differences) is measured against."),
    click.option("--rho-variant", type=click.Choice(["dafa", "worst_minus_avg"]), default="dafa", show_default=True),
    click.option("--union", is_flag=True,
                 help="Also the suite robust under every attack suite run on a checkpoint (e.g. aa+pgd20), on the "
                      "samples all of them attacked."),
    click.option("--cascade", is_flag=True,
                 help="Also the robust accuracy after each prefix of a cascade: aa:apgd-ce, aa:apgd-t, aa:fab-t."),
    PLUGINS_OPTION,
)
"""Which results a table is computed from, and how (shared by `table` and `paper TABLE`)."""

OUTPUT_OPTIONS = _options(
    click.option("--format", "fmt", type=click.Choice(["rich", "md", "latex", "csv"]), default="rich",
                 show_default=True),
    click.option("--output", "-o", default=None, type=click.Path(dir_okay=False), help="Write to a file instead."),
)
"""How a table is printed (shared by `table` and the `paper` commands)."""


@cli.command()
@TABLE_OPTIONS
@click.option("--worst", type=click.Choice(["min", "min20"]), default="min", show_default=True,
              help="Worst class, or mean of the lowest 20% of classes (Tiny-ImageNet).")
@click.option("--attack", "attacks", default=None, help="Only these robust attacks (comma-separated).")
@click.option("--stats", "with_stats", is_flag=True,
              help="How sure the numbers are: 95% intervals over seeds, paired differences against --baseline with "
                   "p-values, the worst class per seed, a bootstrap over test samples (docs/statistics.md).")
@OUTPUT_OPTIONS
@click.option("--paper", "paper_table", default=None, hidden=True)  # deprecated: `fairbench paper TABLE`
@click.option("--compare", type=click.Choice(["paper"]), default=None, hidden=True)
@click.option("--check-reference", is_flag=True, hidden=True)
def table(results_dir, last_k, baseline, rho_variant, union, cascade, plugins, worst, attacks, with_stats, fmt, output,
          paper_table, compare, check_reference) -> None:
    """Average / worst-class accuracy and rho per method, mean ± std over seeds (--stats: how sure they are).
    The TRIX paper's tables: `fairbench paper TABLE`."""
    if paper_table or compare or check_reference:
        _old_paper_flags(click.get_current_context())
        return
    from functools import partial

    _load_plugins(plugins)

    from fairbench.tables import fairness_table, format_table, load_results

    results, chosen = load_results(results_dir, union=union, cascade=cascade), attacks.split(",") if attacks else None
    if with_stats:
        from fairbench.stats import format_statistics, statistics_table

        render = partial(format_statistics, statistics_table(results, results_dir, last_k=last_k, worst=worst,
                                                             baseline=baseline, attacks=chosen))
    else:
        render = partial(format_table, fairness_table(results, last_k=last_k, worst=worst, baseline=baseline,
                                                      rho_variant=rho_variant, attacks=chosen))
    _emit(render, fmt, output)
    _report_checks(results_dir)


class _PaperGroup(click.Group):
    """`fairbench paper TABLE [OPTIONS]`: a name that is none of the group's commands (check-reference) is a table
    id, shown by `table_command`, which reads it from its context's name (so its usage line says `paper table1`)."""
    table_command: click.Command

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or (None if cmd_name.startswith("-") else self.table_command)


@cli.group(cls=_PaperGroup)
def paper() -> None:
    """The TRIX paper's tables (arXiv 2507.07768) from fairbench results, and its published numbers.

    \b
    fairbench paper TABLE [--compare paper]  ours in the paper's layout (its methods, columns and worst
                                             statistic), or beside the published numbers (ours - paper)
    fairbench paper check-reference          which published rho entries each rho formula reproduces

    TABLE: table1, table2, table3, table4, tinyimagenet, or one part (table1a, table5b, ...).
    `fairbench paper TABLE --help` lists its options.
    """


@click.command()
@TABLE_OPTIONS
@click.option("--attack", default=None, help="The robust attack [the paper's: aa; pgd20 for table2].")
@click.option("--compare", type=click.Choice(["paper"]), default=None,
              help="Ours beside the published numbers, difference ours - paper.")
@OUTPUT_OPTIONS
def paper_table(results_dir, last_k, baseline, rho_variant, union, cascade, plugins, attack, compare, fmt,
                output) -> None:
    """One of the TRIX paper's tables in its layout, from the results (mean ± std over seeds, the best of each
    column in bold); with --compare paper, beside the published numbers."""
    from fairbench import paper as paper_tables

    table_id = click.get_current_context().info_name
    if table_id not in paper_tables.table_ids():
        raise UnknownNameError("paper table (or command)", table_id, [*paper_tables.table_ids(), *paper.commands])
    _load_plugins(plugins)
    _show_paper_table(table_id, compare, attack, results_dir, last_k, baseline, rho_variant, union, cascade, fmt,
                      output)


paper.table_command = paper_table


@paper.command(name="check-reference")
@OUTPUT_OPTIONS
def check_reference_cmd(fmt, output) -> None:
    """Recompute the published rho of the TRIX and DAFA tables from their published accuracies with both
    conventions (docs/metrics.md §5), and say which entry needs which; needs no results."""
    _show_rho_check(fmt, output)


def _show_paper_table(table_id: str, compare: str | None, attack: str | None, results_dir: str, last_k: int,
                      baseline: str, rho_variant: str, union: bool, cascade: bool, fmt: str, output: str | None) -> None:
    """`fairbench paper TABLE`: the layout, or with `compare` the comparison with the published numbers."""
    from functools import partial

    from fairbench import paper as paper_tables
    from fairbench.tables import load_results

    if attack and "," in attack:
        raise FairbenchError("a paper table shows one robust attack; give a single --attack")
    opts = dict(results_table=load_results(results_dir, union=union, cascade=cascade), table_id=table_id,
                last_k=last_k, baseline=baseline, rho_variant=rho_variant, attack=attack)
    render = (partial(paper_tables.format_comparison, paper_tables.compare_with_paper(**opts)) if compare
              else partial(paper_tables.format_paper_layout, paper_tables.paper_layout(**opts)))
    _emit(render, fmt, output)
    _report_checks(results_dir)


def _show_rho_check(fmt: str, output: str | None) -> None:
    """`fairbench paper check-reference`: every published rho recomputed with both conventions."""
    from functools import partial

    from fairbench import paper as paper_tables

    _emit(partial(paper_tables.format_rho_check, paper_tables.check_reference_rho(None)), fmt, output)


def _old_paper_flags(ctx: click.Context) -> None:
    """`table --paper T [--compare paper]` and `table --check-reference`, kept for one release: the same checks
    and output as the `paper` commands, after a one-line note naming the command to use instead."""
    p = ctx.params
    if p["compare"] and not p["paper_table"]:
        raise FairbenchError("--compare paper needs --paper TABLE (e.g. --paper table1)")
    if p["with_stats"]:
        raise FairbenchError("--stats is a table of its own; the paper layouts carry the significance of TRIX vs "
                             "TRADES as a note. Drop --paper/--check-reference or --stats")
    new = "check-reference" if p["check_reference"] else p["paper_table"] + (" --compare paper" if p["compare"] else "")
    err_console.print(f"note: `fairbench table --paper/--compare/--check-reference` is deprecated and goes in the "
                      f"next release; use `fairbench paper {new}`", highlight=False, soft_wrap=True)
    if p["check_reference"]:
        _show_rho_check(p["fmt"], p["output"])
        return
    from fairbench import paper as paper_tables

    _load_plugins(p["plugins"])
    worst = paper_tables.resolve_table(p["paper_table"]).worst
    if ctx.get_parameter_source("worst") != click.core.ParameterSource.DEFAULT and p["worst"] != worst:
        raise FairbenchError(f"--paper {p['paper_table']} uses the paper's worst={worst}; drop --worst {p['worst']}")
    _show_paper_table(p["paper_table"], p["compare"], p["attacks"], p["results_dir"], p["last_k"], p["baseline"],
                      p["rho_variant"], p["union"], p["cascade"], p["fmt"], p["output"])


def _emit(render: Callable[[str], Any], fmt: str, output: str | None) -> None:
    """Print a rendered table, or write it to `output` (as markdown where the format is rich)."""
    rendered = render(fmt)
    if output:
        Path(output).write_text(rendered if isinstance(rendered, str) else render("md"))
        err_console.print(f"wrote {output}")
    elif isinstance(rendered, str):
        click.echo(rendered)
    else:
        for item in rendered:
            console.print(item)


def _report_checks(results_dir: str) -> None:
    """The checks the runs under `results_dir` raised (stored warnings, unchecked bf16 attacks), under a table."""
    from fairbench.evalchecks import stored_warnings
    from fairbench.precision_ab import unchecked_bf16

    raised = stored_warnings(results_dir) + unchecked_bf16(results_dir)
    for line in raised[:20]:
        err_console.print(f"[yellow]check:[/yellow] {line}", highlight=False)
    if len(raised) > 20:
        err_console.print(f"... and {len(raised) - 20} more raised checks (see `checks` in each run.json)")


@cli.command(name="methods")
@PLUGINS_OPTION
def methods_cmd(plugins: tuple[str, ...]) -> None:
    """List the registered methods: name, source package, description, config defaults."""
    from fairbench.registry import get_method_class, list_methods, method_source

    _load_plugins(plugins)

    t = Table(title="fairbench methods", show_lines=True)
    for col in ("method", "source", "description", "defaults"):
        t.add_column(col, overflow="fold")
    for name in list_methods():
        src = method_source(name)
        try:
            cls = get_method_class(name)
            defaults = ", ".join(f"{f.name}={getattr(cls.Config(), f.name)}" for f in dataclasses.fields(cls.Config))
            desc = cls.description or (cls.__doc__ or "").strip().splitlines()[0]
        except FairbenchError as err:
            defaults, desc = "", f"[red]{err}[/red]"
        t.add_row(name, f"{src.package} {src.version}".strip(), desc, defaults)
    console.print(t)


@cli.command()
@click.argument("method")
@PLUGINS_OPTION
def describe(method: str, plugins: tuple[str, ...]) -> None:
    """Every hyperparameter of METHOD with its default and meaning."""
    from fairbench.registry import get_method_class

    _load_plugins(plugins)

    cls = get_method_class(method)
    docs = field_docs_all(cls.Config)
    t = Table(title=f"{method}: {cls.description}")
    for col in ("option", "default", "meaning"):
        t.add_column(col, overflow="fold")
    for f in dataclasses.fields(cls.Config):
        t.add_row(f.name, str(getattr(cls.Config(), f.name)), docs.get(f.name, ""))
    console.print(t)


def field_docs_all(config_cls: type) -> dict[str, str]:
    """Field docstrings along the config's dataclass bases (subclasses override)."""
    docs: dict[str, str] = {}
    for base in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    return docs


@cli.command()
def datasets() -> None:
    """List the datasets, their default scale and where their files are expected."""
    from fairbench.data import DATASETS, default_data_root

    t = Table(title=f"fairbench datasets (data root: {default_data_root()})")
    for col in ("dataset", "description", "default arch / epochs / batch", "files under the data root"):
        t.add_column(col, overflow="fold")
    for name, info in sorted(DATASETS.items()):
        d = info.defaults
        t.add_row(name, info.description, f"{d.arch} / {d.epochs} / {d.batch_size}", info.subdir or "(embedded)")
    console.print(t)


@cli.command()
def archs() -> None:
    """List the model architectures."""
    from fairbench.models import MODELS

    t = Table(title="fairbench architectures")
    t.add_column("arch"), t.add_column("description")
    for name, info in sorted(MODELS.items()):
        t.add_row(name, info.description)
    console.print(t)


@cli.command()
def attacks() -> None:
    """List the evaluation attacks."""
    from fairbench.attacks.registry import DESCRIPTIONS, list_attacks

    t = Table(title="fairbench attacks")
    t.add_column("attack"), t.add_column("description")
    t.add_row("clean", "no attack (always evaluated)")
    for name in list_attacks():
        t.add_row(name, DESCRIPTIONS[name])
    console.print(t)


@cli.command()
@click.argument("dataset")
@click.option("--data-dir", default=None, help="Dataset root (default $FAIRBENCH_DATA or ./data).")
def download(dataset: str, data_dir: str | None) -> None:
    """Fetch DATASET's official archives into the data root and verify their checksums."""
    from fairbench.data import default_data_root
    from fairbench.data.download import download as fetch

    root = Path(data_dir) if data_dir else default_data_root()
    path = fetch(dataset, root)
    console.print(f"{dataset} is ready under {path}")


PLOT_KINDS = ("classwise", "eps", "targeted", "similarity", "confusion", "worstclass", "training")
"""`plots.RENDERERS`' names, listed here so the command line starts without matplotlib (a test keeps them equal)."""


@cli.command()
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Folder for the figures [RESULTS/plots].")
@click.option("--kind", type=click.Choice([*PLOT_KINDS, "all"]),
              default="all", show_default=True, help="classwise: accuracy per class and method (TRIX Fig. 4/5); "
              "eps: robust accuracy against eps (Fig. 3); targeted: untargeted vs targeted success (Fig. 1a); "
              "similarity: DAFA/TRIX class similarity and weights; confusion: where each attack sends each class; "
              "worstclass: which class is the worst in how many seeds, per method; training: class-wise PGD-20 "
              "accuracy over the epochs (runs trained with --track-every).")
@click.option("--attack", "attacks", default=None, help="Robust attack(s), comma-separated [every one evaluated].")
@click.option("--methods", "-m", default=None, help="Comma-separated methods, in legend order [all].")
@click.option("--last-k", type=int, default=5, show_default=True, help="Average each run over its last k checkpoints.")
@click.option("--pair", default=None, metavar="UNTARGETED,TARGETED",
              help="Suites compared by --kind targeted [apgd-ce,apgd-t, or the first such pair found].")
@click.option("--zoom", is_flag=True, help="Class-wise figures: fit the y-axis to the data instead of 0-100.")
def plot(results_dir, out, kind, attacks, methods, last_k, pair, zoom) -> None:
    """Figures (PNG and PDF) of the class-wise results; prints the paths of the files written."""
    from fairbench.plots import PlotRequest, render_plots

    def names(text: str | None) -> tuple[str, ...] | None:
        return tuple(n.strip() for n in text.split(",") if n.strip()) if text else None

    if pair and len(names(pair)) != 2:
        raise FairbenchError(f"--pair expects two suites, UNTARGETED,TARGETED (e.g. apgd-ce,apgd-t); got {pair!r}")
    request = PlotRequest(Path(results_dir), Path(out) if out else Path(results_dir) / "plots", names(attacks),
                          names(methods), last_k, names(pair), zoom)
    report = render_plots(request, kind)
    for note in report.skipped:
        err_console.print(f"[yellow]skipped[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    for path in report.paths:
        click.echo(str(path))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except FairbenchError as err:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted: finished epochs are checkpointed; rerun the same command with --resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
