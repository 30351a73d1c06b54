"""util/released.py and tools/download.py against a local Hugging Face Hub (tests/support/hub_server.py).

The registry is replaced by small files of each kind (a `transdiff_tiny` checkpoint, 8-dimensional statistics, a
3-line MRAR index, a two-level VAE) held by a `HubServer` on 127.0.0.1, plus one plain-URL file. The Hub client is
pointed at it as ``HF_ENDPOINT`` would, its cache is a temporary folder, and name resolution refuses every host but
127.0.0.1, so nothing leaves the machine.
"""
import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants

from models.transdiff import TRANSDIFF_MODELS
from models.vae import AutoencoderKL
from tests.support.hub_server import COMMIT, HubServer, serving
from tools import download
from util import released
from util.checkpoint import save_checkpoint
from util.data.datasets import MRAR_GROUP_SIZE
from util.eval.fidelity import DEFAULT_FID_STATS, hub_inception_weights_path, save_reference_statistics
from util.presets import SAMPLING_PRESETS
from util.settings import get_args_parser

TINY_SPEC = released.CheckpointSpec("transdiff_tiny", mrar=False, img_size=32, class_num=10)
TINY_VAE = {"ch": 32, "ch_mult": (1, 2)}
STATS_DIM = 8
CHUNK_BYTES = 1 << 16  # the Hub client's write unit here (10 MiB by default): a resume starts at a multiple of it
UNREACHABLE = "http://nonexistent.invalid"


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
def only_local_hosts(monkeypatch):
    """Name resolution answers 127.0.0.1 only; every other host is unknown. Returns the hosts asked for."""
    asked = []
    resolve = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        asked.append(host)
        if host not in ("127.0.0.1", "localhost"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    return asked


def _point_hub_client_at(monkeypatch, endpoint: str) -> None:
    """What ``HF_ENDPOINT=<endpoint>`` does (the client reads it once, at import)."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of the tiny registry's files, made once."""
    folder = tmp_path_factory.mktemp("made")
    return {"tiny/checkpoint-last.pth": _checkpoint_bytes(folder), "vae/checkpoint-last.pth": _vae_bytes(),
            "stats.npz": _stats_bytes(folder), "index.txt": _index_bytes()}


@pytest.fixture
def hub(tmp_path, monkeypatch, only_local_hosts, tiny_files):
    """A local Hub holding the tiny registry's files; caches in tmp_path; the Hub client pointed at it."""
    with serving(HubServer(released.HUB_REPO)) as server:
        _point_hub_client_at(monkeypatch, server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(tmp_path / "hf" / "assets"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK_BYTES)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        registry = {
            "ckpt": released.ReleasedFile("checkpoint", "ckpt/tiny/checkpoint-last.pth",
                                          hub_path="tiny/checkpoint-last.pth", checkpoint=TINY_SPEC),
            "vae": released.ReleasedFile("vae", "ckpt/vae/kl16.ckpt", hub_path="vae/checkpoint-last.pth",
                                         vae_config=TINY_VAE),
            "stats": released.ReleasedFile("fid_stats", "fid_stats/stats.npz", hub_path="stats.npz",
                                           feature_dim=STATS_DIM),
            "index": released.ReleasedFile("mrar_index", "index.txt", hub_path="index.txt"),
            "plain": released.ReleasedFile("fid_stats", "fid_stats/plain.npz", url=server.plain_url("plain.npz"),
                                           feature_dim=STATS_DIM),
        }
        monkeypatch.setattr(released, "REGISTRY", registry)
        monkeypatch.setattr(download, "REGISTRY", registry)
        monkeypatch.setattr(released, "_VERIFIED_BLOBS", {})
        server.files.update(tiny_files)
        server.plain["plain.npz"] = tiny_files["stats.npz"]
        yield server


def _served(hub: HubServer, name: str) -> bytes:
    entry = released.REGISTRY[name]
    return hub.files[entry.hub_path] if entry.hub_path else hub.plain[entry.url.rpartition("/")[2]]


def _path(hub: HubServer, name: str) -> str:
    """The URL path the file is served at."""
    entry = released.REGISTRY[name]
    return hub.resolve_path(entry.hub_path) if entry.hub_path else "/plain/" + entry.url.rpartition("/")[2]


def _file_requests(hub: HubServer) -> list[tuple[str, str, str | None]]:
    """The server's requests for files (the client also asks the Hub's API for its own settings)."""
    return [request for request in hub.requests if not request[1].startswith("/api/")]


def _leftovers(dest: Path) -> list[Path]:
    return [path for path in dest.rglob("*") if path.name.endswith(".part") or released.STAGING_FOLDER in path.parts]


def test_downloads_every_kind_into_the_readme_layout(hub, tmp_path):
    dest = tmp_path / "dest"
    assert download.main(["ckpt", "vae", "stats", "index", "plain", "--dest", str(dest), "--quiet"]) == 0
    for name, entry in released.REGISTRY.items():
        assert (dest / entry.local).read_bytes() == _served(hub, name)
    assert _leftovers(dest) == []
    hub_files = [_path(hub, name) for name in ("ckpt", "vae", "stats", "index")]
    assert sorted(_file_requests(hub)) == sorted([("HEAD", path, None) for path in hub_files]
                                                 + [("GET", path, None) for path in hub_files]
                                                 + [("GET", _path(hub, "plain"), None)])


def test_reports_what_each_file_verified_as(hub, tmp_path, capsys):
    released.fetch("ckpt", tmp_path)
    released.fetch("stats", tmp_path)
    out = capsys.readouterr().out
    assert "'model_ema' loads strictly into --model transdiff_tiny --img_size 32" in out
    assert f"mu ({STATS_DIM},) float32, sigma ({STATS_DIM}, {STATS_DIM}) float64" in out


def test_without_dest_files_go_to_the_hub_cache(hub, tmp_path):
    path = released.fetch("index", quiet=True)
    assert path.is_relative_to(constants.HF_HUB_CACHE) and path.read_bytes() == _served(hub, "index")
    plain = released.fetch("plain", quiet=True)
    assert plain.is_relative_to(constants.HF_ASSETS_CACHE) and plain.read_bytes() == _served(hub, "plain")


def test_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    url_path, data = _path(hub, "ckpt"), _served(hub, "ckpt")
    hub.faults[url_path] = "drop_once"
    path = released.fetch("ckpt", tmp_path, quiet=True)
    gets = [request for request in _file_requests(hub) if request[0] == "GET"]
    resumed_at = len(data) // 2 // CHUNK_BYTES * CHUNK_BYTES  # the whole chunks written before the drop
    assert resumed_at > 0 and gets == [("GET", url_path, None), ("GET", url_path, f"bytes={resumed_at}-")]
    assert path.read_bytes() == data


def test_offline_mode_serves_the_cache_without_any_request(hub, monkeypatch):
    cached = released.fetch("vae", quiet=True)
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert released.fetch("vae", quiet=True) == cached
    with pytest.raises(released.DownloadError, match="offline mode .HF_HUB_OFFLINE=1."):
        released.fetch("stats", quiet=True)
    assert hub.requests == []


def test_a_cached_file_is_verified_once_per_process_until_it_changes(hub, monkeypatch):
    verified = []
    checkpoint_verifier = released.VERIFIERS["checkpoint"]
    monkeypatch.setitem(released.VERIFIERS, "checkpoint", lambda path, entry: verified.append(path)
                        or checkpoint_verifier(path, entry))
    first = released.fetch("ckpt", quiet=True)
    assert released.fetch("ckpt", quiet=True) == first and len(verified) == 1
    blob = Path(os.path.realpath(first))
    replacement = blob.with_name("replacement")
    replacement.write_bytes(bytes(blob.stat().st_size))  # the same size, another file
    os.replace(replacement, blob)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # served from the cache as it is now
    with pytest.raises(released.VerificationError, match="ckpt: .* is not a valid checkpoint file"):
        released.fetch("ckpt", quiet=True)
    assert len(verified) == 2 and not blob.exists()


def test_verified_file_in_place_is_used_without_any_request(hub, tmp_path, capsys):
    released.fetch("ckpt", tmp_path, quiet=True)
    hub.requests.clear()
    assert released.fetch("ckpt", tmp_path) == tmp_path / released.REGISTRY["ckpt"].local
    assert hub.requests == []
    assert "already present and verified" in capsys.readouterr().out


def test_invalid_file_in_place_is_replaced(hub, tmp_path, capsys):
    target = tmp_path / released.REGISTRY["stats"].local
    target.parent.mkdir(parents=True)
    target.write_bytes(b"a half-copied file")
    released.fetch("stats", tmp_path, quiet=True)
    assert target.read_bytes() == _served(hub, "stats")
    assert f"stats: {target} is not a valid fid_stats file" in capsys.readouterr().err


@pytest.mark.parametrize("name, make_bad, reason", [
    ("ckpt", lambda tmp: _checkpoint_bytes(tmp)[:-1000], "is not a PyTorch checkpoint"),
    ("ckpt", lambda tmp: _checkpoint_bytes(tmp, img_size=64), "size mismatch"),
    ("vae", lambda tmp: b"\0" * 4096, "not a readable torch checkpoint"),
    ("stats", lambda tmp: _stats_bytes(tmp, nan=True), "non-finite values"),
    ("stats", lambda tmp: _stats_bytes(tmp, dim=4), "mu has shape (4,)"),
    ("index", lambda tmp: _index_bytes() + b'{"cate": "n09", "files": ["a.JPEG"]}\n', "line 4"),
    ("plain", lambda tmp: b"not an npz", "not a valid fid_stats file"),
])
def test_corrupt_download_is_refused_by_name_and_removed(hub, tmp_path, name, make_bad, reason):
    entry, dest = released.REGISTRY[name], tmp_path / "dest"
    bad = make_bad(tmp_path)
    if entry.hub_path:
        hub.files[entry.hub_path] = bad
    else:
        hub.plain[entry.url.rpartition("/")[2]] = bad
    with pytest.raises(released.VerificationError) as refused:
        released.fetch(name, dest, quiet=True)
    message = str(refused.value)
    assert message.startswith(f"{name}: ") and reason in message and "removed it" in message
    assert "\n" not in message
    assert not (dest / entry.local).exists() and _leftovers(dest) == []


def test_corrupt_file_is_removed_from_the_hub_cache(hub):
    hub.files["index.txt"] = b"not json\n"
    cached = Path(constants.HF_HUB_CACHE, "models--zhendch--Transdiff", "snapshots", COMMIT, "index.txt")
    with pytest.raises(released.VerificationError, match=f"index: {cached} is not a valid mrar_index file: .*line 1"):
        released.fetch("index", quiet=True)
    assert not cached.exists() and list(Path(constants.HF_HUB_CACHE).rglob("blobs/*")) == []


@pytest.mark.parametrize("fault", ["endless", "oversize"])
def test_more_bytes_than_announced_are_stopped(hub, tmp_path, fault):
    hub.faults[_path(hub, "index")] = fault
    size = len(_served(hub, "index"))
    with pytest.raises(released.DownloadError, match=f"sent more than {size} bytes .the size announced for the file."):
        released.fetch("index", tmp_path, quiet=True)
    assert _leftovers(tmp_path) == []


def test_endless_response_without_announced_size_is_stopped(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(released, "UNANNOUNCED_SIZE_LIMIT", 1 << 20)
    hub.faults[_path(hub, "plain")] = "endless"
    with pytest.raises(released.DownloadError, match="sent more than 1048576 bytes .the limit for a response of"):
        released.fetch("plain", tmp_path, quiet=True)
    assert _leftovers(tmp_path) == []


def test_stalled_server_is_named(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(released, "STALL_S", 0.3)
    hub.faults[_path(hub, "vae")] = "stall"
    with pytest.raises(released.DownloadError, match=f"no bytes for 0.3 s from {hub.endpoint}"):
        released.fetch("vae", tmp_path, quiet=True)


def test_trickling_server_hits_the_deadline(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(released, "FILE_DEADLINE_S", 0.5)
    hub.faults[_path(hub, "index")] = "trickle"
    with pytest.raises(released.DownloadError, match="the download took longer than 0.5 s"):
        released.fetch("index", tmp_path, quiet=True)


def test_unresolvable_host_fails_at_once_with_the_path_for_a_copy_by_hand(hub, tmp_path, monkeypatch,
                                                                           only_local_hosts):
    _point_hub_client_at(monkeypatch, UNREACHABLE)
    target = tmp_path / released.REGISTRY["ckpt"].local
    with pytest.raises(released.DownloadError) as failed:
        released.fetch("ckpt", tmp_path, quiet=True)
    message = str(failed.value)
    assert "cannot connect to nonexistent.invalid" in message
    assert message.startswith(f"ckpt: could not download {UNREACHABLE}/{released.HUB_REPO}/resolve/main/tiny/")
    assert message.endswith(f"; download it by hand to {target}")
    file_lookups = [host for host in only_local_hosts if host == "nonexistent.invalid"]
    assert len(file_lookups) <= 3  # the client's settings request, the file's HEAD and one retry: no backoff


def test_cli_reports_a_failure_in_one_line_and_goes_on(hub, tmp_path, capsys):
    hub.files.pop("stats.npz")
    assert download.main(["stats", "index", "--dest", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"could not download {hub.endpoint}/{released.HUB_REPO}/resolve/main/stats.npz" in err
    assert "failed: stats" in err and (tmp_path / "index.txt").exists()


def test_list_shows_names_urls_paths_and_presence(hub, tmp_path, capsys):
    released.fetch("index", tmp_path, quiet=True)
    hub.requests.clear()
    assert download.main(["--list", "--dest", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in released.REGISTRY:
        line = next(line for line in lines if line.split()[0] == name)
        assert released.remote_url(name) in line and str(tmp_path / released.REGISTRY[name].local) in line
        assert line.endswith("(absent)") != (name == "index")
    assert hub.requests == []


def test_unknown_name_lists_choices(hub, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        download.main(["ckpt", "nope", "--dest", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and all(name in err for name in released.REGISTRY)


def test_inception_weights_go_where_fid_reads_them(hub, tmp_path, monkeypatch, inception_weights):
    hub.plain["inception.pth"] = inception_weights.read_bytes()
    registry = {"inception": released.ReleasedFile("inception", hub_inception_weights_path,
                                                   url=hub.plain_url("inception.pth"))}
    monkeypatch.setattr(released, "REGISTRY", registry)
    path = released.fetch("inception", tmp_path / "ignored", quiet=True)
    assert path == Path(hub_inception_weights_path()) and path.is_relative_to(tmp_path / "torch" / "hub")
    assert path.read_bytes() == hub.plain["inception.pth"]


def test_release_registry_matches_readme_paths():
    """The real registry: every preset's checkpoint where `--resume ckpt/<name>/` finds it, builds on meta."""
    registry = released.REGISTRY
    assert download.REGISTRY is registry
    others = {"kl16", "fid_stats_256", "fid_stats_512", "mrar_index", "inception"}
    assert set(SAMPLING_PRESETS) | others == set(registry)
    assert all(entry.kind in released.VERIFIERS and (entry.hub_path is None) != (entry.url is None)
               for entry in registry.values())
    assert registry["kl16"].local == "ckpt/vae/kl16.ckpt"
    assert {registry["fid_stats_256"].local, registry["fid_stats_512"].local} == set(DEFAULT_FID_STATS.values())
    assert registry["mrar_index"].local == get_args_parser().get_default("mrar_index")
    assert released.local_path("inception", "anywhere") == Path(hub_inception_weights_path())
    assert registry["inception"].url.endswith("/v0.2.0/weights-inception-2015-12-05-6726825d.pth")
    for name in SAMPLING_PRESETS:
        entry = registry[name]
        assert entry.local == f"ckpt/{name}/checkpoint-last.pth"
        assert released.remote_url(name).endswith(f"/{released.HUB_REPO}/resolve/main/{name}/checkpoint-last.pth")
        spec = entry.checkpoint
        with torch.device("meta"):
            model = TRANSDIFF_MODELS[spec.model](img_size=spec.img_size, mrar=spec.mrar, patch_size=spec.patch_size)
        assert model.img_size == SAMPLING_PRESETS[name].img_size
