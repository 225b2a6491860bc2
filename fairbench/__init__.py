"""fairbench: a pluggable benchmark suite for adversarial fairness."""

__version__ = "0.1.0"
DISTRIBUTION = "fairbench-at"
"""The name to pip-install: `fairbench` on PyPI is an unrelated project; the import package and the command
are `fairbench`."""

API = ("train", "evaluate", "load_model", "load_results", "fairness_table", "statistics_table")
"""The Python API (`fairbench.api`), loaded on first use: `import fairbench` stays light (no torch) for
the reporting modules."""


def __getattr__(name: str):
    if name in API:
        from fairbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'fairbench' has no attribute {name!r}")
