"""Dataset readers: each test writes small files in the dataset's official format and reads them back.

No mocks: the files are real pickles / binaries / JPEGs / idx files, the archives real tar.gz and zip.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fairbench.data import (
    DATASETS,
    DataCorruptError,
    DataNotFoundError,
    default_data_root,
    get_dataset_info,
    list_datasets,
    load_dataset,
)
from fairbench.data.download import (
    ChecksumError,
    DownloadError,
    Resource,
    download,
    extract,
    fetch,
    fetch_resource,
)
from fairbench.data.idx import DEBIAN_FASHION_DIR, parse_idx, read_idx
from fairbench.data.stl10 import read_split
from fairbench.errors import FairbenchError, UnknownNameError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RNG = np.random.default_rng(0)


def assert_split(split, n: int, shape: tuple[int, int, int], num_classes: int) -> None:
    assert split.images.dtype == np.uint8 and split.images.shape == (n, *shape)
    assert split.images.flags["C_CONTIGUOUS"]
    assert split.labels.dtype == np.int64 and split.labels.shape == (n,)
    assert split.labels.min() >= 0 and split.labels.max() < num_classes


def assert_missing_message(exc: DataNotFoundError, path: Path, name: str) -> None:
    assert str(path) in str(exc)
    assert f"fairbench download {name} --data-dir" in str(exc)


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100


def write_cifar_pickle(path: Path, obj: dict) -> None:
    """Protocol 2 with bytes keys, as the official (Python 2 era) files are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar_batch(path: Path, rows: np.ndarray, labels, label_key: bytes = b"labels") -> None:
    write_cifar_pickle(
        path,
        {
            b"batch_label": path.name.encode(),
            label_key: [int(x) for x in labels],
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))],
        },
    )


CIFAR10_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


