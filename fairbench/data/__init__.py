"""Dataset registry: names -> readers of the official file formats, with their default run scale.

`load_dataset(name, root)` returns uint8 NCHW arrays (`fairbench.data.base.Dataset`). Missing files
raise `DataNotFoundError` naming the expected path and `fairbench download <name> --data-dir <root>`;
damaged files raise `DataCorruptError` naming the file.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from fairbench.data.base import (
    ArraySplit,
    AugmentSpec,
    DataCorruptError,
    DataNotFoundError,
    Dataset,
    DatasetInfo,
    RunDefaults,
)
from fairbench.data.cifar import (
    CIFAR10_DIR,
    CIFAR100_DIR,
    SUBSET_DIR,
    cifar10_files,
    cifar10_subset_files,
    cifar100_files,
    load_cifar10,
    load_cifar10_subset,
    load_cifar100,
)
from fairbench.data.digits import load_digits_dataset
from fairbench.data.idx import FASHION_DIR, fashionmnist_files, load_fashionmnist
from fairbench.data.stl10 import STL10_DIR, load_stl10, stl10_files
from fairbench.data.tinyimagenet import TINY_DIR, load_tinyimagenet, tinyimagenet_files
from fairbench.errors import UnknownNameError

__all__ = [
    "ArraySplit",
    "AugmentSpec",
    "DataCorruptError",
    "DataNotFoundError",
    "Dataset",
    "DatasetInfo",
    "RunDefaults",
    "DATASETS",
    "DATA_ENV",
    "list_datasets",
    "get_dataset_info",
    "default_data_root",
    "load_dataset",
    "check_dataset_files",
    "data_fingerprint",
]

DATA_ENV = "FAIRBENCH_DATA"
_TRIX = RunDefaults(arch="resnet18", epochs=150, batch_size=128)
"""The TRIX/DAFA training protocol for the full-size image datasets."""

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits",
            "scikit-learn's bundled 8x8 digits (1,797 images, 1x8x8); embedded, runs offline in minutes "
            "on a CPU",
            load_digits_dataset,
            subdir="",
            defaults=RunDefaults(arch="smallcnn", epochs=20, batch_size=64, method_overrides={"warmup": 10}),
            method_defaults={"lam": 1.0},
            downloadable=False,
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10 (50,000 train / 10,000 test, 3x32x32), official python pickles",
            load_cifar10,
            subdir=CIFAR10_DIR,
            defaults=_TRIX,
            method_defaults={"lam": 1.0},
        ),
        DatasetInfo(
            "cifar10-subset",
            "the 8,068 train / 1,017 test CIFAR-10 images with exact original pixels; ships in the "
            "project's shared data folder (--data-dir ../shared/data)",
            load_cifar10_subset,
            subdir=SUBSET_DIR,
            defaults=RunDefaults(arch="resnet18", epochs=30, batch_size=128, method_overrides={"warmup": 15}),
            method_defaults={"lam": 1.0},
            downloadable=False,
        ),
        DatasetInfo(
            "cifar100",
            "CIFAR-100 (50,000 train / 10,000 test, 3x32x32, fine labels), official python pickles",
            load_cifar100,
            subdir=CIFAR100_DIR,
            defaults=_TRIX,
            method_defaults={"lam": 1.5},
        ),
        DatasetInfo(
            "stl10",
            "STL-10 labeled splits (5,000 train / 8,000 test), official binary, resized 96->64 like "
            "TRIX/DAFA",
            load_stl10,
            subdir=STL10_DIR,
            defaults=_TRIX,
            method_defaults={"lam": 1.5},
        ),
        DatasetInfo(
            "tinyimagenet",
            "Tiny-ImageNet-200 (100,000 train / 10,000 val used as test, 3x64x64); the TRIX code has no "
            "Tiny-ImageNet config, so CIFAR-100's DAFA lambda 1.5 is used",
            load_tinyimagenet,
            subdir=TINY_DIR,
            defaults=_TRIX,
            method_defaults={"lam": 1.5},
        ),
        DatasetInfo(
            "fashionmnist",
            "Fashion-MNIST (60,000 train / 10,000 test, 1x28x28), idx files; also found where Debian's "
            "dataset-fashion-mnist installs them",
            load_fashionmnist,
            subdir=FASHION_DIR,
            defaults=RunDefaults(arch="smallcnn", epochs=20, batch_size=128, method_overrides={"warmup": 10}),
            method_defaults={"lam": 1.0},
        ),
    )
}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    """The registry entry for `name`; an unknown name raises UnknownNameError listing the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownNameError("dataset", name, list(DATASETS)) from None


def default_data_root() -> Path:
    """`$FAIRBENCH_DATA` if set, else `./data` (relative to the working directory)."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path("data")


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """Read dataset `name` from `root` (default: `default_data_root()`)."""
    info = get_dataset_info(name)
    return info.load(Path(root).expanduser() if root is not None else default_data_root())


REQUIRED_FILES = {"cifar10": cifar10_files, "cifar10-subset": cifar10_subset_files, "cifar100": cifar100_files,
                  "stl10": stl10_files, "tinyimagenet": tinyimagenet_files, "fashionmnist": fashionmnist_files}
"""The files each reader checks first (digits is embedded and needs none)."""


def check_dataset_files(name: str, root: str | Path | None = None) -> None:
    """Raise the reader's own DataNotFoundError (naming the path and `fairbench download`) when dataset
    `name` lacks files under `root`, without reading the data: a grid checks every dataset before its first
    run trains, instead of failing on the second dataset after the first one trained for days."""
    info = get_dataset_info(name)
    folder = Path(root).expanduser() if root is not None else default_data_root()
    files = REQUIRED_FILES.get(name)
    if files is not None and not all(p.is_file() for p in files(folder)):
        info.load(folder)  # stops at its check of these same files, with its message


def data_fingerprint(name: str, root: str | Path | None = None) -> str:
    """`Dataset.fingerprint` of dataset `name` read from `root`, computed once per process and folder (a grid
    rerun checks every finished run against the data it would train on)."""
    folder = Path(root).expanduser() if root is not None else default_data_root()
    return _fingerprint(name, str(folder.resolve()))


@functools.lru_cache(maxsize=8)
def _fingerprint(name: str, folder: str) -> str:
    return load_dataset(name, folder).fingerprint()
