"""Class-wise accuracy metrics and the fairness score rho (docs/metrics.md).

Pure functions on numpy arrays: no I/O, no pandas. Accuracies are fractions in [0, 1] here;
`fairbench.tables` converts to percent. rho is scale-free, so it accepts either.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike

from fairbench.errors import UnknownNameError

RHO_VARIANTS: tuple[str, ...] = ("dafa", "worst_minus_avg")
WORST_FRACTION = 0.2


def class_accuracy(correct: ArrayLike, n: ArrayLike) -> np.ndarray:
    """acc_k = correct_k / n_k. Divides by the actual n_k (not N/C) so unbalanced sets are right.

    A class with n_k = 0 was not evaluated: its accuracy is NaN and the other metrics skip it.
    """
    correct = np.asarray(correct, dtype=float)
    n = np.asarray(n, dtype=float)
    if correct.shape != n.shape:
        raise ValueError(f"correct and n differ in shape: {correct.shape} vs {n.shape}")
    if np.any(n < 0) or np.any(correct < 0) or np.any(correct > n):
        raise ValueError("per-class counts must satisfy 0 <= correct <= n")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, correct / np.where(n > 0, n, 1.0), np.nan)


def average_accuracy(correct: ArrayLike, n: ArrayLike) -> float:
    """Ordinary accuracy sum(correct) / sum(n); the papers call it "average" accuracy."""
    correct = np.asarray(correct, dtype=float)
    total = float(np.sum(np.asarray(n, dtype=float)))
    return float(np.sum(correct)) / total if total > 0 else math.nan


def class_mean_accuracy(correct: ArrayLike, n: ArrayLike) -> float:
    """Unweighted mean of acc_k; equals `average_accuracy` only on balanced sets (report both if not)."""
    acc = class_accuracy(correct, n)
    return float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else math.nan


def _valid(acc: ArrayLike) -> np.ndarray:
    """Per-class accuracies without the NaN of unevaluated classes."""
    a = np.asarray(acc, dtype=float).ravel()
    return a[~np.isnan(a)]


def worst_class_accuracy(acc: ArrayLike) -> float:
    """A_wst = min_k acc_k of ONE run/checkpoint; average it over seeds afterwards, never min of averages."""
    a = _valid(acc)
    return float(a.min()) if a.size else math.nan


def n_worst_classes(n_classes: ArrayLike, fraction: float = WORST_FRACTION) -> np.ndarray | int:
    """k = floor(fraction * C), at least 1 (C=10 -> 2, C=100 -> 20, C=200 -> 40). Accepts arrays."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    c = np.asarray(n_classes)
    # The tiny epsilon keeps e.g. 0.2 * 200 = 40.000000000000004 and 0.6 * 5 = 2.9999999999999996 exact.
    k = np.maximum(1, np.floor(fraction * c + 1e-9)).astype(int)
    return int(k) if k.ndim == 0 else k


def worst_fraction_accuracy(acc: ArrayLike, fraction: float = WORST_FRACTION) -> float:
    """A_wst20: mean of the floor(fraction*C) (>= 1) lowest acc_k; the Tiny-ImageNet "worst (min 20%)"."""
    a = _valid(acc)
    if not a.size:
        return math.nan
    k = n_worst_classes(a.size, fraction)
    return float(np.sort(a)[:k].mean())


WORST_METRICS: dict[str, Callable[[ArrayLike], float]] = {
    "min": worst_class_accuracy,
    "min20": worst_fraction_accuracy,
}


def worst_metric(name: str) -> Callable[[ArrayLike], float]:
    """Look up a worst-class statistic by its option name ("min" or "min20")."""
    try:
        return WORST_METRICS[name]
    except KeyError:
        raise UnknownNameError("worst metric", name, list(WORST_METRICS)) from None


def rho(
    avg: ArrayLike,
    worst: ArrayLike,
    base_avg: ArrayLike,
    base_worst: ArrayLike,
    variant: str = "dafa",
) -> float | np.ndarray:
    """Fairness score of a method against the baseline (TRADES under the same protocol).

    variant "dafa" (default, reproduces all 30 values of DAFA's table):
        (worst - base_worst)/base_worst - (base_avg - avg)/base_avg
    variant "worst_minus_avg" (matches some TRIX Table 1a entries, see docs/metrics.md §6):
        (worst - base_worst)/base_worst - (avg - base_avg)/base_avg
    Undefined (base_worst == 0, base_avg == 0 or a missing value) gives NaN, never inf; no epsilon
    is added. Use `rho_undefined_reason` to say why. Scalars in -> float out, arrays broadcast.
    """
    if variant not in RHO_VARIANTS:
        raise UnknownNameError("rho variant", variant, list(RHO_VARIANTS))
    avg, worst, base_avg, base_worst = (np.asarray(x, dtype=float)
                                        for x in (avg, worst, base_avg, base_worst))
    ok = (base_worst != 0) & (base_avg != 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        worst_rel = (worst - base_worst) / base_worst
        avg_rel = (avg - base_avg) / base_avg
    out = worst_rel + avg_rel if variant == "dafa" else worst_rel - avg_rel
    out = np.where(ok & np.isfinite(out), out, np.nan)
    return float(out) if out.ndim == 0 else out


def rho_undefined_reason(base_avg: float, base_worst: float) -> str | None:
    """Why rho against this baseline is NaN (a note for tables), or None when it is defined."""
    if base_avg is None or base_worst is None or math.isnan(base_avg) or math.isnan(base_worst):
        return "baseline accuracy missing: rho undefined"
    if base_worst == 0:
        return "baseline worst-class accuracy is 0: rho undefined"
    if base_avg == 0:
        return "baseline average accuracy is 0: rho undefined"
    return None
