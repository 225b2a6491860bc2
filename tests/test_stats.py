"""fairbench.stats against hand-computed values (t intervals, paired t-tests, bootstraps with a fixed seed, the
known bias of a minimum), the worst class per seed, `fairbench table --stats` end to end on tiny digits runs,
the paper layouts' significance note and the worst-class figure."""
from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fairbench import paper, plots, stats, tables
from tests.conftest import run_cli

T_975_2 = 4.302653  # Student t, 97.5% quantile, 2 degrees of freedom (a printed table)
T_975_1 = 12.706205  # ... 1 degree of freedom


# ------------------------------------------------------------------------------------------ t intervals

def test_t_interval_by_hand():
    iv = stats.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert iv.estimate == 2.0 and iv.n == 3
    assert iv.low == pytest.approx(2 - T_975_2 / math.sqrt(3), abs=1e-6)
    assert iv.high == pytest.approx(2 + T_975_2 / math.sqrt(3), abs=1e-6)
    clipped = stats.t_interval([1.0, 2.0, 3.0], bounds=(0.0, 3.0))
    assert clipped.low == 0.0 and clipped.high == 3.0
    one = stats.t_interval([5.0])
    assert one.estimate == 5.0 and math.isnan(one.low) and math.isnan(one.high) and "one seed" in one.note


def test_paired_t_test_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3); with 2 dof P(T > t) = (1 - t/sqrt(t^2+2))/2,
    # so p = 1 - sqrt(12/14) = 1 - sqrt(6/7)
    test = stats.paired_t_test([1.0, 2.0, 3.0])
    assert test.diff == 2.0 and test.n_pairs == 3
    assert test.low == pytest.approx(2 - T_975_2 / math.sqrt(3), abs=1e-6)
    assert test.high == pytest.approx(2 + T_975_2 / math.sqrt(3), abs=1e-6)
    assert test.p_value == pytest.approx(1 - math.sqrt(6 / 7), abs=1e-9) and not test.significant
    # 1 dof is the Cauchy distribution: differences 8, 10 -> t = 9, p = 1 - 2 atan(9) / pi
    two = stats.paired_t_test([8.0, 10.0])
    assert two.p_value == pytest.approx(1 - 2 * math.atan(9) / math.pi, abs=1e-9)
    assert (two.low, two.high) == pytest.approx((9 - T_975_1, 9 + T_975_1), abs=1e-5)
    assert stats.paired_t_test([5.0, 5.1, 4.9, 5.0]).significant
    few = stats.paired_t_test([1.0])
    assert few.n_pairs == 1 and math.isnan(few.p_value) and "no paired test" in few.note
    same = stats.paired_t_test([0.5, 0.5, 0.5])
    assert same.diff == same.low == same.high == 0.5 and math.isnan(same.p_value) and "same difference" in same.note


def per_run_frame(values: dict[tuple[str, int], float], value: str = "rob_worst") -> pd.DataFrame:
    """A `tables.suite_run_metrics`-like frame: one run per (method, seed) with the given value."""
    return pd.DataFrame([dict(dataset="d", arch="a", protocol="p", attack="pgd20", method=m, seed=s,
                              run_id=f"{m}-{s}", n_samples=100, **{v: x for v in stats.VALUES})
                         for (m, s), x in values.items()]).assign(**{value: list(values.values())})


def test_paired_comparison_pairs_by_seed_only():
    per_run = per_run_frame({("trades", 1): 50.0, ("trades", 2): 52.0, ("trades", 3): 49.0, ("trades", 9): 10.0,
                             ("trix", 1): 51.0, ("trix", 2): 54.0, ("trix", 3): 52.0, ("trix", 7): 90.0})
    out = stats.paired_comparison(per_run, "trades", ["rob_worst"])
    row = out.iloc[0]
    assert (row["method"], row["value"], row["n_pairs"]) == ("trix", "rob_worst", 3)  # seeds 1, 2, 3
    assert row["diff"] == 2.0 and row["p_value"] == pytest.approx(1 - math.sqrt(6 / 7))
    assert "2 seed(s) without a partner left out" in row["note"]
    alone = stats.paired_comparison(per_run[per_run["method"] == "trix"], "trades", ["rob_worst"])
    assert alone.iloc[0]["n_pairs"] == 0 and "no trades runs to pair with" in alone.iloc[0]["note"]


# -------------------------------------------------------------------------------------------- bootstrap

