"""The TRIX paper's tables (arXiv 2507.07768) rebuilt from fairbench results, and compared with the paper.

- `paper_layout`: our numbers in the paper's layout (its methods in its order, its columns, one block per
  dataset / arch), mean ± std over seeds, the best entry of each column in bold; `format_paper_layout`
  renders it as markdown, LaTeX (booktabs), CSV or rich, with the fairness tables' renderer
  (`tables.format_groups`), as every formatter here does.
- `compare_with_paper`: ours beside the published numbers (`fairbench.reference`), difference ours - paper.
- `check_reference_rho`: recompute each published rho from the published averages and worsts with both
  conventions of `metrics.rho`; the TRIX tables mix them (docs/metrics.md §6), so this says which entry needs
  which, and flags the ones neither reproduces.

rho in our layouts always uses one formula (`rho_variant`, DAFA's by default): we never switch formulas per
entry to match the paper; the layout's notes list which published entries need which convention instead.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from fairbench import metrics, stats, tables
from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.reference import load_reference, reference_wide

MISSING = "–"  # a method or dataset the results do not have
FORMATS = tables.FORMATS
RHO_TOL = 0.005
CONVENTIONS = ("both", "dafa", "worst_minus_avg", "neither")
WITH_RHO = ("clean_avg", "clean_worst", "rho_clean", "rob_avg", "rob_worst", "rho_rob")
NO_RHO = ("clean_avg", "clean_worst", "rob_avg", "rob_worst")
HEADERS = {"clean_avg": "Avg Clean", "clean_worst": "Worst Clean", "rho_clean": "rho_clean",
           "rob_avg": "Avg Robust", "rob_worst": "Worst Robust", "rho_rob": "rho_rob"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10",
                 "tinyimagenet": "Tiny-ImageNet"}
ARCH_NAMES = {"resnet18": "ResNet-18", "preact_resnet18": "PreActResNet-18", "wrn28_10": "WideResNet-28-10"}
ATTACK_NAMES = {"aa": "AutoAttack", "pgd20": "PGD-20", "pgd": "PGD"}


@dataclass(frozen=True)
class Block:
    """One sub-table of the paper: the published tables it reproduces and the results it is built from."""
    refs: tuple[str, ...]
    dataset: str
    arch: str | None  # None: the paper does not say; every arch found in the results gets a block
    label: str        # "Table 1(a)"


@dataclass(frozen=True)
class PaperTable:
    """A paper table: its robust attack (fairbench name), worst-class statistic, columns and blocks."""
    name: str
    attack: str
    worst: str
    columns: tuple[str, ...]
    blocks: tuple[Block, ...]
    notes: tuple[str, ...] = ()


def _abc(table: int, specs: list[tuple[str, str]]) -> tuple[Block, ...]:
    """Blocks (a), (b), ... of a table from (dataset, arch) pairs."""
    return tuple(Block((f"table{table}{s}",), ds, arch, f"Table {table}({s})")
                 for s, (ds, arch) in zip("abc", specs))


PAPER_TABLES: dict[str, PaperTable] = {
    "table1": PaperTable("table1", "aa", "min", WITH_RHO, _abc(1, [
        ("cifar10", "resnet18"), ("cifar100", "resnet18"), ("stl10", "resnet18")])),
    "table2": PaperTable("table2", "pgd20", "min", NO_RHO,
                         (Block(("table2",), "cifar10", "resnet18", "Table 2"),),
                         ("the paper's Table 2 uses PGD (steps and eps lost in the text) and prints one "
                          "number per cell; DAFA-Basic is TRADES",)),
    "table3": PaperTable("table3", "aa", "min", WITH_RHO, _abc(3, [
        ("cifar10", "preact_resnet18"), ("cifar100", "preact_resnet18"), ("stl10", "preact_resnet18")])),
    "table4": PaperTable("table4", "aa", "min", WITH_RHO, _abc(4, [
        ("cifar10", "wrn28_10"), ("cifar100", "wrn28_10")])),
    "tinyimagenet": PaperTable("tinyimagenet", "aa", "min20", WITH_RHO,
                               (Block(("table5a", "table5b"), "tinyimagenet", None, "Table 5(a), 5(b)"),),
                               ("the paper states neither Table 5's architecture nor how 5(a) and 5(b) "
                                "differ: ours is compared with both",)),
}
ALIASES = {"table5": "tinyimagenet"}


def table_ids() -> list[str]:
    """Every accepted table id: whole tables, their parts (table1a, ...) and aliases."""
    parts = [r for t in PAPER_TABLES.values() for b in t.blocks for r in b.refs if r != t.name]
    return [*PAPER_TABLES, *ALIASES, *parts]


def resolve_table(table_id: str) -> PaperTable:
    """The PaperTable for a whole table ("table1") or one part of it ("table1b", "table5a")."""
    table_id = ALIASES.get(table_id, table_id)
    if table_id in PAPER_TABLES:
        return PAPER_TABLES[table_id]
    for t in PAPER_TABLES.values():
        for b in t.blocks:
            if table_id in b.refs:
                return replace(t, name=table_id, blocks=(replace(b, refs=(table_id,)),))
    raise UnknownNameError("paper table", table_id, table_ids())


def column_headers(t: PaperTable) -> list[str]:
    """The paper's column labels; "(Min 20%)" on the worst columns where it uses A_wst20."""
    suffix = " (Min 20%)" if t.worst == "min20" else ""
    return [HEADERS[c] + (suffix if c.endswith("worst") else "") for c in t.columns]


