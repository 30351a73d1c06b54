"""util.run_state: the run's settings and checkpoint names, every rank's generator states (on any GPU layout, CUDA
mocked), what a save holds, what a run restores from which checkpoint, and when a run saves inside an epoch."""
import copy
import dataclasses
import math
import os
import random
import re
import signal

import numpy as np
import pytest
import torch

from tests.support.runs import assert_same_tensors, load_state
from tests.support.tiny_runs import tiny_model
from util import distributed as dist
from util import run_state
from util.checkpoint import save_checkpoint
from util.errors import Preempted
from util.execution.wrap import RanksDiverged, parameter_digest, wrap_model
from util.optim import EMA


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA generator states as tensors naming their device; `restored` records set_rng_state calls."""
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.item(), device)))
    return restored


def cpu_states():
    return run_state.rng_state(torch.device("cpu"))


def test_a_rank_saves_the_generator_of_its_own_device_only(fake_cuda):
    state = run_state.rng_state(torch.device("cuda", 3))
    assert state["cuda_device"].item() == 3 and "cuda" not in state
    assert "cuda_device" not in run_state.rng_state(torch.device("cpu"))


def test_restore_puts_the_state_on_the_own_device_whatever_the_layout(fake_cuda):
    saved = {**cpu_states(), "cuda_device": torch.tensor([5], dtype=torch.uint8)}  # saved on cuda:5 of 8
    assert run_state.restore_rng_state([saved], torch.device("cuda", 1))  # now cuda:1 of 4
    assert fake_cuda == [(5, torch.device("cuda", 1))]


def test_an_older_checkpoint_with_every_visible_gpu_still_loads(fake_cuda):
    """Older checkpoints held `get_rng_state_all()`; restoring that list on a process that sees fewer GPUs raised
    IndexError. Now the device's own entry is taken when there is one; otherwise a warning, and the run goes on."""
    older = {**cpu_states(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    assert run_state.restore_rng_state([older], torch.device("cuda", 6))
    assert fake_cuda == [(6, torch.device("cuda", 6))]
    short = {**cpu_states(), "cuda": [torch.tensor([0], dtype=torch.uint8)]}
    with pytest.warns(UserWarning, match="no generator state for cuda:2"):
        assert run_state.restore_rng_state([short], torch.device("cuda", 2))
    assert fake_cuda == [(6, torch.device("cuda", 6))]


def test_a_device_without_an_index_is_the_current_one(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    older = {**cpu_states(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(3)]}
    assert run_state.restore_rng_state([older], torch.device("cuda"))
    assert fake_cuda == [(2, torch.device("cuda"))]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # one past the list
    with pytest.warns(UserWarning) as warned:
        run_state.restore_rng_state([older], torch.device("cuda"))
    assert [str(w.message) for w in warned] == ["the checkpoint holds no generator state for cuda: its draws differ "
                                                "from an uninterrupted run's"]


def test_cpu_states_round_trip_and_another_world_size_restores_nothing():
    np.random.rand(5)  # numpy's position inside its key block is part of its state
    saved = cpu_states()
    expected = torch.rand(3), np.random.rand(), random.random()
    assert run_state.restore_rng_state([saved], torch.device("cpu"))
    again = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]
    assert not run_state.restore_rng_state([saved, saved], torch.device("cpu"))


# --- the run's settings, file names and the resume argument -------------------------------------------------------

class Log:
    """A logger that keeps what it was told, by level."""

    def __init__(self):
        self.lines = {"info": [], "warning": []}

    def info(self, message):
        self.lines["info"].append(message)

    def warning(self, message):
        self.lines["warning"].append(message)


def test_run_settings_defaults_and_data_order():
    run = run_state.RunSettings("out")
    assert (run.flags, run.seed, run.batch_size, run.accumulation_steps, run.resume, run.load_step, run.evaluate,
            run.allow_random_weights, run.start_epoch, run.save_every_steps, run.save_every_minutes) == (
        {}, 0, 1, 1, "", "last", False, False, 0, 0, 0.0)
    assert run_state.RunSettings("out", seed=3, batch_size=8).data_order() == {"seed": 3, "world_size": 1,
                                                                               "batch_size": 8}


def test_a_training_checkpoint_of_the_same_model_size_and_kind_continues():
    flags = {"model": "transdiff_tiny", "mrar": False, "img_size": 16, "blr": 1e-4}
    run = run_state.RunSettings("out", flags=flags)
    checkpoint = {"optimizer": {}, "epoch": 2, "args": {**flags, "blr": 5e-5}}  # other flags may change
    assert run.continues(checkpoint)
    assert not run.continues({**checkpoint, "args": {}})
    assert not run.continues({"optimizer": {}, "epoch": 2})  # no args at all (a foreign checkpoint)
    for key in ("optimizer", "epoch"):
        assert not run.continues({k: v for k, v in checkpoint.items() if k != key})
    for key, other in (("model", "transdiff_base"), ("mrar", True), ("img_size", 32)):
        assert not run.continues({**checkpoint, "args": {**flags, key: other}}), key


def test_checkpoint_names_and_what_resume_resolves_to(tmp_path):
    assert run_state.checkpoint_path("runs/a", "last") == os.path.join("runs/a", "checkpoint-last.pth")
    assert run_state.checkpoint_path("runs/a", 7) == os.path.join("runs/a", "checkpoint-7.pth")
    file = tmp_path / "weights.pth"
    file.write_bytes(b"x")
    assert run_state.find_resume_checkpoint(str(file)) == str(file)
    assert run_state.find_resume_checkpoint("") is None and run_state.find_resume_checkpoint(None) is None
    assert run_state.find_resume_checkpoint(str(tmp_path / "not-yet")) is None
    assert run_state.find_resume_checkpoint(str(tmp_path)) is None  # a folder without checkpoint-last.pth
    (tmp_path / "checkpoint-last.pth").write_bytes(b"x")
    (tmp_path / "checkpoint-3.pth").write_bytes(b"x")
    assert run_state.find_resume_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")
    assert run_state.find_resume_checkpoint(str(tmp_path), "3") == str(tmp_path / "checkpoint-3.pth")
    assert run_state.find_resume_checkpoint(str(tmp_path), "4") is None


def test_an_older_checkpoint_without_numpy_position_keeps_the_current_one_and_python_lists_load():
    np.random.rand(3)
    saved = cpu_states()
    older = {**saved, "python": [list(x) if isinstance(x, tuple) else x for x in saved["python"]]}
    del older["numpy_position"]
    np.random.rand(7)
    position = np.random.get_state()[2:]
    expected_python = random.random()
    assert run_state.restore_rng_state([older], torch.device("cpu"))
    assert np.random.get_state()[2:] == position and random.random() == expected_python


def test_each_rank_restores_its_own_entry(monkeypatch):
    torch.manual_seed(1)
    first = cpu_states()
    torch.manual_seed(2)
    second = cpu_states()
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert run_state.restore_rng_state([first, second], torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), second["torch"])
    assert not run_state.restore_rng_state([], torch.device("cpu"))
    assert not run_state.restore_rng_state(None, torch.device("cpu"))


def test_a_position_is_complete_when_every_batch_is_done():
    assert run_state.Position(0, 5, 5).complete and run_state.Position(0, 6, 5).complete
    assert not run_state.Position(0, 4, 5).complete


# --- save and restore with a tiny model ---------------------------------------------------------------------------

FLAGS = {"model": "transdiff_tiny", "mrar": False, "img_size": 16}


class Training:
    """A tiny model with its execution, EMA and optimizer, after one step (so the optimizer has state)."""

    def __init__(self, seed=0, scaler_enabled=False):
        self.model = tiny_model()
        with torch.no_grad():
            for param in self.model.parameters():
                param.add_(seed)
        self.execution = wrap_model(self.model, torch.device("cpu"))
        self.ema = EMA(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.model.fake_latent.grad = torch.ones_like(self.model.fake_latent)
        self.optimizer.step()
        self.ema.update(self.model, 0.5)
        self.scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)

    def save(self, run, name="last", position=run_state.Position(2, 5, 10)):
        return run_state.save(run, name, self.execution, self.ema, self.optimizer, self.scaler, position)

    def restore(self, run, log=None):
        return run_state.restore(run, self.model, self.ema, self.optimizer, self.scaler, log or Log())


def test_a_save_records_the_position_the_data_order_and_every_rank(tmp_path):
    training = Training(scaler_enabled=True)
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS, seed=4, batch_size=2, accumulation_steps=3)
    path = training.save(run, 9, run_state.Position(2, 5, 10))
    assert path == str(tmp_path / "checkpoint-9.pth")
    state = load_state(path)
    assert (state["epoch"], state["epoch_step"], state["steps_per_epoch"], state["accumulation_micro_step"]) == (
        2, 5, 10, 0)
    assert state["optimizer_step"] == 2 * 4 + 2  # ceil(10 / 3) steps per epoch, ceil(5 / 3) done of epoch 2
    assert state["data_order"] == {"seed": 4, "world_size": 1, "batch_size": 2} and state["args"] == FLAGS
    assert len(state["rng_states"]) == 1 and torch.equal(state["rng_states"][0]["torch"], torch.get_rng_state())
    assert state["rank_weight_digests"] == [parameter_digest(training.model)]
    assert state["rank_ema_digests"] == [parameter_digest(training.ema.module)]
    assert_same_tensors(state["model"], training.model.state_dict())
    assert_same_tensors(state["model_ema"], training.ema.state_dict())
    assert state["optimizer"]["state"][0]["step"] == training.optimizer.state_dict()["state"][0]["step"]
    assert state["scaler"] == training.scaler.state_dict()
    training.scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert "scaler" not in load_state(training.save(run))
    training.scaler = None
    assert "scaler" not in load_state(training.save(run))


