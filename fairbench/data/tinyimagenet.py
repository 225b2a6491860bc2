"""Tiny-ImageNet-200 reader for the standard folder layout, with a decoded-array cache.

Layout: `tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG,
val/val_annotations.txt}`. The official test split has no labels, so val (10,000 images) is the test split,
as in the papers that report Tiny-ImageNet numbers.

Class order is `sorted(wnids)` (torchvision's ImageFolder convention, which the reference training code
uses); class names are the first synonym in words.txt. Decoding 110,000 JPEGs takes a while, so the
decoded arrays are cached uncompressed (about 1.4 GB) as `tiny-imagenet-200/fairbench-cache-v1.npz` and
reused; delete that file to force a fresh decode.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fairbench.data.base import (
    ArraySplit,
    AugmentSpec,
    DataCorruptError,
    DataNotFoundError,
    Dataset,
    fetch_command,
    require_files,
)

TINY_DIR = "tiny-imagenet-200"
CACHE_NAME = "fairbench-cache-v1.npz"
SIZE = 64
AUGMENT = AugmentSpec(crop_padding=4, padding_mode="zeros", flip=True)
_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "wnids")


def tinyimagenet_files(root: Path) -> list[Path]:
    folder = Path(root) / TINY_DIR
    return [folder / "wnids.txt", folder / "words.txt", folder / "val" / "val_annotations.txt"]


def decode_jpeg(path: Path) -> np.ndarray:
    """One image -> uint8 (3, 64, 64); grayscale (and CMYK) JPEGs are converted to RGB."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:  # unreadable or truncated image data
        raise DataCorruptError(f"{path}: not a readable image ({exc})") from exc
    if arr.shape != (SIZE, SIZE, 3):
        raise DataCorruptError(f"{path}: expected a {SIZE}x{SIZE} image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr.transpose(2, 0, 1)


def decode_all(paths: list[Path], workers: int | None = None) -> np.ndarray:
    """Decode many JPEGs into one preallocated (N, 3, 64, 64) array; PIL releases the GIL, so threads help."""
    out = np.empty((len(paths), 3, SIZE, SIZE), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = decode_jpeg(paths[i])

    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        for _ in pool.map(work, range(len(paths))):
            pass
    return out


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise DataCorruptError(f"{path}: not a UTF-8 text file ({exc})") from exc


def read_class_names(folder: Path, wnids: list[str]) -> tuple[str, ...]:
    """First synonym of each wnid in words.txt ('n01443537\\tgoldfish, Carassius auratus' -> 'goldfish')."""
    words: dict[str, str] = {}
    for line in _read_lines(folder / "words.txt"):
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.split(",")[0].strip()
    return tuple(words.get(w) or w for w in wnids)


def _index(
    folder: Path, wnids: list[str], hint: str
) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
    """File lists and labels: train sorted per class (ImageFolder order), val in annotation-file order."""
    label_of = {w: i for i, w in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    missing = []
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            missing.append(images)
            continue
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
        train_paths += files
        train_labels += [label_of[wnid]] * len(files)
    if missing:
        raise DataNotFoundError(
            f"Tiny-ImageNet not found: missing {', '.join(map(str, missing[:6]))}"
            + (f" (and {len(missing) - 6} more)" if len(missing) > 6 else "")
            + f". {hint}"
        )
    ann_path = folder / "val" / "val_annotations.txt"
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for n, line in enumerate(_read_lines(ann_path), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DataCorruptError(f"{ann_path}:{n}: expected 'filename<TAB>wnid<TAB>bbox', got {line!r}")
        test_paths.append(folder / "val" / "images" / fields[0])
        test_labels.append(label_of[fields[1]])
    return train_paths, np.array(train_labels, np.int64), test_paths, np.array(test_labels, np.int64)


def _load_cache(path: Path, wnids: list[str]) -> dict[str, np.ndarray] | None:
    """The cached arrays if the file is readable and was built for these wnids, else None (rebuild)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _CACHE_KEYS}
    except Exception:  # missing, truncated or foreign file: just decode again
        return None
    if [str(w) for w in arrays["wnids"]] != wnids:
        return None
    for split in ("train", "test"):
        imgs, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if imgs.dtype != np.uint8 or imgs.shape[1:] != (3, SIZE, SIZE) or labels.shape != (len(imgs),):
            return None
    return arrays


def _save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + os.replace) so an interrupted run never leaves a half-written cache."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:  # read-only data folder, full disk: loading still works, only slower next time
        warnings.warn(f"could not write the Tiny-ImageNet cache {path}: {exc}", stacklevel=3)
        if tmp is not None and tmp.exists():
            tmp.unlink()


def load_tinyimagenet(root: Path, *, use_cache: bool = True) -> Dataset:
    """Tiny-ImageNet-200 (100,000 train / 10,000 val-as-test, 3x64x64) from `<root>/tiny-imagenet-200/`."""
    folder = Path(root) / TINY_DIR
    hint = f"Fetch it with: {fetch_command('tinyimagenet', root)}"
    require_files("Tiny-ImageNet", tinyimagenet_files(root), hint)
    wnids = sorted(set(_read_lines(folder / "wnids.txt")))
    if not wnids:
        raise DataCorruptError(f"{folder / 'wnids.txt'}: no class ids")
    names = read_class_names(folder, wnids)
    cache = folder / CACHE_NAME
    arrays = _load_cache(cache, wnids) if use_cache else None
    if arrays is None:
        train_paths, train_labels, test_paths, test_labels = _index(folder, wnids, hint)
        require_files("Tiny-ImageNet", test_paths, hint)
        arrays = {
            "train_images": decode_all(train_paths),
            "train_labels": train_labels,
            "test_images": decode_all(test_paths),
            "test_labels": test_labels,
            "wnids": np.array(wnids),
        }
        if use_cache:
            _save_cache(cache, arrays)
    return Dataset(
        "tinyimagenet",
        ArraySplit(arrays["train_images"], arrays["train_labels"].astype(np.int64)),
        ArraySplit(arrays["test_images"], arrays["test_labels"].astype(np.int64)),
        names,
        AUGMENT,
    )
