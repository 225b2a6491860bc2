"""Watching a run while it trains: its per-epoch history (always kept, in every checkpoint and in
`history.parquet` beside the results), class-wise clean and PGD-20 accuracy on a small held-out part of the
test set every N epochs (`--track-every N`), and an experiment tracker fed from the same records (`--track
tensorboard|wandb|mlflow`, off by default).

The parquet and run.json files stay the source of truth; a tracker only shows them. A tracked run is named by
its run id, so a resumed run continues the same one: TensorBoard drops the events after the resumed epoch
(`purge_step`), MLflow reopens the run with that name; W&B's offline runs cannot be resumed, so a resumed run
logs to a new offline run named `<run_id>-from-<epoch>` and says so.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch

from fairbench.errors import FairbenchError
from fairbench.runspec import TRACKERS

TRACKED_PER_CLASS = 20
"""Test images per class in the held-out tracking subset (the first of each class in canonical order)."""
TRACKED_ATTACK = "pgd20"


class Tracker(Protocol):
    def log(self, record: dict, class_names: tuple[str, ...]) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict, class_names: tuple[str, ...]) -> dict[str, float]:
    """A history record as flat scalar names (`loss`, `loss/kl`, `class_state/weights/cat`, `tracked/pgd20/
    worst`, ...), one name scheme for every tracker."""
    out = {"loss": record["loss"], "lr": record["lr"], "images_per_s": record["images_per_s"]}
    out.update({f"loss/{k}": v for k, v in record["parts"].items()})
    for name, values in record["class_state"].items():
        out.update({f"class_state/{name}/{c}": v for c, v in zip(class_names, values)})
    for suite, values in record["tracked"].items():
        out.update({f"tracked/{suite}/{c}": v for c, v in zip(class_names, values)})
        out[f"tracked/{suite}/avg"] = sum(values) / len(values)
        out[f"tracked/{suite}/worst"] = min(values)
    return out


class TensorBoardTracker:
    def __init__(self, folder: Path, start_epoch: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise FairbenchError("--track tensorboard needs TensorBoard: pip install 'fairbench-at[track]' "
                                 "(or pip install tensorboard)") from err
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_epoch + 1 if start_epoch else None)

    def log(self, record: dict, class_names: tuple[str, ...]) -> None:
        for name, value in scalars(record, class_names).items():
            self.writer.add_scalar(name, value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, folder: Path, run_id: str, start_epoch: int, config: dict, say) -> None:
        try:
            import wandb
        except ImportError as err:
            raise FairbenchError("--track wandb needs Weights & Biases: pip install wandb") from err
        name = run_id if not start_epoch else f"{run_id}-from-{start_epoch + 1}"
        if start_epoch:
            say(f"W&B offline runs cannot be resumed: epochs {start_epoch + 1}+ go to the offline run {name}")
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="fairbench", id=name, name=name, dir=str(folder), mode="offline",
                              config=config, reinit=True)

    def log(self, record: dict, class_names: tuple[str, ...]) -> None:
        self.run.log(scalars(record, class_names), step=record["epoch"])

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, folder: Path, run_id: str, config: dict) -> None:
        try:
            import mlflow
        except ImportError as err:
            raise FairbenchError("--track mlflow needs MLflow: pip install mlflow") from err
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its (frozen) file store otherwise
        mlflow.set_tracking_uri(folder.resolve().as_uri())
        mlflow.set_experiment("fairbench")
        found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{run_id}'", output_format="list")
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_id=found[0].info.run_id) if found else mlflow.start_run(run_name=run_id)
        if not found:
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, record: dict, class_names: tuple[str, ...]) -> None:
        self.mlflow.log_metrics(scalars(record, class_names), step=record["epoch"])

    def close(self) -> None:
        self.mlflow.end_run()


def open_tracker(kind: str, out: Path, run_id: str, start_epoch: int, config: dict, say) -> Tracker:
    """The tracker `--track KIND` names, writing under OUT/<kind>/."""
    if kind == "tensorboard":
        return TensorBoardTracker(Path(out) / "tensorboard" / run_id, start_epoch)
    if kind == "wandb":
        return WandbTracker(Path(out) / "wandb", run_id, start_epoch, config, say)
    if kind == "mlflow":
        return MlflowTracker(Path(out) / "mlruns", run_id, config)
    raise FairbenchError(f"--track {kind!r}: choose one of {', '.join(TRACKERS)}")


class HeldOutAccuracy:
    """Every `every` epochs (and at the last), class-wise clean and PGD-20 accuracy of the training model on
    the first `TRACKED_PER_CLASS` test images of each class, in eval mode with the model's state restored
    afterwards, so training goes on exactly as without it."""

    def __init__(self, every: int, epochs: int, eps: float, batch_size: int, seed: int):
        self.every, self.epochs, self.eps, self.batch_size, self.seed = every, epochs, eps, batch_size, seed
        self.split = None

    def __call__(self, record: dict, trainer) -> None:
        epoch = record["epoch"]
        if epoch % self.every and epoch != self.epochs:
            return
        from fairbench.evalrun import eval_split
        from fairbench.evaluation import classwise_accuracy

        if self.split is None:
            self.split = eval_split(trainer.dataset, trainer.device, TRACKED_PER_CLASS)
        model = trainer.method.eval_model(trainer.model)
        for suite, attack in (("clean", None), (TRACKED_ATTACK, TRACKED_ATTACK)):
            acc = classwise_accuracy(model, self.split, trainer.dataset.num_classes, attack, self.batch_size,
                                     self.seed, self.eps)
            record["tracked"][suite] = [100.0 * float(a) for a in torch.as_tensor(acc).cpu()]


def history_frame(history: list[dict], labels: dict) -> pd.DataFrame:
    """The per-epoch history as one row per epoch: run labels (so files concatenate), loss and its parts,
    lr, speed, and one list column per per-class state and tracked suite (entries in class-id order)."""
    rows = []
    for r in history:
        row = {**labels, "epoch": r["epoch"], "loss": r["loss"], "lr": r["lr"], "images_per_s": r["images_per_s"],
               "seconds": r["seconds"]}
        row.update({f"loss/{k}": v for k, v in r["parts"].items()})
        row.update({f"class_state/{k}": v for k, v in r["class_state"].items()})
        row.update({f"tracked/{k}": v for k, v in r["tracked"].items()})
        rows.append(row)
    return pd.DataFrame(rows)
