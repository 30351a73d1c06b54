"""util.distributed: world-of-one behaviour, launcher parsing, and a real 2-process gloo group."""
import argparse
import contextlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from util import distributed as du

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")


def test_helpers_before_init_are_a_world_of_one(capsys):
    assert not du.is_initialized()
    assert (du.get_rank(), du.get_world_size(), du.get_local_rank()) == (0, 1, 0)
    assert du.is_main_process()
    du.barrier()
    assert du.all_reduce_mean(2.5) == 2.5
    assert du.all_reduce_mean(torch.tensor(4.0)) == 4.0
    assert du.all_reduce_sum([1, 2]) == [1.0, 2.0]
    payload = {"a": [1, 2]}
    assert du.broadcast_object(payload) is payload
    du.print0("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    du.cleanup()


def test_all_reduce_mean_rejects_non_scalar_tensor():
    with pytest.raises(ValueError, match="scalar"):
        du.all_reduce_mean(torch.ones(2))


def test_ddp_sync_is_a_null_context_for_plain_modules():
    ctx = du.ddp_sync(torch.nn.Linear(2, 2), sync=False)
    assert isinstance(ctx, contextlib.nullcontext)


def test_init_without_launcher_is_a_world_of_one(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(dist_on_itp=False, dist_url="env://")
    info = du.init_distributed(args, device_type="cpu")
    assert info == du.DistInfo(0, 1, 0, False, None, torch.device("cpu"))
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (0, 1, 0, False)
    assert not du.is_initialized()


@pytest.mark.parametrize("env, itp, expected", [
    ({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}, False, (5, 16, 1, "torchrun")),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "12", "SLURM_LOCALID": "3"}, False, (9, 12, 3, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, True,
     (2, 4, 2, "openmpi")),
    # torchrun inside a SLURM allocation: torchrun's variables win, as in MAR.
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
      "SLURM_LOCALID": "0"}, False, (1, 2, 1, "torchrun")),
])
def test_parse_launcher_env(env, itp, expected):
    assert tuple(du.parse_launcher_env(env, dist_on_itp=itp)) == expected


def test_parse_launcher_env_without_launcher_or_single_slurm_task():
    assert du.parse_launcher_env({}) is None
    assert du.parse_launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}) is None


def test_parse_launcher_env_names_the_missing_variable():
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        du.parse_launcher_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_SIZE"):
        du.parse_launcher_env({"OMPI_COMM_WORLD_RANK": "0"}, dist_on_itp=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    info = du.init_distributed({"dist_url": "env://"}, timeout_minutes=1, device_type="cpu")
    try:
        assert info.distributed and info.backend == "gloo"
        assert (du.get_rank(), du.get_world_size(), du.get_local_rank()) == (rank, world_size, rank)
        assert du.all_reduce_mean(float(rank)) == pytest.approx(0.5)
        assert du.all_reduce_mean(torch.tensor(2.0 * rank)) == pytest.approx(1.0)
        assert du.broadcast_object({"from": rank}) == {"from": 0}
        assert du.broadcast_object(rank, src=1) == 1

        torch.manual_seed(0)  # same initial weights on both ranks
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1, bias=False))
        inputs = torch.tensor([[float(rank + 1)]])
        with du.ddp_sync(model, sync=False):
            model(inputs).sum().backward()
        local_grad = model.module.weight.grad.clone()
        assert local_grad.item() == pytest.approx(rank + 1)  # not averaged across ranks
        model.zero_grad()
        with du.ddp_sync(model, sync=True):
            model(inputs).sum().backward()
        assert model.module.weight.grad.item() == pytest.approx(1.5)  # mean of 1 and 2
        du.barrier()
    finally:
        du.cleanup()


def test_two_process_gloo_group():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)


# Rank-0-only logging (util.logger): rank 0 writes, other ranks accept the calls and write nothing.

def test_create_logger_writes_stdout_and_log_txt_on_rank0(tmp_path, capsys):
    from util.logger import create_logger
    logger = create_logger(str(tmp_path))
    logger.info("step %d done", 3)
    for handler in logger.handlers:
        handler.flush()
    assert "step 3 done" in capsys.readouterr().out
    assert "step 3 done" in (tmp_path / "log.txt").read_text()


def test_create_logger_is_silent_off_rank0(tmp_path, capsys, monkeypatch):
    import util.logger as lg
    monkeypatch.setattr(lg, "is_main_process", lambda: False)
    logger = lg.create_logger(str(tmp_path / "run"))
    logger.info("hidden")
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "run").exists()


def test_smoothed_value_statistics():
    from util.logger import SmoothedValue
    meter = SmoothedValue(window_size=3, fmt="{median:.1f}|{avg:.1f}|{global_avg:.1f}|{max:.1f}|{value:.1f}")
    for value in (1.0, 5.0, 2.0, 3.0):
        meter.update(value)
    assert str(meter) == "3.0|3.3|2.8|5.0|3.0"
    meter.update(10.0, n=4)
    assert meter.global_avg == pytest.approx((11 + 40) / 8)
    meter.synchronize_between_processes()  # world of one: unchanged
    assert (meter.count, meter.total) == (8, 51.0)


def test_metric_logger_progress_lines_with_eta():
    from util.logger import MetricLogger
    lines = []
    metric_logger = MetricLogger(print_fn=lines.append)
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
    from util.logger import TensorboardWriter
    writer = TensorboardWriter(str(tmp_path / "tb"))
    assert writer.active
    writer.add_scalar("train_loss", 0.5, 1000)
    writer.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_tensorboard_writer_is_a_noop_off_rank0_or_without_tensorboard(tmp_path, monkeypatch):
    import sys

    import util.logger as lg
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
