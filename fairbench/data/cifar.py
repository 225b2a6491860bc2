"""CIFAR-10 / CIFAR-100 readers for the official "python version" pickles, and the exact CIFAR-10 subset.

Each pickle holds a dict with bytes keys; b'data' is (N, 3072) uint8 laid out as the R plane, then G,
then B, each 32x32 row-major, so a plain reshape to (N, 3, 32, 32) gives NCHW.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fairbench.data.base import (
    ArraySplit,
    AugmentSpec,
    DataCorruptError,
    Dataset,
    check_labels,
    fetch_command,
    require_files,
)

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
SUBSET_DIR = "cifar10-exact-subset"
SUBSET_FILE = "cifar10_exact_subset.npz"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))

AUGMENT = AugmentSpec(crop_padding=4, padding_mode="zeros", flip=True)
"""Crop with 4 zero pixels of padding + flip, as in the TRADES/DAFA/TRIX training scripts."""

_ROW = 3 * 32 * 32

# The only globals a CIFAR pickle needs: numpy array reconstruction and the codec Python 2 pickles use
# for bytes. Anything else (os.system, ...) is refused, so a tampered file cannot run code.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")
        if module.startswith("numpy.core."):  # written by numpy<2; numpy>=2 calls it numpy._core
            try:
                return super().find_class("numpy._core." + module[len("numpy.core.") :], name)
            except (ImportError, AttributeError):  # numpy<2 has no numpy._core
                pass
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """Unpickle one official CIFAR file (bytes keys); any failure becomes a DataCorruptError naming it."""
    try:
        with open(path, "rb") as handle:
            obj = _SafeUnpickler(handle, encoding="bytes").load()
    except OSError:
        raise
    except Exception as exc:  # truncated (EOFError), garbage (UnpicklingError), ...: all mean corrupt
        raise DataCorruptError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataCorruptError(f"{path}: expected a dict in the CIFAR pickle, got {type(obj).__name__}")
    return obj


def _get(obj: dict, key: bytes, path: Path) -> Any:
    if key not in obj:
        raise DataCorruptError(f"{path}: key {key!r} missing (keys: {sorted(obj)})")
    return obj[key]


def rows_to_nchw(rows: Any, source: Path | str) -> np.ndarray:
    """(N, 3072) CIFAR rows -> uint8 (N, 3, 32, 32); rejects any other size with a DataCorruptError."""
    data = np.asarray(rows)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise DataCorruptError(
            f"{source}: expected uint8 rows of shape (N, {_ROW}), got {data.dtype} {data.shape}"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32))


def read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 NCHW images, int64 labels), checked for matching lengths and label range."""
    obj = read_pickle(path)
    images = rows_to_nchw(_get(obj, b"data", path), path)
    labels = check_labels(np.asarray(_get(obj, label_key, path)), num_classes, path)
    if len(labels) != len(images):
        raise DataCorruptError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _names(path: Path, key: bytes, expected: int) -> tuple[str, ...]:
    raw = _get(read_pickle(path), key, path)
    try:
        names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw)
    except (TypeError, UnicodeDecodeError) as exc:
        raise DataCorruptError(f"{path}: unreadable {key!r} ({exc})") from exc
    if len(names) != expected:
        raise DataCorruptError(f"{path}: expected {expected} class names under {key!r}, got {len(names)}")
    return names


def cifar10_files(root: Path) -> list[Path]:
    folder = Path(root) / CIFAR10_DIR
    return [folder / n for n in (*CIFAR10_TRAIN, "test_batch", "batches.meta")]


def cifar100_files(root: Path) -> list[Path]:
    folder = Path(root) / CIFAR100_DIR
    return [folder / n for n in ("train", "test", "meta")]


def load_cifar10(root: Path) -> Dataset:
    """CIFAR-10 from `<root>/cifar-10-batches-py/` (data_batch_1..5 are train, test_batch is test)."""
    files = cifar10_files(root)
    require_files("CIFAR-10", files, f"Fetch it with: {fetch_command('cifar10', root)}")
    folder = Path(root) / CIFAR10_DIR
    names = _names(folder / "batches.meta", b"label_names", 10)
    parts = [read_batch(folder / n, b"labels", 10) for n in CIFAR10_TRAIN]
    train = ArraySplit(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = ArraySplit(*read_batch(folder / "test_batch", b"labels", 10))
    return Dataset("cifar10", train, test, names, AUGMENT)


def load_cifar100(root: Path) -> Dataset:
    """CIFAR-100 from `<root>/cifar-100-python/` with the 100 fine labels (coarse labels are ignored)."""
    files = cifar100_files(root)
    require_files("CIFAR-100", files, f"Fetch it with: {fetch_command('cifar100', root)}")
    folder = Path(root) / CIFAR100_DIR
    names = _names(folder / "meta", b"fine_label_names", 100)
    train = ArraySplit(*read_batch(folder / "train", b"fine_labels", 100))
    test = ArraySplit(*read_batch(folder / "test", b"fine_labels", 100))
    return Dataset("cifar100", train, test, names, AUGMENT)


def cifar10_subset_files(root: Path) -> list[Path]:
    return [Path(root) / SUBSET_DIR / SUBSET_FILE]


def load_cifar10_subset(root: Path) -> Dataset:
    """The 8,068 train / 1,017 test CIFAR-10 images whose exact original pixels survive (shared/data).

    The six original batch files could not be obtained offline; this subset keeps bit-exact pixels, so
    numbers on it are real CIFAR-10 numbers on fewer images (see shared/data/SOURCES.md).
    """
    (path,) = cifar10_subset_files(root)
    require_files(
        "CIFAR-10 exact subset",
        [path],
        "It is not downloadable: it ships in the project's shared data folder, so point the data root "
        "there, e.g. `--data-dir ../shared/data` (or set FAIRBENCH_DATA).",
    )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {
                k: npz[k] for k in ("train_data", "train_labels", "test_data", "test_labels", "label_names")
            }
    except KeyError as exc:
        raise DataCorruptError(f"{path}: missing array {exc}") from exc
    except Exception as exc:  # bad zip, truncated member, pickled object arrays
        raise DataCorruptError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from exc
    names = tuple(str(n) for n in arrays["label_names"])
    if len(names) != 10:
        raise DataCorruptError(f"{path}: expected 10 label_names, got {len(names)}")
    splits = []
    for split in ("train", "test"):
        images = rows_to_nchw(arrays[f"{split}_data"], f"{path}[{split}_data]")
        labels = check_labels(arrays[f"{split}_labels"], 10, f"{path}[{split}_labels]")
        if len(labels) != len(images):
            raise DataCorruptError(f"{path}: {len(images)} {split} images but {len(labels)} labels")
        splits.append(ArraySplit(images, labels))
    return Dataset("cifar10-subset", splits[0], splits[1], names, AUGMENT)
