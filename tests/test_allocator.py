"""fairbench.allocator: the CPU shards' freed memory stays in the process (far fewer page faults), and a
user's own allocator choice is left alone."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")

# FAB-T (10 steps, 9 targets side by side) on 200 digits images in 2 CPU shards, with the evaluator's
# allocator setting or with it switched off; prints whether it was on and the page faults of the evaluation
PROBE = """
import resource, sys
import torch
import fairbench.evaluation as evaluate
from fairbench.allocator import keep_freed_memory
from fairbench.attacks.fab import FAB
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit
from tests.attack_fixtures import trained_digits_model
if sys.argv[1] == "off":
    evaluate.keep_freed_memory = lambda: False
model = trained_digits_model(epochs=1)
split = DeviceSplit.from_arrays(load_dataset("digits").test, torch.device("cpu")).subset(torch.arange(200))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
evaluate.evaluate_split(model, split, [FAB(0.01, steps=10)], 0.01, batch_size=200, workers=2)
print(keep_freed_memory() if sys.argv[1] == "on" else False, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_python(code: str, *args: str, **env: str) -> list[str]:
    """stdout words of `code` in a fresh interpreter without the caller's allocator settings, plus `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    root = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-c", code, *args], env={**clean, **env, "PYTHONPATH": root},
                          capture_output=True, text=True, check=True, cwd=root).stdout.split()


def probe(mode: str) -> tuple[bool, int]:
    out = run_python(PROBE, mode)
    return out[0] == "True", int(out[1])


def test_shards_keep_freed_memory_instead_of_faulting_it_in_again():
    kept, faults_kept = probe("on")
    if not kept:
        pytest.skip("not glibc: mallopt is unavailable")
    _, faults_off = probe("off")
    assert faults_kept * 3 < faults_off


def test_user_allocator_settings_are_respected():
    ask = "from fairbench.allocator import keep_freed_memory; print(keep_freed_memory())"
    if run_python(ask) != ["True"]:
        pytest.skip("not glibc: mallopt is unavailable")
    assert run_python(ask, MALLOC_TRIM_THRESHOLD_="131072") == ["False"]
    assert run_python(ask, LD_PRELOAD="libjemalloc.so.2") == ["False"]
