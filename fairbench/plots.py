"""Figures of the class-wise results, the ones the TRIX paper argues with:

- class-wise clean and robust accuracy, one bar per method (Figures 4 and 5);
- per-class robust accuracy against the radius eps (Figure 3), from `fairbench eval --eps-sweep`;
- untargeted versus targeted attack success per class (Figure 1a), from the per-sample records;
- DAFA/TRIX's class similarity matrix and the class weights derived from it (run.json method_state);
- which class is the worst in each seed, per method (the worst-class distribution over seeds).

Every `plot_*` function is pure: tidy DataFrames / arrays in, a `matplotlib.figure.Figure` out (tests
inspect its axes). Figures are built without pyplot, so there is no global figure state and rendering
is Agg whatever MPLBACKEND says. `render_*` are the thin loaders: they read a results folder and write
PNG + PDF per (dataset, arch, protocol) group. Accuracies follow tables.py: percent; per run the mean
over its last k checkpoints; then mean ± std (ddof=1) over seeds.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fairbench import results, stats
from fairbench.errors import FairbenchError, UnknownNameError, first_line
from fairbench.records import split_suite_name
from fairbench.tables import CLEAN, RUN_KEYS, load_results, run_metrics

SETUP_KEYS = ["dataset", "arch", "protocol"]
BASELINE = "trades"
UNTARGETED = ("apgd-ce", "pgd20", "pgd100", "apgd-dlr", "cw20")
"""Untargeted suites, in the order `--kind targeted` looks for one."""
TARGETED = ("apgd-t", "fab-t")
MAX_ANNOTATED = 12
"""Heatmap cells carry their value up to this many classes (beyond, the numbers would not fit)."""
MAX_WORST_CLASSES = 20
"""The worst-class figure shows every class up to this many, beyond only the classes that were ever worst."""
MARKERS = "osD^vP*Xhp<>"
EPS_SWEEP_HINT = "run `fairbench eval RUN --eps-sweep 0,2,4,8,16,32`"


# ------------------------------------------------------------------------------------ accuracies

def _with_descriptive_columns(df: pd.DataFrame) -> pd.DataFrame:
    """class_name and eps are optional in results files; plots need both."""
    if "class_name" not in df.columns:
        df = df.assign(class_name=df["class_id"].astype(str))
    if "eps" not in df.columns:
        df = df.assign(eps=np.nan)
    return df


def last_k_class_accuracy(df: pd.DataFrame, last_k: int | None = 5) -> pd.DataFrame:
    """Per (run, attack, class): accuracy in percent averaged over the run's last `last_k` checkpoints of
    that attack (the checkpoints `fairbench table` averages); classes with n = 0 are skipped."""
    d = _with_descriptive_columns(df)
    d = d[d["n"] > 0]
    keys = RUN_KEYS + ["attack"]
    epochs = d[keys + ["epoch"]].drop_duplicates()
    newest = epochs.groupby(keys, sort=False)["epoch"].rank(ascending=False, method="first")
    d = d.merge(epochs[newest <= (last_k or np.inf)], on=keys + ["epoch"])
    d = d.assign(acc=100.0 * d["correct"].astype(float) / d["n"].astype(float))
    out = d.groupby(keys + ["class_id"], sort=False).agg(
        acc=("acc", "mean"), eps=("eps", "first"), class_name=("class_name", "first"))
    return out.reset_index()


def seed_summary(per_run: pd.DataFrame, value: str, keys: list[str]) -> pd.DataFrame:
    """mean, std (ddof=1; NaN for one seed) and n_seeds of `value` over the runs of each group."""
    g = per_run.groupby(keys, sort=False)[value]
    return g.agg(mean="mean", std="std", n_seeds="count").reset_index()


def classwise_summary(df: pd.DataFrame, last_k: int | None = 5) -> pd.DataFrame:
    """Per (setup, attack, method, class): accuracy mean ± std over seeds (Figures 4/5)."""
    per_run = last_k_class_accuracy(df, last_k)
    return seed_summary(per_run, "acc", SETUP_KEYS + ["attack", "method", "class_id", "class_name"])


def eps_sweep_rows(df: pd.DataFrame, attack: str | None = None) -> pd.DataFrame:
    """The rows of eps sweeps (suites named 'pgd20@4/255'), with `swept` = the attack ('pgd20')."""
    parts = df["attack"].map(split_suite_name)
    swept = parts.map(lambda p: p[0])
    mask = parts.map(lambda p: p[1] is not None).astype(bool)
    if attack is not None:
        mask &= swept == attack
    return df[mask].assign(swept=swept[mask])


def eps_class_summary(df: pd.DataFrame, attack: str, last_k: int | None = 5) -> pd.DataFrame:
    """Per (setup, method, eps, class): robust accuracy under the swept `attack`, mean ± std over seeds."""
    per_run = last_k_class_accuracy(eps_sweep_rows(df, attack), last_k)
    return seed_summary(per_run, "acc", SETUP_KEYS + ["method", "eps", "class_id", "class_name"])


def eps_method_summary(df: pd.DataFrame, attack: str, last_k: int | None = 5) -> pd.DataFrame:
    """Per (setup, method, eps): average and worst-class robust accuracy, mean ± std over seeds. The worst
    class is taken per checkpoint before averaging, exactly as in `fairbench table`."""
    rows = _with_descriptive_columns(eps_sweep_rows(df, attack))
    rm = run_metrics(rows, last_k=last_k)
    rm["eps"] = rm["attack"].map(rows.groupby("attack")["eps"].first())
    g = rm.groupby(SETUP_KEYS + ["method", "eps"], sort=False)
    return g.agg(avg_mean=("avg", "mean"), avg_std=("avg", "std"), worst_mean=("worst", "mean"),
                 worst_std=("worst", "std"), n_seeds=("run_id", "nunique")).reset_index()


def attack_success_by_class(samples: pd.DataFrame, suite: str, num_classes: int,
                            epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """Per class: clean-correct samples the suite attacked, how many it broke (any component), and the
    success rate in percent (NaN for a class with nothing to attack); pooled over `epochs`."""
    s = samples[samples["suite"] == suite]
    if epochs is not None:
        s = s[s["epoch"].isin(list(epochs))]
    per_sample = s.groupby(["epoch", "sample_idx"], sort=False).agg(
        label=("label", "first"), attempted=("attempted", "any"), broken=("success", "any"))
    counts = per_sample.groupby("label").agg(attempted=("attempted", "sum"), broken=("broken", "sum"))
    counts = counts.reindex(range(num_classes), fill_value=0).rename_axis("class_id").reset_index()
    counts["rate"] = 100.0 * counts["broken"] / counts["attempted"].where(counts["attempted"] > 0)
    return counts.assign(suite=suite)


def targeted_success(samples: pd.DataFrame, untargeted: str, targeted: str, num_classes: int) -> pd.DataFrame:
    """`attack_success_by_class` of both suites on the checkpoints both were run on (Figure 1a)."""
    epochs = sorted(set(samples.loc[samples["suite"] == untargeted, "epoch"])
                    & set(samples.loc[samples["suite"] == targeted, "epoch"]))
    if not epochs:
        raise FairbenchError(f"{untargeted} and {targeted} were not run on a common checkpoint")
    parts = [attack_success_by_class(samples, suite, num_classes, epochs) for suite in (untargeted, targeted)]
    return pd.concat(parts, ignore_index=True)


def adversarial_confusion(samples: pd.DataFrame, suite: str, num_classes: int,
                          epochs: Sequence[int]) -> np.ndarray:
    """(C, C + 1) in percent: row = true class, column = the prediction at the successful adversarial point,
    and a last column for the samples that stayed correct, each as a share of the class's clean-correct
    samples the suite attacked (a row sums to 100); pooled over `epochs` (docs/evaluation.md §10: where the
    attack sends each class, DAFA's "weak classes flow into similar classes"). A class the suite attacked no
    sample of has a row of NaN: unknown, not 0%."""
    s = samples[(samples["suite"] == suite) & samples["epoch"].isin(list(epochs))]
    broken = s[s["success"]]
    counts = np.zeros((num_classes, num_classes + 1))
    np.add.at(counts, (broken["label"].to_numpy().astype(np.int64), broken["pred"].to_numpy().astype(np.int64)), 1)
    attacked = attack_success_by_class(s, suite, num_classes)["attempted"].to_numpy().astype(float)
    counts[:, -1] = attacked - counts[:, :-1].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(attacked[:, None] > 0, 100.0 * counts / attacked[:, None], np.nan)


STAYED_CORRECT = "stayed correct"


# ----------------------------------------------------------------------------------------- drawing

def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).ravel())


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _percent_axis(ax: Axes, label: str) -> None:
    ax.set_ylim(0, 100)
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _class_ticks(ax: Axes, names: Sequence[str]) -> None:
    """Class names under the bars; slanted once they are long or many."""
    slanted = len(names) > 20 or max(len(str(n)) for n in names) > 3
    ax.set_xticks(np.arange(len(names)), [str(n) for n in names], rotation=40 if slanted else 0,
                  ha="right" if slanted else "center", fontsize=None if len(names) <= 40 else 6)


def grouped_bars(ax: Axes, means: pd.DataFrame, stds: pd.DataFrame, colors: Sequence,
                 labels: Sequence[str], mark_lowest: bool = False) -> None:
    """One group per row of `means` (a class), one bar per column (a series), std as the error bar;
    `mark_lowest`: a triangle over each series' lowest bar (its worst class)."""
    width = 0.8 / max(means.shape[1], 1)
    x = np.arange(len(means))
    for i, col in enumerate(means.columns):
        err = stds[col].to_numpy(dtype=float)
        values = means[col].to_numpy(dtype=float)
        at = x + (i - (means.shape[1] - 1) / 2) * width
        ax.bar(at, values, width, label=labels[i], color=colors[i], edgecolor="white", linewidth=0.5,
               yerr=None if np.isnan(err).all() else np.nan_to_num(err), capsize=2,
               error_kw={"elinewidth": 0.8, "ecolor": "0.25"})
        if mark_lowest and np.isfinite(values).any():
            k = int(np.nanargmin(values))
            top = values[k] + (0.0 if np.isnan(err[k]) else err[k])
            ax.plot(at[k], top + 2.0, marker="v", color=colors[i], markeredgecolor="0.2", markersize=7,
                    linestyle="none", label="worst class" if i == 0 else None)
    _class_ticks(ax, list(means.index))
    ax.set_xlim(-0.6, len(means) - 0.4)


def class_index(summary: pd.DataFrame) -> pd.Series:
    """class_id -> class_name, in class-id order."""
    return summary.drop_duplicates("class_id").sort_values("class_id").set_index("class_id")["class_name"]


def _class_table(summary: pd.DataFrame, columns: str, value: str, order: Sequence,
                 classes: pd.Series) -> pd.DataFrame:
    """Rows = every class of `classes` (named), columns in `order`; absent combinations are NaN."""
    table = summary.pivot(index="class_id", columns=columns, values=value) if len(summary) else pd.DataFrame()
    table = table.reindex(index=classes.index, columns=list(order))
    table.index = [str(n) for n in classes]
    return table


def _setup_title(summary: pd.DataFrame, what: str) -> str:
    first = summary.iloc[0]
    return f"{first['dataset']} · {first['arch']} · {what}"


def plot_classwise_bars(summary: pd.DataFrame, attack: str, methods: Sequence[str] | None = None,
                        title: str | None = None, n_per_class: str = "", zoom: bool = False) -> Figure:
    """Figures 4/5: per class one bar per method, clean accuracy and robust accuracy under `attack`, each
    method's worst class marked. `summary` is the `classwise_summary` of one setup (dataset, arch, protocol);
    `n_per_class` goes under the class axis; `zoom` fits each panel's y-axis to its data, not 0-100."""
    methods = list(methods or pd.unique(summary["method"]))
    n_classes = summary["class_id"].nunique()
    panel = 0.12 * n_classes * (len(methods) + 1) + 1.0  # inches for one panel of grouped bars
    fig, axes = (_figure(min(max(2 * panel, 11), 16), 5.0, ncols=2) if n_classes * len(methods) <= 40
                 else _figure(min(max(panel, 9), 40), 9.0, nrows=2))
    colors, classes = _colors(len(methods)), class_index(summary)
    panels = [(axes[0], CLEAN, "clean accuracy (%)"), (axes[1], attack, f"robust accuracy (%), {attack}")]
    for ax, suite, label in panels:
        rows = summary[(summary["attack"] == suite) & summary["method"].isin(methods)]
        grouped_bars(ax, _class_table(rows, "method", "mean", methods, classes),
                     _class_table(rows, "method", "std", methods, classes), colors, methods, mark_lowest=True)
        _percent_axis(ax, label)
        if zoom and len(rows):
            low = float((rows["mean"] - rows["std"].fillna(0)).min())
            high = float((rows["mean"] + rows["std"].fillna(0)).max())
            ax.set_ylim(max(0.0, low - 5.0), min(105.0, high + 6.0))
        ax.set_xlabel(f"class ({n_per_class})" if n_per_class else "class")
        ax.set_title("clean" if suite == CLEAN else f"robust ({attack})")
    fig.suptitle(_fitted(title or _setup_title(summary, f"class-wise accuracy, {attack}"), fig.get_figwidth()))
    _figure_legend(fig, axes[0], len(methods))
    return fig


def _figure_legend(fig: Figure, ax: Axes, n: int, title: str | None = None) -> None:
    pairs = sorted(zip(*ax.get_legend_handles_labels()), key=lambda hl: hl[1] == "worst class")  # series first
    handles, labels = [h for h, _ in pairs], [label for _, label in pairs]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(n, 6), frameon=False, title=title)


