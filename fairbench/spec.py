"""What one run is: `RunSpec` (what the user asked for, declared in `fairbench.runspec`) resolved into
`ResolvedRun` (every value concrete).

The run id carries a hash of the resolved configuration, so re-running a grid finds finished runs,
and the protocol hash groups runs that rho may compare (same data, model and optimisation).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fairbench.data import DatasetInfo, get_dataset_info
from fairbench.errors import FairbenchError, UnknownNameError
from fairbench.method import FairAT
from fairbench.models import MODELS
from fairbench.overrides import apply_overrides
from fairbench.registry import get_method_class, method_source
from fairbench.runspec import PROTOCOLS, RunSpec, run_option
from fairbench.schedules import SCHEDULES

COMMON_PROTOCOL: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                                   "schedule": "bag_of_tricks"}
"""The optimisation every method runs under by default (DAFA/TRIX TRADES protocol)."""
PROTOCOL_KEYS = ("arch", "epochs", "batch_size", *COMMON_PROTOCOL)


@dataclass(frozen=True)
class ResolvedRun:
    spec: RunSpec
    arch: str
    epochs: int
    batch_size: int
    method_config: Any
    method_cls: type[FairAT]
    optim: dict[str, Any] = field(default_factory=lambda: dict(COMMON_PROTOCOL))
    """lr, momentum, nesterov, weight_decay, schedule: resolved from the protocol and explicit options."""

    @property
    def protocol(self) -> dict[str, Any]:
        s = self.spec
        return {"dataset": s.dataset, "arch": self.arch, "epochs": self.epochs, "batch_size": self.batch_size,
                **self.optim, "train_per_class": s.train_per_class, "init_from": _init_key(s.init_from)}

    @property
    def protocol_id(self) -> str:
        """Groups runs that rho may compare. A hot-started method (FRL fine-tunes a TRADES model) belongs to
        the protocol of the run it starts from: that TRADES run is its baseline."""
        if self.method_cls.hot_start:
            return resolve(hot_start_base(self.spec)).protocol_id
        return _digest(self.protocol)

    def as_dict(self) -> dict[str, Any]:
        spec = dataclasses.asdict(self.spec)
        for watching_only in ("data_dir", "device", "overrides", "track", "track_every"):
            spec.pop(watching_only)  # where and how a run is watched, not what it computes
        if spec["attack_precision"] == "auto":
            spec.pop("attack_precision")  # the default leaves run ids as they were before the option existed
        spec["init_from"] = _init_key(self.spec.init_from)
        if not self.method_cls.hot_start:
            spec.pop("hot_start_epochs")  # meaningless for methods without a hot start: same run either way
        return {**spec, "arch": self.arch, "epochs": self.epochs, "batch_size": self.batch_size, **self.optim,
                "method_config": dataclasses.asdict(self.method_config)}

    @property
    def config_hash(self) -> str:
        return _digest(self.as_dict())

    @property
    def run_id(self) -> str:
        return f"{self.spec.method}_{self.spec.dataset}_{self.arch}_s{self.spec.seed}_{self.config_hash}"


def _init_key(init_from: str | None) -> str | None:
    """Identify a start checkpoint by its run folder and file name, not the absolute path."""
    if not init_from:
        return None
    from pathlib import Path

    p = Path(init_from)
    return f"{p.parent.parent.name}/{p.name}" if p.suffix == ".pt" else p.name


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def method_overrides(overrides: dict[str, str], method: str, config_cls: type) -> dict[str, str]:
    """The overrides that apply to `method`: ``method.key`` always, a bare ``key`` where the field exists."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    picked = {}
    for key, value in overrides.items():
        scope, _, name = key.rpartition(".")
        if scope and scope == method:
            picked[name] = value
        elif not scope and name in names:
            picked[name] = value
    return picked


def check_overrides(overrides: dict[str, str], methods: list[str]) -> None:
    """Every bare key must exist in at least one selected method, every scoped key in its method."""
    fields_by_method = {m: {f.name for f in dataclasses.fields(get_method_class(m).Config)} for m in methods}
    for key in overrides:
        scope, _, name = key.rpartition(".")
        if scope:
            if scope not in fields_by_method:
                raise FairbenchError(f"--set {key}: method {scope!r} is not among the selected methods {methods}")
            if name not in fields_by_method[scope]:
                raise UnknownNameError(f"option of {scope}", name, list(fields_by_method[scope]))
        elif not any(name in f for f in fields_by_method.values()):
            raise UnknownNameError("option", name, sorted(set().union(*fields_by_method.values())))


