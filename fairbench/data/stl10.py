"""STL-10 reader for the official binary version (`stl10_binary/`), resized 96 -> 64 like TRIX/DAFA.

`*_X.bin` holds uint8 images (N, 3, 96, 96) with each channel stored column-major, so the last two axes
are transposed to get row-major NCHW. `*_y.bin` holds labels 1..10. The unlabeled split is not read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fairbench.data.base import (
    ArraySplit,
    AugmentSpec,
    DataCorruptError,
    Dataset,
    check_labels,
    fetch_command,
    require_files,
)

STL10_DIR = "stl10_binary"
SOURCE_SIZE = 96
TARGET_SIZE = 64
AUGMENT = AugmentSpec(crop_padding=4, padding_mode="zeros", flip=True)
_IMAGE_BYTES = 3 * SOURCE_SIZE * SOURCE_SIZE


def stl10_files(root: Path) -> list[Path]:
    folder = Path(root) / STL10_DIR
    return [folder / n for n in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")]


def resize_images(images: np.ndarray, size: int = TARGET_SIZE) -> np.ndarray:
    """Resize uint8 NCHW RGB images to size x size exactly as torchvision `Resize(size)` does on a PIL image.

    That is PIL's bilinear filter, which antialiases when shrinking (unlike a plain bilinear sample), so
    the 64x64 inputs match the ones the official TRIX/DAFA code trains and evaluates on.
    """
    out = np.empty((len(images), images.shape[1], size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))
        out[i] = np.asarray(pil.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
    return out


def read_split(x_path: Path, y_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary split -> (uint8 NCHW 96x96 row-major images, int64 labels 0..9)."""
    raw = np.fromfile(x_path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _IMAGE_BYTES:
        raise DataCorruptError(
            f"{x_path}: {raw.size} bytes is not a whole number of 3x96x96 images ({_IMAGE_BYTES} bytes each)"
        )
    images = raw.reshape(-1, 3, SOURCE_SIZE, SOURCE_SIZE).transpose(0, 1, 3, 2)  # column-major -> row-major
    y = np.fromfile(y_path, dtype=np.uint8)
    if len(y) != len(images):
        raise DataCorruptError(f"{y_path}: {len(y)} labels but {x_path.name} holds {len(images)} images")
    if y.size and y.min() < 1:
        raise DataCorruptError(f"{y_path}: STL-10 labels are 1..10, found {y.min()}")
    return images, check_labels(y.astype(np.int64) - 1, 10, y_path)


def load_stl10(root: Path) -> Dataset:
    """STL-10 (5,000 train / 8,000 test labeled images) from `<root>/stl10_binary/`, resized to 64x64."""
    files = stl10_files(root)
    require_files("STL-10", files, f"Fetch it with: {fetch_command('stl10', root)}")
    folder = Path(root) / STL10_DIR
    names_path = folder / "class_names.txt"
    try:
        names = tuple(
            line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()
        )
    except UnicodeDecodeError as exc:
        raise DataCorruptError(f"{names_path}: not a text file ({exc})") from exc
    if len(names) != 10:
        raise DataCorruptError(f"{names_path}: expected 10 class names, got {len(names)}")
    splits = []
    for split in ("train", "test"):
        images, labels = read_split(folder / f"{split}_X.bin", folder / f"{split}_y.bin")
        splits.append(ArraySplit(resize_images(images), labels))
    return Dataset("stl10", splits[0], splits[1], names, AUGMENT)