def plot_worst_class_counts(counts: pd.DataFrame, classes: pd.Series, attack: str,
                            methods: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Per class, in how many runs (seeds) of each method it is the worst, clean and under `attack`:
    `counts` is `stats.worst_class_counts` of one setup; `classes` maps class_id -> name (every class, so
    classes never worst show as gaps). A tie counts for every tied class."""
    methods = list(methods or pd.unique(counts["method"]))
    every = len(classes) <= MAX_WORST_CLASSES
    if not every:  # 100 or 200 classes: only those that were ever the worst
        classes = classes[classes.index.isin(counts.loc[counts["attack"].isin([CLEAN, attack]), "class_id"])]
    fig, axes = _figure(min(max(0.12 * len(classes) * (len(methods) + 1) * 2 + 2.0, 11), 40), 4.8, ncols=2)
    colors = _colors(len(methods))
    n_runs = int(counts["n_runs"].max()) if len(counts) else 1
    for ax, suite in zip(axes, (CLEAN, attack)):
        rows = counts[(counts["attack"] == suite) & counts["method"].isin(methods)]
        table = _class_table(rows, "method", "runs", methods, classes).fillna(0)
        grouped_bars(ax, table, table * np.nan, colors, methods)
        ax.set_ylim(0, n_runs + 0.3)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("runs (seeds) in which the class is the worst")
        ax.set_xlabel("class" if every else "class (only those ever the worst)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title("clean" if suite == CLEAN else f"robust ({attack})")
    fig.suptitle(title or f"worst class over seeds, {attack}")
    _figure_legend(fig, axes[0], len(methods))
    return fig


def _extreme_classes(table: pd.DataFrame, limit: int) -> list:
    """All classes, or the `limit` // 2 least and most robust ones (mean over eps) when there are more."""
    if table.shape[1] <= limit:
        return list(table.columns)
    ranked = table.mean(axis=0).sort_values(kind="stable").index
    return list(ranked[: limit // 2]) + list(ranked[-(limit - limit // 2):])


def _eps_axis(ax: Axes, eps: Sequence[float]) -> np.ndarray:
    """Radii at equal spacing (0, 2, 4, 8, 16, 32 /255 would crowd on a linear axis), labelled k/255."""
    x = np.arange(len(eps))
    ax.set_xticks(x, [f"{e * 255:.3g}/255" if e else "0" for e in eps])
    ax.set_xlabel("ε (L∞ radius)")
    return x


def plot_eps_per_class(summary: pd.DataFrame, method: str, attack: str = "pgd20", title: str | None = None,
                       max_classes: int = 10) -> Figure:
    """Figure 3: robust accuracy against eps, one line per class, for one method of one setup
    (`eps_class_summary`). With more classes than `max_classes`, the least and most robust ones."""
    part = summary[summary["method"] == method]
    if part.empty:
        raise UnknownNameError("method", method, list(pd.unique(summary["method"])))
    table = part.pivot_table(index="eps", columns="class_id", values="mean").sort_index()
    names = part.drop_duplicates("class_id").set_index("class_id")["class_name"]
    chosen = _extreme_classes(table, max_classes)
    fig, (ax,) = _figure(8.5, 4.8)
    x = _eps_axis(ax, list(table.index))
    for i, (cid, color) in enumerate(zip(chosen, _colors(len(chosen)))):
        ax.plot(x, table[cid].to_numpy(), marker=MARKERS[i % len(MARKERS)], color=color,
                label=str(names[cid]))
    _percent_axis(ax, f"robust accuracy (%), {attack}")
    note = "" if len(chosen) == table.shape[1] else f" ({len(chosen)} of {table.shape[1]} classes)"
    ax.legend(title="class" + note, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title or _setup_title(part, f"{method}: per-class robust accuracy against ε, {attack}"))
    return fig


def plot_eps_methods(summary: pd.DataFrame, methods: Sequence[str] | None = None, attack: str = "pgd20",
                     title: str | None = None) -> Figure:
    """Worst-class (solid, ± std band) and average (dashed) robust accuracy against eps, per method
    (`eps_method_summary` of one setup)."""
    methods = list(methods or pd.unique(summary["method"]))
    eps = sorted(pd.unique(summary["eps"]))
    fig, (ax,) = _figure(8.5, 4.8)
    x = _eps_axis(ax, eps)
    for method, color in zip(methods, _colors(len(methods))):
        part = summary[summary["method"] == method].set_index("eps").reindex(eps)
        worst, std = part["worst_mean"].to_numpy(float), np.nan_to_num(part["worst_std"].to_numpy(float))
        ax.plot(x, worst, marker="o", color=color, label=f"{method}: worst class")
        ax.fill_between(x, worst - std, worst + std, color=color, alpha=0.15, linewidth=0)
        ax.plot(x, part["avg_mean"].to_numpy(float), ls="--", marker=".", color=color,
                label=f"{method}: average")
    _percent_axis(ax, f"robust accuracy (%), {attack}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title or _setup_title(summary, f"worst-class and average robust accuracy against ε, "
                                                f"{attack}"))
    return fig


def plot_targeted_success(summary: pd.DataFrame, class_names: Sequence[str], untargeted: str, targeted: str,
                          title: str | None = None) -> Figure:
    """Figure 1a: per class, how often the untargeted and the targeted suite break a clean-correct image
    (`summary`: class_id, suite, mean, std; from `targeted_success`, mean over seeds)."""
    classes = pd.Series(list(class_names), index=range(len(class_names)))
    suites = [untargeted, targeted]
    fig, (ax,) = _figure(min(max(0.6 * len(classes) + 2.5, 8), 40), 4.8)
    grouped_bars(ax, _class_table(summary, "suite", "mean", suites, classes),
                 _class_table(summary, "suite", "std", suites, classes), ["tab:blue", "tab:orange"],
                 [f"{untargeted} (untargeted)", f"{targeted} (targeted)"])
    _percent_axis(ax, "attack success rate (%)\nof clean-correct test images")
    ax.set_xlabel("true class")
    fig.suptitle(title or f"{untargeted} vs {targeted}: attack success per class")
    _figure_legend(fig, ax, 2)
    return fig


def plot_similarity(similarity: np.ndarray, weights: np.ndarray | None, class_names: Sequence[str],
                    title: str = "class similarity and class weights",
                    value_label: str = "mean predicted probability") -> Figure:
    """A class x class matrix (rows: true class, columns: predicted class) as an annotated heatmap: DAFA/TRIX's
    class similarity with the class weights derived from it below, or an adversarial confusion matrix."""
    sim = np.asarray(similarity, dtype=float)
    c = len(class_names)
    columns = list(class_names) + ([STAYED_CORRECT] if sim.shape == (c, c + 1) else [])
    if sim.shape != (c, len(columns)):
        raise FairbenchError(f"the class matrix has shape {sim.shape}, expected ({c}, {c}) for {c} classes")
    side = min(max(0.55 * c + 2.5, 6.5), 30)
    ratios = [side] if weights is None else [side, 2.4]
    fig = Figure(figsize=(side, 0.85 * side + sum(ratios[1:]) + 0.4), layout="constrained")
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
    ax = fig.add_subplot(grid[0])
    finite = sim[np.isfinite(sim)]
    image = ax.imshow(np.ma.masked_invalid(sim), cmap="Blues", vmin=0.0,
                      vmax=max(float(finite.max()) if finite.size else 0.0, 1e-12))
    fig.colorbar(image, ax=ax, shrink=0.85, label=value_label)
    _class_ticks(ax, columns)
    ax.set_yticks(np.arange(c), [str(n) for n in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(columns) > c:
        ax.axvline(c - 0.5, color="0.3", linewidth=1.2)  # the stayed-correct column is no prediction
    if c <= MAX_ANNOTATED:
        _annotate_cells(ax, sim)
    if weights is not None:
        _weight_bars(fig.add_subplot(grid[1]), np.asarray(weights, dtype=float), class_names)
    fig.suptitle(_fitted(title, fig.get_figwidth()))
    return fig


def _fitted(title: str, width_in: float, points: float = 12.0) -> str:
    """`title` wrapped to the figure's width (about 0.55 x the font size per character)."""
    import textwrap

    return textwrap.fill(title, max(30, int(width_in * 72 / (0.55 * points))))


def _annotate_cells(ax: Axes, values: np.ndarray) -> None:
    """Each cell's value, white on dark cells so it stays legible."""
    threshold = 0.55 * np.nanmax(values) if np.isfinite(values).any() else 0.0
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="white" if v > threshold else "0.15")


def _weight_bars(ax: Axes, weights: np.ndarray, class_names: Sequence[str]) -> None:
    """Weights above 1 (weak classes, emphasised) in red, below 1 in blue, the neutral 1 dashed."""
    colors = np.where(weights > 1, "tab:red", "tab:blue")
    ax.bar(np.arange(len(weights)), weights, color=colors, width=0.7)
    ax.axhline(1.0, color="0.2", ls="--", lw=1)
    _class_ticks(ax, class_names)
    low, high = float(weights.min()), float(weights.max())
    pad = max(high - low, 0.05) * 0.25
    ax.set_ylim(min(low, 1.0) - pad, max(high, 1.0) + pad)
    ax.set_ylabel("class weight")
    ax.set_xlabel("class (red: > 1, emphasised; blue: < 1)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


# ------------------------------------------------------------------------------------------ loading

@dataclass(frozen=True)
class RunInfo:
    """What the plots need to know about one finished run folder."""
    folder: Path
    run_id: str
    method: str
    dataset: str
    arch: str
    protocol: str
    seed: int
    meta: dict = field(repr=False, hash=False, compare=False)

    @property
    def setup(self) -> tuple[str, str, str]:
        return self.dataset, self.arch, self.protocol


def find_runs(results_dir: str | Path) -> list[RunInfo]:
    """Every finished run under `results_dir` (a damaged one is skipped with a warning naming it)."""
    runs = []
    for folder, meta in results.find_runs(results_dir):
        spec = meta["spec"]
        runs.append(RunInfo(folder, meta["run_id"], spec.get("method", "?"), spec.get("dataset", "?"),
                            (meta.get("config") or {}).get("arch", "?"), meta.get("protocol_id", "?"),
                            int(spec.get("seed", 0)), meta))
    if not runs:
        raise FairbenchError(f"no finished runs under {results_dir}; run `fairbench run ...` first")
    return runs


def class_names_of(run: RunInfo) -> list[str]:
    """Class names in class-id order, from the run's per-class table."""
    cw = _with_descriptive_columns(pd.read_parquet(run.folder / "classwise.parquet"))
    return cw.drop_duplicates("class_id").sort_values("class_id")["class_name"].astype(str).tolist()


def method_state_arrays(run: RunInfo) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(similarity, weights) of a DAFA/TRIX-family run, None for other methods or a similarity never
    computed (all zeros: trix-basic, or training ended before the warm-up). run.json describes tensors
    above 1024 entries by shape only (CIFAR-100's 100 x 100), so those come from the last checkpoint."""
    state = run.meta.get("method_state") or {}
    if "similarity" not in state:
        return None
    if isinstance(state["similarity"], str):
        state = _checkpoint_method_state(run.folder)
    sim = np.asarray(state["similarity"], dtype=float)
    if sim.ndim != 2 or not sim.any():
        return None
    weights = state.get("weights")
    return sim, (None if weights is None or isinstance(weights, str) else np.asarray(weights, dtype=float))


def _checkpoint_method_state(folder: Path) -> dict:
    import torch

    from fairbench.checkpoint import list_checkpoints

    found = list_checkpoints(folder / "checkpoints")
    if not found:
        raise FairbenchError(f"{folder}: run.json describes the similarity by shape only, and no checkpoint "
                             "is left to read it from")
    path = max(found.items())[1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True).get("method", {})
    except Exception as err:  # noqa: BLE001 - any reader error: the file is damaged
        raise FairbenchError(f"{path} cannot be read ({type(err).__name__}: {first_line(err)}), and run.json "
                             "describes the similarity by shape only; restore the checkpoint from a copy") from err
    return {k: v.numpy() if hasattr(v, "numpy") else v for k, v in state.items()}


def save_figure(fig: Figure, out: Path, stem: str) -> list[Path]:
    """PNG (for looking) and PDF (for the paper) side by side."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def _stem(*parts: object) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", str(p)).strip("-") for p in parts)


# ---------------------------------------------------------------------------------------- rendering

@dataclass(frozen=True)
class PlotRequest:
    """The options of `fairbench plot`."""
    results: Path
    out: Path
    attacks: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    last_k: int | None = 5
    pair: tuple[str, str] | None = None
    zoom: bool = False
    """Class-wise figures: y-axis fitted to the data instead of 0-100."""


@dataclass
class PlotReport:
    paths: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """'kind: reason' for each kind `all` could not draw."""


def method_order(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """`wanted` as given (each must exist), else the baseline first and the rest by first appearance."""
    available = list(dict.fromkeys(available))
    if wanted:
        for m in wanted:
            if m not in available:
                raise UnknownNameError("method", m, available)
        return list(wanted)
    return sorted(available, key=lambda m: (m != BASELINE, available.index(m)))


def _setups(frame: pd.DataFrame) -> tuple[list[tuple], set[tuple[str, str]]]:
    """The (dataset, arch, protocol) groups, and the (dataset, arch) pairs with several protocols
    (their titles and file names must name the protocol)."""
    setups = list(frame[SETUP_KEYS].drop_duplicates().itertuples(index=False, name=None))
    counts = pd.Series([s[:2] for s in setups]).value_counts()
    return setups, {k for k, v in counts.items() if v > 1}


def _setup_label(setup: tuple, ambiguous: set, what: str) -> tuple[str, list[str]]:
    """(title, file-name parts) of a setup."""
    extra = [f"protocol {setup[2]}"] if setup[:2] in ambiguous else []
    title = " · ".join([str(setup[0]), str(setup[1]), *extra, what])
    return title, [setup[0], setup[1], *([setup[2]] if extra else [])]


def _rows_of(frame: pd.DataFrame, setup: tuple) -> pd.DataFrame:
    return frame[(frame[SETUP_KEYS] == pd.Series(setup, index=SETUP_KEYS)).all(axis=1)]


def _checkpoints_note(df: pd.DataFrame, last_k: int | None) -> str:
    """How many checkpoints each run's value averages, as the title should say it ('last 3 checkpoints')."""
    counts = df.groupby(["run_id", "attack"])["epoch"].nunique().clip(upper=last_k or None)
    low, high = int(counts.min()), int(counts.max())
    return f"last {low} checkpoint{'s' * (high > 1)}" if low == high else f"last {low}-{high} checkpoints"


def _robust_attacks(df: pd.DataFrame, req: PlotRequest) -> list[str]:
    """The requested robust attacks (each must exist), else every one evaluated except eps-sweep suites."""
    robust = [a for a in pd.unique(df["attack"]) if a != CLEAN and split_suite_name(a)[1] is None]
    if req.attacks:
        available = [a for a in pd.unique(df["attack"]) if a != CLEAN]
        for a in req.attacks:
            if a not in available:
                raise UnknownNameError("attack", a, available)
        robust = list(req.attacks)
    if not robust:
        raise FairbenchError("only clean results: evaluate an attack first "
                             "(`fairbench eval RUN --attack pgd20`)")
    return robust


def render_classwise(req: PlotRequest) -> list[Path]:
    """Figures 4/5 per setup and robust attack."""
    df = load_results(req.results)
    methods = method_order(pd.unique(df["method"]), req.methods)
    df = df[df["method"].isin(methods)]
    robust = _robust_attacks(df, req)
    summary = classwise_summary(df, req.last_k)
    setups, ambiguous = _setups(summary)
    paths = []
    for setup in setups:
        part = _rows_of(summary, setup)
        for attack in (a for a in robust if a in set(part["attack"])):
            used = _rows_of(df, setup)
            note = _checkpoints_note(used[used["attack"].isin([CLEAN, attack])], req.last_k)
            title, parts = _setup_label(setup, ambiguous, f"{attack}: class-wise accuracy "
                                        f"(mean ± std over seeds, {note})")
            fig = plot_classwise_bars(part, attack, [m for m in methods if m in set(part["method"])], title,
                                      _n_per_class(used[used["attack"] == attack]), req.zoom)
            paths += save_figure(fig, req.out, _stem("classwise", *parts, attack))
    return paths


def _n_per_class(rows: pd.DataFrame) -> str:
    """`n = 1000 per class` (test images per class and checkpoint a bar stands on), or a range."""
    n = rows.loc[rows["n"] > 0, "n"]
    if n.empty:
        return ""
    return f"n = {int(n.min())} per class" if n.min() == n.max() else f"n = {int(n.min())}-{int(n.max())} per class"


def render_eps(req: PlotRequest) -> list[Path]:
    """Figure 3 per setup, swept attack and method, plus the worst-class comparison of the methods."""
    df = load_results(req.results)
    methods = method_order(pd.unique(df["method"]), req.methods)
    sweeps = eps_sweep_rows(df[df["method"].isin(methods)])
    if sweeps.empty:
        raise FairbenchError(f"no eps sweep found; {EPS_SWEEP_HINT}")
    swept = list(pd.unique(sweeps["swept"]))
    if req.attacks:
        missing = [a for a in req.attacks if a not in swept]
        if missing:
            raise FairbenchError(f"no eps sweep of {', '.join(missing)} (swept: {', '.join(swept)}); "
                                 f"{EPS_SWEEP_HINT.replace('RUN', f'RUN --attack {missing[0]}')}")
        swept = list(req.attacks)
    return [path for attack in swept for path in _render_eps_attack(req, sweeps, attack, methods)]


def _render_eps_attack(req: PlotRequest, sweeps: pd.DataFrame, attack: str, methods: list[str]) -> list[Path]:
    """Per setup: one per-class figure per method, and the methods' worst-class comparison."""
    per_class = eps_class_summary(sweeps, attack, req.last_k)
    per_method = eps_method_summary(sweeps, attack, req.last_k)
    setups, ambiguous = _setups(per_class)
    paths = []
    for setup in setups:
        part = _rows_of(per_class, setup)
        present = [m for m in methods if m in set(part["method"])]
        for method in present:
            what = f"{method}: per-class robust accuracy against ε, {attack}"
            title, parts = _setup_label(setup, ambiguous, what)
            paths += save_figure(plot_eps_per_class(part, method, attack, title), req.out,
                                 _stem("eps", *parts, attack, method))
        title, parts = _setup_label(setup, ambiguous, f"worst-class and average robust accuracy against ε, "
                                                      f"{attack}")
        paths += save_figure(plot_eps_methods(_rows_of(per_method, setup), present, attack, title), req.out,
                             _stem("eps", *parts, attack, "methods"))
    return paths


def _pick_pair(suites: set[str], pair: tuple[str, str] | None) -> tuple[str, str] | None:
    """The requested (untargeted, targeted) pair when both were run, else the first known pair found."""
    if pair:
        return pair if set(pair) <= suites else None
    untargeted = next((s for s in UNTARGETED if s in suites), None)
    targeted = next((s for s in TARGETED if s in suites), None)
    return (untargeted, targeted) if untargeted and targeted else None


def _chosen_runs(req: PlotRequest) -> tuple[list[str], list[RunInfo]]:
    """(the methods in legend order, the runs of those methods)."""
    runs = find_runs(req.results)
    methods = method_order([r.method for r in runs], req.methods)
    return methods, [r for r in runs if r.method in methods]


def _records(run: RunInfo, columns: list[str]) -> pd.DataFrame | None:
    """The run's per-sample records, the `columns` of them; None with a warning naming the file when they
    cannot be read (the figure shows the other runs)."""
    try:
        return results.read_records(run.folder / "samples.parquet", columns)
    except FairbenchError as err:
        warnings.warn(f"leaving run {run.run_id} out of the figure: its {err}; {results.rewrite_hint(run.folder)}",
                      results.ResultsWarning, stacklevel=2)
        return None


def render_targeted(req: PlotRequest) -> list[Path]:
    """Figure 1a per setup, method and suite pair (mean ± std of the per-run rates over seeds)."""
    methods, runs = _chosen_runs(req)
    groups: dict[tuple, list[pd.DataFrame]] = {}
    names: dict[tuple, list[str]] = {}
    for run in runs:
        samples = _records(run, ["epoch", "suite", "sample_idx", "label", "attempted", "success"])
        if samples is None:
            continue
        pair = _pick_pair(set(samples["suite"]), req.pair)
        if pair is None:
            continue
        key = (run.setup, run.method, pair)
        names[key] = class_names_of(run)
        success = targeted_success(samples, *pair, len(names[key]))
        groups.setdefault(key, []).append(success.assign(run_id=run.run_id))
    if not groups:
        wanted = ",".join(req.pair) if req.pair else "apgd-ce,apgd-t"
        raise FairbenchError(f"no run has both an untargeted and a targeted suite ({wanted}); "
                             f"run `fairbench eval RUN --attack {wanted}`")
    setups, ambiguous = _setups(pd.DataFrame([k[0] for k in groups], columns=SETUP_KEYS))
    paths = []
    for key in sorted(groups, key=lambda k: (setups.index(k[0]), methods.index(k[1]))):
        setup, method, (untargeted, targeted) = key
        summary = seed_summary(pd.concat(groups[key], ignore_index=True), "rate", ["class_id", "suite"])
        title, parts = _setup_label(setup, ambiguous, f"{method}: attack success per class, "
                                    f"{untargeted} vs {targeted} ({len(groups[key])} run(s))")
        fig = plot_targeted_success(summary, names[key], untargeted, targeted, title)
        paths += save_figure(fig, req.out, _stem("targeted", *parts, method, untargeted, targeted))
    return paths


def render_similarity(req: PlotRequest) -> list[Path]:
    """The similarity heatmap and class weights of every DAFA/TRIX-family run."""
    runs = find_runs(req.results)
    methods = method_order([r.method for r in runs], req.methods)
    _, ambiguous = _setups(pd.DataFrame([r.setup for r in runs], columns=SETUP_KEYS))
    paths = []
    chosen = sorted((r for r in runs if r.method in methods), key=lambda r: (methods.index(r.method), r.seed))
    for run in chosen:
        try:
            arrays = method_state_arrays(run)
        except FairbenchError as err:
            warnings.warn(f"leaving run {run.run_id} out of the similarity figures: {err}", results.ResultsWarning,
                          stacklevel=2)
            continue
        if arrays is None:
            continue
        title, parts = _setup_label(run.setup, ambiguous, f"{run.method} seed {run.seed}: "
                                    "class similarity (rows: true class) and class weights")
        fig = plot_similarity(arrays[0], arrays[1], class_names_of(run), title)
        paths += save_figure(fig, req.out, _stem("similarity", *parts, run.method, f"s{run.seed}"))
    if not paths:
        raise FairbenchError("no run with a class similarity in its method_state (dafa, trix and their "
                             "weighted variants, after the warm-up); train one with "
                             "`fairbench run --methods dafa,trix`")
    return paths


def render_confusion(req: PlotRequest) -> list[Path]:
    """Per setup, method and suite: where the attack sends each class, mean over seeds of each run's last
    `last_k` checkpoints that the suite was run on."""
    methods, runs = _chosen_runs(req)
    groups: dict[tuple, list[np.ndarray]] = {}
    names: dict[tuple, list[str]] = {}
    for run in runs:
        samples = _records(run, ["epoch", "suite", "sample_idx", "label", "attempted", "success", "pred"])
        if samples is None:
            continue
        suites = [a for a in pd.unique(samples["suite"]) if a != CLEAN and split_suite_name(a)[1] is None]
        for suite in (a for a in (req.attacks or suites) if a in suites):
            epochs = sorted(set(samples.loc[samples["suite"] == suite, "epoch"]))
            epochs = epochs[-req.last_k:] if req.last_k else epochs
            key = (run.setup, run.method, suite)
            names[key] = class_names_of(run)
            groups.setdefault(key, []).append(adversarial_confusion(samples, suite, len(names[key]), epochs))
    if not groups:
        wanted = ",".join(req.attacks) if req.attacks else "pgd20"
        raise FairbenchError("no run has per-sample records of a robust suite" + (f" named {wanted}" if req.attacks
                                                                                 else "")
                             + f"; run `fairbench eval RUN --attack {wanted}`")
    _, ambiguous = _setups(pd.DataFrame([k[0] for k in groups], columns=SETUP_KEYS))
    paths = []
    for key in sorted(groups, key=lambda k: (k[0], methods.index(k[1]), k[2])):
        setup, method, suite = key
        title, parts = _setup_label(setup, ambiguous, f"{method}: where {suite} sends each class "
                                    f"(rows: true class; mean over {len(groups[key])} run(s))")
        with warnings.catch_warnings():  # a class no run attacked stays n/a
            warnings.simplefilter("ignore", RuntimeWarning)
            matrix = np.nanmean(groups[key], axis=0)
        fig = plot_similarity(matrix, None, names[key], title,
                              value_label="% of the class's attacked samples")
        paths += save_figure(fig, req.out, _stem("confusion", *parts, method, suite))
    return paths


def render_worst_class(req: PlotRequest) -> list[Path]:
    """The worst-class distribution over seeds per setup and robust attack: which class is the worst in
    each run (over the checkpoints the table averages), per method, clean and robust."""
    df = load_results(req.results)
    methods = method_order(pd.unique(df["method"]), req.methods)
    df = _with_descriptive_columns(df[df["method"].isin(methods)])
    robust = _robust_attacks(df, req)
    counts = stats.worst_class_counts(stats.worst_classes(df, req.last_k))
    setups, ambiguous = _setups(counts)
    paths = []
    for setup in setups:
        part, used = _rows_of(counts, setup), _rows_of(df, setup)
        for attack in (a for a in robust if a in set(part["attack"])):
            note = _checkpoints_note(used[used["attack"].isin([CLEAN, attack])], req.last_k)
            title, parts = _setup_label(setup, ambiguous, f"{attack}: worst class over "
                                        f"{_runs_note(used[used['attack'] == attack])} ({note})")
            fig = plot_worst_class_counts(part, class_index(used), attack,
                                          [m for m in methods if m in set(part["method"])], title)
            paths += save_figure(fig, req.out, _stem("worstclass", *parts, attack))
    return paths


def _runs_note(df: pd.DataFrame) -> str:
    """"4 seeds", or "3-5 seeds per method" when the methods have different numbers of runs."""
    n = df.groupby("method")["run_id"].nunique()
    low, high = int(n.min()), int(n.max())
    return f"{high} seed{'s' * (high > 1)}" if low == high else f"{low}-{high} seeds per method"


def tracked_history(runs: list[RunInfo], suite: str = "pgd20") -> pd.DataFrame:
    """(run_id, method, seed, setup..., epoch, class_id, acc) from each run's history.parquet where
    `--track-every` recorded class-wise accuracy under `suite`; runs without it are left out."""
    frames = []
    for run in runs:
        path = run.folder / results.HISTORY
        if not path.is_file():
            continue
        try:
            history = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - any reader error: leave the run out, say so
            warnings.warn(f"leaving run {run.run_id} out: {path} cannot be read ({first_line(err)})",
                          results.ResultsWarning, stacklevel=2)
            continue
        column = f"tracked/{suite}"
        if column not in history:
            continue
        rows = history.loc[history[column].notna(), ["epoch", column]]
        for epoch, values in zip(rows["epoch"], rows[column]):
            frames.append(pd.DataFrame({"run_id": run.run_id, "method": run.method, "seed": run.seed,
                                        "dataset": run.dataset, "arch": run.arch, "protocol": run.protocol,
                                        "epoch": int(epoch), "class_id": range(len(values)),
                                        "acc": [float(v) for v in values]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_training_classes(frame: pd.DataFrame, class_names: Sequence[str], title: str, suite: str) -> Figure:
    """Per-class accuracy over training epochs (mean over seeds), one line per class; the worst class at the
    last tracked epoch drawn thick and named in the legend."""
    fig, (ax,) = _figure(9.0, 5.0)
    mean = frame.groupby(["class_id", "epoch"])["acc"].mean().unstack("epoch")
    last = mean.columns.max()
    worst = int(mean[last].idxmin())
    colors = _colors(len(mean))
    for k, row in mean.iterrows():
        name = str(class_names[k]) if k < len(class_names) else str(k)
        ax.plot(row.index, row.to_numpy(), marker="o", markersize=3, color=colors[k],
                linewidth=2.8 if k == worst else 1.0, label=f"{name} (worst at epoch {last})" if k == worst else name)
    _percent_axis(ax, f"{suite} accuracy (%), held-out subset")
    ax.set_xlabel("epoch")
    fig.suptitle(_fitted(title, fig.get_figwidth()))
    _figure_legend(fig, ax, min(len(mean), 6))
    return fig


def render_training(req: PlotRequest) -> list[Path]:
    """Per setup and method: class-wise PGD-20 accuracy over training epochs from the runs' tracked history
    (`fairbench run --track-every N`), the worst class drawn thick."""
    runs = find_runs(req.results)
    methods = method_order([r.method for r in runs], req.methods)
    frame = tracked_history([r for r in runs if r.method in methods])
    if frame.empty:
        raise FairbenchError("no run has a tracked class-wise history; train with `fairbench run ... "
                             "--track-every N` (class-wise accuracy on a held-out subset every N epochs)")
    setups, ambiguous = _setups(frame)
    paths = []
    for setup in setups:
        part = _rows_of(frame, setup)
        for method in (m for m in methods if m in set(part["method"])):
            rows = part[part["method"] == method]
            run = next(r for r in runs if r.run_id == rows["run_id"].iloc[0])
            n_runs = rows["run_id"].nunique()
            title, parts = _setup_label(setup, ambiguous, f"{method}: class-wise PGD-20 accuracy during training "
                                        f"(mean over {n_runs} run{'s' * (n_runs > 1)})")
            fig = plot_training_classes(rows, class_names_of(run), title, "pgd20")
            paths += save_figure(fig, req.out, _stem("training", *parts, method))
    return paths


RENDERERS: dict[str, Callable[[PlotRequest], list[Path]]] = {
    "classwise": render_classwise, "eps": render_eps, "targeted": render_targeted,
    "similarity": render_similarity, "confusion": render_confusion, "worstclass": render_worst_class,
    "training": render_training}


def render_plots(req: PlotRequest, kind: str = "all") -> PlotReport:
    """Draw one kind of figure (its absence is an error), or `all` (kinds without data are skipped and
    reported; an error only when nothing at all could be drawn)."""
    if kind != "all" and kind not in RENDERERS:
        raise UnknownNameError("plot kind", kind, [*RENDERERS, "all"])
    find_runs(req.results)  # an empty folder: one clear message rather than one per kind
    report = PlotReport()
    for name in (RENDERERS if kind == "all" else [kind]):
        try:
            report.paths += RENDERERS[name](req)
        except FairbenchError as err:
            if kind != "all":
                raise
            report.skipped.append(f"{name}: {err}")
    if not report.paths:
        raise FairbenchError("nothing to plot: " + "; ".join(report.skipped))
    return report
