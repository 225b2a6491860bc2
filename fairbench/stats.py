"""How sure a fairness table is: intervals over seeds, paired comparisons, a bootstrap over test samples,
and which class is the worst in each seed (docs/statistics.md gives the formulas and the reasons).

A fairness table reports minima over noisy per-class estimates. One class's accuracy on n test images has
a standard error of sqrt(p(1 - p) / n) (1.6 points at p = 0.5, n = 1000); the minimum over C such
estimates is biased low, and the identity of the worst class changes between seeds. This module says how
far a table's numbers can be trusted:

- `t_interval`: a Student-t interval of a mean over seeds (n - 1 degrees of freedom);
- `paired_comparison`: a method against the baseline over the seeds both have (same seeds, same test
  samples), a t interval of the mean difference and a two-sided paired t-test p-value;
- `bootstrap_worst_class` / `run_bootstrap`: resample one run's test samples within each class, giving a
  percentile interval of its worst-class accuracy and the bias of the plug-in minimum;
- `worst_classes` / `worst_class_counts`: which class is the worst in each run, and how often;
- `statistics_table` / `format_statistics`: all of it per (dataset, arch, protocol, attack) and method,
  `fairbench table --stats`.

Torch-free: it reads the results files only (pandas, numpy, scipy).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import integrate
from scipy import stats as sps

from fairbench import metrics, results, tables
from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.records import robust_flags

LEVEL = 0.95
BOOTSTRAP_B = 1000
BOOTSTRAP_SEED = 0
SIGNIFICANCE = 0.05
MARKER = "*"
VALUES = ("clean_avg", "clean_worst", "rob_avg", "rob_worst")
"""The per-run columns of `tables.suite_run_metrics` that get an interval over seeds."""
PAIRED = ("rob_avg", "rob_worst")
"""The columns compared with the baseline, seed by seed."""
LABELS = {"clean_avg": "clean avg", "clean_worst": "clean worst", "rob_avg": "robust avg",
          "rob_worst": "robust worst"}
MAX_LISTED_TIES = 3


# ---------------------------------------------------------------------------------------- intervals

@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided interval; NaN bounds and a `note` when there is none."""
    estimate: float
    low: float
    high: float
    n: int
    note: str = ""


def t_interval(values: ArrayLike, level: float = LEVEL, bounds: tuple[float, float] | None = None) -> Interval:
    """mean ± t_{(1+level)/2, n-1} · s / sqrt(n) over independent values (one per seed): the interval that
    covers the mean over seeds with probability `level` when per-seed values are roughly normal; clipped to
    `bounds` (accuracies cannot leave [0, 100], the normal approximation can). With fewer than two values
    there is no spread to estimate: NaN bounds and a note."""
    x = _finite(values)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "no values")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, 1, "one seed: no interval (needs 2)")
    half = _t_quantile(level, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, len(x))


def _finite(values: ArrayLike) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[~np.isnan(x)]


def _t_quantile(level: float, dof: int) -> float:
    """The two-sided Student-t critical value, t_{(1+level)/2, dof}."""
    if not 0.0 < level < 1.0:
        raise FairbenchError(f"the interval level must be in (0, 1), got {level}")
    return float(sps.t.ppf(0.5 + level / 2.0, dof))


@dataclass(frozen=True)
class PairedTest:
    """Mean of paired differences (method - baseline) with its t interval and a two-sided p-value."""
    diff: float
    low: float
    high: float
    p_value: float
    n_pairs: int
    note: str = ""

    @property
    def significant(self) -> bool:
        return bool(self.p_value < SIGNIFICANCE)


