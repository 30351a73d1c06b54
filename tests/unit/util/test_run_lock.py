"""util.run_lock: one run per output folder. The lock names its holder, is refused while the holder may run, and is
taken over only when the holder is provably gone (its PID ended or was reused on this host; its heartbeat stopped
anywhere)."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import main
from tests.unit.cli.test_settings import TINY
from util import run_lock
from util.run_lock import LOCK_NAME, FolderInUse, RunLock


def write_holder(folder, age_seconds=0.0, **holder):
    path = folder / LOCK_NAME
    path.write_text(json.dumps(holder))
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def finished_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_holds_the_folder_until_it_releases_it(tmp_path):
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert holder["process_start"] == run_lock.process_start(os.getpid()) is not None
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(FolderInUse, match=f"^{tmp_path} is in use by another run \\({socket.gethostname()} pid "
                                          f"{os.getpid()} since .*; lock file {tmp_path / LOCK_NAME}\\): wait for it "
                                          "to end, or pass another --output_dir$"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_bytes() == before
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


ZOMBIES = []


def holder_text(kind):
    """The lock file of a dead run, by kind: (its text, the reason it counts as gone)."""
    here = {"host": socket.gethostname(), "started": "yesterday"}
    if kind == "ended":
        pid = finished_pid()
        return json.dumps({**here, "pid": pid}), f"process {pid} no longer runs"
    if kind == "zombie":  # killed, not yet reaped by its parent
        process = subprocess.Popen([sys.executable, "-c", "pass"])
        while run_lock._stat(process.pid)[0] != "Z":
            time.sleep(0.01)
        ZOMBIES.append(process)
        return json.dumps({**here, "pid": process.pid}), f"process {process.pid} no longer runs"
    if kind == "pid reused":
        return (json.dumps({**here, "pid": os.getpid(), "process_start": "1"}),
                f"process {os.getpid()} is another process now")
    if kind == "silent elsewhere":
        return json.dumps({"host": "node-7", "pid": 1}), "its heartbeat stopped 11 min ago"
    return "", "its heartbeat stopped 11 min ago"  # a torn file, long unchanged


@pytest.mark.parametrize("kind, age", [("ended", 0), ("zombie", 0), ("pid reused", 0), ("silent elsewhere", 11 * 60),
                                       ("torn", 11 * 60)])
def test_the_lock_of_a_run_that_is_provably_gone_is_taken_over(tmp_path, kind, age):
    text, reason = holder_text(kind)
    path = tmp_path / LOCK_NAME
    path.write_text(text)
    os.utime(path, (time.time() - age, time.time() - age))
    lock = RunLock(tmp_path)
    note = lock.acquire()
    try:
        assert note.startswith("took over the lock of a run that ended without releasing it (")
        assert note.endswith(f": {reason})")
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]
    finally:
        lock.release()
        for process in ZOMBIES:
            process.wait()


@pytest.mark.parametrize("holder", [
    {"host": "node-7", "pid": 1, "started": "2026-12-06 01:00:00 UTC"},  # another host, heartbeat fresh
    None,  # a file being written this instant
])
def test_a_holder_that_may_still_run_keeps_the_folder(tmp_path, holder):
    if holder:
        write_holder(tmp_path, 9 * 60, **holder)
    else:
        (tmp_path / LOCK_NAME).write_text("")
    before = (tmp_path / LOCK_NAME).read_bytes()
    expected = "node-7 pid 1 since 2026-12-06 01:00:00 UTC" if holder else "an unknown host pid ? since an unknown time"
    with pytest.raises(FolderInUse, match=f"in use by another run \\({re.escape(expected)};"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_bytes() == before


def test_the_heartbeat_keeps_the_lock_fresh_and_release_leaves_another_runs_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.01)
    lock = RunLock(tmp_path)
    lock.acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (1.0, 1.0))
    deadline = time.time() + 10
    while path.stat().st_mtime == 1.0 and time.time() < deadline:
        time.sleep(0.01)
    assert time.time() - path.stat().st_mtime < 10
    write_holder(tmp_path, host="node-7", pid=1)  # replaced meanwhile (taken over after a lost heartbeat)
    lock.release()
    assert json.loads(path.read_text())["host"] == "node-7"


def test_a_second_run_into_a_held_folder_stops_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from util.run_lock import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(main.__file__))
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as exited:
            main.cli([*TINY, "--output_dir", str(out), "--data_path", str(tmp_path), "--epochs", "1"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"main.py: error: {out} is in use by another run ({socket.gethostname()} pid "
                              f"{holder.pid} since ")
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
