"""Training throughput: fairbench's device path against a plain script-style path, same model and method.

Device path: uint8 data on the device, vectorised on-device crop+flip, no host sync per step.
Reference path: host-side per-image augmentation (as torchvision transforms do), a float batch copied to
the device every step, and `loss.item()` after every step (as the papers' scripts log).
Both run the same `FairAT.training_loss`, optimizer and batches count; the ratio is printed.

    python benchmarks/train_throughput.py --dataset digits --method trix
    python benchmarks/train_throughput.py --dataset cifar10-subset --data-dir ../shared/data --arch resnet18 --device cuda
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fairbench.data import load_dataset
from fairbench.data.loader import train_batches
from fairbench.engine import Trainer, select_device
from fairbench.method import Batch
from fairbench.spec import RunSpec, resolve


def host_augment(image: np.ndarray, pad: int, flip: bool, rng: np.random.Generator) -> np.ndarray:
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    out = padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]
    return out[:, :, ::-1] if flip and rng.random() < 0.5 else out


def reference_path(trainer: Trainer, batches: int, batch_size: int) -> float:
    images, labels = trainer.dataset.train.images, trainer.dataset.train.labels
    spec, rng = trainer.dataset.augment, np.random.default_rng(0)
    order = rng.permutation(len(labels))
    start, seen = time.perf_counter(), 0
    for b in range(batches):
        idx = order[(b * batch_size) % len(order):][:batch_size]
        x = np.stack([host_augment(images[i], spec.crop_padding, spec.flip, rng) for i in idx]).astype(np.float32) / 255
        x = torch.from_numpy(x).to(trainer.device)
        y = torch.from_numpy(labels[idx].astype(np.int64)).to(trainer.device)
        step(trainer, x, y, torch.from_numpy(idx).to(trainer.device))
        _ = trainer.optimizer.param_groups[0]["lr"], float(trainer.last_loss)  # per-step logging sync
        seen += len(idx)
    sync(trainer.device)
    return seen / (time.perf_counter() - start)


def device_path(trainer: Trainer, batches: int, batch_size: int) -> float:
    gen = torch.Generator(device=trainer.device).manual_seed(0)
    start, seen, done = time.perf_counter(), 0, 0
    while done < batches:
        for x, y, pos in train_batches(trainer.train_split, batch_size, trainer.dataset.augment, gen,
                                       trainer.channels_last):
            step(trainer, x, y, pos)
            seen, done = seen + len(y), done + 1
            if done == batches:
                break
    sync(trainer.device)
    return seen / (time.perf_counter() - start)


def step(trainer: Trainer, x, y, idx) -> None:
    with trainer._autocast():
        out = trainer.method.training_loss(trainer.model, Batch(x, y, idx), trainer.ctx)
    trainer.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    trainer.optimizer.step()
    trainer.last_loss = out.loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--method", default="trix")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args()
    spec = RunSpec(method=args.method, dataset=args.dataset, arch=args.arch, batch_size=args.batch_size,
                   epochs=2, data_dir=args.data_dir, device=args.device, amp=args.amp)
    resolved = resolve(spec)
    device = select_device(args.device)
    trainer = Trainer.build(resolved, load_dataset(args.dataset, args.data_dir), device)
    trainer.ctx.epoch = 1
    device_path(trainer, 3, args.batch_size)  # warm-up (allocator, kernels)
    ref = reference_path(trainer, args.batches, args.batch_size)
    fast = device_path(trainer, args.batches, args.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"{args.method} / {resolved.arch} / {args.dataset} / batch {args.batch_size} / {name} / amp {trainer.amp}")
    print(f"reference path (host augmentation, per-step sync): {ref:9.1f} images/s")
    print(f"fairbench device path:                             {fast:9.1f} images/s")
    print(f"ratio: {fast / ref:.2f}x")


if __name__ == "__main__":
    main()
