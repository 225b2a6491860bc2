"""Launchers, measured in one run: a 4-run digits grid sequentially vs `--workers 2`, two plain
`fairbench run` processes side by side without thread control (why the launcher owns thread counts), and
the per-run scheduling overhead of the local pool, Slurm and Ray on runs that take almost no time.

    python benchmarks/launch_overhead.py [--epochs 8] [--slurm] [--ray]

Time it alone: another CPU-heavy process on the machine changes every number. `--slurm` needs a running
cluster (`.ci/slurm.sh up`, then `source /tmp/fairbench-slurm/env.sh`), `--ray` needs `fairbench-at[ray]`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fairbench(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fairbench.cli", *args, "-q"], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def timed(*procs: subprocess.Popen) -> float:
    t0 = time.perf_counter()
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a benchmark command failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def grid(out: Path, methods: str, seeds: str, epochs: int, per_class: int | None) -> list[str]:
    args = ["run", "--methods", methods, "--seeds", seeds, "--epochs", str(epochs), "--eval-per-class", "10",
            "--eval-last", "1", "--set", "steps=5", "--out", str(out)]
    return args + (["--train-per-class", str(per_class)] if per_class else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each run of the 4-run grid")
    parser.add_argument("--tiny-runs", type=int, default=6, help="runs of the scheduling-overhead grid")
    parser.add_argument("--slurm", action="store_true", help="also the Slurm launcher (a running cluster)")
    parser.add_argument("--ray", action="store_true", help="also the Ray launcher (a local cluster is started)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fairbench-launch-"))
    cores = os.cpu_count() or 1
    print(f"{cores} cores; 4-run digits grid (trades, dafa x seeds 1, 2), {args.epochs} epochs each, full train set")
    try:
        seq = timed(fairbench(grid(root / "seq", "trades,dafa", "2", args.epochs, None)))
        pool = timed(fairbench(grid(root / "pool", "trades,dafa", "2", args.epochs, None) + ["--workers", "2"]))
        side = timed(fairbench(grid(root / "side1", "trades,dafa", "1,", args.epochs, None)),
                     fairbench(grid(root / "side2", "trades,dafa", "2,", args.epochs, None)))
        one = {"OMP_NUM_THREADS": "1", "FAIRBENCH_THREADS": "1"}
        side1 = timed(fairbench(grid(root / "side3", "trades,dafa", "1,", args.epochs, None) + ["--threads", "1"], one),
                      fairbench(grid(root / "side4", "trades,dafa", "2,", args.epochs, None) + ["--threads", "1"], one))
        print("| way | wall | vs sequential |\n| --- | --- | --- |")
        print(f"| sequential, one process ({cores} threads) | {seq:.1f} s | 1.00x |")
        print(f"| --workers 2 (1 thread each) | {pool:.1f} s | {seq / pool:.2f}x |")
        print(f"| two plain processes side by side, default threads | {side:.1f} s | {seq / side:.2f}x |")
        print(f"| two plain processes side by side, 1 thread each | {side1:.1f} s | {seq / side1:.2f}x |")

        n = args.tiny_runs
        tiny = grid(root / "tiny-inline", "trades", str(n), 1, 2)
        inline = timed(fairbench(tiny))
        print(f"\nscheduling overhead per run: {n} runs of 1 epoch on 20 images (inline: {inline:.1f} s in all)")
        launchers = [("local pool, 1 worker", ["--workers", "1"]), ("local pool, 2 workers", ["--workers", "2"])]
        if args.slurm:
            launchers.append(("slurm (submitit, --wait)", ["--launcher", "slurm", "--wait", "--time", "10"]))
        if args.ray:
            launchers.append(("ray (local cluster, start included)", ["--launcher", "ray"]))
        for i, (name, extra) in enumerate(launchers):
            out = root / f"tiny-{i}"
            wall = timed(fairbench(grid(out, "trades", str(n), 1, 2) + extra))
            print(f"| {name} | {wall:.1f} s | {wall / n:.2f} s per run | {(wall - inline) / n:+.2f} s per run over inline |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
