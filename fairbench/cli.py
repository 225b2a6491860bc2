"""The `fairbench` command line: run, table, methods, datasets, archs, attacks, download."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fairbench.config import ATTACK_PRECISION_HELP, ATTACK_PRECISIONS, field_docs, parse_number
from fairbench.errors import FairbenchError

console = Console()
err_console = Console(stderr=True)


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FairbenchError(f"--set expects key=value (e.g. --set warmup=5 or --set trix.beta=6), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_seeds(text: str) -> list[int]:
    """'5' -> seeds 1..5; '0,3,7' -> exactly those seeds."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
            if not seeds or min(seeds) < 0:
                raise FairbenchError(f"--seeds: seeds are integers >= 0 (1,3,7 or one seed as 2,), got {text!r}")
            return seeds
        count = int(text)
    except ValueError as err:
        raise FairbenchError(f"--seeds expects a count (5) or a list (1,3,7), got {text!r}") from err
    if count < 1:
        raise FairbenchError("--seeds must be at least 1")
    return list(range(1, count + 1))


def _load_plugins(plugins: tuple[str, ...]) -> None:
    from fairbench.registry import import_plugins

    env = [m for m in os.environ.get("FAIRBENCH_PLUGINS", "").split(",") if m.strip()]
    import_plugins([*env, *[m for p in plugins for m in p.split(",") if m.strip()]])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="fairbench")
def cli() -> None:
    """fairbench: train fairness-aware adversarial training methods, evaluate them class-wise, compare them."""


