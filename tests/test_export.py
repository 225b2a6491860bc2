"""`fairbench export RUN --format robustbench`: the weights load into the architecture as a plain state_dict and
give the exported clean accuracy; the numbers come from the run's own AutoAttack records on the full test
set, and anything less is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    """A digits run evaluated by AutoAttack on its full test set at its last checkpoint."""
    from fairbench.evalrun import evaluate_run
    from fairbench.runner import run_one
    from fairbench.spec import RunSpec

    out = tmp_path_factory.mktemp("export")
    folder = run_one(RunSpec(method="trades", dataset="digits", epochs=3, train_per_class=40, eval_last=1), out).folder
    evaluate_run(folder, ["aa"], checkpoints="final")
    return folder


def test_robustbench_export_round_trips(evaluated_run, tmp_path, capsys):
    from fairbench.data import load_dataset
    from fairbench.models import create_model

    code, out, err = run_cli(["export", str(evaluated_run), "--format", "robustbench", "--out", str(tmp_path),
                              "--name", "Digits2026Trades"], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "Digits2026Trades.json").read_text())
    for key in ("name", "architecture", "dataset", "eps", "clean_acc", "autoattack_acc", "reported",
                "number_forward_passes", "additional_data", "footnote"):
        assert key in info, key
    assert info["eps"] == "8/255" and info["threat_model"] == "Linf" and info["architecture"] == "SmallCNN"
    data = load_dataset("digits")
    model = create_model("smallcnn", data.num_classes, data.image_shape)
    model.load_state_dict(torch.load(tmp_path / "Digits2026Trades.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(data.test.images).float() / 255
        correct = (model(x).argmax(1).numpy() == data.test.labels)
    assert info["clean_acc"] == f"{100 * correct.mean():.2f}"
    rows = pd.read_parquet(evaluated_run / "classwise.parquet")
    aa = rows[(rows.attack == "aa") & (rows.epoch == 3)].sort_values("class_id")
    assert info["autoattack_acc"] == f"{100 * aa.correct.sum() / aa.n.sum():.2f}"
    assert info["classwise"]["autoattack_acc"] == [round(100 * c / n, 2) for c, n in zip(aa.correct, aa.n)]
    per_class_clean = [100 * correct[data.test.labels == k].mean() for k in range(data.num_classes)]
    assert info["classwise"]["clean_acc"] == [round(v, 2) for v in per_class_clean]


def test_export_refuses_what_robustbench_would_not_take(evaluated_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(evaluated_run, copy)
    code, _, err = run_cli(["export", str(copy), "--out", str(tmp_path / "rb")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", str(copy), "--out", str(tmp_path / "rb")], capsys)
    assert code != 0 and "pass --force to replace" in err and "Traceback" not in err
    code, _, err = run_cli(["export", str(copy), "--out", str(tmp_path / "rb2"), "--checkpoint", "2"], capsys)
    assert code != 0 and "no AutoAttack records for epoch 2" in " ".join(err.split())
    assert run_cli(["eval", str(copy), "--attack", "aa", "--checkpoints", "2", "--n-examples", "50", "-q"],
                   capsys)[0] == 0
    code, _, err = run_cli(["export", str(copy), "--out", str(tmp_path / "rb2"), "--checkpoint", "2"], capsys)
    text = " ".join(err.split())
    assert code != 0 and "cover 50 of the 364 test images" in text and "full test set" in text, text
    assert not (tmp_path / "rb2").exists()