def labels_and_verdicts(counts: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per class (n, correct): labels and per-sample verdicts."""
    labels = np.concatenate([np.full(n, c) for c, (n, _) in enumerate(counts)])
    correct = np.concatenate([np.arange(n) < k for n, k in counts])
    return labels, correct


def test_bootstrap_is_reproducible_and_covers_the_observed_value():
    labels, correct = labels_and_verdicts([(100, 80), (100, 45), (100, 52), (100, 70), (100, 90)])
    first = stats.bootstrap_worst_class(labels, correct, seed=7)
    assert first == stats.bootstrap_worst_class(labels, correct, seed=7)  # a fixed seed: the same numbers
    assert first != stats.bootstrap_worst_class(labels, correct, seed=8)
    assert first.observed == 0.45 and first.b == 1000
    assert first.low < first.observed < first.high
    assert 0.30 < first.low and first.high < 0.56  # about 0.45 ± 2 se (se 5 points), pulled low by class 2
    assert first.bias < 0 and first.corrected == pytest.approx(first.observed - first.bias)
    twenty = stats.bootstrap_worst_class(labels, correct, worst="min20", seed=7)
    assert twenty.observed == 0.45  # floor(0.2 * 5) = 1 class: the same as min


def test_bootstrap_bias_of_the_minimum_has_the_known_value():
    # two classes of n = 2 with 1 correct each: a resampled accuracy is 0, 0.5, 1 with probability 1/4, 1/2,
    # 1/4; the minimum of two is 0 w.p. 1 - (3/4)^2 = 7/16, 1 w.p. 1/16, else 0.5: E[min] = 5/16
    labels, correct = labels_and_verdicts([(2, 1), (2, 1)])
    boot = stats.bootstrap_worst_class(labels, correct, b=200_000, seed=0)
    assert boot.observed == 0.5 and boot.bias == pytest.approx(5 / 16 - 0.5, abs=0.003)
    # equal classes, large n: bias = -se * E[max of 2 standard normals] = -se / sqrt(pi)
    labels, correct = labels_and_verdicts([(400, 200), (400, 200)])
    boot = stats.bootstrap_worst_class(labels, correct, b=20_000, seed=0)
    se = stats.class_accuracy_se(0.5, 400)
    assert boot.bias == pytest.approx(-se / math.sqrt(math.pi), abs=0.001)
    # classes at 0 or 100% resample to themselves: no spread, no bias
    labels, correct = labels_and_verdicts([(50, 0), (50, 50)])
    flat = stats.bootstrap_worst_class(labels, correct)
    assert (flat.observed, flat.low, flat.high, flat.bias) == (0.0, 0.0, 0.0, 0.0)


def test_normal_theory_numbers():
    assert stats.expected_normal_max(1) == pytest.approx(0.0, abs=1e-9)
    assert stats.expected_normal_max(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-7)
    assert stats.expected_normal_max(3) == pytest.approx(3 / (2 * math.sqrt(math.pi)), abs=1e-7)
    assert stats.expected_normal_max(10) == pytest.approx(1.5388, abs=1e-4)
    assert 100 * stats.class_accuracy_se(0.5, 1000) == pytest.approx(1.5811, abs=1e-4)


def test_suite_verdicts_follow_the_per_class_rule():
    # samples 0..3 of classes 0, 0, 1, 1; sample 1 is clean-wrong; the suite has two components and breaks
    # sample 2 with its second; sample 3 was not attacked by the suite
    clean = pd.DataFrame(dict(epoch=5, suite="clean", sample_idx=[0, 1, 2, 3], label=[0, 0, 1, 1],
                              success=[False, True, False, False]))
    attacked = pd.DataFrame(dict(epoch=5, suite="aa", sample_idx=[0, 0, 1, 1, 2, 2], label=[0, 0, 0, 0, 1, 1],
                                 success=[False, False, False, False, False, True]))
    samples = pd.concat([clean, attacked, clean.assign(epoch=4)], ignore_index=True)
    v = stats.suite_verdicts(samples, "aa", 5)
    assert list(v["sample_idx"]) == [0, 1, 2] and list(v["correct"]) == [True, False, False]
    assert list(stats.suite_verdicts(samples, "clean", 5)["correct"]) == [True, False, True, True]


# ----------------------------------------------------------------------------------- which class is worst

def classwise(accs: dict[tuple[str, int], list[int]], attack: str = "pgd20", epochs=(1, 2)) -> pd.DataFrame:
    """Per-class rows (n = 100, `correct` = the given per-class counts) of runs (method, seed), plus clean
    rows 10 points higher, at every epoch."""
    rows = []
    for (method, seed), counts in accs.items():
        for epoch in epochs:
            for suite, shift in ((tables.CLEAN, 10), (attack, 0)):
                for k, c in enumerate(counts):
                    rows.append(dict(run_id=f"{method}-{seed}", method=method, dataset="d", arch="a", protocol="p",
                                     seed=seed, epoch=epoch, attack=suite, eps=0.0, class_id=k, class_name=f"c{k}",
                                     n=100, correct=c + shift))
    return pd.DataFrame(rows)


def test_worst_class_per_seed_and_counts():
    df = classwise({("trades", 1): [50, 30, 60], ("trades", 2): [20, 30, 60], ("trades", 3): [40, 40, 60],
                    ("trix", 1): [50, 50, 45]})
    worst = stats.worst_classes(df).set_index(["run_id", "attack"])
    assert worst.loc[("trades-1", "pgd20"), "worst_names"] == ("c1",)
    assert worst.loc[("trades-2", "pgd20"), "worst_names"] == ("c0",)
    assert worst.loc[("trades-3", "pgd20"), "worst_ids"] == (0, 1)  # a tie lists both
    assert worst.loc[("trades-3", "pgd20"), "worst_acc"] == 40.0
    counts = stats.worst_class_counts(stats.worst_classes(df))
    trades = counts[(counts["method"] == "trades") & (counts["attack"] == "pgd20")].set_index("class_name")
    assert trades["runs"].to_dict() == {"c0": 2, "c1": 2} and set(trades["n_runs"]) == {3}
    assert trades["share"].to_dict() == {"c0": 1.5, "c1": 1.5}  # the tie is split in the shares


def test_statistics_table_matches_the_fairness_table_and_the_hand_values():
    df = classwise({("trades", 1): [50, 30, 60], ("trades", 2): [20, 30, 60], ("trades", 3): [40, 40, 60],
                    ("trix", 1): [50, 50, 51], ("trix", 2): [50, 32, 60], ("trix", 3): [43, 50, 60]})
    report = stats.statistics_table(df, last_k=5)
    ft = tables.fairness_table(df).set_index("method")
    m = report.methods.set_index("method")
    for value in stats.VALUES:
        assert m[f"{value}_mean"].to_dict() == pytest.approx(ft[f"{value}_mean"].to_dict())
    # robust worst: trades 30, 20, 40; trix 50, 32, 43 -> differences 20, 12, 3
    d = np.array([20.0, 12.0, 3.0])
    half = T_975_2 * d.std(ddof=1) / math.sqrt(3)
    assert m.loc["trix", "d_rob_worst"] == pytest.approx(d.mean())
    assert (m.loc["trix", "d_rob_worst_low"], m.loc["trix", "d_rob_worst_high"]) == pytest.approx(
        (d.mean() - half, d.mean() + half), abs=1e-4)
    assert m.loc["trix", "rob_worst_low"] == pytest.approx(max(0.0, 125 / 3 - T_975_2 * np.std([50, 32, 43], ddof=1)
                                                              / math.sqrt(3)), abs=1e-4)
    assert m.loc["trades", "worst_classes"] == "c0 (2/3), c1 (2/3)"
    assert list(report.runs["method"]) == ["trades"] * 3 + ["trix"] * 3
    assert set(report.runs["boot_note"]) == {"no bootstrap (no results folder given)"}
    md = stats.format_statistics(report, "md")
    assert "+11.67 [" in md and "statistics over seeds" in md and "| trades | 3 |" in md
    tex = stats.format_statistics(report, "latex")
    assert r"$\Delta$ robust avg vs trades" in tex and r"\toprule" in tex
    flat = pd.read_csv(io.StringIO(stats.format_statistics(report, "csv")))
    assert list(flat["level"].value_counts().sort_index()) == [2, 6]


def test_stats_module_does_not_import_torch():
    code = "import sys, fairbench.stats; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------- the paper layout note

def test_paper_layout_notes_trix_against_trades():
    df = classwise({("trades", 1): [50, 30, 60], ("trades", 2): [20, 30, 60],
                    ("trix", 1): [58, 38, 68], ("trix", 2): [30, 40, 70]}, attack="aa")
    df = df.assign(dataset="cifar10", arch="resnet18")
    layout = paper.paper_layout("table1a", df)
    note = next(n for n in layout.notes if n.startswith("significance"))
    # robust worst: differences 8 and 10 -> +9.00, p = 1 - 2 atan(9) / pi = 0.070
    assert "trix - trades, paired over 2 seed(s)" in note and "robust worst +9.00 [-3.71, +21.71] p=0.070" in note
    text = paper.format_paper_layout(layout, "md")
    assert "significance, Table 1(a): CIFAR-10 / ResNet-18 / AutoAttack" in text
    assert not any(n.startswith("significance") for n in paper.paper_layout(
        "table1a", tables.fairness_table(df, worst="min")).notes)  # a fairness table has no per-seed values


# --------------------------------------------------------------------------------- end to end, digits

INTERVAL = r"\d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]"


def md_cells(text: str, start: str) -> list[list[str]]:
    """Cells of the markdown rows that start with `start`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(start)]


