"""The plan of a grid: its unique runs in the order they can run, each with its run id and dependencies.

A hot-started method (FRL fine-tunes a TRADES run) depends on its base run; the base is planned once,
before the first run that needs it, however many runs need it (and it is the grid's own TRADES run when
the settings agree). Entry K of a plan is what `fairbench run ... --index K` runs, so a Slurm array task,
a Kubernetes indexed job or a GNU parallel slot addresses one run by its number.

Evaluations of finished runs (`fairbench eval` over a results folder) are plans too: one task per run.
A plan is saved under `OUT/plans/` when a launcher starts, so `fairbench status` also lists the runs that
have not started yet.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairbench.checkpoint import list_checkpoints
from fairbench.errors import FairbenchError
from fairbench.lock import read_lock
from fairbench.registry import get_method_class
from fairbench.results import is_damaged, is_finished, run_dir, write_json
from fairbench.spec import RunSpec, hot_start_base, resolve

PLANS = "plans"
FAILED = "failed.json"
PROGRESS = "progress.json"


@dataclass(frozen=True)
class Task:
    """One unit of work for a launcher: train-and-evaluate one run, or evaluate one finished run."""

    index: int
    run_id: str
    kind: str
    """'train' (args: the RunSpec) or 'eval' (args: the evaluation's options)."""
    args: dict[str, Any]
    needs: tuple[str, ...] = ()
    """Run ids that must be finished first (a hot start's base)."""
    epochs: int = 0

    @property
    def spec(self) -> RunSpec:
        return RunSpec.from_dict(self.args["spec"])

    @property
    def label(self) -> str:
        if self.kind == "train":
            spec = self.args["spec"]
            return f"{spec['method']} {spec['dataset']} s{spec['seed']}"
        return f"eval {','.join(self.args['attacks'])}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "run_id": self.run_id, "kind": self.kind, "args": self.args,
                "needs": list(self.needs), "epochs": self.epochs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Task":
        return cls(int(data["index"]), str(data["run_id"]), str(data["kind"]), dict(data["args"]),
                   tuple(data.get("needs", ())), int(data.get("epochs", 0)))


@dataclass
class Plan:
    out: Path
    tasks: list[Task]
    plugins: tuple[str, ...] = ()
    name: str = "grid"
    created: float = field(default_factory=time.time)

    @property
    def plan_id(self) -> str:
        keys = json.dumps([(t.kind, t.run_id, t.args.get("attacks")) for t in self.tasks], sort_keys=True)
        return hashlib.sha256(keys.encode()).hexdigest()[:10]

    def task(self, index: int) -> Task:
        if not 0 <= index < len(self.tasks):
            raise FairbenchError(f"--index {index} is outside the plan (entries 0..{len(self.tasks) - 1}); "
                                 f"`fairbench plan` with the same options lists them")
        return self.tasks[index]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out": str(self.out), "plugins": list(self.plugins), "created": self.created,
                "tasks": [t.to_dict() for t in self.tasks]}

    def save(self) -> Path:
        """Write the plan to OUT/plans/<name>-<id>.json (the workers of a launcher read it from there)."""
        path = Path(self.out) / PLANS / f"{self.name}-{self.plan_id}.json"
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
            return cls(Path(data["out"]), [Task.from_dict(t) for t in data["tasks"]], tuple(data.get("plugins", ())),
                       str(data.get("name", "grid")), float(data.get("created", 0)))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FairbenchError(f"cannot read the plan {path} ({err}); plan the grid again") from err


def train_plan(specs: list[RunSpec], out: Path, plugins: tuple[str, ...] = (), name: str = "grid") -> Plan:
    """The unique runs of `specs` with hot-start bases added (once, before their first dependent)."""
    from fairbench.runner import hot_started

    tasks: list[Task] = []
    seen: set[str] = set()

    def add(spec: RunSpec, needs: tuple[str, ...] = ()) -> str:
        resolved = resolve(spec if not needs else hot_started(spec, out))
        if resolved.run_id not in seen:
            seen.add(resolved.run_id)
            tasks.append(Task(len(tasks), resolved.run_id, "train", {"spec": spec.to_dict()}, needs,
                              resolved.epochs))
        return resolved.run_id

    for spec in specs:
        if get_method_class(spec.method).hot_start and not spec.init_from:
            base_id = add(hot_start_base(spec))
            add(spec, (base_id,))
        else:
            add(spec)
    return Plan(Path(out), tasks, tuple(plugins), name)


