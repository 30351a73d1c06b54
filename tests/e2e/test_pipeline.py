"""End-to-end runs of main.py / main_cache.py on tiny models and generated images, on CPU (gloo for torchrun)."""
import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image

from models.samplers import DEFAULT_SAMPLER
from tests.support import preloaded
from tests.support.runs import (
    CLASSES,
    ENV,
    EVAL,
    IMAGES_PER_CLASS,
    TINY,
    assert_same_tensors,
    eval_folder,
    load_state,
    pngs,
    run,
    write_image_folder,
)
from util.eval.fidelity import save_reference_statistics, statistics_from_folder
from util.io import file_sha256


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A 1-step tiny model trained for 2 epochs in one process."""
    out = tmp_path_factory.mktemp("trained")
    run([*TINY, "--data_path", data, "--output_dir", out, "--epochs", 2])
    return out


# --------------------------------------------------------------------------------------------- training
def test_ddp_training_keeps_ranks_identical_and_resumes_bit_exactly(tmp_path, data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([*TINY, "--data_path", data, "--output_dir", straight, "--epochs", 2], nproc=2)
    run([*TINY, "--data_path", data, "--output_dir", resumed, "--epochs", 1], nproc=2)
    first = load_state(resumed / "checkpoint-last.pth")
    assert first["epoch"] == 0
    assert len(first["rank_weight_digests"]) == 2 and len(set(first["rank_weight_digests"])) == 1
    result = run([*TINY, "--data_path", data, "--output_dir", resumed, "--epochs", 2], nproc=2)
    assert "continuing at epoch 1" in result.stdout + result.stderr

    a, b = load_state(straight / "checkpoint-last.pth"), load_state(resumed / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 1
    assert len(set(a["rank_weight_digests"])) == 1
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["model_ema"], b["model_ema"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_tensors(state_a, state_b)
    assert (straight / "checkpoint-1.pth").is_file()
    assert not any(p.name.endswith(".tmp") for p in straight.iterdir())


def test_a_two_rank_run_from_scratch_evaluates_one_ema(tmp_path, data):
    """Each rank builds its own random initialisation (seed + rank); the online evaluation of a 2-rank run must
    still sample one model into one folder, the EMA that `--evaluate` of the saved checkpoint samples."""
    out, again = tmp_path / "run", tmp_path / "evaluated"
    online = ["--num_images", 24, "--eval_bsz", 4, "--num_sampling_steps", 2, "--metrics", ""]
    run([*TINY, "--data_path", data, "--output_dir", out, "--epochs", 1, "--online_eval", "--eval_freq", 1,
         *online], nproc=2)
    folders = [p for p in out.iterdir() if p.is_dir() and p.name.startswith("epoch")]
    assert len(folders) == 1 and len(pngs(folders[0])) == 24, folders
    record = json.loads((out / "metrics.json").read_text())[-1]
    assert record["folder"] == str(folders[0]) and record["num_images"] == 24
    state = load_state(out / "checkpoint-last.pth")
    assert len(set(state["rank_ema_digests"])) == 1
    run([*TINY, "--resume", out, "--output_dir", again, "--evaluate", *online])
    evaluated = json.loads((again / "metrics.json").read_text())[-1]
    assert evaluated["weights_digest"] == record["weights_digest"] == state["rank_ema_digests"][0]
    assert pngs(eval_folder(again)) == pngs(folders[0])


def test_zero1_trains_and_resumes_bit_for_bit_as_plain_adamw(tmp_path, data):
    """--zero1 shards AdamW's state over 2 ranks: the same weights, EMA and (consolidated) optimizer state as
    the plain optimizer, in the same checkpoint format, and a resumed sharded run equals an uninterrupted one."""
    plain, sharded, resumed = tmp_path / "plain", tmp_path / "sharded", tmp_path / "resumed"
    run([*TINY, "--data_path", data, "--output_dir", plain, "--epochs", 2], nproc=2)
    run([*TINY, "--data_path", data, "--output_dir", sharded, "--epochs", 2, "--zero1"], nproc=2)
    run([*TINY, "--data_path", data, "--output_dir", resumed, "--epochs", 1, "--zero1"], nproc=2)
    run([*TINY, "--data_path", data, "--output_dir", resumed, "--epochs", 2, "--zero1"], nproc=2)
    states = [load_state(folder / "checkpoint-last.pth") for folder in (plain, sharded, resumed)]
    for state in states[1:]:
        assert_same_tensors(state["model"], states[0]["model"])
        assert_same_tensors(state["model_ema"], states[0]["model_ema"])
        assert state["optimizer"]["param_groups"] == states[0]["optimizer"]["param_groups"]
        assert state["optimizer"]["state"].keys() == states[0]["optimizer"]["state"].keys()
        for index, moments in states[0]["optimizer"]["state"].items():
            assert_same_tensors(state["optimizer"]["state"][index], moments)


def test_persistent_loader_workers_train_as_the_main_process(tmp_path, data):
    """With --num_workers the loader's workers persist across epochs; the epoch reaches them with every sample's
    key, so they draw the crops and flips the main process draws."""
    plain, workers = tmp_path / "plain", tmp_path / "workers"
    run([*TINY, "--data_path", data, "--output_dir", plain, "--epochs", 3])
    run([*TINY[:TINY.index("--num_workers")], *TINY[TINY.index("--num_workers") + 2:], "--num_workers", 2,
         "--data_path", data, "--output_dir", workers, "--epochs", 3])
    a, b = load_state(plain / "checkpoint-last.pth"), load_state(workers / "checkpoint-last.pth")
    assert_same_tensors(a["model"], b["model"])


def test_gradient_accumulation_and_bf16_train(tmp_path, data):
    out = tmp_path / "accum"
    run([*TINY, "--data_path", data, "--output_dir", out, "--epochs", 1, "--gradient_accumulation_steps", 2,
         "--bf16", "--grad_checkpointing"])
    state = load_state(out / "checkpoint-last.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 0 and np.isfinite(log[-1]["loss"])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data):
    out = tmp_path / "nan"
    run([*TINY, "--data_path", data, "--output_dir", out, "--epochs", 1])
    before = (out / "checkpoint-last.pth").read_bytes()
    result = run([*TINY, "--data_path", data, "--output_dir", out, "--epochs", 3, "--lr", "1e30",
                   "--grad_clip", "0"], check=False)
    assert result.returncode == 1
    assert "loss is" in result.stderr and "stopping" in result.stderr
    assert (out / "checkpoint-last.pth").read_bytes() == before


# --------------------------------------------------------------------------------------------- evaluation
def test_evaluation_is_independent_of_world_size(tmp_path, trained):
    one, two = tmp_path / "one", tmp_path / "two"
    run([*TINY, "--resume", trained, "--output_dir", one, *EVAL])
    run([*TINY, "--resume", trained, "--output_dir", two, *EVAL], nproc=2)
    images_one, images_two = pngs(eval_folder(one)), pngs(eval_folder(two))
    assert sorted(images_one) == [f"{i:05d}.png" for i in range(24)]
    assert images_one == images_two
    record = json.loads((one / "metrics.json").read_text())[-1]
    assert record["num_images"] == 24 and "metrics_skipped" in record  # no FID stats for 16 px: images kept


def test_the_seed_seeds_every_image(tmp_path, trained):
    """--seed reaches each image's noise: another seed shares no image, and one evaluation's images all differ
    (a seed of (seed << 32) + index once lost the seed to torch's 32-bit CPU seeds: two seeds, the same PNGs)."""
    folders = {}
    for seed in (1, 2):
        run([*TINY, "--resume", trained, "--output_dir", tmp_path / str(seed), *EVAL, "--seed", seed])
        folders[seed] = pngs(eval_folder(tmp_path / str(seed)))
    ones, twos = set(folders[1].values()), set(folders[2].values())
    assert len(ones) == len(twos) == 24 and not ones & twos
    record = json.loads((tmp_path / "1" / "metrics.json").read_text())[-1]
    assert record["seed"] == 1 and record["noise"].startswith("philox")


def test_killed_evaluation_resumes_without_duplicates(tmp_path, trained):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    slow = [*TINY, "--resume", trained, *EVAL, "--num_images", 96, "--num_sampling_steps", 60]
    run([*slow, "--output_dir", reference])
    process = preloaded.start(["main.py", *map(str, [*slow, "--output_dir", killed])], ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Evidence, not a timer: the kill comes once 8 images exist, and the run still has 88 to make.
    while process.poll() is None and len(list(killed.glob("*_evaluate/*.png"))) < 8:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = pngs(eval_folder(killed))
    assert 8 <= len(partial) < 96, "the run should have been killed midway"
    run([*slow, "--output_dir", killed])
    assert pngs(eval_folder(killed)) == pngs(eval_folder(reference))
    assert not list(eval_folder(killed).glob(".*"))


def write_reference(tmp_path, data, inception_weights):
    """Every other training image, resized to 16 px, as a reference folder, and their Inception statistics file."""
    reference = tmp_path / "reference_images"
    reference.mkdir()
    for i, path in enumerate(sorted((data / "train").glob("*/*.png"))[::2]):
        Image.open(path).convert("RGB").resize((16, 16)).save(reference / f"{i:05d}.png")
    statistics = statistics_from_folder(reference, "cpu", batch_size=8, weights_path=inception_weights,
                                        num_workers=0)
    stats = tmp_path / "stats.npz"
    save_reference_statistics(stats, statistics["mu"], statistics["sigma"])
    return reference, stats


def test_fid_and_inception_score_end_to_end_on_one_and_two_ranks(tmp_path, trained, data, inception_weights):
    """Two ranks extract their shares of the Inception features and rank 0 gathers them: the same FID, IS and KID
    as one process, to the last bit."""
    reference, stats = write_reference(tmp_path, data, inception_weights)
    records = []
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        run([*TINY, "--resume", trained, "--output_dir", out, *EVAL, "--num_images", "12", "--metrics", "fid_is,kid",
             "--fid_stats", stats, "--ref_images", reference, "--inception_weights", inception_weights,
             "--require_metrics", "--save_npz"], nproc=nproc)
        records.append(json.loads((out / "metrics.json").read_text())[-1])
    record = records[0]
    assert np.isfinite(record["fid"]) and record["fid"] > 0
    assert record["inception_score"] >= 1.0 and record["num_images"] == 12
    assert np.load(record["npz"])["arr_0"].shape == (12, 16, 16, 3)
    for key in ("fid", "inception_score", "inception_score_std", "kid", "kid_std"):
        assert records[1][key] == record[key], key


def test_every_metric_and_every_setting_that_moves_it_in_the_record(tmp_path, trained, data, inception_weights,
                                                                    tiny_vgg_weights):
    """FID, IS, KID and precision/recall from one `main.py --evaluate` (in process: VGG16 is the conftest stand-in),
    with the weights, sampling settings, reference files (sha256) and torch-fidelity version in record and log."""
    import main as transdiff_main

    reference, stats = write_reference(tmp_path, data, inception_weights)
    out = tmp_path / "eval"
    transdiff_main.cli([*TINY, "--resume", str(trained), "--output_dir", str(out), *EVAL,
                        "--cfg_interval", "0.1,0.9", "--metrics", "fid_is,kid,prc",
                        "--fid_stats", str(stats),
                        "--ref_images", str(reference), "--inception_weights", str(inception_weights),
                        "--prc_weights", str(tiny_vgg_weights), "--require_metrics"])
    record = json.loads((out / "metrics.json").read_text())[-1]
    for key in ("fid", "inception_score", "kid", "prc_precision", "prc_recall"):
        assert np.isfinite(record[key]), key
    assert 0.0 <= record["prc_precision"] <= 1.0 and 0.0 <= record["prc_recall"] <= 1.0
    settings = {"ema": True, "sampler": DEFAULT_SAMPLER, "num_sampling_steps": 4, "cfg": 1.5,
                "cfg_interval": [0.1, 0.9],
                "scale_0": 1.0, "scale_1": 1.0, "precision": "fp32",
                "num_images": 24, "images_per_class": 8,
                "checkpoint": str(trained / "checkpoint-last.pth"),
                "fid_stats": str(stats), "fid_stats_sha256": file_sha256(stats), "ref_images": str(reference),
                "inception_weights_sha256": file_sha256(inception_weights),
                "prc_weights_sha256": file_sha256(tiny_vgg_weights),
                "torch_fidelity_version": torch_fidelity.__version__}
    assert {key: record.get(key) for key in settings} == settings
    log = (out / "log.txt").read_text()
    for key in ("fid_stats_sha256", "torch_fidelity_version", "images_per_class", "precision", "sampler"):
        assert f"{key} {record[key]}" in log, key


def test_missing_metric_files_keep_images_or_fail_when_required(tmp_path, trained):
    out = tmp_path / "eval"
    result = run([*TINY, "--resume", trained, "--output_dir", out, *EVAL, "--fid_stats", tmp_path / "absent.npz",
                  "--require_metrics"], check=False)
    assert result.returncode == 2 and "absent.npz" in result.stderr
    result = run([*TINY, "--resume", trained, "--output_dir", out, *EVAL, "--fid_stats", tmp_path / "absent.npz"])
    assert "absent.npz" in result.stdout + result.stderr
    assert len(pngs(eval_folder(out))) == 24


# --------------------------------------------------------------------------------------------- cached and MRAR
def test_cached_latents_then_training(tmp_path, data):
    """The per-image layout (the sharded one: tests/e2e/test_latent_cache.py)."""
    cache = tmp_path / "cache"
    run(["--tokenizer", "pixel", "--vae_stride", 2, "--vae_embed_dim", 12, "--img_size", 16, "--cache_format", "files",
         "--data_path", data, "--cached_path", cache, "--device", "cpu", "--num_workers", 0, "--batch_size", 5],
        script="main_cache.py")
    files = sorted(cache.rglob("*.npz"))
    assert len(files) == len(CLASSES) * IMAGES_PER_CLASS
    moments = np.load(files[0])
    assert moments["moments"].shape == moments["moments_flip"].shape == (24, 8, 8)
    out = tmp_path / "run"
    run([*TINY, "--use_cached", "--cached_path", cache, "--output_dir", out, "--epochs", 1])
    assert (out / "checkpoint-last.pth").is_file()


@pytest.fixture(scope="module")
def mrar_index(tmp_path_factory, data):
    index = tmp_path_factory.mktemp("mrar_index") / "index.jsonl"
    run(["--data_path", data, "--out", index], script="tools/build_mrar_index.py")
    return index


@pytest.fixture(scope="module")
def mrar_trained(tmp_path_factory, data, mrar_index):
    """A tiny MRAR model trained for one epoch."""
    out = tmp_path_factory.mktemp("mrar")
    run([*TINY, "--mrar", "--patch_size", 2, "--mrar_index", mrar_index, "--data_path", data, "--output_dir", out,
         "--epochs", 1])
    return out


def test_mrar_index_training_and_per_stage_cfg_evaluation(tmp_path, data, mrar_index, mrar_trained):
    lines = [json.loads(line) for line in mrar_index.read_text().splitlines()]
    assert len(lines) == len(CLASSES) * IMAGES_PER_CLASS and all(len(line["files"]) == 4 for line in lines)
    out = tmp_path / "eval"
    run([*TINY, "--mrar", "--patch_size", 2, "--data_path", data, "--output_dir", out, "--resume", mrar_trained,
         *EVAL, "--cfg", "1.0,1.2,1.3,1.5"])
    assert len(pngs(eval_folder(out))) == 24


def test_one_step_to_mrar_finetune_adapts_the_mask_token(tmp_path, data, mrar_index, trained):
    finetune = tmp_path / "finetune"
    result = run([*TINY, "--mrar", "--patch_size", 2, "--mrar_index", mrar_index, "--data_path", data,
                  "--output_dir", finetune, "--resume", trained, "--epochs", 1])
    log = result.stdout + result.stderr
    assert "adapted: mask_token" in log and "optimizer and epoch start fresh" in log
    assert load_state(finetune / "checkpoint-last.pth")["epoch"] == 0


def test_mrar_checkpoint_evaluated_without_mrar_says_which_flag_is_missing(tmp_path, mrar_trained):
    result = run([*TINY, "--patch_size", 2, "--resume", mrar_trained, "--output_dir", tmp_path / "eval", *EVAL],
                 check=False)
    assert result.returncode == 2 and "add --mrar --patch_size 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_model_size_checkpoint_is_refused_and_not_overwritten(tmp_path, trained, data):
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "checkpoint-last.pth"
    foreign.write_bytes((trained / "checkpoint-last.pth").read_bytes())
    before = foreign.read_bytes()
    result = run([*TINY, "--model", "transdiff_base", "--data_path", data, "--output_dir", out, "--epochs", 1],
                 check=False)
    assert result.returncode == 2 and "width 64" in result.stderr and "--model transdiff_tiny" in result.stderr
    assert foreign.read_bytes() == before


def test_corrupt_image_and_empty_class_folder(tmp_path):
    data = write_image_folder(tmp_path / "data")
    (data / "train" / "empty_class").mkdir()
    (data / "train" / "bees" / "broken.png").write_bytes(b"not a png")
    result = run([*TINY, "--data_path", data, "--output_dir", tmp_path / "out", "--epochs", 1], check=False)
    assert result.returncode == 2 and "4 class folders but --class_num is 3: pass --class_num 4" in result.stderr
    result = run([*TINY, "--data_path", data, "--output_dir", tmp_path / "out", "--epochs", 1, "--class_num", 4],
                 check=False)
    assert result.returncode == 1 and "broken.png" in result.stderr and "--skip_corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    assert "empty_class" in result.stderr  # warned, not fatal
    result = run([*TINY, "--data_path", data, "--output_dir", tmp_path / "out", "--epochs", 1, "--skip_corrupt",
                  "--class_num", 4])
    assert "skipping corrupt image" in result.stderr


def test_512_style_finetune_adapts_decoder_positions_and_freezes_the_encoder(tmp_path, data):
    """The 256 -> 512 px finetune in miniature: 16 -> 32 px with a stride-1 tokenizer (256 -> 1024 decoder tokens,
    the same 256 condition tokens), --only_train_diff."""
    stride_one = [*TINY, "--vae_stride", 1, "--vae_embed_dim", 3, "--data_path", data, "--epochs", 1]
    source = tmp_path / "source"
    run([*stride_one, "--output_dir", source])
    finetune = tmp_path / "finetune"
    result = run([*stride_one, "--img_size", 32, "--only_train_diff", "--resume", source, "--output_dir", finetune])
    assert "adapted: diffdecoder.net.diffusion_pos_embed_learned" in result.stdout + result.stderr
    before, after = load_state(source / "checkpoint-last.pth"), load_state(finetune / "checkpoint-last.pth")
    assert after["epoch"] == 0
    assert after["model"]["diffdecoder.net.diffusion_pos_embed_learned"].shape[1] == 1024
    for key, value in after["model"].items():
        if key.startswith("diffdecoder."):
            continue
        assert torch.equal(value, before["model"][key]), key
    assert not torch.equal(after["model"]["diffdecoder.net.input_proj.weight"],
                           before["model"]["diffdecoder.net.input_proj.weight"])