def make_cifar10(root: Path, per_batch: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random rows in official files; returns the train/test rows and labels that were written."""
    folder = root / "cifar-10-batches-py"
    rows = RNG.integers(0, 256, size=(6 * per_batch, 3072), dtype=np.uint8)
    labels = np.arange(6 * per_batch) % 10
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        write_cifar_batch(folder / f"data_batch_{b + 1}", rows[sl], labels[sl])
    write_cifar_batch(folder / "test_batch", rows[5 * per_batch :], labels[5 * per_batch :])
    write_cifar_pickle(
        folder / "batches.meta",
        {b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_NAMES, b"num_vis": 3072},
    )
    return rows[: 5 * per_batch], labels[: 5 * per_batch], rows[5 * per_batch :], labels[5 * per_batch :]


def test_cifar10_reads_official_pickles(tmp_path: Path) -> None:
    train_rows, train_labels, test_rows, test_labels = make_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert_split(ds.train, 50, (3, 32, 32), 10)
    assert_split(ds.test, 10, (3, 32, 32), 10)
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train.labels, train_labels)
    # row layout: 1024 R values, then G, then B, each 32x32 row-major
    row = train_rows[7]
    assert ds.train.images[7, 0, 0, 0] == row[0]
    assert ds.train.images[7, 0, 0, 5] == row[5]
    assert ds.train.images[7, 0, 2, 5] == row[2 * 32 + 5]
    assert ds.train.images[7, 1, 2, 5] == row[1024 + 2 * 32 + 5]
    assert ds.train.images[7, 2, 31, 30] == row[2048 + 31 * 32 + 30]
    np.testing.assert_array_equal(ds.test.images.reshape(10, -1), test_rows)
    assert ds.augment.crop_padding == 4 and ds.augment.padding_mode == "zeros" and ds.augment.flip


def test_cifar10_single_pixel_lands_at_c_h_w(tmp_path: Path) -> None:
    make_cifar10(tmp_path, per_batch=2)
    rows = np.zeros((2, 3072), np.uint8)
    rows[1, 1024 + 3 * 32 + 17] = 200  # G plane, row 3, column 17 of image 1
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", rows, [0, 1])
    img = load_dataset("cifar10", tmp_path).test.images
    assert img[1, 1, 3, 17] == 200 and int(img.sum()) == 200


def test_cifar10_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    assert_missing_message(info.value, tmp_path / "cifar-10-batches-py", "cifar10")

    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    assert_missing_message(info.value, tmp_path / "cifar-10-batches-py" / "data_batch_3", "cifar10")

    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])  # truncated download
    with pytest.raises(FairbenchError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)

    make_cifar10(tmp_path)
    write_cifar_batch(batch, RNG.integers(0, 256, (4, 3000), dtype=np.uint8), [0, 1, 2, 3])  # wrong row size
    with pytest.raises(DataCorruptError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)

    write_cifar_batch(
        batch, RNG.integers(0, 256, (4, 3072), dtype=np.uint8), [0, 1, 2, 10]
    )  # label out of range
    with pytest.raises(DataCorruptError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    write_cifar_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1", {b"data": os.getpid})
    with pytest.raises(DataCorruptError, match="not allowed"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    train_rows = RNG.integers(0, 256, (200, 3072), dtype=np.uint8)
    test_rows = RNG.integers(0, 256, (100, 3072), dtype=np.uint8)
    fine_train, fine_test = np.arange(200) % 100, (np.arange(100) * 7) % 100
    for name, rows, fine in (("train", train_rows, fine_train), ("test", test_rows, fine_test)):
        write_cifar_pickle(
            folder / name,
            {
                b"filenames": [],
                b"batch_label": name.encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(),
                b"data": rows,
            },
        )
    names = [f"class{i}".encode() for i in range(100)]
    write_cifar_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    ds = load_dataset("cifar100", tmp_path)
    assert_split(ds.train, 200, (3, 32, 32), 100)
    assert_split(ds.test, 100, (3, 32, 32), 100)
    np.testing.assert_array_equal(ds.test.labels, fine_test)
    np.testing.assert_array_equal(ds.train.images.reshape(200, -1), train_rows)
    assert ds.class_names[99] == "class99" and get_dataset_info("cifar100").method_defaults["lam"] == 1.5

    (folder / "meta").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataCorruptError, match="meta"):
        load_dataset("cifar100", tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar100", tmp_path)
    assert_missing_message(info.value, folder / "meta", "cifar100")


# ---------------------------------------------------------------- STL-10


def make_stl10(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = RNG.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # row-major NCHW
        labels = np.arange(n) % 10
        # official layout: each channel stored column-major
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        written[split] = (images, labels)
    (folder / "class_names.txt").write_text(
        "\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"])
        + "\n"
    )
    return written


def test_stl10_column_major_and_labels(tmp_path: Path) -> None:
    written = make_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    images, labels = read_split(folder / "train_X.bin", folder / "train_y.bin")
    np.testing.assert_array_equal(images, written["train"][0])
    np.testing.assert_array_equal(labels, written["train"][1])
    # a single pixel written by hand at byte offset c*96*96 + w*96 + h (column-major) lands at (c, h, w)
    raw = np.zeros(3 * 96 * 96, np.uint8)
    raw[2 * 96 * 96 + 40 * 96 + 7] = 99  # c=2, w=40, h=7
    (folder / "test_X.bin").write_bytes(raw.tobytes())
    (folder / "test_y.bin").write_bytes(bytes([10]))
    images, labels = read_split(folder / "test_X.bin", folder / "test_y.bin")
    assert images[0, 2, 7, 40] == 99 and int(images.sum()) == 99 and labels.tolist() == [9]


def test_stl10_resized_like_torchvision(tmp_path: Path) -> None:
    written = make_stl10(tmp_path)
    ds = load_dataset("stl10", tmp_path)
    assert_split(ds.train, 20, (3, 64, 64), 10)
    assert_split(ds.test, 10, (3, 64, 64), 10)
    assert ds.class_names[7] == "monkey"
    for split, data in (("train", ds.train), ("test", ds.test)):
        originals, labels = written[split]
        np.testing.assert_array_equal(data.labels, labels)
        for i in (0, len(labels) - 1):
            pil = Image.fromarray(originals[i].transpose(1, 2, 0)).resize((64, 64), Image.BILINEAR)
            np.testing.assert_array_equal(data.images[i], np.asarray(pil).transpose(2, 0, 1))


def test_stl10_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("stl10", tmp_path)
    assert_missing_message(info.value, tmp_path / "stl10_binary", "stl10")
    make_stl10(tmp_path)
    x = tmp_path / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-100])
    with pytest.raises(DataCorruptError, match="train_X.bin"):
        load_dataset("stl10", tmp_path)
    x.write_bytes(np.zeros((3, 3, 96, 96), np.uint8).tobytes())  # 3 images, 20 labels
    with pytest.raises(DataCorruptError, match="train_y.bin"):
        load_dataset("stl10", tmp_path)


# ---------------------------------------------------------------- Tiny-ImageNet


WNIDS = ["n09999999", "n01443537", "n02000000"]  # deliberately unsorted in wnids.txt


def make_tinyimagenet(root: Path, per_class: int = 3) -> Path:
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text(
        "n00000001\tentity\n"
        "n01443537\tgoldfish, Carassius auratus\n"
        "n02000000\tred panda, lesser panda, Ailurus fulgens\n"
        "n09999999\tvalley, vale\n"
    )
    for wnid in WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            arr = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if wnid == "n02000000" and i == 0:
                img = img.convert("L")  # Tiny-ImageNet has some grayscale JPEGs
            img.save(images / f"{wnid}_{i}.JPEG", quality=90)
    lines = []
    for i in range(6):
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            folder / "val" / "images" / f"val_{i}.JPEG", quality=90
        )
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % 3]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def pil_chw(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def test_tinyimagenet_reads_folder_layout(tmp_path: Path) -> None:
    folder = make_tinyimagenet(tmp_path)
    ds = load_dataset("tinyimagenet", tmp_path)
    assert_split(ds.train, 9, (3, 64, 64), 3)
    assert_split(ds.test, 6, (3, 64, 64), 3)
    # class order = sorted(wnids); names = first synonym in words.txt
    assert ds.class_names == ("goldfish", "red panda", "valley")
    np.testing.assert_array_equal(ds.train.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ds.test.labels, [2, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(
        ds.train.images[4], pil_chw(folder / "train/n02000000/images/n02000000_1.JPEG")
    )
    np.testing.assert_array_equal(ds.test.images[5], pil_chw(folder / "val/images/val_5.JPEG"))
    gray = ds.train.images[3]  # n02000000_0 was saved as grayscale: three equal channels
    np.testing.assert_array_equal(gray[0], gray[1])
    np.testing.assert_array_equal(gray[0], gray[2])
    assert "CIFAR-100" in get_dataset_info("tinyimagenet").description


def test_tinyimagenet_cache_is_reused_and_rebuilt(tmp_path: Path) -> None:
    folder = make_tinyimagenet(tmp_path)
    first = load_dataset("tinyimagenet", tmp_path)
    cache = folder / "fairbench-cache-v1.npz"
    assert cache.is_file() and not list(folder.glob("*.tmp"))
    jpeg = folder / "train/n01443537/images/n01443537_2.JPEG"
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # truncate a source image: the cache must still serve
    second = load_dataset("tinyimagenet", tmp_path)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    cache.write_bytes(b"not an npz")  # a broken cache is ignored and decoding runs again
    with pytest.raises(FairbenchError, match="n01443537_2.JPEG"):
        load_dataset("tinyimagenet", tmp_path)


def test_tinyimagenet_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("tinyimagenet", tmp_path)
    assert_missing_message(info.value, tmp_path / "tiny-imagenet-200" / "wnids.txt", "tinyimagenet")
    folder = make_tinyimagenet(tmp_path)
    (folder / "val" / "images" / "val_4.JPEG").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("tinyimagenet", tmp_path)
    assert_missing_message(info.value, folder / "val" / "images" / "val_4.JPEG", "tinyimagenet")


# ---------------------------------------------------------------- Fashion-MNIST (idx)


def idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    return (
        struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def make_fashion(root: Path) -> dict[str, np.ndarray]:
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(30) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(12)[::-1] % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        if stem.startswith("train"):  # train gzipped (as published), test plain: both must work
            (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
        else:
            (folder / stem).write_bytes(idx_bytes(arr))
    return arrays


def test_fashionmnist_idx(tmp_path: Path) -> None:
    arrays = make_fashion(tmp_path)
    ds = load_dataset("fashionmnist", tmp_path)
    assert_split(ds.train, 30, (1, 28, 28), 10)
    assert_split(ds.test, 12, (1, 28, 28), 10)
    np.testing.assert_array_equal(ds.train.images[:, 0], arrays["train-images-idx3-ubyte"])
    assert ds.test.images[3, 0, 5, 20] == arrays["t10k-images-idx3-ubyte"][3, 5, 20]
    np.testing.assert_array_equal(ds.test.labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.class_names[9] == "Ankle boot"
    assert ds.augment.crop_padding == 2 and ds.augment.flip


def test_idx_header_validation(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    assert parse_idx(good).shape == (2, 3)
    big_endian = struct.pack(">BBBBI", 0, 0, 0x0B, 1, 2) + struct.pack(">hh", -2, 513)  # int16 values
    assert parse_idx(big_endian).tolist() == [-2, 513]
    with pytest.raises(DataCorruptError, match="magic"):
        parse_idx(b"\x1f\x8b\x08\x00" + good[4:], "x.idx")  # a gzip header read as raw idx
    with pytest.raises(DataCorruptError, match="shape"):
        parse_idx(good[:-1], "x.idx")
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(DataCorruptError, match="labels.gz"):
        read_idx(path)


def test_fashionmnist_missing_and_corrupt(tmp_path: Path) -> None:
    make_fashion(tmp_path)
    folder = tmp_path / "fashion-mnist"
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashionmnist", tmp_path)
    assert_missing_message(info.value, folder / "t10k-labels-idx1-ubyte", "fashionmnist")
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))  # 11 labels, 12 images
    with pytest.raises(DataCorruptError, match="t10k-labels"):
        load_dataset("fashionmnist", tmp_path)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x0c" + b"\x01" * 5)
    with pytest.raises(DataCorruptError, match="t10k-labels"):
        load_dataset("fashionmnist", tmp_path)


@pytest.mark.skipif(
    not DEBIAN_FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashionmnist_debian_package(tmp_path: Path) -> None:
    ds = load_dataset("fashionmnist", tmp_path)  # no <root>/fashion-mnist/: falls back to /usr/share/datasets
    assert_split(ds.train, 60000, (1, 28, 28), 10)
    assert_split(ds.test, 10000, (1, 28, 28), 10)
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- digits (embedded)


def test_digits_embedded_split() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    total = len(ds.train) + len(ds.test)
    assert total == 1797
    assert_split(ds.train, len(ds.train), (1, 8, 8), 10)
    assert_split(ds.test, len(ds.test), (1, 8, 8), 10)
    counts = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(ds.train.labels, minlength=10), np.floor(0.8 * counts).astype(int)
    )
    np.testing.assert_array_equal(np.bincount(ds.test.labels, minlength=10), counts - np.floor(0.8 * counts))
    bunch = load_digits()
    first = np.flatnonzero(bunch.target == 0)[
        0
    ]  # first sample of class 0 is the first train image of class 0
    expected = np.round(bunch.images[first] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(ds.train.images[ds.train.labels == 0][0, 0], expected)
    assert ds.train.images.max() == 255 and ds.class_names == tuple("0123456789")
    assert not ds.augment.flip and ds.augment.crop_padding == 1
    info = get_dataset_info("digits")
    assert (
        not info.downloadable
        and info.defaults.arch == "smallcnn"
        and info.defaults.method_overrides == {"warmup": 10}
    )


# ---------------------------------------------------------------- registry


def test_registry() -> None:
    assert list_datasets() == sorted(
        ["cifar10", "cifar10-subset", "cifar100", "digits", "fashionmnist", "stl10", "tinyimagenet"]
    )
    with pytest.raises(UnknownNameError) as info:
        get_dataset_info("imagenet")
    assert "cifar10" in str(info.value) and "digits" in str(info.value)
    with pytest.raises(UnknownNameError):
        load_dataset("imagenet")
    for name in ("cifar10", "cifar100", "stl10", "tinyimagenet"):
        d = DATASETS[name].defaults
        assert (d.arch, d.epochs, d.batch_size) == ("resnet18", 150, 128)
    assert [DATASETS[n].method_defaults["lam"] for n in ("cifar10", "cifar100", "stl10", "tinyimagenet")] == [
        1.0,
        1.5,
        1.5,
        1.5,
    ]


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FAIRBENCH_DATA", raising=False)
    assert default_data_root() == Path("data")
    monkeypatch.setenv("FAIRBENCH_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    make_cifar10(tmp_path, per_batch=1)
    assert len(load_dataset("cifar10").train) == 5


# ---------------------------------------------------------------- real CIFAR-10 pixels (shared/data)


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-exact-subset" / "cifar10_exact_subset.npz").is_file(),
    reason=f"exact CIFAR-10 subset not found under {SHARED_DATA}",
)
def test_real_cifar10_pixels_round_trip(tmp_path: Path) -> None:
    with np.load(SHARED_DATA / "cifar10-exact-subset" / "cifar10_exact_subset.npz") as npz:
        z = {k: npz[k] for k in npz.files}
    folder = tmp_path / "cifar-10-batches-py"
    for b in range(1, 6):
        sel = z["train_batch"] == b
        np.testing.assert_array_equal(z["train_index"][sel], np.arange(sel.sum()))  # rows 0..k of each batch
        write_cifar_batch(folder / f"data_batch_{b}", z["train_data"][sel], z["train_labels"][sel])
    write_cifar_batch(folder / "test_batch", z["test_data"], z["test_labels"])
    shutil.copy(SHARED_DATA / "cifar-10-batches-py" / "batches.meta", folder / "batches.meta")
    assert sum(z["train_batch"] == 1) == 4000

    ds = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.train.images, z["train_data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.train.labels, z["train_labels"])
    np.testing.assert_array_equal(ds.test.images, z["test_data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.test.labels, z["test_labels"])
    assert ds.class_names == tuple(str(n) for n in z["label_names"])
    assert ds.class_names == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )

    subset = load_dataset("cifar10-subset", SHARED_DATA)
    np.testing.assert_array_equal(subset.train.images, ds.train.images)
    np.testing.assert_array_equal(subset.test.labels, ds.test.labels)
    assert subset.class_names == ds.class_names and subset.augment == ds.augment
    assert len(subset.train) == 8068 and len(subset.test) == 1017
    # the first test image of CIFAR-10 is a cat (label 3)
    assert subset.test.labels[0] == 3


def test_cifar10_subset_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10-subset", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar10-exact-subset" / "cifar10_exact_subset.npz") in msg and "shared" in msg
    assert not get_dataset_info("cifar10-subset").downloadable
    path = tmp_path / "cifar10-exact-subset" / "cifar10_exact_subset.npz"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataCorruptError, match="cifar10_exact_subset.npz"):
        load_dataset("cifar10-subset", tmp_path)


# ---------------------------------------------------------------- download: verify + extract, offline


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fetch_verifies_and_extracts_local_archive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_cifar10(src, per_batch=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    root = tmp_path / "root"
    res = Resource(archive.as_uri(), md5(archive), "cifar-10-python.tar.gz")
    kept = fetch_resource(res, root)
    assert kept == root / "cifar-10-python.tar.gz" and md5(kept) == res.md5
    ds = load_dataset("cifar10", root)
    assert len(ds.train) == 10 and len(ds.test) == 2
    # the reader's folder is complete now, so download() returns without touching the network
    assert download("cifar10", root) == root / "cifar-10-batches-py"


def test_fetch_rejects_wrong_md5_and_leaves_nothing(tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"x" * 1000)
    dest = tmp_path / "out" / "payload.bin"
    with pytest.raises(ChecksumError, match="md5"):
        fetch(payload.as_uri(), dest, "0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    assert fetch(payload.as_uri(), dest, md5(payload)) == dest and dest.read_bytes() == payload.read_bytes()


def test_hand_placed_archive_with_wrong_md5_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    with pytest.raises(ChecksumError, match="cifar-10-python.tar.gz"):
        download("cifar10", tmp_path)  # file present: verified, no network needed
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_unreachable_network_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused, no real network used
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="no network"):
        fetch(f"http://127.0.0.1:{port}/cifar.tar.gz", tmp_path / "cifar.tar.gz", "0" * 32, timeout=5)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FairbenchError, match="not downloadable"):
        download("digits", tmp_path)


def test_extract_zip_and_refuse_traversal(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n01443537\n")
    extract(good, tmp_path / "out")
    assert (tmp_path / "out" / "tiny-imagenet-200" / "wnids.txt").read_text() == "n01443537\n"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(DataCorruptError, match="evil.zip"):
        extract(evil, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()
    broken = tmp_path / "broken.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 5000
        tf.addfile(info, io.BytesIO(b"y" * 5000))
    broken.write_bytes(buf.getvalue()[:40])
    with pytest.raises(DataCorruptError, match="broken.tar.gz"):
        extract(broken, tmp_path / "out3")