@pytest.mark.parametrize("diverging, what", [(1, "weights"), (2, "EMA weights")])
def test_a_save_refuses_ranks_whose_weights_or_ema_differ(tmp_path, monkeypatch, diverging, what):
    """Another rank's digest differs in the `diverging`-th comparison of the save: the weights, then the EMA."""
    compared = []

    def gather(obj):
        if not isinstance(obj, str):
            return [obj, obj]
        compared.append(obj)
        return [obj, "another digest" if len(compared) == diverging else obj]

    monkeypatch.setattr(dist, "all_gather_object", gather)
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS)
    with pytest.raises(RanksDiverged, match=f"^the ranks' {what} diverged at epoch 2, step 5: \\['"):
        Training().save(run, position=run_state.Position(2, 5, 10))
    assert not os.path.exists(run_state.checkpoint_path(str(tmp_path), "last"))


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "is_main_process", lambda: False)
    path = Training().save(run_state.RunSettings(str(tmp_path), flags=FLAGS))
    assert path == str(tmp_path / "checkpoint-last.pth") and not os.path.exists(path)


def assert_same_weights(training, other):
    assert_same_tensors(training.model.state_dict(), other.model.state_dict())
    assert_same_tensors(training.ema.state_dict(), other.ema.state_dict())


def test_the_runs_own_last_checkpoint_wins_and_continues_exactly(tmp_path):
    saved = Training(seed=1)
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS, resume=str(tmp_path / "elsewhere.pth"))
    saved.save(run, position=run_state.Position(2, 10, 10))
    torch.manual_seed(123)  # restored below: the saved generator state replaces it
    fresh, log = Training(), Log()
    assert fresh.restore(run, log) == run_state.Restored(3, "2", str(tmp_path / "checkpoint-last.pth"), 0)
    assert_same_weights(saved, fresh)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == saved.optimizer.state_dict()["state"][0]["step"]
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"],
                       saved.optimizer.state_dict()["state"][0]["exp_avg"])
    saved_states = load_state(run_state.checkpoint_path(str(tmp_path), "last"))["rng_states"]
    assert torch.equal(torch.get_rng_state(), saved_states[0]["torch"])
    assert log.lines == {"info": [f"resumed {tmp_path / 'checkpoint-last.pth'} (epoch 2): continuing at epoch 3"],
                         "warning": []}


