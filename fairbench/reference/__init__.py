"""Published numbers shipped with fairbench, so runs can be compared with the papers without retyping them.

One CSV per paper, in a long tidy format (one row per printed number):

    source   paper: "trix" (arXiv 2507.07768) or "dafa" (ICLR 2024, main table as in docs/metrics.md §8)
    table    the paper's own numbering: table1a..c, table2, table3a..c, table4a..b, table5a..b
             (Tiny-ImageNet), table6 (augmentations) for TRIX; "main" for DAFA
    dataset, arch      fairbench names (cifar10, preact_resnet18, ...); arch "" where the paper is silent
    attack   "aa" (AutoAttack columns) or "pgd" (TRIX Table 2)
    method   fairbench method name (TRADES = DAFA-Basic in TRIX Table 2); label = the name as printed
    metric   clean_avg, clean_worst, rho_clean, rob_avg, rob_worst, rho_rob (percent for accuracies)
    mean, std          std is NaN where the paper prints none
    comment  anything ambiguous about the entry

Paper-wide caveats (TRIX): equations and the rho header symbols were lost in the text extraction; the rho
columns are identified by position. The main text says each run is the mean over its last 5 epochs, the
appendix that the checkpoint with the highest worst-class robust accuracy was reported. The TRIX rho entries
do not follow one formula (docs/metrics.md §6; `fairbench.paper.check_reference_rho`).
"""
from __future__ import annotations

from importlib import resources

import pandas as pd

from fairbench.errors import FairbenchError, UnknownNameError

SOURCES: dict[str, str] = {"trix": "trix_paper.csv", "dafa": "dafa_paper.csv"}
COLUMNS = ["source", "table", "dataset", "arch", "attack", "method", "label", "metric", "mean", "std",
           "comment"]
METRICS = ("clean_avg", "clean_worst", "rho_clean", "rob_avg", "rob_worst", "rho_rob")
ENTRY_KEYS = ["source", "table", "dataset", "arch", "attack", "method"]


def load_reference(source: str | None = None) -> pd.DataFrame:
    """The published numbers of one paper (or of all, `source=None`) in the paper's row order."""
    names = list(SOURCES) if source is None else [source]
    return pd.concat([_read(name) for name in names], ignore_index=True)


def _read(source: str) -> pd.DataFrame:
    """One packaged CSV, validated, with text columns as str ("" for blank) and numbers as float."""
    if source not in SOURCES:
        raise UnknownNameError("reference source", source, list(SOURCES))
    with resources.files(__name__).joinpath(SOURCES[source]).open("r", encoding="utf-8") as f:
        frame = pd.read_csv(f, dtype={c: str for c in COLUMNS if c not in ("mean", "std")},
                            keep_default_na=False, na_values={"mean": [""], "std": [""]})
    _check(frame, source)
    return frame


def _check(frame: pd.DataFrame, source: str) -> None:
    """A broken data file must fail loudly, not give silently wrong comparisons."""
    if list(frame.columns) != COLUMNS:
        raise FairbenchError(f"reference {source}: columns {list(frame.columns)}, expected {COLUMNS}")
    bad = sorted(set(frame["metric"]) - set(METRICS))
    if bad or frame["mean"].isna().any() or (frame["source"] != source).any():
        raise FairbenchError(f"reference {source}: unknown metrics {bad} or missing values")
    if frame.duplicated(ENTRY_KEYS + ["metric"]).any():
        raise FairbenchError(f"reference {source}: duplicate entries")


def reference_tables(source: str) -> list[str]:
    """Table ids of one paper in the paper's order."""
    return list(pd.unique(load_reference(source)["table"]))


def reference_wide(source: str | None = None, table: str | None = None) -> pd.DataFrame:
    """One row per printed table row: ENTRY_KEYS, label, then `<metric>` (mean) and `<metric>_std` columns."""
    long = load_reference(source)
    if table is not None:
        if table not in set(long["table"]):
            raise UnknownNameError("reference table", table, list(pd.unique(long["table"])))
        long = long[long["table"] == table]
    keys = ENTRY_KEYS + ["label"]
    order = long[keys].drop_duplicates().reset_index(drop=True)
    means = long.pivot(index=keys, columns="metric", values="mean")
    stds = long.pivot(index=keys, columns="metric", values="std").add_suffix("_std")
    wide = order.join(means.join(stds), on=keys)
    cols = [m for m in METRICS if m in wide] + [f"{m}_std" for m in METRICS if f"{m}_std" in wide]
    return wide[keys + cols]


def reference_value(source: str, table: str, method: str, metric: str, dataset: str | None = None) -> float:
    """One published mean, e.g. `reference_value("trix", "table1a", "trix", "rob_worst")` -> 32.65."""
    ref = load_reference(source)
    hit = ref[(ref["table"] == table) & (ref["method"] == method) & (ref["metric"] == metric)]
    if dataset is not None:
        hit = hit[hit["dataset"] == dataset]
    if len(hit) != 1:
        raise FairbenchError(f"{len(hit)} reference entries for {source}/{table}/{method}/{metric}")
    return float(hit["mean"].iloc[0])
