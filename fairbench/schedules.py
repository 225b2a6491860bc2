"""Learning-rate schedules of the method specs, as functions of the 1-indexed epoch."""
from __future__ import annotations

import math
from typing import Callable

from fairbench.errors import UnknownNameError


def bag_of_tricks(epoch: int, epochs: int) -> float:
    """DAFA/TRIX protocol: x1, then x0.1 from epoch E-10, x0.01 from E-5 (E=150: 0.1 / 0.01 at 140 / 0.001 at 145;
    E=110: 100 / 105). Runs shorter than 20 epochs keep the decays to the last half and last quarter
    (E=6: 0.1 for epochs 1-2, 0.01 for 3-4, 0.001 for 5-6), so a small-scale run still trains."""
    if epoch >= max(epochs - 5, math.ceil(0.75 * epochs)):
        return 0.01
    if epoch >= max(epochs - 10, math.ceil(0.5 * epochs)):
        return 0.1
    return 1.0


def trades(epoch: int, epochs: int) -> float:
    """TRADES/WAT code: x0.1 at 75, x0.01 at 90, x0.001 at 100. Runs shorter than 76 epochs scale the
    milestones by E/100 so a small-scale run keeps the shape."""
    scale = 1.0 if epochs >= 76 else epochs / 100
    passed = sum(epoch >= math.ceil(milestone * scale) for milestone in (75, 90, 100))
    return (1.0, 0.1, 0.01, 0.001)[passed]


def madry(epoch: int, epochs: int) -> float:
    """PGD-AT / CFA / BAT-style 100-150-200: x0.1 from 50% of the epochs, x0.01 from 75%."""
    if epoch > 0.75 * epochs:
        return 0.01
    if epoch > 0.5 * epochs:
        return 0.1
    return 1.0


def cosine(epoch: int, epochs: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def constant(epoch: int, epochs: int) -> float:
    """FRL's fine-tuning stage (its MultiStep milestones 40/80 lie beyond its 40 epochs)."""
    return 1.0


SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "bag_of_tricks": bag_of_tricks, "trades": trades, "madry": madry, "cosine": cosine, "constant": constant,
}


def lr_factor(name: str, epoch: int, epochs: int) -> float:
    if name not in SCHEDULES:
        raise UnknownNameError("schedule", name, list(SCHEDULES))
    return SCHEDULES[name](epoch, epochs)
