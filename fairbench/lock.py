"""One process per run folder at a time: an exclusive lock file that works on shared network filesystems.

`<run>/run.lock` is created with O_CREAT | O_EXCL (atomic on local disks and on NFS v3+), holds the
owner's host, pid and start time, and its modification time is the heartbeat: a thread touches it every
`heartbeat_s`. A lock whose heartbeat is older than `timeout_s`, or whose owner is a dead process on this
host, is stale and may be taken over (one taker at a time, through a second O_EXCL file). The owner
checks that the lock is still its own before it writes results, so a process that was paused past the
timeout and lost its lock stops instead of writing over the new owner's files.

Training and `fairbench eval` both take this lock: a grid started twice, a requeued Slurm job that starts
while the old one is still being killed, or two evaluations of one run never work on one folder at once.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fairbench.errors import FairbenchError

LOCK_NAME = "run.lock"
DEFAULT_TIMEOUT_S = 300.0
"""A heartbeat older than this marks the lock stale (override: FAIRBENCH_LOCK_TIMEOUT)."""
DEFAULT_HEARTBEAT_S = 20.0
"""How often the owner touches its lock (override: FAIRBENCH_LOCK_HEARTBEAT)."""


class RunLockedError(FairbenchError):
    """The run is locked by another live process."""

    def __init__(self, folder: Path, holder: "LockInfo"):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder.name} is being worked on by {holder.describe()}; it is left to that process "
                         f"(a lock older than {holder.timeout_s:.0f} s without a heartbeat would be taken over)")


class LockLostError(FairbenchError):
    """Another process took this run's lock over (this one was paused past the timeout)."""


def lock_timeout() -> float:
    return float(os.environ.get("FAIRBENCH_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S))


def heartbeat_interval() -> float:
    return float(os.environ.get("FAIRBENCH_LOCK_HEARTBEAT", min(DEFAULT_HEARTBEAT_S, lock_timeout() / 4)))


@dataclass(frozen=True)
class LockInfo:
    """Who holds a run folder, read from its lock file."""

    host: str
    pid: int
    started: float
    purpose: str
    token: str
    heartbeat: float
    """Modification time of the lock file: the owner's last heartbeat."""
    timeout_s: float

    @property
    def age(self) -> float:
        return max(0.0, time.time() - self.heartbeat)

    @property
    def owner_dead(self) -> bool:
        """Known dead: a process of this host that no longer exists (other hosts: only the heartbeat tells)."""
        return self.host == socket.gethostname() and not _pid_alive(self.pid)

    @property
    def stale(self) -> bool:
        return self.owner_dead or self.age > self.timeout_s

    def describe(self) -> str:
        return f"{self.purpose} on {self.host}:{self.pid} (heartbeat {self.age:.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) holds no lock any more
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_lock(folder: Path, timeout_s: float | None = None) -> LockInfo | None:
    """The lock on `folder`, or None when it is free. A lock file that cannot be parsed (its owner died
    between creating and writing it) is reported as held by nobody, with its own age."""
    path = Path(folder) / LOCK_NAME
    try:
        heartbeat = path.stat().st_mtime
        data = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    return LockInfo(host=str(data.get("host", "?")), pid=int(data.get("pid", -1) or -1),
                    started=float(data.get("started", heartbeat) or heartbeat), purpose=str(data.get("purpose", "?")),
                    token=str(data.get("token", "")), heartbeat=heartbeat,
                    timeout_s=lock_timeout() if timeout_s is None else timeout_s)


class RunLock:
    """The exclusive lock of one run folder; use as `with RunLock(folder, "train").hold(wait=True): ...`."""

    def __init__(self, folder: Path, purpose: str, timeout_s: float | None = None,
                 heartbeat_s: float | None = None, say: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.purpose = purpose
        self.timeout_s = lock_timeout() if timeout_s is None else timeout_s
        self.heartbeat_s = heartbeat_interval() if heartbeat_s is None else heartbeat_s
        self.say = say or (lambda text: None)
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------------------------
    def try_acquire(self) -> LockInfo | None:
        """Take the lock if it is free or stale; returns None on success, else the live holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.folder, self.timeout_s)
                if holder is None:
                    continue  # released between our open and our read
                if not holder.stale:
                    return holder
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                           "purpose": self.purpose, "token": self.token}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held, self.lost = True, False
            self._start_heartbeat()
            return None

    def acquire(self, wait: bool = True, poll_s: float = 2.0) -> None:
        """Take the lock; with `wait`, wait for a live holder to finish (saying so once), else raise
        `RunLockedError`."""
        holder = self.try_acquire()
        if holder is None:
            return
        if not wait:
            raise RunLockedError(self.folder, holder)
        self.say(f"{self.folder.name}: waiting for {holder.describe()}")
        while (holder := self.try_acquire()) is not None:
            time.sleep(min(poll_s, self.heartbeat_s))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held and self._still_mine():
            self.path.unlink(missing_ok=True)
        self.held = False

    def hold(self, wait: bool = True) -> "RunLock":
        self.acquire(wait)
        return self

    def __enter__(self) -> "RunLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """Raise `LockLostError` if another process has taken the lock over; call before writing results."""
        if self.lost or not self._still_mine():
            self.lost = True
            holder = read_lock(self.folder, self.timeout_s)
            who = holder.describe() if holder else "nobody (the lock file was removed)"
            raise LockLostError(f"{self.folder.name}: this process lost its lock (now held by {who}); it stops "
                                f"without writing, the other process continues the run")

    # -- internals ---------------------------------------------------------------------------------------
    def _still_mine(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return False

    def _take_over(self, holder: LockInfo) -> None:
        """Remove a stale lock; a guard file makes sure only one process removes it (the others retry)."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > max(30.0, self.heartbeat_s * 2):
                    guard.unlink(missing_ok=True)  # its taker died mid-way
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            again = read_lock(self.folder, self.timeout_s)
            if again is not None and again.token == holder.token and again.stale:
                why = "its process has exited" if again.owner_dead else f"no heartbeat for {again.age:.0f} s"
                self.say(f"{self.folder.name}: taking over the stale lock of {again.host}:{again.pid} ({why})")
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                if not self._still_mine():
                    self.lost = True
                    return
                try:
                    os.utime(self.path)
                except OSError:
                    self.lost = True
                    return

        self._thread = threading.Thread(target=beat, name=f"lock-heartbeat-{self.folder.name}", daemon=True)
        self._thread.start()