def test_a_scaler_state_is_restored_when_the_checkpoint_has_one(tmp_path):
    saved = Training()
    saved.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS)
    saved.save(run)
    fresh = Training(scaler_enabled=True)
    fresh.restore(run)
    assert fresh.scaler.get_scale() == 1024.0


def test_inside_an_epoch_the_run_continues_at_the_next_batch_under_the_same_order_only(tmp_path):
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS, seed=5, batch_size=2)
    path = Training().save(run, position=run_state.Position(2, 4, 10))
    log = Log()
    assert Training().restore(run, log) == run_state.Restored(2, "2", path, 4)
    assert log.lines["info"] == [f"resumed {path} (epoch 2, 4 of 10 batches done): continuing at batch 4"]
    log = Log()
    assert Training().restore(dataclasses.replace(run, batch_size=4), log) == run_state.Restored(2, "2", path, 0)
    assert log.lines["warning"] == [f"{path} stopped inside epoch 2, but the seed, world size or batch size "
                                    "changed: epoch 2 starts again from its first batch"]


def test_another_world_size_continues_with_a_warning(tmp_path):
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS)
    path = Training().save(run, position=run_state.Position(1, 3, 3))
    state = load_state(path)
    state["rng_states"] *= 2
    save_checkpoint(path, state)  # atomic: the loaded state maps the old file
    log = Log()
    assert Training().restore(run, log) == run_state.Restored(2, "1", path, 0)
    assert log.lines["warning"] == ["the world size changed since this checkpoint: training continues, but its "
                                    "random draws differ from an uninterrupted run"]


