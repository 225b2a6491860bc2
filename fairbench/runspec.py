"""What one run asks for (`RunSpec`), and how each of its fields is given: an option of `fairbench run` and
`fairbench plan`, and a key of a grid config. Both are derived from the field (its name, type, default and
docstring, which is the help text); `OPTIONS` holds the exceptions. A new field therefore appears in
`fairbench run --help`, on the command line and in grid configs without further edits.

Torch-free, so the command line builds its options without importing the training stack; `fairbench.spec`
resolves a RunSpec into a concrete run.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fairbench.errors import FairbenchError
from fairbench.overrides import ATTACK_PRECISIONS, field_docs, parse_number


@dataclass(frozen=True)
class RunSpec:
    method: str
    """The method to train (see `fairbench methods`); a grid names several, comma-separated (trades,dafa,trix),
    one run each."""
    dataset: str
    """The dataset (see `fairbench datasets`); a grid config may list several."""
    seed: int = 1
    """Random seed: a count (5 -> seeds 1..5) or a list (1,3,7; one chosen seed: 2,), one run each."""
    arch: str | None = None
    """Model (see `fairbench archs`); default: the dataset's (resnet18 for CIFAR/STL/Tiny-ImageNet, smallcnn for
    digits)."""
    epochs: int | None = None
    """Training epochs; default: the dataset's (150 for CIFAR/STL-10, 20 for digits)."""
    batch_size: int | None = None
    """Training batch size; default: the dataset's."""
    lr: float | None = None
    """SGD learning rate; default: the protocol's (0.1)."""
    momentum: float | None = None
    """SGD momentum; default: the protocol's (0.9)."""
    nesterov: bool | None = None
    """Nesterov momentum; default: the protocol's (on)."""
    weight_decay: float | None = None
    """Weight decay; default: the protocol's (5e-4)."""
    schedule: str | None = None
    """Learning-rate schedule; default: the protocol's (bag_of_tricks, as DAFA/TRIX)."""
    protocol: str = "common"
    """common: the TRADES protocol of DAFA/TRIX (SGD 0.1, momentum 0.9, Nesterov, wd 5e-4, bag_of_tricks) for every
    method; official: each method's own code."""
    init_from: str | None = None
    """Start from the model weights of this checkpoint file or run folder (e.g. FRL's hot start)."""
    hot_start_epochs: int | None = None
    """Epochs of the hot-start run a method asks for (FRL starts from TRADES); default: the dataset's."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Method hyperparameter, e.g. --set warmup=5, --set trix.beta=6, --set eps=8/255 (a bare key sets every
    selected method that has it; a grid config's [grid.set] table)."""
    train_per_class: int | None = None
    """Train on the first N images of each class (small-scale runs); default: all."""
    eval_per_class: int | None = None
    """Evaluate on the first N test images of each class; default: the whole test set."""
    attacks: tuple[str, ...] = ("pgd20",)
    """Evaluation attacks, comma-separated (see `fairbench attacks`)."""
    eval_eps: float = 8 / 255
    """Evaluation L-inf radius (0.031 or 8/255)."""
    eval_last: int = 5
    """Evaluate the last k checkpoints (the paper averages over the last 5 epochs)."""
    eval_batch_size: int = 256
    """Batch size of the evaluation attacks."""
    attack_precision: str = "auto"
    """Precision attacks search in (verdicts are always strict fp32): auto = TF32 on CUDA, fp32 on CPU; bf16 is
    faster and opt-in (check it first with `fairbench ab-check`, docs/evaluation.md §12)."""
    data_dir: str | None = None
    """Dataset root; default: $FAIRBENCH_DATA or ./data."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    amp: bool | None = None
    """bf16 autocast for training; default: on with CUDA, off on CPU."""
    channels_last: bool | None = None
    """Channels-last memory format for training; default: on with CUDA."""
    track: str | None = None
    """Log every epoch to an experiment tracker: tensorboard, wandb (offline) or mlflow (local files), under
    OUT/<tracker>/; off by default (history.parquet is always written). Not part of the run id."""
    track_every: int | None = None
    """Every N epochs (and at the last), class-wise clean and PGD-20 accuracy on the first 20 test images of each
    class, in history.parquet and the tracker; off by default. Not part of the run id."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (plan files, run.json); `from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        data = dict(data)
        data["attacks"] = tuple(data.get("attacks", ("pgd20",)))
        return cls(**data)


PROTOCOLS: tuple[str, ...] = ("common", "official")
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")


class _FieldDefault:
    """`RunOption.default` left at this: the command line's default is the field's."""

    def __repr__(self) -> str:
        return "FIELD_DEFAULT"


FIELD_DEFAULT: Any = _FieldDefault()


# ------------------------------------------------------------------------------- values as written

def names(text: str | None) -> list[str]:
    """'trades, dafa' -> ['trades', 'dafa']."""
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def parse_seeds(text: str) -> list[int]:
    """'5' -> seeds 1..5; '0,3,7' -> exactly those seeds."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
            if not seeds or min(seeds) < 0:
                raise FairbenchError(f"--seeds: seeds are integers >= 0 (1,3,7 or one seed as 2,), got {text!r}")
            return seeds
        count = int(text)
    except ValueError as err:
        raise FairbenchError(f"--seeds expects a count (5) or a list (1,3,7), got {text!r}") from err
    if count < 1:
        raise FairbenchError("--seeds must be at least 1")
    return list(range(1, count + 1))


def parse_sets(values: Sequence[str]) -> dict[str, str]:
    """('warmup=5', 'trix.beta=6') -> {'warmup': '5', 'trix.beta': '6'}."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FairbenchError(f"--set expects key=value (e.g. --set warmup=5 or --set trix.beta=6), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _dataset_names() -> list[str]:
    from fairbench.data import DATASETS

    return sorted(DATASETS)


