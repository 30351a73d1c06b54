"""The CUDA smoke suite: what no CPU test can see, each check under 30 s on one H100.

Skipped without a CUDA device (tests/conftest.py); on a GPU machine `bash scripts/gpu_check.sh` runs it with
`benchmarks/gpu.sh` (docs/gpu.md). Figures worth recording (peak memory) are printed: run with `-s`.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import main
from engine_transdiff import TrainingMonitor
from models.noise import PerImageNoise
from models.samplers import run_sampler
from models.transdiff import transdiff_base, transdiff_large
from models.vae import AutoencoderKL
from tests.support import REPO_ROOT
from tests.support.runs import TINY, pngs, write_image_folder
from tests.support.tiny_runs import LABELS, tiny_model, training_images
from util import distributed as dist
from util import run_state
from util.checkpoint import load_checkpoint
from util.execution.precision import decode_images, resolve_precision
from util.execution.wrap import compile_blocks
from util.optim import EMA, build_grad_scaler, build_optimizer

CUDA = torch.device("cuda", 0)
CUDA_TINY = [flag if flag != "cpu" else "cuda" for flag in TINY]  # the end-to-end tiny flags with --device cuda


def latents_for(model, batch, generator):
    """Random KL-16-shaped training latents [B, C, h, w] (MRAR: one per stage) on the GPU."""
    shape = (batch, model.vae_embed_dim, model.latent_size, model.latent_size)
    if model.mrar:
        return [torch.randn(shape, generator=generator).to(CUDA) for _ in range(model.num_stages)]
    return torch.randn(shape, generator=generator).to(CUDA)


def training_step(model, precision, steps=2, batch=4):
    """`steps` optimizer steps of `model` (on the GPU, with dropout) under `precision`; returns the losses."""
    generator = torch.Generator().manual_seed(0)
    optimizer = build_optimizer(model, 1e-4, 0.02, device_type="cuda")
    scaler = build_grad_scaler(precision == "fp16", "cuda")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    losses = []
    for _ in range(steps):
        labels = torch.randint(0, 1000, (batch,), generator=generator).to(CUDA)
        with torch.autocast("cuda", dtype=dtype):
            loss = model(latents_for(model, batch, generator), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mrar,backends", [(False, [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]),
                                           (True, [SDPBackend.EFFICIENT_ATTENTION])])
def test_fused_attention_kernels_run_bf16_training_with_dropout(mrar, backends):
    """The math fallback is excluded: 1-step attention runs flash or memory-efficient kernels, and the MRAR
    block-causal mask the memory-efficient one, in bf16 with attention dropout, forward and backward."""
    model = transdiff_base(img_size=256, mrar=mrar, patch_size=2 if mrar else 1, diffusion_batch_mul=2,
                           attn_dropout=0.1, proj_dropout=0.1).to(CUDA).train()
    generator = torch.Generator().manual_seed(0)
    with sdpa_kernel(backends), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(latents_for(model, 2, generator), torch.tensor([1, 2], device=CUDA))
        loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_local_rank_gets_a_visible_device_and_saves_its_own_generator():
    count = torch.cuda.device_count()
    assert [dist.local_cuda_device(rank) for rank in range(2 * count)] == [
        torch.device("cuda", rank % count) for rank in range(2 * count)]
    device = dist.local_cuda_device(0)
    torch.cuda.manual_seed(123)
    state = run_state.rng_state(device)
    expected = torch.randn(4, device=device)
    assert run_state.restore_rng_state([state], device)
    assert torch.equal(torch.randn(4, device=device), expected)


def test_auto_precision_is_bf16_on_this_gpu():
    assert resolve_precision("auto", "cuda") == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_transdiff_b_training_step_stays_finite(precision):
    """TransDiff-B at 256 px, batch 4 x diffusion_batch_mul 4, AdamW (fused) and grad clipping; fp16 with the grad
    scaler."""
    torch.manual_seed(0)
    model = transdiff_base(img_size=256, diffusion_batch_mul=4).to(CUDA).train()
    losses = training_step(model, precision)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_decoding_large_latents_of_an_fp16_run_stays_finite():
    """An fp16 run decodes in float32 (`decode_precision`): latents far outside the training range, a batch larger
    than one decode chunk, through a full-size KL-16 decoder."""
    torch.manual_seed(0)
    vae = AutoencoderKL(embed_dim=16).to(CUDA).eval()  # the KL-16 layout, random weights (none on the machine)
    latents = torch.randn(40, 16, 16, 16, device=CUDA) * 10  # [B, C, h, w], x latent_scale as the model makes
    with torch.no_grad():
        images = decode_images(vae, latents, "fp16", CUDA)
    assert images.shape == (40, 3, 256, 256) and images.dtype == torch.float32
    assert torch.isfinite(images).all()


def test_compiled_blocks_train_and_sample_as_eager_on_cuda():
    eager, compiled = tiny_model().to(CUDA), tiny_model().to(CUDA)
    compile_blocks(compiled)
    results = []
    for model in (eager, compiled):
        loss = model.train()(training_images(model).to(CUDA), LABELS.to(CUDA),
                             generator=torch.Generator(CUDA).manual_seed(3))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        latents = model.eval().samples(LABELS.to(CUDA), 4, cfg=1.5, generator=torch.Generator(CUDA).manual_seed(5))
        results.append((loss.detach(), grads, latents))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for one epoch on the GPU in process."""
    data = write_image_folder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("trained")
    main.cli([*CUDA_TINY, "--data_path", str(data), "--output_dir", str(out), "--epochs", "1"])
    return out