def test_a_checkpoint_without_its_position_counts_as_a_complete_epoch(tmp_path):
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS)
    path = Training().save(run)
    state = load_state(path)
    del state["epoch_step"], state["steps_per_epoch"]
    save_checkpoint(path, state)  # atomic: the loaded state maps the old file
    assert Training().restore(run) == run_state.Restored(3, "2", path, 0)


def test_evaluating_reads_resume_and_never_the_optimizer(tmp_path):
    saved = Training(seed=1)
    checkpoints = tmp_path / "trained"
    saved.save(run_state.RunSettings(str(checkpoints), flags=FLAGS), name=7, position=run_state.Position(7, 1, 1))
    Training(seed=2).save(run_state.RunSettings(str(tmp_path), flags=FLAGS))  # the output folder's own
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS, evaluate=True, resume=str(checkpoints), load_step="7",
                                start_epoch=4)
    fresh, log = Training(), Log()
    optimizer_before = copy.deepcopy(fresh.optimizer.state_dict())
    path = str(checkpoints / "checkpoint-7.pth")
    assert fresh.restore(run, log) == run_state.Restored(4, "7", path, 0)
    assert_same_weights(saved, fresh)
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"], optimizer_before["state"][0]["exp_avg"])
    assert log.lines["info"] == [f"evaluating weights from {path} (epoch 7)"]


def test_released_weights_initialise_a_run_that_starts_at_epoch_zero(tmp_path):
    saved = Training(seed=1)
    released = tmp_path / "released.pth"
    torch.save({"model": saved.model.state_dict(), "model_ema": saved.ema.state_dict()}, released)
    run = run_state.RunSettings(str(tmp_path / "run"), flags=FLAGS, resume=str(released), start_epoch=5)
    fresh, log = Training(), Log()
    assert fresh.restore(run, log) == run_state.Restored(0, "released", str(released), 0)
    assert_same_tensors(fresh.model.state_dict(), saved.model.state_dict())  # the model from 'model' ...
    assert_same_tensors(fresh.ema.state_dict(), saved.ema.state_dict())  # ... and the EMA from 'model_ema'
    assert log.lines["info"] == [f"initialised from {released} (model, epoch -1); optimizer and epoch start fresh"]
    evaluation = dataclasses.replace(run, evaluate=True)
    assert Training().restore(evaluation) == run_state.Restored(5, "released", str(released), 0)


def test_a_training_checkpoint_of_another_configuration_initialises_the_weights(tmp_path):
    saved = Training(seed=1)
    path = saved.save(run_state.RunSettings(str(tmp_path / "a"), flags={**FLAGS, "img_size": 32}))
    run = run_state.RunSettings(str(tmp_path / "b"), flags=FLAGS, resume=path)
    fresh = Training()
    optimizer_before = copy.deepcopy(fresh.optimizer.state_dict())
    assert fresh.restore(run) == run_state.Restored(0, "2", path, 0)
    assert_same_weights(saved, fresh)
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"], optimizer_before["state"][0]["exp_avg"])


