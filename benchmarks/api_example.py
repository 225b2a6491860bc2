"""fairbench from a script or notebook, through the Python API alone: train TRADES and DAFA over two seeds,
evaluate a model trained elsewhere class-wise, and print the fairness table and its statistics.

    python benchmarks/api_example.py --out results/api-example      # about 2 minutes on 2 CPU cores

The outside model is a small digits CNN trained here for a few plain steps (`tests/fixtures/external_model.py`);
any `nn.Module` taking [0, 1] images with its normalisation inside works the same way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fairbench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixture's outside model
from tests.fixtures.external_model import trained_digits_net  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/api-example")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-per-class", type=int, default=60)
    args = parser.parse_args()

    for method in ("trades", "dafa"):
        for seed in (1, 2):
            extra = {"warmup": 1} if method == "dafa" else {}  # DAFA's weights switch on after epoch 1
            run = fairbench.train(method, dataset="digits", seed=seed, out=args.out, epochs=args.epochs,
                                  train_per_class=args.train_per_class, eval_per_class=20, eval_last=2, **extra)
            print(f"trained {run.run_id}")

    outside = fairbench.evaluate(trained_digits_net(), dataset="digits", attacks=("pgd20",), n_examples=200,
                                 name="MyNet", out=args.out)
    per_class = outside.classwise[outside.classwise["attack"] == "pgd20"]
    print("MyNet PGD-20 accuracy per class:", (100 * per_class["correct"] / per_class["n"]).round(1).tolist())

    table = fairbench.fairness_table(args.out)
    print(table[["method", "arch", "attack", "n_seeds", "rob_avg_mean", "rob_worst_mean", "rho_rob"]].to_string())
    stats = fairbench.statistics_table(args.out)
    methods = stats.methods
    for r in methods.itertuples():
        line = (f"{r.method:>8} {r.attack:>6}: robust avg {r.rob_avg_mean:.2f} [{r.rob_avg_low:.2f}, "
                f"{r.rob_avg_high:.2f}], worst {r.rob_worst_mean:.2f} [{r.rob_worst_low:.2f}, {r.rob_worst_high:.2f}]"
                f" over seeds {r.seeds}")
        if r.method != "trades" and r.attack == "pgd20" and r.arch != "external":  # paired with TRADES by seed
            line += "; vs trades: " + ", ".join(
                f"{what} {getattr(r, f'd_rob_{what}'):+.2f} {_p(getattr(r, f'p_rob_{what}'))}" for what in ("avg", "worst"))
        print(line)


def _p(value: float) -> str:
    return "p=n/a (the same difference in every seed)" if value != value else f"p={value:.3f}"

if __name__ == "__main__":
    main()
