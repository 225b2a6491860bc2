"""The shipped reference numbers, the rho check, and the TRIX paper's layouts built from synthetic runs."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fairbench import paper, reference, tables
from fairbench.errors import FairbenchError, UnknownNameError
from tests.conftest import run_cli

TRIX_TABLES = ["table1a", "table1b", "table1c", "table2", "table3a", "table3b", "table3c", "table4a",
               "table4b", "table5a", "table5b", "table6"]
TABLE1_ORDER = ["trades", "frl", "bat", "wat", "cfa", "fairtat", "dafa", "trix"]
METRICS4 = ("clean_avg", "clean_worst", "rob_avg", "rob_worst")


def published(table: str, method: str) -> tuple[float, ...]:
    """(clean avg, clean worst, robust avg, robust worst) as transcribed."""
    return tuple(reference.reference_value("trix", table, method, m) for m in METRICS4)


# ------------------------------------------------------------------------------------ reference data

def test_reference_loads_with_expected_tables_and_methods():
    ref = reference.load_reference()
    assert list(ref.columns) == reference.COLUMNS and set(ref["source"]) == {"trix", "dafa"}
    assert reference.reference_tables("trix") == TRIX_TABLES
    assert reference.reference_tables("dafa") == ["main"]
    wide = reference.reference_wide("trix")
    methods = {t: list(g["method"]) for t, g in wide.groupby("table", sort=False)}
    assert methods["table1a"] == methods["table1b"] == methods["table3a"] == TABLE1_ORDER
    assert methods["table3b"] == methods["table4a"] == TABLE1_ORDER
    assert methods["table1c"] == methods["table3c"] == methods["table4b"] == [m for m in TABLE1_ORDER
                                                                              if m != "fairtat"]
    assert methods["table2"] == ["trades", "trix-uniform", "trix-basic", "dafa-uniform", "dafa", "trix"]
    assert methods["table5a"] == methods["table5b"] == ["trades", "dafa", "trix"]
    assert len(ref[ref["source"] == "trix"]) == 454 and len(ref[ref["source"] == "dafa"]) == 108
    t2 = wide[wide["table"] == "table2"]
    assert set(t2["attack"]) == {"pgd"} and t2["label"].iloc[0] == "DAFA-Basic"
    assert t2["rho_clean"].isna().all() and t2["clean_avg_std"].isna().all()
    assert set(wide.loc[wide["table"].str.startswith("table3"), "arch"]) == {"preact_resnet18"}
    assert set(wide.loc[wide["table"].str.startswith("table4"), "arch"]) == {"wrn28_10"}
    with pytest.raises(UnknownNameError, match="dafa, trix"):
        reference.load_reference("wat")


@pytest.mark.parametrize("table, method, expected", [
    ("table1a", "trades", (82.17, 66.21, 49.74, 23.11)),   # docs/metrics.md §6
    ("table1a", "dafa", (81.90, 67.90, 49.45, 30.20)),
    ("table1a", "trix", (82.68, 69.98, 49.09, 32.65)),
    ("table1a", "bat", (86.91, 73.42, 46.01, 18.50)),
    ("table1a", "cfa", (79.65, 64.98, 50.81, 26.89)),
    ("table1b", "trix", (58.90, 19.89, 25.38, 2.89)),     # the text: 2.89, 19.89
    ("table1c", "trix", (61.52, 43.18, 29.89, 10.97)),    # the text: 10.97, 43.18
    ("table2", "trix", (82.58, 68.90, 53.21, 38.90)),
    ("table3a", "trix", (82.63, 69.50, 49.15, 30.98)),    # the text: 30.98, 49.15
    ("table3c", "trix", (61.72, 43.49, 29.75, 10.08)),    # the text: 10.08, 43.49
    ("table4a", "bat", (87.20, 74.05, 47.55, 20.00)),     # the text: 87.20, 74.05
    ("table4b", "trix", (63.86, 22.38, 27.98, 2.13)),     # the text: 2.13
    ("table5a", "trix", (41.17, 7.34, 12.92, 2.96)),
    ("table6", "trix+mixup", (82.6, 70.1, 51.0, 32.6)),   # the text: 32.6, 51.0
])
def test_spot_checks_against_the_paper_text(table, method, expected):
    assert published(table, method) == pytest.approx(expected, abs=1e-9)


def test_spot_check_std_and_rho():
    ref = reference.reference_wide("trix", "table1a").set_index("method")
    assert ref.loc["trades", "clean_avg_std"] == 0.12 and ref.loc["trix", "rob_worst_std"] == 1.07
    assert ref.loc["trix", "rho_rob"] == 0.39 and ref.loc["cfa", "rho_clean"] == -0.01
    assert math.isnan(ref.loc["trix", "rho_rob_std"])
    dafa = reference.reference_wide("dafa").set_index(["dataset", "method"])
    assert tuple(dafa.loc[("cifar10", "dafa"), ["rob_worst", "rob_worst_std"]]) == (30.53, 1.04)
    assert dafa.loc[("cifar100", "bat"), "rho_rob"] == -0.93


# ------------------------------------------------------------------------------------ rho check

def test_dafa_table_all_30_rho_reproduce_and_none_flagged():
    check = paper.check_reference_rho("dafa")
    assert len(check) == 30 and not check["flagged"].any()
    assert set(check["convention"]) == {"dafa"}
    assert check["diff_dafa"].abs().max() < 0.005
    row = check[(check["dataset"] == "cifar10") & (check["method"] == "dafa") & (check["rho"] == "rho_rob")]
    assert row["dafa"].iloc[0] == pytest.approx(0.4176, abs=1e-4)
    assert row["worst_minus_avg"].iloc[0] == pytest.approx(0.4477, abs=1e-4)  # docs/metrics.md §5: 0.45


def test_trix_check_flags_trix_robust_and_names_conventions():
    check = paper.check_reference_rho("trix").set_index(["table", "method", "rho"])
    assert len(check) == 114  # 23 + 23 + 15 + 6 non-baseline rows of the rho tables, two rho each
    trix = check.loc[("table1a", "trix", "rho_rob")]
    assert trix["flagged"] and trix["convention"] == "neither" and trix["printed"] == 0.39
    assert trix["dafa"] == pytest.approx(0.3997, abs=1e-4)
    assert trix["worst_minus_avg"] == pytest.approx(0.4259, abs=1e-4)
    assert trix["truncated"] == "dafa"  # 0.3997 cut, not rounded, to two decimals
    assert check.loc[("table1a", "dafa", "rho_rob"), "convention"] == "dafa"
    assert check.loc[("table1a", "dafa", "rho_clean"), "convention"] == "dafa"
    assert check.loc[("table1a", "bat", "rho_rob"), "convention"] == "worst_minus_avg"
    assert check.loc[("table1a", "bat", "rho_clean"), "convention"] == "worst_minus_avg"
    assert check.loc[("table1a", "trix", "rho_clean"), "convention"] == "worst_minus_avg"
    cfa = check.loc[("table1a", "cfa", "rho_clean")]
    assert cfa["flagged"] and cfa["truncated"] == ""  # the sign slip of docs/metrics.md §6
    assert not any(t in set(check.index.get_level_values(0)) for t in ("table2", "table6"))


# ------------------------------------------------------------------------------------ synthetic results
# 10 classes of n = 100; run (method index i, seed s) at epoch e (146..150) gets, per class k,
#   correct = BASE[attack] + 2k + 3i + s(i+1) + (e - 146) - 10 [k == 3]
# so class 3 is the worst (BASE - 4 + ...), and the per-checkpoint avg and worst are easy to average.
BASE = {"clean": 60, "aa": 30}


def synthetic(methods: tuple[str, ...], dataset: str = "cifar10", arch: str = "resnet18") -> pd.DataFrame:
    rows = []
    for i, method in enumerate(methods):
        for seed in (1, 2):
            for epoch in range(146, 151):
                for attack, base in BASE.items():
                    for k in range(10):
                        correct = base + 2 * k + 3 * i + seed * (i + 1) + (epoch - 146) - 10 * (k == 3)
                        rows.append(dict(run_id=f"{method}-{seed}", method=method, dataset=dataset, arch=arch,
                                         protocol="common", seed=seed, epoch=epoch, attack=attack,
                                         eps=0.0 if attack == "clean" else 8 / 255, class_id=k,
                                         class_name=str(k), n=100, correct=correct,
                                         method_source="fairbench", method_version="0"))
    return pd.DataFrame(rows)


def by_hand(i: int, attack: str) -> dict[str, float]:
    """Mean and std over the 2 seeds of the last-5-checkpoint averages, from the formula above."""
    runs = {"avg": [], "worst": []}
    for seed in (1, 2):
        avg, worst = [], []
        for epoch in range(146, 151):
            acc = np.array([BASE[attack] + 2 * k + 3 * i + seed * (i + 1) + (epoch - 146) - 10 * (k == 3)
                            for k in range(10)], dtype=float)  # percent, n = 100
            avg.append(acc.mean())
            worst.append(acc.min())
        runs["avg"].append(np.mean(avg))
        runs["worst"].append(np.mean(worst))
    return {f"{m}_mean": float(np.mean(v)) for m, v in runs.items()} | {
        f"{m}_std": float(np.std(v, ddof=1)) for m, v in runs.items()}


METHODS = ("trades", "dafa", "trix", "pgd-at")  # pgd-at is not in the paper's tables


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return synthetic(METHODS)


def md_rows(text: str, heading: str) -> dict[str, list[str]]:
    """label -> cells of the markdown table under `heading`."""
    block = text.split(heading, 1)[1].split("###", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in block.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[2:]}  # after the header and the --- rule


def test_layout_order_missing_means_and_bold(results):
    layout = paper.paper_layout("table1", results)
    assert [b.dataset for b in layout.blocks] == ["cifar10", "cifar100", "stl10"]
    assert list(layout.blocks[0].rows["method"]) == TABLE1_ORDER
    text = paper.format_paper_layout(layout, "md")
    rows = md_rows(text, "Table 1(a)")
    assert list(rows) == ["TRADES", "TRADES + FRL", "TRADES + BAT", "TRADES + WAT", "TRADES + CFA",
                          "TRADES + FAIRTAT", "TRADES + DAFA", "TRADES + TRIX"]
    assert rows["TRADES + FRL"] == ["–"] * 6
    assert set(md_rows(text, "Table 1(b)")["TRADES + TRIX"]) == {"–"}  # no CIFAR-100 results at all
    assert "pgd-at" in text and "PGD" not in "".join(rows)

    clean, rob = by_hand(2, "clean"), by_hand(2, "aa")
    # trix (i = 2): base + 9 (mean of 2k) - 1 (class 3) + 6 (3i) + 4.5 (mean of 3s) + 2 (mean epoch offset)
    assert clean["avg_mean"] == pytest.approx(60 + 9 - 1 + 6 + 4.5 + 2)
    expected = [f"{d[m + '_mean']:.2f} ± {d[m + '_std']:.2f}"
                for d in (clean, rob) for m in ("avg", "worst")]
    trix = rows["TRADES + TRIX"]
    assert [c.strip("*") for c in (trix[0], trix[1], trix[3], trix[4])] == expected
    assert all(c.startswith("**") for c in trix)  # trix is best in every column, rho included
    assert not any("**" in c for c in rows["TRADES"][:2] + rows["TRADES + DAFA"])
    base_c, base_r = by_hand(0, "clean"), by_hand(0, "aa")
    rho = ((clean["worst_mean"] - base_c["worst_mean"]) / base_c["worst_mean"]
           + (clean["avg_mean"] - base_c["avg_mean"]) / base_c["avg_mean"])
    assert trix[2] == f"**{rho:.2f}**" and rows["TRADES"][2] == "0.00" and rows["TRADES"][5] == "0.00"
    assert base_r["worst_mean"] == pytest.approx(30 - 4 + 1.5 + 2)  # trades: class 3, mean of s, epoch
    assert "need worst_minus_avg" in text and "TRADES + TRIX rho_rob 0.39" in text


def test_layout_formats_latex_csv_rich(results):
    layout = paper.paper_layout("table1a", results)
    assert len(layout.blocks) == 1
    latex = paper.format_paper_layout(layout, "latex")
    assert r"\toprule" in latex and r"\textbf{" in latex and r"$\pm$" in latex
    assert "TRADES + FRL & -- &" in latex
    frame = pd.read_csv(pd.io.common.StringIO(paper.format_paper_layout(layout, "csv")))
    assert list(frame["method"]) == TABLE1_ORDER and frame["clean_avg_best"].sum() == 1
    rich = paper.format_paper_layout(layout, "rich")
    assert rich[0].row_count == 8 and rich[0].columns[1].header == "Avg\nClean"  # the tables' two-line headers
    assert rich[0].columns[1]._cells[-1].style == "bold"  # TRIX is best: bold Text, not markup
    with pytest.raises(UnknownNameError, match="table1a"):
        paper.paper_layout("table9", results)


def test_table2_uses_pgd20_and_tinyimagenet_uses_min20():
    pgd = synthetic(("trades", "trix")).replace({"attack": {"aa": "pgd20"}})
    layout = paper.paper_layout("table2", pgd)
    assert layout.headers == ["Avg Clean", "Worst Clean", "Avg Robust", "Worst Robust"]
    rows = layout.blocks[0].rows.set_index("method")
    assert rows.loc["trades", "label"] == "DAFA-Basic" and rows.loc["trix", "rob_avg_mean"] == pytest.approx(
        by_hand(1, "aa")["avg_mean"])
    assert not rows.loc["dafa", "present"]

    tiny = paper.paper_layout("tinyimagenet", synthetic(("trades", "trix"), dataset="tinyimagenet"))
    assert "Worst Clean (Min 20%)" in tiny.headers
    row = tiny.blocks[0].rows.set_index("method").loc["trix"]
    # lowest 2 of 10 classes: class 3 (base - 4) and class 0 (base): base - 2; trix (i = 1) adds 3 + 3 + 2
    assert row["clean_worst_mean"] == pytest.approx(60 - 2 + 3 + 3 + 2)
    assert "ours; the paper does not state it" in tiny.blocks[0].caption


def test_missing_attack_keeps_clean_columns(results):
    clean_only = results[results["attack"] == "clean"]
    rows = paper.paper_layout("table1a", clean_only).blocks[0]
    text = paper.format_paper_layout(paper.paper_layout("table1a", clean_only), "md")
    trix = md_rows(text, "Table 1(a)")["TRADES + TRIX"]
    assert trix[0] != "–" and trix[3:] == ["–", "–", "–"]
    assert any("no aa results" in n for n in rows.notes)


def test_compare_with_paper_differences(results):
    cmp = paper.compare_with_paper(results, "table1a")
    assert list(cmp.columns) == paper.COMPARE_COLUMNS
    assert len(cmp) == 8 * 6 and set(cmp["table"]) == {"table1a"}
    both = cmp.dropna(subset=["ours"])
    assert set(both["method"]) == {"trades", "dafa", "trix"}
    assert np.allclose(both["diff"], both["ours"] - both["paper"])
    trix = cmp[(cmp["method"] == "trix") & (cmp["metric"] == "rob_worst")].iloc[0]
    assert trix["paper"] == 32.65 and trix["ours"] == pytest.approx(by_hand(2, "aa")["worst_mean"])
    assert trix["diff"] == pytest.approx(by_hand(2, "aa")["worst_mean"] - 32.65)
    assert cmp.loc[cmp["method"] == "frl", "ours"].isna().all()
    text = paper.format_comparison(cmp, "md")
    assert f"vs 32.65 ({trix['diff']:+.2f})" in text and "– vs 82.89" in text
    tiny = paper.compare_with_paper(synthetic(("trades", "trix"), dataset="tinyimagenet"), "tinyimagenet")
    assert list(pd.unique(tiny["table"])) == ["table5a", "table5b"]


# ------------------------------------------------------------------------------------ command line

fairbench = run_cli  # the command line in this process


def test_cli_check_reference(capsys):
    code, out, err = fairbench(["table", "--check-reference", "--format", "md", "--results", "/nonexistent"],
                               capsys)
    assert code == 0, err
    assert "trix: published rho recomputed, 114 entries" in out
    assert "dafa: published rho recomputed, 30 entries: 0 both, 30 dafa, 0 worst_minus_avg, 0 neither" in out
    table1a = out.split("### trix table1a (cifar10 / resnet18)", 1)[1].split("###", 1)[0]
    rows = md_rows("### trix table1a" + table1a, "### trix table1a")
    trix = rows["**TRADES + TRIX**"]  # the flagged (bold) row; the clean one is not bold
    assert trix[:2] == ["**rob**", "**0.39**"] and trix[4] == "**neither**"
    assert rows["TRADES + BAT"][4] == "worst_minus_avg"  # both BAT rows need it


def test_paper_commands(results, tmp_path, capsys):
    """`fairbench paper TABLE [--compare paper]` and `fairbench paper check-reference`; the old `table` flags
    print the same after a one-line note."""
    (tmp_path / "runs" / "all").mkdir(parents=True)
    results.to_parquet(tmp_path / "runs" / "all" / "classwise.parquet")
    where = ["--results", str(tmp_path)]
    code, layout, err = fairbench(["paper", "table1a", *where, "--format", "md"], capsys)
    assert code == 0 and "| TRADES + FRL | – |" in layout and "**" in layout and not err, err
    assert "### Table 1(a): CIFAR-10 / ResNet-18 / AutoAttack" in layout
    code, out, err = fairbench(["paper", "table1", "--compare", "paper", *where, "--format", "csv"], capsys)
    assert code == 0 and len(pd.read_csv(pd.io.common.StringIO(out))) == (8 + 8 + 7) * 6, err
    code, out, err = fairbench(["paper", "table1a", "--compare", "paper", *where, "--format", "latex"], capsys)
    assert code == 0 and r"\begin{tabular}" in out and "% cells: ours vs paper (ours - paper)" in out, err
    code, check, err = fairbench(["paper", "check-reference", "--format", "md"], capsys)  # needs no results
    assert code == 0 and "trix: published rho recomputed, 114 entries" in check, err

    code, old, err = fairbench(["table", "--paper", "table1a", *where, "--format", "md"], capsys)
    assert code == 0 and old == layout and err.strip().count("\n") == 0
    assert "deprecated" in err and "use `fairbench paper table1a`" in " ".join(err.split())
    code, old, err = fairbench(["table", "--check-reference", "--format", "md"], capsys)
    assert code == 0 and old == check and "use `fairbench paper check-reference`" in " ".join(err.split())

    code, _, err = fairbench(["paper", "table9", *where], capsys)
    assert code == 2 and "unknown paper table (or command) 'table9'" in err and "check-reference" in err
    code, _, err = fairbench(["paper", "table1a", *where, "--attack", "aa,pgd20"], capsys)
    assert code == 2 and "one robust attack" in err
    code, _, err = fairbench(["paper", "table1a", *where, "--worst", "min"], capsys)  # the paper's statistic only
    assert code == 2 and "No such option '--worst'" in err
    code, out, _ = fairbench(["paper", "table1", "--help"], capsys)
    assert code == 0 and "paper table1 [OPTIONS]" in out and "--compare" in out
    code, out, _ = fairbench(["paper", "--help"], capsys)
    assert code == 0 and "check-reference" in out and "fairbench paper TABLE [--compare paper]" in out


def test_cli_paper_and_compare(results, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "all"
    run_dir.mkdir(parents=True)
    results.to_parquet(run_dir / "classwise.parquet")
    code, out, err = fairbench(["table", "--results", str(tmp_path), "--paper", "table1a", "--format", "md"],
                               capsys)
    assert code == 0, err
    assert "| TRADES + FRL | – |" in out and "**" in out
    code, out, err = fairbench(["table", "--results", str(tmp_path), "--paper", "table1",
                                "--compare", "paper", "--format", "csv"], capsys)
    assert code == 0, err
    cmp = pd.read_csv(pd.io.common.StringIO(out))
    assert len(cmp) == (8 + 8 + 7) * 6
    code, out, _ = fairbench(["table", "--results", str(tmp_path), "--format", "md"], capsys)
    assert code == 0 and "pgd-at" in out  # the ordinary table still works
    code, _, err = fairbench(["table", "--results", str(tmp_path), "--compare", "paper"], capsys)
    assert code == 2 and "needs --paper" in err
    code, _, err = fairbench(["table", "--results", str(tmp_path), "--paper", "tinyimagenet",
                              "--worst", "min"], capsys)
    assert code == 2 and "min20" in err


def test_fairness_table_input_must_match_worst(results):
    ft = tables.fairness_table(results)
    assert paper.paper_layout("table1a", ft).blocks[0].rows["present"].sum() == 3
    with pytest.raises(FairbenchError, match="min20"):
        paper.paper_layout("tinyimagenet", ft)


def test_smoke_results_get_the_papers_layout_on_their_own_dataset():
    """A `--scale smoke` grid on digits: table1's rows and columns, one block for digits, with a note."""
    rows = []
    for method in ("trades", "trix", "frl"):
        for attack in ("clean", "pgd20"):
            for c in range(10):
                rows.append(dict(run_id=f"{method}-1", method=method, dataset="digits", arch="smallcnn",
                                 protocol="p", seed=1, epoch=3, attack=attack, eps=0.0, class_id=c,
                                 class_name=str(c), n=10, correct=5 + (c % 5) + (method == "trix")))
    layout = paper.paper_layout("table1", pd.DataFrame(rows))
    assert len(layout.blocks) == 1 and layout.blocks[0].dataset == "digits"
    assert any("layout of table1 is shown for digits" in n for n in layout.notes)
    text = paper.format_paper_layout(layout, "md")
    assert "TRADES + TRIX" in text and "TRADES + BAT | –" in text
