"""IDX file parser (the MNIST format) and the Fashion-MNIST reader.

An IDX file starts with a 4-byte magic (two zero bytes, a type code, the number of dimensions), then one
big-endian uint32 per dimension, then the values in C order. Files may be gzipped (`.gz`).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

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

FASHION_DIR = "fashion-mnist"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's `dataset-fashion-mnist` package installs the four idx `.gz` files."""
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
AUGMENT = AugmentSpec(crop_padding=2, padding_mode="zeros", flip=True)

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, source: Path | str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array of the declared type and shape; any mismatch -> DataCorruptError."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataCorruptError(f"{source}: bad IDX magic {data[:4].hex() or '(empty file)'}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataCorruptError(f"{source}: IDX header declares {ndim} dimensions but the file is too short")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataCorruptError(
            f"{source}: IDX header declares shape {shape} ({expected} bytes of data), "
            f"but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gunzipping it first when the name ends in `.gz`."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataCorruptError(f"{path}: truncated or corrupt gzip ({exc})") from exc
    return parse_idx(data, path)


def _pick(folder: Path, stem: str) -> Path:
    """The plain file if present, else the `.gz` one (which then is the path named if both are missing)."""
    plain = folder / stem
    return plain if plain.is_file() else folder / f"{stem}.gz"


def fashionmnist_dir(root: Path) -> Path:
    """`<root>/fashion-mnist/` if it exists, else Debian's folder if that exists, else the first."""
    own = Path(root) / FASHION_DIR
    if not own.is_dir() and DEBIAN_FASHION_DIR.is_dir():
        return DEBIAN_FASHION_DIR
    return own


def fashionmnist_files(root: Path) -> list[Path]:
    folder = fashionmnist_dir(root)
    return [_pick(folder, stem) for stem in FASHION_FILES.values()]


def load_fashionmnist(root: Path) -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 1x28x28) from `<root>/fashion-mnist/`.

    Falls back to `/usr/share/datasets/fashion-mnist/` (Debian's `dataset-fashion-mnist`, an offline
    source of the full set) when `<root>/fashion-mnist/` does not exist.
    """
    folder = fashionmnist_dir(root)
    paths = {key: _pick(folder, stem) for key, stem in FASHION_FILES.items()}
    require_files(
        "Fashion-MNIST",
        list(paths.values()),
        f"Fetch it with: {fetch_command('fashionmnist', root)} "
        "(or offline on Debian/Ubuntu: apt-get install dataset-fashion-mnist, which is read from "
        f"{DEBIAN_FASHION_DIR})",
    )
    splits = []
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"])
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataCorruptError(
                f"{paths[f'{split}_images']}: expected uint8 images (N, 28, 28), "
                f"got {images.dtype} {images.shape}"
            )
        labels = read_idx(paths[f"{split}_labels"])
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataCorruptError(
                f"{paths[f'{split}_labels']}: {labels.shape} labels for {len(images)} images"
            )
        labels = check_labels(labels, 10, paths[f"{split}_labels"])
        splits.append(ArraySplit(np.ascontiguousarray(images[:, None]), labels))
    return Dataset("fashionmnist", splits[0], splits[1], FASHION_CLASSES, AUGMENT)
