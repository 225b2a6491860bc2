"""Method registry: `@register_method` for built-ins, lazy entry points for external packages.

Built-ins are the modules of `fairbench.methods`; external packages declare an entry point in the
group ``fairbench.methods`` (``name = "pkg.module:Class"``). Entry points are only *listed* at start-up
and imported when a run asks for that name, so a broken plugin breaks only the runs that use it.
Built-ins win a name clash (the plugin is skipped with a warning).
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Callable

from fairbench import __version__
from fairbench.errors import FairbenchError, UnknownNameError

if TYPE_CHECKING:
    from fairbench.method import FairAT

ENTRY_POINT_GROUP = "fairbench.methods"

_BUILTINS: dict[str, type["FairAT"]] = {}
_LOCAL: dict[str, type["FairAT"]] = {}
_builtins_loaded = False


@dataclass(frozen=True)
class MethodSource:
    """Where a method comes from; written into every result row for provenance."""

    package: str
    version: str


def register_method(name: str) -> Callable[[type["FairAT"]], type["FairAT"]]:
    """Class decorator: make a `FairAT` subclass available under `name`."""

    def wrap(cls: type["FairAT"]) -> type["FairAT"]:
        cls.name = name
        module = cls.__module__
        table = _BUILTINS if module.startswith("fairbench.") else _LOCAL
        existing = table.get(name)
        if existing is not None and existing is not cls:
            raise FairbenchError(f"method {name!r} is registered twice ({existing.__module__} and {module})")
        table[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import fairbench.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def _external_entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _BUILTINS:
            dist = ep.dist.name if ep.dist else "?"
            warnings.warn(f"plugin method {ep.name!r} from {dist} clashes with a built-in and is skipped")
            continue
        if ep.name in found and found[ep.name].value != ep.value:
            a = found[ep.name].dist.name if found[ep.name].dist else "?"
            b = ep.dist.name if ep.dist else "?"
            raise FairbenchError(f"method {ep.name!r} is claimed by two plugins: {a} and {b}; uninstall one")
        found[ep.name] = ep
    return found


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import local modules (``--plugins``/``FAIRBENCH_PLUGINS``) so their decorators register methods."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as err:
            raise FairbenchError(f"cannot import plugin module {mod!r}: {err}") from err


def list_methods() -> list[str]:
    _load_builtins()
    return sorted(set(_BUILTINS) | set(_LOCAL) | set(_external_entry_points()))


def method_source(name: str) -> MethodSource:
    _load_builtins()
    if name in _BUILTINS:
        return MethodSource("fairbench", __version__)
    if name in _LOCAL:
        return MethodSource(f"local:{_LOCAL[name].__module__}", "")
    ep = _external_entry_points().get(name)
    if ep is None:
        raise UnknownNameError("method", name, list_methods())
    return MethodSource(ep.dist.name if ep.dist else ep.module, ep.dist.version if ep.dist else "")


def get_method_class(name: str) -> type["FairAT"]:
    """The class registered under `name`; imports an external plugin only now."""
    from fairbench.method import FairAT

    _load_builtins()
    if name in _BUILTINS:
        return _BUILTINS[name]
    if name in _LOCAL:
        return _LOCAL[name]
    ep = _external_entry_points().get(name)
    if ep is None:
        raise UnknownNameError("method", name, list_methods())
    try:
        cls = ep.load()
    except Exception as err:  # a broken plugin: say which distribution to fix
        dist = ep.dist.name if ep.dist else ep.value
        raise FairbenchError(f"plugin method {name!r} from {dist} failed to import: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, FairAT)):
        raise FairbenchError(f"entry point {name!r} ({ep.value}) is not a FairAT subclass")
    cls.name = name
    return cls