def test_table_stats_and_worst_class_plot_end_to_end(tmp_path, capsys):
    """trades and dafa on digits, seeds 1 and 2, 2 epochs (dafa's weights on after epoch 1), the last
    evaluated with pgd20 and its per-sample records: intervals, paired tests, bootstraps, the figure."""
    results = tmp_path / "results"
    code, _, err = run_cli(["run", "--methods", "trades,dafa", "--seeds", "1,2", "--epochs", "2", "--train-per-class",
                            "20", "--eval-per-class", "10", "--eval-last", "1", "--threads", "1", "--set", "warmup=1",
                            "--out", str(results), "-q"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["table", "--stats", "--results", str(results), "--format", "md"], capsys)
    assert code == 0, err
    assert "statistics over seeds" in out and "per run" in out and "1000 resamples" in out
    trades, dafa = md_cells(out, "| trades | 2 |")[0], md_cells(out, "| dafa | 2 |")[0]
    assert all(re.fullmatch(INTERVAL, c) for c in trades[2:6] + dafa[2:6])  # 95% intervals over 2 seeds
    assert trades[6:8] == ["—", "—"]
    for cell, label in zip(dafa[6:8], ("robust avg", "robust worst")):  # the paired test, or why there is none
        assert re.fullmatch(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]( p=\d\.\d{3}\*?)?", cell)
        assert "p=" in cell or f"{label}: the same difference in every seed" in out
    assert "p=" in out
    runs = md_cells(out, "| trades | 1 |") + md_cells(out, "| dafa | 1 |") + md_cells(out, "| trades | 2 |")[1:]
    assert len(runs) == 3 and all(re.fullmatch(r"\[\d+\.\d\d, \d+\.\d\d\]", r[6]) and r[4] == "2" for r in runs)
    code, csv, err = run_cli(["table", "--stats", "--results", str(results), "--format", "csv"], capsys)
    flat = pd.read_csv(io.StringIO(csv))
    assert code == 0 and len(flat[flat["level"] == "run"]) == 4
    assert flat.loc[flat["level"] == "run", "boot_low"].notna().all()
    code, _, err = run_cli(["table", "--stats", "--paper", "table1", "--results", str(results)], capsys)
    assert code == 2 and "--stats is a table of its own" in err

    figures = tmp_path / "figures"
    code, out, err = run_cli(["plot", "--results", str(results), "--kind", "worstclass", "--out", str(figures)],
                             capsys)
    assert code == 0, err
    paths = [Path(p) for p in out.split()]
    assert {p.name for p in paths} == {"worstclass_digits_smallcnn_pgd20.png", "worstclass_digits_smallcnn_pgd20.pdf"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_worst_class_figure_counts_runs_per_class():
    df = classwise({("trades", 1): [50, 30, 60], ("trades", 2): [20, 30, 60], ("trix", 1): [50, 50, 45]})
    counts = stats.worst_class_counts(stats.worst_classes(df))
    classes = pd.Series(["c0", "c1", "c2"], index=[0, 1, 2])
    fig = plots.plot_worst_class_counts(counts, classes, "pgd20", ["trades", "trix"])
    robust = fig.axes[1]
    heights = [[b.get_height() for b in c] for c in robust.containers if hasattr(c, "patches")]
    assert heights == [[1, 1, 0], [0, 0, 1]]  # trades: c0 once, c1 once; trix: c2
    assert robust.get_title() == "robust (pgd20)"