def _options(*decorators):
    """Apply click options in order: each option is declared once and shared by the commands that take it."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


GRID_OPTIONS = _options(
    click.option("--methods", "-m", default=None, help="Comma-separated method names (see `fairbench methods`)."),
    click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                 help="A grid config (benchmarks/paper/<table>.toml) instead of --methods/--dataset/--seeds/..."),
    click.option("--scale", default=None, help="A named scale of the config, e.g. smoke (the same grid, tiny, on CPU)."),
    click.option("--dataset", "-d", default="digits", show_default=True, help="See `fairbench datasets`."),
    click.option("--seeds", default="1", show_default=True,
                 help="A count (5 -> seeds 1..5) or a list (1,3,7; one chosen seed: 2,)."),
    click.option("--arch", default=None, help="Model (see `fairbench archs`); default: the dataset's."),
    click.option("--epochs", type=int, default=None, help="Default: the dataset's (150 for CIFAR/STL-10, 20 for digits)."),
    click.option("--batch-size", type=int, default=None),
    click.option("--lr", type=float, default=None, help="Default: the protocol's (0.1)."),
    click.option("--schedule", default=None, help="bag_of_tricks (DAFA/TRIX, default), trades, madry, cosine, constant."),
    click.option("--weight-decay", type=float, default=None, help="Default: the protocol's (5e-4)."),
    click.option("--protocol", type=click.Choice(["common", "official"]), default="common", show_default=True,
                 help="common: the TRADES protocol of DAFA/TRIX for every method; official: each method's own code."),
    click.option("--init-from", default=None, help="Start from the weights of a checkpoint file or run folder."),
    click.option("--hot-start-epochs", type=int, default=None,
                 help="Epochs of the hot-start run a method asks for (FRL starts from TRADES)."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Method hyperparameter, e.g. --set warmup=5, --set trix.beta=6, --set eps=8/255."),
    click.option("--attack", default="pgd20", show_default=True, help="Comma-separated evaluation attacks."),
    click.option("--eps", "eval_eps", default="8/255", show_default=True, help="Evaluation L-inf radius."),
    click.option("--eval-last", type=int, default=5, show_default=True, help="Evaluate the last k checkpoints."),
    click.option("--attack-precision", type=click.Choice(ATTACK_PRECISIONS), default="auto", show_default=True,
                 help=ATTACK_PRECISION_HELP),
    click.option("--train-per-class", type=int, default=None, help="Train on the first N images of each class."),
    click.option("--eval-per-class", type=int, default=None, help="Evaluate on the first N test images of each class."),
    click.option("--data-dir", default=None, help="Dataset root (default $FAIRBENCH_DATA or ./data)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N."),
    click.option("--amp/--no-amp", default=None, help="bf16 autocast for training (default: on with CUDA)."),
    click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False)),
    click.option("--plugins", multiple=True, help="Import these modules first (unpackaged local methods)."),
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
                 help="Intra-op threads per run (default: every core inline, cores/workers in the local pool). On "
                      "CPU, results are bit-identical between runs with the same thread count."),
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
        specs = grid_specs(config, opts["scale"], data_dir=opts["data_dir"], device=opts["device"], amp=opts["amp"])
        name = grid_name(config, opts["scale"])
    elif not opts["methods"]:
        raise FairbenchError("name the methods (--methods trades,dafa,trix) or a grid (--config benchmarks/paper/table1.toml)")
    else:
        if opts["scale"]:
            raise FairbenchError("--scale needs --config")
        specs, name = _cli_specs(opts), "grid"
    if not specs:
        raise FairbenchError("the grid holds no runs (check its methods, datasets and seeds)")
    return train_plan(specs, Path(opts["out"]), _plugin_names(opts["plugins"]), name)


def _plugin_names(plugins: tuple[str, ...]) -> tuple[str, ...]:
    env = [m for m in os.environ.get("FAIRBENCH_PLUGINS", "").split(",") if m.strip()]
    return tuple([*env, *[m.strip() for p in plugins for m in p.split(",") if m.strip()]])


def _run_index(plan, index: int, quiet: bool, threads: int | None) -> None:
    """`--index K`: entry K of the plan in this process (waits for a run another process holds)."""
    from fairbench.progress import RichReporter
    from fairbench.worker import execute, intra_op_threads

    task = plan.task(index)
    with RichReporter(err_console, quiet=quiet) as reporter, intra_op_threads(threads):
        reporter.message(f"[{index}/{len(plan.tasks) - 1}] {task.label}: {task.run_id}")
        status = execute(task, plan.out, reporter, wait=True)
    if not quiet:
        err_console.print(f"{task.run_id}: {status}")


def _launch(plan, opts: dict, quiet: bool, resume: bool = True) -> None:
    """Run a plan with the launcher the options choose; exit status 1 when any run failed."""
    from fairbench.launch import LocalPool, parse_gpus, run_inline
    from fairbench.progress import RichReporter
    from fairbench.worker import intra_op_threads

    launcher = opts["launcher"] or ("local" if opts["workers"] or opts["gpus"] else "inline")
    if opts["workers"] is not None and opts["workers"] < 1:
        raise FairbenchError(f"--workers must be at least 1, got {opts['workers']}")
    if opts["threads"] is not None and opts["threads"] < 1:
        raise FairbenchError(f"--threads must be at least 1, got {opts['threads']}")
    if launcher == "inline":
        with RichReporter(err_console, quiet=quiet) as reporter, intra_op_threads(opts["threads"]):
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
    if summary.exit_code:
        sys.exit(summary.exit_code)


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


GRID_PARAMS = ("methods", "config_path", "scale", "dataset", "seeds", "arch", "epochs", "batch_size", "lr", "schedule",
               "weight_decay", "protocol", "init_from", "hot_start_epochs", "sets", "attack", "eval_eps", "eval_last",
               "attack_precision", "train_per_class", "eval_per_class", "data_dir", "device", "amp", "out", "plugins")


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
    from fairbench.spec import RunSpec, check_overrides

    names = [m.strip() for m in opts["methods"].split(",") if m.strip()]
    overrides = _parse_sets(opts["sets"])
    check_overrides(overrides, names)
    attacks = tuple(a.strip() for a in opts["attack"].split(",") if a.strip())
    keys = ("arch", "epochs", "batch_size", "lr", "schedule", "weight_decay", "protocol", "init_from",
            "hot_start_epochs", "train_per_class", "eval_per_class", "eval_last", "data_dir", "device", "amp",
            "attack_precision")
    return [RunSpec(method=m, dataset=opts["dataset"], seed=s, overrides=overrides, attacks=attacks,
                    eval_eps=parse_number(opts["eval_eps"]), **{k: opts[k] for k in keys})
            for m in names for s in _parse_seeds(opts["seeds"])]


@cli.command(name="eval")
@click.argument("targets", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--attack", default="pgd20,aa", show_default=True, help="Comma-separated suites (see `fairbench attacks`).")
@click.option("--checkpoints", default="last5", show_default=True, help="last5 (lastN), final, all, or epochs 146,150.")
@click.option("--n-examples", type=int, default=None,
              help="Evaluate a class-stratified subset of about N test images (the first N/C of each class).")
@click.option("--eps", "eval_eps", default=None, help="L-inf radius (default: the run's, 8/255).")
@click.option("--eps-sweep", default=None, metavar="E1,E2,...",
              help="Evaluate at each radius, in /255 (0,2,4,8,16,32); rows are stored as SUITE@E/255 "
                   "(`fairbench plot --kind eps`). Without --attack, sweeps pgd20 only.")
@click.option("--attack-precision", type=click.Choice(ATTACK_PRECISIONS), default=None, help=ATTACK_PRECISION_HELP + " Default: the run's.")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
@LAUNCH_OPTIONS
@click.option("--quiet", "-q", is_flag=True)
def eval_cmd(targets, attack, checkpoints, n_examples, eval_eps, eps_sweep, attack_precision, data_dir, device,
             quiet, **launch) -> None:
    """Evaluate finished runs (RUN_DIR, a checkpoint file, or a results folder) and add the rows to their results.

    A killed evaluation resumes where it stopped when started again. Many runs are a grid of evaluations:
    --workers/--gpus/--launcher spread them like `fairbench run` does.
    """
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

    folders = []
    for target in map(Path, targets):
        if target.is_file():
            checkpoint_epoch(target)  # only RUN/checkpoints/epoch_NNNN.pt; says what eval takes otherwise
        runs = sorted(p.parent for p in target.glob("runs/*/run.json")) or sorted(p.parent for p in target.glob("*/run.json"))
        folders.extend(runs or [target])
    first = folders[0].parent.parent if folders[0].suffix == ".pt" else folders[0]
    out = first.parent.parent if first.parent.name == "runs" else first.parent
    options = {"attacks": attacks, "checkpoints": checkpoints, "data_dir": data_dir, "device": device,
               "label_eps": bool(eps_sweep), "n_examples": n_examples, "precision": attack_precision, "radii": radii}
    _launch(eval_plan(folders, options, out), launch, quiet)


@cli.command(name="ab-check")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--attack", default="aa", show_default=True, help="The suite to check.")
@click.option("--checkpoint", default="final", show_default=True, help="final, or an epoch.")
@click.option("--n-examples", type=int, default=1000, show_default=True, help="About N class-stratified test images.")
@click.option("--data-dir", default=None)
@click.option("--device", default="auto", show_default=True)
def ab_check(run_dir, attack, checkpoint, n_examples, data_dir, device) -> None:
    """Attack one checkpoint in fp32 and in bf16 and compare (evaluation.md 12.2), before tables use bf16.

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


