"""Download the released TransDiff files by name into the README's folders, each one verified by loading it.

    python tools/download.py transdiff_l kl16 fid_stats_256      # what the README's L evaluation reads
    python tools/download.py inception                           # FID/IS's Inception weights, into torch-hub's cache
    python tools/download.py --list                              # names, URLs, local paths, present or not
    HF_ENDPOINT=http://mirror python tools/download.py transdiff_h_mrar --dest /data/transdiff

A thin command line over `util.released.fetch` (see there for where files go, the bounds on a download and how
each kind is verified). Files land where the README's commands look for them, relative to ``--dest`` (by default
the repository root): ``ckpt/<name>/checkpoint-last.pth`` for ``--resume ckpt/<name>/``, ``ckpt/vae/kl16.ckpt``
for ``--vae_path``, ``fid_stats/*.npz`` for evaluation and ``Imagenet2012_mrar_files.txt`` for ``--mrar_index``;
the Inception weights go to ``$TORCH_HOME/hub/checkpoints/``. The Hugging Face Hub client reads ``HF_ENDPOINT``
(a mirror), ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_TOKEN`` as the Hub documents them.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/download.py`: make `models`/`util` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.errors import run_cli
from util.released import REGISTRY, REPO_ROOT, ReleaseError, fetch, local_path, remote_url


def _format_size(path: Path) -> str:
    size = path.stat().st_size
    exponent = min(int(math.log(max(size, 1), 1024)), 4)
    return f"{size / 1024 ** exponent:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"


def list_files(dest: Path) -> None:
    """Print every entry: name, kind, URL, local path and whether it is there (not verified: no loading)."""
    for name, entry in REGISTRY.items():
        target = local_path(name, dest)
        state = f"present, {_format_size(target)}" if target.is_file() else "absent"
        print(f"{name:18s} {entry.kind:11s} {remote_url(name)} -> {target} ({state})")


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments; the names are `REGISTRY`'s keys."""
    parser = argparse.ArgumentParser(
        description="Download released TransDiff checkpoints, MAR's KL-16 VAE, FID reference statistics, the MRAR "
                    "index and FID's Inception weights into the folders the README's commands use, through the "
                    "Hugging Face Hub client (HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME, HF_TOKEN); each file verified.")
    # Names are checked in `main`: argparse's `choices` rejects an empty `nargs="*"` (needed for --list).
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"files to fetch: {', '.join(REGISTRY)}")
    parser.add_argument("--list", action="store_true", help="list the names, URLs and local paths, and exit")
    parser.add_argument("--dest", default=str(REPO_ROOT),
                        help="root the local paths are relative to (default: the repository root, where the "
                             "README's commands run); the Inception weights always go to $TORCH_HOME/hub/checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no line per verified file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Fetch the named files; return 0 when all are present and verified, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in REGISTRY]
    if unknown:
        parser.error(f"unknown name(s) {', '.join(map(repr, unknown))} (choose from {', '.join(REGISTRY)})")
    if args.list:
        list_files(Path(args.dest))
        return 0
    if not args.names:
        parser.error(f"name at least one file (choose from {', '.join(REGISTRY)}), or pass --list")
    failed = []
    for name in dict.fromkeys(args.names):  # each name once, in the given order
        try:
            fetch(name, args.dest, args.quiet)
        except ReleaseError as error:
            print(f"error: {error}", file=sys.stderr)
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli("download.py", lambda: sys.exit(main()))
