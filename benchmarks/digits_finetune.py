"""A finetune in miniature: `main.py --init_from --class_map` onto new classes, against training from scratch.

    python benchmarks/digits_finetune.py --out finetune_out       # about 9 minutes on one CPU thread
    python benchmarks/digits_finetune.py --small --out /tmp/ft    # a seconds-long smoke run of the same code

1. Exports the digits (`digits.data.export_digits`, 16 px, as the quickstart) to `<out>/digits` and links two
   ImageFolder trees to its class folders (train and val): `<out>/pretrain_data` holds the digits 0-6 (classes
   0..6), `<out>/finetune_data` the digits 0, 3, 5, 7, 8, 9 (classes 0..5: the sorted folder positions).
   `<out>/class_map.txt` maps the finetune's folders "0", "3", "5" to the pretrained classes 0, 3, 5; 7, 8 and 9
   are new classes with fresh class embedding rows.
2. Pretrains transdiff_tiny on the digits 0-6 with the quickstart's flags (`quickstart.MODEL_FLAGS`,
   `quickstart.TRAIN_FLAGS`, `--class_num 7`): `<out>/pretrain_<P>`.
3. For each budget of `--steps`: finetunes on the six digits (`--class_num 6 --init_from <out>/pretrain_<P>
   --class_map <out>/class_map.txt`) into `<out>/finetune_<S>_from_<P>`, and trains the same model from scratch
   with the same flags and data order into `<out>/scratch_<S>`. Steps are rounded up to whole epochs.
4. Trains the quickstart's judge on all ten digits (`<out>/digits/judge.pt`), generates `--images_per_class`
   class-balanced images from each run's EMA weights (`util.pretrained.load_checkpoint_model`, Euler, the same
   per-image noise for every run) and scores them (`digits.scores.score_samples`, labelled by digit) against the
   held-out real digits of the same classes: all six, the mapped {0, 3, 5} and the new {7, 8, 9}. Two reference
   rows: the first `--images_per_class` real train digits of each class, scored the same way (the floor of the
   Frechet distance at this sample size), and the pretrained model drawing 0, 3 and 5 (where the mapped classes
   of the finetune start).

Prints a markdown table and writes `<out>/digits_finetune.json`. Rerunning into the same `--out` reuses finished
training runs (`main.py` continues a run folder's checkpoint-last.pth). Not a test: a measurement.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

# Before torch loads OpenMP: idle threads sleep instead of spinning, so a busy second core costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import main as transdiff_main  # noqa: E402
import quickstart  # noqa: E402
from digits.data import SPLITS, export_digits  # noqa: E402
from digits.judge import load_digits_classifier, train_digits_classifier  # noqa: E402
from digits.metric import HEADLINE_SCORES  # noqa: E402
from digits.scores import score_samples  # noqa: E402
from util.errors import run_cli  # noqa: E402
from util.eval.images import read_image_folder  # noqa: E402
from util.io import write_json  # noqa: E402
from util.pretrained import load_checkpoint_model  # noqa: E402

PRETRAIN_DIGITS = (0, 1, 2, 3, 4, 5, 6)
MAPPED_DIGITS = (0, 3, 5)  # finetune classes that start from the pretrained class of the same digit
NEW_DIGITS = (7, 8, 9)     # finetune classes the pretrained model never saw: fresh class embedding rows
FINETUNE_DIGITS = tuple(sorted(MAPPED_DIGITS + NEW_DIGITS))
GROUPS = {"all": FINETUNE_DIGITS, "mapped": MAPPED_DIGITS, "new": NEW_DIGITS}
EVAL_SEED = 0  # every run samples image i from the same noise (`util.eval.layout.image_noise`)


class RunSize(NamedTuple):
    pretrain_steps: int         # optimizer steps on the digits 0-6 (rounded up to whole epochs)
    steps: tuple[int, ...]      # finetune budgets; each is trained once finetuned and once from scratch
    images_per_class: int       # generated images per class and run
    sampling_steps: int         # Euler steps per image
    judge_epochs: int           # training passes of the judge classifier


# Measured on a 2-core Xeon at 1 thread, the other core busy with tests: a step of transdiff_tiny at 16 px costs
# about 0.1 s, so the defaults train 4,667 steps in about 8 minutes; the 2,700 images take 20 seconds.
DEFAULT_RUN = RunSize(pretrain_steps=2000, steps=(300, 1000), images_per_class=100, sampling_steps=10,
                      judge_epochs=20)
SMALL_RUN = RunSize(pretrain_steps=1, steps=(1,), images_per_class=10, sampling_steps=2, judge_epochs=1)


def get_args_parser():
    parser = argparse.ArgumentParser("digits_finetune.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="finetune_out", help="output folder (data, runs, judge, results)")
    parser.add_argument("--pretrain_steps", default=None, type=int,
                        help=f"optimizer steps of the pretraining on the digits 0-6 (default "
                             f"{DEFAULT_RUN.pretrain_steps}; --small: one epoch)")
    parser.add_argument("--steps", default=None,
                        help="comma-separated finetune budgets in optimizer steps; each is trained finetuned and from "
                             f"scratch (default {','.join(map(str, DEFAULT_RUN.steps))}; --small: one epoch)")
    parser.add_argument("--images_per_class", default=None, type=int,
                        help=f"generated images per class and run (default {DEFAULT_RUN.images_per_class})")
    parser.add_argument("--cfg", default=1.5, type=float, help="guidance scale of the evaluation")
    parser.add_argument("--threads", default=1, type=int, help="torch threads (1: see quickstart.py --help)")
    parser.add_argument("--small", action="store_true",
                        help=f"smoke run: one epoch per run, {SMALL_RUN.images_per_class} images per class of "
                             f"{SMALL_RUN.sampling_steps} steps")
    return parser


def link_classes(export: Path, root: Path, digits: tuple[int, ...]) -> None:
    """`root/{train,val}/<digit>`: relative symlinks to the export's class folders of `digits`."""
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
        for digit in digits:
            link = root / split / str(digit)
            target = os.path.relpath(export / split / str(digit), link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target, target_is_directory=True)


