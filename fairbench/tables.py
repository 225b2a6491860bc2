"""Fairness tables from the long per-class results (one row per run x checkpoint x attack x class).

Pipeline: `load_results` -> `run_metrics` (per checkpoint, then mean of the last k checkpoints of each
run) -> `fairness_table` (mean/std over seeds, rho against the baseline of the same protocol) ->
`format_table` (rich / markdown / LaTeX / CSV).

Conventions (docs/metrics.md §7): accuracies in percent; worst-class statistics are computed per checkpoint
from that checkpoint's own per-class accuracies and only then averaged (never min of averages);
rho uses the baseline's mean-over-seeds accuracies, so it is linear in the method's means.
Row order: groups in order of first appearance of (dataset, arch, protocol) then attack in the input;
within a group the baseline first, then the other methods in order of first appearance (stable).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from fairbench import metrics
from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.records import cascade_prefixes, class_counts, robust_flags, union_of_suites
from fairbench.results import CLASSWISE, ResultsWarning, find_runs, read_records, rewrite_hint

CLEAN = "clean"
NO_ATTACK = "(none)"
RESULT_COLUMNS = ("run_id", "method", "dataset", "arch", "protocol", "seed", "epoch", "attack", "eps",
                  "class_id", "class_name", "n", "correct")
REQUIRED_COLUMNS = [c for c in RESULT_COLUMNS if c not in ("eps", "class_name")]  # the rest is descriptive
RUN_KEYS = ["dataset", "arch", "protocol", "method", "seed", "run_id"]
GROUP_KEYS = ["dataset", "arch", "protocol", "attack"]
TABLE_COLUMNS = ["dataset", "arch", "protocol", "attack", "method", "n_seeds",
                 "clean_avg_mean", "clean_avg_std", "clean_worst_mean", "clean_worst_std", "rho_clean",
                 "rob_avg_mean", "rob_avg_std", "rob_worst_mean", "rob_worst_std", "rho_rob", "note"]
FORMATS = ("rich", "md", "latex", "csv")


# ----------------------------------------------------------------------------------------- loading

def load_results(results_dir: str | Path, union: bool = False, cascade: bool = False) -> pd.DataFrame:
    """Concatenate every `**/classwise.parquet` under `results_dir`; unreadable files are skipped.
    Derived suites from the runs' per-sample records (`derived_rows`): `union` adds, per checkpoint, the
    suite robust under every attack suite run there (`aa+pgd20`); `cascade` the robust accuracy after each
    prefix of a multi-component suite (`aa:apgd-ce`, `aa:apgd-t`, `aa:fab-t`)."""
    root = Path(results_dir)
    files = [folder / CLASSWISE for folder, _ in find_runs(root, with_meta=False)]
    frames = []
    for path in files:
        frame = _read_classwise(path)
        if frame is not None:
            frames.append(frame)
            if union or cascade:
                frames.append(derived_rows(frame, path.parent / "samples.parquet", union, cascade))
    if not frames:
        raise FairbenchError(f"no results under {root}; run `fairbench run ...` first")
    return pd.concat(frames, ignore_index=True)


def derived_rows(classwise: pd.DataFrame, samples_path: Path, union: bool, cascade: bool) -> pd.DataFrame:
    """Per-class rows of suites derived exactly from a run's per-sample records (docs/evaluation.md §10), per
    checkpoint: the union of the suites run there and the prefixes of their cascades. Each copies the run
    metadata and eps of the suite it derives from (the first of a union); none without records, and none
    that the run's table already holds (`aa+a3`)."""

    out = [classwise.iloc[:0]]
    if not samples_path.is_file():
        return out[0]
    try:
        samples = read_records(samples_path)
    except FairbenchError as err:
        warnings.warn(f"no union or cascade rows for run {samples_path.parent.name}: its {err}; "
                      f"{rewrite_hint(samples_path.parent)}", ResultsWarning, stacklevel=3)
        return out[0]
    for epoch, records in samples.groupby("epoch", sort=True):
        flags = [f for f in (union_of_suites(robust_flags(records)) if union else None,
                             cascade_prefixes(records) if cascade else None) if f is not None]
        for name, suite in pd.concat(flags).groupby("suite", sort=False) if flags else []:
            parent = name.split(":")[0].split("+")[0]
            like = classwise[(classwise["epoch"] == epoch) & (classwise["attack"] == parent)]
            if (classwise["attack"] == name).any() or like.empty:
                continue
            counts = class_counts(suite, int(like["class_id"].max()) + 1).set_index("class_id")
            out.append(like.assign(attack=name, n=counts.loc[like["class_id"], "n"].to_numpy(),
                                   correct=counts.loc[like["class_id"], "correct"].to_numpy()))
    return pd.concat(out, ignore_index=True)


