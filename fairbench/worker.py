"""Execute one task of a plan in this process: what every launcher runs (a local worker process, a Slurm
job through submitit, a Ray task) and what `fairbench run ... --index K` runs.

A partial run resumes from its last checkpoint and a finished one is skipped, whoever started it; the run
lock makes sure no other process works on the same folder meanwhile. A failure is recorded in the run
folder (`failed.json`: the error and the last lines of the traceback) for `fairbench status`; a later
success removes it.

    python -m fairbench.worker PLAN.json INDEX [--no-wait]
    python -m fairbench.worker PLAN.json --serve STATUS_FD [--no-wait]   # many entries, from stdin (the pool)

exits (or reports, serving) 0 (done or skipped), 75 (`--no-wait` and another live process holds the run), 2 (a user error,
with its message), 130 (interrupted) or 1 (a crash, recorded in failed.json).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from fairbench.errors import FairbenchError
from fairbench.lock import RunLockedError
from fairbench.plan import FAILED, PROGRESS, Plan, Task
from fairbench.results import is_finished, run_dir, write_json

EXIT_LOCKED = 75
"""EX_TEMPFAIL: the run is held by another live process; try again later."""
THREADS_ENV = "FAIRBENCH_THREADS"


def set_threads(count: int | None = None) -> int:
    """Set the intra-op threads of this process to `count`, else $FAIRBENCH_THREADS (the launchers set it to
    the worker's share of the cores: processes that each spin every core collapse on shared machines);
    returns the previous count. On CPU a run's weight gradients are summed in an order that depends on the
    thread count, so runs are bit-identical for the same count (recorded in run.json)."""
    import torch

    previous = torch.get_num_threads()
    count = count or int(os.environ.get(THREADS_ENV, "0") or 0)
    if count > 0:
        torch.set_num_threads(count)
    return previous


@contextlib.contextmanager
def intra_op_threads(count: int | None):
    """`set_threads(count)` for the duration of a block (in-process launchers give the count back)."""
    previous = set_threads(count)
    try:
        yield
    finally:
        import torch

        torch.set_num_threads(previous)


class ProgressFile:
    """A reporter that forwards to `inner` and keeps `<run>/progress.json` (epoch, img/s, ETA) current, so
    launchers and `fairbench status` on any host see how far a run is."""

    def __init__(self, out: Path, inner, every_s: float = 2.0):
        self.out, self.inner, self.every_s = Path(out), inner, every_s
        self.run_id, self.epochs, self.batches, self.start_epoch = "", 0, 1, 0
        self.started, self.last_write = time.time(), 0.0

    def run_started(self, run_id: str, epochs: int, batches: int, start_epoch: int) -> None:
        self.run_id, self.epochs, self.batches, self.start_epoch = run_id, epochs, batches, start_epoch
        self.started = time.time()
        self._write(start_epoch, None, force=True)
        self.inner.run_started(run_id, epochs, batches, start_epoch)

    def batch_progress(self, epoch: int, batch: int, loss: float, images_per_s: float) -> None:
        self._write(epoch - 1 + batch / self.batches, images_per_s)
        self.inner.batch_progress(epoch, batch, loss, images_per_s)

    def epoch_done(self, epoch: int, loss: float, images_per_s: float, seconds: float, log: dict) -> None:
        self._write(epoch, images_per_s, force=True)
        self.inner.epoch_done(epoch, loss, images_per_s, seconds, log)

    def eval_progress(self, what: str, done: int, total: int, seconds: float) -> None:
        if hasattr(self.inner, "eval_progress"):
            self.inner.eval_progress(what, done, total, seconds)

    def message(self, text: str) -> None:
        self.inner.message(text)

    def _write(self, epoch: float, images_per_s: float | None, force: bool = False) -> None:
        now = time.time()
        if not self.run_id or (not force and now - self.last_write < self.every_s):
            return
        self.last_write = now
        done = epoch - self.start_epoch
        eta = (now - self.started) / done * (self.epochs - epoch) if done > 0 else None
        write_json(run_dir(self.out, self.run_id) / PROGRESS,
                   {"epoch": int(epoch), "epochs": self.epochs, "images_per_s": images_per_s, "eta_s": eta,
                    "host": socket.gethostname(), "pid": os.getpid(), "time": now})


def task_folder(task: Task, out: Path) -> Path:
    """The run folder a task works on (an evaluation may name one of its checkpoint files)."""
    if task.kind != "eval":
        return run_dir(out, task.run_id)
    target = Path(task.args["folder"])
    return target.parent.parent if target.suffix == ".pt" else target


def execute(task: Task, out: Path, reporter=None, wait: bool = True, resume: bool = True) -> str:
    """Run `task` here: 'done' or 'skipped' (`resume`: a partial run continues; off, it is refused as
    before `fairbench run --resume`). Raises `RunLockedError` when `wait` is off and another live
    process holds the run; records any other failure in the run folder and re-raises it."""
    from fairbench.engine import SilentReporter

    reporter = ProgressFile(out, reporter or SilentReporter())
    folder = task_folder(task, out)
    try:
        if task.kind == "train":
            from fairbench.runner import run_one

            status = run_one(task.spec, out, resume=resume, reporter=reporter, wait=wait).status
        elif task.kind == "eval":
            from fairbench.evalrun import evaluate_run

            options = {k: v for k, v in task.args.items() if k not in ("folder", "radii")}
            for eps in task.args.get("radii", [None]):
                evaluate_run(Path(task.args["folder"]), reporter=reporter, eps=eps, wait=wait, **options)
            status = "done"
        else:
            raise FairbenchError(f"unknown task kind {task.kind!r} in the plan")
    except (RunLockedError, KeyboardInterrupt, SystemExit):
        raise  # not failures: another process has the run; a stop asked for (Ctrl-C, a Slurm preemption)
    except BaseException as err:
        if _keeps_failure(task, folder, err):
            record_failure(folder, err)
        raise
    (folder / FAILED).unlink(missing_ok=True)
    return status


def _keeps_failure(task: Task, folder: Path, err: BaseException) -> bool:
    """A failure is kept in the run folder for `fairbench status`, except a refusal of the user's input on a
    finished run (the run itself is fine) and anything in a folder that is no run."""
    if isinstance(err, FairbenchError) and is_finished(folder):
        return False
    return task.kind == "train" or (folder / "run.json").is_file()


def record_failure(folder: Path, err: BaseException | str, log_tail: list[str] | None = None,
                   log: Path | None = None) -> None:
    """Write `failed.json` in the run folder: the error, where and when, and the last lines of its log."""
    if isinstance(err, BaseException):
        text = str(err) if isinstance(err, FairbenchError) else f"{type(err).__name__}: {err}"
        tail = log_tail or "".join(traceback.format_exception(err)).rstrip().splitlines()[-12:]
    else:
        text, tail = err, log_tail or []
    record = {"error": text, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
              "log_tail": tail}
    if log is not None:
        record["log"] = str(log)
    try:
        write_json(folder / FAILED, record)
    except OSError:
        pass  # the folder may be what failed (a full disk); the launcher reports the error anyway


def run_index(plan: Plan, index: int, wait: bool) -> int:
    """Entry `index` of `plan` with its output on stdout/stderr; returns the exit status (see the module
    docstring). A crash propagates: the process that had it is not reused."""
    from fairbench.progress import RichReporter

    try:
        task = plan.task(index)
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        print(f"worker {socket.gethostname()}:{os.getpid()} task {task.index} {task.run_id} "
              f"threads={os.environ.get(THREADS_ENV, 'default')} CUDA_VISIBLE_DEVICES={gpu}", file=sys.stderr,
              flush=True)
        with RichReporter() as reporter:
            status = execute(task, plan.out, reporter, wait)
        print(json.dumps({"run_id": task.run_id, "status": status}), flush=True)
        return 0
    except RunLockedError as err:
        print(str(err), file=sys.stderr, flush=True)
        return EXIT_LOCKED
    except KeyboardInterrupt:
        print("interrupted: finished epochs are checkpointed; the run resumes when started again", file=sys.stderr,
              flush=True)
        return 130
    except FairbenchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def serve(plan: Plan, status_fd: int, wait: bool) -> int:
    """Run the entries whose numbers arrive on stdin, one per line, each with its output appended to the log
    file named on the same line ('INDEX LOG'); after each, write 'INDEX STATUS' to `status_fd`. One process
    serves many runs, so Python, torch and the dataset are loaded once per worker, not once per run. A crash or
    an interrupt ends the process (its launcher starts a fresh one)."""
    for line in sys.stdin:
        index, _, log = line.strip().partition(" ")
        with open(log, "a") as fh:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
        code = run_index(plan, int(index), wait)
        sys.stdout.flush(), sys.stderr.flush()
        os.write(status_fd, f"{index} {code}\n".encode())
        if code == 130:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    from fairbench.registry import import_plugins

    args = list(sys.argv[1:] if argv is None else argv)
    wait = "--no-wait" not in args
    args = [a for a in args if a != "--no-wait"]
    serving = len(args) == 3 and args[1] == "--serve" and args[2].isdigit()
    if not serving and (len(args) != 2 or not args[1].isdigit()):
        print("usage: python -m fairbench.worker PLAN.json (INDEX | --serve STATUS_FD) [--no-wait]", file=sys.stderr)
        return 2
    set_threads()
    try:
        plan = Plan.load(Path(args[0]))
        import_plugins(list(plan.plugins))
    except FairbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return serve(plan, int(args[2]), wait) if serving else run_index(plan, int(args[1]), wait)


if __name__ == "__main__":
    sys.exit(main())
