"""The bf16 A/B check of docs/evaluation.md §12: a suite searched in bf16 is a different search process, so
before tables are made with it, the same checkpoint and stratified samples are attacked in fp32 and in
bf16 and the robust accuracies compared: within 0.3 points overall and within the noise per class, or
bf16 is not used for that setting. The result is stored in the run's run.json (`precision_ab`), and
`fairbench table` warns about bf16 suites without a passing check for their dataset and architecture.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd

from fairbench.engine import Reporter, SilentReporter
from fairbench.evalrun import PARTIAL, evaluate_epochs, open_run
from fairbench.records import class_counts, robust_flags
from fairbench.results import find_runs, write_json

MAX_OVERALL_POINTS = 0.3
"""Largest allowed difference of the overall robust accuracy, in points (docs/evaluation.md §12)."""
CLASS_SIGMAS = 2.0
"""Per class, the allowed difference in binomial standard errors of the fp32 class accuracy."""


@dataclasses.dataclass
class PrecisionAB:
    suite: str
    epoch: int
    n: int
    fp32: float
    """Robust accuracy in percent, searching in fp32 (and bf16 below); verdicts are fp32 in both."""
    bf16: float
    classes: list[dict]
    """Per class: class_id, n, fp32, bf16 (percent) and allowed (points)."""
    passed: bool
    seconds: float

    @property
    def diff(self) -> float:
        return self.bf16 - self.fp32

    def failures(self) -> list[str]:
        out = []
        if abs(self.diff) > MAX_OVERALL_POINTS:
            out.append(f"overall {self.diff:+.2f} points (allowed {MAX_OVERALL_POINTS})")
        out += [f"class {c['class_id']} {c['bf16'] - c['fp32']:+.2f} points (allowed {c['allowed']:.2f})"
                for c in self.classes if abs(c["bf16"] - c["fp32"]) > c["allowed"]]
        return out

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures())
        return (f"{self.suite} at epoch {self.epoch} on {self.n} samples: robust {self.fp32:.2f}% (fp32 search) vs "
                f"{self.bf16:.2f}% (bf16 search), {self.diff:+.2f} points; {verdict}")


def compare(fp32: pd.DataFrame, bf16: pd.DataFrame, suite: str, num_classes: int, epoch: int,
            seconds: float = 0.0) -> PrecisionAB:
    """The A/B verdict from the per-sample records of the same samples searched in fp32 and in bf16."""
    flags = [robust_flags(records) for records in (fp32, bf16)]
    counts = [class_counts(f[f["suite"] == suite], num_classes).set_index("class_id") for f in flags]
    n = int(counts[0]["n"].sum())
    overall = [100.0 * c["correct"].sum() / n for c in counts]
    classes = []
    for k, row in counts[0].iterrows():
        if row["n"] == 0:
            continue
        p = row["correct"] / row["n"]
        allowed = 100.0 * max(CLASS_SIGMAS * math.sqrt(p * (1 - p) / row["n"]), 1.0 / row["n"])
        classes.append({"class_id": int(k), "n": int(row["n"]), "fp32": 100.0 * row["correct"] / row["n"],
                        "bf16": 100.0 * counts[1].loc[k, "correct"] / row["n"], "allowed": allowed})
    ab = PrecisionAB(suite, epoch, n, overall[0], overall[1], classes, True, seconds)
    ab.passed = not ab.failures()
    return ab


def run_precision_ab(folder: Path, attack: str = "aa", checkpoint: str = "final", n_examples: int = 1000,
                     data_dir: str | None = None, device: str = "auto",
                     reporter: Reporter | None = None) -> PrecisionAB:
    """Attack one checkpoint's stratified samples (about `n_examples`) in fp32 and in bf16, compare, and store
    the result in run.json. The run's result tables are not changed."""
    reporter = reporter or SilentReporter()
    run = open_run(folder, checkpoint, data_dir=data_dir, device=device, n_examples=n_examples)
    epoch = run.epochs[-1]
    reporter.message(f"{run.resolved.run_id}: {attack} A/B, fp32 vs bf16 search, epoch {epoch}, "
                     f"{len(run.split)} test samples")
    t0 = time.perf_counter()
    eps = run.resolved.spec.eval_eps
    records = {precision: evaluate_epochs(run.trainer, [epoch], [attack], eps, run.split, run.folder, reporter,
                                          precision)[0] for precision in ("fp32", "bf16")}
    ab = compare(records["fp32"], records["bf16"], attack, run.dataset.num_classes, epoch,
                 time.perf_counter() - t0)
    meta = json.loads((run.folder / "run.json").read_text())
    meta.setdefault("precision_ab", []).append(dataclasses.asdict(ab))
    write_json(run.folder / "run.json", meta)
    shutil.rmtree(run.folder / PARTIAL, ignore_errors=True)
    return ab


def unchecked_bf16(results_dir: str | Path) -> list[str]:
    """Warnings for suites searched in bf16 without a passing A/B for their dataset and architecture."""
    runs = [meta for _, meta in find_runs(results_dir, finished=False)]
    passed = {(_setting(m), ab["suite"]) for m in runs for ab in m.get("precision_ab", []) if ab.get("passed")}
    lines = []
    for meta in runs:
        spec = meta.get("spec", {})
        searched = [e.get("attacks", []) for e in meta.get("evaluations", []) if e.get("attack_precision") == "bf16"]
        if spec.get("attack_precision") == "bf16":  # the training-time evaluation
            searched.append(spec.get("attacks", []))
        for suite in dict.fromkeys(a for attacks in searched for a in attacks if a != "clean"):
            if (_setting(meta), suite) not in passed:
                lines.append(f"{meta['run_id']}: {suite} was searched in bf16 without a passing A/B check "
                             f"on {spec.get('dataset')} (docs/evaluation.md §12); run `fairbench ab-check RUN_DIR "
                             f"--attack {suite}`")
    return lines


def _setting(meta: dict) -> tuple[str | None, str | None]:
    """What an A/B check covers: the dataset and architecture."""
    spec = meta.get("spec", {})
    return spec.get("dataset"), spec.get("arch")
