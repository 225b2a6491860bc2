"""Engine behaviour on real tiny runs: reproducibility, kill-and-resume, NaN guard, bad checkpoints."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from fairbench.checkpoint import list_checkpoints
from fairbench.errors import CheckpointError, FairbenchError, NonFiniteLossError
from fairbench.results import run_dir
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve


def tiny_spec(method: str = "trix", **kw) -> RunSpec:
    base = dict(method=method, dataset="digits", seed=3, epochs=4, batch_size=64, train_per_class=30,
                eval_per_class=10, eval_last=2, overrides={"warmup": "2", "steps": "2"})
    base.update(kw)
    return RunSpec(**base)


def final_state(out, spec) -> dict:
    folder = run_dir(out, resolve(spec).run_id) / "checkpoints"
    return torch.load(list_checkpoints(folder)[spec.epochs], weights_only=True)


class Interrupt(KeyboardInterrupt):
    pass


def test_killed_run_resumes_to_identical_weights(tmp_path):
    spec = tiny_spec()
    run_one(spec, tmp_path / "a")

    def kill(epoch, batch):
        if epoch == 3 and batch == 2:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_one(spec, tmp_path / "b", after_batch=kill)
    assert sorted(list_checkpoints(run_dir(tmp_path / "b", resolve(spec).run_id) / "checkpoints")) == [1, 2]
    with pytest.raises(FairbenchError, match="--resume"):
        run_one(spec, tmp_path / "b")  # never silently restarts over existing checkpoints
    run_one(spec, tmp_path / "b", resume=True)

    a, b = final_state(tmp_path / "a", spec), final_state(tmp_path / "b", spec)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["method"]["weights"], b["method"]["weights"])
    assert not torch.equal(a["method"]["weights"], torch.ones(10))  # DAFA weights were switched on
    ra = pd.read_parquet(run_dir(tmp_path / "a", resolve(spec).run_id) / "classwise.parquet")
    rb = pd.read_parquet(run_dir(tmp_path / "b", resolve(spec).run_id) / "classwise.parquet")
    pd.testing.assert_frame_equal(ra, rb)


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    spec = tiny_spec("trades", epochs=2, eval_last=1)
    run_one(spec, tmp_path / "a")
    run_one(spec, tmp_path / "b")
    other = tiny_spec("trades", epochs=2, eval_last=1, seed=4)
    run_one(other, tmp_path / "c")
    a, b, c = (final_state(tmp_path / d, s) for d, s in (("a", spec), ("b", spec), ("c", other)))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_last_good_checkpoint(tmp_path):
    spec = tiny_spec("trades", epochs=3, lr=1e30, train_per_class=60)
    with pytest.raises(NonFiniteLossError, match=r"epoch \d+, batch \d+") as err:
        run_one(spec, tmp_path)
    folder = run_dir(tmp_path, resolve(spec).run_id)
    saved = list_checkpoints(folder / "checkpoints")
    bad_epoch = int(str(err.value).split("epoch ")[1].split(",")[0])
    assert sorted(saved) == list(range(1, bad_epoch))
    for path in saved.values():  # the kept checkpoints hold finite weights
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (folder / "classwise.parquet").exists()


def test_corrupted_and_foreign_checkpoints_are_reported_and_kept(tmp_path):
    spec = tiny_spec("trades", epochs=3, eval_last=1)

    def kill(epoch, batch):
        if epoch == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        run_one(spec, tmp_path, after_batch=kill)
    ckpts = run_dir(tmp_path, resolve(spec).run_id) / "checkpoints"
    newest = list_checkpoints(ckpts)[2]
    newest.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupted"):
        run_one(spec, tmp_path, resume=True)
    assert newest.read_bytes() == b"not a checkpoint"  # nothing overwritten

    other = tiny_spec("dafa", epochs=3, eval_last=1)
    with pytest.raises(Interrupt):
        run_one(other, tmp_path / "o", after_batch=kill)
    shutil.copy(list_checkpoints(run_dir(tmp_path / "o", resolve(other).run_id) / "checkpoints")[2], newest)
    with pytest.raises(CheckpointError, match="belongs to run"):
        run_one(spec, tmp_path, resume=True)


def test_last_five_checkpoints_are_kept(tmp_path):
    spec = tiny_spec("trades", epochs=7, eval_last=5, train_per_class=10, overrides={"steps": "1"})
    run_one(spec, tmp_path)
    folder = run_dir(tmp_path, resolve(spec).run_id)
    assert sorted(list_checkpoints(folder / "checkpoints")) == [3, 4, 5, 6, 7]
    classwise = pd.read_parquet(folder / "classwise.parquet")
    assert sorted(classwise.epoch.unique()) == [3, 4, 5, 6, 7]
    assert set(classwise.attack) == {"clean", "pgd20"}
    assert (classwise.groupby(["epoch", "attack"]).n.sum() == 100).all()
    assert (classwise.correct <= classwise.n).all()


def test_finished_run_is_skipped(tmp_path):
    spec = tiny_spec("trades", epochs=1, eval_last=1, train_per_class=10)
    assert run_one(spec, tmp_path).status == "done"
    assert run_one(spec, tmp_path).status == "skipped"


def test_protocols_resolve_common_official_and_explicit_values():
    common = resolve(RunSpec(method="trades", dataset="cifar10"))
    assert (common.arch, common.epochs, common.optim["schedule"], common.optim["nesterov"]) == \
        ("resnet18", 150, "bag_of_tricks", True)
    official = resolve(RunSpec(method="trades", dataset="cifar10", protocol="official"))
    assert (official.arch, official.epochs, official.optim["weight_decay"], official.optim["nesterov"]) == \
        ("wrn34_10", 76, 2e-4, False)
    explicit = resolve(RunSpec(method="trades", dataset="cifar10", protocol="official", epochs=3, lr=0.05))
    assert explicit.epochs == 3 and explicit.optim["lr"] == 0.05 and explicit.arch == "wrn34_10"
    assert len({common.protocol_id, official.protocol_id, explicit.protocol_id}) == 3
    assert common.run_id != official.run_id


def test_init_from_starts_from_another_runs_weights(tmp_path):
    base = tiny_spec("trades", epochs=2, eval_last=1)
    run_one(base, tmp_path)
    folder = run_dir(tmp_path, resolve(base).run_id)

    from fairbench.data import load_dataset
    from fairbench.engine import Trainer
    from fairbench.runner import load_start_weights

    spec = tiny_spec("dafa", init_from=str(folder))
    trainer = Trainer.build(resolve(spec), load_dataset("digits"), torch.device("cpu"))
    load_start_weights(trainer, folder)
    final = final_state(tmp_path, base)["model"]
    assert all(torch.equal(v, final[k]) for k, v in trainer.model.state_dict().items())
    with pytest.raises(FairbenchError, match="init-from"):
        load_start_weights(trainer, tmp_path / "missing.pt")
    assert resolve(spec).run_id != resolve(tiny_spec("dafa")).run_id  # the start point is part of the config


def test_hot_started_method_is_compared_with_the_run_it_starts_from():
    from fairbench.spec import hot_start_base

    frl = RunSpec(method="frl", dataset="digits", epochs=3, hot_start_epochs=5, train_per_class=30)
    base = hot_start_base(frl)
    assert (base.method, base.epochs, base.train_per_class, base.protocol) == ("trades", 5, 30, "common")
    assert resolve(frl).protocol_id == resolve(base).protocol_id
    assert resolve(frl).optim["lr"] == 0.001 and resolve(frl).epochs == 3  # the fine-tuning stage
