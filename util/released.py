"""The released files by name: where each is published, where it goes, and how it is checked by loading it.

    from util.released import fetch
    path = fetch("transdiff_l")            # the Hugging Face Hub cache; the path of a verified file
    path = fetch("kl16", dest=".")         # ./ckpt/vae/kl16.ckpt, where the README's commands read it

`REGISTRY` is the one list of files; `fetch` is the one way to get one. Files of the authors' Hub repository
`HUB_REPO` come through the Hub's own client (`huggingface_hub.hf_hub_download`), the others (MAR's FID statistics,
torch-fidelity's Inception weights) through the same client's plain-URL download (`http_get`). The client reads its
environment as the Hub documents it: ``HF_ENDPOINT`` (a mirror), ``HF_HUB_OFFLINE=1`` (no request at all: files come
from the cache), ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_TOKEN``.

Where a file goes:

* ``dest`` given: ``dest/<local>``, the README's layout (``ckpt/<name>/checkpoint-last.pth``, ``ckpt/vae/kl16.ckpt``,
  ``fid_stats/*.npz``, ``Imagenet2012_mrar_files.txt``). A file already there that verifies is used without any
  request; one that does not is removed and downloaded again. A new file appears there only once it verified.
* ``dest=None``: the Hub cache for Hub files (the path `hf_hub_download` returns; the client asks the Hub whether
  its copy is current unless offline); for the others, the Hub's assets cache
  (``HF_HOME/assets/transdiff/<name>/default/``).
* the Inception weights always go where FID reads them by default, torch-fidelity's cache
  ``$TORCH_HOME/hub/checkpoints/`` (`util.eval.fidelity.hub_inception_weights_path`), whatever ``dest`` is.

A file that fails verification is removed (from the cache too) and `VerificationError` names it; a download that
fails raises `DownloadError` naming the URL and the path to put the file at by hand. Both are one line.

Bounds: `fetch` makes `BoundedClient` the Hub client's HTTP client (`huggingface_hub.set_client_factory`; outside
`fetch` it behaves as the default one) and, for each file, holds every request to `_FileBounds`. A response body
stops at the size announced for the file (the Hub's ``X-Linked-Size``, else ``Content-Range`` / ``Content-Length``),
or at `UNANNOUNCED_SIZE_LIMIT` when nothing is announced; a read waits at most `STALL_S` (or the Hub client's own,
shorter read timeout) and a connection `CONNECT_TIMEOUT_S`; the whole file has `FILE_DEADLINE_S`. A request whose
host cannot be connected to, or sends nothing for the read timeout, fails once as usual (the Hub client then serves
its cached copy, or resumes with a ``Range`` request); if the same request fails again before a byte arrives, the
download stops at once. Files the Hub serves through Xet storage are transferred by ``hf_xet``, which checks every
chunk by its hash, outside these bounds.

Verification by kind (`VERIFIERS`):

* ``checkpoint``: `util.checkpoint.load_checkpoint` + `select_weights`, then ``load_state_dict(strict=True)`` into
  the model the entry names, built on the meta device (every key and shape is checked, no memory is allocated for
  the model); every float tensor must be finite.
* ``vae``: `models.vae.AutoencoderKL.from_checkpoint`: a strict load, finite.
* ``fid_stats``: `util.eval.fidelity.load_reference_statistics`; ``mu`` must be ``[d]`` and ``sigma`` ``[d, d]``
  with ``d`` the entry's ``feature_dim`` (2048 for Inception pool features), all finite.
* ``mrar_index``: every line is a JSON object ``{"cate": str, "files": [>= 4 str]}`` (`util.data.datasets.MRARDataset`).
* ``inception``: `util.eval.fidelity.load_inception`: torch-fidelity's network loads the file strictly.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import httpx2
import numpy as np
import torch
from huggingface_hub import constants, get_session, hf_hub_download, hf_hub_url, set_client_factory
from huggingface_hub.errors import XetDownloadError
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import cached_assets_path
from huggingface_hub.utils._http import hf_request_event_hook  # the Hub client's own request hook (offline mode)
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from tqdm import tqdm

from models.transdiff import TRANSDIFF_MODELS
from models.vae import AutoencoderKL
from util.checkpoint import check_finite, load_checkpoint, select_weights
from util.data.datasets import MRAR_GROUP_SIZE
from util.errors import RunError
from util.eval.fidelity import (
    DEFAULT_FID_STATS,
    INCEPTION_EXTRACTOR,
    hub_inception_weights_path,
    load_inception,
    load_reference_statistics,
)
from util.presets import SAMPLING_PRESETS

REPO_ROOT = Path(__file__).resolve().parents[1]

HUB_REPO = "zhendch/Transdiff"  # the authors' Hugging Face model repository
HUB_REVISION = "main"  # no release tag or commit is published; the branch is what the authors' README links
MAR_GITHUB = "https://raw.githubusercontent.com/LTH14/mar/main"  # MAR's git repository (raw files)
ASSETS_LIBRARY = "transdiff"  # our folder in the Hub's assets cache, for files from outside the Hub
STAGING_FOLDER = ".hf_download"  # next to a ``dest`` file: the Hub client's download folder, removed after use
PART_SUFFIX = ".part"
INCEPTION_POOL_DIM = 2048  # length of the FID feature vector (torch-fidelity's "2048" layer)

# Bounds of one file's download (module attributes, read at each fetch: tests lower them).
STALL_S = 60.0  # longest wait for the next bytes of a response
CONNECT_TIMEOUT_S = 10.0  # longest wait for a connection
FILE_DEADLINE_S = 6 * 3600.0  # whole download of one file, every request and retry included
UNANNOUNCED_SIZE_LIMIT = 8 << 30  # bytes of a response when no size was announced; above every released file


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
class ReleasedFile:
    """One released file.

    kind: key of `VERIFIERS`.
    local: path under ``dest`` where the README's commands read it; or a function returning the one place the file
        must be whatever ``dest`` is (the Inception weights: torch-fidelity's cache).
    hub_path: path in `HUB_REPO`; None for a file published at ``url``.
    url: where a file outside the Hub is published.
    checkpoint: for kind ``checkpoint``, the model it must load into.
    feature_dim: for kind ``fid_stats``, the expected length of ``mu``.
    vae_config: for kind ``vae``, keyword arguments of `AutoencoderKL` (empty: the released KL-16).
    """
    kind: str
    local: str | Callable[[], str]
    hub_path: str | None = None
    url: str | None = None
    checkpoint: CheckpointSpec | None = None
    feature_dim: int = INCEPTION_POOL_DIM
    vae_config: Mapping[str, object] = field(default_factory=dict)


def _released_checkpoint(preset: str) -> ReleasedFile:
    """``<preset>/checkpoint-last.pth`` of the Hub repo, stored as ``ckpt/<preset>/checkpoint-last.pth``."""
    settings = SAMPLING_PRESETS[preset]
    return ReleasedFile("checkpoint", f"ckpt/{preset}/checkpoint-last.pth", hub_path=f"{preset}/checkpoint-last.pth",
                        checkpoint=CheckpointSpec(settings.model, settings.mrar, settings.img_size))


# The Hub repo holds one folder per model with a `checkpoint-last.pth` (the original README links
# `.../resolve/main/<folder>/checkpoint-last.pth`), `vae/checkpoint-last.pth`, `VIRTUAL_imagenet512.npz` and
# `Imagenet2012_mrar_files.txt` at its root.
REGISTRY: dict[str, ReleasedFile] = {
    **{preset: _released_checkpoint(preset) for preset in SAMPLING_PRESETS},
    # MAR's KL-16 as re-hosted by TransDiff (its README: "vae/checkpoint-last.pth"); saved under the name every
    # README command passes to --vae_path. MAR's own copy is the Dropbox link models.vae.KL16_DOWNLOAD_URL.
    "kl16": ReleasedFile("vae", "ckpt/vae/kl16.ckpt", hub_path="vae/checkpoint-last.pth"),
    # ADM's 256 reference mu/sigma as committed in MAR's git repository; the branch name `main` is assumed.
    "fid_stats_256": ReleasedFile("fid_stats", DEFAULT_FID_STATS[256],
                                  url=f"{MAR_GITHUB}/fid_stats/adm_in256_stats.npz"),
    "fid_stats_512": ReleasedFile("fid_stats", DEFAULT_FID_STATS[512], hub_path="VIRTUAL_imagenet512.npz"),
    "mrar_index": ReleasedFile("mrar_index", "Imagenet2012_mrar_files.txt", hub_path="Imagenet2012_mrar_files.txt"),
    # torch-fidelity's Inception-v3 weights for FID and IS, where torch-fidelity (and our evaluation) look first.
    "inception": ReleasedFile("inception", hub_inception_weights_path, url=URL_INCEPTION_V3),
}


class ReleaseError(RunError):
    """A released file could not be made available; the message names it and says what to do."""


class DownloadError(ReleaseError):
    """A file could not be downloaded; the message names the URL and where to put the file by hand."""


class VerificationError(ReleaseError):
    """A file is not what its entry promises; it has been removed, and the message names it."""


class TransferStopped(RunError):
    """A bound of `BoundedClient` stopped a transfer; the message names the URL and the bound."""


# --------------------------------------------------------------------------------------------------
# Verification


def _verify_checkpoint(path: Path, entry: ReleasedFile) -> str:
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


def _verify_vae(path: Path, entry: ReleasedFile) -> str:
    vae = AutoencoderKL.from_checkpoint(path, **entry.vae_config)  # strict load and finite: load_kl16 for {}
    return f"loads strictly into AutoencoderKL (stride {vae.stride}, {vae.embed_dim} latent channels)"


def _verify_fid_stats(path: Path, entry: ReleasedFile) -> str:
    stats = load_reference_statistics(path)  # mu [d] and sigma [d, d]
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.shape != (entry.feature_dim,):
        raise ValueError(f"mu has shape {mu.shape}, expected ({entry.feature_dim},) Inception pool features")
    for key, array in stats.items():
        if not np.isfinite(array).all():
            raise ValueError(f"{key} holds non-finite values")
    return f"mu {mu.shape} {mu.dtype}, sigma {sigma.shape} {sigma.dtype}, finite"


def _verify_mrar_index(path: Path, entry: ReleasedFile) -> str:
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


def _verify_inception(path: Path, entry: ReleasedFile) -> str:
    load_inception("cpu", weights_path=path)  # torch-fidelity's load_state_dict, strict, of finite tensors
    return f"loads strictly into torch-fidelity's {INCEPTION_EXTRACTOR}"


VERIFIERS: dict[str, Callable[[Path, ReleasedFile], str]] = {
    "checkpoint": _verify_checkpoint,
    "vae": _verify_vae,
    "fid_stats": _verify_fid_stats,
    "mrar_index": _verify_mrar_index,
    "inception": _verify_inception,
}


def _one_line(text: object) -> str:
    """``text`` with its lines joined by "; " (loaders report one problem per line)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def verify(name: str, path: Path) -> str:
    """Check ``path`` with the loader of ``REGISTRY[name]``'s kind; return a one-line summary.

    Raises:
        VerificationError: naming ``name`` and ``path``, with the loader's reason.
    """
    entry = REGISTRY[name]
    try:
        return VERIFIERS[entry.kind](path, entry)
    except Exception as error:  # any failure to load means the file is not usable: refuse it with the reason
        raise VerificationError(f"{name}: {path} is not a valid {entry.kind} file: "
                                f"{type(error).__name__}: {_one_line(error)}") from error


# --------------------------------------------------------------------------------------------------
# Bounded transfers


class _FileBounds:
    """The bounds of one file's download: its deadline, its announced size, the requests that failed once."""

    def __init__(self):
        self.deadline = time.monotonic() + FILE_DEADLINE_S
        self.announced_size: int | None = None
        self.failed: set[tuple[str, str]] = set()  # `_request_key`s of requests that failed since their last byte

    def admit(self, request: httpx2.Request) -> None:
        """Cap the request's timeouts by the bounds; refuse it once the deadline has passed."""
        self.check_deadline(request.url)
        remaining = self.deadline - time.monotonic()
        given = request.extensions.get("timeout") or {}
        read = min(given.get("read") or STALL_S, STALL_S, remaining)
        request.extensions = {**request.extensions, "timeout": {
            "connect": min(given.get("connect") or CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S, remaining), "read": read,
            "write": read, "pool": read}}

    def record_failure(self, request: httpx2.Request, error: httpx2.TransportError) -> None:
        """Note a request whose host did not connect or answer; raise `TransferStopped` if the same request failed
        before without a byte in between."""
        if isinstance(error, httpx2.ConnectError | httpx2.ConnectTimeout):
            what = f"cannot connect to {request.url.host}: {error}"
        else:
            what = f"no bytes for {request.extensions['timeout']['read']:g} s from {request.url}"
        if _request_key(request) in self.failed:
            raise TransferStopped(what) from error
        self.failed.add(_request_key(request))

    def record_progress(self, request: httpx2.Request) -> None:
        """Bytes arrived: an earlier failure of this request no longer counts."""
        self.failed.discard(_request_key(request))

    def check_deadline(self, url: httpx2.URL) -> None:
        if time.monotonic() > self.deadline:
            raise TransferStopped(f"{url}: the download took longer than {FILE_DEADLINE_S:g} s")

    def note_size(self, response: httpx2.Response) -> None:
        """Remember the first size a response announces for the whole file."""
        if self.announced_size is None:
            self.announced_size = _announced_total(response)

    def body_limit(self, response: httpx2.Response) -> tuple[int, str]:
        """The most bytes ``response``'s body may hold, and what set that limit."""
        limits = []
        if self.announced_size is not None:
            limits.append((self.announced_size - _range_start(response), "the size announced for the file"))
        if "Content-Length" in response.headers:
            limits.append((int(response.headers["Content-Length"]), "its Content-Length"))
        return min(limits, default=(UNANNOUNCED_SIZE_LIMIT, "the limit for a response of unannounced size"))


def _request_key(request: httpx2.Request) -> tuple[str, str]:
    """A request and its retries (which differ by their ``Range`` header only)."""
    return request.method, str(request.url)


_CONTENT_RANGE = re.compile(r"bytes\s+(?P<start>\d+)-\d+/(?P<total>\d+|\*)")


def _content_range(response: httpx2.Response) -> re.Match | None:
    """``Content-Range: bytes <start>-<end>/<total>`` of a ``206`` response; None for any other answer."""
    if response.status_code != 206:
        return None
    return _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())