def prepare_data(out: Path) -> dict:
    """The digits export, the pretraining and finetuning trees and the class map; returns their paths."""
    export = out / "digits"
    export_digits(export, img_size=quickstart.IMG_SIZE)
    pretrain, finetune = out / "pretrain_data", out / "finetune_data"
    link_classes(export, pretrain, PRETRAIN_DIGITS)
    link_classes(export, finetune, FINETUNE_DIGITS)
    class_map = out / "class_map.txt"
    pretrained_class = {str(d): PRETRAIN_DIGITS.index(d) for d in MAPPED_DIGITS}  # folder -> pretrained class
    class_map.write_text("# <finetune class folder> <pretrained class index>\n"
                         + "".join(f"{folder} {index}\n" for folder, index in pretrained_class.items()))
    return {"export": export, "pretrain": pretrain, "finetune": finetune, "class_map": class_map}


def class_folders(root: Path) -> list[str]:
    """The classes of an ImageFolder tree in label order (sorted folder names)."""
    return sorted(d.name for d in (root / "train").iterdir() if d.is_dir())


def steps_per_epoch(root: Path) -> int:
    """Optimizer steps per epoch of `root/train` at the quickstart's batch size (drop_last)."""
    images = sum(1 for folder in (root / "train").iterdir() for _ in folder.glob("*.png"))
    return images // quickstart.BATCH_SIZE


def train(run_dir: Path, data: Path, steps: int, extra: list[str]) -> dict:
    """`main.py` training of `steps` optimizer steps (rounded up to whole epochs) into `run_dir`.

    The quickstart's flags, its warm-up re-expressed in this tree's epochs, the tree's class count; `extra` adds
    flags (`--init_from`, `--class_map`). Continues `run_dir/checkpoint-last.pth` when there is one.
    """
    per_epoch = steps_per_epoch(data)
    epochs = max(1, math.ceil(steps / per_epoch))
    started = time.time()
    transdiff_main.cli([*quickstart.MODEL_FLAGS, *quickstart.TRAIN_FLAGS,
                        "--class_num", str(len(class_folders(data))),
                        "--warmup_epochs", f"{quickstart.WARMUP_STEPS / per_epoch}",
                        "--data_path", str(data), "--output_dir", str(run_dir), "--epochs", str(epochs), *extra])
    return {"dir": str(run_dir), "optimizer_steps": epochs * per_epoch, "epochs": epochs,
            "minutes": (time.time() - started) / 60}


