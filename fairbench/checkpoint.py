"""Checkpoints: written atomically after every epoch, validated on load, the last k kept."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from fairbench.errors import CheckpointError, first_line
from fairbench.files import atomic_write

FORMAT_VERSION = 1
_NAME = re.compile(r"^epoch_(\d{4,})\.pt$")


def checkpoint_path(folder: Path, epoch: int) -> Path:
    return folder / f"epoch_{epoch:04d}.pt"


def list_checkpoints(folder: Path) -> dict[int, Path]:
    """{epoch: path} of the checkpoints in `folder` (temporary files are ignored)."""
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def save_checkpoint(folder: Path, epoch: int, state: dict[str, Any], keep_last: int) -> Path:
    path = checkpoint_path(folder, epoch)
    atomic_write(path, lambda tmp: torch.save({"format_version": FORMAT_VERSION, "epoch": epoch, **state}, tmp))
    prune_checkpoints(folder, keep_last)
    return path


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (also after a kill between a write and its pruning)."""
    found = list_checkpoints(folder)
    newest = max(found, default=0)
    for old_epoch, old in found.items():
        if old_epoch <= newest - keep_last:
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path, run_id: str, config_hash: str, resuming: bool = True) -> dict[str, Any]:
    """Load and check that the file belongs to this run; a clear CheckpointError otherwise (`resuming`:
    the advice fits a run that resumes training; an evaluation never suggests deleting a checkpoint)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        advice = ("Delete it to resume from the previous epoch's checkpoint; nothing was overwritten." if resuming
                  else "Restore it from a copy, or evaluate the run's other epochs with --checkpoints; nothing "
                       "was changed.")
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable ({type(err).__name__}: "
                              f"{first_line(err)}). {advice}") from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a fairbench v{FORMAT_VERSION} checkpoint")
    if state.get("run_id") != run_id or state.get("config_hash") != config_hash:
        raise CheckpointError(
            f"checkpoint {path} belongs to run {state.get('run_id')} (config {state.get('config_hash')}), "
            f"not to {run_id} (config {config_hash}); use another --out folder or remove it")
    return state
