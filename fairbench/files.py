"""Result and checkpoint files written atomically (a temporary sibling, fsync, rename), with the
permissions of an ordinary file, and a clear message when the disk or a file-size limit is full.
Torch-free, so the reporting layer can write and read results without importing training code."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from fairbench.errors import FairbenchError, first_line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""The mode of an ordinary new file (mkstemp's temporaries are 0600: a shared results folder would be
unreadable by the rest of a lab)."""

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# torch.save reports a failed write as a RuntimeError without its errno; these are its words and the OS's
_NO_SPACE_WORDS = ("No space left", "File too large", "Disk quota", "unexpected pos", "failed writing file")


class DiskFullError(FairbenchError):
    """A write failed for lack of space (full disk, quota, file-size limit); earlier files are intact."""


def out_of_space(err: BaseException) -> bool:
    """Whether a failed write ran out of space, whichever library reported it."""
    if isinstance(err, OSError) and err.errno in _NO_SPACE:
        return True
    return isinstance(err, (OSError, RuntimeError)) and any(w in str(err) for w in _NO_SPACE_WORDS)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through `write(file_path)` to a temporary sibling, fsync, then rename into place; a killed
    or failed write leaves the previous file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if out_of_space(err):
            raise DiskFullError(
                f"could not write {path}: the disk is full or a file-size limit was reached ({first_line(err)}). "
                f"Free space in {path.parent} (see `df -h {path.parent}`), then run the same command again "
                "(a single run with --resume): training continues from the last checkpoint, and every file "
                "written before is intact.") from err
        raise


def check_writable(folder: Path, option: str) -> None:
    """Fail before any work when `folder` (or its runs/ folder) cannot take new files: a read-only mount or
    missing permissions would otherwise stop a run after its first epoch. A folder not there yet is checked
    through its nearest existing parent, so a refused command leaves no empty folder behind."""
    folder = Path(folder)
    where = folder / "runs" if (folder / "runs").is_dir() else folder
    while not where.exists() and where.parent != where:
        where = where.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".fairbench-write-check.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise FairbenchError(f"{option} {folder}: cannot write in {where} ({err.strerror or err}); choose a "
                             f"folder you can write to with {option}, or fix its permissions. Nothing was "
                             "started.") from err


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries of writes a kill interrupted (`.NAME.*.tmp`) in `folder` and its checkpoints;
    call only while holding the run's lock (nobody else writes there then)."""
    stale = [p for d in (folder, folder / "checkpoints") if d.is_dir() for p in d.glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