def paired_t_test(differences: ArrayLike, level: float = LEVEL) -> PairedTest:
    """Paired t-test of differences d_i = method_i - baseline_i over shared seeds: mean d̄, interval
    d̄ ± t_{(1+level)/2, n-1} · s_d / sqrt(n), t = d̄ / (s_d / sqrt(n)), p = 2 · P(T_{n-1} > |t|). Pairing
    removes what the two runs of one seed share (data order, initialisation, the test set), so the test sees
    only the method's effect and the seed-to-seed noise of the difference."""
    d = _finite(differences)
    n = len(d)
    if n < 2:
        return PairedTest(float(d.mean()) if n else math.nan, math.nan, math.nan, math.nan, n,
                          f"{n} pair{'s' * (n != 1)} with values: no paired test (needs 2)")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd <= 1e-9 * max(1.0, abs(mean)):  # rounding residue of identical differences is no spread either
        return PairedTest(mean, mean, mean, math.nan, n, "the same difference in every seed: no p-value")
    se = sd / math.sqrt(n)
    half = _t_quantile(level, n - 1) * se
    p = 2.0 * float(sps.t.sf(abs(mean / se), n - 1))
    return PairedTest(mean, mean - half, mean + half, p, n)


# --------------------------------------------------------------------------------- over the seeds

