"""Runs on a Ray cluster: one Ray task per run, asking `num_cpus`/`num_gpus` of the scheduler, or on a local
Ray instance (127.0.0.1, no dashboard) started for the grid when no cluster address is given.

A task ships only (plan file, entry number): every run's state is on shared storage, so a task whose worker
process dies (killed, out of memory, a lost node) is retried by Ray (`max_retries`) and its run resumes
exactly from the last checkpoint; the dead worker's run lock is taken over at once on the same node, after
the lock timeout on another. A Python error is not retried (it would fail the same way) and is reported
with its run's log. A hot-started run gets its base's task as an argument, so Ray starts it only once the
base finished, and fails it without running when the base failed. The launcher waits for every run (Ray
tasks end with the process that submitted them). The Ray nodes need the data and the results folder on
shared storage (tasks run in the launcher's folder where a node has it) and the same fairbench
installation; each run's output goes to its log file under OUT/logs, not to this console.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.markup import escape

from fairbench.errors import FairbenchError
from fairbench.launch import LOGS, Summary, log_path, log_tail, summary_add, unfinished
from fairbench.plan import Plan, Task
from fairbench.worker import record_failure, task_folder

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to 0 before Ray is imported, a local Ray instance uses 127.0.0.1 for all its servers (on Linux Ray
otherwise listens on every interface), as it does on macOS and Windows."""


def run_ray(plan: Plan, plan_path: Path, address: str | None, gpus: float, cpus: float, max_retries: int,
            console: Console) -> Summary:
    """Run every unfinished task of `plan` as a Ray task with `cpus` cores and `gpus` GPUs and wait for all
    of them. `address`: a running cluster ('auto': the one this machine belongs to); None starts a local
    instance on this machine for the duration of the call (a Ray already initialised in this process is
    used as it is)."""
    if gpus < 0 or cpus <= 0 or max_retries < 0:
        raise FairbenchError(f"--gpus-per-run must be >= 0, --cpus-per-run > 0 and --max-retries >= 0 "
                             f"(got {gpus}, {cpus}, {max_retries})")
    summary, todo = unfinished(plan)
    if not todo:
        return summary
    ray, started = connect(address)
    try:
        _check_resources(ray, gpus, cpus, local=started, console=console)
        return _run(ray, plan, plan_path, todo, gpus, cpus, max_retries, summary, console)
    finally:
        if started:
            ray.shutdown()


def connect(address: str | None) -> tuple[ModuleType, bool]:
    """(the ray module, whether this call started Ray): Ray initialised for `address`, or a local instance
    with every core of this machine, bound to 127.0.0.1, without dashboard."""
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError as err:
        raise FairbenchError("--launcher ray needs Ray: pip install 'fairbench-at[ray]'") from err
    if ray.is_initialized():
        return ray, False
    quiet = {"log_to_driver": False, "logging_level": "warning"}
    try:
        if address is not None:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise FairbenchError(f"cannot start or reach {where}: {err}") from err
    return ray, True


def _check_resources(ray: ModuleType, gpus: float, cpus: float, local: bool, console: Console) -> None:
    """A task asking more than the whole cluster has would wait forever: an error on a local instance, a
    warning on a cluster (an autoscaler may add nodes)."""
    have = ray.cluster_resources()
    short = [f"{need:g} {name} per run, the cluster has {have.get(key, 0):g}"
             for name, key, need in (("GPU(s)", "GPU", gpus), ("CPU(s)", "CPU", cpus)) if need > have.get(key, 0)]
    if not short:
        return
    if local:
        raise FairbenchError(f"--launcher ray: {'; '.join(short)} (this machine); lower --gpus-per-run/"
                             f"--cpus-per-run or give --address of a cluster that has them")
    console.print(f"[yellow]warning[/yellow]: {escape('; '.join(short))}; the runs wait until nodes with "
                  f"enough resources join", highlight=False)