def test_adapted_tensors_are_logged_and_a_misfit_names_the_file(tmp_path):
    weights = Training(seed=1).model.state_dict()
    resized = tmp_path / "resized.pth"
    grid = weights["diffdecoder.net.diffusion_pos_embed_learned"]  # [1, N, D], N a square
    side = math.isqrt(grid.shape[1])
    torch.save({"model": {**weights, "diffdecoder.net.diffusion_pos_embed_learned":
                          torch.zeros(1, (side + 1) ** 2, grid.shape[2])}}, resized)
    log = Log()
    Training().restore(run_state.RunSettings(str(tmp_path / "run"), flags=FLAGS, resume=str(resized)), log)
    assert [line for line in log.lines["info"] if line.startswith("adapted: diffdecoder.net.diffusion_pos")]
    misfit = tmp_path / "misfit.pth"
    torch.save({"model": {**weights, "class_emb.weight": torch.zeros(3, 3)}}, misfit)
    with pytest.raises(ValueError, match=f"^{re.escape(str(misfit))}: "):
        Training().restore(run_state.RunSettings(str(tmp_path / "run"), flags=FLAGS, resume=str(misfit)))


def test_what_starts_without_a_checkpoint(tmp_path):
    fresh = tmp_path / "fresh"
    run = run_state.RunSettings(str(fresh), flags=FLAGS, start_epoch=3)
    assert Training().restore(run) == run_state.Restored(3, "scratch", "", 0)
    with pytest.raises(FileNotFoundError, match=f"^--resume {re.escape(str(fresh / 'x.pth'))}: no such file or "
                                                "folder$"):
        Training().restore(dataclasses.replace(run, resume=str(fresh / "x.pth")))
    tmp_path.joinpath("empty").mkdir()
    empty = dataclasses.replace(run, resume=str(tmp_path / "empty"))
    log = Log()
    assert Training().restore(empty, log) == run_state.Restored(3, "scratch", "", 0)
    assert log.lines["warning"] == ["!" * 80 + f"\n--resume {tmp_path / 'empty'}: no checkpoint-last.pth in this "
                                    "folder; TRAINING FROM SCRATCH\n" + "!" * 80]
    with pytest.raises(FileNotFoundError, match="no checkpoint-last.pth in this folder; nothing to evaluate$"):
        Training().restore(dataclasses.replace(empty, evaluate=True))
    with pytest.raises(ValueError, match=r"^--evaluate needs weights: pass --resume <checkpoint or folder> \(or "
                                         r"--allow_random_weights to score an untrained model\)$"):
        Training().restore(dataclasses.replace(run, evaluate=True))
    allowed = dataclasses.replace(run, evaluate=True, allow_random_weights=True)
    assert Training().restore(allowed) == run_state.Restored(3, "scratch", "", 0)


# --- when a run saves inside an epoch -----------------------------------------------------------------------------

@pytest.fixture
def clock(monkeypatch):
    """time.monotonic as a number the test sets."""
    now = [1000.0]
    monkeypatch.setattr(run_state.time, "monotonic", lambda: now[0])
    return now


def test_every_n_steps(clock):
    policy = run_state.SavePolicy(every_steps=3)
    try:
        assert [policy.decide(step) for step in range(1, 7)] == [(False, False), (False, False), (True, False),
                                                                 (False, False), (False, False), (True, False)]
        off = run_state.SavePolicy()
        assert (off.every_steps, off.every_minutes) == (0, 0.0) and off.decide(0) == (False, False)
        off.close()
        every = run_state.SavePolicy(every_steps=1)
        assert every.decide(1) == every.decide(2) == (True, False)
        every.close()
    finally:
        policy.close()


def test_every_half_minute(clock):
    policy = run_state.SavePolicy(every_minutes=0.5)
    try:
        clock[0] += 30
        assert policy.decide(1) == (True, False)
    finally:
        policy.close()


