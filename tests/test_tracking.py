"""Watching a run: the per-epoch history (in every checkpoint and in history.parquet), class-wise accuracy on
a held-out subset every N epochs, and TensorBoard; none of them changes what the run computes or its id, and a
resumed run continues one history and one TensorBoard run without duplicates."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from fairbench.checkpoint import list_checkpoints
from fairbench.results import run_dir
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve

pytestmark = pytest.mark.slow
BASE = dict(method="dafa", dataset="digits", epochs=3, train_per_class=20, eval_per_class=5, eval_last=1,
            overrides={"warmup": 2, "steps": 2})


class Stop(KeyboardInterrupt):
    pass


def stop_in_epoch_3(epoch: int, batch: int) -> None:
    if epoch == 3 and batch == 1:
        raise Stop()


def final_model(out: Path, spec: RunSpec) -> dict:
    folder = run_dir(out, resolve(spec).run_id) / "checkpoints"
    return torch.load(list_checkpoints(folder)[spec.epochs], weights_only=True)["model"]


def test_tracking_changes_neither_results_nor_run_id(tmp_path):
    plain = RunSpec(**BASE)
    tracked = RunSpec(**BASE, track="tensorboard", track_every=1)
    assert resolve(plain).run_id == resolve(tracked).run_id
    run_one(plain, tmp_path / "plain")
    run_one(tracked, tmp_path / "tracked")
    a, b = final_model(tmp_path / "plain", plain), final_model(tmp_path / "tracked", tracked)
    assert all(torch.equal(a[k], b[k]) for k in a)
    folder = run_dir(tmp_path / "tracked", resolve(tracked).run_id)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir(tmp_path / "plain", resolve(plain).run_id) / "classwise.parquet"),
                                  pd.read_parquet(folder / "classwise.parquet"))
    history = pd.read_parquet(folder / "history.parquet")
    assert history["epoch"].tolist() == [1, 2, 3] and (history["run_id"] == resolve(tracked).run_id).all()
    assert all(len(w) == 10 for w in history["class_state/weights"])
    assert list(history["class_state/weights"].iloc[0]) == [1.0] * 10  # DAFA's weights switch on when warm-up epoch 2 ends
    assert list(history["class_state/weights"].iloc[-1]) != [1.0] * 10
    assert all(len(acc) == 10 and all(0 <= v <= 100 for v in acc) for acc in history["tracked/pgd20"])
    plain_history = pd.read_parquet(run_dir(tmp_path / "plain", resolve(plain).run_id) / "history.parquet")
    assert "tracked/pgd20" not in plain_history and plain_history["loss"].tolist() == history["loss"].tolist()


def test_resumed_run_continues_one_history_and_one_tensorboard_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = RunSpec(**BASE, track="tensorboard", track_every=2)
    with pytest.raises(Stop):
        run_one(spec, tmp_path, after_batch=stop_in_epoch_3)
    run_one(spec, tmp_path, resume=True)
    folder = run_dir(tmp_path, resolve(spec).run_id)
    history = pd.read_parquet(folder / "history.parquet")
    assert history["epoch"].tolist() == [1, 2, 3]
    tracked = history["tracked/pgd20"]
    assert tracked.iloc[0] is None and len(tracked.iloc[1]) == 10 and len(tracked.iloc[2]) == 10  # epochs 2, 3
    (logdir,) = (tmp_path / "tensorboard").iterdir()
    assert logdir.name == resolve(spec).run_id
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(history["loss"].tolist(), rel=1e-6)
    assert [e.step for e in events.Scalars("tracked/pgd20/worst")] == [2, 3]
    assert {f"class_state/weights/{c}" for c in "0123456789"} <= set(events.Tags()["scalars"])


def test_bad_tracking_options_are_refused(tmp_path, capsys):
    from tests.conftest import run_cli

    for args, expected in ((["--track", "neptune"], "neptune"), (["--track-every", "0"], "--track-every must be >= 1")):
        code, _, err = run_cli(["run", "--methods", "trades", "--epochs", "1", "--out", str(tmp_path), *args], capsys)
        assert code != 0 and "Traceback" not in err and expected in err, err


def test_training_figure_from_the_tracked_history(tmp_path):
    from fairbench import plots

    spec = RunSpec(**BASE, track_every=1)
    run_one(spec, tmp_path)
    frame = plots.tracked_history(plots.find_runs(tmp_path))
    assert sorted(set(frame["epoch"])) == [1, 2, 3] and set(frame["class_id"]) == set(range(10))
    paths = plots.render_plots(plots.PlotRequest(tmp_path, tmp_path / "plots"), "training").paths
    assert {p.suffix for p in paths} == {".png", ".pdf"} and all("training" in p.name for p in paths)
    untracked = tmp_path / "untracked"
    run_one(RunSpec(**BASE), untracked)
    with pytest.raises(Exception, match="--track-every"):
        plots.render_plots(plots.PlotRequest(untracked, untracked / "plots"), "training")


def test_the_plot_command_lists_every_figure_kind():
    from fairbench import cli, plots

    assert set(cli.PLOT_KINDS) == set(plots.RENDERERS)


def test_wandb_offline_run_is_named_by_the_run_id(tmp_path, monkeypatch):
    """W&B (optional; not a test dependency): the offline run lands under OUT/wandb, named by the run id."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = RunSpec(**{**BASE, "epochs": 2}, track="wandb")
    run_one(spec, tmp_path)
    runs = list((tmp_path / "wandb").rglob(f"run-{resolve(spec).run_id}.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_mlflow_local_run_continues_after_a_resume(tmp_path):
    """MLflow (optional; not a test dependency): one local run named by the run id, every epoch once."""
    mlflow = pytest.importorskip("mlflow")
    spec = RunSpec(**BASE, track="mlflow")
    with pytest.raises(Stop):
        run_one(spec, tmp_path, after_batch=stop_in_epoch_3)
    run_one(spec, tmp_path, resume=True)
    mlflow.set_tracking_uri((tmp_path / "mlruns").resolve().as_uri())
    (run,) = mlflow.search_runs(experiment_names=["fairbench"], output_format="list")
    assert run.info.run_name == resolve(spec).run_id
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