SPEC_LIMITS: tuple[tuple[str, float, bool], ...] = (
    # field, lower bound, bound allowed
    ("seed", 0, True), ("epochs", 1, True), ("batch_size", 1, True), ("lr", 0, False), ("momentum", 0, True),
    ("weight_decay", 0, True), ("hot_start_epochs", 1, True), ("train_per_class", 1, True),
    ("eval_per_class", 1, True), ("eval_eps", 0, True), ("eval_last", 1, True), ("eval_batch_size", 1, True),
    ("track_every", 1, True),
)
"""Values a run refuses instead of training something other than what was meant (e.g. --train-per-class 0
used to mean 'everything'); messages name the option a user sets the field with."""


def check_spec(spec: RunSpec) -> None:
    for name, low, inclusive in SPEC_LIMITS:
        value, option = getattr(spec, name), run_option(name).flag
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise FairbenchError(f"{option} expects a number, got {value!r}")
        if value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise FairbenchError(f"{option} must be {bound}, got {value:g}")


def dataset_method_defaults(info: DatasetInfo) -> dict[str, Any]:
    """Method hyperparameters a dataset sets, applied where a method has the field (before `--set`): its run
    scale's (e.g. a shorter warm-up on digits) and DAFA's weight strength `lam` (1.0 CIFAR-10, 1.5 CIFAR-100,
    STL-10, Tiny-ImageNet), which DAFA and TRIX read from their config like any other option."""
    return {**info.method_defaults, **info.defaults.method_overrides}


def resolve(spec: RunSpec) -> ResolvedRun:
    check_spec(spec)
    info = get_dataset_info(spec.dataset)
    cls = get_method_class(spec.method)
    if spec.protocol not in PROTOCOLS:
        raise UnknownNameError("protocol", spec.protocol, list(PROTOCOLS))
    chosen = {"arch": info.defaults.arch, "epochs": info.defaults.epochs, "batch_size": info.defaults.batch_size,
              **COMMON_PROTOCOL}
    if spec.protocol == "official" or cls.hot_start:
        chosen.update(cls.official_protocol)
    chosen.update({k: getattr(spec, k) for k in PROTOCOL_KEYS if getattr(spec, k) is not None})
    arch, epochs, batch = chosen.pop("arch"), chosen.pop("epochs"), chosen.pop("batch_size")
    if arch not in MODELS:
        raise UnknownNameError("arch", arch, list(MODELS))
    if chosen["schedule"] not in SCHEDULES:
        raise UnknownNameError("schedule", chosen["schedule"], list(SCHEDULES))
    for attack in spec.attacks:
        from fairbench.attacks.registry import create_attack

        if attack != "clean":
            create_attack(attack, spec.eval_eps)
    if epochs < 1 or batch < 1:
        raise FairbenchError(f"epochs and batch size must be positive (got {epochs}, {batch})")
    dataset_defaults = method_overrides(dataset_method_defaults(info), spec.method, cls.Config)
    config = apply_overrides(cls.Config(), dataset_defaults, spec.method)
    config = apply_overrides(config, method_overrides(spec.overrides, spec.method, cls.Config), spec.method)
    return ResolvedRun(spec, arch, epochs, batch, config, cls, chosen)


def hot_start_base(spec: RunSpec) -> RunSpec:
    """The run a hot-started method starts from: its `hot_start` method on the same data, arch, subset and
    seed, under the common protocol (epochs from `hot_start_epochs`, else the dataset's default), with the
    run's bare `--set` options (so `--set steps=2` is the same grid-wide; `frl.beta` stays FRL's)."""
    check_spec(spec)  # before its options become the base run's (--hot-start-epochs 0 names that option)
    cls = get_method_class(spec.method)
    shared = {k: v for k, v in spec.overrides.items() if "." not in k}  # bare keys reach the base run too
    return dataclasses.replace(spec, method=cls.hot_start, overrides=shared, protocol="common", init_from=None,
                               epochs=spec.hot_start_epochs, lr=None, momentum=None, nesterov=None,
                               weight_decay=None, schedule=None, hot_start_epochs=None)


def provenance(resolved: ResolvedRun) -> dict[str, str]:
    src = method_source(resolved.spec.method)
    return {"method_source": src.package, "method_version": src.version}