# ------------------------------------------------------------------------------------------- layout

@dataclass
class LayoutBlock:
    """One rendered sub-table: rows = the paper's methods; `<col>_mean/_std/_best` per paper column."""
    caption: str
    refs: tuple[str, ...]
    dataset: str
    arch: str
    protocol: str | None
    attack: str
    rows: pd.DataFrame
    notes: list[str] = field(default_factory=list)


@dataclass
class PaperLayout:
    """A paper table rebuilt from our results, ready for `format_paper_layout`."""
    table_id: str
    columns: tuple[str, ...]
    headers: list[str]
    blocks: list[LayoutBlock]
    notes: list[str]


def paper_layout(
    table_id: str,
    results_table: pd.DataFrame,
    last_k: int | None = 5,
    baseline: str = "trades",
    rho_variant: str = "dafa",
    attack: str | None = None,
) -> PaperLayout:
    """Our numbers in the paper's layout. `results_table` is the long per-class frame (`load_results`) or a
    `fairness_table` built with the paper's worst statistic. `attack` overrides the paper's robust attack
    (aa; pgd20 for Table 2). Methods or datasets without results are kept as "–" rows."""
    t = resolve_table(table_id)
    ft = _fairness(results_table, t, last_k, baseline, rho_variant)
    stand_in = _stand_in_notes(ft, t, attack)
    if stand_in:  # a smoke grid: the paper's layout over the datasets and attack the results have
        attack = attack or _first_attack(ft)
        t = dataclasses.replace(t, blocks=tuple(
            Block(tuple(r for b in t.blocks for r in b.refs), d, a, f"{t.name} layout")
            for d, a in ft[["dataset", "arch"]].drop_duplicates().itertuples(index=False)))
    attack = attack or t.attack
    blocks = [blk for b in t.blocks for blk in _layout_blocks(ft, b, t, attack)]
    notes = [*stand_in, *_protocol_notes(ft, t, last_k, baseline, rho_variant), *t.notes,
             *_convention_notes([r for b in t.blocks for r in b.refs]),
             *_significance_notes(results_table, blocks, t, last_k, baseline)]
    return PaperLayout(t.name, t.columns, column_headers(t), blocks, notes)


def _significance_notes(results: pd.DataFrame, blocks: list[LayoutBlock], t: PaperTable, last_k: int | None,
                        baseline: str) -> list[str]:
    """TRIX against the baseline per block, paired over the seeds both have (docs/statistics.md): whether a
    difference the layout shows is more than seed noise. Needs the per-class results (a fairness table alone
    has no per-seed values)."""
    if set(tables.TABLE_COLUMNS) <= set(results.columns):
        return []
    texts = stats.significance_notes(tables.suite_run_metrics(results, last_k, t.worst), "trix", baseline)
    keys = [(b.caption, (b.dataset, b.arch, b.protocol, b.attack)) for b in blocks]
    return [f"significance, {caption}: {texts[key]}" for caption, key in keys if key in texts]


