"""The bad inputs of the fault campaign, in-process: each ends in one `main.py: error: ...` line and a non-zero
exit (no traceback), and changes no file it was given."""
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import engine_transdiff as engine
import main
from tests.support.runs import write_image_folder
from util.checkpoint import load_checkpoint, save_checkpoint
from util.optim import EMA
from util.settings import get_args_parser

TINY = ("--model transdiff_tiny --tokenizer pixel --vae_stride 2 --vae_embed_dim 12 --img_size 16 --class_num 3 "
        "--buffer_size 4 --device cpu --num_workers 0 --batch_size 4").split()
EVAL = "--evaluate --num_images 3 --eval_bsz 3 --num_sampling_steps 2".split()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_image_folder(root / "data")
    write_image_folder(root / "corrupt_data")
    first_class = sorted((root / "corrupt_data" / "train").iterdir())[0]
    (first_class / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    torch.manual_seed(0)
    model = main.build_model(get_args_parser().parse_args(TINY))
    good = root / "good.pth"
    save_checkpoint(str(good), {"model": model.state_dict(), "model_ema": model.state_dict(), "epoch": 2,
                                "args": {"model": "transdiff_tiny"}})
    diverged = {**model.state_dict(), "fake_latent": torch.full_like(model.fake_latent, float("nan"))}
    save_checkpoint(str(root / "nan_ema.pth"), {"model": model.state_dict(), "model_ema": diverged, "epoch": 2})
    (root / "truncated.pth").write_bytes(good.read_bytes()[:100_000])
    flipped = bytearray(good.read_bytes())
    flipped[len(flipped) // 2] ^= 0x04
    (root / "flipped.pth").write_bytes(bytes(flipped))
    (root / "random.pth").write_bytes(np.random.RandomState(0).bytes(200_000))
    torch.save([1, 2], root / "list.pth")
    torch.save({"foo.weight": torch.zeros(2)}, root / "foreign.pth")
    torch.save({"model": {}, "payload": Evil()}, root / "evil.pth")
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(root / "pickled.npz", mu=np.array([object()], dtype=object), sigma=np.zeros((1, 1)))
    (root / "inception.pth").write_text("not weights")
    (root / "index.jsonl").write_text(json.dumps({"cate": "ants", "files": ["0.png", "1.png", "../bees/2.png",
                                                                           "3.png"]}) + "\n")
    (root / "a_file").write_text("x")
    return root


def inputs_digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).iterdir()) if p.is_file()}


