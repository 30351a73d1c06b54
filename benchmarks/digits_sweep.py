"""The quickstart model under the digits judge: sampler x steps x cfg with the network evaluations each costs,
the guidance interval, and how far bf16 / fp16 sampling moves the samples from fp32.

    bash scripts/quickstart.sh                                   # trains quickstart_out/ first
    python benchmarks/digits_sweep.py --out quickstart_out       # about 4 minutes on one CPU thread

Every row is a `main.py --evaluate --metrics digits` of the quickstart's EMA weights (`quickstart.MODEL_FLAGS`),
`--num_images` class-balanced images with the evaluation's fixed per-image seeds, scored by the quickstart's
judge against the held-out real digits. A setting's cost is its "evaluations / image", the velocity-network
rows per image: a guided step costs two (conditional and unconditional), a step outside `--cfg_interval` one.
Wall time would not compare: an evaluation reuses the images an earlier run of the same setting left (the
quickstart's own cfg values among them). Prints markdown tables and writes `<out>/digits_sweep.json`. Not a
test: a measurement of one trained model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import main as transdiff_main  # noqa: E402
import quickstart  # noqa: E402
from digits.judge import load_digits_classifier, predict, prepare_classifier_input  # noqa: E402
from models.noise import TorchNoise  # noqa: E402
from models.samplers import run_sampler  # noqa: E402
from models.tokenizers import build_tokenizer, decode_from_latents  # noqa: E402
from models.transdiff import TRANSDIFF_MODELS  # noqa: E402
from util.checkpoint import load_checkpoint, select_weights  # noqa: E402
from util.eval.images import to_uint8  # noqa: E402
from util.eval.layout import image_noise  # noqa: E402
from util.execution.precision import autocast_context  # noqa: E402
from util.io import write_json  # noqa: E402
from util.settings import get_args_parser as main_args_parser  # noqa: E402


class Setting(NamedTuple):
    sampler: str
    steps: int
    cfg: float
    interval: Optional[Tuple[float, float]] = None


def sampler_grid(cfgs) -> list[Setting]:
    """The faithful sampler at the paper's step counts and below, the ODE samplers at few steps, at each cfg."""
    steps = {"maruyama": (10, 20, 50, 100), "euler": (5, 10, 20, 50), "heun": (3, 5, 10)}
    return [Setting(sampler, n, cfg) for cfg in cfgs for sampler, counts in steps.items() for n in counts]


def interval_grid(sampler: str, steps: int, cfg: float) -> list[Setting]:
    """Guidance everywhere, only at high noise, only at low noise, and in the middle (t = 1 is noise)."""
    return [Setting(sampler, steps, cfg, interval) for interval in (None, (0.5, 1.0), (0.0, 0.5), (0.2, 0.8))]


def evaluations_per_image(setting: Setting) -> int:
    """Velocity-network rows per image: the sampler's own time points, two rows where guidance applies."""
    times = []

    def velocity(x, t):
        times.append(float(t))
        return torch.zeros_like(x)

    run_sampler(setting.sampler, velocity, torch.zeros(1, 1, 1), setting.steps, TorchNoise())
    if setting.cfg == 1.0:
        return len(times)
    lo, hi = setting.interval or (0.0, 1.0)
    return sum(2 if lo <= t <= hi else 1 for t in times)


def evaluate(out: Path, setting: Setting, num_images: int) -> dict:
    data = out / "digits"
    flags = [*quickstart.MODEL_FLAGS, "--evaluate", "--resume", str(out), "--output_dir", str(out),
             "--cfg", str(setting.cfg), "--num_images", str(num_images), "--eval_bsz", "100",
             "--sampler", setting.sampler, "--num_sampling_steps", str(setting.steps), "--metrics", "digits",
             "--digits_judge", str(data / "judge.pt"), "--ref_images", str(data / "val"), "--require_metrics"]
    if setting.interval is not None:
        flags += ["--cfg_interval", f"{setting.interval[0]},{setting.interval[1]}"]
    transdiff_main.cli(flags)
    record = json.loads((out / "metrics.json").read_text())[-1]
    return {**setting._asdict(), "evaluations_per_image": evaluations_per_image(setting),
            **{key: record[key] for key in ("class_consistency", "frechet_distance", "spread_ratio")}}


