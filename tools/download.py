"""Download the released TransDiff files by name, resumably, and verify each one by loading it.

    python tools/download.py transdiff_l kl16 fid_stats_256      # what the README's L evaluation reads
    python tools/download.py --list                              # names, URLs and local paths
    python tools/download.py transdiff_h_mrar --base_url http://mirror/transdiff --dest /data/transdiff

Every file lands where the README's commands look for it (relative to ``--dest``, by default the repository
root): ``ckpt/<name>/checkpoint-last.pth`` for ``--resume ckpt/<name>/``, ``ckpt/vae/kl16.ckpt`` for
``--vae_path``, ``fid_stats/*.npz`` for evaluation and ``Imagenet2012_mrar_files.txt`` for ``--mrar_index``.
`REGISTRY` is the one list of files.

How a file is fetched (`fetch`):

* bytes go to ``<target>.part``; an interrupted download (dropped connection, Ctrl-C, a crash) leaves that
  ``.part``, and the next attempt (retried automatically, or the next run) asks only for the rest with an HTTP
  ``Range`` request. A ``206`` whose ``Content-Range`` starts at the ``.part``'s size is appended; a ``200``
  (server ignores ranges) starts over; a ``416`` means the ``.part`` is already whole.
* the complete ``.part`` is verified (`verify`), and only then renamed onto the target in one ``os.replace``,
  so the target is never a partial or unverified file. A ``.part`` that fails verification is deleted (it would
  only resume into the same bad file) and the run exits non-zero, naming the file.
* a target that already exists and verifies is skipped without any network request. One that exists but fails
  verification is downloaded again and replaced only once the new copy verifies.

Verification by kind (`VERIFIERS`), after the sha256 where one is recorded:

* ``checkpoint``: `util.checkpoint.load_checkpoint` + `select_weights`, then ``load_state_dict(strict=True)``
  into the model the entry names, built on the meta device (every key and shape is checked, no memory is
  allocated for the model); every float tensor must be finite.
* ``vae``: `models.vae.AutoencoderKL.from_checkpoint` (``load_kl16`` for the released file): a strict load.
* ``fid_stats``: `util.eval.fidelity.load_reference_statistics`; ``mu`` must be ``[d]`` and ``sigma`` ``[d, d]``
  with ``d`` the entry's ``feature_dim`` (2048 for Inception pool features), all finite.
* ``mrar_index``: every line is a JSON object ``{"cate": str, "files": [>= 4 str]}`` (`util.data.datasets.MRARDataset`).
"""
from __future__ import annotations

import argparse
import errno
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as `python tools/download.py`: make `models`/`util` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from models.transdiff import TRANSDIFF_MODELS
from models.vae import AutoencoderKL
from util.checkpoint import check_finite, load_checkpoint, select_weights
from util.data.datasets import MRAR_GROUP_SIZE
from util.errors import run_cli
from util.eval.fidelity import DEFAULT_FID_STATS, load_reference_statistics
from util.io import file_sha256, fsync_directory
from util.presets import SAMPLING_PRESETS

REPO_ROOT = Path(__file__).resolve().parents[1]

TRANSDIFF_HF = "https://huggingface.co/zhendch/Transdiff/resolve/main"  # the authors' Hugging Face model repo
MAR_GITHUB = "https://raw.githubusercontent.com/LTH14/mar/main"  # MAR's git repository (raw files)

PART_SUFFIX = ".part"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not per file
RETRIES = 5  # further attempts after a network failure, each resuming where the last stopped
RETRY_WAIT_S = 2.0  # wait before retry k (k = 0, 1, ...) is RETRY_WAIT_S * 2**k, at most MAX_RETRY_WAIT_S
MAX_RETRY_WAIT_S = 60.0
USER_AGENT = "transdiff-download/1.0 (python urllib)"
INCEPTION_POOL_DIM = 2048  # length of the FID feature vector (torch-fidelity's "2048" layer)