@cli.command()
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["rich", "md", "latex", "csv"]), default="rich", show_default=True)
@click.option("--last-k", type=int, default=5, show_default=True, help="Average each run over its last k checkpoints.")
@click.option("--worst", type=click.Choice(["min", "min20"]), default="min", show_default=True,
              help="Worst class, or mean of the lowest 20% of classes (Tiny-ImageNet).")
@click.option("--baseline", default="trades", show_default=True, help="Method rho is measured against.")
@click.option("--rho-variant", type=click.Choice(["dafa", "worst_minus_avg"]), default="dafa", show_default=True)
@click.option("--attack", "attacks", default=None, help="Only these robust attacks (comma-separated).")
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False), help="Write to a file instead.")
@click.option("--paper", "paper_table", default=None, metavar="TABLE",
              help="The TRIX paper's layout: table1, table2, table3, table4, tinyimagenet (or one part: table1a, "
                   "table5b, ...). Uses the paper's worst statistic; --attack overrides its attack (aa; pgd20 for table2).")
@click.option("--compare", type=click.Choice(["paper"]), default=None,
              help="With --paper: ours beside the published numbers, difference ours - paper.")
@click.option("--check-reference", is_flag=True,
              help="Recompute the published rho of the TRIX and DAFA tables with both conventions; needs no results.")
@click.option("--union", is_flag=True,
              help="Also the suite robust under every attack suite run on a checkpoint (e.g. aa+pgd20), on the "
                   "samples all of them attacked.")
@click.option("--cascade", is_flag=True,
              help="Also the robust accuracy after each prefix of a cascade: aa:apgd-ce, aa:apgd-t, aa:fab-t.")