def test_every_m_minutes_of_rank_zeros_clock(clock, monkeypatch):
    policy = run_state.SavePolicy(every_minutes=2)
    try:
        clock[0] += 119.9
        assert policy.decide(1) == (False, False)
        clock[0] += 0.1
        assert policy.decide(2) == (True, False)
        policy.saved()
        assert policy.decide(3) == (False, False)
        clock[0] += 120
        monkeypatch.setattr(dist, "is_main_process", lambda: False)  # another rank's clock does not count
        assert policy.decide(4) == (False, False)
    finally:
        policy.close()


def test_a_sigterm_saves_at_the_next_step_and_stops_and_a_second_one_kills(monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)
    policy = run_state.SavePolicy()
    assert signal.getsignal(signal.SIGTERM) == policy._on_sigterm
    try:
        assert policy.decide(1) == (False, False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert policy.terminated and policy.decide(2) == (True, True)
        raised = []
        monkeypatch.setattr(run_state.signal, "raise_signal", raised.append)
        policy._on_sigterm(signal.SIGTERM, None)
        assert raised == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        policy.close()
    assert signal.getsignal(signal.SIGTERM) == previous


class Recorder:
    """A Checkpointer's saves, without writing files."""

    def __init__(self, monkeypatch, tmp_path, steps=10, accumulation_steps=2, **policy):
        self.saves = []
        monkeypatch.setattr(run_state, "save", lambda run, name, *parts: self.saves.append((name, parts[-1])) or
                            self.parts.append(parts[:-1]) or run_state.checkpoint_path(run.output_dir, name))
        self.parts = []
        self.log = Log()
        run = run_state.RunSettings(str(tmp_path), accumulation_steps=accumulation_steps, **policy)
        self.checkpointer = run_state.Checkpointer(run, "execution", "ema", "optimizer", "scaler", steps, self.log)


def test_inside_an_epoch_the_policy_sees_the_global_optimizer_step(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch, tmp_path, save_every_steps=7)  # 5 optimizer steps per epoch
    checkpointer = recorder.checkpointer
    try:
        checkpointer.inside_epoch(1, 2)  # optimizer step 6
        assert recorder.saves == []
        checkpointer.inside_epoch(1, 4)  # optimizer step 7
        assert recorder.saves == [("last", run_state.Position(1, 4, 10))]
        assert recorder.log.lines["info"] == [f"saved {tmp_path / 'checkpoint-last.pth'} at epoch 1, batch 4 of 10"]
        checkpointer.inside_epoch(1, 3)  # ceil(3 / 2): optimizer step 7 again
        assert len(recorder.saves) == 2
        checkpointer.policy.terminated = True  # due at any step
        checkpointer.inside_epoch(2, 10)  # the epoch's end: its own saves
        checkpointer.inside_epoch(2, 11)
        assert len(recorder.saves) == 2
        assert recorder.parts == [("execution", "ema", "optimizer", "scaler")] * 2
    finally:
        checkpointer.close()


def test_a_sigterm_inside_an_epoch_saves_and_raises_preempted(monkeypatch, tmp_path):
    recorder = Recorder(monkeypatch, tmp_path)
    checkpointer = recorder.checkpointer
    try:
        checkpointer.policy.terminated = True
        with pytest.raises(Preempted, match=f"^SIGTERM: saved {re.escape(str(tmp_path / 'checkpoint-last.pth'))} at "
                                            "epoch 0, batch 3; rerun the same command to continue$"):
            checkpointer.inside_epoch(0, 3)
        assert recorder.saves == [("last", run_state.Position(0, 3, 10))]
    finally:
        checkpointer.close()


def test_a_save_is_refused_by_before_save_and_restarts_the_clock(monkeypatch, tmp_path, clock):
    recorder = Recorder(monkeypatch, tmp_path, save_every_minutes=1.0, save_every_steps=3)
    checkpointer = recorder.checkpointer
    try:
        assert (checkpointer.policy.every_minutes, checkpointer.policy.every_steps) == (1.0, 3)
        clock[0] += 30
        checkpointer.after_save = lambda: recorder.parts.append(f"after {len(recorder.saves)} save(s)")
        assert checkpointer.save(4, 4, 10) == str(tmp_path / "checkpoint-4.pth")
        assert recorder.saves == [(4, run_state.Position(4, 10, 10))] and checkpointer.policy.last_save == 1030
        assert recorder.parts[-1] == "after 1 save(s)"
        checkpointer.before_save = lambda: (_ for _ in ()).throw(RuntimeError("the loss is not finite"))
        with pytest.raises(RuntimeError, match="not finite"):
            checkpointer.save(5, 5, 10)
        assert len(recorder.saves) == 1 and recorder.parts[-1] == "after 1 save(s)"
    finally:
        checkpointer.close()


@pytest.mark.parametrize("part", ["model", "model_ema"])
def test_non_finite_weights_are_refused_naming_the_file_and_tensor(tmp_path, part):
    saved = Training()
    path = tmp_path / "diverged.pth"
    weights = {**saved.model.state_dict(), "class_emb.weight": torch.full_like(saved.model.class_emb.weight, -math.inf)}
    state = {"model": saved.model.state_dict(), "model_ema": saved.ema.state_dict(), part: weights}
    torch.save(state, path)
    fresh = Training()
    before = copy.deepcopy(fresh.model.state_dict())
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} \\({part}\\): tensor class_emb.weight holds "
                                         "non-finite values"):
        fresh.restore(run_state.RunSettings(str(tmp_path / "run"), flags=FLAGS, resume=str(path)))
    assert_same_tensors(fresh.model.state_dict(), before)