def _announced_total(response: httpx2.Response) -> int | None:
    """The size of the whole file a response announces: ``X-Linked-Size``, ``Content-Range``'s total, or the
    ``Content-Length`` of a complete answer."""
    headers, content_range = response.headers, _content_range(response)
    if constants.HUGGINGFACE_HEADER_X_LINKED_SIZE in headers:
        return int(headers[constants.HUGGINGFACE_HEADER_X_LINKED_SIZE])
    if content_range is not None and content_range["total"] != "*":
        return int(content_range["total"])
    if response.status_code == 200 and "Content-Length" in headers:
        return int(headers["Content-Length"])
    return None


def _range_start(response: httpx2.Response) -> int:
    """The first byte of the file a response holds: ``Content-Range``'s start for a ``206``, else 0."""
    content_range = _content_range(response)
    return int(content_range["start"]) if content_range is not None else 0


class _BoundedStream(httpx2.SyncByteStream):
    """A response body that stops at its size limit, at the deadline, and when its request stalls twice."""

    def __init__(self, stream: httpx2.SyncByteStream, request: httpx2.Request, bounds: _FileBounds,
                 limit: tuple[int, str]):
        self._stream, self._request, self._bounds = stream, request, bounds
        self._limit, self._limit_reason = limit

    @property
    def elapsed(self) -> datetime.timedelta | None:
        """The wrapped stream's request time, which `httpx2.Response.elapsed` reads."""
        return getattr(self._stream, "elapsed", None)

    def __iter__(self) -> Iterator[bytes]:
        received = 0
        try:
            for chunk in self._stream:
                received += len(chunk)
                if received > self._limit:
                    raise TransferStopped(f"{self._request.url} sent more than {self._limit} bytes "
                                          f"({self._limit_reason}); stopped")
                self._bounds.check_deadline(self._request.url)
                self._bounds.record_progress(self._request)
                yield chunk
        except httpx2.ReadTimeout as error:
            self._bounds.record_failure(self._request, error)
            raise

    def close(self) -> None:
        self._stream.close()


