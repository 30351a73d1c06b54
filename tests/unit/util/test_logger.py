"""util.logger: rank 0 writes stdout, log.txt and tensorboard; other ranks accept the calls and write nothing."""
import os
import sys

import pytest
import torch

import util.logger as lg


def test_create_logger_writes_stdout_and_log_txt_on_rank0(tmp_path, capsys):
    logger = lg.create_logger(str(tmp_path))
    logger.info("step %d done", 3)
    for handler in logger.handlers:
        handler.flush()
    assert "step 3 done" in capsys.readouterr().out
    assert "step 3 done" in (tmp_path / "log.txt").read_text()


def test_create_logger_is_silent_off_rank0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lg, "is_main_process", lambda: False)
    logger = lg.create_logger(str(tmp_path / "run"))
    logger.info("hidden")
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "run").exists()


def test_smoothed_value_statistics():
    meter = lg.SmoothedValue(window_size=3, fmt="{median:.1f}|{avg:.1f}|{global_avg:.1f}|{max:.1f}|{value:.1f}")
    for value in (1.0, 5.0, 2.0, 3.0):
        meter.update(value)
    assert str(meter) == "3.0|3.3|2.8|5.0|3.0"
    meter.update(10.0, n=4)
    assert meter.global_avg == pytest.approx((11 + 40) / 8)
    meter.synchronize_between_processes()  # world of one: unchanged
    assert (meter.count, meter.total) == (8, 51.0)


def test_metric_logger_progress_lines_with_eta():
    lines = []
    metric_logger = lg.MetricLogger(print_fn=lines.append)
    seen = []
    for item in metric_logger.log_every(range(5), print_freq=2, header="Epoch: [0]"):
        metric_logger.update(loss=torch.tensor(float(item)), lr=1e-4)
        seen.append(item)
    assert seen == [0, 1, 2, 3, 4]
    assert len(lines) == 4  # steps 0, 2, 4 and the total line
    assert lines[0].startswith("Epoch: [0]  [0/5]  eta: ")
    assert "loss: 0.0000 (0.0000)" in lines[0]
    assert "[4/5]" in lines[2] and "loss: 2.0000 (2.0000)" in lines[2]
    assert lines[3].startswith("Epoch: [0] total time: ")


def test_tensorboard_writer_rank0_writes_events(tmp_path):
    writer = lg.TensorboardWriter(str(tmp_path / "tb"))
    assert writer.active
    writer.add_scalar("train_loss", 0.5, 1000)
    writer.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_tensorboard_writer_is_a_noop_off_rank0_or_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setattr(lg, "is_main_process", lambda: False)
    writer = lg.TensorboardWriter(str(tmp_path / "a"))
    writer.add_scalar("x", 1.0, 0)
    writer.close()
    assert not writer.active and not (tmp_path / "a").exists()
    monkeypatch.setattr(lg, "is_main_process", lambda: True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.warns(UserWarning, match="tensorboard is not available"):
        writer = lg.TensorboardWriter(str(tmp_path / "b"))
    writer.add_scalar("x", 1.0, 0)
    assert not writer.active and not (tmp_path / "b").exists()
