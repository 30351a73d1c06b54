"""tools/download.py against a local HTTP server: complete, resumed, skipped and refused downloads.

The registry is replaced by four small files of each kind (a `transdiff_tiny` checkpoint, 8-dimensional
statistics, a 3-line MRAR index, a two-level VAE), served by a `ThreadingHTTPServer` on 127.0.0.1 that honours
``Range`` and can drop a connection half-way through a response once.
"""
import dataclasses
import hashlib
import io
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from models.transdiff import TRANSDIFF_MODELS
from models.vae import AutoencoderKL
from tools import download
from util.checkpoint import save_checkpoint
from util.data.datasets import MRAR_GROUP_SIZE
from util.eval.fidelity import DEFAULT_FID_STATS, save_reference_statistics
from util.presets import SAMPLING_PRESETS
from util.settings import get_args_parser

TINY_SPEC = download.CheckpointSpec("transdiff_tiny", mrar=False, img_size=32, class_num=10)
TINY_VAE = {"ch": 32, "ch_mult": (1, 2)}
STATS_DIM = 8


class _MirrorServer(ThreadingHTTPServer):
    """Serves ``files`` (remote name -> bytes), records ``(name, Range header)`` per request."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_once: set[str] = set()  # names whose next response stops half-way and closes the connection
        self.honour_range = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mirror"


class _Handler(BaseHTTPRequestHandler):
    server: _MirrorServer

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/redirect/"):  # like Hugging Face's resolve/ URLs, which redirect to a CDN
            self.send_response(302)
            self.send_header("Location", "/mirror/" + self.path.removeprefix("/redirect/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        name = self.path.removeprefix("/mirror/")
        requested_range = self.headers.get("Range")
        self.server.requests.append((name, requested_range))
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if requested_range and self.server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested_range).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.server.drop_once:
            self.server.drop_once.discard(name)
            body = body[:len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = _MirrorServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _dead_url() -> str:
    """A URL on a local port nobody listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone"