CASES = {
    "truncated_checkpoint": (["--resume", "{root}/truncated.pth", *EVAL], "truncated.pth is not a PyTorch checkpoint"),
    "random_bytes_checkpoint": (["--resume", "{root}/random.pth", *EVAL], "random.pth is not a PyTorch checkpoint"),
    "pickled_list": (["--resume", "{root}/list.pth", *EVAL], "list.pth holds a list, not a checkpoint dict"),
    "malicious_pickle": (["--resume", "{root}/evil.pth", *EVAL], "outside the allow-list"),
    "foreign_state_dict": (["--resume", "{root}/foreign.pth", *EVAL], "foreign.pth: checkpoint does not fit"),
    "other_class_num": (["--resume", "{root}/good.pth", "--class_num", "6", *EVAL[:1], "--num_images", "6",
                         *EVAL[3:]], "pass --class_num 3"),
    "other_image_size": (["--resume", "{root}/good.pth", "--img_size", "32", *EVAL],
                         "encoder_pos_embed_learned: checkpoint [1, 68, 64] vs model [1, 260, 64]"),
    "non_finite_ema_weights": (["--resume", "{root}/nan_ema.pth", *EVAL],
                               "nan_ema.pth (model_ema): tensor fake_latent holds non-finite values"),
    "byte_flipped_in_the_middle": (["--resume", "{root}/flipped.pth", *EVAL], "flipped.pth is corrupt: its record "),
    "mistyped_resume": (["--resume", "{root}/chekpoint-last.pth", "--epochs", "1"], "no such file or folder"),
    "evaluate_without_weights": (EVAL, "--evaluate needs weights"),
    "corrupt_fid_stats": (["--resume", "{root}/good.pth", *EVAL, "--fid_stats", "{root}/corrupt.npz",
                           "--require_metrics"], "corrupt.npz is not a readable .npz"),
    "pickled_fid_stats": (["--resume", "{root}/good.pth", *EVAL, "--fid_stats", "{root}/pickled.npz",
                           "--require_metrics"], "pickled.npz is not a readable .npz"),
    "mixed_class_mrar_group": (["--mrar", "--patch_size", "2", "--mrar_index", "{root}/index.jsonl", "--epochs", "1"],
                               "a group holds images of its own class"),
    "output_dir_is_a_file": (["--output_dir", "{root}/a_file", "--epochs", "1"], "a_file"),
    "sampler_unknown": (["--sampler", "ddim", "--epochs", "1"], None),
    "resume_of_other_classes_explains_init_from": (["--resume", "{root}/good.pth", "--class_num", "6", "--epochs",
                                                    "1"], "start a new run with --init_from"),
    "init_from_missing": (["--init_from", "{root}/nothing.pth", "--epochs", "1"],
                          "nothing.pth: no such file or folder, and not a released model (transdiff_b, "),
    "init_from_folder_without_checkpoint": (["--init_from", "{root}/data", "--epochs", "1"],
                                            "no checkpoint-last.pth in this folder"),
    "init_from_with_resume": (["--init_from", "{root}/good.pth", "--resume", "{root}/good.pth", "--epochs", "1"],
                              "--init_from starts a new training run from weights: it does not go with --resume"),
    "init_from_with_evaluate": (["--init_from", "{root}/good.pth", *EVAL], "it does not go with --evaluate"),
    "class_map_without_init_from": (["--class_map", "{root}/a_file", "--epochs", "1"],
                                    "--class_map maps your classes to those of the weights given by --init_from"),
    "class_map_of_unknown_folder": (["--init_from", "{root}/good.pth", "--class_map", "{root}/a_file", "--epochs",
                                     "1"], "a_file, line 1: expected '<class folder> <pretrained class index"),
    "class_map_missing": (["--init_from", "{root}/good.pth", "--class_map", "{root}/nothing.txt", "--epochs", "1"],
                          "nothing.txt: no such file"),
    "corrupt_image_in_a_loader_worker": (["--data_path", "{root}/corrupt_data", "--num_workers", "2", "--epochs",
                                          "1"], "with a warning) (in DataLoader worker process "),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line(name, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags, message = CASES[name]
    flags = [flag.format(root=files) for flag in flags]
    out = ["--output_dir", str(tmp_path / "out")] if "--output_dir" not in flags else []
    before = inputs_digest(files)
    with pytest.raises(SystemExit) as exited:
        main.cli([*TINY, "--data_path", str(files / "data"), *out, *flags])
    err = capsys.readouterr().err
    assert exited.value.code not in (0, None)
    if message is not None:
        assert message in err and err.startswith("main.py: error: "), err
        one_line = "checkpoint does not fit the model:" not in err  # that explanation lists what differs, line by line
        assert "Traceback" not in err and (err.count("\n") == 1 or not one_line), err
    assert inputs_digest(files) == before
    assert not (tmp_path / "PWNED").exists()
    assert not multiprocessing.active_children()  # no loader worker outlives the failed run


def test_inception_weights_are_checked_before_generation(files, tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(4, np.float32), sigma=np.eye(4))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main.cli([*TINY, "--resume", str(files / "good.pth"), "--output_dir", str(out), *EVAL, "--fid_stats",
                  str(stats), "--inception_weights", str(files / "inception.pth"), "--require_metrics"])
    err = capsys.readouterr().err
    assert "inception.pth is not a weights file of torch-fidelity" in err and "weights_only=False" not in err
    assert not list(out.glob("*/*.png"))  # nothing generated


def test_epochs_below_the_resumed_epoch_is_an_error_and_equal_is_a_notice(files, tmp_path, capsys):
    out = tmp_path / "out"
    args = [*TINY, "--data_path", str(files / "data"), "--output_dir", str(out), "--blr", "1e-3"]
    main.cli([*args, "--epochs", "2"])
    main.cli([*args, "--epochs", "2"])
    assert "nothing to train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main.cli([*args, "--epochs", "1"])
    assert exited.value.code == 2 and "raise --epochs" in capsys.readouterr().err
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def test_args_json_is_written_by_training_only(files, tmp_path):
    out = tmp_path / "out"
    main.cli([*TINY, "--data_path", str(files / "data"), "--output_dir", str(out), "--epochs", "1"])
    before = (out / "args.json").read_bytes()
    main.cli([*TINY, "--resume", str(out), "--output_dir", str(out), *EVAL])
    assert (out / "args.json").read_bytes() == before


def test_full_disk_is_named_in_plain_words(tmp_path, monkeypatch):
    from util.errors import describe
    from util.io import atomic_write

    def full(handle):
        handle.write(b"x")
        raise RuntimeError("enforce fail: unexpected pos") from OSError(28, "No space left on device")

    with pytest.raises(OSError) as raised:
        atomic_write(str(tmp_path / "checkpoint-last.pth"), full)
    assert describe(raised.value).startswith("no space left on device: ")
    assert os.listdir(tmp_path) == []


def test_a_diverged_step_is_never_saved_and_a_rerun_resumes_from_the_last_good_checkpoint(files, tmp_path, capsys,
                                                                                           monkeypatch):
    """The loss stays finite while the EMA turns NaN just before the end-of-epoch save: the save is refused, the
    previous checkpoint stays byte for byte, and a rerun continues from it."""
    out = tmp_path / "out"
    train = [*TINY, "--data_path", str(files / "data"), "--output_dir", str(out), "--save_last_freq", "1"]
    main.cli([*train, "--epochs", "1"])
    good = (out / "checkpoint-last.pth").read_bytes()
    real_update = EMA.update

    def diverging_update(self, model, decay):
        real_update(self, model, decay)
        self.module.fake_latent.data.fill_(float("nan"))

    monkeypatch.setattr(EMA, "update", diverging_update)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main.cli([*train, "--epochs", "2"])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.count("\n") == 1
    assert err.startswith("main.py: error: the EMA weights hold non-finite values (fake_latent) after the last "
                          "optimizer step; stopping without saving them. A rerun resumes from the last checkpoint")
    assert (out / "checkpoint-last.pth").read_bytes() == good
    monkeypatch.setattr(EMA, "update", real_update)
    main.cli([*train, "--epochs", "2"])
    assert f"resumed {out / 'checkpoint-last.pth'} (epoch 0): continuing at epoch 1" in capsys.readouterr().out
    assert load_checkpoint(str(out / "checkpoint-last.pth"))["epoch"] == 1


def test_an_evaluation_of_one_colour_images_says_so_in_the_record_and_the_log(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine, "decode_images", lambda tokenizer, latents, precision, device:
                        -torch.ones(len(latents), 3, 16, 16))  # black, as NaN latents decode
    out = tmp_path / "out"
    command = [*TINY, "--data_path", str(files / "data"), "--output_dir", str(out), "--resume",
               str(files / "good.pth"), *EVAL]
    main.cli(command)
    assert "3 of 3 images in " in capsys.readouterr().out
    main.cli(command)  # every image found complete: counted from the files
    records = json.loads((out / "metrics.json").read_text())
    assert [record["constant_images"] for record in records] == [3, 3]
    monkeypatch.undo()
    main.cli([*command, "--seed", "5"])
    assert json.loads((out / "metrics.json").read_text())[-1]["constant_images"] == 0


def test_a_run_that_fails_before_its_first_save_leaves_args_json_as_it_was(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    train = [*TINY, "--data_path", str(files / "data"), "--output_dir", str(out)]
    main.cli([*train, "--epochs", "1"])
    before = (out / "args.json").read_bytes()
    monkeypatch.setattr(engine, "check_before_save", lambda *parts: (_ for _ in ()).throw(
        engine.NonFiniteLoss("loss is nan")))
    with pytest.raises(SystemExit):
        main.cli([*train, "--epochs", "2", "--blr", "5e-4"])
    assert (out / "args.json").read_bytes() == before
    monkeypatch.undo()
    main.cli([*train, "--epochs", "2", "--blr", "5e-4"])
    assert json.loads((out / "args.json").read_text())["blr"] == 5e-4
