"""Tests of fairbench.metrics and fairbench.tables: published-table fixtures and hand-computed toys."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from fairbench import metrics, tables
from fairbench.errors import FairbenchError, UnknownNameError

# --------------------------------------------------------------------------- DAFA table (docs/metrics.md §8)
# dataset -> method -> (clean avg, clean worst, rho_nat, robust avg, robust worst, rho_rob)
DAFA_TABLE = {
    "CIFAR-10": {
        "TRADES": (82.04, 65.70, 0.00, 49.80, 21.31, 0.00),
        "FRL": (82.97, 71.94, 0.11, 44.68, 25.84, 0.11),
        "CFA": (79.81, 65.18, -0.04, 50.78, 27.62, 0.32),
        "BAT": (87.16, 74.02, 0.19, 45.89, 17.82, -0.24),
        "WAT": (80.97, 70.57, 0.06, 46.30, 28.55, 0.27),
        "DAFA": (81.63, 67.90, 0.03, 49.05, 30.53, 0.42),
    },
    "CIFAR-100": {
        "TRADES": (58.34, 16.80, 0.00, 25.60, 1.33, 0.00),
        "FRL": (57.59, 18.73, 0.10, 24.93, 1.80, 0.33),
        "CFA": (57.74, 15.00, -0.12, 23.49, 1.67, 0.17),
        "BAT": (62.80, 22.40, 0.41, 23.42, 0.20, -0.93),
        "WAT": (53.56, 17.07, -0.07, 22.65, 1.87, 0.29),
        "DAFA": (58.07, 18.67, 0.11, 25.08, 2.33, 0.73),
    },
    "STL-10": {
        "TRADES": (61.13, 39.29, 0.00, 31.36, 7.73, 0.00),
        "FRL": (56.75, 31.26, -0.28, 28.99, 7.94, -0.05),
        "CFA": (60.70, 38.53, -0.03, 31.88, 7.69, 0.01),
        "BAT": (59.06, 36.75, -0.10, 23.37, 3.22, -0.84),
        "WAT": (52.92, 30.82, -0.35, 26.98, 6.72, -0.27),
        "DAFA": (60.50, 42.23, 0.06, 29.98, 10.73, 0.34),
    },
}


def _dafa_rhos(variant: str = "dafa") -> list[tuple[str, str, str, float, float]]:
    """(dataset, method, kind, computed, printed) for the 30 non-baseline entries."""
    out = []
    for ds, rows in DAFA_TABLE.items():
        b = rows["TRADES"]
        for m, r in rows.items():
            if m == "TRADES":
                continue
            out.append((ds, m, "nat", metrics.rho(r[0], r[1], b[0], b[1], variant), r[2]))
            out.append((ds, m, "rob", metrics.rho(r[3], r[4], b[3], b[4], variant), r[5]))
    return out


def test_dafa_table_all_30_rho_reproduce_with_default_formula():
    entries = _dafa_rhos()
    assert len(entries) == 30
    for ds, m, kind, got, printed in entries:
        assert abs(got - printed) < 0.005, (ds, m, kind, got, printed)


def test_worst_minus_avg_variant_does_not_reproduce_dafa():
    r = DAFA_TABLE["CIFAR-10"]
    got = metrics.rho(r["DAFA"][3], r["DAFA"][4], r["TRADES"][3], r["TRADES"][4], "worst_minus_avg")
    assert round(got, 2) == 0.45 and abs(got - 0.42) > 0.005
    misses = [e for e in _dafa_rhos("worst_minus_avg") if abs(e[3] - e[4]) >= 0.005]
    assert len(misses) > 15  # "fails most entries"


def test_dafa_cifar10_robust_worked_example():
    got = metrics.rho(49.05, 30.53, 49.80, 21.31)
    assert got == pytest.approx((30.53 - 21.31) / 21.31 + (49.05 - 49.80) / 49.80)
    assert got == pytest.approx(0.4176, abs=1e-4)


# ------------------------------------------------------------------------- TRIX Table 1a (docs/metrics.md §6)
# Documents the inconsistency of the paper's table; no single formula matches every entry.
TRIX_BASE = {"clean": (82.17, 66.21), "rob": (49.74, 23.11)}
TRIX_ROWS = {"DAFA": {"clean": (81.90, 67.90), "rob": (49.45, 30.20)},
             "BAT": {"clean": (86.91, 73.42), "rob": (46.01, 18.50)}}


def test_trix_table_1a_documentation_fixture():
    dafa_rob = metrics.rho(*TRIX_ROWS["DAFA"]["rob"], *TRIX_BASE["rob"])
    assert round(dafa_rob, 2) == 0.30  # printed 0.30: DAFA formula
    bat_rob_opt = metrics.rho(*TRIX_ROWS["BAT"]["rob"], *TRIX_BASE["rob"], variant="worst_minus_avg")
    assert round(bat_rob_opt, 2) == -0.12  # printed -0.12: only the other convention
    bat_rob_dafa = metrics.rho(*TRIX_ROWS["BAT"]["rob"], *TRIX_BASE["rob"])
    assert bat_rob_dafa == pytest.approx(-0.275, abs=1e-3)  # the DAFA formula misses the printed -0.12


# ------------------------------------------------------------------------------------ basic metrics

def test_toy_balanced_counts():
    correct, n = np.array([90, 50, 70, 80]), np.array([100, 100, 100, 100])
    acc = metrics.class_accuracy(correct, n)
    np.testing.assert_allclose(acc, [0.9, 0.5, 0.7, 0.8])
    assert metrics.average_accuracy(correct, n) == pytest.approx(0.725)
    assert metrics.worst_class_accuracy(acc) == pytest.approx(0.5)
    assert metrics.worst_fraction_accuracy(acc) == pytest.approx(0.5)  # floor(0.8) -> at least 1


def test_unbalanced_counts_use_n_k():
    correct, n = np.array([90, 10]), np.array([100, 20])
    acc = metrics.class_accuracy(correct, n)
    np.testing.assert_allclose(acc, [0.9, 0.5])  # N/C = 60 would give 1.5 and 0.1667
    assert metrics.average_accuracy(correct, n) == pytest.approx(100 / 120)
    assert metrics.class_mean_accuracy(correct, n) == pytest.approx(0.7)
    assert metrics.worst_class_accuracy(acc) == pytest.approx(0.5)


def test_class_with_no_samples_is_skipped():
    acc = metrics.class_accuracy([5, 0], [10, 0])
    assert math.isnan(acc[1])
    assert metrics.worst_class_accuracy(acc) == 0.5
    with pytest.raises(ValueError):
        metrics.class_accuracy([11], [10])


def test_worst_fraction_k():
    assert metrics.n_worst_classes(10) == 2
    assert metrics.n_worst_classes(100) == 20
    assert metrics.n_worst_classes(200) == 40
    assert metrics.n_worst_classes(3) == 1
    np.testing.assert_array_equal(metrics.n_worst_classes(np.array([5, 10, 200])), [1, 2, 40])
    acc10 = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.6, 0.5, 0.4, 0.95, 0.85])
    assert metrics.worst_fraction_accuracy(acc10) == pytest.approx((0.1 + 0.3) / 2)
    rng = np.random.default_rng(0)
    acc200 = rng.permutation(np.arange(200) / 200)
    assert metrics.worst_fraction_accuracy(acc200) == pytest.approx(np.arange(40).mean() / 200)
    with pytest.raises(ValueError):
        metrics.n_worst_classes(10, 0.0)


def test_worst_metric_lookup():
    assert metrics.worst_metric("min") is metrics.worst_class_accuracy
    assert metrics.worst_metric("min20") is metrics.worst_fraction_accuracy
    with pytest.raises(UnknownNameError, match="min20"):
        metrics.worst_metric("max")


# -------------------------------------------------------------------------------------------- rho

def test_rho_baseline_against_itself_is_zero():
    for variant in metrics.RHO_VARIANTS:
        assert metrics.rho(49.8, 21.31, 49.8, 21.31, variant) == 0.0


def test_rho_is_linear_in_method_accuracies():
    ba, bw = 50.0, 20.0
    avgs, worsts = np.array([45.0, 52.0, 49.0]), np.array([18.0, 25.0, 30.0])
    per = metrics.rho(avgs, worsts, ba, bw)
    assert isinstance(per, np.ndarray) and per.shape == (3,)
    assert per.mean() == pytest.approx(metrics.rho(avgs.mean(), worsts.mean(), ba, bw))
    # slope 1/bw in worst, 1/ba in avg
    assert metrics.rho(50.0, 21.0, ba, bw) - metrics.rho(50.0, 20.0, ba, bw) == pytest.approx(1 / bw)
    assert metrics.rho(51.0, 20.0, ba, bw) - metrics.rho(50.0, 20.0, ba, bw) == pytest.approx(1 / ba)
    assert metrics.rho(51.0, 20.0, ba, bw, "worst_minus_avg") == pytest.approx(-1 / ba)


def test_rho_zero_or_missing_baseline_is_nan_not_inf():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy divide warnings leak out
        assert math.isnan(metrics.rho(25.0, 1.0, 25.6, 0.0))
        assert math.isnan(metrics.rho(25.0, 1.0, math.nan, 1.33))
        arr = metrics.rho(np.array([25.0, 26.0]), np.array([1.0, 2.0]), np.array([25.6, 25.6]),
                          np.array([0.0, 1.0]))
    assert math.isnan(arr[0]) and np.isfinite(arr[1])
    assert "is 0" in metrics.rho_undefined_reason(25.6, 0.0)
    assert "missing" in metrics.rho_undefined_reason(math.nan, 1.0)
    assert metrics.rho_undefined_reason(25.6, 1.33) is None


def test_rho_unknown_variant():
    with pytest.raises(UnknownNameError, match="worst_minus_avg"):
        metrics.rho(1, 1, 1, 1, variant="trix")


# ------------------------------------------------------------------------------- synthetic results
# Classes 0, 1 have n=100, class 2 has n=50 (unbalanced). For a run with shift t, at epoch e >= 2:
#   clean:  correct = (60+t, 40+t, 40+t), classes 0 and 1 swapped on even epochs
#   pgd20:  correct = (30+t, 20+t, 25+t), swapped likewise
# Epoch 1 has 0 correct everywhere: it must not count (only the last 5 of 6 checkpoints do).
# Per checkpoint: clean avg = (140+3t)/250, worst = (40+t)%; pgd20 avg = (75+3t)/250, worst = (20+t)%.
# The min over classes of per-class accuracies averaged over epochs 2..6 would be (48+t)% (clean).
SHIFTS = {("trades", 0): 0, ("trades", 1): 2, ("dafa", 0): 4, ("dafa", 1): 8}
BASE = {"clean": (60, 40, 40), "pgd20": (30, 20, 25)}
N = (100, 100, 50)


def synthetic_results(methods=("trades", "dafa")) -> pd.DataFrame:
    rows = []
    for (method, seed), t in SHIFTS.items():
        if method not in methods:
            continue
        run = f"{method}-s{seed}"
        for epoch in range(1, 7):
            for attack, base in BASE.items():
                counts = [base[1], base[0], base[2]] if epoch % 2 == 0 else list(base)
                for k in range(3):
                    correct = 0 if epoch == 1 else counts[k] + t
                    rows.append(dict(run_id=run, method=method, dataset="cifar10", arch="resnet18",
                                     protocol="p1", seed=seed, epoch=epoch, attack=attack,
                                     eps=0.0 if attack == "clean" else 8 / 255, class_id=k,
                                     class_name=f"c{k}", n=N[k], correct=correct))
    return pd.DataFrame(rows)


def test_run_metrics_last5_and_worst_per_checkpoint():
    rm = tables.run_metrics(synthetic_results())
    assert list(rm.columns[:9]) == ["dataset", "arch", "protocol", "method", "seed", "run_id", "attack",
                                    "avg", "worst"]
    assert len(rm) == 8
    r = rm.set_index(["run_id", "attack"])
    assert r.loc[("trades-s0", "clean"), "avg"] == pytest.approx(56.0)   # 140/250, not mean of acc_k (60)
    assert r.loc[("trades-s0", "clean"), "worst"] == pytest.approx(40.0)  # not 48 (min of averages)
    assert r.loc[("dafa-s1", "pgd20"), "avg"] == pytest.approx(99 / 250 * 100)
    assert r.loc[("dafa-s1", "pgd20"), "worst"] == pytest.approx(28.0)
    assert (rm["n_checkpoints"] == 5).all() and (rm["last_epoch"] == 6).all()
    everything = tables.run_metrics(synthetic_results(), last_k=None).set_index(["run_id", "attack"])
    assert everything.loc[("trades-s0", "clean"), "avg"] == pytest.approx(56.0 * 5 / 6)
    last1 = tables.run_metrics(synthetic_results(), last_k=1).set_index(["run_id", "attack"])
    assert last1.loc[("trades-s0", "clean"), "worst"] == pytest.approx(40.0)


def test_run_metrics_min20_on_ten_classes():
    acc = [0.9, 0.1, 0.8, 0.3, 0.7, 0.6, 0.5, 0.4, 0.95, 0.85]
    df = pd.DataFrame([dict(run_id="r", method="trades", dataset="d", arch="a", protocol="p", seed=0, epoch=e,
                            attack="clean", eps=0.0, class_id=k, class_name=str(k), n=100,
                            correct=round(100 * a) - (e == 2) * 10 * (k == 1))
                       for e in (1, 2) for k, a in enumerate(acc)])
    rm = tables.run_metrics(df, last_k=2, worst="min20")
    # epoch 1: lowest two 0.1, 0.3 -> 20%; epoch 2: class 1 at 0.0 -> (0 + 30)/2 = 15%; mean 17.5
    assert rm["worst"].iloc[0] == pytest.approx(17.5)
    assert tables.run_metrics(df, last_k=2)["worst"].iloc[0] == pytest.approx(5.0)


def test_run_metrics_agrees_with_metrics_functions_per_checkpoint():
    rng = np.random.default_rng(1)
    rows = [dict(run_id=f"r{s}", method="m", dataset="d", arch="a", protocol="p", seed=s, epoch=e,
                 attack=att, eps=0.0, class_id=k, class_name=str(k), n=int(n),
                 correct=int(rng.integers(0, n + 1)))
            for s in range(2) for e in range(3) for att in ("clean", "aa")
            for k, n in enumerate(rng.integers(5, 40, size=17))]
    df = pd.DataFrame(rows)
    for worst, fn in metrics.WORST_METRICS.items():
        rm = tables.run_metrics(df, last_k=1, worst=worst).set_index(["run_id", "attack"])
        for (run, att), g in df[df["epoch"] == 2].groupby(["run_id", "attack"]):
            acc = metrics.class_accuracy(g["correct"], g["n"])
            assert rm.loc[(run, att), "worst"] == pytest.approx(100 * fn(acc))
            avg = metrics.average_accuracy(g["correct"], g["n"])
            assert rm.loc[(run, att), "avg"] == pytest.approx(100 * avg)


# Hand-computed expectations (percent). Per seed clean avg = (140+3t)/2.5, worst = 40+t;
# pgd20 avg = (75+3t)/2.5, worst = 20+t. trades t in {0, 2}, dafa t in {4, 8};
# std over 2 seeds = |x1 - x2| / sqrt(2).
S2 = math.sqrt(2)
EXPECTED = {
    "trades": dict(clean_avg_mean=57.2, clean_avg_std=2.4 / S2, clean_worst_mean=41.0, clean_worst_std=2 / S2,
                   rob_avg_mean=31.2, rob_avg_std=2.4 / S2, rob_worst_mean=21.0, rob_worst_std=2 / S2,
                   rho_clean=0.0, rho_rob=0.0),
    "dafa": dict(clean_avg_mean=63.2, clean_avg_std=4.8 / S2, clean_worst_mean=46.0, clean_worst_std=4 / S2,
                 rob_avg_mean=37.2, rob_avg_std=4.8 / S2, rob_worst_mean=26.0, rob_worst_std=4 / S2,
                 rho_clean=(46 - 41) / 41 - (57.2 - 63.2) / 57.2,
                 rho_rob=(26 - 21) / 21 - (31.2 - 37.2) / 31.2),
}


def test_fairness_table_matches_hand_computation():
    df = synthetic_results()
    df = df.iloc[::-1].reset_index(drop=True)  # dafa appears first; baseline must still come first
    t = tables.fairness_table(df)
    assert list(t.columns) == tables.TABLE_COLUMNS
    assert list(t["method"]) == ["trades", "dafa"]
    assert set(t["attack"]) == {"pgd20"}
    for _, row in t.iterrows():
        assert row["n_seeds"] == 2
        for col, value in EXPECTED[row["method"]].items():
            assert row[col] == pytest.approx(value, abs=1e-9), (row["method"], col)
        assert row["note"] == ""
    assert t.loc[1, "rho_rob"] == pytest.approx(0.430403, abs=1e-6)
    assert t.attrs["worst"] == "min" and t.attrs["rho_variant"] == "dafa"


def test_fairness_table_groups_per_attack_and_filters():
    df = synthetic_results()
    aa = df[df["attack"] == "pgd20"].assign(attack="aa")
    both = pd.concat([df, aa], ignore_index=True)
    t = tables.fairness_table(both)
    assert list(t["attack"]) == ["pgd20", "pgd20", "aa", "aa"]
    assert t.loc[0, "clean_avg_mean"] == t.loc[2, "clean_avg_mean"]  # clean columns repeated
    only = tables.fairness_table(both, attacks=["aa"])
    assert list(only["attack"]) == ["aa", "aa"]
    with pytest.raises(UnknownNameError, match="pgd20"):
        tables.fairness_table(both, attacks=["apgd"])


def test_fairness_table_notes_robust_columns_from_fewer_samples():
    """`fairbench eval --n-examples 10` on the last checkpoint: its robust columns come from 10 samples
    per class while the clean ones come from the whole test set, and the table says so."""
    df = synthetic_results()
    aa = df[(df["attack"] == "pgd20") & (df["epoch"] == 6)].assign(attack="aa", n=10, correct=5)
    t = tables.fairness_table(pd.concat([df, aa], ignore_index=True)).set_index("attack")
    assert all("robust columns from 30 of 250 test samples at every checkpoint" in n for n in t.loc["aa", "note"])
    assert not any("test samples" in n for n in t.loc["pgd20", "note"])


def test_fewer_samples_note_counts_checkpoints():
    """`fairbench eval --n-examples` on one of the five averaged checkpoints: the note says one of five,
    not that every checkpoint used fewer samples."""
    df = synthetic_results()
    small = (df["attack"] == "pgd20") & (df["epoch"] == 6)
    df.loc[small, ["n", "correct"]] = [10, 5]
    t = tables.fairness_table(df).set_index("attack")
    assert all("robust columns from 30 of 250 test samples at 1 of 5 checkpoints" in n for n in t.loc["pgd20", "note"])


def test_each_suite_takes_clean_columns_from_its_own_checkpoints():
    """pgd20 evaluated on the last 2 checkpoints and cw20 on the last 5: the pgd20 row's clean columns are
    the clean accuracy of epochs 5-6 only (as before cw20 was run), cw20's those of epochs 2-6, and each
    row says which epochs it averages."""
    df = synthetic_results()
    df.loc[(df["attack"] == "clean") & (df["epoch"] == 3), "correct"] = 10  # epochs differ in clean accuracy
    df = df[(df["attack"] != "pgd20") | (df["epoch"] >= 5)]
    before = tables.fairness_table(df[df["epoch"] >= 5]).set_index(["attack", "method"])
    cw = synthetic_results()
    cw = cw[(cw["attack"] == "pgd20") & (cw["epoch"] >= 2)].assign(attack="cw20")
    t = tables.fairness_table(pd.concat([df, cw], ignore_index=True)).set_index(["attack", "method"])
    for col in ("clean_avg_mean", "clean_worst_mean", "rob_avg_mean", "rob_worst_mean"):
        assert t.loc[("pgd20", "trades"), col] == pytest.approx(before.loc[("pgd20", "trades"), col])
    clean = tables.run_metrics(df[df["attack"] == "clean"], last_k=5).set_index(["run_id", "attack"])
    assert t.loc[("cw20", "trades"), "clean_avg_mean"] == pytest.approx(
        np.mean([clean.loc[(r, "clean"), "avg"] for r in ("trades-s0", "trades-s1")]))
    assert t.loc[("cw20", "trades"), "clean_avg_mean"] != t.loc[("pgd20", "trades"), "clean_avg_mean"]
    assert "averages epochs 5-6" in t.loc[("pgd20", "trades"), "note"]
    assert "averages epochs 2-6" in t.loc[("cw20", "trades"), "note"]
    assert "averages epochs" not in before.loc[("pgd20", "trades"), "note"]


def test_fairness_table_single_seed_and_missing_baseline():
    df = synthetic_results()
    one = df[df["seed"] == 0]
    t = tables.fairness_table(one)
    assert (t["n_seeds"] == 1).all() and t["clean_avg_std"].isna().all()
    nob = tables.fairness_table(synthetic_results(methods=("dafa",)))
    assert nob["rho_clean"].isna().all() and nob["rho_rob"].isna().all()
    assert "no trades baseline for this protocol" in nob.loc[0, "note"]
    other = tables.fairness_table(df, baseline="dafa")
    assert list(other["method"]) == ["dafa", "trades"] and other.loc[0, "rho_rob"] == 0.0


def test_fairness_table_zero_baseline_worst_gives_nan_and_note():
    df = synthetic_results()
    zero = (df["method"] == "trades") & (df["attack"] == "pgd20") & (df["class_id"] == 1)
    df.loc[zero, "correct"] = 0
    t = tables.fairness_table(df).set_index("method")
    assert t.loc["trades", "rob_worst_mean"] == 0.0 and t.loc["trades", "rho_rob"] == 0.0
    assert math.isnan(t.loc["dafa", "rho_rob"]) and np.isfinite(t.loc["dafa", "rho_clean"])
    assert "worst-class accuracy is 0" in t.loc["dafa", "note"] and "rho_rob" in t.loc["dafa", "note"]


def test_fairness_table_other_variant_and_errors():
    t = tables.fairness_table(synthetic_results(), rho_variant="worst_minus_avg")
    assert t.loc[1, "rho_rob"] == pytest.approx((26 - 21) / 21 - (37.2 - 31.2) / 31.2)
    with pytest.raises(UnknownNameError):
        tables.fairness_table(synthetic_results(), rho_variant="x")
    with pytest.raises(UnknownNameError):
        tables.fairness_table(synthetic_results(), worst="median")
    with pytest.raises(FairbenchError, match="duplicate"):
        tables.fairness_table(pd.concat([synthetic_results()] * 2))
    with pytest.raises(FairbenchError, match="last_k"):
        tables.run_metrics(synthetic_results(), last_k=0)


def test_fairness_table_clean_only():
    df = synthetic_results()
    t = tables.fairness_table(df[df["attack"] == "clean"])
    assert list(t["attack"]) == [tables.NO_ATTACK] * 2
    assert t["rob_avg_mean"].isna().all()
    assert t.loc[1, "rho_clean"] == pytest.approx(EXPECTED["dafa"]["rho_clean"])


# ------------------------------------------------------------------------------------------ formats

def test_format_markdown():
    md = tables.format_table(tables.fairness_table(synthetic_results()), "md")
    assert "### cifar10 / resnet18 / pgd20" in md
    assert "| trades |" in md and "| dafa |" in md and "±" in md
    assert "63.20 ± 3.39" in md and "0.43" in md


def test_format_notes_and_single_seed():
    t = tables.fairness_table(synthetic_results(methods=("dafa",))[lambda d: d["seed"] == 0])
    md = tables.format_table(t, "md")
    row = next(line for line in md.splitlines() if line.startswith("| dafa |"))
    assert row == "| dafa | 1 | 60.80 | 44.00 | n/a | 34.80 | 24.00 | n/a |"  # one seed: no ± part
    assert "n/a" in md and "- dafa: no trades baseline for this protocol" in md


def test_format_latex():
    tex = tables.format_table(tables.fairness_table(synthetic_results()), "latex")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    assert r"$\pm$" in tex and r"\rho" in tex and "trades" in tex


def test_format_csv_round_trips():
    t = tables.fairness_table(synthetic_results())
    back = pd.read_csv(io.StringIO(tables.format_table(t, "csv")), dtype={"note": str})
    back["note"] = back["note"].fillna("")
    pd.testing.assert_frame_equal(back, t, check_dtype=False)


def test_format_rich_and_unknown():
    from rich.console import Console

    t = tables.fairness_table(synthetic_results())
    rendered = tables.format_table(t, "rich")
    console = Console(record=True, width=200)
    for r in rendered:
        console.print(r)
    text = console.export_text()
    assert "dafa" in text and "63.20 ± 3.39" in text
    with pytest.raises(UnknownNameError, match="latex"):
        tables.format_table(t, "html")


def test_fmt_helpers():
    assert tables.fmt_mean_std(82.1749, 0.4451) == "82.17 ± 0.45"
    assert tables.fmt_mean_std(82.1749, math.nan) == "82.17"
    assert tables.fmt_mean_std(math.nan, math.nan) == "n/a"
    assert tables.fmt_rho(-0.001) == "0.00" and tables.fmt_rho(-0.2449) == "-0.24"
    assert tables.fmt_rho(0.4176) == "0.42" and tables.fmt_rho(math.nan) == "n/a"


# ------------------------------------------------------------------------------------------ loading

def test_load_results(tmp_path):
    df = synthetic_results()
    for run, part in df.groupby("run_id"):
        (tmp_path / run).mkdir()
        part.to_parquet(tmp_path / run / "classwise.parquet")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "classwise.parquet").write_bytes(b"not parquet")
    with pytest.warns(tables.ResultsWarning, match="broken"):
        loaded = tables.load_results(tmp_path)
    assert len(loaded) == len(df)
    assert tables.fairness_table(loaded).shape[0] == 2


def test_load_results_empty(tmp_path):
    with pytest.raises(FairbenchError, match="no results under .*fairbench run"):
        tables.load_results(tmp_path)
    with pytest.raises(FairbenchError, match="no results"):
        tables.load_results(tmp_path / "missing")
