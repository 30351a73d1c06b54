"""A finetune onto your own classes: the class map file, the class embedding rows it copies, `--init_from` starting a
new run, and `--resume` of a checkpoint with another class count pointing to `--init_from`."""
import re

import pytest
import torch

from models.transdiff import transdiff_tiny
from tests.support import REPO_ROOT
from tests.support.tiny_runs import TINY
from util import run_state
from util.checkpoint import adapt_state_dict, check_fits, save_checkpoint, trained_with
from util.data.class_map import imagenet_classes, imagenet_index, read_class_map
from util.optim import EMA

FLAGS = {"model": "transdiff_tiny", "mrar": False, "img_size": 16, "class_num": 5}


def test_imagenet_classes_are_the_1000_wnids_in_index_order():
    classes = imagenet_classes()
    assert len(classes) == 1000 and len({wnid for wnid, _ in classes}) == 1000
    assert [wnid for wnid, _ in classes] == sorted(wnid for wnid, _ in classes)  # the ImageFolder order
    assert classes[0] == ("n01440764", "tench, Tinca tinca")
    assert classes[207][1].startswith("golden retriever") and imagenet_index("n02099601") == 207
    assert classes[999][0] == "n15075141" and imagenet_index("n99999999") is None


def test_a_class_map_maps_folders_to_indices_or_wnids(tmp_path):
    path = tmp_path / "map.txt"
    path.write_text("# mine -> pretrained\nbeagle 162\n\nmy tench n01440764\n  golden   n02099601  \n")
    assert read_class_map(str(path), ["beagle", "cat", "golden", "my tench"]) == {0: 162, 3: 0, 2: 207}


@pytest.mark.parametrize("text, message", [
    ("dog 3\n", "line 1: 'dog' is not a class folder of the training data (beagle, cat)"),
    ("beagle\n", "line 1: expected '<class folder> <pretrained class index or wnid>', got 'beagle'"),
    ("beagle 3\nbeagle 4\n", "line 2: class 'beagle' is mapped twice"),
    ("cat n0000\n", "line 1: 'n0000' is neither a class index nor an ImageNet wnid (such as n01440764)"),
    ("cat -1\n", "line 1: '-1' is neither a class index nor an ImageNet wnid"),
])
def test_a_bad_class_map_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "map.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"--class_map {path}, {message}")):
        read_class_map(str(path), ["beagle", "cat"])


def test_a_missing_class_map_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--class_map .*nothing.txt: no such file"):
        read_class_map(str(tmp_path / "nothing.txt"), ["a"])


def tiny(class_num, seed):
    torch.manual_seed(seed)
    return transdiff_tiny(**{**TINY, "class_num": class_num})


def test_mapped_rows_are_copied_and_the_others_keep_their_fresh_initialisation():
    source, target = tiny(5, seed=1).state_dict(), tiny(3, seed=2).state_dict()
    adapted, report = adapt_state_dict(source, target, class_rows={0: 4, 2: 1})
    rows = adapted["class_emb.weight"]
    assert rows.shape == target["class_emb.weight"].shape
    assert torch.equal(rows[0], source["class_emb.weight"][4]) and torch.equal(rows[2], source["class_emb.weight"][1])
    assert torch.equal(rows[1], target["class_emb.weight"][1])  # as the model initialised it for training
    assert torch.equal(adapted["fake_latent"], source["fake_latent"])  # the unconditional embedding is kept
    assert report == ["class_emb.weight: checkpoint [5, 64] -> model [3, 64], 2 row(s) copied from pretrained "
                      "classes (0<-4, 2<-1), 1 initialised as in training"]
    _, empty = adapt_state_dict(source, target, class_rows={})
    assert empty == ["class_emb.weight: checkpoint [5, 64] -> model [3, 64], 0 row(s) copied from pretrained "
                     "classes (none), 3 initialised as in training"]


@pytest.mark.parametrize("rows", [{0: 5}, {3: 0}, {-1: 0}])
def test_a_mapped_row_outside_either_embedding_is_refused(rows):
    with pytest.raises(ValueError, match="class map: class .* is outside the model's 3 or the checkpoint's 5 classes"):
        adapt_state_dict(tiny(5, 1).state_dict(), tiny(3, 2).state_dict(), class_rows=rows)


def test_without_class_rows_another_class_count_is_a_mismatch():
    with pytest.raises(ValueError, match="the checkpoint has 5 classes but the model 3: pass --class_num 5"):
        adapt_state_dict(tiny(5, 1).state_dict(), tiny(3, 2).state_dict())
    with pytest.raises(ValueError, match="the checkpoint has 5 classes but the model 3"):
        check_fits(tiny(5, 1).state_dict(), tiny(3, 2).state_dict())
    check_fits(tiny(5, 1).state_dict(), tiny(5, 2).state_dict())


def test_trained_with_names_the_architecture_flags():
    stored = {"model": "transdiff_tiny", "img_size": 16, "patch_size": 2, "vae_embed_dim": 12, "vae_stride": 2,
              "class_num": 10, "buffer_size": 16, "diffloss_w": None, "tokenizer": "pixel", "mrar": True, "lr": 1.0}
    assert trained_with({"args": stored}) == (
        "the checkpoint was trained with --model transdiff_tiny --img_size 16 --patch_size 2 --vae_embed_dim 12 "
        "--vae_stride 2 --class_num 10 --buffer_size 16 --tokenizer pixel --mrar")
    assert trained_with({}) == "the checkpoint stores no settings ('args') to say which model it is"


