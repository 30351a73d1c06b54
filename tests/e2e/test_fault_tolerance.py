"""The fault campaign as tests: kills during training and checkpoint writes, mid-epoch and SIGTERM resume, elastic
restarts, evaluations that cannot mix models, truncated images, and caching with a late rank. Tiny model, CPU."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support import REPO_ROOT, preloaded
from tests.support.runs import ENV, EVAL, TINY, eval_folder, pngs, run
from util.checkpoint import load_checkpoint
from util.data.latent_cache import complete_shards, open_latent_cache

# 24 images, batch 2: 12 batches per epoch on one rank.
FAST = [*TINY, "--batch_size", 2, "--save_last_freq", 1]


def launch(args, nproc=1, max_restarts=0, **popen):
    """Start main.py (forked from the preloading server, or under torchrun with `nproc` processes), text output."""
    argv = ["main.py", *map(str, args)]
    if nproc == 1:
        return preloaded.start(argv, ENV, **popen)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                f"--max-restarts={max_restarts}"]
    return subprocess.Popen([*torchrun, *argv], cwd=REPO_ROOT, env=ENV, text=True, **popen)


def assert_same_weights(a_dir, b_dir):
    a, b = load_checkpoint(str(a_dir / "checkpoint-last.pth")), load_checkpoint(str(b_dir / "checkpoint-last.pth"))
    assert a["epoch"] == b["epoch"]
    for part in ("model", "model_ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key])


def temp_files(folder):
    return [p.name for p in Path(folder).rglob(".*.tmp")]


@pytest.mark.parametrize("nproc,accumulation", [(1, 2), (2, 1), (2, 2)],
                         ids=["1rank_accum2", "2ranks", "2ranks_accum2"])
def test_sigterm_saves_mid_epoch_and_the_resumed_run_is_bit_identical(tmp_path, data, nproc, accumulation):
    args = [*FAST, "--data_path", data, "--epochs", 3, "--gradient_accumulation_steps", accumulation,
            "--save_every_steps", 2]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run([*args, "--output_dir", straight], nproc=nproc)
    kwargs = dict(start_new_session=True) if nproc > 1 else {}
    process = launch([*args, "--output_dir", stopped], nproc, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     **kwargs)
    for line in process.stdout:
        if "at epoch 1, batch" in line and "saved" in line:
            (os.killpg(process.pid, signal.SIGTERM) if nproc > 1 else process.send_signal(signal.SIGTERM))
            break
    output = process.stdout.read()
    code = process.wait(timeout=120)
    assert code == 143 if nproc == 1 else code != 0, output[-2000:]  # torchrun reports its workers' failure
    checkpoint = load_checkpoint(str(stopped / "checkpoint-last.pth"))
    assert checkpoint["epoch"] == 1 and 0 < checkpoint["epoch_step"] < checkpoint["steps_per_epoch"], output[-2000:]
    assert len(checkpoint["rng_states"]) == nproc
    result = run([*args, "--output_dir", stopped], nproc=nproc)
    assert "continuing at batch" in result.stdout + result.stderr
    assert_same_weights(straight, stopped)
    epochs = [json.loads(line)["epoch"] for line in (stopped / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def worker_of_rank(torchrun_pid: int, output_dir, rank: int) -> int:
    """The pid of torchrun's worker of `rank` for the run into `output_dir` (from the workers' environments)."""
    workers = subprocess.run(["pgrep", "-f", f"output_dir {output_dir}"], capture_output=True, text=True)
    for pid in map(int, workers.stdout.split()):
        if pid != torchrun_pid and f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.parametrize("nproc", [1, 2], ids=["1rank", "sigterm_to_rank_1_of_2"])
def test_sigterm_alone_saves_at_the_next_step_and_every_rank_saves_there(tmp_path, data, nproc):
    """No periodic save in the way: the SIGTERM itself makes the save, at the next optimizer step, inside the
    epoch. With 2 ranks it reaches rank 1 only; both ranks save together (one checkpoint holding both ranks'
    states) and stop, and the resumed run equals an uninterrupted one."""
    args = [*FAST, "--data_path", data, "--epochs", 30, "--preview_freq", 0]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run([*args, "--output_dir", straight], nproc=nproc)
    process = launch([*args, "--output_dir", stopped], nproc, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in process.stdout:
        if re.search(r"Epoch: \[1\]\s+\[\s*0/", line):  # rank 0 finished epoch 1's first step
            os.kill(process.pid if nproc == 1 else worker_of_rank(process.pid, stopped, 1), signal.SIGTERM)
            break
    output = process.stdout.read()
    code = process.wait(timeout=120)
    assert code == 143 if nproc == 1 else code != 0, output[-2000:]
    assert "SIGTERM: saved" in output
    checkpoint = load_checkpoint(str(stopped / "checkpoint-last.pth"))
    assert 1 <= checkpoint["epoch"] < 29 and 0 < checkpoint["epoch_step"] < checkpoint["steps_per_epoch"]
    assert len(checkpoint["rng_states"]) == nproc
    run([*args, "--output_dir", stopped], nproc=nproc)
    assert_same_weights(straight, stopped)


def test_save_every_minutes_saves_inside_epochs(tmp_path, data):
    out = tmp_path / "out"
    run([*FAST, "--data_path", data, "--epochs", 1, "--save_every_minutes", 0.0001, "--output_dir", out])
    saves = re.findall(r"saved \S+checkpoint-last.pth at epoch 0, batch (\d+) of 12", (out / "log.txt").read_text())
    assert [int(batch) for batch in saves] == list(range(1, 12))  # the clock is due after every step


def sigkill_if_running(process) -> bool:
    """SIGKILL `process` and reap it; False if it had already finished."""
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def kill_after_saves(process, saves: int, delay: float) -> bool:
    """SIGKILL `process` `delay` seconds after its `saves`-th checkpoint line; False if it finished first."""
    for line in process.stdout:
        saves -= "saved" in line
        if saves == 0:
            time.sleep(delay)
            break
    return sigkill_if_running(process)


def kill_during_write(process, folder) -> bool:
    """SIGKILL `process` while one of its temporary files (a checkpoint's, args.json's, ...) exists in `folder`;
    False if it finished first."""
    deadline = time.time() + 60
    while process.poll() is None and not temp_files(folder):
        assert time.time() < deadline, "no checkpoint write within 60 s"
        time.sleep(0.0005)
    return sigkill_if_running(process)


def test_repeated_kills_lose_nothing_and_end_bit_identical(tmp_path, data):
    """SIGKILLs at random moments and during checkpoint writes; a rerun after each; the end equals no kills.

    The kills are placed by the run's progress (its per-step checkpoint lines), not by wall time, so that a faster
    or slower machine sees the same campaign: every third kill lands inside a checkpoint write, the others up to
    0.3 s after the 1st to 6th save of that launch."""
    target = int(os.environ.get("TRANSDIFF_KILLS", "10"))  # the CI run: 10; a longer campaign sets more
    args = [*FAST, "--data_path", data, "--epochs", 2 * target, "--save_every_steps", 1]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([*args, "--output_dir", straight], timeout=600)
    rng = random.Random(0)
    kills = during_write = 0
    while kills < target:
        in_write = kills % 3 == 0
        process = launch([*args, "--output_dir", killed],
                         stdout=subprocess.DEVNULL if in_write else subprocess.PIPE, stderr=subprocess.STDOUT)
        if in_write:
            assert kill_during_write(process, killed), "the run finished before the campaign did"
        else:
            assert kill_after_saves(process, rng.randint(1, 6), 0.3 * rng.random()), \
                "the run finished before the campaign did"
        kills += 1
        during_write += in_write
        if (killed / "checkpoint-last.pth").exists():
            load_checkpoint(str(killed / "checkpoint-last.pth"))  # never a partial checkpoint
    result = run([*args, "--output_dir", killed], timeout=600)
    assert temp_files(killed) == []
    assert_same_weights(straight, killed)
    print(f"{kills} kills, {during_write} during a write of the run's files;", result.returncode)


def test_elastic_restart_after_a_killed_worker_ends_bit_identical(tmp_path, data):
    args = [*FAST, "--data_path", data, "--epochs", 6]
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    run([*args, "--output_dir", straight], nproc=2)
    process = launch([*args, "--output_dir", elastic], nproc=2, max_restarts=1, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
    killed = False
    lines = []
    for line in process.stdout:
        lines.append(line)
        if not killed and "Epoch: [2]" in line:
            workers = subprocess.run(["pgrep", "-f", f"output_dir {elastic}"], capture_output=True, text=True)
            pids = [int(pid) for pid in workers.stdout.split() if int(pid) != process.pid]
            os.kill(max(pids), signal.SIGKILL)  # one worker dies
            killed = True
    assert process.wait(timeout=300) == 0, "".join(lines[-40:])
    assert killed and any("continuing at epoch" in line for line in lines)
    assert_same_weights(straight, elastic)


def test_second_checkpoint_into_the_same_folder_gets_its_own_images(tmp_path, data):
    first, second = tmp_path / "first", tmp_path / "second"
    run([*TINY, "--data_path", data, "--output_dir", first, "--epochs", 1, "--seed", 3])
    run([*TINY, "--data_path", data, "--output_dir", second, "--epochs", 1, "--seed", 4])
    out = tmp_path / "eval"
    run([*TINY, "--resume", first, "--output_dir", out, *EVAL])
    run([*TINY, "--resume", second, "--output_dir", out, *EVAL])
    records = json.loads((out / "metrics.json").read_text())
    assert len({record["folder"] for record in records}) == 2
    assert pngs(records[0]["folder"]) != pngs(records[1]["folder"])
    run([*TINY, "--resume", first, "--output_dir", out, *EVAL, "--seed", 9])
    assert len(list(out.glob("*_evaluate"))) == 3


def test_truncated_png_is_made_again(tmp_path, data):
    source = tmp_path / "run"
    run([*TINY, "--data_path", data, "--output_dir", source, "--epochs", 1])
    out = tmp_path / "eval"
    run([*TINY, "--resume", source, "--output_dir", out, *EVAL])
    folder = eval_folder(out)
    reference = pngs(folder)
    damaged = folder / "00007.png"
    damaged.write_bytes(damaged.read_bytes()[:50])
    run([*TINY, "--resume", source, "--output_dir", out, *EVAL])
    assert pngs(folder) == reference


def test_caching_with_a_late_rank_caches_every_image(tmp_path, data):
    cache = tmp_path / "cache"
    skew = tmp_path / "late_rank.py"
    skew.write_text("import os, runpy, sys, time\n"
                    "if os.environ.get('RANK') == '1':\n    time.sleep(3)\n"
                    f"sys.argv[0] = 'main_cache.py'\nrunpy.run_path({str(REPO_ROOT / 'main_cache.py')!r}, "
                    "run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(skew), "--tokenizer", "pixel", "--vae_stride", "2", "--vae_embed_dim", "12",
                             "--img_size", "16", "--data_path", str(data), "--cached_path", str(cache),
                             "--device", "cpu", "--num_workers", "0", "--batch_size", "5", "--shard_images", "5"],
                            cwd=REPO_ROOT, env={**ENV, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = complete_shards(str(cache / "shards"))
    assert sorted(len(shard.images) for shard in shards) == [2, 2, 5, 5, 5, 5]  # each rank: 12 images
    assert len(open_latent_cache(str(cache))) == 24
    assert json.loads((cache / "classes.json").read_text()) == ["ants", "bees", "cats"]
    for suffix in (".npy", ".json"):
        (cache / "shards" / f"{shards[0].name}{suffix}").unlink()
    lazy_writer = "import sys, main_cache; main_cache.cache_latents = lambda *args: 0; main_cache.cli(sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", lazy_writer, "--tokenizer", "pixel", "--vae_stride", "2",
                             "--vae_embed_dim", "12", "--img_size", "16", "--data_path", str(data),
                             "--cached_path", str(cache), "--device", "cpu", "--num_workers", "0"],
                            cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"{len(shards[0].images)} of 24 images" in result.stderr
    assert "Traceback" not in result.stderr
