"""Learning-rate schedules of the protocols, by epoch (1-indexed)."""
from __future__ import annotations

import pytest

from fairbench.errors import UnknownNameError
from fairbench.schedules import lr_factor


def factors(name: str, epochs: int) -> list[float]:
    return [lr_factor(name, e, epochs) for e in range(1, epochs + 1)]


def test_bag_of_tricks_matches_the_trix_and_dafa_protocols():
    f = factors("bag_of_tricks", 150)
    assert set(f[:139]) == {1.0} and set(f[139:144]) == {0.1} and set(f[144:]) == {0.01}
    f = factors("bag_of_tricks", 110)
    assert set(f[:99]) == {1.0} and set(f[99:104]) == {0.1} and set(f[104:]) == {0.01}


def test_bag_of_tricks_keeps_short_runs_trainable():
    assert factors("bag_of_tricks", 20)[9:11] == [0.1, 0.1] and factors("bag_of_tricks", 20)[8] == 1.0
    assert factors("bag_of_tricks", 6) == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_trades_madry_constant_and_unknown():
    f = factors("trades", 100)
    assert (f[73], f[74], f[89], f[99]) == (1.0, 0.1, 0.01, 0.001)
    f = factors("madry", 200)
    assert (f[99], f[100], f[149], f[150]) == (1.0, 0.1, 0.1, 0.01)
    assert set(factors("constant", 40)) == {1.0}
    with pytest.raises(UnknownNameError, match="bag_of_tricks"):
        lr_factor("step", 1, 10)
