"""Every command the README and the docs show is checked: each `main.py`, `main_cache.py`, tool and benchmark
command is parsed by its own parser (and `main.py`'s resolved by the settings step, its model built on the meta
device), torchrun's flags by torchrun's parser, and each script or file it names exists. A command of a kind this
test does not know fails it, so a new page cannot show an unchecked command."""
import re
import shlex
import sys

import pytest
import torch
from torch.distributed.run import get_args_parser as torchrun_parser

import demo_page
import main
import main_cache
import quickstart
from tests.support import REPO_ROOT
from tests.support.docs import page_commands
from tools import build_mrar_index, digits_metrics, download, make_fid_stats
from util.settings import get_args_parser, resolve_args, resolve_device

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import compare  # noqa: E402
import digits_finetune  # noqa: E402
import digits_sweep  # noqa: E402
import memory  # noqa: E402
import production  # noqa: E402

PAGES = ["README.md", "fid_stats/README.md", *sorted(p.relative_to(REPO_ROOT).as_posix()
                                                     for p in (REPO_ROOT / "docs").glob("*.md"))]
PARSERS = {  # script -> its argument parser
    "demo_page.py": demo_page.get_args_parser,
    "main_cache.py": main_cache.get_args_parser,
    "quickstart.py": quickstart.get_args_parser,
    "tools/download.py": download.build_parser,
    "tools/make_fid_stats.py": make_fid_stats.build_parser,
    "tools/build_mrar_index.py": build_mrar_index.get_args_parser,
    "tools/digits_metrics.py": digits_metrics.get_args_parser,
    "benchmarks/compare.py": compare.get_args_parser,
    "benchmarks/digits_finetune.py": digits_finetune.get_args_parser,
    "benchmarks/digits_sweep.py": digits_sweep.get_args_parser,
    "benchmarks/memory.py": memory.get_args_parser,
    "benchmarks/production.py": production.get_args_parser,
}
SHELL_SCRIPTS = ("scripts/quickstart.sh", "scripts/test.sh", "scripts/gpu_check.sh", "scripts/mutation.sh",
                 "benchmarks/gpu.sh")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


ALL = [(page, command) for page in PAGES for command in page_commands(page)]


SHELL_VALUES = {"NODE_RANK": "0", "MASTER_PORT": "29500", "MASTER_ADDR": "127.0.0.1"}


def argv_of(command: str) -> list[str]:
    """The command's words with ${VARIABLES} as values: a node rank, a port, an address, else a path."""
    return shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: SHELL_VALUES.get(m.group(1), f"/data/{m.group(1)}"), command))


def check_main(argv: list[str]) -> None:
    if argv == ["--help"]:
        with pytest.raises(SystemExit) as exited:
            get_args_parser().parse_args(argv)
        assert exited.value.code == 0
        return
    args = resolve_args(get_args_parser().parse_args(argv))
    with torch.device("meta"):  # full-size weights are never allocated
        model = main.build_model(args)
    assert (model.mrar, model.img_size) == (args.mrar, args.img_size)


def check_script(script: str, argv: list[str]) -> None:
    assert (REPO_ROOT / script).is_file(), f"{script} does not exist"
    if script == "main.py":
        return check_main(argv)
    if script not in PARSERS:
        raise AssertionError(f"{script}: no parser known to this test; add it to PARSERS")
    if "--help" in argv:
        with pytest.raises(SystemExit) as exited:
            PARSERS[script]().parse_args(argv)
        assert exited.value.code == 0
        return
    args = PARSERS[script]().parse_args(argv)
    if script == "main_cache.py":
        resolve_device(args)
    if script == "tools/download.py":
        assert set(args.names) <= set(download.REGISTRY), args.names


CPU_WHEELS = "https://download.pytorch.org/whl/cpu"  # PyTorch's index of CPU-only builds


def check_cpu_wheels(rest: list[str]) -> None:
    """`pip install torch==V torchvision==W --index-url <CPU_WHEELS>`, with requirements.txt's versions."""
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    assert rest[0] == "install" and rest[rest.index("--index-url") + 1] == CPU_WHEELS, rest
    wanted = [word.split("==") for word in rest[1:] if "==" in word]
    assert wanted and all(pins.get(name) == version for name, version in wanted), (wanted, pins)


def check_command(command: str) -> None:
    words = argv_of(command)
    program, rest = words[0], words[1:]
    if program == "bash":
        assert rest[0] in SHELL_SCRIPTS and (REPO_ROOT / rest[0]).is_file(), rest[0]
    elif program in ("python", "python3", ".venv/bin/python"):
        if rest[:2] == ["-m", "venv"]:
            return
        check_script(rest[0], rest[1:])
    elif program == "torchrun":
        launch = torchrun_parser().parse_args(rest)
        check_script(launch.training_script, launch.training_script_args)
    elif program in (".venv/bin/pip", "pip"):
        if rest[:2] == ["install", "-r"]:
            assert (REPO_ROOT / rest[2]).is_file(), command
        else:
            check_cpu_wheels(rest)
    elif program == "conda":
        if rest[:2] == ["env", "create"]:
            assert (REPO_ROOT / rest[rest.index("-f") + 1]).is_file()
        else:
            assert rest == ["activate", "transdiff"], command
    else:
        raise AssertionError(f"a command this test does not know: {command!r}")


def test_the_pages_show_commands():
    assert {page for page, _ in ALL} >= {"README.md", "docs/training.md", "docs/evaluation.md", "docs/gpu.md"}
    assert len(ALL) >= 25


@pytest.mark.parametrize("page,command", ALL, ids=[f"{page}:{i}" for i, (page, _) in enumerate(ALL)])
def test_every_command_shown_is_valid(monkeypatch, page, command):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    check_command(command)


def test_an_unknown_command_fails_this_test():
    with pytest.raises(AssertionError, match="does not know"):
        check_command("make everything")
    with pytest.raises(AssertionError, match="no parser known"):
        check_command("python tests/conftest.py --x")


def test_a_cpu_only_install_must_pin_the_requirements_versions():
    torch_pin = next(line for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                     if line.startswith("torch=="))
    check_command(f"pip install {torch_pin} --index-url {CPU_WHEELS}")
    with pytest.raises(AssertionError):
        check_command(f"pip install torch==2.0.0 --index-url {CPU_WHEELS}")
    with pytest.raises(AssertionError):
        check_command(f"pip install {torch_pin} --index-url https://example.org/simple")