def _stand_in_notes(ft: pd.DataFrame, t: PaperTable, attack: str | None) -> list[str]:
    """Non-empty when the results hold none of the table's datasets (e.g. a `--scale smoke` grid on digits)."""
    if ft.empty or ft["dataset"].isin([b.dataset for b in t.blocks]).any():
        return []
    found = ", ".join(sorted(set(ft["dataset"])))
    return [f"no results for the paper's datasets; the layout of {t.name} is shown for {found} "
            f"(attack {attack or _first_attack(ft)}), e.g. from `--scale smoke`"]


def _first_attack(ft: pd.DataFrame) -> str:
    attacks = [a for a in pd.unique(ft["attack"]) if a != tables.NO_ATTACK]
    return attacks[0] if attacks else tables.NO_ATTACK


def _fairness(results: pd.DataFrame, t: PaperTable, last_k: int | None, baseline: str,
              rho_variant: str) -> pd.DataFrame:
    """The fairness table (computed from long results, or given) with the paper's worst statistic."""
    if set(tables.TABLE_COLUMNS) <= set(results.columns):
        worst = results.attrs.get("worst", "min")
        if worst != t.worst:
            raise FairbenchError(f"{t.name} needs worst={t.worst!r}; this fairness table used {worst!r}")
        return results
    return tables.fairness_table(results, last_k=last_k, worst=t.worst, baseline=baseline,
                                 rho_variant=rho_variant)


def _layout_blocks(ft: pd.DataFrame, b: Block, t: PaperTable, attack: str) -> list[LayoutBlock]:
    """One LayoutBlock per (arch, protocol) of the block's results; one of "–" rows if there are none."""
    mine = ft[(ft["dataset"] == b.dataset) & ((ft["arch"] == b.arch) if b.arch else True)]
    groups = list(mine.groupby(["arch", "protocol"], sort=False, dropna=False))
    if not groups:
        groups = [((b.arch or "", None), mine)]
    methods = _paper_methods(b.refs)
    out = []
    for (arch, protocol), frame in groups:
        rows, notes = _block_rows(frame, methods, attack, t.columns)
        extra = [m for m in pd.unique(frame["method"]) if m not in set(methods["method"])]
        if extra:
            notes.append(f"not in the paper's table, left out: {', '.join(extra)}")
        seeds = [f"{r.label} {r.n_seeds}" for r in rows.itertuples() if r.present]
        if seeds:
            notes.insert(0, f"seeds: {', '.join(seeds)}")
        out.append(LayoutBlock(_caption(b, arch, protocol, attack), b.refs, b.dataset, arch, protocol,
                               attack, _mark_best(rows, t.columns), notes))
    return out


def _paper_methods(refs: tuple[str, ...]) -> pd.DataFrame:
    """(method, label) of the published rows, in the paper's order, over the given tables."""
    ref = load_reference("trix")
    rows = ref[ref["table"].isin(refs)][["method", "label"]]
    return rows.drop_duplicates("method").reset_index(drop=True)


def _caption(b: Block, arch: str, protocol: str | None, attack: str) -> str:
    """"Table 1(a): CIFAR-10 / ResNet-18 / AutoAttack (protocol common)"."""
    arch_name = ARCH_NAMES.get(arch, arch) or "arch not stated"
    if b.arch is None and arch:
        arch_name += " (ours; the paper does not state it)"
    names = (DATASET_NAMES.get(b.dataset, b.dataset), arch_name, ATTACK_NAMES.get(attack, attack))
    text = f"{b.label}: " + " / ".join(names)
    return text + (f" (protocol {protocol})" if protocol is not None and not pd.isna(protocol) else "")


def _block_rows(frame: pd.DataFrame, methods: pd.DataFrame, attack: str,
                columns: tuple[str, ...]) -> tuple[pd.DataFrame, list[str]]:
    """Values per paper method; `present` / `has_attack` say which cells are "–"."""
    rows, notes = [], []
    for method, label in methods.itertuples(index=False):
        own = frame[frame["method"] == method]
        hit = own[own["attack"] == attack]
        src = hit.iloc[0] if len(hit) else (own.iloc[0] if len(own) else None)
        row = {"method": method, "label": label, "present": src is not None, "has_attack": len(hit) > 0,
               "n_seeds": int(src["n_seeds"]) if src is not None else 0}
        for c in columns:
            robust = c.startswith("rob") or c == "rho_rob"
            usable = src is not None and (len(hit) > 0 or not robust)
            row[f"{c}_mean"] = _value(src, c) if usable else math.nan
            row[f"{c}_std"] = src.get(f"{c}_std", math.nan) if usable else math.nan
        if src is not None and not len(hit):
            notes.append(f"{label}: no {attack} results; robust columns left empty")
        if src is not None and src.get("note"):
            notes.append(f"{label}: {src['note']}")
        rows.append(row)
    return pd.DataFrame(rows), notes


