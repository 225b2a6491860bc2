"""After a crash: stale temporaries removed, checkpoints pruned, a finished run's leftover chunk records
cleared (a killed `fairbench eval`'s kept), a damaged result file detected and evaluated again; checkpoint
messages that name the file and the right advice."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from fairbench.checkpoint import list_checkpoints
from fairbench.data import load_dataset
from fairbench.engine import Trainer
from fairbench.errors import FairbenchError
from fairbench.evalrun import PARTIAL, partial_name
from fairbench.runner import run_one
from fairbench.spec import RunSpec, resolve
from tests.conftest import run_cli

SPEC = RunSpec(method="trades", dataset="digits", epochs=3, train_per_class=20, eval_per_class=5, eval_last=1,
               overrides={"steps": "2"})


class Crash(Exception):
    pass


def test_resume_removes_stale_temporaries_and_prunes_old_checkpoints(tmp_path):
    def crash(epoch: int, batch: int) -> None:
        if epoch == 3:
            raise Crash

    with pytest.raises(Crash):
        run_one(SPEC, tmp_path, keep_last=1, after_batch=crash)
    folder = tmp_path / "runs" / resolve(SPEC).run_id
    ckpts = folder / "checkpoints"
    assert sorted(list_checkpoints(ckpts)) == [2]
    shutil.copy(ckpts / "epoch_0002.pt", ckpts / "epoch_0001.pt")  # a kill between a write and its pruning
    junk = [ckpts / ".epoch_0003.pt.k2j4.tmp", folder / ".classwise.parquet.x81.tmp"]
    for path in junk:
        path.write_bytes(b"half a file")
    outcome = run_one(SPEC, tmp_path, resume=True, keep_last=1)
    assert outcome.status == "done"
    assert not any(p.exists() for p in junk)
    assert sorted(list_checkpoints(ckpts)) == [3]


def test_a_skipped_finished_run_clears_its_own_leftover_chunks_only(tmp_path):
    folder = run_one(SPEC, tmp_path).folder
    own = folder / PARTIAL / partial_name(3, ["pgd20"], SPEC.eval_eps, SPEC.attack_precision)
    other = folder / PARTIAL / partial_name(3, ["cw20"], SPEC.eval_eps, SPEC.attack_precision)
    for path in (own, other):
        path.mkdir(parents=True)
        (path / "chunk_00000000_50.parquet").write_bytes(b"records")
    assert run_one(SPEC, tmp_path).status == "skipped"
    assert not own.exists() and (other / "chunk_00000000_50.parquet").is_file()


def test_a_checkpoint_that_does_not_fit_names_the_file_in_one_line(tmp_path):
    folder = run_one(SPEC, tmp_path).folder
    path = folder / "checkpoints" / "epoch_0003.pt"
    state = torch.load(path, weights_only=True)
    other = resolve(RunSpec(method="trades", dataset="digits", arch="preact_resnet18"))
    trainer = Trainer.build(other, load_dataset("digits"), torch.device("cpu"))
    with pytest.raises(FairbenchError) as err:
        trainer.restore(state, path)
    text = str(err.value)
    assert str(path) in text and "choose another --out folder" in text and len(text) < 600


def test_a_corrupt_checkpoint_in_eval_is_never_advised_for_deletion(tmp_path, capsys):
    folder = run_one(SPEC, tmp_path).folder
    (folder / "checkpoints" / "epoch_0003.pt").write_bytes(b"\x80\x02 not a checkpoint")
    code, _, err = run_cli(["eval", str(folder), "--attack", "pgd20", "--checkpoints", "final"], capsys)
    text = " ".join(err.split())
    assert code == 2 and "corrupted or unreadable" in text and "Restore it from a copy" in text
    assert "Delete" not in text and "Traceback" not in err


def test_a_damaged_result_file_is_reported_and_evaluated_again(tmp_path, capsys):
    folder = run_one(SPEC, tmp_path).folder
    good = pd.read_parquet(folder / "classwise.parquet")
    data = (folder / "classwise.parquet").read_bytes()
    (folder / "classwise.parquet").write_bytes(data[: len(data) // 2])  # a truncated copy
    (folder / "samples.parquet").write_bytes(b"")  # and the records too: only the checkpoints are left
    code, text, _ = run_cli(["status", "--results", str(tmp_path), "--format", "json"], capsys)
    (state,) = json.loads(text)
    assert state["state"] == "damaged" and "cannot be read" in state["detail"]
    outcome = run_one(SPEC, tmp_path)  # not "finished earlier": evaluated again from the kept checkpoints
    assert outcome.status == "done"
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "classwise.parquet"), good)


def test_a_damaged_result_file_is_rebuilt_from_intact_records_keeping_every_suite(tmp_path, capsys):
    folder = run_one(SPEC, tmp_path).folder
    assert run_cli(["eval", str(folder), "--attack", "cw20", "--checkpoints", "final", "--n-examples", "20"],
                   capsys)[0] == 0
    good = pd.read_parquet(folder / "classwise.parquet")
    (folder / "classwise.parquet").write_bytes(b"PAR1 damaged")
    assert run_one(SPEC, tmp_path).status == "done"
    rebuilt = pd.read_parquet(folder / "classwise.parquet")
    assert set(rebuilt.attack) == {"clean", "pgd20", "cw20"}
    pd.testing.assert_frame_equal(rebuilt, good)
