"""Sampling speed: the cached-condition path (keys/values of the condition computed once per image) against
recomputing them at every step, as the original does, plus the AR-encoder share of the time.

    python benchmarks/bench_sampling.py --model transdiff_tiny --batch 8 --steps 20 --device cpu

Prints a markdown table (milliseconds per image). Not a test: numbers depend on the machine.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.flow import TIME_SCALE  # noqa: E402
from models.noise import TorchNoise  # noqa: E402
from models.samplers import run_sampler  # noqa: E402
from models.transdiff import TRANSDIFF_MODELS  # noqa: E402


def uncached_velocity(model, cond, cfg):
    """The original's per-step work: the condition projection and cross-attention keys/values every step."""
    net = model.diffdecoder.net

    def velocity(x, t):
        x_in = torch.cat([x, x])
        v = net(x_in, cond, (t * TIME_SCALE).expand(x_in.shape[0]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + cfg * (v_cond - v_uncond)
    return velocity


def timed(fn, device, repeats):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="transdiff_tiny", choices=sorted(TRANSDIFF_MODELS))
    parser.add_argument("--width", type=int, default=None, help="override the width (heads kept)")
    parser.add_argument("--img_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {} if args.width is None else dict(encoder_embed_dim=args.width, decoder_embed_dim=args.width)
    model = TRANSDIFF_MODELS[args.model](img_size=args.img_size, class_num=1000, **overrides).to(device).eval()
    labels = torch.arange(args.batch, device=device)
    noise = torch.randn(args.batch, model.diff_seqlen, model.decoder_token_dim, device=device)
    embedding = torch.cat([model.class_emb(labels), model.unconditional_embedding(args.batch)])
    cond = model.forward_encoder(None, embedding)

    def sample(velocity_factory):
        return lambda: run_sampler("maruyama", velocity_factory(), noise, args.steps, TorchNoise(), 1.0, 1.0)

    results = {
        "encoder (AR, once per image)": timed(lambda: model.forward_encoder(None, embedding), device, args.repeats),
        "sampling, condition cached (ours)": timed(sample(lambda: model.velocity_function(cond, args.cfg)), device,
                                                   args.repeats),
        "sampling, condition per step (original)": timed(sample(lambda: uncached_velocity(model, cond, args.cfg)),
                                                         device, args.repeats),
    }
    setup = (f"{args.model}{'' if args.width is None else f' width {args.width}'}, {args.img_size} px, batch "
             f"{args.batch}, {args.steps} steps, cfg {args.cfg}, {device.type}, {args.threads} thread(s)")
    print(f"| {setup} | ms per image |\n|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds / args.batch * 1000:.1f} |")
    print(json.dumps({"setup": setup, **{k: v / args.batch for k, v in results.items()}}))


if __name__ == "__main__":
    main()
