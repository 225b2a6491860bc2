"""Datasets on the device as uint8, shuffled and augmented there: a training step never waits on the host."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fairbench.data.base import ArraySplit, AugmentSpec


@dataclass
class DeviceSplit:
    images: Tensor
    """uint8 (N, C, H, W) on the device."""
    labels: Tensor
    """int64 (N,) on the device."""
    index: Tensor
    """int64 (N,): each sample's position in the dataset's canonical order (stable sample ids)."""

    @classmethod
    def from_arrays(cls, split: ArraySplit, device: torch.device, index: np.ndarray | None = None) -> "DeviceSplit":
        idx = np.arange(len(split)) if index is None else index
        return cls(torch.from_numpy(np.ascontiguousarray(split.images)).to(device),
                   torch.from_numpy(split.labels.astype(np.int64)).to(device),
                   torch.from_numpy(idx.astype(np.int64)).to(device))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, positions: Tensor) -> "DeviceSplit":
        return DeviceSplit(self.images[positions], self.labels[positions], self.index[positions])


def to_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0)


def class_positions(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    return [np.flatnonzero(labels == k) for k in range(num_classes)]


def hold_out(labels: np.ndarray, num_classes: int, fraction: float, position: str) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions): `fraction` of each class, from its first or last samples."""
    train, val = [], []
    for members in class_positions(labels, num_classes):
        k = int(round(fraction * len(members)))
        if position == "first":
            val.append(members[:k]), train.append(members[k:])
        else:
            val.append(members[len(members) - k:]), train.append(members[: len(members) - k])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_subset(labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """The first `per_class` samples of each class in canonical order (never 'the first N')."""
    return np.sort(np.concatenate([m[:per_class] for m in class_positions(labels, num_classes)]))


def augment(images: Tensor, spec: AugmentSpec, generator: torch.Generator | None) -> Tensor:
    """Random crop with padding + horizontal flip, vectorised over the batch, on float images."""
    b, _, h, w = images.shape
    out = images
    pad = spec.crop_padding
    if pad > 0:
        mode = "constant" if spec.padding_mode == "zeros" else "reflect"
        padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
        offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=images.device)
        rows = offsets[0, :, None] + torch.arange(h, device=images.device)
        cols = offsets[1, :, None] + torch.arange(w, device=images.device)
        batch = torch.arange(b, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if spec.flip:
        flip = torch.rand(b, generator=generator, device=images.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def train_batches(split: DeviceSplit, batch_size: int, spec: AugmentSpec, generator: torch.Generator,
                  channels_last: bool = False) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """One epoch: a seeded permutation, every sample once, the last smaller batch kept (as DataLoader does)."""
    order = torch.randperm(len(split), generator=generator, device=split.labels.device)
    for start in range(0, len(split), batch_size):
        pos = order[start:start + batch_size]
        x = augment(to_float(split.images[pos]), spec, generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, split.labels[pos], pos


def eval_batches(split: DeviceSplit, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """In canonical order, no augmentation; yields (x, y, sample index)."""
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        yield to_float(split.images[sl]), split.labels[sl], split.index[sl]
