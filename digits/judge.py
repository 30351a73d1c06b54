"""The judge: a small CNN trained on the real digits, whose features and predictions score generated samples.

Input convention owned here: the grayscale image in ``[-1, 1]`` at the judge's ``img_size``, ``[B, 1, H, W]``
(``prepare_classifier_input`` makes it from uint8 or ``[-1, 1]`` RGB). ``features`` is the penultimate layer,
``forward`` the logits. A checkpoint holds ``{'state_dict', 'config', 'val_accuracy'}``.
"""
import math
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from util.checkpoint import check_finite
from util.eval.images import read_image_folder
from util.io import atomic_write


def prepare_classifier_input(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """Images (uint8 in 0..255, or float in ``[-1, 1]``), ``[N, 3 or 1, H, W]`` -> ``[N, 1, img_size, img_size]``.

    Colour images become grayscale by averaging the channels; other sizes are resized bilinearly.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 3 or 1, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float() / 127.5 - 1.0
    elif images.is_floating_point():
        x = images.float()
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    x = x.mean(dim=1, keepdim=True)  # [N, 1, H, W]
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0)


class DigitsClassifier(nn.Module):
    """Two conv blocks and a small penultimate layer.

    Input: grayscale ``[B, 1, img_size, img_size]`` in ``[-1, 1]`` (see ``prepare_classifier_input``). The
    digits hold only 8x8 source pixels, so the input is first averaged down to ``work_size`` (16): the 3x3
    convolutions then see whole strokes, which took held-out accuracy from about 96 % to about 99 %.
    """

    def __init__(self, img_size: int = 32, num_classes: int = 10, widths: tuple = (32, 64), feature_dim: int = 64):
        super().__init__()
        self.img_size = img_size
        work_size = 16
        self.body = nn.Sequential(
            nn.AdaptiveAvgPool2d(work_size),
            nn.Conv2d(1, widths[0], 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(widths[0], widths[1], 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(widths[1] * (work_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer before its ReLU, ``[B, feature_dim]``.

        Taken before the ReLU because about half the units are dead on digits after it, which left the
        feature covariance singular; the pre-activations keep every direction.
        """
        h = self.body(x).flatten(1)  # [B, widths[1] * (work_size / 4)**2]
        return self.fc(h)  # [B, feature_dim]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]`` from ``features``."""
        return self.head(F.relu(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.logits(self.features(x))


def _model_kwargs(config: dict) -> dict:
    """The DigitsClassifier constructor arguments stored in a classifier config."""
    return {k: config[k] for k in ("img_size", "num_classes", "widths", "feature_dim")}


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own integer offset in ``[-max_shift, max_shift]`` px, filling with black."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # [N, 1, H + 2s, W + 2s]
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)  # [2, N]
    rows = offsets[0, :, None] + torch.arange(h)  # [N, H]
    cols = offsets[1, :, None] + torch.arange(w)  # [N, W]
    batch = torch.arange(n)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # [N, 1, H, W]


@torch.no_grad()
def predict(classifier: DigitsClassifier, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, feature_dim]`` and predicted labels ``[N]`` of prepared inputs, returned on the CPU.

    The classifier runs on its own device; ``x`` is moved there batch by batch.
    """
    device = next(classifier.parameters()).device
    feats, preds = [], []
    for chunk in x.split(batch_size):
        f = classifier.features(chunk.to(device))  # [b, feature_dim]
        feats.append(f.cpu())
        preds.append(classifier.logits(f).argmax(dim=1).cpu())
    return torch.cat(feats), torch.cat(preds)


def train_digits_classifier(
    root,
    out_path,
    img_size: int = 32,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 2,
) -> dict:
    """Train the judge on ``<root>/train`` on the CPU, measure it on ``<root>/val`` and save it.

    Args:
        root: a digits export (``digits.data.export_digits``) or any ImageFolder with ``train`` and ``val``.
        out_path: checkpoint path, written atomically; holds ``{'state_dict', 'config', 'val_accuracy'}``.
        img_size: classifier input side in pixels; images of another size are resized to it.
        seed: seeds the weight init, batch order and augmentation (the global RNG is left untouched).
        epochs, batch_size, lr: Adam with a cosine decay to zero over ``epochs`` passes.
        max_shift: random translation augmentation, in pixels at ``img_size``.

    Returns:
        ``{"val_accuracy", "num_train", "num_val", "train_seconds", "path"}``.
    """
    start = time.perf_counter()
    root = Path(root)
    train_images, train_labels = read_image_folder(root / "train")
    val_images, val_labels = read_image_folder(root / "val")
    class_names = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    x_train = prepare_classifier_input(train_images, img_size)  # [N, 1, S, S]
    x_val = prepare_classifier_input(val_images, img_size)  # [M, 1, S, S]

    config = {
        "img_size": img_size,
        "num_classes": len(class_names),
        "class_names": class_names,
        "widths": [32, 64],
        "feature_dim": 64,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_shift": max_shift,
    }
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = DigitsClassifier(**_model_kwargs(config))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    )
    classifier.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for batch_idx in order.split(batch_size):
            x = _random_shift(x_train[batch_idx], max_shift, generator)  # [B, 1, S, S]
            loss = F.cross_entropy(classifier(x), train_labels[batch_idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    classifier.eval()
    _, val_pred = predict(classifier, x_val)
    val_accuracy = (val_pred == val_labels).float().mean().item()

    checkpoint = {"state_dict": classifier.state_dict(), "config": config, "val_accuracy": val_accuracy}
    atomic_write(out_path, lambda handle: torch.save(checkpoint, handle))
    return {
        "val_accuracy": val_accuracy,
        "num_train": len(x_train),
        "num_val": len(x_val),
        "train_seconds": time.perf_counter() - start,
        "path": str(out_path),
    }


def load_digits_classifier(path, map_location="cpu") -> DigitsClassifier:
    """Load a judge saved by ``train_digits_classifier`` in eval mode.

    The checkpoint's ``config`` and ``val_accuracy`` are attached as attributes of the returned module.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a judge checkpoint (the message names the file).
    """
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        classifier = DigitsClassifier(**_model_kwargs(checkpoint["config"]))
        classifier.load_state_dict(checkpoint["state_dict"])
        val_accuracy = checkpoint["val_accuracy"]
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise ValueError(f"cannot read digits judge {path}: foreign bytes, truncated, or pickled Python objects, "
                         "which are never unpickled") from None
    except (EOFError, RuntimeError, KeyError, TypeError, ValueError, OSError) as error:
        raise ValueError(f"cannot read digits judge {path}: {type(error).__name__}: {error}") from error
    check_finite(classifier.state_dict(), f"digits judge {path}")
    classifier.config = checkpoint["config"]
    classifier.val_accuracy = val_accuracy
    return classifier.eval()
