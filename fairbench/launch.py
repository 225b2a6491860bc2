"""Where runs execute: in this process, in a pool of local worker processes (CPU workers or one GPU
each), on Slurm through submitit, or on a Ray cluster.

Every launcher runs the same `fairbench.worker.execute` on the tasks of a `Plan`, so each keeps what a single
run guarantees: a partial run resumes exactly, a finished one is skipped, results are written atomically,
and the run lock keeps two processes (two launchers on one grid, a requeued job and its predecessor) off
one run folder. A task whose dependency (a hot start's base) has not finished is not started.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from fairbench.errors import FairbenchError
from fairbench.lock import RunLockedError, read_lock
from fairbench.plan import Plan, Task, run_state
from fairbench.progress import format_duration
from fairbench.results import is_finished, run_dir
from fairbench.worker import EXIT_LOCKED, THREADS_ENV, execute, record_failure, task_folder

LOGS = "logs"


@dataclass
class Summary:
    """What a launcher did: run ids by outcome, and where the failed runs' logs are."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """run id -> error and log path."""
    interrupted: bool = False
    submitted: list[str] = field(default_factory=list)
    """Run ids handed to a cluster that runs them later (Slurm without --wait)."""

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)

    def report(self, console: Console, out: Path) -> None:
        if self.submitted:
            console.print(f"submitted {len(self.submitted)} run(s), {len(self.skipped)} finished earlier; "
                          f"`fairbench status --results {out}` follows them", highlight=False)
        else:
            console.print(f"done: {len(self.done)} run(s) trained or evaluated now, {len(self.skipped)} finished "
                          f"earlier; results in {out}; `fairbench status --results {out}` shows them", highlight=False)
        for run_id, why in self.failed.items():
            console.print(f"[bold red]failed[/bold red] {escape(run_id)}: {escape(why)}", highlight=False,
                          soft_wrap=True)
        if self.interrupted:
            console.print("interrupted: finished epochs are checkpointed; run the same command again to continue")


def log_path(out: Path, task: Task) -> Path:
    return Path(out) / LOGS / f"{task.run_id}{'' if task.kind == 'train' else '.eval'}.log"


def unfinished(plan: Plan) -> tuple[Summary, list[Task]]:
    """The tasks still to run, and a summary that counts the finished training runs as skipped (cluster
    launchers submit only what is left)."""
    summary, todo = Summary(), []
    for task in plan.tasks:
        if task.kind == "train" and is_finished(run_dir(plan.out, task.run_id)):
            summary_add(summary, task, "skipped")
        else:
            todo.append(task)
    return summary, todo


def needs_met(task: Task, out: Path) -> bool:
    return all(is_finished(run_dir(out, need)) for need in task.needs)


# ------------------------------------------------------------------------------------------------ inline

def run_inline(plan: Plan, reporter, console: Console, resume: bool = True) -> Summary:
    """Every task in this process, in plan order. A run another process holds is deferred and waited for
    at the end (it is then finished and skipped), so this process first does the work nobody else does."""
    summary, deferred = Summary(), []
    for task in plan.tasks:
        reporter.message(f"[{task.index + 1}/{len(plan.tasks)}] {task.label}: {task.run_id}")
        try:
            summary_add(summary, task, execute(task, plan.out, reporter, wait=False, resume=resume))
        except RunLockedError as err:
            reporter.message(f"  {err.holder.describe()} holds it: moving on, back to it at the end")
            deferred.append(task)
    for task in deferred:
        summary_add(summary, task, execute(task, plan.out, reporter, wait=True, resume=resume))
    return summary


def summary_add(summary: Summary, task: Task, status: str) -> None:
    (summary.done if status == "done" else summary.skipped).append(task.run_id)


# ------------------------------------------------------------------------------------------- local pool

@dataclass
class Slot:
    """One worker place: a CPU share, or a GPU (several runs may share one with --runs-per-gpu)."""

    number: int
    gpu: str | None
    threads: int
    task: Task | None = None
    process: subprocess.Popen | None = None
    """A `python -m fairbench.worker --serve` process, kept for the next run while it stays healthy."""
    status_fd: int = -1
    """Read end of the pipe on which the worker reports 'INDEX STATUS' after each run."""
    pending: bytes = b""
    started: float = 0.0