def generate(run_dir: Path, classes: list[int], images_per_class: int, sampling_steps: int, cfg: float,
             batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-major images of `classes` from a run's EMA weights: (uint8 [N, 3, H, W], class index [N]); image i
    from noise i."""
    generator = load_checkpoint_model(str(run_dir / "checkpoint-last.pth"))
    labels = torch.tensor(classes).repeat_interleave(images_per_class)  # [N], class-major
    images = [generator.generate(chunk.tolist(), seed=EVAL_SEED, first_index=first, sampler="euler",
                                 num_sampling_steps=sampling_steps, cfg=cfg)  # uint8 [b, H, W, 3]
              for first, chunk in zip(range(0, len(labels), batch), labels.split(batch))]
    return torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2), labels  # [N, 3, H, W], [N]


def of_digits(images: torch.Tensor, digits: torch.Tensor, members: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The images (and their digits) whose digit is one of `members`."""
    keep = torch.isin(digits, torch.tensor(members))  # [N]
    return images[keep], digits[keep]


def score_groups(judge, images: torch.Tensor, digits: torch.Tensor, reference: tuple, groups=tuple(GROUPS)) -> dict:
    """The judge's headline scores of the images of each of `groups` (`GROUPS`' names) against the real digits of
    that group."""
    scores = {}
    for group in groups:
        members = GROUPS[group]
        result = score_samples(judge, *of_digits(images, digits, members), *of_digits(*reference, members))
        scores[group] = {key: result[key] for key in HEADLINE_SCORES}
    return scores


def first_per_class(images: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images of each label, in label order."""
    keep = torch.cat([torch.nonzero(labels == label).flatten()[:count] for label in labels.unique()])
    return images[keep], labels[keep]


def table(rows: list[dict]) -> str:
    names = {"all": "all six", "mapped": "mapped {0,3,5}", "new": "new {7,8,9}"}
    columns = ["run", "steps"] + [f"{names[g]}: {s}" for g in GROUPS for s in ("class consistency", "FD")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["name"], str(row.get("optimizer_steps", ""))]
        for group in GROUPS:
            scores = row["scores"].get(group)
            cells += ([f"{scores['class_consistency']:.1%}", f"{scores['frechet_distance']:.1f}"] if scores
                      else ["–", "–"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_benchmark(args) -> dict:
    started = time.time()
    torch.set_num_threads(args.threads)
    size = SMALL_RUN if args.small else DEFAULT_RUN
    pretrain_steps = args.pretrain_steps or size.pretrain_steps
    budgets = [int(s) for s in args.steps.split(",")] if args.steps else list(size.steps)
    images_per_class = args.images_per_class or size.images_per_class
    out = Path(args.out)
    data = prepare_data(out)
    finetune_classes = class_folders(data["finetune"])
    digit_of_class = torch.tensor([int(name) for name in finetune_classes])  # finetune class index -> digit

    pretrain = train(out / f"pretrain_{pretrain_steps}", data["pretrain"], pretrain_steps, [])
    runs = []
    for budget in budgets:
        finetune_flags = ["--init_from", pretrain["dir"], "--class_map", str(data["class_map"])]
        runs.append({"name": "finetuned", "budget": budget, **train(
            out / f"finetune_{budget}_from_{pretrain_steps}", data["finetune"], budget, finetune_flags)})
        runs.append({"name": "from scratch", "budget": budget, **train(
            out / f"scratch_{budget}", data["finetune"], budget, [])})

    judge_path = data["export"] / "judge.pt"
    if not judge_path.is_file():
        train_digits_classifier(data["export"], judge_path, img_size=quickstart.IMG_SIZE, epochs=size.judge_epochs)
    judge = load_digits_classifier(judge_path)
    if judge.config["class_names"] != [str(d) for d in range(10)]:
        raise ValueError(f"{judge_path}: not a judge of the digits 0-9 in label order "
                         f"(classes {judge.config['class_names']})")
    # The export's folders are "0".."9": a label read back is the digit.
    reference = of_digits(*read_image_folder(data["export"] / "val"), FINETUNE_DIGITS)
    real = first_per_class(*of_digits(*read_image_folder(data["export"] / "train"), FINETUNE_DIGITS),
                           images_per_class)
    rows = [{"name": "real train digits", "scores": score_groups(judge, *real, reference)}]

    evaluation_started = time.time()
    # Where the mapped classes start: the pretrained model drawing the digits 0, 3, 5 (its classes of those digits).
    images, classes = generate(Path(pretrain["dir"]), [PRETRAIN_DIGITS.index(d) for d in MAPPED_DIGITS],
                               images_per_class, size.sampling_steps, args.cfg)
    pretrained = {"name": "pretrained (0-6), not finetuned", **pretrain,
                  "scores": score_groups(judge, images, torch.tensor(PRETRAIN_DIGITS)[classes], reference, ["mapped"])}
    rows.append(pretrained)
    for run in runs:
        images, classes = generate(Path(run["dir"]), list(range(len(finetune_classes))), images_per_class,
                                   size.sampling_steps, args.cfg)
        run["scores"] = score_groups(judge, images, digit_of_class[classes], reference)
        rows.append(run)
    report = {"pretrain_digits": PRETRAIN_DIGITS, "finetune_classes": finetune_classes,
              "class_map": data["class_map"].read_text(), "pretrain": pretrained, "runs": runs,
              "reference": rows[0]["scores"], "images_per_class": images_per_class, "sampler": "euler",
              "num_sampling_steps": size.sampling_steps, "cfg": args.cfg, "threads": args.threads,
              "judge_val_accuracy": judge.val_accuracy,
              "evaluation_minutes": (time.time() - evaluation_started) / 60,
              "total_minutes": (time.time() - started) / 60}
    write_json(out / "digits_finetune.json", report)

    training = pretrain["minutes"] + sum(run["minutes"] for run in runs)
    print(f"\npretrained {pretrain['optimizer_steps']} steps on the digits {PRETRAIN_DIGITS}; {training:.1f} min of "
          f"training, {report['total_minutes']:.1f} min in all; {images_per_class} images per class, euler "
          f"{size.sampling_steps} steps, cfg {args.cfg:g}; judge held-out accuracy {judge.val_accuracy:.1%}")
    print(table(rows))
    print(f"results: {out / 'digits_finetune.json'}")
    return report


if __name__ == "__main__":
    run_cli("digits_finetune.py", lambda: run_benchmark(get_args_parser().parse_args()))
