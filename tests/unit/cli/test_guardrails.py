"""Guardrails: --num_workers capped at the CPUs, warnings for a big model on a CPU or on a few hundred images, and
the lr line saying how the lr was derived."""
import os

import pytest

import main
from tests.support.runs import write_image_folder
from util import settings
from util.lr_sched import lr_derivation
from util.settings import available_cpus, capped_workers, cpu_training_warning, small_data_warning

TINY = ("--model transdiff_tiny --tokenizer pixel --vae_stride 2 --vae_embed_dim 12 --img_size 16 --class_num 3 "
        "--buffer_size 4 --device cpu --batch_size 4 --blr 1e-3 --epochs 1 --preview_freq 0").split()
TINY_PARAMETERS = 300_000  # transdiff_tiny at these settings: 0.3M


def test_workers_beyond_the_cpus_are_lowered_with_the_reason():
    workers, note = capped_workers(10, 2)
    assert workers == 2
    assert note.startswith("--num_workers 10 lowered to 2: this process may use 2 CPU(s)")


@pytest.mark.parametrize("requested", [0, 1, 2])
def test_workers_within_the_cpus_are_kept_without_a_note(requested):
    assert capped_workers(requested, 2) == (requested, None)


def test_the_cpus_are_the_affinity_mask_where_there_is_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert available_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert available_cpus() == 7


@pytest.mark.parametrize("parameters,device,warned", [
    (290_000_000, "cpu", True), (100_000_000, "cpu", True), (99_999_999, "cpu", False), (290_000_000, "cuda", False),
    (290_000_000, "mps", False)])
def test_a_model_of_100m_parameters_or_more_on_a_cpu_is_warned_about(parameters, device, warned):
    warning = cpu_training_warning(parameters, device)
    assert (warning is not None) is warned
    if warned:
        assert f"{parameters / 1e6:.0f}M-parameter model on the CPU" in warning and "transdiff_tiny" in warning


@pytest.mark.parametrize("parameters,examples,warned", [
    (290_000_000, 300, True), (290_000_000, 999, True), (290_000_000, 1000, False), (TINY_PARAMETERS, 300, False)])
def test_a_big_model_on_a_few_hundred_images_is_warned_about(parameters, examples, warned):
    warning = small_data_warning(parameters, examples)
    assert (warning is not None) is warned
    if warned:
        assert warning.startswith(f"{examples} training examples for a 290M-parameter model")


def test_the_lr_line_spells_out_the_scaling_rule():
    assert lr_derivation(2.5e-5, 1e-4, 16, 2, 2) == (
        "lr 2.5e-5 = blr 1e-4 x effective batch 64 / 256 (batch_size 16 x 2 accumulation x 2 processes)")
    assert lr_derivation(4e-3, 6.4e-2, 16, 1, 1) == (
        "lr 0.004 = blr 0.064 x effective batch 16 / 256 (batch_size 16 x 1 accumulation x 1 process)")


def test_the_lr_line_says_when_lr_was_given():
    assert lr_derivation(5e-5, 1e-4, 16, 2, 64) == "lr 5e-5 (--lr as given; --blr unused)"


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """log.txt of a tiny training asking for 3 workers on 1 CPU, with the big-model threshold lowered below it."""
    root = tmp_path_factory.mktemp("guarded")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "available_cpus", lambda: 1)
        patch.setattr(settings, "BIG_MODEL_PARAMETERS", 1000)
        main.cli([*TINY, "--num_workers", "3", "--data_path", str(write_image_folder(root / "data")),
                  "--output_dir", str(root / "out")])
    return (root / "out" / "log.txt").read_text()


def test_a_training_run_notes_the_lowered_workers(guarded_run):
    assert "--num_workers 3 lowered to 1: this process may use 1 CPU(s)" in guarded_run


def test_a_training_run_warns_of_a_big_model_on_the_cpu_and_of_little_data(guarded_run):
    assert "warning: training a 0M-parameter model on the CPU" in guarded_run
    assert "warning: 24 training examples for a 0M-parameter model" in guarded_run


def test_a_training_run_logs_how_its_lr_was_derived(guarded_run):
    line = lr_derivation(1e-3 * 4 / 256, 1e-3, 4, 1, 1)
    assert line == "lr 1.56e-5 = blr 0.001 x effective batch 4 / 256 (batch_size 4 x 1 accumulation x 1 process)"
    assert "batches per epoch and process; " + line in guarded_run


def test_an_evaluation_on_the_cpu_is_not_warned_about(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "BIG_MODEL_PARAMETERS", 1000)
    main.cli([*TINY, "--evaluate", "--allow_random_weights", "--metrics=", "--num_images", "3", "--num_sampling_steps",
              "1", "--sampler", "euler", "--output_dir", str(tmp_path / "out")])
    assert "warning:" not in (tmp_path / "out" / "log.txt").read_text()