class CheckpointSpec(NamedTuple):
    """The model a released checkpoint must load into strictly."""
    model: str        # key of TRANSDIFF_MODELS (--model)
    mrar: bool        # MRAR checkpoints need --mrar --patch_size 2
    img_size: int     # --img_size
    class_num: int = 1000

    @property
    def patch_size(self) -> int:
        """2 for MRAR (the released MRAR models), 1 otherwise (README)."""
        return 2 if self.mrar else 1


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file.

    remote: path under the base URL (``<base_url>/<remote>``; ``--base_url`` replaces ``base_url``).
    local: path under ``--dest``, where the README's commands read it.
    kind: key of `VERIFIERS`.
    base_url: where the file is published.
    sha256: hex digest checked before loading; None when no digest has been recorded.
    checkpoint: for kind ``checkpoint``, the model it must load into.
    feature_dim: for kind ``fid_stats``, the expected length of ``mu``.
    vae_config: for kind ``vae``, keyword arguments of `AutoencoderKL` (empty: the released KL-16).
    """
    remote: str
    local: str
    kind: str
    base_url: str = TRANSDIFF_HF
    sha256: str | None = None
    checkpoint: CheckpointSpec | None = None
    feature_dim: int = INCEPTION_POOL_DIM
    vae_config: Mapping[str, object] = field(default_factory=dict)

    def url(self, base_url: str | None = None) -> str:
        """The URL to fetch: ``<base_url>/<remote>``, with ``base_url`` (a mirror) overriding the entry's."""
        return f"{(base_url or self.base_url).rstrip('/')}/{self.remote}"


def _released_checkpoint(preset: str) -> RemoteFile:
    """``<preset>/checkpoint-last.pth`` of the authors' HF repo, stored as ``ckpt/<preset>/checkpoint-last.pth``."""
    settings = SAMPLING_PRESETS[preset]
    return RemoteFile(f"{preset}/checkpoint-last.pth", f"ckpt/{preset}/checkpoint-last.pth", "checkpoint",
                      checkpoint=CheckpointSpec(settings.model, settings.mrar, settings.img_size))