def _schedule_names() -> list[str]:
    from fairbench.schedules import SCHEDULES

    return list(SCHEDULES)


# ------------------------------------------------------------------------------------- the options

@dataclass(frozen=True)
class RunOption:
    """How one RunSpec field is given on the command line and in a grid config. An entry of `OPTIONS` sets only
    what differs from the field; `run_options` fills in the rest: flag --<field-name>, grid key <field-name>,
    `kind` from the field's type, the field's default, and its docstring as `help`."""
    flag: str = ""
    short: str = ""
    default: Any = FIELD_DEFAULT
    """The command line's default where it differs from the field's (a text as the user writes it: "8/255")."""
    grid_key: str = ""
    scope: str = "grid"
    """grid: an option and a grid key; machine: an option only, given to every run of a grid (where data and
    devices are on this machine)."""
    axis: int = 0
    """k > 0: the grid lists values, one run each; loops nest in order of k (1 outermost)."""
    parse: Callable[[Any], Any] | None = None
    """The command line's value -> the field's (a list for an axis; default: as given, numbers parsed)."""
    multiple: bool = False
    metavar: str | None = None
    choices: Sequence[str] | Callable[[], Sequence[str]] = ()
    """A tuple: the command line refuses other values. A callable: names from a registry, looked up only
    when the help is shown (the run itself refuses an unknown name, with the registry's message)."""
    name: str = ""
    kind: type = str
    """int, float, bool, str, tuple (a comma-separated list) or dict (KEY=VALUE options)."""
    help: str = ""


OPTIONS: dict[str, RunOption] = {
    "method": RunOption(flag="--methods", short="-m", grid_key="methods", axis=3, default=None, parse=names),
    "dataset": RunOption(short="-d", grid_key="datasets", axis=1, default="digits", choices=_dataset_names),
    "seed": RunOption(flag="--seeds", grid_key="seeds", axis=4, default="1", parse=parse_seeds),
    "arch": RunOption(grid_key="archs", axis=2),
    "schedule": RunOption(choices=_schedule_names),
    "protocol": RunOption(choices=PROTOCOLS),
    "overrides": RunOption(flag="--set", grid_key="set", multiple=True, metavar="KEY=VALUE", parse=parse_sets),
    "attacks": RunOption(flag="--attack"),
    "eval_eps": RunOption(flag="--eps", default="8/255"),
    "attack_precision": RunOption(choices=ATTACK_PRECISIONS),
    "data_dir": RunOption(scope="machine"),
    "device": RunOption(scope="machine"),
    "amp": RunOption(scope="machine"),
    "channels_last": RunOption(scope="machine"),
    "track": RunOption(scope="machine", choices=TRACKERS),
    "track_every": RunOption(scope="machine"),
}
"""The exceptions: every RunSpec field not named here is `--<field-name>` and grid key `<field-name>`."""


@functools.cache
def run_options() -> tuple[RunOption, ...]:
    """One RunOption per RunSpec field, in field order, everything derivable derived."""
    hints, docs = typing.get_type_hints(RunSpec), field_docs(RunSpec)
    return tuple(_complete(f, OPTIONS.get(f.name, RunOption()), _kind(hints[f.name]), docs.get(f.name, ""))
                 for f in dataclasses.fields(RunSpec))


def _complete(f: dataclasses.Field, option: RunOption, kind: type, doc: str) -> RunOption:
    """`option` with what it leaves out taken from the field."""
    default = option.default
    if default is FIELD_DEFAULT:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = ",".join(default) if kind is tuple else (() if kind is dict else default)
    return dataclasses.replace(option, name=f.name, kind=kind, help=" ".join(doc.split()), default=default,
                               flag=option.flag or "--" + f.name.replace("_", "-"),
                               grid_key="" if option.scope == "machine" else option.grid_key or f.name)


def _kind(hint: Any) -> type:
    """int for `int | None`, tuple for `tuple[str, ...]`, ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def run_option(name: str) -> RunOption:
    """The option of RunSpec field `name`."""
    return next(o for o in run_options() if o.name == name)


def grid_options() -> dict[str, RunOption]:
    """Grid key -> option, for the fields a grid config may set."""
    return {o.grid_key: o for o in run_options() if o.grid_key}


def axes() -> list[RunOption]:
    """The fields a grid lists values of (dataset, arch, method, seed), outer loop first."""
    return sorted((o for o in run_options() if o.axis), key=lambda o: o.axis)


def required_axes() -> list[RunOption]:
    """Axes without a default (method, dataset): a grid must name them."""
    fields = {f.name: f for f in dataclasses.fields(RunSpec)}
    return [o for o in axes() if fields[o.name].default is dataclasses.MISSING]


def from_command_line(option: RunOption, value: Any) -> Any:
    """The field value of an option's command-line value (a list for an axis)."""
    if option.parse:
        return option.parse(value)
    if option.axis:
        return [value]
    if option.kind is float and isinstance(value, str):
        return parse_number(value)
    return tuple(names(value)) if option.kind is tuple else value


def from_grid(option: RunOption, value: Any) -> Any:
    """The field value of a (type-checked) grid config value; numbers stay as written (1 is not 1.0 in a run
    id), fractions like "8/255" become floats."""
    if option.kind is float and isinstance(value, str):
        return parse_number(value)
    if option.kind is tuple:
        return tuple(value)
    if option.kind is dict:
        return {str(k): str(v) for k, v in value.items()}
    return value