class Log:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)

    warning = info


def pretrained_file(tmp_path, epoch=7):
    model = tiny(5, seed=1)
    ema = EMA(model)
    with torch.no_grad():
        for param in ema.module.parameters():
            param.add_(1.0)  # the EMA differs from the raw weights
    path = tmp_path / "pretrained.pth"
    save_checkpoint(str(path), {"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": epoch,
                                "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                                "args": {**FLAGS, "vae_embed_dim": 4, "vae_stride": 2}})
    return path, model, ema


def restore(run, model):
    ema, log = EMA(model), Log()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored = run_state.restore(run, model, ema, optimizer, None, log)
    return restored, ema, optimizer, log


def test_init_from_starts_a_new_run_with_mapped_classes(tmp_path):
    path, source, source_ema = pretrained_file(tmp_path)
    model = tiny(3, seed=2)
    fresh_rows = model.class_emb.weight.detach().clone()
    run = run_state.RunSettings(str(tmp_path / "run"), flags={**FLAGS, "class_num": 3}, init_from=str(path),
                                class_rows={1: 4}, start_epoch=9)
    restored, ema, optimizer, log = restore(run, model)
    assert restored == run_state.Restored(0, "7", str(path), 0)  # epoch 0, whatever the source's epoch
    assert optimizer.state_dict()["state"] == {}  # fresh
    assert torch.equal(model.class_emb.weight[1], source.class_emb.weight[4])
    assert torch.equal(ema.module.class_emb.weight[1], source_ema.module.class_emb.weight[4])
    for row in (0, 2):
        assert torch.equal(model.class_emb.weight[row], fresh_rows[row])
        assert torch.equal(ema.module.class_emb.weight[row], fresh_rows[row])
    assert torch.equal(model.fake_latent, source.fake_latent)
    assert torch.equal(ema.module.fake_latent, source_ema.module.fake_latent)
    assert log.lines == [
        "adapted: class_emb.weight: checkpoint [5, 64] -> model [3, 64], 1 row(s) copied from pretrained classes "
        "(1<-4), 2 initialised as in training",
        f"initialised from {path} (model, epoch 7); optimizer and epoch start fresh"]


def test_init_from_without_a_map_keeps_every_row_of_the_same_classes_and_none_of_other_ones(tmp_path):
    path, source, _ = pretrained_file(tmp_path)
    same = tiny(5, seed=2)
    restore(run_state.RunSettings(str(tmp_path / "a"), flags=FLAGS, init_from=str(path)), same)
    assert torch.equal(same.class_emb.weight, source.class_emb.weight)
    other = tiny(3, seed=2)
    fresh_rows = other.class_emb.weight.detach().clone()
    restore(run_state.RunSettings(str(tmp_path / "b"), flags={**FLAGS, "class_num": 3}, init_from=str(path)), other)
    assert torch.equal(other.class_emb.weight, fresh_rows)


def test_the_runs_own_checkpoint_wins_over_init_from(tmp_path):
    """An interrupted finetune continues from its own checkpoint-last.pth, not from its starting weights again."""
    path, _, _ = pretrained_file(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    own, _, _ = pretrained_file(run_dir, epoch=2)
    own.rename(run_dir / "checkpoint-last.pth")
    run = run_state.RunSettings(str(run_dir), flags=FLAGS, init_from=str(path))
    restored, _, _, _ = restore(run, tiny(5, seed=2))
    assert restored.path == str(run_dir / "checkpoint-last.pth") and restored.start_epoch == 3


def test_resume_of_another_class_count_explains_init_from(tmp_path):
    path, _, _ = pretrained_file(tmp_path)
    run = run_state.RunSettings(str(tmp_path / "run"), flags={**FLAGS, "class_num": 3}, resume=str(path))
    with pytest.raises(ValueError) as refused:
        restore(run, tiny(3, seed=2))
    lines = str(refused.value).splitlines()
    assert lines[0] == f"{path}: checkpoint does not fit the model:"
    assert "the checkpoint has 5 classes but the model 3: pass --class_num 5" in lines
    assert lines[-2:] == [
        "the checkpoint was trained with --model transdiff_tiny --img_size 16 --vae_embed_dim 4 --vae_stride 2 "
        "--class_num 5",
        f"to finetune it onto your own 3 classes, start a new run with --init_from {path} (and --class_map FILE to "
        "start classes from pretrained ones; docs/finetuning.md)"]
    evaluation = run_state.RunSettings(str(tmp_path / "run"), flags={**FLAGS, "class_num": 3}, resume=str(path),
                                       evaluate=True)
    with pytest.raises(ValueError) as refused:
        restore(evaluation, tiny(3, seed=2))
    assert "pass --class_num 5" in str(refused.value) and "--init_from" not in str(refused.value)


def test_the_class_map_of_the_finetuning_page_gives_the_rows_its_log_shows(tmp_path):
    page = (REPO_ROOT / "docs" / "finetuning.md").read_text()
    block = next(b for b in re.findall(r"```\n(.*?)```", page, re.S) if b.startswith("# class_map.txt"))
    (tmp_path / "class_map.txt").write_text(block)
    folders = ["beagle", "golden", "heron", "kestrel", "lynx", "my_cat", "otter", "puffin", "quokka", "wren"]
    rows = read_class_map(str(tmp_path / "class_map.txt"), folders)
    assert rows == {0: 162, 1: 207, 5: 281}
    assert "3 row(s) copied from pretrained classes (0<-162, 1<-207, 5<-281), 7 initialised as in training" in page
