"""Fetch the official dataset archives, verify their md5 and unpack them under a data root.

Every file is downloaded to a temporary name, checked against the published md5 and only then moved
into place, so a cut connection never leaves a file that looks complete. An archive already at its
place (e.g. copied by hand onto a machine without network) is verified and unpacked without a download.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fairbench.data.base import DataCorruptError, fetch_command
from fairbench.data.cifar import CIFAR10_DIR, CIFAR100_DIR, cifar10_files, cifar100_files
from fairbench.data.idx import FASHION_DIR, FASHION_FILES
from fairbench.data.stl10 import STL10_DIR, stl10_files
from fairbench.data.tinyimagenet import TINY_DIR, tinyimagenet_files
from fairbench.errors import FairbenchError


class DownloadError(FairbenchError):
    """The network (or the server) could not deliver a file; the message says where to place it by hand."""


class ChecksumError(DataCorruptError):
    """A downloaded or hand-placed file does not have the published md5."""


@dataclass(frozen=True)
class Resource:
    url: str
    md5: str
    filename: str
    """Name the file gets under `<root>/<dest>`."""
    dest: str = ""
    """Folder under the data root the file is placed in ('' = the root itself)."""
    unpack: bool = True
    """Extract (tar/zip) into the root; False keeps the file as is (Fashion-MNIST's .gz are read directly)."""


_FASHION_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

SOURCES: dict[str, tuple[Resource, ...]] = {
    "cifar10": (
        Resource(
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            "cifar-10-python.tar.gz",
        ),
    ),
    "cifar100": (
        Resource(
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
            "cifar-100-python.tar.gz",
        ),
    ),
    "stl10": (
        Resource(
            "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
            "91f7769df0f17e558f3565bffb0c7dfb",
            "stl10_binary.tar.gz",
        ),
    ),
    "tinyimagenet": (
        Resource(
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            "90528d7ca1a48142e341f4ef8d21d0de",
            "tiny-imagenet-200.zip",
        ),
    ),
    "fashionmnist": tuple(
        Resource(
            _FASHION_URL + f"{stem}.gz", _FASHION_MD5[f"{stem}.gz"], f"{stem}.gz", FASHION_DIR, unpack=False
        )
        for stem in FASHION_FILES.values()
    ),
}


def _fashion_files(root: Path) -> list[Path]:
    return [Path(root) / FASHION_DIR / r.filename for r in SOURCES["fashionmnist"]]


_UNPACKED: dict[str, tuple[str, Callable[[Path], list[Path]]]] = {
    "cifar10": (CIFAR10_DIR, cifar10_files),
    "cifar100": (CIFAR100_DIR, cifar100_files),
    "stl10": (STL10_DIR, stl10_files),
    "tinyimagenet": (TINY_DIR, tinyimagenet_files),
    "fashionmnist": (FASHION_DIR, _fashion_files),
}
"""Folder each download ends up in, and the files whose presence means it is complete."""


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: Path, md5: str) -> None:
    """Raise ChecksumError naming `path` unless its md5 is `md5`."""
    actual = md5_of(path)
    if actual != md5.lower():
        raise ChecksumError(f"{path}: md5 is {actual}, expected {md5} (corrupt or incomplete download)")


def fetch(url: str, dest: Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` via a temporary file, moving it into place only if its md5 is `md5`.

    Any URL urllib understands works, including `file://` ones (used by the tests, and for a local mirror).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except urllib.error.HTTPError as exc:
                raise DownloadError(
                    f"could not download {url}: the server answered HTTP {exc.code} {exc.reason}"
                ) from exc
            except (urllib.error.URLError, OSError) as exc:  # DNS failure, refused, timeout
                reason = getattr(exc, "reason", exc)
                raise DownloadError(
                    f"could not download {url} ({reason}): no network seems reachable"
                ) from exc
            with response:
                while True:
                    try:
                        block = response.read(1 << 20)
                    except OSError as exc:  # connection reset or timed out mid-transfer
                        raise DownloadError(f"download of {url} broke off ({exc})") from exc
                    if not block:
                        break
                    digest.update(block)
                    out.write(block)  # a full disk raises OSError here, reported as such
        if digest.hexdigest() != md5.lower():
            raise ChecksumError(f"{url}: downloaded file has md5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _inside(base: Path, name: str) -> bool:
    target = (base / name).resolve()
    return target == base or base in target.parents


def extract(archive: Path, into: Path) -> None:
    """Unpack a .tar(.gz) or .zip into `into`, refusing members that would land outside it."""
    into = Path(into).resolve()
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = [n for n in zf.namelist() if not _inside(into, n)]
                if bad:
                    raise DataCorruptError(
                        f"{archive}: refusing members outside the target folder: {bad[:3]}"
                    )
                zf.extractall(into)
            return
        with tarfile.open(archive, "r:*") as tf:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: the safe filter
                tf.extractall(into, filter="data")
                return
            bad = [
                m.name for m in tf.getmembers() if not _inside(into, m.name) or not (m.isfile() or m.isdir())
            ]
            if bad:
                raise DataCorruptError(f"{archive}: refusing unsafe members: {bad[:3]}")
            tf.extractall(into)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        if isinstance(exc, FairbenchError):
            raise
        raise DataCorruptError(f"{archive}: cannot unpack ({type(exc).__name__}: {exc})") from exc


def fetch_resource(res: Resource, root: Path, *, timeout: float = 60.0) -> Path:
    """Make `<root>/<dest>/<filename>` a verified copy of `res` (reusing a good one), then unpack it."""
    root = Path(root)
    path = root / res.dest / res.filename
    if path.is_file():
        verify_md5(path, res.md5)  # a hand-placed or earlier file must still be the right one
    else:
        fetch(res.url, path, res.md5, timeout=timeout)
    if res.unpack:
        extract(path, root)
    return path


def is_complete(name: str, root: Path) -> bool:
    """Whether every file the reader needs for `name` is already under `root`."""
    return all(p.is_file() for p in _UNPACKED[name][1](Path(root)))


def download(
    name: str,
    root: str | Path,
    *,
    force: bool = False,
    timeout: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Fetch dataset `name` into `root` and return the folder the reader reads; skip if already complete.

    The verified archives are kept next to the unpacked folder (delete them to save space).
    """
    from fairbench.data import get_dataset_info  # late import: the registry imports this module's siblings

    info = get_dataset_info(name)
    root = Path(root).expanduser()
    if name not in SOURCES:
        raise FairbenchError(f"dataset {name!r} is not downloadable: {info.description}")
    folder = root / _UNPACKED[name][0]
    if not force and is_complete(name, root):
        if progress:
            progress(f"{name}: already present in {folder}")
        return folder
    for res in SOURCES[name]:
        if progress:
            progress(f"{name}: fetching {res.url} -> {root / res.dest / res.filename}")
        try:
            fetch_resource(res, root, timeout=timeout)
        except DownloadError as exc:
            raise DownloadError(
                f"{exc}. Fetch {res.filename} (md5 {res.md5}) by hand on a machine with internet access and "
                f"place it at {root / res.dest / res.filename}; then `{fetch_command(name, root)}` verifies "
                f"and unpacks it without the network. Or place the unpacked files under {folder}/."
            ) from exc
    missing = [p for p in _UNPACKED[name][1](root) if not p.is_file()]
    if missing:
        raise DataCorruptError(
            f"{name}: the verified archive did not produce {', '.join(map(str, missing[:3]))}"
        )
    return folder