def seed_intervals(per_run: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """Per (dataset, arch, protocol, attack, method): n_seeds, seeds, and for each of `VALUES` the mean
    over runs with its t interval (`<value>_mean`, `_low`, `_high`). `per_run` is
    `tables.suite_run_metrics`."""
    rows = []
    for key, runs in per_run.groupby(tables.GROUP_KEYS + ["method"], sort=False, dropna=False):
        row = dict(zip(tables.GROUP_KEYS + ["method"], key), n_seeds=len(runs),
                   seeds=tuple(sorted(int(s) for s in runs["seed"])))
        for value in VALUES:
            iv = t_interval(runs[value], level, bounds=(0.0, 100.0))
            row.update({f"{value}_mean": iv.estimate, f"{value}_low": iv.low, f"{value}_high": iv.high})
        rows.append(row)
    return pd.DataFrame(rows)


def paired_comparison(per_run: pd.DataFrame, baseline: str = "trades", values: Sequence[str] = PAIRED,
                      level: float = LEVEL, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Each method against `baseline` within each (dataset, arch, protocol, attack), seed by seed: one row
    per (group, method, value) with n_pairs, diff (method - baseline, points), low, high, p_value, `note`
    (how the pairs were formed) and `test_note` (why there is no interval or p-value). Only seeds both have
    are paired; runs repeating a seed are averaged first (and noted)."""
    rows = []
    for key, group in per_run.groupby(tables.GROUP_KEYS, sort=False, dropna=False):
        base = group[group["method"] == baseline]
        others = [m for m in pd.unique(group["method"]) if m != baseline and (methods is None or m in methods)]
        for method in others:
            own = group[group["method"] == method]
            for value in values:
                test, notes = _pair(own, base, value, baseline, level)
                rows.append({**dict(zip(tables.GROUP_KEYS, key)), "method": method, "value": value,
                             "n_pairs": test.n_pairs, "diff": test.diff, "low": test.low, "high": test.high,
                             "p_value": test.p_value, "note": "; ".join(notes), "test_note": test.note})
    columns = [*tables.GROUP_KEYS, "method", "value", "n_pairs", "diff", "low", "high", "p_value", "note",
               "test_note"]
    return pd.DataFrame(rows, columns=columns)


def _pair(own: pd.DataFrame, base: pd.DataFrame, value: str, baseline: str,
          level: float) -> tuple[PairedTest, list[str]]:
    """The paired test of one value, and notes on how the pairs were formed."""
    notes = []
    if base.empty:
        return PairedTest(math.nan, math.nan, math.nan, math.nan, 0), [f"no {baseline} runs to pair with"]
    if own["seed"].duplicated().any() or base["seed"].duplicated().any():
        notes.append("runs sharing a seed averaged before pairing")
    a, b = own.groupby("seed")[value].mean(), base.groupby("seed")[value].mean()
    shared = a.index.intersection(b.index)
    unpaired = len(a.index.union(b.index)) - len(shared)
    if unpaired:
        notes.append(f"{unpaired} seed(s) without a partner left out")
    if "n_samples" in own and set(own["n_samples"]) != set(base["n_samples"]):
        notes.append("robust columns from different numbers of test samples")
    return paired_t_test((a[shared] - b[shared]).to_numpy(), level), notes


def significance_notes(per_run: pd.DataFrame, method: str = "trix", baseline: str = "trades",
                       values: Sequence[str] = ("rob_worst", "rob_avg"), level: float = LEVEL) -> dict[tuple, str]:
    """Per (dataset, arch, protocol, attack) where both have runs: one line of `method` vs `baseline`, paired
    over shared seeds, e.g. "trix - trades, paired over 5 seeds: robust worst +1.23 [-0.40, +2.86] p=0.110;
    ...". For footnotes under tables that otherwise show mean ± std only (the paper layouts)."""
    comparison = paired_comparison(per_run, baseline, values, level, methods=[method])
    out = {}
    for key, rows in comparison.groupby(tables.GROUP_KEYS, sort=False, dropna=False):
        if rows["n_pairs"].max() == 0:
            continue
        parts = [f"{LABELS[r.value]} {fmt_paired(r.diff, r.low, r.high, r.p_value)}" for r in rows.itertuples()]
        notes = _pair_notes(rows)
        out[key] = (f"{method} - {baseline}, paired over {int(rows['n_pairs'].max())} seed(s), {round(100 * level)}% "
                    f"t interval, two-sided t-test ({MARKER} p < {SIGNIFICANCE}): " + "; ".join(parts)
                    + (f" ({notes})" if notes else ""))
    return out


# ------------------------------------------------------------------------------ over test samples

@dataclass(frozen=True)
class Bootstrap:
    """A bootstrap of one checkpoint's worst-class accuracy (fractions): the observed value, the
    percentile interval, the mean of the bootstrap values and bias = mean - observed."""
    observed: float
    low: float
    high: float
    mean: float
    b: int
    seed: int

    @property
    def bias(self) -> float:
        """The bootstrap estimate of the plug-in minimum's bias (negative: the minimum reads low)."""
        return self.mean - self.observed

    @property
    def corrected(self) -> float:
        """observed - bias: the bias-corrected estimate."""
        return self.observed - self.bias


def bootstrap_worst_class(labels: ArrayLike, correct: ArrayLike, worst: str = "min", b: int = BOOTSTRAP_B,
                          seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Bootstrap:
    """Resample the test samples within each class (n_c draws with replacement from the class's own n_c
    samples, so every resample has the class sizes of the test set), recompute each class's accuracy and
    the worst-class statistic (`worst`: "min" or "min20"), `b` times with a fixed `seed`. The number correct
    in such a resample is Binomial(n_c, correct_c / n_c), which is drawn directly (the same distribution,
    without materialising the resamples). Returns the percentile interval and the mean (for the bias)."""
    if b < 1:
        raise FairbenchError(f"the number of bootstrap resamples must be positive, got {b}")
    y = np.asarray(labels, dtype=np.int64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if len(y) == 0 or len(y) != len(ok):
        raise FairbenchError(f"a bootstrap needs one label per verdict and at least one sample "
                             f"({len(y)} labels, {len(ok)} verdicts)")
    classes = np.unique(y)
    n = np.array([np.sum(y == c) for c in classes])
    k = np.array([np.sum(ok[y == c]) for c in classes])
    rng = np.random.default_rng(seed)
    draws = rng.binomial(n[None, :], (k / n)[None, :], size=(b, len(classes))) / n[None, :]
    statistic = metrics.worst_metric(worst)
    observed = statistic(k / n)
    boot = _worst_per_row(draws, worst)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return Bootstrap(float(observed), float(low), float(high), float(boot.mean()), b, seed)


def _worst_per_row(acc: np.ndarray, worst: str) -> np.ndarray:
    """`metrics.worst_metric(worst)` of each row of a (resamples, classes) array, vectorised."""
    if worst == "min":
        return acc.min(axis=1)
    k = int(metrics.n_worst_classes(acc.shape[1], metrics.WORST_FRACTION))
    return np.sort(acc, axis=1)[:, :k].mean(axis=1)


def suite_verdicts(samples: pd.DataFrame, suite: str, epoch: int) -> pd.DataFrame:
    """(sample_idx, label, correct) of one checkpoint under one suite from the per-sample records, by the
    rule the per-class table was counted by (`records.robust_flags`); only the samples the suite was run
    on; "clean" gives clean verdicts."""
    flags = robust_flags(samples[samples["epoch"] == epoch])
    return flags.loc[flags["suite"] == suite, ["sample_idx", "label", "correct"]].reset_index(drop=True)


def read_samples(path: str | Path) -> pd.DataFrame:
    """The columns of a run's samples.parquet that verdicts need; FairbenchError naming the file if it
    cannot be read."""
    return results.read_records(Path(path), ["epoch", "suite", "sample_idx", "label", "success"])


def last_checkpoint_bootstrap(samples: pd.DataFrame, suite: str, worst: str = "min", b: int = BOOTSTRAP_B,
                              seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> tuple[int, Bootstrap]:
    """(epoch, bootstrap) of a run's worst-class accuracy under `suite` at the last checkpoint that suite
    was run on. FairbenchError when the records cannot say (a derived suite such as `aa+pgd20` has none)."""
    epochs = samples.loc[samples["suite"] == suite, "epoch"]
    if epochs.empty:
        raise FairbenchError(f"no per-sample records of {suite}")
    epoch = int(epochs.max())
    verdicts = suite_verdicts(samples, suite, epoch)
    if verdicts.empty:
        raise FairbenchError(f"no clean records at epoch {epoch} to count {suite} against")
    return epoch, bootstrap_worst_class(verdicts["label"], verdicts["correct"], worst, b, seed, level)


def run_bootstrap(samples_path: str | Path, suite: str, worst: str = "min", b: int = BOOTSTRAP_B,
                  seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> tuple[int, Bootstrap]:
    """`last_checkpoint_bootstrap` from a run's samples.parquet."""
    return last_checkpoint_bootstrap(read_samples(samples_path), suite, worst, b, seed, level)


# ------------------------------------------------------------------------------- which class is worst

def class_accuracy_last_k(df: pd.DataFrame, last_k: int | None = 5) -> pd.DataFrame:
    """Per (run, attack, class): accuracy in percent pooled over the run's last `last_k` checkpoints of
    that attack (the checkpoints the table averages); classes with n = 0 are skipped."""
    d = df[df["n"] > 0]
    if "class_name" not in d.columns:
        d = d.assign(class_name=d["class_id"].astype(str))
    keys = tables.RUN_KEYS + ["attack"]
    epochs = d[keys + ["epoch"]].drop_duplicates()
    newest = epochs.groupby(keys, sort=False, dropna=False)["epoch"].rank(ascending=False, method="first")
    d = d.merge(epochs[newest <= (last_k or np.inf)], on=keys + ["epoch"])
    out = d.groupby(keys + ["class_id"], sort=False, dropna=False).agg(
        correct=("correct", "sum"), n=("n", "sum"), class_name=("class_name", "first")).reset_index()
    out["acc"] = 100.0 * out["correct"].astype(float) / out["n"].astype(float)
    return out


def worst_classes(df: pd.DataFrame, last_k: int | None = 5) -> pd.DataFrame:
    """Per (run, attack): the class(es) with the lowest accuracy over the run's last `last_k` checkpoints
    (`worst_ids`, `worst_names`: tuples, several on a tie), that accuracy (`worst_acc`, percent) and
    `n_classes`. Identity over the pooled checkpoints: one name per run, where the table's per-checkpoint
    minima may come from different classes."""
    acc = class_accuracy_last_k(df, last_k)
    rows = []
    for key, g in acc.groupby(tables.RUN_KEYS + ["attack"], sort=False, dropna=False):
        low = g["acc"].min()
        tied = g[np.isclose(g["acc"], low, rtol=0.0, atol=1e-9)].sort_values("class_id")
        rows.append({**dict(zip(tables.RUN_KEYS + ["attack"], key)), "worst_ids": tuple(tied["class_id"]),
                     "worst_names": tuple(str(n) for n in tied["class_name"]), "worst_acc": float(low),
                     "n_classes": len(g)})
    return pd.DataFrame(rows)


def worst_class_counts(worst: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, arch, protocol, attack, method, class): in how many runs the class is the worst
    (`runs`; a run with a tie counts for every tied class), `share` (ties split, so shares sum to the runs)
    and `n_runs` of that method; most frequent first."""
    keys = tables.GROUP_KEYS + ["method"]
    exploded = worst.assign(pair=[list(zip(i, n)) for i, n in zip(worst["worst_ids"], worst["worst_names"])],
                            weight=1.0 / worst["worst_ids"].map(len)).explode("pair")
    exploded["class_id"] = exploded["pair"].map(lambda p: p[0])
    exploded["class_name"] = exploded["pair"].map(lambda p: p[1])
    counts = exploded.groupby(keys + ["class_id", "class_name"], sort=False, dropna=False).agg(
        runs=("run_id", "nunique"), share=("weight", "sum")).reset_index()
    n_runs = worst.groupby(keys, sort=False, dropna=False)["run_id"].nunique().rename("n_runs").reset_index()
    counts = counts.merge(n_runs, on=keys)
    return counts.sort_values(["runs", "class_id"], ascending=[False, True], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------ normal theory

def class_accuracy_se(p: float, n: int) -> float:
    """Standard error sqrt(p(1-p)/n) of one class's accuracy on n test images (a binomial proportion)."""
    return math.sqrt(p * (1.0 - p) / n)


def expected_normal_max(k: int) -> float:
    """E[max of k independent standard normals] (k=2: 1/sqrt(pi) = 0.564, k=10: 1.539): the minimum of k
    classes of equal true accuracy p, each estimated with standard error s, is p - s · this on average."""
    if k < 1:
        raise FairbenchError(f"needs at least one class, got {k}")
    density = lambda x: x * k * sps.norm.pdf(x) * sps.norm.cdf(x) ** (k - 1)  # noqa: E731
    return float(integrate.quad(density, -np.inf, np.inf)[0])


# ------------------------------------------------------------------------------------ the table

@dataclass
class StatsReport:
    """`fairbench table --stats`: per (group, method) the intervals and paired comparisons (`methods`),
    per run the worst class and the bootstrap of its worst-class robust accuracy (`runs`)."""
    methods: pd.DataFrame
    runs: pd.DataFrame
    options: dict


def statistics_table(df: pd.DataFrame, results_dir: str | Path | None = None, last_k: int | None = 5,
                     worst: str = "min", baseline: str = "trades", attacks: Sequence[str] | None = None,
                     level: float = LEVEL, b: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> StatsReport:
    """Statistics of the fairness table `tables.fairness_table(df, last_k, worst, baseline, attacks=...)`
    shows. With `results_dir`, each run's samples.parquet adds a bootstrap of its worst-class robust
    accuracy at its last checkpoint of the suite."""
    per_run = tables.suite_run_metrics(df, last_k, worst, attacks)
    order = _method_order(per_run, baseline)
    methods = seed_intervals(per_run, level).merge(_paired_wide(per_run, baseline, level), how="left",
                                                   on=tables.GROUP_KEYS + ["method"])
    who = worst_classes(df, last_k)
    runs = per_run[tables.RUN_KEYS + ["attack", "rob_worst"]].merge(
        who[tables.RUN_KEYS + ["attack", "worst_ids", "worst_names", "worst_acc"]], how="left",
        on=tables.RUN_KEYS + ["attack"])
    runs = pd.concat([runs, _bootstraps(runs, results_dir, worst, b, seed, level)], axis=1)
    methods["worst_classes"] = _counts_text(methods, worst_class_counts(who))
    methods = _sorted(methods, order)
    runs = _sorted(runs, order, by_seed=True)
    return StatsReport(methods, runs, dict(last_k=last_k, worst=worst, baseline=baseline, level=level, b=b,
                                           seed=seed, bootstrap=results_dir is not None))


def _method_order(per_run: pd.DataFrame, baseline: str) -> dict[str, int]:
    """The baseline first, then methods by first appearance (the fairness table's order)."""
    methods = list(pd.unique(per_run["method"]))
    return {m: i for i, m in enumerate(sorted(methods, key=lambda m: (m != baseline, methods.index(m))))}


def _sorted(frame: pd.DataFrame, order: dict[str, int], by_seed: bool = False) -> pd.DataFrame:
    """Groups in first-appearance order, methods in `order` within each (and seeds ascending)."""
    key = pd.DataFrame({"g": frame.groupby(tables.GROUP_KEYS, sort=False, dropna=False).ngroup().to_numpy(),
                        "m": frame["method"].map(order).to_numpy(),
                        "s": frame["seed"].to_numpy() if by_seed else 0}, index=frame.index)
    return frame.loc[key.sort_values(["g", "m", "s"], kind="stable").index].reset_index(drop=True)


def _paired_wide(per_run: pd.DataFrame, baseline: str, level: float) -> pd.DataFrame:
    """`paired_comparison` as columns: d_<value>, d_<value>_low/_high, p_<value>, n_pairs, pair_note."""
    long = paired_comparison(per_run, baseline, PAIRED, level)
    keys = tables.GROUP_KEYS + ["method"]
    wide = long[keys].drop_duplicates().reset_index(drop=True)
    for value in PAIRED:
        part = long[long["value"] == value].rename(columns={
            "diff": f"d_{value}", "low": f"d_{value}_low", "high": f"d_{value}_high", "p_value": f"p_{value}"})
        wide = wide.merge(part[keys + [f"d_{value}", f"d_{value}_low", f"d_{value}_high", f"p_{value}"]],
                          on=keys, how="left")
    notes = pd.DataFrame([{**dict(zip(keys, key)), "n_pairs": int(rows["n_pairs"].max()),
                           "pair_note": _pair_notes(rows)}
                          for key, rows in long.groupby(keys, sort=False, dropna=False)],
                         columns=[*keys, "n_pairs", "pair_note"])
    return wide.merge(notes, on=keys, how="left")


def _pair_notes(rows: pd.DataFrame) -> str:
    """The pairing notes once, then each test note with the values it concerns ("robust worst: ...")."""
    parts = list(dict.fromkeys(n for n in rows["note"] if n))
    for note, g in rows[rows["test_note"] != ""].groupby("test_note", sort=False):
        parts.append(f"{', '.join(LABELS.get(v, v) for v in g['value'])}: {note}")
    return "; ".join(parts)


def _bootstraps(runs: pd.DataFrame, results_dir: str | Path | None, worst: str, b: int, seed: int,
                level: float) -> pd.DataFrame:
    """boot_epoch, boot_observed, boot_low, boot_high, boot_bias (percent) per run row; NaN with a
    `boot_note` where the records cannot say (no results_dir, no samples.parquet, a derived suite)."""
    folders = _run_folders(results_dir) if results_dir is not None else {}
    rows = {}
    for run_id, own in runs.groupby("run_id", sort=False):
        samples, why = _samples_of(folders.get(run_id), results_dir)
        for index, attack in own["attack"].items():
            row = {"boot_epoch": math.nan, "boot_observed": math.nan, "boot_low": math.nan,
                   "boot_high": math.nan, "boot_bias": math.nan, "boot_note": why}
            if samples is not None and attack == tables.NO_ATTACK:
                row["boot_note"] = "no robust suite"
            elif samples is not None:
                try:
                    epoch, boot = last_checkpoint_bootstrap(samples, attack, worst, b, seed, level)
                except FairbenchError as err:
                    row["boot_note"] = str(err)
                else:
                    row.update(boot_epoch=epoch, boot_observed=100 * boot.observed, boot_low=100 * boot.low,
                               boot_high=100 * boot.high, boot_bias=100 * boot.bias)
            rows[index] = row
    return pd.DataFrame.from_dict(rows, orient="index").reindex(runs.index)


def _samples_of(folder: Path | None, results_dir: str | Path | None) -> tuple[pd.DataFrame | None, str]:
    """A run's per-sample records, or None and why not (read once per run, used for each of its suites)."""
    if results_dir is None:
        return None, "no bootstrap (no results folder given)"
    if folder is None or not (folder / "samples.parquet").is_file():
        return None, "no per-sample records"
    try:
        return read_samples(folder / "samples.parquet"), ""
    except FairbenchError as err:
        return None, str(err)


def _run_folders(results_dir: str | Path) -> dict[str, Path]:
    """run_id -> run folder of every finished run (damaged ones are skipped by `results.find_runs`)."""
    with warnings.catch_warnings():  # load_results has warned about them already
        warnings.simplefilter("ignore", results.ResultsWarning)
        return {meta.get("run_id", folder.name): folder for folder, meta in results.find_runs(results_dir)}


def _counts_text(methods: pd.DataFrame, counts: pd.DataFrame) -> list[str]:
    """Per method row: "3 (2/3), 8 (1/3)": the classes that were the worst, in how many of the runs (the
    `MAX_LISTED_TIES` most frequent, then how many more)."""
    keys = tables.GROUP_KEYS + ["method"]
    texts = pd.DataFrame([{**dict(zip(keys, key)), "text": _listed(g)}
                          for key, g in counts.groupby(keys, sort=False, dropna=False)], columns=[*keys, "text"])
    return methods[keys].merge(texts, on=keys, how="left")["text"].fillna("").tolist()


def _listed(counts: pd.DataFrame) -> str:
    listed = [f"{r.class_name} ({r.runs}/{r.n_runs})" for r in counts.head(MAX_LISTED_TIES).itertuples()]
    more = len(counts) - MAX_LISTED_TIES
    return ", ".join(listed) + (f", +{more} more" if more > 0 else "")


# ----------------------------------------------------------------------------------- formatting

def fmt_interval(estimate: float, low: float, high: float) -> str:
    """"82.17 [80.95, 83.39]"; just "82.17" without an interval; "n/a" for NaN."""
    if estimate is None or pd.isna(estimate):
        return "n/a"
    if low is None or pd.isna(low):
        return f"{estimate:.2f}"
    return f"{estimate:.2f} [{low:.2f}, {high:.2f}]"


def fmt_paired(diff: float, low: float, high: float, p_value: float) -> str:
    """"+1.20 [-0.50, 2.90] p=0.120", with `MARKER` when p < SIGNIFICANCE; "n/a" without pairs."""
    if diff is None or pd.isna(diff):
        return "n/a"
    text = f"{diff:+.2f}" if pd.isna(low) else f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]"
    if not pd.isna(p_value):
        text += f" p={p_value:.3f}" + (MARKER if p_value < SIGNIFICANCE else "")
    return text


def _method_headers(baseline: str, worst: str) -> list[str]:
    w = "worst-20%" if worst == "min20" else "worst"
    return ["method", "seeds", "clean avg", f"clean {w}", "robust avg", f"robust {w}",
            f"Δ robust avg vs {baseline}", f"Δ robust {w} vs {baseline}", "worst class (runs)"]


def _method_cells(r: pd.Series, baseline: str) -> list[str]:
    cells = [str(r["method"]), str(r["n_seeds"])]
    cells += [fmt_interval(r[f"{v}_mean"], r[f"{v}_low"], r[f"{v}_high"]) for v in VALUES]
    if r["method"] == baseline:
        cells += ["—", "—"]
    else:
        cells += [fmt_paired(r[f"d_{v}"], r[f"d_{v}_low"], r[f"d_{v}_high"], r[f"p_{v}"]) for v in PAIRED]
    return cells + [str(r["worst_classes"] or "n/a")]


def _run_headers(worst: str) -> list[str]:
    w = "worst-20%" if worst == "min20" else "worst"
    return ["method", "seed", f"robust {w} (table)", "worst class", "bootstrap epoch", f"robust {w} there",
            "bootstrap 95%", "bias"]


def _run_cells(r: pd.Series) -> list[str]:
    names = tuple(r["worst_names"]) if isinstance(r["worst_names"], tuple) else ()
    who = (", ".join(names) if len(names) <= MAX_LISTED_TIES else f"tie of {len(names)} classes")
    booted = not pd.isna(r["boot_observed"])
    return [str(r["method"]), str(r["seed"]), tables.fmt_mean_std(r["rob_worst"], None), who or "n/a",
            str(int(r["boot_epoch"])) if booted else "n/a",
            f"{r['boot_observed']:.2f}" if booted else "n/a",
            f"[{r['boot_low']:.2f}, {r['boot_high']:.2f}]" if booted else "n/a",
            f"{r['boot_bias']:+.2f}" if booted else "n/a"]


def _group_notes(methods: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """Why a cell is n/a or what a pair left out, one line per method; bootstrap gaps once per reason."""
    notes = [f"{m} vs baseline: {n}" for m, n in zip(methods["method"], methods["pair_note"].fillna("")) if n]
    gaps = runs.loc[runs["boot_note"] != "", ["method", "seed", "boot_note"]]
    for note, g in gaps.groupby("boot_note", sort=False):
        which = "every run" if len(g) == len(runs) else ", ".join(f"{m} s{s}" for m, s in zip(g["method"], g["seed"]))
        notes.append(f"bootstrap n/a for {which}: {note}")
    return notes


def _stats_footer(options: dict) -> str:
    level = round(100 * options["level"])
    ckpts = f"the last {options['last_k']} checkpoints" if options.get("last_k") else "all checkpoints"
    parts = [f"[low, high]: {level}% t interval over seeds of the per-run values (each the mean over {ckpts})",
             f"Δ: method - {options['baseline']}, paired by seed, {level}% t interval and two-sided paired "
             f"t-test; {MARKER} p < {SIGNIFICANCE} (not corrected for multiple comparisons)",
             "worst class: lowest class over the same checkpoints pooled, in how many runs"]
    if options.get("bootstrap"):
        parts.append(f"bootstrap: at each run's last checkpoint of the suite, {options['b']} resamples of the test "
                     f"samples within each class (seed {options['seed']}), percentile interval; bias = mean of the "
                     "resampled worst minus the observed worst")
    return "; ".join(parts) + " (docs/statistics.md)"


def statistics_frame(report: StatsReport) -> pd.DataFrame:
    """Both levels as one flat frame (the CSV export): `level` is "method" or "run"."""
    methods = report.methods.assign(level="method")
    runs = report.runs.assign(level="run")
    for frame in (methods, runs):
        for col in ("seeds", "worst_ids", "worst_names"):
            if col in frame:
                frame[col] = frame[col].map(lambda t: " ".join(map(str, t)) if isinstance(t, tuple) else t)
    flat = pd.concat([methods, runs], ignore_index=True)
    return flat[["level"] + [c for c in flat.columns if c != "level"]]


def format_statistics(report: StatsReport, fmt: str = "md"):
    """Render a `StatsReport` with the tables' renderer: per group a method table and a run table.
    "csv" -> `statistics_frame` as CSV; "rich" -> rich renderables ending with the footer."""
    if fmt not in tables.FORMATS:
        raise UnknownNameError("format", fmt, list(tables.FORMATS))
    if fmt == "csv":
        return statistics_frame(report).to_csv(index=False)
    baseline, worst = report.options["baseline"], report.options["worst"]
    groups = []
    for key, methods in report.methods.groupby(tables.GROUP_KEYS, sort=False, dropna=False):
        ds, arch, proto, attack = key
        runs = report.runs.merge(pd.DataFrame([key], columns=tables.GROUP_KEYS), on=tables.GROUP_KEYS)
        heading = f"{ds} / {arch} / {attack} (protocol {proto})"
        groups.append((f"{heading}: statistics over seeds", _method_headers(baseline, worst),
                       [_method_cells(r, baseline) for _, r in methods.iterrows()], _group_notes(methods, runs)))
        groups.append((f"{heading}: per run", _run_headers(worst),
                       [_run_cells(r) for _, r in runs.iterrows()], []))
    footer = _stats_footer(report.options)
    rendered = tables.format_groups(groups, fmt, footer)
    if fmt == "rich":
        from rich.text import Text
        return [*rendered, Text(footer)]
    return rendered