# Remote names: the HF repo holds one folder per model with a `checkpoint-last.pth` (the original README links
# `.../resolve/main/<folder>/checkpoint-last.pth`), `vae/checkpoint-last.pth`, `VIRTUAL_imagenet512.npz` and
# `Imagenet2012_mrar_files.txt` at its root. No sha256 is published for any of them, so none is recorded.
REGISTRY: dict[str, RemoteFile] = {
    "transdiff_b": _released_checkpoint("transdiff_b"),
    "transdiff_l": _released_checkpoint("transdiff_l"),
    "transdiff_h": _released_checkpoint("transdiff_h"),            # 5.31 GB (one fp32 state dict)
    "transdiff_b_mrar": _released_checkpoint("transdiff_b_mrar"),  # 1.16 GB
    "transdiff_l_mrar": _released_checkpoint("transdiff_l_mrar"),
    "transdiff_h_mrar": _released_checkpoint("transdiff_h_mrar"),
    "transdiff_l_512": _released_checkpoint("transdiff_l_512"),
    # MAR's KL-16 as re-hosted by TransDiff (its README: "vae/checkpoint-last.pth"); saved under the name every
    # README command passes to --vae_path. MAR's own copy is the Dropbox link models.vae.KL16_DOWNLOAD_URL.
    "kl16": RemoteFile("vae/checkpoint-last.pth", "ckpt/vae/kl16.ckpt", "vae"),
    # ADM's 256 reference mu/sigma as committed in MAR's git repository (fid_stats/adm_in256_stats.npz, ~32 MB);
    # the branch name `main` is assumed, not checked.
    "fid_stats_256": RemoteFile("fid_stats/adm_in256_stats.npz", DEFAULT_FID_STATS[256], "fid_stats",
                                base_url=MAR_GITHUB),
    "fid_stats_512": RemoteFile("VIRTUAL_imagenet512.npz", DEFAULT_FID_STATS[512], "fid_stats"),  # 857 MB
    "mrar_index": RemoteFile("Imagenet2012_mrar_files.txt", "Imagenet2012_mrar_files.txt", "mrar_index"),  # 162 MB
}


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the entry and the URL."""


class VerificationError(RuntimeError):
    """A fetched or existing file is not what its entry promises; the message names the entry and the file."""


# --------------------------------------------------------------------------------------------------
# Verification


def _verify_checkpoint(path: Path, entry: RemoteFile) -> str:
    spec = entry.checkpoint
    if spec is None:
        raise ValueError("registry entry of kind 'checkpoint' has no CheckpointSpec")
    state_dict, source = select_weights(load_checkpoint(str(path)))
    check_finite(state_dict, f"{path} ({source})")
    with torch.device("meta"):  # keys and shapes only: no memory for a 1.3B-parameter model
        model = TRANSDIFF_MODELS[spec.model](img_size=spec.img_size, mrar=spec.mrar, patch_size=spec.patch_size,
                                             class_num=spec.class_num)
    # assign=True: the meta parameters are replaced, not copied into (a copy into meta is a warned no-op).
    model.load_state_dict(state_dict, strict=True, assign=True)
    mode = " --mrar --patch_size 2" if spec.mrar else ""
    return f"'{source}' loads strictly into --model {spec.model}{mode} --img_size {spec.img_size}"


def _verify_vae(path: Path, entry: RemoteFile) -> str:
    vae = AutoencoderKL.from_checkpoint(path, **entry.vae_config)  # strict load and finite: load_kl16 for {}
    return f"loads strictly into AutoencoderKL (stride {vae.stride}, {vae.embed_dim} latent channels)"


def _verify_fid_stats(path: Path, entry: RemoteFile) -> str:
    stats = load_reference_statistics(path)  # mu [d] and sigma [d, d]
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.shape != (entry.feature_dim,):
        raise ValueError(f"mu has shape {mu.shape}, expected ({entry.feature_dim},) Inception pool features")
    for key, array in stats.items():
        if not np.isfinite(array).all():
            raise ValueError(f"{key} holds non-finite values")
    return f"mu {mu.shape} {mu.dtype}, sigma {sigma.shape} {sigma.dtype}, finite"


def _verify_mrar_index(path: Path, entry: RemoteFile) -> str:
    lines = 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number} is not JSON ({error}): {line[:120]!r}") from error
            files = record.get("files") if isinstance(record, dict) else None
            if (not isinstance(record, dict) or not isinstance(record.get("cate"), str) or not isinstance(files, list)
                    or len(files) < MRAR_GROUP_SIZE or not all(isinstance(name, str) for name in files)):
                raise ValueError(f"line {number} is not {{\"cate\": str, \"files\": [>= {MRAR_GROUP_SIZE} names]}}: "
                                 f"{line[:120]!r}")
            lines += 1
    if not lines:
        raise ValueError("no entries")
    return f"{lines} MRAR groups"


VERIFIERS: dict[str, Callable[[Path, RemoteFile], str]] = {
    "checkpoint": _verify_checkpoint,
    "vae": _verify_vae,
    "fid_stats": _verify_fid_stats,
    "mrar_index": _verify_mrar_index,
}


def verify(name: str, entry: RemoteFile, path: Path) -> str:
    """Check ``path`` against ``entry`` (sha256 if recorded, then the kind's loader); return a one-line summary.

    Raises:
        VerificationError: naming ``name`` and ``path``, with the loader's reason.
    """
    if entry.sha256 is not None:
        found = file_sha256(path)
        if found != entry.sha256.lower():
            raise VerificationError(f"{name}: {path} has sha256 {found}, expected {entry.sha256}")
    try:
        return VERIFIERS[entry.kind](path, entry)
    except Exception as error:  # any failure to load means the file is not usable: refuse it with the reason
        raise VerificationError(f"{name}: {path} is not a valid {entry.kind} file: "
                                f"{type(error).__name__}: {error}") from error


# --------------------------------------------------------------------------------------------------
# Fetching


class _Incomplete(OSError):
    """The server closed the connection before the promised length; the ``.part`` can be resumed."""


class _Restart(OSError):
    """The ``.part`` does not fit the remote file; it was deleted and the next attempt starts over."""


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
_PERMANENT_HTTP = frozenset(range(400, 500)) - {408, 425, 429}  # client errors other than "try again"


def _open(url: str, offset: int):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def fetch(url: str, part: Path, label: str, quiet: bool = False) -> None:
    """One attempt to complete ``part`` with the bytes of ``url``, resuming from the ``part``'s current size.

    Raises:
        urllib.error.HTTPError, OSError, http.client.HTTPException: network failures; ``_Incomplete`` when the
            connection ends early (``part`` keeps what arrived), ``_Restart`` when ``part`` was discarded.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:
            raise
        match = _UNSATISFIED_RANGE.fullmatch((error.headers.get("Content-Range") or "").strip())
        if match and int(match.group(1)) == offset:
            return  # the .part already holds the whole file
        part.unlink()
        raise _Restart(f"{part} ({offset} bytes) does not fit the remote file; starting over") from error
    with response:
        total = response.headers.get("Content-Length")
        total = int(total) if total is not None else None
        if offset and response.status == 206:
            match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
            if not match or int(match.group(1)) != offset:
                part.unlink()
                raise _Restart(f"server answered Range bytes={offset}- with Content-Range "
                               f"{response.headers.get('Content-Range')!r}; starting over")
            mode = "ab"
            total = int(match.group(3)) if match.group(3) != "*" else None
        else:  # 200: a fresh download, or a server that ignores Range
            if offset:
                print(f"{label}: the server ignored the Range request; downloading from the start", file=sys.stderr)
            offset, mode = 0, "wb"
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, mode) as handle, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                              unit_divisor=1024, desc=label, file=sys.stderr, disable=quiet,
                                              leave=False) as bar:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Incomplete(f"connection closed after {size} of {total} bytes")


_LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS})  # disk full, no permission


def _retryable(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code not in _PERMANENT_HTTP
    if isinstance(error, OSError) and error.errno in _LOCAL_ERRNOS:
        return False  # the local disk, not the network: retrying cannot help
    return isinstance(error, (OSError, http.client.HTTPException))


def download(name: str, entry: RemoteFile, target: Path, base_url: str | None = None, retries: int = RETRIES,
             quiet: bool = False) -> None:
    """Complete ``<target>.part`` from the entry's URL, retrying network failures ``retries`` times.

    Raises:
        DownloadError: naming ``name`` and the URL; any ``.part`` is kept for the next run to resume.
    """
    url = entry.url(base_url)
    part = target.with_name(target.name + PART_SUFFIX)
    for attempt in range(retries + 1):
        try:
            fetch(url, part, name, quiet)
            return
        except (OSError, http.client.HTTPException) as error:
            kept = f"; {part} keeps {part.stat().st_size} bytes, rerun to resume" if part.exists() else ""
            if not _retryable(error) or attempt == retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise DownloadError(f"{name}: could not download {url}{tries}: {error}{kept}") from error
            wait = min(RETRY_WAIT_S * 2 ** attempt, MAX_RETRY_WAIT_S)
            print(f"{name}: {url}: {error}; retrying in {wait:g} s", file=sys.stderr)
            time.sleep(wait)


def get(name: str, dest: Path, base_url: str | None = None, retries: int = RETRIES, quiet: bool = False) -> Path:
    """Make ``dest/<local>`` of ``REGISTRY[name]`` present and verified; return its path.

    Raises:
        DownloadError: the download failed (a ``.part`` may be kept for resuming).
        VerificationError: the downloaded file is invalid; it has been deleted.
    """
    entry = REGISTRY[name]
    target = dest / entry.local
    part = target.with_name(target.name + PART_SUFFIX)
    if target.exists():
        try:
            summary = verify(name, entry, target)
        except VerificationError as error:
            print(f"{error}\n{name}: downloading it again; {target} is replaced once the new copy verifies",
                  file=sys.stderr)
        else:
            if part.exists():
                part.unlink()  # a leftover of an earlier run: the target is complete
            print(f"{name}: {target} already present and verified ({summary}); skipped")
            return target
    download(name, entry, target, base_url, retries, quiet)
    try:
        summary = verify(name, entry, part)
    except VerificationError as error:
        part.unlink()  # resuming it would only reproduce the same invalid file
        raise VerificationError(f"{error}\n{name}: refused the download of {entry.url(base_url)}; deleted {part}, "
                                f"{target} was not written") from error
    os.replace(part, target)  # atomic: the target appears complete and verified, or not at all
    fsync_directory(target.parent)
    print(f"{name}: {target} downloaded and verified ({summary})")
    return target


# --------------------------------------------------------------------------------------------------
# Command line


def _format_size(path: Path) -> str:
    size = path.stat().st_size
    exponent = min(int(math.log(max(size, 1), 1024)), 4)
    return f"{size / 1024 ** exponent:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"


def list_files(dest: Path, base_url: str | None = None) -> None:
    """Print every entry: name, kind, URL, local path and whether it is there (not verified: no loading)."""
    for name, entry in REGISTRY.items():
        target = dest / entry.local
        part = target.with_name(target.name + PART_SUFFIX)
        state = (f"present, {_format_size(target)}" if target.exists()
                 else f"partial, {_format_size(part)}" if part.exists() else "absent")
        print(f"{name:18s} {entry.kind:11s} {entry.url(base_url)}\n{'':30s} -> {target} ({state})")


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments; the names are `REGISTRY`'s keys."""
    parser = argparse.ArgumentParser(
        description="Download released TransDiff checkpoints, MAR's KL-16 VAE, FID reference statistics and the "
                    "MRAR index into the folders the README's commands use; resumable, each file verified.")
    # Names are checked in `main`: argparse's `choices` rejects an empty `nargs="*"` (needed for --list).
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"files to fetch: {', '.join(REGISTRY)}")
    parser.add_argument("--list", action="store_true", help="list the names, URLs and local paths, and exit")
    parser.add_argument("--base_url", default=None,
                        help="a mirror: every file is fetched from <base_url>/<remote name> (see --list)")
    parser.add_argument("--dest", default=str(REPO_ROOT),
                        help="root the local paths are relative to (default: the repository root, where the "
                             "README's commands run)")
    parser.add_argument("--retries", type=int, default=RETRIES,
                        help="further attempts per file after a network failure, each resuming the download")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Fetch the named files; return 0 when all are present and verified, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    if args.retries < 0:
        parser.error(f"--retries must be >= 0, got {args.retries}")
    unknown = [name for name in args.names if name not in REGISTRY]
    if unknown:
        parser.error(f"unknown name(s) {', '.join(map(repr, unknown))} (choose from {', '.join(REGISTRY)})")
    if args.list:
        list_files(dest, args.base_url)
        return 0
    if not args.names:
        parser.error(f"name at least one file (choose from {', '.join(REGISTRY)}), or pass --list")
    failed = []
    for name in dict.fromkeys(args.names):  # each name once, in the given order
        try:
            get(name, dest, args.base_url, args.retries, args.quiet)
        except (DownloadError, VerificationError) as error:
            print(f"error: {error}", file=sys.stderr)
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli("download.py", lambda: sys.exit(main()))