def eval_plan(folders: list[Path], options: dict[str, Any], out: Path, plugins: tuple[str, ...] = ()) -> Plan:
    """One evaluation task per finished run folder; `options` are `evaluate_run`'s keyword arguments."""
    tasks = [Task(i, (folder.parent.parent if folder.suffix == ".pt" else folder).name, "eval",
                  {"folder": str(folder), **options}) for i, folder in enumerate(folders)]
    return Plan(Path(out), tasks, tuple(plugins), "eval")


def saved_tasks(out: Path) -> list[Task]:
    """The training tasks of every plan saved under `out`, newest plan first, each run once."""
    tasks: dict[str, Task] = {}
    paths = sorted((Path(out) / PLANS).glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths:
        try:
            plan = Plan.load(path)
        except FairbenchError:
            continue
        for task in plan.tasks:
            if task.kind == "train":
                tasks.setdefault(task.run_id, task)
    return list(tasks.values())


# ------------------------------------------------------------------------------------------------ state

@dataclass(frozen=True)
class RunState:
    """Where one run stands, read from its folder alone (works for any process, on any host)."""

    run_id: str
    state: str
    """done, running, failed, partial, damaged or pending."""
    epoch: int = 0
    epochs: int = 0
    detail: str = ""
    images_per_s: float | None = None
    eta_s: float | None = None
    updated: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def run_state(out: Path, run_id: str, epochs: int = 0) -> RunState:
    folder = run_dir(out, run_id)
    found = list_checkpoints(folder / "checkpoints")
    epoch = max(found) if found else 0
    progress = _read_json(folder / PROGRESS)
    epochs = epochs or int(progress.get("epochs", 0) or 0)
    holder = read_lock(folder)
    live = holder is not None and not holder.stale
    if is_damaged(folder):
        return RunState(run_id, "damaged", epoch, epochs, "classwise.parquet cannot be read; running the grid "
                        "again evaluates the run again from its checkpoints")
    if is_finished(folder):
        return RunState(run_id, "done", epochs or epoch, epochs or epoch,
                        f"{holder.purpose} on {holder.host}:{holder.pid}" if live else "",
                        updated=(folder / "classwise.parquet").stat().st_mtime)
    if live:
        speed = progress.get("images_per_s")
        return RunState(run_id, "running", int(progress.get("epoch", epoch) or epoch), epochs,
                        f"{holder.purpose} on {holder.host}:{holder.pid}, heartbeat {holder.age:.0f} s ago",
                        speed, progress.get("eta_s"), holder.heartbeat)
    failure = _read_json(folder / FAILED)
    stale = f"; stale lock of {holder.host}:{holder.pid}" if holder is not None else ""
    if failure:
        return RunState(run_id, "failed", epoch, epochs, f"{failure.get('error', '')}{stale}".strip(),
                        updated=failure.get("time"))
    if found:
        last = found[epoch].stat().st_mtime
        return RunState(run_id, "partial", epoch, epochs,
                        f"last checkpoint {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last))}{stale}",
                        updated=last)
    return RunState(run_id, "pending", 0, epochs, stale.lstrip("; "))


def run_states(out: Path) -> list[RunState]:
    """Every run under `out`: the runs of the saved plans in plan order (pending ones included), then any
    other run folder (trained without a launcher) by name."""
    planned = saved_tasks(out)
    known = {t.run_id for t in planned}
    states = [run_state(out, t.run_id, t.epochs) for t in planned]
    folders = sorted(p for p in (Path(out) / "runs").glob("*") if p.is_dir()) if (Path(out) / "runs").is_dir() else []
    states += [run_state(out, p.name) for p in folders if p.name not in known]
    return states


def failure_log(out: Path, run_id: str) -> list[str]:
    """The last lines of a failed run's log, as its launcher recorded them."""
    return list(_read_json(run_dir(out, run_id) / FAILED).get("log_tail", []))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
