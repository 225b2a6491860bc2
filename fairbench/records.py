"""Per-sample records to verdicts and counts, without torch: which samples each suite leaves robust, the
derived suites (unions across suites, prefixes of a cascade), per-class counts, the canonical record order
and how suites evaluated at another radius are named. Evaluation writes records with these rules and the
reporting layer (tables, statistics, plots) reads them with the same ones, so a table never recounts a
run differently from the evaluation that wrote it.

A record is one row per (suite, component, sample): `success` says the component broke the sample; a sample
is robust under a suite when it is clean-correct and no component of the suite broke it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def canonical_order(samples: pd.DataFrame, suites: list[str]) -> pd.DataFrame:
    """Records sorted by (suite as listed after clean, cascade position, sample index): the same frame
    whatever the batch size or chunking."""
    rank = samples["suite"].map({name: i for i, name in enumerate(["clean", *suites])})
    order = np.lexsort((samples["sample_idx"].to_numpy(), samples["order"].to_numpy(), rank.to_numpy()))
    return samples.iloc[order].reset_index(drop=True)


def robust_flags(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per (suite, sample): correct = clean-correct and no component of the suite succeeded. Where
    both `aa` and the experimental `a3` ran (at the same radius label), a derived suite `aa+a3` is robust
    under both: the informative number for A3 (docs/evaluation.md §8)."""
    clean_ok, labels = _clean_verdicts(samples)
    frames = [pd.DataFrame({"suite": "clean", "sample_idx": clean_ok.index, "label": labels.values,
                            "correct": clean_ok.values})]
    attacked = samples[samples.suite != "clean"]
    if len(attacked):
        broken = attacked.groupby(["suite", "sample_idx"], sort=False)["success"].any().reset_index()
        broken["label"] = labels.loc[broken.sample_idx].values
        broken["correct"] = clean_ok.loc[broken.sample_idx].values & ~broken["success"].values
        frames.append(broken[["suite", "sample_idx", "label", "correct"]])
        frames.extend(_unions(broken))
    return pd.concat(frames, ignore_index=True)


def _clean_verdicts(samples: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(clean-correct, label), indexed by sample_idx."""
    clean = samples[samples.suite == "clean"].set_index("sample_idx")
    return ~clean["success"], clean["label"]


def _unions(flags: pd.DataFrame) -> list[pd.DataFrame]:
    out = []
    suites = set(flags["suite"])
    for a3 in sorted(s for s in suites if s.split("@")[0] == "a3"):
        label = a3.partition("@")[2]
        aa = "aa" + ("@" + label if label else "")
        if aa in suites:
            out.append(robust_under_all(flags, [aa, a3], f"{aa}+a3"))
    return out


def robust_under_all(flags: pd.DataFrame, suites: list[str], name: str) -> pd.DataFrame:
    """Robust flags of the derived suite `name`: one row per sample every one of `suites` attacked, correct
    where it is robust under all of them (docs/evaluation.md §10: unions across suites AND the robust flags)."""
    runs = flags[flags["suite"].isin(suites)]
    wide = runs.pivot(index="sample_idx", columns="suite", values="correct")[list(suites)].dropna()
    labels = runs.drop_duplicates("sample_idx").set_index("sample_idx")["label"]
    return pd.DataFrame({"suite": name, "sample_idx": wide.index, "label": labels.loc[wide.index].to_numpy(),
                         "correct": wide.astype(bool).all(axis=1).to_numpy()})


def union_of_suites(flags: pd.DataFrame) -> pd.DataFrame | None:
    """Robust under every attack suite run at the run's radius (docs/evaluation.md §10), named by the suites in
    alphabetical order (`aa+pgd20`, whatever order they were run in): one row per sample that all of them
    attacked; None with fewer than two such suites. Suites at another radius (`aa@4/255`) and derived ones
    (`aa+a3`) do not take part."""
    suites = sorted(s for s in set(flags["suite"]) if s != "clean" and "@" not in s and "+" not in s)
    return robust_under_all(flags, suites, "+".join(suites)) if len(suites) >= 2 else None


def cascade_prefixes(samples: pd.DataFrame) -> pd.DataFrame | None:
    """Robust after the first k components of each suite with several (docs/evaluation.md §10: "after APGD-CE",
    "after APGD-CE + APGD-T", ...), as suites named after their last component, `aa:apgd-t`; the whole
    cascade is the suite itself. None where no suite has several components."""
    clean_ok, labels = _clean_verdicts(samples)
    frames = []
    for suite, records in samples[samples.suite != "clean"].groupby("suite", sort=False):
        components = records.drop_duplicates("order").sort_values("order")["component"].tolist()
        if len(components) < 2:
            continue
        broken = records.pivot_table(index="sample_idx", columns="order", values="success", aggfunc="any")
        broken = broken.sort_index(axis=1).fillna(False).astype(bool).cummax(axis=1)  # by one of the first k
        for k, component in enumerate(components[:-1]):
            frames.append(pd.DataFrame({
                "suite": f"{suite}:{component}", "sample_idx": broken.index,
                "label": labels.loc[broken.index].to_numpy(),
                "correct": clean_ok.loc[broken.index].to_numpy() & ~broken.iloc[:, k].to_numpy()}))
    return pd.concat(frames, ignore_index=True) if frames else None


def per_class_counts(samples: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """(suite, class_id, n, correct) for every class, including classes with zero correct."""
    return class_counts(robust_flags(samples), num_classes)


def class_counts(flags: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """`per_class_counts` from robust flags (one row per suite and sample)."""
    rows = []
    for suite, group in flags.groupby("suite", sort=False):
        labels = group["label"].to_numpy().astype(np.int64)
        n = np.bincount(labels, minlength=num_classes)
        correct = np.bincount(labels, weights=group["correct"].to_numpy(), minlength=num_classes).astype(np.int64)
        rows.append(pd.DataFrame({"attack": suite, "class_id": np.arange(num_classes), "n": n, "correct": correct}))
    return pd.concat(rows, ignore_index=True)


def eps_label(eps: float) -> str:
    """'4/255' (radii are written in 1/255 steps), '0.5/255' otherwise: short, exact enough to tell apart."""
    return f"{eps * 255:.6g}/255"


def eps_suite_name(attack: str, eps: float) -> str:
    """The stored name of `attack` evaluated at `eps` in an eps sweep, e.g. 'pgd20@4/255'. Results are keyed
    by (epoch, suite), so each radius needs its own name or the sweep's points overwrite each other."""
    return f"{attack}@{eps_label(eps)}"


def split_suite_name(name: str) -> tuple[str, str | None]:
    """'pgd20@4/255' -> ('pgd20', '4/255'); 'pgd20' -> ('pgd20', None)."""
    attack, sep, label = name.partition("@")
    return attack, (label if sep else None)


SAMPLE_LABELS = ("run_id", "method", "seed")
"""The run's name columns every samples.parquet row carries, so the files of many runs concatenate."""


def with_run_labels(samples: pd.DataFrame, labels: dict) -> pd.DataFrame:
    """`samples` with the run's `SAMPLE_LABELS` as its first columns (replacing older values)."""
    rest = samples.drop(columns=[c for c in SAMPLE_LABELS if c in samples.columns])
    return pd.concat([pd.DataFrame({c: [labels[c]] * len(rest) for c in SAMPLE_LABELS}, index=rest.index), rest],
                     axis=1)