def _read_classwise(path: Path) -> pd.DataFrame | None:
    """One file, or None with a ResultsWarning naming it (a crashed writer must not break tables)."""
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001  any reader error means "skip this file"
        warnings.warn(f"skipping unreadable results file {path}: {err}", ResultsWarning, stacklevel=3)
        return None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        warnings.warn(f"skipping results file {path}: missing columns {missing}", ResultsWarning,
                      stacklevel=3)
        return None
    return frame


# ------------------------------------------------------------------------------------ run metrics

def run_metrics(df: pd.DataFrame, last_k: int | None = 5, worst: str = "min") -> pd.DataFrame:
    """One row per (run, attack): avg and worst in percent, each the mean over the run's last `last_k`
    checkpoints (largest epochs) of the per-checkpoint metric. `worst` is "min" or "min20".

    Extra columns: n_checkpoints (how many were averaged) and last_epoch. `last_k=None` uses all.
    """
    _check_last_k(last_k)
    ckpt = checkpoint_metrics(df, worst)
    return _average_last_checkpoints(ckpt, last_k, _appearance_order(df, ["run_id", "attack"]))


def _check_last_k(last_k: int | None) -> None:
    if last_k is not None and (not isinstance(last_k, (int, np.integer)) or last_k < 1):
        raise FairbenchError(f"last_k must be a positive integer (or None for all), got {last_k!r}")


def _check_results(df: pd.DataFrame) -> None:
    """Fail early and clearly on frames that would silently give wrong numbers."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise FairbenchError(f"results table lacks columns {missing}")
    if df.empty:
        raise FairbenchError("results table has no rows")
    per_run = df.groupby("run_id", sort=False)[RUN_KEYS[:-1]].nunique(dropna=False)
    bad = per_run.index[(per_run > 1).any(axis=1)]
    if len(bad):
        raise FairbenchError(f"run {bad[0]!r} has several dataset/arch/protocol/method/seed values")
    dup = df.duplicated(["run_id", "epoch", "attack", "class_id"], keep=False)
    if dup.any():
        r = df[dup].iloc[0]
        raise FairbenchError(
            f"duplicate per-class rows for run {r.run_id!r}, epoch {r.epoch}, attack {r.attack!r}, "
            f"class {r.class_id} (results loaded twice, or one attack name used for several eps?)")
    if (df["n"] < 0).any() or (df["correct"] < 0).any() or (df["correct"] > df["n"]).any():
        raise FairbenchError("per-class counts must satisfy 0 <= correct <= n")


def checkpoint_metrics(df: pd.DataFrame, worst: str = "min") -> pd.DataFrame:
    """avg and worst (fractions) per (run, attack, epoch) from that checkpoint's own class counts;
    `worst` is "min" or "min20". Checks the frame first."""
    metrics.worst_metric(worst)  # validates the name
    _check_results(df)
    keys = RUN_KEYS + ["attack", "epoch"]
    d = df.loc[df["n"] > 0, keys + ["n", "correct"]].copy()  # a class with n = 0 was not evaluated
    d["acc"] = d["correct"].astype(float) / d["n"].astype(float)
    g = d.groupby(keys, sort=False, dropna=False)
    out = g.agg(correct=("correct", "sum"), n=("n", "sum"), worst=("acc", "min"))
    out["avg"] = out["correct"].astype(float) / out["n"].astype(float)
    if worst == "min20":
        out["worst"] = _worst_fraction_per_group(d, keys)
    return out.reset_index()


def _worst_fraction_per_group(d: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Vectorised `metrics.worst_fraction_accuracy` per checkpoint (same k = floor(0.2 C), >= 1)."""
    d = d.sort_values("acc", kind="stable")
    g = d.groupby(keys, sort=False, dropna=False)
    rank = g.cumcount()
    k = metrics.n_worst_classes(g["acc"].transform("size").to_numpy(), metrics.WORST_FRACTION)
    return d[rank.to_numpy() < k].groupby(keys, sort=False, dropna=False)["acc"].mean()


