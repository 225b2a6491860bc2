"""The run id names the resolved configuration: a changed method hyperparameter (`--set beta=3`) is another run,
never a finished one skipped by mistake, and an unchanged value is the same run."""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from fairbench.overrides import field_types
from fairbench.registry import get_method_class, list_methods
from fairbench.spec import RunSpec, resolve
from tests.conftest import run_cli


def _plan(capsys, tmp_path, *sets: str) -> dict[str, str]:
    """method -> run id of `fairbench plan --methods trades,dafa --dataset digits [--set ...]`."""
    args = ["plan", "--methods", "trades,dafa", "--dataset", "digits", "--format", "json", "--out", str(tmp_path)]
    for s in sets:
        args += ["--set", s]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return {task["args"]["spec"]["method"]: task["run_id"] for task in json.loads(out)}


def test_set_beta_changes_the_run_id_through_the_command_line(capsys, tmp_path):
    plain = _plan(capsys, tmp_path)
    beta3 = _plan(capsys, tmp_path, "beta=3")
    assert beta3["trades"] != plain["trades"] and beta3["dafa"] != plain["dafa"]
    scoped = _plan(capsys, tmp_path, "dafa.beta=3")  # only DAFA's beta
    assert scoped["dafa"] == beta3["dafa"] and scoped["trades"] == plain["trades"]
    assert _plan(capsys, tmp_path, "beta=6") == plain  # the default value: the same runs
    assert _plan(capsys, tmp_path, "beta=3.0") == beta3  # the value counts, not its spelling


def _other_value(value: typing.Any, annotation: typing.Any) -> str:
    """A valid value of the field's type different from `value`, as `--set` would pass it."""
    if typing.get_origin(annotation) is typing.Literal:
        return next(str(c) for c in typing.get_args(annotation) if c != value)
    if annotation is bool:
        return str(not value).lower()
    if annotation is int:
        return str(value + 1)
    return repr(value * 2 + 1)


HYPERPARAMETERS = [(m, f.name) for m in list_methods() for f in dataclasses.fields(get_method_class(m).Config)]


@pytest.mark.parametrize("method, name", HYPERPARAMETERS, ids=[f"{m}.{n}" for m, n in HYPERPARAMETERS])
def test_every_method_hyperparameter_is_part_of_the_run_id(method, name):
    base = resolve(RunSpec(method=method, dataset="digits"))
    value = _other_value(getattr(base.method_config, name), field_types(type(base.method_config))[name])
    changed = resolve(RunSpec(method=method, dataset="digits", overrides={name: value}))
    assert getattr(changed.method_config, name) != getattr(base.method_config, name)
    assert changed.run_id != base.run_id
    assert changed.protocol_id == base.protocol_id  # still compared with the same baseline
