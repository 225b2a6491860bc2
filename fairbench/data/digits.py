"""The embedded default dataset: scikit-learn's bundled 8x8 digits (1,797 images, works offline).

It exists so that every command runs end to end in minutes on a laptop CPU with no files to fetch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fairbench.data.base import ArraySplit, AugmentSpec, Dataset

TRAIN_FRACTION = 0.8
AUGMENT = AugmentSpec(crop_padding=1, padding_mode="zeros", flip=False)
"""No flip: a mirrored 2, 3, 7 ... is not the same digit."""
CLASS_NAMES = tuple(str(d) for d in range(10))


def stratified_split(labels: np.ndarray, fraction: float = TRAIN_FRACTION) -> np.ndarray:
    """Boolean train mask: per class, the first floor(fraction * count) samples in dataset order.

    Deterministic (no RNG), so train/test are the same on every machine and numpy version.
    """
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[idx[: int(np.floor(fraction * len(idx)))]] = True
    return mask


def load_digits_dataset(root: Path | None = None) -> Dataset:
    """1x8x8 uint8 digits (0..16 scaled by 255/16, rounded); `root` is ignored: nothing is read from disk."""
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train = stratified_split(labels)
    return Dataset(
        "digits",
        ArraySplit(np.ascontiguousarray(images[train]), labels[train]),
        ArraySplit(np.ascontiguousarray(images[~train]), labels[~train]),
        CLASS_NAMES,
        AUGMENT,
    )