def _checkpoint_bytes(tmp_path: Path, img_size: int = TINY_SPEC.img_size) -> bytes:
    torch.manual_seed(0)
    model = TRANSDIFF_MODELS[TINY_SPEC.model](img_size=img_size, class_num=TINY_SPEC.class_num)
    path = tmp_path / f"made-{img_size}.pth"
    save_checkpoint(str(path), {"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 3})
    return path.read_bytes()


def _stats_bytes(tmp_path: Path, dim: int = STATS_DIM, nan: bool = False) -> bytes:
    features = np.random.default_rng(0).standard_normal((32, dim))
    sigma = np.cov(features, rowvar=False)
    if nan:
        sigma[0, 0] = np.nan
    path = tmp_path / "made-stats.npz"
    save_reference_statistics(path, features.mean(0), sigma)
    return path.read_bytes()


def _index_bytes() -> bytes:
    lines = [{"cate": f"n0{i}", "files": [f"img{j}.JPEG" for j in range(MRAR_GROUP_SIZE)]} for i in range(3)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _vae_bytes() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save({"model": AutoencoderKL(**TINY_VAE).state_dict()}, buffer)
    return buffer.getvalue()


@pytest.fixture
def mirror(server, tmp_path, monkeypatch):
    """The server with four small files and a registry naming them; entries' own base URL is dead."""
    dead = _dead_url()
    registry = {
        "ckpt": download.RemoteFile("m/checkpoint-last.pth", "ckpt/m/checkpoint-last.pth", "checkpoint",
                                    base_url=dead, checkpoint=TINY_SPEC),
        "stats": download.RemoteFile("stats.npz", "fid_stats/stats.npz", "fid_stats", base_url=dead,
                                     feature_dim=STATS_DIM),
        "index": download.RemoteFile("index.txt", "index.txt", "mrar_index", base_url=dead),
        "vae": download.RemoteFile("vae/checkpoint-last.pth", "ckpt/vae/kl16.ckpt", "vae", base_url=dead,
                                   vae_config=TINY_VAE),
    }
    server.files.update({
        "m/checkpoint-last.pth": _checkpoint_bytes(tmp_path),
        "stats.npz": _stats_bytes(tmp_path),
        "index.txt": _index_bytes(),
        "vae/checkpoint-last.pth": _vae_bytes(),
    })
    monkeypatch.setattr(download, "REGISTRY", registry)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)
    return server


def _run(server, dest: Path, *args: str) -> int:
    return download.main([*args, "--base_url", server.url, "--dest", str(dest)])


def _target(name: str, dest: Path) -> Path:
    return dest / download.REGISTRY[name].local


def _part(name: str, dest: Path) -> Path:
    target = _target(name, dest)
    return target.with_name(target.name + download.PART_SUFFIX)


def _leftovers(dest: Path) -> list[Path]:
    return [path for path in dest.rglob("*") if path.is_file() and path.name.endswith((".part", ".tmp"))]


def test_downloads_and_verifies_every_kind(mirror, tmp_path, capsys):
    dest = tmp_path / "dest"
    assert _run(mirror, dest, "ckpt", "stats", "index", "vae") == 0
    for name, entry in download.REGISTRY.items():
        assert _target(name, dest).read_bytes() == mirror.files[entry.remote]
    assert _leftovers(dest) == []
    assert sorted(mirror.requests) == sorted((entry.remote, None) for entry in download.REGISTRY.values())
    out = capsys.readouterr().out
    assert "'model_ema' loads strictly into --model transdiff_tiny --img_size 32" in out
    assert f"mu ({STATS_DIM},) float32, sigma ({STATS_DIM}, {STATS_DIM}) float64" in out
    assert "3 MRAR groups" in out


def test_resumes_after_dropped_connection(mirror, tmp_path, capsys):
    dest, remote = tmp_path / "dest", "m/checkpoint-last.pth"
    mirror.drop_once.add(remote)
    assert _run(mirror, dest, "ckpt") == 0  # progress bar on
    half = len(mirror.files[remote]) // 2
    assert mirror.requests == [(remote, None), (remote, f"bytes={half}-")]
    assert _target("ckpt", dest).read_bytes() == mirror.files[remote]
    assert _leftovers(dest) == []
    assert "retrying" in capsys.readouterr().err


def test_resumes_through_redirect(mirror, tmp_path):
    dest, remote = tmp_path / "dest", "vae/checkpoint-last.pth"
    mirror.drop_once.add(remote)
    redirecting = mirror.url.replace("/mirror", "/redirect")
    assert download.main(["vae", "--base_url", redirecting, "--dest", str(dest), "--quiet"]) == 0
    assert mirror.requests == [(remote, None), (remote, f"bytes={len(mirror.files[remote]) // 2}-")]
    assert _target("vae", dest).read_bytes() == mirror.files[remote]


def test_interrupted_run_keeps_part_and_next_run_resumes(mirror, tmp_path, capsys):
    dest, remote = tmp_path / "dest", "index.txt"
    mirror.drop_once.add(remote)
    assert _run(mirror, dest, "index", "--retries", "0", "--quiet") == 1
    half = len(mirror.files[remote]) // 2
    assert not _target("index", dest).exists()
    assert _part("index", dest).read_bytes() == mirror.files[remote][:half]
    assert "rerun to resume" in capsys.readouterr().err
    assert _run(mirror, dest, "index", "--quiet") == 0
    assert mirror.requests[-1] == (remote, f"bytes={half}-")
    assert _target("index", dest).read_bytes() == mirror.files[remote]
    assert _leftovers(dest) == []


def test_server_ignoring_range_starts_over(mirror, tmp_path):
    dest, remote = tmp_path / "dest", "stats.npz"
    mirror.honour_range = False
    _part("stats", dest).parent.mkdir(parents=True)
    _part("stats", dest).write_bytes(b"not the start of the file")
    assert _run(mirror, dest, "stats", "--quiet") == 0
    assert mirror.requests == [(remote, "bytes=25-")]  # answered with 200 and the whole file
    assert _target("stats", dest).read_bytes() == mirror.files[remote]
    assert _leftovers(dest) == []


def test_complete_part_is_finished_without_download(mirror, tmp_path):
    dest, remote = tmp_path / "dest", "index.txt"
    dest.mkdir()
    _part("index", dest).write_bytes(mirror.files[remote])
    assert _run(mirror, dest, "index", "--quiet") == 0
    assert mirror.requests == [(remote, f"bytes={len(mirror.files[remote])}-")]  # 416: nothing left to fetch
    assert _target("index", dest).read_bytes() == mirror.files[remote]


def test_skips_complete_file_without_request(mirror, tmp_path, capsys):
    dest = tmp_path / "dest"
    assert _run(mirror, dest, "ckpt", "vae", "--quiet") == 0
    mirror.requests.clear()
    capsys.readouterr()
    assert _run(mirror, dest, "ckpt", "vae", "--quiet") == 0
    assert mirror.requests == []
    assert capsys.readouterr().out.count("already present and verified") == 2


def test_replaces_invalid_existing_file(mirror, tmp_path, capsys):
    dest = tmp_path / "dest"
    _target("stats", dest).parent.mkdir(parents=True)
    _target("stats", dest).write_bytes(b"a half-copied file")
    assert _run(mirror, dest, "stats", "--quiet") == 0
    assert _target("stats", dest).read_bytes() == mirror.files["stats.npz"]
    assert "downloading it again" in capsys.readouterr().err


@pytest.mark.parametrize("name, make_bad, reason", [
    ("ckpt", lambda tmp: _checkpoint_bytes(tmp)[:-1000], "is not a PyTorch checkpoint"),
    ("ckpt", lambda tmp: _checkpoint_bytes(tmp, img_size=64), "size mismatch"),
    ("vae", lambda tmp: b"\0" * 4096, "not a readable torch checkpoint"),
    ("stats", lambda tmp: _stats_bytes(tmp, nan=True), "non-finite values"),
    ("stats", lambda tmp: _stats_bytes(tmp, dim=4), "mu has shape (4,)"),
    ("index", lambda tmp: _index_bytes() + b'{"cate": "n09", "files": ["a.JPEG"]}\n', "line 4"),
])
def test_refuses_invalid_download(mirror, tmp_path, capsys, name, make_bad, reason):
    """The server sends a complete but invalid file: refused, the .part deleted, no target written."""
    dest = tmp_path / "dest"
    mirror.files[download.REGISTRY[name].remote] = make_bad(tmp_path)
    assert _run(mirror, dest, name, "--quiet") == 1
    err = capsys.readouterr().err
    assert f"{name}: {_part(name, dest)} is not a valid" in err and reason in err
    assert f"refused the download of {mirror.url}/{download.REGISTRY[name].remote}" in err
    assert not _target(name, dest).exists()
    assert _leftovers(dest) == []


def test_checks_recorded_sha256(mirror, tmp_path, monkeypatch, capsys):
    dest, entry = tmp_path / "dest", download.REGISTRY["index"]
    monkeypatch.setitem(download.REGISTRY, "index", dataclasses.replace(entry, sha256="0" * 64))
    assert _run(mirror, dest, "index", "--quiet") == 1
    assert "expected " + "0" * 64 in capsys.readouterr().err
    assert not _target("index", dest).exists() and _leftovers(dest) == []
    digest = hashlib.sha256(mirror.files[entry.remote]).hexdigest()
    monkeypatch.setitem(download.REGISTRY, "index", dataclasses.replace(entry, sha256=digest))
    assert _run(mirror, dest, "index", "--quiet") == 0


def test_unknown_name_lists_choices(mirror, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(mirror, tmp_path, "ckpt", "nope")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and all(name in err for name in download.REGISTRY)
    assert mirror.requests == []


def test_http_error_names_url(mirror, tmp_path, monkeypatch, capsys):
    entry = download.REGISTRY["index"]
    monkeypatch.setitem(download.REGISTRY, "index", dataclasses.replace(entry, remote="missing.txt"))
    assert _run(mirror, tmp_path, "index", "--quiet") == 1
    err = capsys.readouterr().err
    assert f"could not download {mirror.url}/missing.txt" in err and "404" in err
    assert len(mirror.requests) == 1  # a 404 is not retried
    assert _leftovers(tmp_path) == []


def test_connection_error_names_url(mirror, tmp_path, capsys):
    """Without --base_url the entry's own (here dead) URL is used; the error names it."""
    assert download.main(["stats", "--dest", str(tmp_path), "--retries", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    url = download.REGISTRY["stats"].url()
    assert f"could not download {url} after 2 attempts" in err
    assert not _target("stats", tmp_path).exists()


def test_list_shows_urls_and_paths(mirror, tmp_path, capsys):
    assert _run(mirror, tmp_path, "--list") == 0
    out = capsys.readouterr().out
    for entry in download.REGISTRY.values():
        assert f"{mirror.url}/{entry.remote}" in out and str(tmp_path / entry.local) in out
    assert mirror.requests == []


def test_release_registry_matches_readme_paths():
    """The real registry: every preset's checkpoint where `--resume ckpt/<name>/` finds it, builds on meta."""
    registry = download.REGISTRY
    assert set(SAMPLING_PRESETS) | {"kl16", "fid_stats_256", "fid_stats_512", "mrar_index"} == set(registry)
    assert all(entry.kind in download.VERIFIERS and entry.url().startswith("https://") for entry in registry.values())
    assert registry["kl16"].local == "ckpt/vae/kl16.ckpt"
    assert {registry["fid_stats_256"].local, registry["fid_stats_512"].local} == set(DEFAULT_FID_STATS.values())
    assert registry["mrar_index"].local == get_args_parser().get_default("mrar_index")
    for name in SAMPLING_PRESETS:
        entry = registry[name]
        assert entry.local == f"ckpt/{name}/checkpoint-last.pth"
        spec = entry.checkpoint
        with torch.device("meta"):
            model = TRANSDIFF_MODELS[spec.model](img_size=spec.img_size, mrar=spec.mrar, patch_size=spec.patch_size)
        assert model.img_size == SAMPLING_PRESETS[name].img_size
