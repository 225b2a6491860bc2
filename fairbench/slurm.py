"""Runs on Slurm: one job per run through submitit (an array where no run depends on another), or a plain
sbatch array script for people who prefer to submit it themselves.

A job pickles only (plan file, entry number): every run's state is on shared storage already, so a
preempted or timed-out job is requeued and its run resumes exactly from the last checkpoint (submitit
sends USR2 before the end, calls `SlurmTask.checkpoint`, requeues the job and exits; our atomic writes
make even the SIGKILL that may follow harmless). A hot-started run waits for its base job (afterok).
The compute nodes need the data on shared storage (`fairbench download` first: nodes often have no
internet) and the same fairbench installation.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fairbench.errors import FairbenchError
from fairbench.launch import Summary, summary_add, unfinished
from fairbench.plan import Plan, run_state

SLURM = "slurm"


@dataclass(frozen=True)
class SlurmResources:
    """What one run asks of Slurm."""

    partition: str | None = None
    time_min: int | None = None
    gpus: int = 0
    cpus: int = 1
    mem: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    """Any other sbatch option, by its long name without dashes (account, qos, constraint, ...)."""

    @classmethod
    def from_options(cls, partition: str | None, time_limit: str | None, gpus: int | None, cpus: int | None,
                     mem: str | None, extra: tuple[str, ...] = ()) -> "SlurmResources":
        if gpus is not None and gpus < 0 or cpus is not None and cpus < 1:
            raise FairbenchError(f"--gpus-per-run must be >= 0 and --cpus-per-run >= 1 (got {gpus}, {cpus})")
        if mem is not None and not re.fullmatch(r"\d+[KMGT]?", mem):
            raise FairbenchError(f"--mem expects a size like 32G or 16000M, got {mem!r}")
        options = {}
        for item in extra:
            key, sep, value = item.partition("=")
            if not sep or not key.strip().lstrip("-"):
                raise FairbenchError(f"--slurm-arg expects KEY=VALUE (an sbatch option, e.g. account=lab), got {item!r}")
            options[key.strip().lstrip("-")] = value.strip()
        return cls(partition, parse_time(time_limit), gpus or 0, cpus or 1, mem, options)

    def sbatch_options(self) -> dict[str, str]:
        """The same resources as sbatch long options (for the plain array script)."""
        opts = {"partition": self.partition, "time": str(self.time_min) if self.time_min else None,
                "gpus": str(self.gpus) if self.gpus else None, "cpus-per-task": str(self.cpus), "mem": self.mem}
        return {**{k: v for k, v in opts.items() if v is not None}, **self.extra}

    def executor_parameters(self) -> dict:
        """The same resources as submitit's SlurmExecutor parameters."""
        params: dict = {"cpus_per_task": self.cpus, "additional_parameters": dict(self.extra)}
        if self.partition:
            params["partition"] = self.partition
        if self.time_min:
            params["time"] = self.time_min
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.mem:
            params["mem"] = self.mem
        return params


def parse_time(text: str | None) -> int | None:
    """Minutes from '90', '1:30:00', '2-00:00:00' (Slurm's forms); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise FairbenchError(f"--time expects minutes (90), HH:MM:SS or D-HH:MM:SS, got {text!r}")
    days, a, b, c = match.groups()
    if b is None:  # minutes, or D-HH
        minutes = int(a) * 60 if days else int(a)
    elif c is None:  # MM:SS, or D-HH:MM
        minutes = int(a) * 60 + int(b) if days else int(a) + (int(b) > 0)
    else:
        minutes = int(a) * 60 + int(b) + (int(c) > 0)
    minutes += int(days or 0) * 24 * 60
    if minutes < 1:
        raise FairbenchError(f"--time must be at least one minute, got {text!r}")
    return minutes


def sbatch_script(plan: Plan, command: str, resources: SlurmResources) -> str:
    """A plain Slurm array script: task K runs `command` with K = $SLURM_ARRAY_TASK_ID. Dependencies are
    kept by the run lock: a hot-started run whose base is not finished trains (or waits for) the base first."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=fairbench-{plan.name}", f"#SBATCH --array=0-{len(plan.tasks) - 1}",
             "#SBATCH --output=slurm-%x-%A_%a.log", "#SBATCH --requeue"]
    lines += [f"#SBATCH --{key}={value}" for key, value in resources.sbatch_options().items()]
    lines += ["",
              f"# {len(plan.tasks)} run(s) of plan {plan.name}, one per array task (`fairbench plan` lists them); a",
              "# finished run is skipped and a partial one resumes, so a requeued task or a resubmitted script",
              "# continues the grid. Job logs: slurm-<name>-<job>_<task>.log in the folder you submit from.",
              "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} FAIRBENCH_THREADS=${SLURM_CPUS_PER_TASK:-1}",
              command, ""]
    return "\n".join(lines)


