"""Result files of a run: per-class counts (the table's input), per-sample records, metadata.

Layout: ``OUT/runs/<run_id>/{classwise.parquet, samples.parquet, run.json, checkpoints/}``.
Each file is written to a temporary name and renamed, so a killed run never leaves half a table;
`classwise.parquet` is written last and marks a finished run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fairbench.checkpoint import atomic_write

CLASSWISE_COLUMNS = ["run_id", "method", "dataset", "arch", "protocol", "seed", "epoch", "attack", "eps",
                     "class_id", "class_name", "n", "correct", "method_source", "method_version"]


def run_dir(out: Path, run_id: str) -> Path:
    return Path(out) / "runs" / run_id


def is_finished(folder: Path) -> bool:
    """The run's per-class table is there and readable (written last, so the run is complete)."""
    return (folder / "classwise.parquet").is_file() and not is_damaged(folder)


def is_damaged(folder: Path) -> bool:
    """A per-class table that cannot be read (a damaged disk or copy): the run is not finished; training
    it again re-evaluates it from its checkpoints."""
    path = folder / "classwise.parquet"
    if not path.is_file():
        return False
    try:
        pq.read_schema(path)
    except Exception:  # noqa: BLE001 - any reader error means the file cannot be used
        return True
    return False


def write_parquet(path: Path, frame: pd.DataFrame, metadata: dict[str, Any] | None = None) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta[b"fairbench"] = json.dumps(metadata, default=str).encode()
        table = table.replace_schema_metadata(meta)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, default=str)

    atomic_write(path, write)


def read_metadata(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"fairbench", b"{}"))


def run_metadata(results_dir: str | Path) -> list[dict[str, Any]]:
    """The run.json of every run under `results_dir`, in path order; unreadable ones are skipped (a table
    must not fail on one damaged run)."""
    metas = []
    for path in sorted(Path(results_dir).rglob("run.json")):
        try:
            metas.append({"run_id": path.parent.name, **json.loads(path.read_text())})
        except (OSError, ValueError):
            continue
    return metas
