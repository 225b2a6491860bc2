"""Figures from a real (tiny) grid: every plot renders, the files are real PNG/PDF, the axes say what they
should, and `fairbench eval --eps-sweep` stores one suite per radius without touching the run's own rows."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer

from fairbench import plots
from fairbench.errors import FairbenchError
from fairbench.evalrun import evaluate_run
from fairbench.records import eps_suite_name, split_suite_name
from fairbench.runner import run_one
from fairbench.spec import RunSpec
from tests.conftest import run_cli

METHODS = ("trades", "dafa", "trix")
CLASSES = [str(i) for i in range(10)]
SWEEP = (0, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict[str, Path]:
    """trades, dafa, trix on digits (3 epochs, last 2 evaluated); trades and trix swept over eps, and
    trades attacked with apgd-ce and apgd-t, on the final checkpoint of 3 images per class."""
    out = tmp_path_factory.mktemp("grid")
    folders = {}
    for method in METHODS:
        spec = RunSpec(method=method, dataset="digits", epochs=3, batch_size=64, train_per_class=40,
                       eval_per_class=10, eval_last=2, overrides={"warmup": "1", "steps": "2"},
                       attacks=("pgd20",))
        folders[method] = run_one(spec, out).folder
    for method in ("trades", "trix"):
        for k in SWEEP:
            evaluate_run(folders[method], ["pgd20"], checkpoints="final", per_class=3, eps=k / 255,
                         label_eps=True)
    evaluate_run(folders["trades"], ["apgd-ce", "apgd-t"], checkpoints="final", per_class=3)
    return {"root": out, **folders}


fairbench = run_cli  # the command line in this process


def bars(ax) -> list[BarContainer]:
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def tick_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


def test_eps_sweep_keeps_one_suite_per_radius_and_the_runs_own_rows(grid):
    cw = pd.read_parquet(grid["trades"] / "classwise.parquet")
    swept = cw[cw.attack.str.contains("@")]
    assert set(swept.attack) == {eps_suite_name("pgd20", k / 255) for k in SWEEP} == {
        f"pgd20@{k}/255" for k in SWEEP}
    for name, rows in swept.groupby("attack"):
        k = int(split_suite_name(name)[1].split("/")[0])
        assert np.allclose(rows.eps, k / 255) and set(rows.epoch) == {3} and rows.n.sum() == 30
    own = cw[cw.attack == "pgd20"]
    assert set(own.epoch) == {2, 3} and (own.groupby("epoch").n.sum() == 100).all()
    assert np.allclose(own.eps, 8 / 255)
    at0 = swept[swept.attack == "pgd20@0/255"].set_index("class_id").correct
    samples = pd.read_parquet(grid["trades"] / "samples.parquet")
    assert samples.duplicated(["epoch", "suite", "component", "sample_idx"]).sum() == 0
    clean = samples[(samples.suite == "clean") & (samples.epoch == 3)
                    & samples.sample_idx.isin(samples.loc[samples.suite == "pgd20@0/255", "sample_idx"])]
    assert (at0 == (~clean.success).groupby(clean.label).sum().reindex(at0.index)).all()  # eps 0: = clean
    meta = json.loads((grid["trades"] / "run.json").read_text())
    assert meta["evaluations"][0]["suites"] == ["pgd20@0/255"] and "pgd20@16/255" in meta["attacks"]


def test_classwise_bars_one_bar_set_per_method_with_class_names(grid):
    df = plots.load_results(grid["root"])
    summary = plots.classwise_summary(df, last_k=5)
    fig = plots.plot_classwise_bars(summary, "pgd20", list(METHODS))
    clean_ax, robust_ax = fig.axes
    for ax in (clean_ax, robust_ax):
        assert tick_labels(ax) == CLASSES
        assert [c.get_label() for c in bars(ax)] == list(METHODS)
        assert ax.get_ylim() == (0, 100)
    trades_clean = [b.get_height() for b in bars(clean_ax)[0]]
    rows = df[(df.method == "trades") & (df.attack == "clean")]
    expected = (rows.correct / rows.n * 100).groupby(rows.class_id).mean()  # 2 checkpoints, one seed
    np.testing.assert_allclose(trades_clean, expected.to_numpy())
    assert all(word in fig.get_suptitle() for word in ("digits", "smallcnn", "pgd20"))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*METHODS, "worst class"]


def test_eps_figures_lines_per_class_and_per_method(grid):
    df = plots.load_results(grid["root"])
    per_class = plots.eps_class_summary(df, "pgd20", last_k=5)
    fig = plots.plot_eps_per_class(per_class, "trades")
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 10 and [t.get_text() for t in ax.get_legend().get_texts()] == CLASSES
    assert tick_labels(ax) == ["0", "2/255", "4/255", "8/255", "16/255"] and ax.get_ylim() == (0, 100)
    fig = plots.plot_eps_per_class(per_class, "trades", max_classes=4)
    assert len(fig.axes[0].get_lines()) == 4  # the 2 least and 2 most robust classes
    per_method = plots.eps_method_summary(df, "pgd20", last_k=5)
    assert list(per_method.method.unique()) == ["trades", "trix"]
    worst = per_method.set_index(["method", "eps"]).worst_mean
    assert (worst <= per_method.set_index(["method", "eps"]).avg_mean).all()
    fig = plots.plot_eps_methods(per_method, ["trades", "trix"])
    assert len(fig.axes[0].get_lines()) == 4  # worst and average per method


def test_targeted_versus_untargeted_success_per_class(grid):
    samples = pd.read_parquet(grid["trades"] / "samples.parquet")
    success = plots.targeted_success(samples, "apgd-ce", "apgd-t", 10)
    cw = pd.read_parquet(grid["trades"] / "classwise.parquet")
    for suite, rows in success.groupby("suite"):
        robust = cw[(cw.attack == suite) & (cw.epoch == 3)].set_index("class_id").correct
        assert (rows.set_index("class_id").broken + robust == rows.set_index("class_id").attempted).all()
    assert success.rate.dropna().between(0, 100).all()
    summary = plots.seed_summary(success, "rate", ["class_id", "suite"])
    fig = plots.plot_targeted_success(summary, CLASSES, "apgd-ce", "apgd-t")
    (ax,) = fig.axes
    assert tick_labels(ax) == CLASSES and len(bars(ax)) == 2 and ax.get_ylim() == (0, 100)


def test_similarity_heatmap_and_weights_come_from_run_json(grid):
    run = next(r for r in plots.find_runs(grid["root"]) if r.method == "dafa")
    sim, weights = plots.method_state_arrays(run)
    meta = json.loads((grid["dafa"] / "run.json").read_text())
    np.testing.assert_array_equal(sim, meta["method_state"]["similarity"])
    fig = plots.plot_similarity(sim, weights, plots.class_names_of(run))
    heat, _colorbar, weight_ax = fig.axes
    assert heat.images[0].get_array().shape == (10, 10)
    assert tick_labels(heat) == CLASSES and len(heat.texts) == 100
    np.testing.assert_allclose([b.get_height() for b in bars(weight_ax)[0]], weights)
    trades = next(r for r in plots.find_runs(grid["root"]) if r.method == "trades")
    assert plots.method_state_arrays(trades) is None


def test_adversarial_confusion_rows_are_the_class_success_rates(grid):
    samples = pd.read_parquet(grid["trades"] / "samples.parquet")
    matrix = plots.adversarial_confusion(samples, "apgd-ce", 10, [3])
    success = plots.attack_success_by_class(samples, "apgd-ce", 10, [3]).set_index("class_id")
    attacked = success["attempted"].to_numpy() > 0
    assert matrix.shape == (10, 11)
    np.testing.assert_allclose(matrix[attacked, :10].sum(1), success.rate[attacked])  # a row spreads the breaks
    np.testing.assert_allclose(matrix[attacked].sum(1), 100.0)  # ... and the rest stayed correct
    assert np.isnan(matrix[~attacked]).all()  # no attacked sample: unknown, not 0%
    assert np.nansum(matrix[:, :10]) > 0 and not np.diag(matrix[attacked]).any()  # a success is another class
    fig = plots.plot_similarity(matrix, None, CLASSES, "apgd-ce", value_label="% of the class's attacked samples")
    heat, colorbar = fig.axes
    assert tick_labels(heat) == CLASSES + [plots.STAYED_CORRECT]
    assert colorbar.get_ylabel() == "% of the class's attacked samples"
    cells = [t.get_text() for t in heat.texts]
    assert cells.count("n/a") == 11 * int((~attacked).sum())


def test_classwise_figure_marks_each_methods_worst_class_and_says_n(grid, tmp_path):
    paths = plots.render_plots(plots.PlotRequest(grid["root"], tmp_path, zoom=True), "classwise").paths
    assert paths
    df = plots.load_results(grid["root"])
    summary = plots.classwise_summary(df)
    part = summary[summary.attack == "pgd20"]
    fig = plots.plot_classwise_bars(summary, "pgd20", None, "t", "n = 5 per class", zoom=True)
    robust = fig.axes[1]
    marks = [line for line in robust.lines if line.get_marker() == "v"]
    assert len(marks) == part["method"].nunique()  # one worst-class marker per method
    for line, (_, rows) in zip(marks, part.groupby("method", sort=False)):
        assert line.get_ydata()[0] >= rows["mean"].min()
    assert robust.get_xlabel() == "class (n = 5 per class)"
    low, high = robust.get_ylim()
    assert high <= 105 and (low > 0 or part["mean"].min() < 5)


def test_plot_command_writes_png_and_pdf_of_every_kind(grid, tmp_path, capsys):
    out = tmp_path / "figs"
    code, stdout, err = fairbench(["plot", "--results", str(grid["root"]), "--out", str(out)], capsys)
    assert code == 0, err
    paths = [Path(line) for line in stdout.split()]
    names = {p.name for p in paths}
    assert {"classwise_digits_smallcnn_pgd20.png", "eps_digits_smallcnn_pgd20_trades.pdf",
            "eps_digits_smallcnn_pgd20_methods.png", "targeted_digits_smallcnn_trades_apgd-ce_apgd-t.png",
            "similarity_digits_smallcnn_dafa_s1.pdf", "similarity_digits_smallcnn_trix_s1.png",
            "confusion_digits_smallcnn_trades_apgd-t.png", "confusion_digits_smallcnn_dafa_pgd20.pdf"} <= names
    # classwise: pgd20, apgd-ce, apgd-t; eps: 2 methods + their comparison; targeted: trades; 2 similarities;
    # confusion: trades' pgd20, apgd-ce, apgd-t and the others' pgd20 (never the eps-sweep suites); worstclass:
    # pgd20, apgd-ce, apgd-t
    assert len(paths) == 2 * (3 + 3 + 1 + 2 + 5 + 3)
    for p in paths:
        head = p.read_bytes()[:8]
        assert p.stat().st_size > 1000 and head.startswith(b"\x89PNG" if p.suffix == ".png" else b"%PDF")
    args = ["--kind", "classwise", "--attack", "pgd20", "--methods", "trix,trades", "--last-k", "1"]
    code, stdout, _ = fairbench(["plot", "--results", str(grid["root"]), "--out", str(out), *args], capsys)
    assert code == 0 and len(stdout.split()) == 2


def test_missing_data_is_a_clear_error(grid, tmp_path, capsys):
    only_dafa = tmp_path / "results"
    shutil.copytree(grid["dafa"], only_dafa / "runs" / grid["dafa"].name)
    with pytest.raises(FairbenchError, match=r"no eps sweep found; run `fairbench eval RUN --eps-sweep"):
        plots.render_plots(plots.PlotRequest(only_dafa, tmp_path / "p"), "eps")
    with pytest.raises(FairbenchError, match="--attack apgd-ce,apgd-t"):
        plots.render_plots(plots.PlotRequest(only_dafa, tmp_path / "p"), "targeted")
    code, _, err = fairbench(["plot", "--results", str(only_dafa), "--kind", "eps"], capsys)
    assert code == 2 and "--eps-sweep 0,2,4,8,16,32" in err
    code, stdout, err = fairbench(["plot", "--results", str(only_dafa)], capsys)  # all: draws what it can
    assert code == 0 and "skipped" in err and "eps-sweep" in err and len(stdout.split()) == 8  # classwise,
    # similarity, confusion and worstclass, each as PNG and PDF
    with pytest.raises(FairbenchError, match="robust suite named apgd-t; run `fairbench eval RUN"):
        plots.render_plots(plots.PlotRequest(only_dafa, tmp_path / "p", attacks=("apgd-t",)), "confusion")
    code, _, err = fairbench(["plot", "--results", str(grid["root"]), "--methods", "wat"], capsys)
    assert code == 2 and "unknown method 'wat'" in err


def test_eval_eps_sweep_command(grid, tmp_path, capsys):
    run = tmp_path / "runs" / grid["dafa"].name
    shutil.copytree(grid["dafa"], run)
    before = pd.read_parquet(run / "classwise.parquet")
    code, _, err = fairbench(["eval", str(run), "--eps-sweep", "0,4", "--checkpoints", "final",
                              "--n-examples", "20", "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    after = pd.read_parquet(run / "classwise.parquet")
    assert set(after.attack) == {"clean", "pgd20", "pgd20@0/255", "pgd20@4/255"}
    old = after[after.attack == "pgd20"].sort_values(["epoch", "class_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(old, before[before.attack == "pgd20"].sort_values(["epoch", "class_id"])
                                  .reset_index(drop=True), check_like=True)
    code, _, err = fairbench(["eval", str(run), "--eps-sweep", "0,4", "--eps", "8/255"], capsys)
    assert code == 2 and "exclude each other" in err
    code, _, err = fairbench(["eval", str(run), "--eps-sweep", "0,4", "--attack", "pgd20-trixcode"], capsys)
    assert code == 2 and "fixed radius" in err