_ACTIVE_BOUNDS: contextvars.ContextVar[_FileBounds | None] = contextvars.ContextVar("released_bounds", default=None)


class BoundedClient(httpx2.Client):
    """The Hub client's HTTP client; while `fetch` downloads a file, every request is held to `_FileBounds`."""

    def send(self, request: httpx2.Request, *, stream: bool = False, **kwargs) -> httpx2.Response:
        bounds = _ACTIVE_BOUNDS.get()
        if bounds is None:
            return super().send(request, stream=stream, **kwargs)
        bounds.admit(request)
        try:
            response = super().send(request, stream=True, **kwargs)
        except (httpx2.ConnectError, httpx2.TimeoutException) as error:
            bounds.record_failure(request, error)
            raise
        bounds.note_size(response)
        response.stream = _BoundedStream(response.stream, request, bounds, bounds.body_limit(response))
        if not stream:
            try:
                response.read()
            except BaseException:
                response.close()
                raise
        return response


def _bounded_client() -> BoundedClient:
    """What `huggingface_hub.set_client_factory` builds: the Hub's default client with `BoundedClient.send`."""
    return BoundedClient(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, timeout=None)


@contextlib.contextmanager
def _bounded_download() -> Iterator[None]:
    """Hold every request of the Hub client in this block to the bounds of one file."""
    if not isinstance(get_session(), BoundedClient):
        set_client_factory(_bounded_client)
    token = _ACTIVE_BOUNDS.set(_FileBounds())
    try:
        yield
    finally:
        _ACTIVE_BOUNDS.reset(token)