def table(results_dir, fmt, last_k, worst, baseline, rho_variant, attacks, output, paper_table, compare,
          check_reference, union, cascade) -> None:
    """Average / worst-class accuracy and rho per method, mean ± std over seeds; or the TRIX paper's tables."""
    from functools import partial

    from fairbench import paper
    from fairbench.tables import fairness_table, format_table, load_results

    if compare and not paper_table:
        raise FairbenchError("--compare paper needs --paper TABLE (e.g. --paper table1)")
    if check_reference:
        render = partial(paper.format_rho_check, paper.check_reference_rho(None))
    elif paper_table:
        spec = paper.resolve_table(paper_table)
        if click.get_current_context().get_parameter_source("worst") != click.core.ParameterSource.DEFAULT \
                and worst != spec.worst:
            raise FairbenchError(f"--paper {paper_table} uses the paper's worst={spec.worst}; drop --worst {worst}")
        if attacks and "," in attacks:
            raise FairbenchError("--paper shows one robust attack; give a single --attack")
        opts = dict(results_table=load_results(results_dir, union=union, cascade=cascade), table_id=paper_table,
                    last_k=last_k, baseline=baseline, rho_variant=rho_variant, attack=attacks)
        render = (partial(paper.format_comparison, paper.compare_with_paper(**opts)) if compare
                  else partial(paper.format_paper_layout, paper.paper_layout(**opts)))
    else:
        render = partial(format_table, fairness_table(
            load_results(results_dir, union=union, cascade=cascade), last_k=last_k, worst=worst, baseline=baseline,
            rho_variant=rho_variant, attacks=attacks.split(",") if attacks else None))
    rendered = render(fmt)
    if output:
        text = rendered if isinstance(rendered, str) else render("md")
        Path(output).write_text(text)
        err_console.print(f"wrote {output}")
    elif isinstance(rendered, str):
        click.echo(rendered)
    else:
        for item in rendered:
            console.print(item)
    if not check_reference:
        from fairbench.evalchecks import stored_warnings
        from fairbench.precision_ab import unchecked_bf16

        raised = stored_warnings(results_dir) + unchecked_bf16(results_dir)
        for line in raised[:20]:
            err_console.print(f"[yellow]check:[/yellow] {line}", highlight=False)
        if len(raised) > 20:
            err_console.print(f"... and {len(raised) - 20} more raised checks (see `checks` in each run.json)")


@cli.command(name="methods")
def methods_cmd() -> None:
    """List the registered methods: name, source package, description, config defaults."""
    from fairbench.registry import get_method_class, list_methods, method_source

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
def describe(method: str) -> None:
    """Every hyperparameter of METHOD with its default and meaning."""
    from fairbench.registry import get_method_class

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


@cli.command()
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Folder for the figures [RESULTS/plots].")
@click.option("--kind", type=click.Choice(["classwise", "eps", "targeted", "similarity", "confusion", "all"]),
              default="all", show_default=True, help="classwise: accuracy per class and method (TRIX Fig. 4/5); "
              "eps: robust accuracy against eps (Fig. 3); targeted: untargeted vs targeted success (Fig. 1a); "
              "similarity: DAFA/TRIX class similarity and weights; confusion: where each attack sends each class.")
@click.option("--attack", "attacks", default=None, help="Robust attack(s), comma-separated [every one evaluated].")
@click.option("--methods", "-m", default=None, help="Comma-separated methods, in legend order [all].")
@click.option("--last-k", type=int, default=5, show_default=True, help="Average each run over its last k checkpoints.")
@click.option("--pair", default=None, metavar="UNTARGETED,TARGETED",
              help="Suites compared by --kind targeted [apgd-ce,apgd-t, or the first such pair found].")
def plot(results_dir, out, kind, attacks, methods, last_k, pair) -> None:
    """Figures (PNG and PDF) of the class-wise results; prints the paths of the files written."""
    from fairbench.plots import PlotRequest, render_plots

    def names(text: str | None) -> tuple[str, ...] | None:
        return tuple(n.strip() for n in text.split(",") if n.strip()) if text else None

    if pair and len(names(pair)) != 2:
        raise FairbenchError(f"--pair expects two suites, UNTARGETED,TARGETED (e.g. apgd-ce,apgd-t); got {pair!r}")
    request = PlotRequest(Path(results_dir), Path(out) if out else Path(results_dir) / "plots", names(attacks),
                          names(methods), last_k, names(pair))
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
