"""util.io: where a temporary file goes and what it is called, what is fsynced, the JSON formats written, and what
the clean-up of a killed writer's leftovers reports."""
import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import util.io
from util.io import (
    append_json_line,
    append_json_record,
    atomic_write,
    file_source,
    read_json,
    remove_stale_temp_files,
    save_png,
    stale_temp_files,
    truncate_json_lines,
    write_json,
)


def test_the_temporary_file_sits_beside_its_target_under_a_findable_name(tmp_path):
    seen = []
    atomic_write(tmp_path / "sub" / "x.json", lambda handle: seen.extend(os.listdir(tmp_path / "sub")) or
                 handle.write(b"1"))
    assert len(seen) == 1  # beside its target: a rename within one filesystem
    assert seen[0].startswith(".x.json.") and seen[0].endswith(".tmp")
    assert os.listdir(tmp_path / "sub") == ["x.json"] and (tmp_path / "sub" / "x.json").read_bytes() == b"1"


@pytest.fixture
def fsyncs(monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(util.io.os, "fsync", lambda fd: calls.append(fd) or real(fd))
    return calls


def test_a_durable_write_fsyncs_the_file_and_its_folder_and_small_files_do_not(tmp_path, fsyncs):
    atomic_write(tmp_path / "ckpt.pth", lambda handle: handle.write(b"weights"))
    assert len(fsyncs) == 2  # the data, then the rename
    fsyncs.clear()
    write_json(tmp_path / "a.json", {"a": 1})
    save_png(tmp_path / "a.png", np.zeros((2, 2, 3), dtype=np.uint8))
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    truncate_json_lines(tmp_path / "log.jsonl", lambda record: record["epoch"] < 2)
    assert fsyncs == []  # images and records are cheap to make again; their writes are atomic, not durable


def test_a_cause_hidden_under_another_exception_is_raised_as_the_os_error_it_is(tmp_path):
    def write(handle):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("PytorchStreamWriter failed writing file") from error

    with pytest.raises(OSError) as raised:
        atomic_write(tmp_path / "ckpt.pth", write)
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt.pth"))
    assert os.listdir(tmp_path) == []


def test_file_source_names_a_file_by_its_digest_and_anything_else_by_its_path(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"abc")
    assert file_source("weights", str(weights)) == {"weights": str(weights.resolve()),
                                                    "weights_sha256": hashlib.sha256(b"abc").hexdigest()}
    assert file_source("weights", None) == {"weights": None}
    assert file_source("data", str(tmp_path)) == {"data": str(tmp_path)}


def test_json_formats_are_pinned(tmp_path):
    write_json(tmp_path / "a.json", {"path": Path("x/y"), "n": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n "path": "x/y",\n "n": [\n  1,\n  2\n ]\n}\n'
    append_json_record(tmp_path / "records.json", {"fid": 1.5})
    append_json_record(tmp_path / "records.json", {"fid": 2.5})
    assert json.loads((tmp_path / "records.json").read_text()) == [{"fid": 1.5}, {"fid": 2.5}]
    append_json_line(tmp_path / "log.jsonl", {"epoch": 1, "dir": Path("out")})
    append_json_line(tmp_path / "log.jsonl", {"epoch": 2})
    assert (tmp_path / "log.jsonl").read_text() == '{"epoch": 1, "dir": "out"}\n{"epoch": 2}\n'
    save_png(tmp_path / "a.png", np.full((2, 3, 3), 7, dtype=np.uint8))
    with Image.open(tmp_path / "a.png") as image:
        assert image.format == "PNG" and image.size == (3, 2) and image.getpixel((0, 0)) == (7, 7, 7)


def test_truncating_a_log_keeps_what_is_asked_and_touches_nothing_else(tmp_path):
    log = tmp_path / "log.jsonl"
    assert truncate_json_lines(log, lambda record: True) == 0 and not log.exists()
    log.write_text('{"epoch": 1}\n\n{"epoch": 2}\n{"epoch": 3}\n')
    before = log.stat().st_ino
    assert truncate_json_lines(log, lambda record: True) == 0
    assert log.stat().st_ino == before  # nothing dropped, nothing rewritten
    assert truncate_json_lines(log, lambda record: record["epoch"] != 2) == 1
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 3}\n'


def test_removing_leftovers_counts_files_and_bytes_and_skips_one_that_vanished(tmp_path, monkeypatch):
    (tmp_path / ".a.pth.x1.tmp").write_bytes(b"123")
    (tmp_path / ".b.pth.x2.tmp").write_bytes(b"12345")
    (tmp_path / ".c.pth.x3.tmp").write_bytes(b"1")
    (tmp_path / "a.pth").write_bytes(b"kept")
    real_getsize = os.path.getsize

    def getsize(path):
        if path.endswith(".a.pth.x1.tmp"):
            raise FileNotFoundError(path)  # removed by someone else meanwhile
        return real_getsize(path)

    assert stale_temp_files(tmp_path) == [str(tmp_path / name) for name in (".a.pth.x1.tmp", ".b.pth.x2.tmp",
                                                                             ".c.pth.x3.tmp")]
    monkeypatch.setattr(util.io.os.path, "getsize", getsize)
    assert remove_stale_temp_files(tmp_path) == (2, 6)
    assert sorted(os.listdir(tmp_path)) == [".a.pth.x1.tmp", "a.pth"]


def test_a_malformed_json_file_is_named(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('[{"fid": 3.1}, {"fid":')
    with pytest.raises(ValueError, match=f"^{path} is not valid JSON \\(.*\\): it is truncated or was edited; repair "
                                         "it or move it away$"):
        append_json_record(path, {"fid": 2.0})
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_json(path)
    path.write_text('{"fid": 3.1}')
    with pytest.raises(ValueError, match=f"^{path} holds a JSON dict, not the list of records it should$"):
        append_json_record(path, {"fid": 2.0})
    assert path.read_text() == '{"fid": 3.1}'


def test_a_torn_last_log_line_is_dropped_with_a_warning_and_a_torn_middle_line_is_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')
    with pytest.warns(UserWarning, match=f"^{log}: dropped its last line, torn by a killed write: '{{\"epo'$"):
        assert truncate_json_lines(log, lambda record: True) == 1
    assert log.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'
    log.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=f"^{log}: line 2 is not valid JSON: '{{\"epo'$"):
        truncate_json_lines(log, lambda record: True)
    assert log.read_text() == '{"epoch": 0}\n{"epo\n{"epoch": 2}\n'


def test_a_long_bad_line_is_shown_by_its_first_80_characters(tmp_path):
    log = tmp_path / "log.jsonl"
    long = '{"epoch": 1, "note": "' + "x" * 200
    log.write_text(f'{{"epoch": 0}}\n{long}\n{{"epoch": 2}}\n')
    with pytest.raises(ValueError) as info:
        truncate_json_lines(log, lambda record: True)
    assert str(info.value) == f"{log}: line 2 is not valid JSON: {long[:80]!r}"
    log.write_text(f'{{"epoch": 0}}\n{long}')
    with pytest.warns(UserWarning) as warned:
        truncate_json_lines(log, lambda record: True)
    assert str(warned[0].message) == f"{log}: dropped its last line, torn by a killed write: {long[:80]!r}"
