"""The config fields of the TRADES adversary and loss, shared by the TRADES-family methods.

`trades`, `dafa`, `trix` and `targeted-trades` each write their own `training_loss` from the blocks of
`fairbench/adversaries.py` (start point -> clean logits -> inner attack -> TRADES loss); what they share
besides those blocks is this config base. Their own options (DAFA's class weights, TRIX's split) are added by
their Config classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fairbench.adversaries import ForwardOrder


@dataclass(frozen=True)
class TradesConfig:
    beta: float = 6.0
    """Weight of the KL (robustness) term."""
    eps: float = 0.031
    """L-inf training radius; the TRADES/DAFA/TRIX code uses 0.031 (set 8/255 for the CFA/FRL convention)."""
    alpha: float = 0.007
    """Step size of the inner attack (0.007 in the code; 2/255 in the CFA/FRL convention)."""
    steps: int = 10
    """Inner attack steps K."""
    init: Literal["normal", "uniform"] = "normal"
    """Attack start: x + 0.001 N(0,1), unclamped (official) or uniform in the ball."""
    forward_order: ForwardOrder = "adversarial_first"
    """Train-mode forwards of the loss: adversarial batch first (the DAFA/TRIX code, TRADES baseline included)
    or clean first (fairbench before this option). The step's loss and gradients do not depend on it, BatchNorm's
    running statistics (used by the eval-mode attacks of later batches and by evaluation) do."""
