"""Compiled execution (`--compile`, util/execution.compile_blocks) against eager execution on tiny models, CPU.

Inductor may reorder floating-point sums, so results agree to float32 rounding, not bit for bit. Each graph
compiles with the system C++ compiler (seconds per graph), hence the `compile` marker.
"""
import pytest
import torch
from torch.testing import assert_close

from tests.support.tiny_runs import LABELS, loss_and_grads, tiny_model
from util.execution.wrap import compile_blocks, compiled_blocks, wrap_model
from util.optim import EMA


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Start every test from an empty dynamo cache. A block's compiled graphs are cached per code object
    (`EncoderBlock.forward`, ...), so the graphs of earlier tests' models (other grad modes, other linear
    classes) would add up towards dynamo's recompile limit (8), which fullgraph turns into a hard failure."""
    torch._dynamo.reset()


def build(mrar=False, grad_checkpointing=False, dropout=0.0):
    return tiny_model(mrar, grad_checkpointing, dropout, dropout)


@pytest.mark.parametrize("mrar,grad_checkpointing,dropout", [
    (False, False, 0.0), (False, True, 0.1), (True, False, 0.1), (True, True, 0.1)])
def test_compiled_training_step_equals_eager(mrar, grad_checkpointing, dropout):
    """With dropout too: on CPU the compiled blocks draw eager's masks (`compile_blocks`)."""
    eager = build(mrar, grad_checkpointing, dropout)
    compiled = build(mrar, grad_checkpointing, dropout)
    wrap_model(compiled, torch.device("cpu"), compile=True)
    loss_eager, grads_eager = loss_and_grads(eager)
    loss_compiled, grads_compiled = loss_and_grads(compiled)
    assert_close(loss_compiled, loss_eager, atol=1e-6, rtol=1e-5)
    assert grads_compiled.keys() == grads_eager.keys()
    for name, grad in grads_eager.items():
        assert_close(grads_compiled[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sampler,cfg", [("maruyama", 1.5), ("euler", 1.0)])
def test_compiled_sampling_equals_eager(sampler, cfg):
    eager, compiled = build().eval(), build().eval()
    compile_blocks(compiled)
    runs = [model.samples(LABELS, 4, cfg=cfg, sampler=sampler, cfg_interval=(0.3, 1.0),
                          generator=torch.Generator().manual_seed(5)) for model in (eager, compiled)]
    assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5)


def test_compiled_model_keeps_its_checkpoint_layout_and_its_ema_copy_is_its_own():
    eager, compiled = build(), build()
    compile_blocks(compiled)
    assert all(block._compiled_call_impl is not None for block in compiled_blocks(compiled))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    eager.load_state_dict(compiled.state_dict(), strict=True)
    compiled.load_state_dict(eager.state_dict(), strict=True)
    ema = EMA(compiled)  # a deep copy: it must run its own weights, not the compiled model's
    assert all(block._compiled_call_impl is None for block in compiled_blocks(ema.module))
    with torch.no_grad():
        for param in compiled.parameters():
            param.add_(1.0)
    noise = torch.randn(len(LABELS), ema.module.diff_seqlen, ema.module.decoder_token_dim)
    assert torch.equal(ema.module.samples(LABELS, 2, noise=noise, sampler="euler"),
                       eager.samples(LABELS, 2, noise=noise, sampler="euler"))


def test_main_compile_trains_logs_the_compile_time_and_its_checkpoint_runs_eagerly(tmp_path):
    from tests.support.runs import TINY as TINY_FLAGS
    from tests.support.runs import run, write_image_folder

    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    run([*TINY_FLAGS, "--data_path", data, "--output_dir", out, "--epochs", 1, "--compile"])
    assert "--compile: the first step, compilation included, took" in (out / "log.txt").read_text()
    run([*TINY_FLAGS, "--data_path", data, "--output_dir", out, "--epochs", 2])  # eager, resumed from it
    run([*TINY_FLAGS, "--resume", out, "--output_dir", out, "--evaluate", "--num_images", 6, "--eval_bsz", 3,
         "--num_sampling_steps", 2, "--metrics", "", "--compile"])
    assert len(list(out.glob("*_evaluate/*.png"))) == 6
