"""One run per output folder: an exclusive lock file, ``<output_dir>/.run.lock``.

A run creates the file exclusively (``O_EXCL``) holding its host, PID, process start and wall-clock start, keeps
its modification time fresh (a heartbeat thread) and removes it when it ends. A second run into the folder finds
the file and stops, naming the holder. The file of a run that died without removing it (killed, a node lost) is
taken over only when its holder is provably gone: on the same host, its PID no longer runs or now belongs to a
process that started later; on any host, its heartbeat stopped more than `STALE_AFTER_SECONDS` ago.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from util.errors import RunError

LOCK_NAME = ".run.lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 10 * 60.0  # ten missed heartbeats


class FolderInUse(RunError):
    """Another run holds the output folder."""

    exit_code = 2


def _stat(pid: int) -> list[str] | None:
    """Process `pid`'s /proc stat fields from the third (its state) on, or None where unknown (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot, or None where unknown."""
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None  # field 22 of stat


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    fields = _stat(pid)
    return not (fields and fields[0] == "Z")  # a zombie has ended; only its parent has not reaped it yet


def gone(holder: dict, age_seconds: float) -> str | None:
    """Why the lock's holder is provably gone, or None when it may still run; `age_seconds` since its heartbeat."""
    if age_seconds > STALE_AFTER_SECONDS:
        return f"its heartbeat stopped {age_seconds / 60:.0f} min ago"
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    if not _runs(holder["pid"]):
        return f"process {holder['pid']} no longer runs"
    started = process_start(holder["pid"])
    if started is not None and holder.get("process_start") not in (None, started):
        return f"process {holder['pid']} is another process now"
    return None


def describe(holder: dict) -> str:
    return (f"{holder.get('host', 'an unknown host')} pid {holder.get('pid', '?')} since "
            f"{holder.get('started', 'an unknown time')}")


class RunLock:
    """The exclusive claim of one run on `folder`; `acquire` then `release` (also a context manager)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.holder = this_process()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the folder; returns a note when a dead run's lock was taken over. Raises FolderInUse."""
        note = None
        for _ in range(3):  # a take-over raced by another run: look again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                reason, holder = self._examine()
                if reason is None:
                    raise FolderInUse(f"{self.folder} is in use by another run ({describe(holder)}; lock file "
                                      f"{self.path}): wait for it to end, or pass another --output_dir") from None
                try:  # one of several runs that found the same dead holder wins the rename
                    os.replace(self.path, f"{self.path}.{os.getpid()}.stale")
                    os.remove(f"{self.path}.{os.getpid()}.stale")
                except FileNotFoundError:
                    pass
                note = f"took over the lock of a run that ended without releasing it ({describe(holder)}: {reason})"
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.holder, handle)
            self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._heartbeat.start()
            return note
        raise FolderInUse(f"{self.folder}: could not take its lock {self.path}; another run is starting there")

    def _examine(self) -> tuple[str | None, dict]:
        try:
            age = time.time() - os.stat(self.path).st_mtime
            with open(self.path) as handle:
                holder = json.load(handle)
        except FileNotFoundError:
            return "it was just released", {}
        except (OSError, ValueError):  # being written this instant, or a torn file: its age decides
            holder = {}
        if not isinstance(holder, dict):
            holder = {}
        return gone(holder, age), holder

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        try:
            with open(self.path) as handle:
                ours = json.load(handle) == self.holder
        except (OSError, ValueError):
            return
        if ours:
            os.remove(self.path)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
