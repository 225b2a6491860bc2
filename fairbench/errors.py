"""User-facing errors: the command line prints their message (which says what to do) without a traceback."""
from __future__ import annotations


class FairbenchError(Exception):
    """Base class of errors caused by input the user can fix."""


class UnknownNameError(FairbenchError, KeyError):
    """An unknown method, dataset, arch, attack or option; the message lists the valid choices."""

    def __init__(self, kind: str, name: str, choices: list[str] | tuple[str, ...]):
        self.kind, self.name, self.choices = kind, name, sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(self.choices)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class CheckpointError(FairbenchError):
    """A checkpoint that is corrupted or belongs to a different run; nothing is overwritten."""


class NonFiniteLossError(FairbenchError):
    """Training produced NaN/inf; the message names epoch and batch, the last good checkpoint is kept."""


class ClassCountError(FairbenchError, ValueError):
    """An attack component needs more classes than the model has."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first line, cut at `limit` (a state-dict mismatch lists kilobytes of keys)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."
