"""The training log's progress lines: the loss read every PRINT_FREQ steps, images/s and model FLOP/s."""
import re

import pytest

import main
from tests.support.runs import TINY, write_image_folder
from util.execution.flops import training_flops_per_image
from util.settings import get_args_parser


def test_progress_lines_show_images_per_second_and_the_counted_flops(tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    main.cli([*TINY, "--data_path", str(data), "--output_dir", str(out), "--epochs", "1"])
    log = (out / "log.txt").read_text()
    flops = training_flops_per_image(lambda: main.build_model(get_args_parser().parse_args(TINY)))
    assert f"model FLOPs: {flops / 1e12:.4g} TFLOP per training image" in log
    lines = re.findall(r"img/s: (\S+)\s+tflop/s: (\S+)\s+loss: (\S+)", log)
    assert len(lines) == 2  # steps 0 and 5 of 6 (PRINT_FREQ 20)
    for images, tflops, loss in lines:
        assert float(images) > 0 and float(loss) > 0
        assert float(tflops) * 1e12 == pytest.approx(float(images) * flops, rel=1e-2)  # 3 significant digits