class LocalPool:
    """A process pool on this machine: one `python -m fairbench.worker --serve` process per slot, running
    one run after another (Python, torch and the data load once per worker), each with its share of the
    cores as intra-op threads and, with `gpus`, one GPU through CUDA_VISIBLE_DEVICES. A worker that crashed
    or was killed is replaced by a fresh one.

    A crashed run is retried up to `max_retries` times from its last checkpoint; a run held by another
    process (a second launcher on the same grid) is left to it and counted when it finishes; Ctrl-C stops
    the workers (their last checkpoint stays) and a rerun continues."""

    def __init__(self, plan: Plan, plan_path: Path, workers: int | None = None, gpus: list[str] | None = None,
                 runs_per_gpu: int = 1, max_retries: int = 1, console: Console | None = None,
                 poll_s: float = 0.5, threads: int | None = None):
        if gpus:
            places: list[str | None] = [g for g in gpus for _ in range(max(1, runs_per_gpu))]
        else:
            places = [None] * max(1, workers or 1)
        cores = os.cpu_count() or 1
        share = threads or max(1, cores // len(places))
        self.slots = [Slot(i, gpu, share) for i, gpu in enumerate(places)]
        self.plan, self.plan_path = plan, plan_path
        self.max_retries, self.poll_s = max_retries, poll_s
        self.console = console or Console(stderr=True)
        self.summary = Summary()
        self.state: dict[str, str] = {t.run_id: "queued" for t in plan.tasks}
        self.attempts: Counter[str] = Counter()

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> Summary:
        queue = list(self.plan.tasks)
        live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False) \
            if self.console.is_terminal else None
        self.say(f"local pool: {len(self.slots)} worker(s), {self.slots[0].threads} thread(s) each"
                 + (f", GPUs {sorted({s.gpu for s in self.slots})}" if self.slots[0].gpu is not None else "")
                 + f"; logs in {Path(self.plan.out) / LOGS}")
        try:
            if live:
                live.start()
            while queue or any(s.task for s in self.slots):
                self._reap(queue)
                self._dispatch(queue)
                if live:
                    live.update(self._table())
                time.sleep(self.poll_s)
            self._close_all()
        except KeyboardInterrupt:
            self.summary.interrupted = True
            self._stop_all()
        finally:
            if live:
                live.update(self._table())
                live.stop()
        return self.summary

    def _dispatch(self, queue: list[Task]) -> None:
        for slot in (s for s in self.slots if s.task is None):
            task = self._next_ready(queue)
            if task is None:
                return
            queue.remove(task)
            self._start(slot, task)

    def _next_ready(self, queue: list[Task]) -> Task | None:
        for task in list(queue):
            failed_need = next((n for n in task.needs if n in self.summary.failed), None)
            if failed_need:
                queue.remove(task)
                self._fail(task, f"its hot-start base {failed_need} failed", None)
                continue
            if task.kind == "train" and is_finished(task_folder(task, self.plan.out)):
                queue.remove(task)
                self._finish(task, "skipped", "finished earlier" if self.state[task.run_id] == "queued"
                             else "finished by another process")
                continue
            if not needs_met(task, self.plan.out):
                self.state[task.run_id] = "waiting for " + ", ".join(task.needs)
                continue
            holder = read_lock(task_folder(task, self.plan.out))
            if holder is not None and not holder.stale:
                if not self.state[task.run_id].startswith("held"):
                    self.say(f"{task.run_id}: held by {holder.describe()}; moving on to other runs")
                self.state[task.run_id] = f"held by {holder.host}:{holder.pid}"
                continue
            return task
        return None

    def _spawn(self, slot: Slot) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(slot.threads), MKL_NUM_THREADS=str(slot.threads),
                   **{THREADS_ENV: str(slot.threads)})
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        read_fd, write_fd = os.pipe()
        early = Path(self.plan.out) / LOGS / f"worker-{slot.number}.log"  # anything before its first run
        early.parent.mkdir(parents=True, exist_ok=True)
        with open(early, "a") as fh:
            slot.process = subprocess.Popen(
                [sys.executable, "-m", "fairbench.worker", str(self.plan_path), "--serve", str(write_fd),
                 "--no-wait"], stdin=subprocess.PIPE, stdout=fh, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        slot.status_fd, slot.pending = read_fd, b""

    def _start(self, slot: Slot, task: Task) -> None:
        if slot.process is None or slot.process.poll() is not None:
            self._spawn(slot)
        log = log_path(self.plan.out, task)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.attempts[task.run_id] += 1
        with open(log, "a") as fh:
            fh.write(f"--- attempt {self.attempts[task.run_id]} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        slot.process.stdin.write(f"{task.index} {log}\n")
        slot.process.stdin.flush()
        slot.task, slot.started = task, time.time()
        self.state[task.run_id] = "running"
        self.say(f"{task.run_id}: started (worker {slot.number}"
                 + (f", GPU {slot.gpu}" if slot.gpu is not None else "") + f", pid {slot.process.pid})")

    def _outcome(self, slot: Slot) -> int | None:
        """The status of the slot's current run: reported by its worker, or how the worker died; None while
        it runs."""
        ready, _, _ = select.select([slot.status_fd], [], [], 0)
        if ready:
            slot.pending += os.read(slot.status_fd, 4096)
        if b"\n" in slot.pending:
            line, _, slot.pending = slot.pending.partition(b"\n")
            return int(line.split()[1])
        if slot.process.poll() is not None:  # it died without a report: killed, or a crash
            code = slot.process.returncode
            self._retire(slot)
            return code
        return None

    def _retire(self, slot: Slot) -> None:
        """Forget a worker that has ended."""
        if slot.status_fd >= 0:
            os.close(slot.status_fd)
        slot.process, slot.status_fd, slot.pending = None, -1, b""

    def _reap(self, queue: list[Task]) -> None:
        for slot in self.slots:
            if slot.task is None or slot.process is None:
                continue
            code = self._outcome(slot)
            if code is None:
                continue
            task = slot.task
            slot.task = None
            if code not in (0, 2, EXIT_LOCKED) and slot.process is not None:
                slot.process.wait()  # a crash or an interrupt ends the worker: a fresh one takes the next run
                self._retire(slot)
            if code == 0:
                status = _last_status(log_path(self.plan.out, task))
                self._finish(task, status, f"{status} in {time.time() - slot.started:.0f} s")
            elif code == EXIT_LOCKED:
                self.attempts[task.run_id] -= 1  # not a failure: another process holds it; try later
                self.state[task.run_id] = "held by another process"
                queue.append(task)
            elif code in (130, -signal.SIGINT) and self.summary.interrupted:
                self.state[task.run_id] = "interrupted"
            elif code == 2:
                self._fail(task, _last_error(log_path(self.plan.out, task)), log_path(self.plan.out, task))
            elif self.attempts[task.run_id] <= self.max_retries:
                self.say(f"{task.run_id}: worker exited with {_describe_exit(code)}; retrying from its last "
                         f"checkpoint ({self.attempts[task.run_id]}/{self.max_retries})")
                self.state[task.run_id] = "retrying"
                queue.insert(0, task)
            else:
                self._fail(task, f"worker exited with {_describe_exit(code)} after "
                                 f"{self.attempts[task.run_id]} attempt(s)", log_path(self.plan.out, task))

    def _finish(self, task: Task, status: str, note: str) -> None:
        self.state[task.run_id] = status
        summary_add(self.summary, task, status)
        self.say(f"{task.run_id}: {note}")

    def _fail(self, task: Task, why: str, log: Path | None) -> None:
        self.state[task.run_id] = "failed"
        tail = log_tail(log) if log else []
        record_failure(task_folder(task, self.plan.out), why, tail, log)
        self.summary.failed[task.run_id] = why + (f" (log: {log})" if log else "")
        self.say(f"[bold red]{escape(task.run_id)} failed[/bold red]: {escape(why)}")

    def _stop_all(self) -> None:
        """Ctrl-C: ask every worker to stop (SIGINT: the current epoch is dropped, every written checkpoint
        stays), then wait; a worker still running after a minute is killed (atomic writes keep its files)."""
        running = [s for s in self.slots if s.process is not None]
        for slot in running:
            _signal_group(slot.process, signal.SIGINT)
        deadline = time.time() + 60
        for slot in running:
            _wait_or_kill(slot.process, deadline - time.time())
            if slot.task is not None:
                self.state[slot.task.run_id] = "interrupted"
            self._retire(slot)
            slot.task = None

    def _close_all(self) -> None:
        """End of the plan: idle workers read the end of their input and exit."""
        for slot in (s for s in self.slots if s.process is not None):
            with contextlib.suppress(OSError):
                slot.process.stdin.close()
            _wait_or_kill(slot.process, 30)
            self._retire(slot)
        for early in (Path(self.plan.out) / LOGS).glob("worker-*.log"):
            if early.stat().st_size == 0:
                early.unlink()

    # -- display ---------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def _table(self) -> Table:
        table = Table(title=f"fairbench: {len(self.plan.tasks)} run(s)", title_justify="left")
        for col in ("#", "run id", "state", "epoch", "img/s", "ETA"):
            table.add_column(col, no_wrap=col == "run id")
        for task in self.plan.tasks:
            state = self.state[task.run_id]
            epoch = speed = eta = ""
            if state == "running" and task.kind == "train":
                now = run_state(self.plan.out, task.run_id, task.epochs)
                epoch = f"{now.epoch}/{now.epochs}"
                speed = f"{now.images_per_s:,.0f}" if now.images_per_s else ""
                eta = format_duration(now.eta_s)
            table.add_row(str(task.index), task.run_id, state, epoch, speed, eta)
        return table


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _wait_or_kill(process: subprocess.Popen, seconds: float) -> None:
    """Give a worker `seconds` to end, then kill its process group (atomic writes keep its files)."""
    try:
        process.wait(max(0.1, seconds))
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def log_tail(path: Path, lines: int = 12) -> list[str]:
    try:
        return path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except OSError:
        return []


def _last_error(path: Path) -> str:
    errors = [line for line in log_tail(path, 40) if line.startswith("error: ")]
    return errors[-1][len("error: "):] if errors else "failed (see its log)"


def _last_status(path: Path) -> str:
    for line in reversed(log_tail(path, 40)):
        if line.startswith('{"run_id"'):
            return "skipped" if '"skipped"' in line else "done"
    return "done"


def parse_gpus(text: str | None) -> list[str] | None:
    """'0,1,2,3' -> ['0', '1', '2', '3'] (CUDA device numbers or UUIDs, as CUDA_VISIBLE_DEVICES takes them)."""
    if text is None:
        return None
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus:
        raise FairbenchError(f"--gpus expects device numbers like 0,1,2,3; got {text!r}")
    return gpus