# --------------------------------------------------------------------------------------------------
# Fetching


def remote_url(name: str) -> str:
    """Where ``REGISTRY[name]`` is downloaded from (a Hub file's URL follows ``HF_ENDPOINT``)."""
    entry = REGISTRY[name]
    if entry.hub_path is not None:
        return hf_hub_url(HUB_REPO, entry.hub_path, revision=HUB_REVISION)
    return entry.url


def local_path(name: str, dest: str | Path | None) -> Path | None:
    """Where `fetch` puts ``REGISTRY[name]`` for ``dest``; None for a Hub file in the Hub cache (the client decides)."""
    entry = REGISTRY[name]
    if callable(entry.local):
        return Path(entry.local())
    if dest is not None:
        return Path(dest) / entry.local
    if entry.hub_path is None:
        folder = cached_assets_path(ASSETS_LIBRARY, namespace=name, assets_dir=constants.HF_ASSETS_CACHE)
        return folder / Path(entry.local).name
    return None


def _by_hand(name: str, target: Path | None) -> str:
    """What to do without network: the exact path to put a copy at."""
    if target is None:
        return f"download it by hand to {REPO_ROOT / REGISTRY[name].local} and pass dest='{REPO_ROOT}'"
    return f"download it by hand to {target}"


def _reason(error: BaseException) -> str:
    """One line for a failed download: the error, or what offline mode means."""
    if constants.is_offline_mode():
        return "offline mode (HF_HUB_OFFLINE=1) and no local copy"
    message = _one_line(error) or type(error).__name__
    cause = _one_line(error.__cause__) if error.__cause__ is not None else ""
    return f"{message} ({cause})" if cause and cause not in message else message


