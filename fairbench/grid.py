"""Experiment grids from TOML configs: the exact runs behind a table, at paper scale or a named smaller one.

    [grid]                      # the paper's grid
    methods = ["trades", "dafa", "trix"]
    datasets = ["cifar10"]
    archs = ["resnet18"]
    seeds = [1, 2, 3, 4, 5]
    epochs = 150
    attacks = ["pgd20", "aa"]
    [grid.set]                  # method hyperparameters (bare keys or method.key)
    [scale.smoke]               # overrides of [grid] for `--scale smoke`
    datasets = ["digits"]

Runs are keyed by a hash of their resolved configuration, so re-running a grid skips finished runs.
"""
from __future__ import annotations

import tomllib
from itertools import product
from pathlib import Path
from typing import Any

from fairbench.config import parse_number
from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.spec import RunSpec, check_overrides

LIST_KEYS = ("methods", "datasets", "archs", "seeds")
SCALAR_KEYS = ("epochs", "batch_size", "lr", "schedule", "weight_decay", "protocol", "train_per_class",
               "eval_per_class", "eval_last", "hot_start_epochs", "eval_eps")


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as err:
        raise FairbenchError(f"config {path} not found (the paper's configs are in benchmarks/paper/)") from err
    except tomllib.TOMLDecodeError as err:
        raise FairbenchError(f"config {path} is not valid TOML: {err}") from err


def grid_settings(config: dict[str, Any], scale: str | None) -> dict[str, Any]:
    """[grid] with [scale.<name>] applied on top (its `set` table merged into the grid's)."""
    if "grid" not in config:
        raise FairbenchError("a grid config needs a [grid] table (see benchmarks/paper/*.toml)")
    settings = dict(config["grid"])
    if scale:
        scales = config.get("scale", {})
        if scale not in scales:
            raise UnknownNameError("scale", scale, list(scales))
        extra = dict(scales[scale])
        settings["set"] = {**settings.get("set", {}), **extra.pop("set", {})}
        settings.update(extra)
    unknown = set(settings) - set(LIST_KEYS) - set(SCALAR_KEYS) - {"set", "attacks", "name", "description"}
    if unknown:
        raise UnknownNameError("grid key", sorted(unknown)[0], [*LIST_KEYS, *SCALAR_KEYS, "set", "attacks"])
    check_types(settings)
    for key in ("methods", "datasets"):
        if not settings.get(key):
            raise FairbenchError(f"the grid names no {key}")
    return settings


INT_KEYS = ("epochs", "batch_size", "train_per_class", "eval_per_class", "eval_last", "hot_start_epochs")
NUMBER_KEYS = ("lr", "weight_decay")
TEXT_KEYS = ("schedule", "protocol", "name", "description")


def check_types(settings: dict[str, Any]) -> None:
    """Every grid value of the type its key needs (TOML lets `epochs = "abc"` or `methods = "trades"` through)."""
    def fail(key: str, wanted: str) -> None:
        raise FairbenchError(f"grid key {key} expects {wanted}, got {settings[key]!r}")

    for key in LIST_KEYS + ("attacks",):
        if key not in settings:
            continue
        value = settings[key]
        if key == "seeds":
            if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
                fail(key, "a list of integers >= 0, like [1, 2, 3]")
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(key, f'a list of names, like ["{"trades" if key == "methods" else "name"}"]')
    for key in INT_KEYS:
        if key in settings and not _is_int(settings[key]):
            fail(key, "an integer")
    for key in NUMBER_KEYS:
        if key in settings and (isinstance(settings[key], bool) or not isinstance(settings[key], (int, float))):
            fail(key, "a number")
    for key in TEXT_KEYS:
        if key in settings and not isinstance(settings[key], str):
            fail(key, "a string")
    if "eval_eps" in settings and (isinstance(settings["eval_eps"], bool)
                                   or not isinstance(settings["eval_eps"], (int, float, str))):
        fail("eval_eps", 'a number or a fraction like "8/255"')
    if not isinstance(settings.get("set", {}), dict):
        fail("set", "a table of method hyperparameters")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def grid_name(config: dict[str, Any], scale: str | None) -> str:
    """The grid's name for plan files and job names: [grid] name, with the scale appended."""
    name = str(config.get("grid", {}).get("name", "grid"))
    return f"{name}-{scale}" if scale else name


def grid_specs(config: dict[str, Any], scale: str | None = None, **common: Any) -> list[RunSpec]:
    """One RunSpec per (dataset, arch, method, seed); `common` adds run options (data_dir, device...)."""
    s = grid_settings(config, scale)
    overrides = {str(k): str(v) for k, v in s.get("set", {}).items()}
    check_overrides(overrides, list(s["methods"]))
    scalars = {k: s[k] for k in SCALAR_KEYS if k in s}
    if "eval_eps" in scalars:
        scalars["eval_eps"] = parse_number(str(scalars["eval_eps"]))
    attacks = tuple(s.get("attacks", ["pgd20"]))
    return [RunSpec(method=m, dataset=d, seed=seed, arch=a, overrides=overrides, attacks=attacks,
                    **scalars, **common)
            for d, a, m, seed in product(s["datasets"], s.get("archs", [None]), s["methods"], s.get("seeds", [1]))]
