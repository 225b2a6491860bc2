"""Evaluation speed: fairbench's AutoAttack against the reference component chain, same model and images.

The reference is torchattacks 3.5.1's components configured with AutoAttack's standard settings
(APGD-CE, APGD-T 9 targets, FAB-T 9 targets, 100 iterations each, Square 5000 queries without schedule
rescaling), chained with its MultiAttack. fairbench runs `aa` as users get it: per-sample random streams,
targets side by side, Square's next proposals evaluated together and its unchanged or already rejected
ones answered from memory, a search model with BatchNorm folded and channels_last (verdicts by the
unmodified model in strict fp32), and on a CPU one single-threaded shard of the images per core, with freed
memory kept in the process (the reference runs under the same allocator setting). Prints images/s of
each, the ratio, how many per-sample robust flags agree and the model passes per image (F forwards, B of
them with an input gradient; docs/evaluation.md §13), then the time of `pgd20`. `--reference-rng` adds fairbench in the
reference's draw order on the unmodified model (flags identical by construction); `--bf16` adds a bf16
search (opt-in, docs/evaluation.md §12).

    pip install --no-deps torchattacks==3.5.1   # reference only; scipy must be installed
    python benchmarks/eval_speed.py --n 200 --reference-rng --bf16
    python benchmarks/eval_speed.py --dataset cifar10-subset --data-dir ../shared/data --arch resnet18 --device cuda
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from fairbench.allocator import keep_freed_memory
from fairbench.attacks.autoattack import AutoAttack
from fairbench.attacks.search import EXACT, SearchModel, SearchSettings
from fairbench.data import load_dataset
from fairbench.data.loader import DeviceSplit, stratified_subset
from fairbench.engine import SilentReporter, Trainer, select_device
from fairbench.evaluation import evaluate_split
from fairbench.records import robust_flags
from fairbench.spec import RunSpec, resolve


def train_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, object]:
    """A TRADES model at small scale (the workload AutoAttack meets in fairbench)."""
    spec = RunSpec(method="trades", dataset=args.dataset, arch=args.arch, epochs=args.epochs, data_dir=args.data_dir,
                   train_per_class=args.train_per_class, device=str(device))
    resolved = resolve(spec)
    dataset = load_dataset(args.dataset, args.data_dir)
    trainer = Trainer.build(resolved, dataset, device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer.fit(Path(tmp), 0, SilentReporter())
    model = trainer.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, dataset


def reference_chain(model: torch.nn.Module, eps: float, n_classes: int):
    import torchattacks

    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", rho=0.75, seed=0),
        torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=min(n_classes, 10), seed=0),
        torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                         n_classes=min(n_classes, 10), seed=0),
        torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, loss="margin",
                            resc_schedule=False, seed=0),
    ])


@contextmanager
def counted_passes(model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Rows through `model` or a search copy of it: F (all) and B (with an input gradient, so a backward follows)."""
    counts = {"F": 0, "B": 0}
    lock = threading.Lock()  # CPU shards run in threads

    def hook(module, inputs, output):
        if module is model or isinstance(module, SearchModel):
            with lock:
                counts["F"] += len(inputs[0])
                counts["B"] += len(inputs[0]) if torch.is_grad_enabled() and inputs[0].requires_grad else 0

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def passes(counts: dict[str, int], n: int) -> str:
    return f"passes/image F {counts['F'] / n:6.0f} B {counts['B'] / n:5.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--arch", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--n", type=int, default=200, help="test images (stratified)")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference-rng", action="store_true", help="also run fairbench in reference-RNG mode")
    parser.add_argument("--bf16", action="store_true", help="also run fairbench with a bf16 search")
    args = parser.parse_args()
    # fairbench's CPU shards keep freed memory in the process (fairbench.allocator); the reference runs
    # under the same allocator settings, so the ratio compares the attacks, not the allocators
    kept = keep_freed_memory()
    device = select_device(args.device)
    model, dataset = train_model(args, device)
    index = stratified_subset(dataset.test.labels, dataset.num_classes, max(1, args.n // dataset.num_classes))
    split = DeviceSplit.from_arrays(dataset.test, device).subset(torch.as_tensor(index, device=device))
    x = split.images.float() / 255
    y = split.labels

    with counted_passes(model) as ref_passes:
        t0 = time.perf_counter()
        adv = reference_chain(model, args.eps, dataset.num_classes)(x, y)
        ref_time = time.perf_counter() - t0
    with torch.no_grad():
        ref_robust = (model(adv).argmax(1) == y).cpu()
    n = len(y)
    print(f"AutoAttack standard, eps {args.eps:.5f}, {n} {args.dataset} test images, device {device}, "
          f"{torch.get_num_threads()} threads, freed memory kept in the process: {kept}")
    print(f"{'reference chain (torchattacks components)':44s} {ref_time:8.1f} s  {n / ref_time:8.2f} images/s  "
          f"robust {ref_robust.float().mean():.4f}  {passes(ref_passes, n)}")

    variants = [("fairbench aa", AutoAttack(args.eps), SearchSettings())]
    if args.reference_rng:
        variants.append(("fairbench aa, reference RNG, exact model", AutoAttack(args.eps, reference_rng=True), EXACT))
    if args.bf16:
        variants.append(("fairbench aa, bf16 search", AutoAttack(args.eps), SearchSettings(precision="bf16")))
    for label, attack, search in variants:
        with counted_passes(model) as counts:
            t0 = time.perf_counter()
            samples = evaluate_split(model, split, [attack], args.eps, len(split), seed=0, search=search)
            seconds = time.perf_counter() - t0
        flags = robust_flags(samples)
        robust = torch.tensor(flags[flags.suite == "autoattack"].sort_values("sample_idx")["correct"].to_numpy())
        print(f"{label:44s} {seconds:8.1f} s  {n / seconds:8.2f} images/s  robust {robust.float().mean():.4f}  "
              f"speed ratio {ref_time / seconds:.2f}x  flags agree {int((ref_robust == robust).sum())}/{n}  "
              f"{passes(counts, n)}")
    print("(docs/evaluation.md §13, reference: a sample robust to all costs ~7860 F and ~1910 B; one broken by "
          "APGD-CE ~104 F, ~101 B)")
    t0 = time.perf_counter()
    samples = evaluate_split(model, split, ["pgd20"], args.eps, len(split), seed=0)
    seconds = time.perf_counter() - t0
    flags = robust_flags(samples)
    print(f"{'fairbench pgd20':44s} {seconds:8.1f} s  {n / seconds:8.2f} images/s  "
          f"robust {flags[flags.suite == 'pgd20']['correct'].mean():.4f}")


if __name__ == "__main__":
    main()
