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

Every RunSpec field is a key (its name, or the plural of a listed one: methods, datasets, archs, seeds; `set`
for the method hyperparameters), except the machine's: data_dir, device, amp and channels_last come from the
command line (`fairbench.runspec.OPTIONS`). Runs are keyed by a hash of their resolved configuration, so
re-running a grid skips finished runs.
"""
from __future__ import annotations

import dataclasses
import tomllib
from itertools import product
from pathlib import Path
from typing import Any

from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.overrides import parse_number
from fairbench.runspec import RunOption, axes, from_grid, grid_options, required_axes
from fairbench.spec import RunSpec, check_overrides

TEXT_KEYS = ("name", "description")
"""Keys that describe the grid, not its runs."""


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
    keys = grid_options()
    unknown = set(settings) - set(keys) - set(TEXT_KEYS)
    if unknown:
        raise UnknownNameError("grid key", sorted(unknown)[0], list(keys))
    check_types(settings)
    for key in (o.grid_key for o in required_axes()):
        if not settings.get(key):
            raise FairbenchError(f"the grid names no {key}")
    return settings


def check_types(settings: dict[str, Any]) -> None:
    """Every grid value of the type its key needs (TOML lets `epochs = "abc"` or `methods = "trades"` through)."""
    keys = grid_options()
    for key, value in settings.items():
        if key in TEXT_KEYS:
            wanted = None if isinstance(value, str) else "a string"
        else:
            wanted = _type_error(keys[key], value) if key in keys else None
        if wanted:
            raise FairbenchError(f"grid key {key} expects {wanted}, got {value!r}")


def _type_error(option: RunOption, value: Any) -> str | None:
    """What a grid value of `option` should have been, or None if it is of the right type."""
    if option.axis and option.kind is int:
        ok = isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)
        return None if ok else "a list of integers >= 0, like [1, 2, 3]"
    if option.axis or option.kind is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else f'a list of names, like ["{"trades" if option.name == "method" else "name"}"]'
    wanted = {int: "an integer", float: 'a number or a fraction like "8/255"', bool: "true or false",
              str: "a string", dict: "a table of method hyperparameters"}[option.kind]
    return None if _is_type(value, option.kind) else wanted


def _is_type(value: Any, kind: type) -> bool:
    """A TOML value of a field's kind: no bool for a number; a float may be written as "8/255"."""
    if isinstance(value, bool) and kind is not bool:
        return False
    if kind is float:
        return isinstance(value, (int, float)) or isinstance(value, str) and _is_fraction(value)
    return isinstance(value, kind)


def _is_fraction(text: str) -> bool:
    try:
        parse_number(text)
    except FairbenchError:
        return False
    return True


def with_replaced(settings: dict[str, Any], replace: dict[str, Any]) -> dict[str, Any]:
    """`settings` with the keys of `replace` replaced; its `set` table merged into the grid's (whose
    `method.key` entries go with their method when `replace` picks other methods)."""
    out = {**settings, **{k: v for k, v in replace.items() if k != "set"}}
    kept = {k: v for k, v in settings.get("set", {}).items()
            if "methods" not in replace or "." not in k or k.rpartition(".")[0] in replace["methods"]}
    out["set"] = {**kept, **replace.get("set", {})}
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def grid_name(config: dict[str, Any], scale: str | None) -> str:
    """The grid's name for plan files and job names: [grid] name, with the scale appended."""
    name = str(config.get("grid", {}).get("name", "grid"))
    return f"{name}-{scale}" if scale else name


def grid_specs(config: dict[str, Any], scale: str | None = None, replace: dict[str, Any] | None = None,
               **common: Any) -> list[RunSpec]:
    """One RunSpec per (dataset, arch, method, seed); `replace` overrides grid keys after the scale (the
    command line's grid options; its `set` is merged into the grid's), `common` adds run options (data_dir,
    device...)."""
    s = with_replaced(grid_settings(config, scale), replace or {})
    return run_specs({o.name: from_grid(o, s[key]) for key, o in grid_options().items() if key in s} | common)


def run_specs(values: dict[str, Any]) -> list[RunSpec]:
    """One RunSpec per combination of the axes' lists (dataset, arch, method, seed; a missing axis holds the
    field's default), every other field as given; method hyperparameters checked against the methods."""
    check_overrides(values.get("overrides", {}), list(values["method"]))
    defaults = {f.name: f.default for f in dataclasses.fields(RunSpec)}
    loops = [o.name for o in axes()]
    fixed = {k: v for k, v in values.items() if k not in loops}
    return [RunSpec(**fixed, **dict(zip(loops, combo)))
            for combo in product(*(values.get(name, [defaults[name]]) for name in loops))]
