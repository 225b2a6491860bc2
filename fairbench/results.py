"""Result files of a run: per-class counts (the table's input), per-sample records, metadata.

Layout: ``OUT/runs/<run_id>/{classwise.parquet, samples.parquet, run.json, checkpoints/}``.
Each file is written to a temporary name and renamed, so a killed run never leaves half a table;
`classwise.parquet` is written last and marks a finished run.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fairbench.errors import FairbenchError, first_line
from fairbench.files import atomic_write

CLASSWISE_COLUMNS = ["run_id", "method", "dataset", "arch", "protocol", "seed", "epoch", "attack", "eps",
                     "class_id", "class_name", "n", "correct", "method_source", "method_version"]


RUN_JSON = "run.json"
CLASSWISE = "classwise.parquet"
HISTORY = "history.parquet"
"""One row per trained epoch (docs/results.md §4)."""


class ResultsWarning(UserWarning):
    """A results file was skipped (unreadable or not a per-class table)."""


def run_dir(out: Path, run_id: str) -> Path:
    return Path(out) / "runs" / run_id


def is_finished(folder: Path) -> bool:
    """The run's per-class table is there and readable (written last, so the run is complete)."""
    return (folder / "classwise.parquet").is_file() and not is_damaged(folder)


def is_damaged(folder: Path) -> bool:
    """A per-class table that cannot be read (a damaged disk or copy): the run is not finished; training
    it again re-evaluates it from its checkpoints."""
    path = folder / "classwise.parquet"
    return path.is_file() and not readable(path)


def readable(path: Path) -> bool:
    """The parquet file's footer can be read (a truncated or overwritten file fails here)."""
    try:
        pq.read_schema(path)
    except Exception:  # noqa: BLE001 - any reader error means the file cannot be used
        return False
    return True


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


def read_run_json(folder: Path) -> dict[str, Any]:
    """A run's metadata, checked for what every reader relies on (a JSON object with its run id and run
    spec); a damaged file is a FairbenchError that names it and says what to do."""
    path = Path(folder) / RUN_JSON
    if not path.is_file():
        raise FairbenchError(f"{folder} is not a finished fairbench run (no {RUN_JSON}); train it with "
                             "`fairbench run`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise damaged_run_json(folder, f"not readable JSON: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict) or not isinstance(meta.get("run_id"), str):
        raise damaged_run_json(folder, "no run_id or run spec in it")
    return meta


def damaged_run_json(folder: Path, why: str) -> FairbenchError:
    return FairbenchError(f"{Path(folder) / RUN_JSON} is damaged ({why}); restore it from a copy, or train the run "
                          "again with `fairbench run` (its checkpoints stay)")


def refuse_other_data(meta: dict[str, Any], run: str, what: str, dataset: str, current: Callable[[], str],
                      advice: str) -> None:
    """Stop when the data read now (`current()`, computed only if needed) is not the data the run's metadata
    records (`data_fingerprint`): results from different data must never pass for one another. Metadata from
    before fingerprints were recorded passes."""
    recorded = meta.get("data_fingerprint")
    if not recorded:
        return
    now = current()
    if now != recorded:
        raise FairbenchError(f"{run} {what} on other {dataset} data: its run.json records data fingerprint "
                             f"{recorded}, the data read now gives {now} (a different or damaged copy). {advice}; "
                             "nothing was changed.")


def read_records(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A run's per-sample records (samples.parquet), the `columns` of them; a FairbenchError naming the file when
    they cannot be read, which each reader turns into its own consequence (a warning, a refusal)."""
    try:
        return pd.read_parquet(path, columns=columns)
    except Exception as err:  # noqa: BLE001 - any reader error: the records are missing or damaged
        raise FairbenchError(f"per-sample records {path} cannot be read ({first_line(err)})") from err


def rewrite_hint(folder: Path) -> str:
    return f"`fairbench eval {folder} --attack ... --force` writes them again"


def find_runs(results_dir: str | Path, finished: bool = True, with_meta: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, metadata) of every run under `results_dir`, in path order; with `finished`, only runs whose
    per-class table is there. A run whose run.json or per-class table is damaged is skipped with a
    ResultsWarning naming it, so one damaged run does not stop a table or a figure of the others.
    `with_meta=False` (tables, which read only the per-class files): every folder holding a per-class table,
    run.json unread (metadata {}), the table itself checked by its reader."""
    found = []
    root = Path(results_dir)
    if not with_meta:
        return [(path.parent, {}) for path in sorted(root.rglob(CLASSWISE))] if root.is_dir() else []
    for path in sorted(root.rglob(RUN_JSON)) if root.is_dir() else []:
        folder = path.parent
        if finished and not (folder / "classwise.parquet").is_file():
            continue
        try:
            meta = read_run_json(folder)
        except FairbenchError as err:
            warnings.warn(f"skipping run {folder.name}: {err}", ResultsWarning, stacklevel=2)
            continue
        if finished and is_damaged(folder):
            warnings.warn(f"skipping run {folder.name}: its per-class table {folder / 'classwise.parquet'} "
                          "cannot be read; `fairbench run` with the same settings rebuilds it", ResultsWarning,
                          stacklevel=2)
            continue
        found.append((folder, meta))
    return found
