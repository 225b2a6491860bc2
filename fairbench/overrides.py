"""Typed overrides of dataclass configs (`--set key=value`, parsed into the field types) and the attribute docstrings
that document the fields, so every hyperparameter is reachable and described."""
from __future__ import annotations

import dataclasses
import types
import typing
from fractions import Fraction
from typing import Any

from fairbench.errors import FairbenchError, UnknownNameError


def parse_number(text: str) -> float:
    """Accepts '0.031', '8/255' and '2e-3'; radii are usually written as fractions of 255."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as err:
        raise FairbenchError(f"{text!r} is not a number (examples: 0.031, 8/255)") from err


def _convert(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null", "auto", ""):
            return None
        return _convert(text, args[0], key)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if text not in choices:
            raise UnknownNameError(f"value for {key}", text, [str(c) for c in choices])
        return text
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise FairbenchError(f"{key} expects true/false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError as err:
            raise FairbenchError(f"{key} expects an integer, got {text!r}") from err
    if annotation is float:
        return parse_number(text)
    return text


def field_types(config_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def apply_overrides(config: Any, overrides: dict[str, Any], owner: str) -> Any:
    """A copy of `config` with `overrides` applied; strings are converted to the field's type."""
    types_ = field_types(type(config))
    values = {}
    for key, raw in overrides.items():
        if key not in types_:
            raise UnknownNameError(f"option of {owner}", key, list(types_))
        value = _convert(raw, types_[key], key) if isinstance(raw, str) else raw
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
            raise FairbenchError(f"--set {key}={raw}: {owner}'s {key} is a radius, step, weight or count and "
                                 f"must be >= 0")
        values[key] = value
    return dataclasses.replace(config, **values)


def field_docs(config_cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field), used by `fairbench methods`."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(config_cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value).strip()
    return docs


ATTACK_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "tf32", "bf16")
