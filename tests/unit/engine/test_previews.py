"""Previews while training: a fixed-seed grid per --preview_freq epochs, as a PNG and a tensorboard image."""
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from tests.support.runs import write_image_folder
from util.eval.images import grid_zoom

TINY = ("--model transdiff_tiny --tokenizer pixel --vae_stride 2 --vae_embed_dim 12 --img_size 16 --class_num 3 "
        "--buffer_size 4 --device cpu --num_workers 0 --batch_size 8 --blr 1e-3").split()


def test_one_preview_png_and_tensorboard_image_per_epoch(tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    main.cli([*TINY, "--data_path", str(data), "--output_dir", str(out), "--epochs", "3", "--preview_freq", "1",
              "--preview_classes", "3", "--preview_per_class", "2", "--preview_steps", "2"])
    previews = sorted(p.name for p in (out / "previews").glob("*.png"))
    assert previews == ["epoch0000.png", "epoch0001.png", "epoch0002.png"]
    with Image.open(out / "previews" / "epoch0002.png") as grid:
        assert grid_zoom(16) == 4  # 16 px images are shown 64 px wide
        assert grid.size == (4 * (2 * 18 + 2), 4 * (3 * 18 + 2))  # 2 columns, 3 rows of 16 px with 2 px padding
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("preview")] == [0, 1, 2]


def test_previews_follow_the_frequency_and_the_last_epoch(tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    main.cli([*TINY, "--data_path", str(data), "--output_dir", str(out), "--epochs", "4", "--preview_freq", "2",
              "--preview_steps", "2"])
    assert sorted(p.name for p in (out / "previews").glob("*.png")) == ["epoch0000.png", "epoch0002.png",
                                                                         "epoch0003.png"]
