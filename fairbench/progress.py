"""Rich progress for training runs: epoch, loss, images/s and ETA; one plain line per epoch as well,
so logs written to a file or CI (no terminal) still show the run."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def format_duration(seconds: float | None) -> str:
    """'1:02:03' (hours:minutes:seconds); '' for unknown."""
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RichReporter:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=True, disable=quiet or not self.console.is_terminal,
        )
        self.task = None
        self.batches = 1
        self.epochs = 1
        self.start_epoch, self.started = 0, time.perf_counter()
        self.eval_shown = -1

    def __enter__(self) -> "RichReporter":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def run_started(self, run_id: str, epochs: int, batches: int, start_epoch: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.batches, self.epochs = batches, epochs
        self.start_epoch, self.started = start_epoch, time.perf_counter()
        self.task = self.bar.add_task(run_id, total=epochs * batches, completed=start_epoch * batches,
                                      epoch=f"{start_epoch}/{epochs}", loss="-", speed="-")
        self.message(f"[bold]{run_id}[/bold]: {epochs} epochs x {batches} batches")

    def batch_progress(self, epoch: int, batch: int, loss: float, images_per_s: float) -> None:
        self.bar.update(self.task, completed=(epoch - 1) * self.batches + batch, epoch=f"{epoch}/{self.epochs}",
                        loss=f"{loss:.4f}", speed=f"{images_per_s:,.0f}")

    def epoch_done(self, epoch: int, loss: float, images_per_s: float, seconds: float, log: dict) -> None:
        self.batch_progress(epoch, self.batches, loss, images_per_s)
        extra = "".join(f"  {k} {v:.3f}" for k, v in log.items())
        left = self.epochs - epoch
        eta = f"  ETA {format_duration((time.perf_counter() - self.started) / (epoch - self.start_epoch) * left)}" \
            if left and epoch > self.start_epoch else ""
        self.message(f"  epoch {epoch:>3}/{self.epochs}  loss {loss:.4f}  {images_per_s:,.0f} img/s  {seconds:.1f}s"
                     f"{extra}{eta}")

    def eval_progress(self, what: str, done: int, total: int, seconds: float) -> None:
        """A line at each quarter of an evaluation (samples done, elapsed, ETA): AutoAttack on one checkpoint
        of a full test set takes long enough that silence reads as a hang, in a terminal and in a log."""
        quarter = 4 * done // max(total, 1)
        if done >= total or quarter <= self.eval_shown or done == 0:
            self.eval_shown = -1 if done >= total else self.eval_shown
            return
        self.eval_shown = quarter
        eta = format_duration(seconds / done * (total - done))
        self.message(f"  {what}: {done:,}/{total:,} samples, {format_duration(seconds)} elapsed, ETA {eta}")

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)