@pytest.mark.parametrize("change, message", [
    ({"epoch": -5}, r"its epoch -5 is not an epoch \(an integer >= 0\); the file is damaged or not a training "
                    "checkpoint$"),
    ({"epoch": 2.5}, "its epoch 2.5 is not an epoch"),
    ({"epoch": "2"}, "its epoch '2' is not an epoch"),
    ({"epoch_step": 11}, r"its position \(11 of 10 batches of epoch 2\) is not a position in an epoch; the file is "
                         "damaged$"),
    ({"epoch_step": -1}, r"its position \(-1 of 10 batches"),
    ({"steps_per_epoch": 0, "epoch_step": 0}, r"its position \(0 of 0 batches"),
    ({"epoch_step": 1.5}, r"its position \(1.5 of 10 batches"),
])
def test_a_stored_epoch_or_position_out_of_range_is_refused(tmp_path, change, message):
    """A negative epoch once trained at a negative learning rate; a position beyond its epoch skips data."""
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS)
    path = Training().save(run, position=run_state.Position(2, 5, 10))
    save_checkpoint(path, {**load_state(path), **change})
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: {message}"):
        Training().restore(run)


def test_the_edges_of_a_stored_position_are_accepted(tmp_path):
    run = run_state.RunSettings(str(tmp_path), flags=FLAGS)
    path = Training().save(run, position=run_state.Position(0, 0, 10))
    assert Training().restore(run) == run_state.Restored(0, "0", path, 0)
    path = Training().save(run, position=run_state.Position(0, 10, 10))
    assert Training().restore(run) == run_state.Restored(1, "0", path, 0)


def test_a_misfit_ema_names_the_file_too(tmp_path):
    saved = Training()
    path = tmp_path / "ema_misfit.pth"
    torch.save({"model": saved.model.state_dict(),
                "model_ema": {**saved.ema.state_dict(), "class_emb.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: checkpoint does not fit the model"):
        Training().restore(run_state.RunSettings(str(tmp_path / "run"), flags=FLAGS, resume=str(path)))


def test_epoch_zero_is_an_epoch_not_released_weights(tmp_path):
    path = Training().save(run_state.RunSettings(str(tmp_path / "a"), flags={**FLAGS, "img_size": 32}),
                           position=run_state.Position(0, 10, 10))
    run = run_state.RunSettings(str(tmp_path / "b"), flags=FLAGS, resume=path)
    assert Training().restore(run) == run_state.Restored(0, "0", path, 0)  # initialised from another configuration
    assert Training().restore(dataclasses.replace(run, evaluate=True)) == run_state.Restored(0, "0", path, 0)
