"""Small file writers: every file this project writes goes through `atomic_write`.

A reader never sees a partial file: data goes to a temporary file in the destination folder, which then
replaces the destination in one `os.replace`. Temporary files are named `.<name>.<random>.tmp`, so a folder's
leftovers from a killed process can be found (`stale_temp_files`) and removed at the next start.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from util.errors import os_error_cause

TMP_SUFFIX = ".tmp"
_HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_source(key: str, path: str | None) -> dict[str, str]:
    """`{key: path, key_sha256: digest}`: a file a result depends on, named with its sha256 (a folder, or None,
    is named without one)."""
    if path is None or not os.path.isfile(path):
        return {key: path}
    return {key: os.path.abspath(path), f"{key}_sha256": file_sha256(path)}


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """Create or replace ``path`` with what ``write(handle)`` writes, all or nothing.

    A crash or an exception at any point leaves the old file (or none) and no temporary file, never a
    partial file. ``durable`` fsyncs the data and the rename, so the new file also survives a power loss.
    The file gets the permissions of a normally created file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates files readable by the owner only
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        cause = os_error_cause(error)
        if cause is not None and cause is not error:  # e.g. torch.save's RuntimeError over a full disk
            raise OSError(cause.errno, cause.strerror, path) from error
        raise
    if durable:
        fsync_directory(directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: str | os.PathLike) -> None:
    """Persist a rename (POSIX); directories cannot be opened on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """Write one ``[H, W, 3]`` (or ``[H, W]``) uint8 array as a PNG, atomically."""
    atomic_write(path, lambda handle: Image.fromarray(pixels).save(handle, format="PNG"), durable=False)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically (non-JSON values such as paths are written as strings)."""
    payload = (json.dumps(value, indent=1, default=str) + "\n").encode()
    atomic_write(path, lambda handle: handle.write(payload), durable=False)


def read_json(path: str | os.PathLike) -> Any:
    """The value of a JSON file; a truncated or malformed one raises ValueError naming it."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({error}): it is truncated or was edited; repair it or move it "
                         "away") from None


def append_json_record(path: str | os.PathLike, record: dict) -> None:
    """Add ``record`` to the JSON list in ``path`` (created if absent), atomically."""
    records = read_json(path) if os.path.exists(path) else []
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}, not the list of records it should")
    records.append(record)
    write_json(path, records)


def append_json_line(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one line of a JSON-lines log (``log.jsonl``)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def stale_temp_files(directory: str | os.PathLike, name_glob: str = "*") -> list[str]:
    """The temporary files `atomic_write` left in ``directory`` for targets matching ``name_glob`` when a process
    was killed mid-write (``.<target>.<random>.tmp``); only safe to remove while no writer is running there."""
    return sorted(glob.glob(os.path.join(os.fspath(directory), f".{name_glob}.*{TMP_SUFFIX}")))


def remove_stale_temp_files(directory: str | os.PathLike, name_glob: str = "*") -> tuple[int, int]:
    """Remove `stale_temp_files`; returns (files, bytes) removed."""
    count = size = 0
    for path in stale_temp_files(directory, name_glob):
        try:
            size += os.path.getsize(path)
            os.remove(path)
            count += 1
        except FileNotFoundError:
            continue
    return count, size


def truncate_json_lines(path: str | os.PathLike, keep: Callable[[dict], bool]) -> int:
    """Rewrite a JSON-lines log keeping the records for which ``keep`` is true; returns how many were dropped.

    A torn last line (a write killed halfway) is dropped too, with a warning; a malformed line before it raises
    ValueError naming the file and the line."""
    if not os.path.exists(path):
        return 0
    with open(path) as handle:
        lines = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
    records, torn = [], False
    for position, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if position < len(lines) - 1:
                raise ValueError(f"{path}: line {number} is not valid JSON: {line.strip()[:80]!r}") from None
            warnings.warn(f"{path}: dropped its last line, torn by a killed write: {line.strip()[:80]!r}",
                          stacklevel=2)
            torn = True
    kept = [record for record in records if keep(record)]
    if torn or len(kept) != len(records):
        payload = "".join(json.dumps(record, default=str) + "\n" for record in kept).encode()
        atomic_write(path, lambda handle: handle.write(payload), durable=False)
    return len(records) - len(kept) + torn
