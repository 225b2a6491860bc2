"""Dataset containers shared by every reader.

Readers return uint8 arrays in NCHW layout; the engine moves them to the device once and
augments there, so nothing in a training step touches the host.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fairbench.errors import FairbenchError


class DataNotFoundError(FairbenchError, FileNotFoundError):
    """Raised when a dataset's files are missing; the message names the path and the fetch command."""


@dataclass(frozen=True)
class AugmentSpec:
    """Training-time augmentation, applied on the device (`fairbench.data.loader`)."""

    crop_padding: int = 4
    """Random crop of the original size after padding each side by this many pixels (0 = off)."""
    padding_mode: str = "zeros"
    """'zeros' (TRADES/DAFA/TRIX code) or 'reflect' (CFA/FAIR-TAT code)."""
    flip: bool = True
    """Random horizontal flip; off where a flip changes the meaning (digits)."""


@dataclass(frozen=True)
class ArraySplit:
    images: np.ndarray
    """uint8, shape (N, C, H, W)."""
    labels: np.ndarray
    """int64, shape (N,), values in 0..num_classes-1."""

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 NCHW, got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: ArraySplit
    test: ArraySplit
    class_names: tuple[str, ...]
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the pixels, labels and class names the reader returned: two copies of
        a dataset that differ anywhere (a broken download, a lossy re-encoding, another version) differ here,
        so results from different data are never taken for one another. Computed once per dataset object."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        for split in (self.train, self.test):
            digest.update(np.ascontiguousarray(split.images).data)
            digest.update(np.ascontiguousarray(split.labels, dtype="<i8").data)
        digest.update("\n".join(self.class_names).encode())
        object.__setattr__(self, "_fingerprint", digest.hexdigest()[:16])  # frozen: a cache, not state
        return self.__dict__["_fingerprint"]


@dataclass(frozen=True)
class RunDefaults:
    """Scale a dataset runs at when the user names nothing else (digits: minutes on 2 CPU cores)."""

    arch: str = "resnet18"
    epochs: int = 150
    batch_size: int = 128
    method_overrides: dict = field(default_factory=dict)
    """Method hyperparameters this scale needs (e.g. a shorter warm-up), applied where a method has the field."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    load: Callable[[Path], Dataset]
    """Reads the dataset from a root folder; raises DataNotFoundError naming the expected path."""
    subdir: str
    """Folder under the data root where the standard files live (e.g. 'cifar-10-batches-py')."""
    defaults: RunDefaults = field(default_factory=RunDefaults)
    method_defaults: dict = field(default_factory=lambda: {"lam": 1.0})
    """Method hyperparameters this dataset sets, applied where a method has the field (before `--set`): DAFA's
    and TRIX's weight strength `lam`, 1.0 for CIFAR-10, 1.5 for CIFAR-100 and STL-10 (the official help text)."""
    downloadable: bool = True


# --- helpers shared by the readers (fairbench.data.cifar, stl10, tinyimagenet, idx, digits) ---


class DataCorruptError(FairbenchError):
    """A dataset file exists but does not hold its official format (truncated, wrong size, bad header)."""


def fetch_command(name: str, root: str | Path) -> str:
    """The command that fetches dataset `name` into `root`; every missing-file message names it."""
    return f"fairbench download {name} --data-dir {root}"


def require_files(title: str, paths: list[Path], hint: str) -> None:
    """Raise DataNotFoundError listing every missing path at once, so one message says all that is needed."""
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return
    folder = missing[0].parent
    if len(missing) == len(paths) > 1 and all(p.parent == folder for p in paths) and not folder.is_dir():
        names = ", ".join(p.name for p in paths)
        raise DataNotFoundError(f"{title} not found: expected the folder {folder} (with {names}). {hint}")
    shown = ", ".join(str(p) for p in missing[:6])
    if len(missing) > 6:
        shown += f" (and {len(missing) - 6} more)"
    raise DataNotFoundError(f"{title} not found: missing {shown}. {hint}")


def check_labels(labels: np.ndarray, num_classes: int, source: Path | str) -> np.ndarray:
    """Labels as int64; DataCorruptError naming `source` if any lies outside 0..num_classes-1."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataCorruptError(f"{source}: labels must be 1-d integers, not {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataCorruptError(
            f"{source}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return labels
