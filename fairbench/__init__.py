"""fairbench: a pluggable benchmark suite for adversarial fairness."""

__version__ = "0.1.0"
