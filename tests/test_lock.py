"""The run lock: exclusive across processes, waits or refuses, takes over stale locks, notices a takeover."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairbench.lock import LOCK_NAME, LockLostError, RunLock, RunLockedError, read_lock

HOLDER = """
import sys, time
from fairbench.lock import RunLock
lock = RunLock(sys.argv[1], "test holder", heartbeat_s=0.2)
lock.acquire(wait=False)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
print("released", flush=True)
"""


def start_holder(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_or_waits(tmp_path):
    holder = start_holder(tmp_path, 1.5)
    info = read_lock(tmp_path)
    assert info is not None and info.pid == holder.pid and not info.stale and info.purpose == "test holder"
    with pytest.raises(RunLockedError, match=f"test holder on .*:{holder.pid}"):
        RunLock(tmp_path, "second").acquire(wait=False)
    said = []
    t0 = time.time()
    with RunLock(tmp_path, "second", say=said.append).hold(wait=True):
        assert time.time() - t0 > 0.5  # it waited for the holder to release
        assert read_lock(tmp_path).pid == os.getpid()
    assert holder.wait() == 0 and "waiting for test holder" in said[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_killed_process_is_taken_over_at_once(tmp_path):
    holder = start_holder(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said = []
    lock = RunLock(tmp_path, "retry", say=said.append)
    assert lock.try_acquire() is None
    assert any("taking over the stale lock" in s and "its process has exited" in s for s in said)
    lock.release()


def write_foreign_lock(folder: Path, age_s: float) -> None:
    (folder / LOCK_NAME).write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "started": 0,
                                                "purpose": "training", "token": "foreign"}))
    old = time.time() - age_s
    os.utime(folder / LOCK_NAME, (old, old))


def test_lock_of_another_host_is_stale_only_after_its_heartbeat_timeout(tmp_path):
    write_foreign_lock(tmp_path, age_s=5)
    with pytest.raises(RunLockedError, match="node-elsewhere:4242"):
        RunLock(tmp_path, "mine", timeout_s=30).acquire(wait=False)
    write_foreign_lock(tmp_path, age_s=60)
    said = []
    with RunLock(tmp_path, "mine", timeout_s=30, say=said.append).hold(wait=False):
        assert read_lock(tmp_path).host != "node-elsewhere"
    assert "no heartbeat for 60 s" in said[0]


def test_heartbeat_keeps_a_long_holder_fresh(tmp_path):
    lock = RunLock(tmp_path, "long", timeout_s=1.0, heartbeat_s=0.1).hold(wait=False)
    time.sleep(1.5)
    assert read_lock(tmp_path, timeout_s=1.0).age < 0.5
    lock.release()


def test_a_process_that_lost_its_lock_stops_before_writing(tmp_path):
    lock = RunLock(tmp_path, "paused", heartbeat_s=0.1).hold(wait=False)
    (tmp_path / LOCK_NAME).unlink()  # what a takeover after a long pause looks like from here
    write_foreign_lock(tmp_path, age_s=0)
    time.sleep(0.3)
    assert lock.lost
    with pytest.raises(LockLostError, match="node-elsewhere:4242"):
        lock.check()
    lock.release()
    assert read_lock(tmp_path).host == "node-elsewhere"  # the new owner's lock is left alone


def test_unreadable_lock_file_is_judged_by_its_age(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # its writer died between creating and writing it
    with pytest.raises(RunLockedError):
        RunLock(tmp_path, "mine", timeout_s=30).acquire(wait=False)
    old = time.time() - 100
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with RunLock(tmp_path, "mine", timeout_s=30).hold(wait=False):
        pass