def _run(ray: ModuleType, plan: Plan, plan_path: Path, todo: list[Task], gpus: float, cpus: float, max_retries: int,
         summary: Summary, console: Console) -> Summary:
    """Submit `todo` in plan order (bases before their dependents) and collect each run as it ends."""
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False)(run_task)
    threads = max(1, int(cpus))
    refs: dict[str, object] = {}
    for task in todo:
        needs = [refs[n] for n in task.needs if n in refs]
        refs[task.run_id] = remote.options(name=f"fairbench:{task.run_id}").remote(
            str(Path(plan_path).resolve()), task.index, threads, os.getcwd(), time.time(), *needs)
    have = ray.cluster_resources()
    console.print(f"ray: {len(todo)} run(s) submitted, {cpus:g} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
                  + f" each, on {have.get('CPU', 0):g} CPU(s)" + (f" and {have.get('GPU', 0):g} GPU(s)"
                  if have.get("GPU") else "") + f"; logs in {Path(plan.out) / LOGS}", highlight=False)
    by_ref = {ref: task for task, ref in zip(todo, refs.values())}
    pending = list(refs.values())
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)  # a timeout keeps Ctrl-C responsive
            if ready and pending:
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                ready += more
            for ref in sorted(ready, key=lambda r: by_ref[r].index):  # a base before its dependents
                _collect(ray, plan, by_ref[ref], ref, max_retries, summary, console)
    except KeyboardInterrupt:
        summary.interrupted = True
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        console.print("interrupted: the Ray tasks are cancelled", highlight=False)
    return summary


def _collect(ray: ModuleType, plan: Plan, task: Task, ref, max_retries: int, summary: Summary,
             console: Console) -> None:
    """Count one ended task: done/skipped, or failed with its error, recorded in its run folder."""
    try:
        status = ray.get(ref)
    except Exception as err:  # noqa: BLE001 - Ray re-raises the task's error (or the base's) here
        base = next((n for n in task.needs if n in summary.failed), None)
        log = log_path(plan.out, task)
        if base is not None:
            why, log, tail = f"its hot-start base {base} failed", None, []
        else:
            why, tail = _describe(ray, err, max_retries), log_tail(log)
        record_failure(task_folder(task, plan.out), why, tail, log)
        summary.failed[task.run_id] = why + (f" (log: {log})" if log else "")
        console.print(f"[bold red]{escape(task.run_id)} failed[/bold red]: {escape(why)}", highlight=False,
                      soft_wrap=True)
        return
    summary_add(summary, task, status)
    console.print(f"{task.run_id}: {status}", highlight=False)


def _describe(ray: ModuleType, err: Exception, max_retries: int) -> str:
    """One line for a failed task: the run's own error, or how its worker died."""
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and cause is not None:
        text = str(cause) if isinstance(cause, FairbenchError) else f"{type(cause).__name__}: {cause}"
    elif isinstance(err, ray.exceptions.WorkerCrashedError):
        text = f"its Ray worker died {max_retries + 1} time(s) (killed, out of memory or its node lost)"
    else:
        text = f"{type(err).__name__}: {err}"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


# ------------------------------------------------------------------------------------------ in the worker

def run_task(plan_path: str, index: int, threads: int, cwd: str, submitted: float, *needs: str) -> str:
    """What one Ray task runs in its worker: entry `index` of the plan, with `threads` intra-op threads, in
    the launcher's folder `cwd` where this node has it (the plan's paths may be relative to it), its output
    appended to the run's log file. `needs`: the statuses of its bases (Ray passes them once they
    succeeded). Returns 'done' or 'skipped'; an error is written to the log and raised."""
    from fairbench.progress import RichReporter
    from fairbench.registry import import_plugins
    from fairbench.worker import THREADS_ENV, execute, set_threads

    os.environ.update({THREADS_ENV: str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    set_threads(threads)
    if os.path.isdir(cwd):
        os.chdir(cwd)
    plan = Plan.load(Path(plan_path))
    task = plan.task(index)
    log = log_path(plan.out, task)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        fh.write(f"--- ray task on {socket.gethostname()}:{os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                 f"{time.time() - submitted:.1f} s after submission; threads={threads} "
                 f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}\n")
        try:
            import_plugins(list(plan.plugins))
            with RichReporter(Console(file=fh, width=160, soft_wrap=True)) as reporter:
                status = execute(task, plan.out, reporter, wait=True)
        except FairbenchError as err:
            fh.write(f"error: {err}\n")
            raise
        except BaseException:
            fh.write(traceback.format_exc())
            raise
        fh.write(f"{task.run_id}: {status}\n")
    return status