def test_evaluate_writes_complete_images_and_reruns_bit_identically(tmp_path, tiny_checkpoint):
    evaluate = [*CUDA_TINY, "--resume", str(tiny_checkpoint), "--evaluate", "--num_images", "24", "--eval_bsz", "8",
                "--num_sampling_steps", "8", "--cfg", "1.5", "--metrics", ""]
    folders = []
    for name in ("first", "second"):
        main.cli([*evaluate, "--output_dir", str(tmp_path / name)])
        record = json.loads((tmp_path / name / "metrics.json").read_text())[-1]
        folders.append(pngs(record["folder"]))
    assert len(folders[0]) == 24 and folders[0] == folders[1]


def test_a_single_rank_nccl_torchrun_trains(tmp_path):
    data = write_image_folder(tmp_path / "data")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "main.py",
               *CUDA_TINY, "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--epochs", "1"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(str(tmp_path / "out" / "checkpoint-last.pth"))
    assert state["epoch"] == 0 and state["rng_states"][0]["cuda_device"].numel() > 0


def test_peak_memory_of_a_transdiff_l_step_at_batch_8_is_reported(record_property):
    """TransDiff-L at 256 px, batch 8 x diffusion_batch_mul 4, bf16, one AdamW step: the allocator's peak."""
    torch.manual_seed(0)
    model = transdiff_large(img_size=256, diffusion_batch_mul=4).to(CUDA).train()
    torch.cuda.reset_peak_memory_stats(CUDA)
    losses = training_step(model, "bf16", steps=1, batch=8)
    peak = torch.cuda.max_memory_allocated(CUDA) / 2**30
    record_property("transdiff_l_batch8_peak_gib", round(peak, 2))
    print(f"\nTransDiff-L training step, batch 8 x 4, bf16, AdamW: peak {peak:.2f} GiB on "
          f"{torch.cuda.get_device_name(CUDA)}, loss {losses[0]:.4f}")
    assert torch.isfinite(torch.tensor(losses)).all()
    assert peak * 2**30 < torch.cuda.get_device_properties(CUDA).total_memory


def test_a_training_step_and_sampling_steps_never_wait_for_the_gpu():
    """Under `torch.cuda.set_sync_debug_mode("error")` a device synchronisation raises: a bf16 training step as the
    engine runs it (forward, backward, clipping, fused AdamW, EMA, the loss kept on the device, the save policy's
    agreement), then guided Euler-Maruyama steps with a guidance interval and per-image CPU noise."""
    torch.manual_seed(0)
    model = tiny_model(attn_dropout=0.1, proj_dropout=0.1).to(CUDA)
    optimizer, ema = build_optimizer(model, 1e-4, 0.02, device_type="cuda"), EMA(model)
    monitor, policy = TrainingMonitor(CUDA, len(LABELS), 1.0), run_state.SavePolicy(every_steps=3)
    images, labels = training_images(model).to(CUDA), LABELS.to(CUDA)

    def train_step(step):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.train()(images, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, 0.999)
        monitor.add(loss, 0, step)
        policy.decide(step)

    train_step(0)  # lazy initialisations (optimizer state, cuBLAS) outside the check
    model.eval()
    with torch.no_grad():
        condition = model.label_condition(labels, guided=True)  # unique() of the labels: once per batch
        velocity = model.velocity_function(condition, cfg=1.5, cfg_interval=(0.2, 0.8))
        noise = PerImageNoise.from_seeds(range(len(LABELS)))
        x = noise.randn((len(LABELS), model.diff_seqlen, model.decoder_token_dim), device=CUDA, dtype=torch.float32)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.enable_grad():
                train_step(1)
            out = run_sampler("maruyama", velocity, x, 6, noise, scale_0=0.9, scale_1=0.95)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        policy.close()
    assert torch.isfinite(out).all()
    monitor.flush()
    assert monitor.take()[0].steps == 2
