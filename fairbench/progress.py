"""Rich progress for training runs: epoch, loss, images/s and ETA; one plain line per epoch as well,
so logs written to a file or CI (no terminal) still show the run."""
from __future__ import annotations

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

    def __enter__(self) -> "RichReporter":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def run_started(self, run_id: str, epochs: int, batches: int, start_epoch: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.batches, self.epochs = batches, epochs
        self.task = self.bar.add_task(run_id, total=epochs * batches, completed=start_epoch * batches,
                                      epoch=f"{start_epoch}/{epochs}", loss="-", speed="-")
        self.message(f"[bold]{run_id}[/bold]: {epochs} epochs x {batches} batches")

    def batch_progress(self, epoch: int, batch: int, loss: float, images_per_s: float) -> None:
        self.bar.update(self.task, completed=(epoch - 1) * self.batches + batch, epoch=f"{epoch}/{self.epochs}",
                        loss=f"{loss:.4f}", speed=f"{images_per_s:,.0f}")

    def epoch_done(self, epoch: int, loss: float, images_per_s: float, seconds: float, log: dict) -> None:
        self.batch_progress(epoch, self.batches, loss, images_per_s)
        extra = "".join(f"  {k} {v:.3f}" for k, v in log.items())
        self.message(f"  epoch {epoch:>3}/{self.epochs}  loss {loss:.4f}  {images_per_s:,.0f} img/s  {seconds:.1f}s{extra}")

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)