@torch.no_grad()
def precision_deviation(out: Path, setting: Setting, num_images: int) -> list[dict]:
    """Samples of the same seeds in fp32, bf16 and fp16 autocast: latent and pixel differences, judge agreement."""
    args = main_args_parser().parse_args(quickstart.MODEL_FLAGS)
    weights, _ = select_weights(load_checkpoint(str(out / "checkpoint-last.pth")), use_ema=True)
    model = TRANSDIFF_MODELS[args.model](img_size=args.img_size, vae_stride=args.vae_stride,
                                         vae_embed_dim=args.vae_embed_dim, class_num=args.class_num,
                                         buffer_size=args.buffer_size).eval()
    model.load_state_dict(weights)
    tokenizer = build_tokenizer(args.tokenizer, vae_path=None, vae_embed_dim=args.vae_embed_dim,
                                vae_stride=args.vae_stride)
    judge = load_digits_classifier(out / "digits" / "judge.pt")
    labels = torch.arange(num_images) // (num_images // args.class_num)  # class-major, as an evaluation
    device = torch.device("cpu")
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        noise = image_noise(args.seed, range(num_images))
        with autocast_context(precision, device.type)():
            latents = model.samples(labels, setting.steps, cfg=setting.cfg, sampler=setting.sampler,
                                    generator=noise).float()  # [N, C, h, w]
        pixels = torch.from_numpy(to_uint8(decode_from_latents(tokenizer, latents))).permute(0, 3, 1, 2)
        _, predicted = predict(judge, prepare_classifier_input(pixels, judge.config["img_size"]))
        results[precision] = (latents, pixels, predicted)
    reference_latents, reference_pixels, reference_labels = results["fp32"]
    rows = []
    for precision, (latents, pixels, predicted) in results.items():
        pixel_difference = (pixels.int() - reference_pixels.int()).abs().float()  # [N, 3, H, W], 0..255
        rows.append({"precision": precision,
                     "latent_max_abs": (latents - reference_latents).abs().max().item(),
                     "latent_mean_abs": (latents - reference_latents).abs().mean().item(),
                     "pixel_mean_abs": pixel_difference.mean().item(),
                     "pixel_max_abs": pixel_difference.max().item(),
                     "judge_label_agreement": (predicted == reference_labels).float().mean().item()})
    return rows


def table(rows: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.1%}" if c == "class_consistency" else f"{row[c]:.3g}" if isinstance(row[c], float)
                 else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quickstart_out", help="a finished quickstart output folder")
    parser.add_argument("--cfg", default=None, help="comma-separated cfg values (default: the quickstart's best)")
    parser.add_argument("--num_images", default=500, type=int)
    parser.add_argument("--fast", default="euler,10", help="sampler,steps of the interval and precision sweeps")
    parser.add_argument("--threads", default=1, type=int)
    return parser


def main():
    args = get_args_parser().parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = json.loads((out / "quickstart_metrics.json").read_text())
    cfgs = [float(c) for c in args.cfg.split(",")] if args.cfg else [report["best_cfg"]]
    fast_sampler, fast_steps = args.fast.split(",")
    fast = Setting(fast_sampler, int(fast_steps), cfgs[0])

    samplers = [evaluate(out, setting, args.num_images) for setting in sampler_grid(cfgs)]
    intervals = [evaluate(out, setting, args.num_images) for setting in interval_grid(*fast[:3])]
    precisions = precision_deviation(out, fast, min(args.num_images, 200))
    write_json(out / "digits_sweep.json", {"samplers": samplers, "intervals": intervals, "precisions": precisions})
    scores = ("evaluations_per_image", "class_consistency", "frechet_distance", "spread_ratio")
    print(table(samplers, ("sampler", "steps", "cfg", *scores)))
    print()
    print(table(intervals, ("sampler", "steps", "cfg", "interval", *scores)))
    print()
    print(table(precisions, ("precision", "latent_max_abs", "latent_mean_abs", "pixel_mean_abs", "pixel_max_abs",
                             "judge_label_agreement")))


if __name__ == "__main__":
    main()