def _progress(quiet: bool):
    """The Hub client's ``tqdm_class``: its default bar, or none."""
    return functools.partial(tqdm, disable=True) if quiet else None


def _report(quiet: bool, line: str) -> None:
    if not quiet:
        print(line)


@contextlib.contextmanager
def _download_errors(name: str, target: Path | None) -> Iterator[None]:
    """Turn the Hub client's and the bounds' failures into one `DownloadError` naming the by-hand path.

    The Hub client's errors are OSErrors without an errno; one with an errno is the local disk's (full, read-only),
    left as it is for `util.errors.run_cli` to name.
    """
    try:
        yield
    except (OSError, httpx2.HTTPError, TransferStopped, XetDownloadError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise
        raise DownloadError(f"{name}: could not download {remote_url(name)}: {_reason(error)}; "
                            f"{_by_hand(name, target)}") from error


def _remove(path: Path) -> None:
    """Delete ``path`` and, for a Hub cache entry (a link to a blob), the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _verified_or_removed(name: str, path: Path, source: str) -> str:
    """`verify` ``path``; on failure remove it and raise naming where it came from."""
    try:
        return verify(name, path)
    except VerificationError as error:
        _remove(path)
        raise VerificationError(f"{error}; removed it (from {source})") from error


def _new_part(target: Path) -> Path:
    """A new, empty file next to ``target`` (same file system: `os.replace` onto ``target`` is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, part = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=PART_SUFFIX)
    os.close(handle)
    return Path(part)


def _download_hub_file(name: str, target: Path, quiet: bool) -> Path:
    """`hf_hub_download` through a folder next to ``target``; return the downloaded file, a new file beside it."""
    staging = target.parent / STAGING_FOLDER
    try:
        with _bounded_download(), _download_errors(name, target):
            staged = hf_hub_download(HUB_REPO, REGISTRY[name].hub_path, revision=HUB_REVISION, local_dir=staging,
                                     tqdm_class=_progress(quiet))
        part = _new_part(target)
        os.replace(staged, part)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return part


def _download_url(name: str, target: Path, quiet: bool) -> Path:
    """The plain URL's bytes into a new file next to ``target``; return its path."""
    part = _new_part(target)
    try:
        with open(part, "wb") as file, _bounded_download(), _download_errors(name, target):
            http_get(REGISTRY[name].url, file, displayed_filename=target.name, tqdm_class=_progress(quiet))
    except BaseException:
        part.unlink()
        raise
    return part


def _fetch_to(name: str, target: Path, quiet: bool) -> Path:
    """Make ``target`` present and verified: kept if it verifies, else downloaded, verified and moved there."""
    if target.exists():
        try:
            summary = verify(name, target)
        except VerificationError as error:
            target.unlink()
            print(f"{error}; removed it, downloading it again", file=sys.stderr)
        else:
            _report(quiet, f"{name}: {target} already present and verified ({summary})")
            return target
    download = _download_url if REGISTRY[name].hub_path is None else _download_hub_file
    part = download(name, target, quiet)
    summary = _verified_or_removed(name, part, remote_url(name))
    os.replace(part, target)  # the target appears complete and verified, or not at all
    _report(quiet, f"{name}: {target} downloaded and verified ({summary})")
    return target


# The Hub cache's blobs this process has verified: (name, blob identity) -> summary. A blob is named by its content's
# hash, so a notebook that loads a 5 GB checkpoint again pays for its verification once.
_VERIFIED_BLOBS: dict[tuple, str] = {}


def _blob_identity(path: Path) -> tuple:
    """The blob a cache entry links to, with what changes when a file is rewritten: inode, size, times."""
    blob = os.path.realpath(path)
    info = os.stat(blob)
    return blob, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _fetch_into_hub_cache(name: str, quiet: bool) -> Path:
    """`hf_hub_download` into the Hub cache (or its cached copy offline); the verified path."""
    with _bounded_download(), _download_errors(name, None):
        path = Path(hf_hub_download(HUB_REPO, REGISTRY[name].hub_path, revision=HUB_REVISION,
                                    tqdm_class=_progress(quiet)))
    key = (name, *_blob_identity(path))
    if key not in _VERIFIED_BLOBS:
        _VERIFIED_BLOBS[key] = _verified_or_removed(name, path, f"the Hub cache, {remote_url(name)}")
    _report(quiet, f"{name}: {path} verified ({_VERIFIED_BLOBS[key]})")
    return path


def fetch(name: str, dest: str | Path | None = None, quiet: bool = False) -> Path:
    """Make the released file ``name`` present and verified; return its path.

    Args:
        name: a key of `REGISTRY`.
        dest: root of the README's folder layout to put the file in; None: the Hub cache (Hub files) or the Hub's
            assets cache (the others). The Inception weights always go to torch-fidelity's cache.
        quiet: no progress bar and no summary line.

    Raises:
        ValueError: ``name`` is unknown.
        DownloadError: the file could not be downloaded; the message names the URL and the path for a copy by hand.
        VerificationError: the file does not load as its entry promises; it has been removed.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown released file {name!r}; choose from {', '.join(REGISTRY)}")
    target = local_path(name, dest)
    if target is None:
        return _fetch_into_hub_cache(name, quiet)
    return _fetch_to(name, target, quiet)