class SlurmTask:
    """The callable a Slurm job runs: one plan entry. Only the plan's path and the entry number are
    pickled; a preempted or timed-out job resubmits this same small object and the run resumes from disk.
    A Python error is retried here from the last checkpoint up to `retries` times, except once Slurm has
    signalled the end of the job: submitit's requeue runs inside the training loop (a signal handler), and an
    error there (no requeue left, `scontrol requeue` failed) must end the job, not train on."""

    def __init__(self, plan_path: str, index: int, retries: int = 1):
        self.plan_path, self.index, self.retries = str(plan_path), int(index), int(retries)
        self.ending = False

    def __call__(self) -> str:
        from fairbench.progress import RichReporter
        from fairbench.registry import import_plugins
        from fairbench.worker import THREADS_ENV, execute, set_threads

        os.environ.setdefault(THREADS_ENV, os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        set_threads()
        plan = Plan.load(Path(self.plan_path))
        import_plugins(list(plan.plugins))
        task = plan.task(self.index)
        for attempt in range(self.retries + 1):
            try:
                with RichReporter() as reporter:
                    return execute(task, plan.out, reporter, wait=True)
            except FairbenchError:
                raise  # the user's input: a retry would fail the same way
            except Exception as err:  # noqa: BLE001 - a crash: retried from the last checkpoint
                if attempt == self.retries or self.ending:
                    raise
                print(f"{task.run_id}: {type(err).__name__}: {err}; retrying from the last checkpoint", flush=True)
        raise AssertionError("unreachable")

    def checkpoint(self, *args, **kwargs):
        """Called by submitit in its handler of Slurm's end-of-job signal: the job resubmits a fresh copy
        of itself (the run resumes from its last checkpoint) and this one stops."""
        import submitit

        self.ending = True
        return submitit.helpers.DelayedSubmission(SlurmTask(self.plan_path, self.index, self.retries))


def submit_slurm(plan: Plan, plan_path: Path, resources: SlurmResources, wait: bool, max_retries: int,
                 console: Console) -> Summary:
    """Submit every unfinished run: one array for the runs without dependencies, then each dependent run
    with afterok on its base's job. Returns at once unless `wait`."""
    try:
        import submitit
    except ImportError as err:
        raise FairbenchError("--launcher slurm needs submitit: pip install 'fairbench-at[slurm]'") from err
    if shutil.which("sbatch") is None:
        raise FairbenchError("--launcher slurm: sbatch is not on PATH; run this on a Slurm login node "
                             "(or write a script with `fairbench plan --format sbatch`)")
    summary, todo = unfinished(plan)
    if not todo:
        return summary
    executor = submitit.SlurmExecutor(folder=Path(plan.out) / SLURM / "%j", max_num_timeout=100)
    executor.update_parameters(job_name=f"fairbench-{plan.name}", array_parallelism=len(todo),
                               signal_delay_s=90, **resources.executor_parameters())
    jobs = {}
    free = [t for t in todo if not any(n in {x.run_id for x in todo} for n in t.needs)]
    with executor.batch():
        submitted = [executor.submit(SlurmTask(str(plan_path), t.index, max_retries)) for t in free]
    jobs.update({t.run_id: j for t, j in zip(free, submitted)})
    for task in (t for t in todo if t.run_id not in jobs):
        after = ":".join(str(jobs[n].job_id) for n in task.needs if n in jobs)
        executor.update_parameters(dependency=f"afterok:{after}" if after else None)
        jobs[task.run_id] = executor.submit(SlurmTask(str(plan_path), task.index, max_retries))
    executor.update_parameters(dependency=None)
    for task in todo:
        console.print(f"submitted {task.run_id}: job {jobs[task.run_id].job_id}", highlight=False)
    console.print(f"job logs in {Path(plan.out) / SLURM}", highlight=False)
    if not wait:
        summary.submitted = [t.run_id for t in todo]
        return summary
    return _wait(plan, todo, jobs, summary, console)


def _wait(plan: Plan, todo: list, jobs: dict, summary: Summary, console: Console, poll_s: float = 2.0) -> Summary:
    """Block until every job ended, printing each run as it finishes; failures carry the job's error."""
    pending = list(todo)
    while pending:
        for task in list(pending):
            job = jobs[task.run_id]
            if not job.done():
                continue
            pending.remove(task)
            try:
                summary_add(summary, task, job.result())
                console.print(f"{task.run_id}: {run_state(plan.out, task.run_id, task.epochs).state}", highlight=False)
            except Exception as err:  # noqa: BLE001 - submitit re-raises the job's error here
                lines = str(err).strip().splitlines()
                summary.failed[task.run_id] = f"job {job.job_id}: {lines[-1] if lines else err}"
        if pending:
            time.sleep(poll_s)
    return summary