def _average_last_checkpoints(ckpt: pd.DataFrame, last_k: int | None, order: pd.Series) -> pd.DataFrame:
    """Mean over the last_k largest epochs per (run, attack); accuracies converted to percent."""
    keys = RUN_KEYS + ["attack"]
    out = _last_checkpoints(ckpt, last_k).groupby(keys, sort=False, dropna=False).agg(
        avg=("avg", "mean"), worst=("worst", "mean"), n_checkpoints=("epoch", "size"),
        last_epoch=("epoch", "max"), n_samples=("n", "min")).reset_index()
    out[["avg", "worst"]] *= 100.0
    rank = pd.MultiIndex.from_frame(out[["run_id", "attack"]]).map(order.to_dict())
    return out.iloc[np.argsort(np.asarray(rank), kind="stable")].reset_index(drop=True)


def _appearance_order(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """Rank of each distinct value tuple of `cols` by first appearance in df (for stable ordering)."""
    first = df[cols].drop_duplicates()
    return pd.Series(range(len(first)), index=pd.MultiIndex.from_frame(first))


# --------------------------------------------------------------------------------- fairness table

def fairness_table(
    df: pd.DataFrame,
    last_k: int | None = 5,
    worst: str = "min",
    baseline: str = "trades",
    rho_variant: str = "dafa",
    attacks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per (dataset, arch, protocol, robust attack, method): mean/std over seeds (percent,
    ddof=1, NaN for one seed) of clean and robust avg/worst, rho_clean and rho_rob against the
    `baseline` method's means of the same (dataset, arch, protocol, attack), and a `note` explaining
    any NaN rho. Each attack's row takes its clean columns from the checkpoints that attack averages. The options used are kept in
    `table.attrs` (worst, last_k, baseline, rho_variant) for the formatters.
    """
    metrics.rho(1.0, 1.0, 1.0, 1.0, variant=rho_variant)  # validates the variant name early
    per_run = suite_run_metrics(df, last_k, worst, attacks)
    table = _aggregate_seeds(per_run, last_k)
    table = _add_rho(table, baseline, rho_variant)
    table = _order_rows(table, df, baseline)
    table.attrs.update(worst=worst, last_k=last_k, baseline=baseline, rho_variant=rho_variant)
    return table


def suite_run_metrics(df: pd.DataFrame, last_k: int | None = 5, worst: str = "min",
                      attacks: Sequence[str] | None = None) -> pd.DataFrame:
    """The per-run values `fairness_table` averages over seeds: one row per (run, robust attack) with
    clean_avg, clean_worst, rob_avg, rob_worst in percent (each run's mean over its last `last_k`
    checkpoints). Statistics over seeds (fairbench.stats) start from these, so they describe the table's
    own numbers."""
    _check_last_k(last_k)
    return _suite_rows(checkpoint_metrics(df, worst), last_k, attacks)


def _suite_rows(ckpt: pd.DataFrame, last_k: int | None, attacks: Sequence[str] | None) -> pd.DataFrame:
    """Per (run, robust attack): robust avg/worst over the suite's last `last_k` checkpoints and clean
    avg/worst over the same checkpoints, so both halves of a row describe one set of models (a suite run
    on fewer checkpoints than another does not get clean numbers of models it never attacked)."""
    rob = ckpt[ckpt["attack"] != CLEAN]
    available = list(pd.unique(rob["attack"]))
    if attacks is not None:
        for a in attacks:
            if a not in available:
                raise UnknownNameError("attack", a, available)
        rob = rob[rob["attack"].isin(list(attacks))]
    elif rob.empty:  # only clean evaluated so far: still show the clean columns
        rob = ckpt[ckpt["attack"] == CLEAN].assign(attack=NO_ATTACK, avg=math.nan, worst=math.nan)
    clean = ckpt.loc[ckpt["attack"] == CLEAN, RUN_KEYS + ["epoch", "avg", "worst", "n"]].rename(
        columns={"avg": "clean_avg", "worst": "clean_worst", "n": "clean_n"})
    rows = _last_checkpoints(rob, last_k).merge(clean, on=RUN_KEYS + ["epoch"], how="left")
    rows["subset"] = rows["n"] < rows["clean_n"]  # `fairbench eval --n-examples` on that checkpoint
    keys = RUN_KEYS + ["attack"]
    out = rows.groupby(keys, sort=False, dropna=False).agg(
        rob_avg=("avg", "mean"), rob_worst=("worst", "mean"), clean_avg=("clean_avg", "mean"),
        clean_worst=("clean_worst", "mean"), n_checkpoints=("epoch", "size"), n_clean=("clean_n", "count"),
        n_samples=("n", "min"), clean_n_samples=("clean_n", "max"), n_subset=("subset", "sum"),
        epochs=("epoch", lambda e: tuple(sorted(int(x) for x in e)))).reset_index()
    out[["rob_avg", "rob_worst", "clean_avg", "clean_worst"]] *= 100.0
    out["epochs_differ"] = out.groupby("run_id", sort=False)["epochs"].transform("nunique") > 1
    return out


def _last_checkpoints(ckpt: pd.DataFrame, last_k: int | None) -> pd.DataFrame:
    """The rows of the `last_k` largest epochs of each (run, attack), in input order otherwise."""
    if last_k is None:
        return ckpt
    rank = ckpt.groupby(RUN_KEYS + ["attack"], sort=False, dropna=False)["epoch"].rank(method="first",
                                                                                     ascending=False)
    return ckpt[rank <= last_k]


def _aggregate_seeds(per_run: pd.DataFrame, last_k: int | None) -> pd.DataFrame:
    """Mean and std (ddof=1) over the runs of each (group, method), with notes on thin data."""
    g = per_run.groupby(GROUP_KEYS + ["method"], sort=False, dropna=False)
    out = g.agg(
        n_seeds=("run_id", "size"),
        clean_avg_mean=("clean_avg", "mean"), clean_avg_std=("clean_avg", "std"),
        clean_worst_mean=("clean_worst", "mean"), clean_worst_std=("clean_worst", "std"),
        rob_avg_mean=("rob_avg", "mean"), rob_avg_std=("rob_avg", "std"),
        rob_worst_mean=("rob_worst", "mean"), rob_worst_std=("rob_worst", "std"),
    ).reset_index()
    out["note"] = pd.Series([_seed_notes(runs, last_k) for _, runs in g], dtype=object)
    return out


def _seed_notes(runs: pd.DataFrame, last_k: int | None) -> list[str]:
    """Notes on a method's runs: missing clean results, fewer checkpoints than asked, repeated seeds,
    robust columns from fewer test samples than the clean ones, checkpoints that differ between suites."""
    notes = []
    no_clean = runs["n_clean"] < runs["n_checkpoints"]
    if no_clean.any():
        notes.append(f"clean results missing at some of the averaged checkpoints in {int(no_clean.sum())} of "
                     f"{len(runs)} runs")
    fewest = int(runs["n_checkpoints"].min())
    if last_k is not None and fewest < last_k:
        notes.append(f"some runs have only {fewest} checkpoint(s) (last_k={last_k})")
    if runs["seed"].nunique() < len(runs):
        notes.append("several runs share a seed")
    subset = runs[runs["n_subset"] > 0]
    if len(subset):  # `fairbench eval --n-examples`: robust and clean columns come from different samples
        at = [f"{int(r.n_subset)} of {int(r.n_checkpoints)}" for r in subset.itertuples()]
        where = "every checkpoint" if (subset["n_subset"] == subset["n_checkpoints"]).all() else (
            f"{at[0]} checkpoints" if len(set(at)) == 1 else f"{'/'.join(at)} checkpoints of {len(subset)} runs")
        notes.append(f"robust columns from {int(subset['n_samples'].min())} of "
                     f"{int(subset['clean_n_samples'].max())} test samples at {where}")
    if runs["epochs_differ"].any():  # other suites of these runs average other checkpoints
        spans = sorted({_epoch_span(e) for e in runs["epochs"]})
        notes.append(f"averages epochs {spans[0]}" if len(spans) == 1 else
                     f"averages epochs {', '.join(spans)} (differing between runs)")
    return notes


def _epoch_span(epochs: tuple[int, ...]) -> str:
    """`6-10` for consecutive epochs, else `4, 6, 8`."""
    if len(epochs) > 1 and list(epochs) == list(range(epochs[0], epochs[-1] + 1)):
        return f"{epochs[0]}-{epochs[-1]}"
    return ", ".join(map(str, epochs))


def _add_rho(table: pd.DataFrame, baseline: str, variant: str) -> pd.DataFrame:
    """rho_clean / rho_rob against the baseline's means in the same group; NaN + note if undefined."""
    base = table.loc[table["method"] == baseline, GROUP_KEYS + [
        "clean_avg_mean", "clean_worst_mean", "rob_avg_mean", "rob_worst_mean"]]
    base = base.rename(columns=lambda c: c if c in GROUP_KEYS else "base_" + c)
    t = table.merge(base, on=GROUP_KEYS, how="left")
    has_base = (t["base_clean_avg_mean"].notna() | t["base_rob_avg_mean"].notna()).to_numpy()
    is_base = (t["method"] == baseline).to_numpy()
    no_base = f"no {baseline} baseline for this protocol"
    notes = [[no_base] * (not b) + list(n) for b, n in zip(has_base, t["note"])]
    for kind, label in (("clean", "rho_clean"), ("rob", "rho_rob")):
        avg, wst, b_avg, b_wst = (t[f"{p}{kind}_{m}_mean"].to_numpy()
                                  for p in ("", "base_") for m in ("avg", "worst"))
        r = np.atleast_1d(metrics.rho(avg, wst, b_avg, b_wst, variant=variant))
        own = ~np.isnan(avg) & ~np.isnan(wst)
        t[label] = np.where(is_base & own, 0.0, r)  # the baseline against itself is 0 by definition
        for i in np.flatnonzero(np.isnan(t[label].to_numpy()) & has_base & own):
            reason = metrics.rho_undefined_reason(b_avg[i], b_wst[i])
            if reason:
                which = f"{baseline} {'clean' if kind == 'clean' else 'robust'}"
                notes[i].append(reason.replace("baseline", which, 1).replace(": rho ", f": {label} "))
    t["note"] = ["; ".join(n) for n in notes]
    return t[TABLE_COLUMNS]


def _order_rows(table: pd.DataFrame, df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Groups by first appearance; baseline first in a group, then methods by first appearance."""
    setup = _appearance_order(df, ["dataset", "arch", "protocol"])
    attack = {a: i for i, a in enumerate(pd.unique(df["attack"]))}
    method = {m: i + 1 for i, m in enumerate(pd.unique(df["method"]))}
    method[baseline] = 0
    key = pd.DataFrame({
        "s": pd.MultiIndex.from_frame(table[["dataset", "arch", "protocol"]]).map(setup.to_dict()),
        "a": table["attack"].map(lambda a: attack.get(a, -1)),
        "m": table["method"].map(method),
    })
    idx = key.sort_values(["s", "a", "m"], kind="stable").index
    return table.loc[idx].reset_index(drop=True)


# ------------------------------------------------------------------------------------- formatting

def format_table(table: pd.DataFrame, fmt: str = "md"):
    """Render a `fairness_table`. "rich" -> list of rich Tables (one per group); "md" and "latex" ->
    one string with a heading and a table per group, notes under each; "csv" -> the flat frame as
    CSV text (full precision, round-trips through pandas)."""
    if fmt not in FORMATS:
        raise UnknownNameError("format", fmt, list(FORMATS))
    if fmt == "csv":
        return table.to_csv(index=False)
    groups = [(heading, _headers(table), [_cells(r) for _, r in rows.iterrows()], _notes(rows))
              for heading, rows in _groups(table)]
    return format_groups(groups, fmt, _footer(table))


class Bold(str):
    """A cell printed in bold (e.g. the best entry of a paper column): **x** in markdown, \\textbf in LaTeX."""


Group = tuple[str, list[str], list[list[str]], list[str]]
"""(heading, column headers, cell texts per row, notes) of one rendered table; a cell may be `Bold`."""


def format_groups(groups: Sequence[Group], fmt: str, footer: str = "", notes: Sequence[str] = ()):
    """One renderer for every table fairbench prints (fairness, statistics and the paper's tables): "rich" ->
    list of rich renderables, "md" / "latex" -> one string with a table per group, then `notes` (a list under
    all tables) and the footer once at the end. Cells are plain text ("±", "Δ", "–"); LaTeX escapes them."""
    if fmt not in ("rich", "md", "latex"):
        raise UnknownNameError("format", fmt, ["rich", "md", "latex"])
    render = {"rich": _rich_group, "md": _md_group, "latex": _latex_group}[fmt]
    parts = [render(heading, headers, cells, group_notes) for heading, headers, cells, group_notes in groups]
    if fmt == "rich":
        from rich.text import Text

        return parts + ([Text("\n".join(f"- {n}" for n in notes))] if notes else [])
    if notes:
        parts.append("\n".join(f"% {n}" if fmt == "latex" else f"- {n}" for n in notes))
    if footer:
        parts.append(f"% {footer}" if fmt == "latex" else f"_{footer}_")
    return "\n\n".join(parts) + "\n"


def fmt_mean_std(mean: float, std: float, pm: str = "±") -> str:
    """`82.17 ± 0.45`; just `82.17` without a std (one seed); `n/a` for NaN."""
    if mean is None or pd.isna(mean):
        return "n/a"
    return f"{mean:.2f}" if std is None or pd.isna(std) else f"{mean:.2f} {pm} {std:.2f}"


def fmt_rho(value: float) -> str:
    """rho with 2 decimals (no `-0.00`); `n/a` for NaN."""
    if value is None or pd.isna(value):
        return "n/a"
    return f"{value + 0.0:.2f}" if round(value, 2) != 0 else "0.00"


def _groups(table: pd.DataFrame) -> Iterable[tuple[str, pd.DataFrame]]:
    """(heading, rows) per (dataset, arch, protocol, attack) in table order."""
    for (ds, arch, proto, attack), rows in table.groupby(GROUP_KEYS, sort=False, dropna=False):
        yield f"{ds} / {arch} / {attack} (protocol {proto})", rows


def _headers(table: pd.DataFrame) -> list[str]:
    """Column labels; the worst columns say "worst-20%" when A_wst20 was used (docs/metrics.md §4)."""
    w = "worst-20%" if table.attrs.get("worst") == "min20" else "worst"
    return ["method", "seeds", "clean avg", f"clean {w}", "rho_clean", "robust avg", f"robust {w}", "rho_rob"]


def _cells(row: pd.Series, pm: str = "±") -> list[str]:
    """Formatted cells of one row, in `_headers` order."""
    return [str(row["method"]), str(row["n_seeds"]),
            fmt_mean_std(row["clean_avg_mean"], row["clean_avg_std"], pm),
            fmt_mean_std(row["clean_worst_mean"], row["clean_worst_std"], pm), fmt_rho(row["rho_clean"]),
            fmt_mean_std(row["rob_avg_mean"], row["rob_avg_std"], pm),
            fmt_mean_std(row["rob_worst_mean"], row["rob_worst_std"], pm), fmt_rho(row["rho_rob"])]


def _notes(rows: pd.DataFrame) -> list[str]:
    """`method: note` lines for the rows that carry a note (they explain every n/a rho)."""
    notes = rows["note"].fillna("").astype(str) if "note" in rows else pd.Series([], dtype=str)
    return [f"{m}: {n}" for m, n in zip(rows["method"], notes) if n]


def _footer(table: pd.DataFrame) -> str:
    """Options that change the numbers, stated once under all tables."""
    a = table.attrs
    if not a:
        return ""
    ckpts = f"the last {a['last_k']} checkpoints" if a.get("last_k") else "all checkpoints"
    parts = [f"per-run mean over {ckpts}",
             f"baseline {a.get('baseline')}", f"rho variant {a.get('rho_variant')}"]
    if a.get("worst") == "min20":
        parts.append("worst = mean of the lowest 20% classes")
    return "; ".join(parts)


def _md_group(heading: str, headers: list[str], cells: list[list[str]], notes: list[str]) -> str:
    """Heading line, pipe table, notes as a list."""
    lines = [f"### {heading}", "", "| " + " | ".join(headers) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in cells]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def _md_cell(cell: str) -> str:
    text = cell.replace("|", "\\|")
    return f"**{text}**" if isinstance(cell, Bold) else text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "–": "--"}
_LATEX_HEADERS = {"rho_clean": r"$\rho_{\mathrm{clean}}$", "rho_rob": r"$\rho_{\mathrm{rob}}$"}


def _tex(text: str) -> str:
    """Escape LaTeX special characters in names and notes."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _tex_cell(cell: str) -> str:
    return rf"\textbf{{{_tex(cell)}}}" if isinstance(cell, Bold) else _tex(cell)


def _latex_group(heading: str, headers: list[str], cells: list[list[str]], notes: list[str]) -> str:
    """A booktabs table environment with the heading as caption and notes under the tabular."""
    head = [_LATEX_HEADERS.get(h, _tex(h)) for h in headers]
    body = [" & ".join(_tex_cell(c) for c in row) + r" \\" for row in cells]
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(heading)}}}",
             r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines += [r"\par\smallskip\footnotesize " + r" \\ ".join(_tex(n) for n in notes)]
    lines.append(r"\end{table}")
    return "\n".join(lines)


def _rich_group(heading: str, headers: list[str], cells: list[list[str]], notes: list[str]):
    """A rich Table with the heading as title and the notes as caption; cells as Text (never read as markup)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(title=heading, caption="\n".join(notes) or None, caption_justify="left", box=box.SIMPLE_HEAD)
    for i, h in enumerate(headers):  # two-line headers keep narrow terminals from truncating them
        t.add_column(h.replace(" ", "\n", 1).replace("_", "\n", 1), justify="left" if i == 0 else "right")
    for row in cells:
        t.add_row(*(Text(c, style="bold" if isinstance(c, Bold) else "") for c in row))
    return t