def _value(row: pd.Series, column: str) -> float:
    """A fairness-table value by paper column name (rho columns have no _mean suffix)."""
    return float(row[column] if column.startswith("rho") else row[f"{column}_mean"])


def _mark_best(rows: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """`<col>_best`: the highest value as printed (2 decimals), ties all bold; higher is better everywhere."""
    for c in columns:
        shown = rows[f"{c}_mean"].round(2)
        rows[f"{c}_best"] = shown.notna() & (shown == shown.max())
    return rows


def _protocol_notes(ft: pd.DataFrame, t: PaperTable, last_k: int | None, baseline: str,
                    rho_variant: str) -> list[str]:
    """How our numbers were made, and where the paper says something else."""
    last_k = ft.attrs.get("last_k", last_k)
    ckpts = f"its last {last_k} checkpoints" if last_k else "all its checkpoints"
    notes = [f"ours: mean ± std (ddof=1) over seeds of each run's mean over {ckpts}; the paper's main "
             "text says the same (last 5 epochs), its appendix that the best worst-class robust checkpoint "
             "was used"]
    if t.worst == "min20":
        notes.append("worst = mean of the lowest 20% of classes, chosen per run and checkpoint "
                     "(docs/metrics.md §4)")
    if "rho_clean" in t.columns:
        variant = ft.attrs.get("rho_variant", rho_variant)
        notes.append(f"ours: rho by the {variant!r} formula against {ft.attrs.get('baseline', baseline)} of "
                     "the same protocol (docs/metrics.md §5), one formula for every entry")
    return notes


def _convention_notes(refs: list[str]) -> list[str]:
    """Which published rho entries of these tables need which convention (docs/metrics.md §6)."""
    check = check_reference_rho("trix")
    check = check[check["table"].isin(refs)]
    notes = []
    for table, g in check.groupby("table", sort=False):
        parts = [f"{(g['convention'] == c).sum()} {c}" for c in CONVENTIONS]
        wma = _entry_list(g[g["convention"] == "worst_minus_avg"])
        flagged = g[g["flagged"]]
        text = f"published rho in {table} ({len(g)} entries): {', '.join(parts)}"
        text += f"; need worst_minus_avg: {wma}" if wma else ""
        if len(flagged):
            cut = int((flagged["truncated"] != "").sum())
            why = f"{cut} of them by a convention truncated instead of rounded; " if cut else ""
            text += (f"; reproduced by neither: {_entry_list(flagged)} ({why}numbers: "
                     "`fairbench paper check-reference`)")
        notes.append(text)
    return notes


def _entry_list(check: pd.DataFrame) -> str:
    """"TRADES + TRIX rho_rob 0.39, ...": which printed entries, without the numbers."""
    return ", ".join(f"{r.label} {r.rho} {r.printed:.2f}" for r in check.itertuples())


# --------------------------------------------------------------------------------------- rendering

def layout_frame(layout: PaperLayout) -> pd.DataFrame:
    """The layout as one flat frame (the CSV export): block columns, then each block's rows."""
    frames = [b.rows.assign(table=layout.table_id, caption=b.caption, dataset=b.dataset, arch=b.arch,
                            protocol=b.protocol, attack=b.attack) for b in layout.blocks]
    flat = pd.concat(frames, ignore_index=True)
    front = ["table", "caption", "dataset", "arch", "protocol", "attack", "method", "label", "present"]
    return flat[front + [c for c in flat.columns if c not in front]]


def _cell(row: pd.Series, column: str) -> str:
    """Formatted cell text: "–" for absent results, the tables helpers' formats otherwise."""
    robust = column.startswith("rob") or column == "rho_rob"
    if not row["present"] or (robust and not row["has_attack"]):
        return MISSING
    if column.startswith("rho"):
        return tables.fmt_rho(row[f"{column}_mean"])
    return tables.fmt_mean_std(row[f"{column}_mean"], row[f"{column}_std"])


def _cells(layout: PaperLayout, block: LayoutBlock) -> list[list[str]]:
    """Cell texts, label first, for every row of a block; the best of each column `tables.Bold`."""
    return [[str(r["label"])] + [_bold(_cell(r, c), r[f"{c}_best"]) for c in layout.columns]
            for _, r in block.rows.iterrows()]


def _bold(text: str, bold: bool) -> str:
    return tables.Bold(text) if bold else text


def format_paper_layout(layout: PaperLayout, fmt: str = "md"):
    """"md"/"latex" -> one string, "csv" -> CSV text, "rich" -> a list of rich renderables (the tables'
    renderer, `tables.format_groups`)."""
    if fmt not in FORMATS:
        raise UnknownNameError("format", fmt, list(FORMATS))
    if fmt == "csv":
        return layout_frame(layout).to_csv(index=False)
    headers = ["Method", *layout.headers]
    groups = [(b.caption, headers, _cells(layout, b), b.notes) for b in layout.blocks]
    return tables.format_groups(groups, fmt, notes=layout.notes)


# ------------------------------------------------------------------------------------- comparison

COMPARE_COLUMNS = ["table", "caption", "dataset", "arch", "protocol", "attack", "method", "label", "metric",
                   "ours", "ours_std", "n_seeds", "paper", "paper_std", "diff"]


def compare_with_paper(
    results_table: pd.DataFrame,
    table_id: str,
    last_k: int | None = 5,
    baseline: str = "trades",
    rho_variant: str = "dafa",
    attack: str | None = None,
) -> pd.DataFrame:
    """One row per published number of `table_id`: ours (NaN where we have no result), the paper's, and
    diff = ours - paper. Tiny-ImageNet results are compared with both Table 5(a) and 5(b)."""
    layout = paper_layout(table_id, results_table, last_k, baseline, rho_variant, attack)
    ref = load_reference("trix")
    refuse_mismatch(layout, ref)
    frames = []
    for block in layout.blocks:
        ours = _block_long(block, layout.columns)
        for table in block.refs:
            paper = ref.loc[ref["table"] == table, ["method", "label", "metric", "mean", "std"]]
            m = paper.rename(columns={"mean": "paper", "std": "paper_std"}).merge(
                ours, on=["method", "metric"], how="left")
            frames.append(m.assign(table=table, caption=block.caption, dataset=block.dataset, arch=block.arch,
                                   protocol=block.protocol, attack=block.attack))
    out = pd.concat(frames, ignore_index=True)
    out["diff"] = out["ours"] - out["paper"]
    out.attrs.update(headers=dict(zip(layout.columns, layout.headers)), notes=layout.notes)
    return out[COMPARE_COLUMNS]


def refuse_mismatch(layout: PaperLayout, ref: pd.DataFrame) -> None:
    """Refuse to compare results of another dataset, architecture or attack with the published numbers
    (smoke results on digits against CIFAR-10 AutoAttack): such differences look like findings and are not."""
    measured = {t: g.iloc[0] for t, g in ref.groupby("table", sort=False)}
    ours, theirs, why = [], [], []
    for block in (b for b in layout.blocks if b.rows["present"].any()):
        for table in block.refs:
            differ = _differences(block, measured[table])
            if differ:
                p = measured[table]
                ours.append(_setting(block.dataset, block.arch, block.attack))
                theirs.append(f"{table}: {_setting(p['dataset'], p['arch'], p['attack'])}")
                why.extend(differ)
    if not why:
        return
    grid = next(t.name for t in PAPER_TABLES.values()
                if layout.table_id == t.name or any(layout.table_id in b.refs for b in t.blocks))
    raise FairbenchError(
        f"--compare paper: these results ({'; '.join(dict.fromkeys(ours))}) differ from what the published "
        f"{layout.table_id} numbers measured ({'; '.join(dict.fromkeys(theirs))}) in "
        f"{_and(list(dict.fromkeys(why)))}, so ours - paper would mean nothing; nothing was compared. Compare "
        f"results on the paper's dataset and architecture under its attack (`fairbench run --config "
        f"benchmarks/paper/{grid}.toml` at paper scale, and no other --attack here), or leave out --compare to "
        f"see these results in the paper's layout")


def _and(words: list[str]) -> str:
    """"dataset, architecture and attack"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _differences(block: LayoutBlock, published: pd.Series) -> list[str]:
    """Which of dataset, architecture and attack differ between a layout block and a published table."""
    why = []
    if block.dataset != published["dataset"]:
        why.append("dataset")
    if published["arch"] and block.arch != published["arch"]:
        why.append("architecture")
    if not _same_attack(block.attack, str(published["attack"])):
        why.append("attack")
    return why


def _same_attack(ours: str, published: str) -> bool:
    """The paper's "pgd" (Table 2: steps not stated) matches any of our PGD suites; other names exactly."""
    return ours == published or (published == "pgd" and ours.startswith("pgd") and "@" not in ours)


def _setting(dataset: str, arch: str | None, attack: str) -> str:
    """"CIFAR-10 / ResNet-18 / AutoAttack"."""
    return " / ".join((DATASET_NAMES.get(dataset, dataset), ARCH_NAMES.get(arch, arch) or "arch not stated",
                       ATTACK_NAMES.get(attack, attack)))


def _block_long(block: LayoutBlock, columns: tuple[str, ...]) -> pd.DataFrame:
    """(method, metric, ours, ours_std, n_seeds) of a layout block; NaN where the cell shows "–"."""
    rows = []
    for _, r in block.rows.iterrows():
        for c in columns:
            shown = _cell(r, c) != MISSING
            rows.append({"method": r["method"], "metric": c, "n_seeds": r["n_seeds"],
                         "ours": r[f"{c}_mean"] if shown else math.nan,
                         "ours_std": r[f"{c}_std"] if shown else math.nan})
    return pd.DataFrame(rows)


def format_comparison(comparison: pd.DataFrame, fmt: str = "md"):
    """Per published table: cells "ours vs paper (ours - paper)"; "csv" gives the long frame."""
    if fmt not in FORMATS:
        raise UnknownNameError("format", fmt, list(FORMATS))
    if fmt == "csv":
        return comparison.to_csv(index=False)
    headers = comparison.attrs.get("headers") or {m: HEADERS[m] for m in pd.unique(comparison["metric"])}
    groups = []
    for (table, caption), g in comparison.groupby(["table", "caption"], sort=False):
        cells = [[label] + [_compare_cell(rows, m) for m in headers] for label, rows in g.groupby("label", sort=False)]
        groups.append((f"{caption}: ours vs published {table}", ["Method", *headers.values()], cells, []))
    notes = ["cells: ours vs paper (ours - paper); rho: ours by one formula, the paper's by mixed conventions (see "
             "the notes of `fairbench paper TABLE` and `fairbench paper check-reference`)"]
    return tables.format_groups(groups, fmt, notes=notes)


def _compare_cell(rows: pd.DataFrame, metric: str) -> str:
    """"82.30 vs 82.17 (+0.13)"; "– vs 82.17" without ours; "" where the paper prints nothing."""
    hit = rows[rows["metric"] == metric]
    if hit.empty:
        return ""
    r = hit.iloc[0]
    if pd.isna(r["ours"]):
        return f"{MISSING} vs {r['paper']:.2f}"
    return f"{r['ours']:.2f} vs {r['paper']:.2f} ({r['diff']:+.2f})"


# ---------------------------------------------------------------------------------- rho reference

CHECK_COLUMNS = ["source", "table", "dataset", "arch", "method", "label", "rho", "printed", "dafa",
                 "worst_minus_avg", "diff_dafa", "diff_worst_minus_avg", "convention", "flagged", "truncated",
                 "input_slack"]


def check_reference_rho(source: str | None = "trix", tol: float = RHO_TOL) -> pd.DataFrame:
    """Recompute every published rho (not the baseline's own 0) from the published means with both
    `metrics.rho` variants. `convention` says which reproduces it within `tol` ("both", "dafa",
    "worst_minus_avg", "neither"); `flagged` marks "neither". `truncated` names the variants that give the
    printed value when truncated toward zero instead of rounded (this explains most TRIX flags, e.g. 0.3997 ->
    0.39). `input_slack` bounds (to first order) how much rho can move because the printed accuracies are
    rounded to 2 decimals. `source=None` checks all papers."""
    wide = reference_wide(source)
    if "rho_clean" not in wide:
        return pd.DataFrame(columns=CHECK_COLUMNS)
    frames = [_check_table(g) for _, g in wide.groupby(["source", "table", "dataset", "arch"], sort=False)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=CHECK_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    d_ok = (out["diff_dafa"].abs() <= tol + 1e-9).to_numpy()
    w_ok = (out["diff_worst_minus_avg"].abs() <= tol + 1e-9).to_numpy()
    out["convention"] = np.select([d_ok & w_ok, d_ok, w_ok], ["both", "dafa", "worst_minus_avg"], "neither")
    out["flagged"] = ~(d_ok | w_ok)
    d_tr, w_tr = (_truncates_to(out[v], out["printed"]) for v in ("dafa", "worst_minus_avg"))
    out["truncated"] = np.select([d_tr & w_tr, d_tr, w_tr], ["both", "dafa", "worst_minus_avg"], "")
    return out[CHECK_COLUMNS]


def _truncates_to(value: pd.Series, printed: pd.Series) -> np.ndarray:
    """Whether cutting `value` to 2 decimals toward zero gives `printed` (the round-off guards 6.9999...)."""
    cut = np.trunc(np.round(value.to_numpy(dtype=float) * 100, 6)) / 100
    return np.abs(cut - printed.to_numpy(dtype=float)) < 1e-9


def _check_table(g: pd.DataFrame) -> pd.DataFrame:
    """Both rho conventions for each printed rho of one published table, against its TRADES row."""
    base = g[g["method"] == "trades"]
    if base.empty or g["rho_clean"].isna().all():
        return pd.DataFrame()
    b = base.iloc[0]
    rows = []
    for _, r in g[g["method"] != "trades"].iterrows():
        for rho_col, kind in (("rho_clean", "clean"), ("rho_rob", "rob")):
            acc = (r[f"{kind}_avg"], r[f"{kind}_worst"], b[f"{kind}_avg"], b[f"{kind}_worst"])
            if pd.isna(r[rho_col]):
                continue
            d, w = (metrics.rho(*acc, variant=v) for v in ("dafa", "worst_minus_avg"))
            rows.append({**{k: r[k] for k in ("source", "table", "dataset", "arch", "method", "label")},
                         "rho": rho_col, "printed": r[rho_col], "dafa": d, "worst_minus_avg": w,
                         "diff_dafa": d - r[rho_col], "diff_worst_minus_avg": w - r[rho_col],
                         "input_slack": _input_slack(*acc)})
    return pd.DataFrame(rows)


def _input_slack(avg: float, worst: float, base_avg: float, base_worst: float,
                 half_ulp: float = 0.005) -> float:
    """First-order bound on |Δrho| from rounding the four printed accuracies (same for both conventions)."""
    return half_ulp * (1 / base_worst + worst / base_worst**2 + 1 / base_avg + avg / base_avg**2)


def format_rho_check(check: pd.DataFrame, fmt: str = "md"):
    """One block per published table (every entry, with the convention it needs; flagged ones bold), then a
    summary line per paper."""
    if fmt not in FORMATS:
        raise UnknownNameError("format", fmt, list(FORMATS))
    if fmt == "csv":
        return check.to_csv(index=False)
    headers = ["method", "rho", "printed", "dafa", "worst-avg", "needs", "if truncated", "slack"]
    groups = []
    for (source, table, ds, arch), g in check.groupby(["source", "table", "dataset", "arch"], sort=False):
        cells = [[_bold(str(v), r.flagged) for v in (
            r.label, r.rho.removeprefix("rho_"), f"{r.printed:.2f}", f"{r.dafa:.3f}",
            f"{r.worst_minus_avg:.3f}", r.convention, r.truncated or "-", f"{r.input_slack:.3f}")]
            for r in g.itertuples()]
        groups.append((f"{source} {table} ({ds} / {arch or 'arch not stated'}): {_summary(g)}", headers, cells, []))
    notes = [f"{source}: published rho recomputed, {_summary(g)}"
             for source, g in check.groupby("source", sort=False)]
    notes.append(f"needs: the rho convention that reproduces the printed value within {RHO_TOL} (dafa: "
                 "metrics.rho's default; worst-avg: worst_minus_avg; bold: neither); if truncated: the "
                 "conventions that give it when cut (not rounded) to 2 decimals; slack: how far rounding the "
                 "printed accuracies to 2 decimals can move rho (first order)")
    return tables.format_groups(groups, fmt, notes=notes)


def _summary(check: pd.DataFrame) -> str:
    """"114 entries: 40 both, 20 dafa, 30 worst_minus_avg, 24 neither"."""
    counts = check["convention"].value_counts()
    parts = [f"{counts.get(c, 0)} {c}" for c in CONVENTIONS]
    return f"{len(check)} entries: " + ", ".join(parts)
