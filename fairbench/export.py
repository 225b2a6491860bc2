"""Export a finished run for RobustBench: the evaluated weights as a plain state_dict and a model-info JSON
with RobustBench's fields, the numbers taken from the run's own AutoAttack records on the full test set.

RobustBench's model zoo loads a state_dict into an architecture that takes inputs in [0, 1] (normalisation
inside the model), which is what every fairbench model is; its leaderboard JSON holds accuracies as percent
strings with two decimals and the radius as a fraction such as "8/255". The class-wise numbers go in an extra
field, `classwise`, so the export keeps what fairbench measures and RobustBench's readers ignore it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from fairbench.checkpoint import list_checkpoints, load_checkpoint
from fairbench.errors import FairbenchError
from fairbench.files import atomic_write

AUTOATTACK = "aa"
"""The suite RobustBench's numbers come from: the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square)."""
ARCHITECTURES = {"resnet18": "ResNet-18", "preact_resnet18": "PreActResNet-18", "wrn28_10": "WideResNet-28-10",
                 "wrn34_10": "WideResNet-34-10", "smallcnn": "SmallCNN"}
"""RobustBench's spelling of each architecture (its leaderboard names)."""


@dataclass(frozen=True)
class Exported:
    weights: Path
    info: Path


def export_robustbench(folder: Path, out: Path, name: str | None = None, epoch: int | None = None,
                       data_dir: str | None = None, force: bool = False) -> Exported:
    """Write OUT/NAME.pt (the model as evaluated, a plain state_dict) and OUT/NAME.json (RobustBench's model
    info) for one checkpoint of a finished run (the last by default). Refuses when that checkpoint has no
    AutoAttack records on the full test set, and never replaces an earlier export without `force`."""
    from fairbench.evalrun import load_run_spec, open_run  # torch and the training stack: only when exporting

    folder = Path(folder)
    _, meta = load_run_spec(folder)
    epoch = epoch if epoch is not None else _last_epoch(folder)
    name = name or meta["run_id"]
    paths = Exported(Path(out) / f"{name}.pt", Path(out) / f"{name}.json")
    existing = [p for p in (paths.weights, paths.info) if p.exists()]
    if existing and not force:
        raise FairbenchError(f"{existing[0]} exists; pass --force to replace the export, or choose another --name")
    clean, robust = _epoch_rows(folder, epoch)
    opened = open_run(folder, str(epoch), data_dir=data_dir, device="cpu")
    test_size = len(opened.dataset.test)
    for suite, rows in (("clean", clean), (AUTOATTACK, robust)):
        if int(rows["n"].sum()) != test_size:
            raise FairbenchError(
                f"{folder.name}: the {suite} records of epoch {epoch} cover {int(rows['n'].sum())} of the "
                f"{test_size} test images; RobustBench's numbers are on the full test set: run `fairbench eval "
                f"{folder} --attack aa --checkpoints {epoch}` without --n-examples (and a run trained without "
                "--eval-per-class) first")
    model = _evaluated_model(opened, folder, epoch)
    info = model_info(meta, name, epoch, clean, robust)
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write(paths.weights, lambda tmp: torch.save(model.state_dict(), tmp))
    atomic_write(paths.info, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return paths


def model_info(meta: dict, name: str, epoch: int, clean: pd.DataFrame, robust: pd.DataFrame) -> dict:
    """RobustBench's model-info fields (accuracies as percent strings) plus the class-wise numbers."""
    spec, arch = meta["spec"], (meta.get("config") or {}).get("arch", "?")
    clean_acc, robust_acc = _percent(clean), _percent(robust)
    per_class = pd.DataFrame({"class": clean.sort_values("class_id")["class_name"].astype(str).to_numpy(),
                              "clean": _class_percent(clean), "autoattack": _class_percent(robust)})
    worst = per_class.loc[per_class["autoattack"].idxmin()]
    return {
        "name": name,
        "link": "",
        "authors": "",
        "venue": "",
        "architecture": ARCHITECTURES.get(arch, arch),
        "dataset": spec["dataset"],
        "threat_model": "Linf",
        "eps": _radius(float(robust["eps"].iloc[0])),
        "clean_acc": f"{clean_acc:.2f}",
        "reported": f"{robust_acc:.2f}",
        "autoattack_acc": f"{robust_acc:.2f}",
        "number_forward_passes": 1,
        "additional_data": False,
        "footnote": f"Trained and evaluated with fairbench: {spec['method']}, seed {spec['seed']}, checkpoint of "
                    f"epoch {epoch}; AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) in fairbench's "
                    f"implementation. Worst class under AutoAttack: {worst['class']} ({worst['autoattack']:.2f}%).",
        "classwise": {
            "run_id": meta["run_id"],
            "classes": per_class["class"].tolist(),
            "clean_acc": [round(v, 2) for v in per_class["clean"]],
            "autoattack_acc": [round(v, 2) for v in per_class["autoattack"]],
            "worst_class_autoattack_acc": round(float(per_class["autoattack"].min()), 2),
        },
    }


def _last_epoch(folder: Path) -> int:
    found = list_checkpoints(folder / "checkpoints")
    if not found:
        raise FairbenchError(f"{folder.name} has no checkpoint left to export")
    return max(found)


def _epoch_rows(folder: Path, epoch: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The clean and AutoAttack per-class rows of one checkpoint; a clear refusal without AutoAttack."""
    try:
        rows = pd.read_parquet(folder / "classwise.parquet")
    except Exception as err:  # noqa: BLE001 - any reader error: missing or damaged
        raise FairbenchError(f"{folder / 'classwise.parquet'} cannot be read ({err}); `fairbench run` with the "
                             "same settings rebuilds it") from err
    rows = rows[rows["epoch"] == epoch]
    clean, robust = rows[rows["attack"] == "clean"], rows[rows["attack"] == AUTOATTACK]
    if robust.empty or clean.empty:
        raise FairbenchError(f"{folder.name} has no AutoAttack records for epoch {epoch}; RobustBench reports "
                             f"AutoAttack: run `fairbench eval {folder} --attack aa --checkpoints {epoch}` first")
    return clean, robust


def _evaluated_model(opened, folder: Path, epoch: int) -> torch.nn.Module:
    """The model exactly as evaluation attacked it (a method's averaged weights where it evaluates those)."""
    path = list_checkpoints(folder / "checkpoints")[epoch]
    state = load_checkpoint(path, opened.resolved.run_id, opened.resolved.config_hash, resuming=False)
    opened.trainer.restore(state, path)
    model = opened.trainer.method.eval_model(opened.trainer.model)
    return model.eval().cpu()


def _percent(rows: pd.DataFrame) -> float:
    return 100.0 * float(rows["correct"].sum()) / float(rows["n"].sum())


def _class_percent(rows: pd.DataFrame) -> list[float]:
    rows = rows.sort_values("class_id")
    return (100.0 * rows["correct"].astype(float) / rows["n"].astype(float)).tolist()


def _radius(eps: float) -> str:
    """`8/255` for a multiple of 1/255 (how RobustBench writes radii), else the number."""
    steps = round(eps * 255)
    return f"{steps}/255" if abs(steps / 255 - eps) < 1e-9 else f"{eps:g}"
