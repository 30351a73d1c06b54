"""The embedded digits dataset and the classifier-based metrics that judge samples drawn on it.

scikit-learn ships 1,797 real handwritten digits (8x8, values 0..16, 10 classes) inside the package,
so the quickstart can train through the real ImageFolder pipeline without any download.

Conventions owned here:
- Export layout: ``<root>/{train,val}/<class>/<index>.png`` with class folders ``"0".."9"``. Their sorted
  order equals the label order, so torchvision's ImageFolder assigns label ``d`` to digit ``d``. File names
  are the zero-padded index into ``load_digits()`` (``0042.png``), so every PNG traces back to its source.
- Pixels: the 0..16 grey levels are scaled to 0..255 (``round(v * 255 / 16)``), upsampled to
  ``img_size x img_size`` with PIL's bilinear filter, and saved as RGB with three equal channels.
- Split: stratified ``train_test_split`` (seed 0, 20 % held out -> 1,437 train / 360 val).
- Generated samples: ``{index:05d}.png`` where image ``index`` has class ``index // (num_images // class_num)``
  (the evaluation loop's class-major order; ``num_images`` must be a multiple of ``class_num``).
- Judge: a small CNN trained on the train split. Its input is the grayscale image in ``[-1, 1]`` at the
  exported ``img_size``, ``[B, 1, H, W]``; ``features`` is its penultimate layer, ``forward`` its logits.

Metrics (``score_samples``), all in the judge's feature space unless stated:
- ``class_consistency``: fraction of samples the judge assigns to their intended label (pixel space).
- ``frechet_distance``: Frechet distance between Gaussian fits of sample and reference features (the same
  computation as FID, ``util.metrics.frechet_distance``).
- ``within_class_spread``: for each class, the mean Euclidean distance of its samples' features to that
  class's feature mean; then the unweighted mean over classes. Samples are grouped by intended label,
  reference images by true label. ``spread_ratio`` = samples / reference: a set that collapses every class
  onto one image scores 0, a set as varied as real digits scores about 1.
"""

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from util.eval_layout import image_class
from util.metrics import frechet_distance

MANIFEST_NAME = "digits_export.json"
EXPORT_FORMAT_VERSION = 1
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_DIGITS_MAX_VALUE = 16.0


def _export_settings(img_size: int, val_fraction: float, seed: int) -> dict:
    """The settings that define an export; a manifest must match them exactly to be reused."""
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "source": "sklearn.datasets.load_digits",
        "resize": "PIL bilinear",
        "img_size": int(img_size),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
    }


def read_export_manifest(root) -> dict | None:
    """Return the manifest of a digits export under ``root``, or None when there is none."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _count_pngs(split_dir: Path) -> dict:
    """Number of PNG files per class folder of one split."""
    return {c.name: sum(1 for _ in c.glob("*.png")) for c in sorted(split_dir.iterdir()) if c.is_dir()}


def _is_complete_export(root: Path, settings: dict) -> bool:
    """True when ``root`` holds a finished export with ``settings`` whose files are all on disk."""
    manifest = read_export_manifest(root)
    if manifest is None or not manifest.get("complete") or manifest.get("settings") != settings:
        return False
    return all(
        (root / split).is_dir() and _count_pngs(root / split) == manifest["per_class"][split] for split in SPLITS
    )


def _digit_to_pil(digit: np.ndarray, img_size: int) -> Image.Image:
    """One 8x8 digit with values 0..16 -> an RGB PIL image of ``img_size x img_size``."""
    gray = np.rint(digit * (255.0 / _DIGITS_MAX_VALUE)).astype(np.uint8)  # [8, 8]
    return Image.fromarray(gray).resize((img_size, img_size), Image.BILINEAR).convert("RGB")


def export_digits(root, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write scikit-learn's digits as an ImageFolder with ``train`` and ``val`` splits under ``root``.

    Args:
        root: output folder; created if missing.
        img_size: side of the saved square images in pixels (bilinear upsampling from 8x8).
        val_fraction: fraction of each class held out in ``val`` (stratified split).
        seed: random state of the split.

    Returns:
        ``{"train": n_train, "val": n_val, "per_class": {split: {class: count}}, "rewritten": bool}``.
        An existing complete export with the same settings is left untouched (``rewritten`` False). A
        previous export with other settings is replaced; a folder that holds ``train``/``val`` but no
        manifest is refused, so nothing that this function did not write is deleted.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    settings = _export_settings(img_size, val_fraction, seed)
    if _is_complete_export(root, settings):
        manifest = read_export_manifest(root)
        return {**manifest["counts"], "per_class": manifest["per_class"], "rewritten": False}

    if read_export_manifest(root) is None and any((root / split).exists() for split in SPLITS):
        raise FileExistsError(
            f"{root} already holds a train/ or val/ folder that is not a digits export "
            f"(no {MANIFEST_NAME}); choose an empty folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST_NAME
    # Written first and marked incomplete, so a crashed export is recognised as ours and replaced.
    manifest_path.write_text(json.dumps({"settings": settings, "complete": False}, indent=2))
    for split in SPLITS:
        if (root / split).exists():
            shutil.rmtree(root / split)

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=digits.target, random_state=seed)
    class_names = [str(c) for c in sorted(set(digits.target.tolist()))]
    index_width = len(str(len(indices) - 1))
    per_class = {}
    for split, split_idx in zip(SPLITS, (train_idx, val_idx)):
        for name in class_names:
            (root / split / name).mkdir(parents=True)
        for i in sorted(split_idx.tolist()):
            label = str(int(digits.target[i]))
            _digit_to_pil(digits.images[i], img_size).save(root / split / label / f"{i:0{index_width}d}.png")
        per_class[split] = _count_pngs(root / split)

    counts = {split: sum(per_class[split].values()) for split in SPLITS}
    manifest = {"settings": settings, "complete": True, "counts": counts, "per_class": per_class}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return {**counts, "per_class": per_class, "rewritten": True}


def load_image_folder_tensor(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an ImageFolder split into memory.

    Classes are the sorted subfolder names and labels their positions (torchvision's ImageFolder rule);
    files are read in sorted order. All images must share one size.

    Returns:
        images: uint8 ``[N, 3, H, W]`` (RGB); labels: int64 ``[N]``.
    """
    folder = Path(folder)
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if not class_dirs:
        raise FileNotFoundError(f"no class folders in {folder}")
    arrays, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))  # [H, W, 3]
            labels.append(label)
    if not arrays:
        raise FileNotFoundError(f"no images under {folder}")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images under {folder} differ in size: {sorted({a.shape for a in arrays})}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
    return images, torch.tensor(labels, dtype=torch.int64)


def load_generated_pngs(folder, num_images: int, class_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the evaluation output ``{index:05d}.png`` for ``index < num_images`` and their intended classes.

    Returns:
        images: uint8 ``[num_images, 3, H, W]``; labels: int64 ``[num_images]``.
    """
    folder = Path(folder)
    paths = [folder / f"{index:05d}.png" for index in range(num_images)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_images} samples missing in {folder}, e.g. {missing[0]}")
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))  # [H, W, 3]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
    labels = torch.tensor([image_class(i, num_images, class_num) for i in range(num_images)])
    return images, labels


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
def _predict(classifier: DigitsClassifier, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, feature_dim]`` and predicted labels ``[N]`` of prepared inputs, on the CPU."""
    device = next(classifier.parameters()).device
    feats, preds = [], []
    for chunk in x.split(batch_size):
        f = classifier.features(chunk.to(device))
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
        root: a digits export (``export_digits``) or any ImageFolder with ``train`` and ``val`` splits.
        out_path: checkpoint path; holds ``{'state_dict', 'config', 'val_accuracy'}``.
        img_size: classifier input side in pixels; images of another size are resized to it.
        seed: seeds the weight init, batch order and augmentation (the global RNG is left untouched).
        epochs, batch_size, lr: Adam with a cosine decay to zero over ``epochs`` passes.
        max_shift: random translation augmentation, in pixels at ``img_size``.

    Returns:
        ``{"val_accuracy", "num_train", "num_val", "train_seconds", "path"}``.
    """
    start = time.perf_counter()
    root = Path(root)
    train_images, train_labels = load_image_folder_tensor(root / "train")
    val_images, val_labels = load_image_folder_tensor(root / "val")
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
    _, val_pred = _predict(classifier, x_val)
    val_accuracy = (val_pred == val_labels).float().mean().item()

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": classifier.state_dict(), "config": config, "val_accuracy": val_accuracy}, out_path)
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
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    classifier = DigitsClassifier(**_model_kwargs(checkpoint["config"]))
    classifier.load_state_dict(checkpoint["state_dict"])
    classifier.config = checkpoint["config"]
    classifier.val_accuracy = checkpoint["val_accuracy"]
    return classifier.eval()


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of features ``[N, D]`` (float64)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def within_class_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Unweighted mean over classes of the mean distance from each member's features to its class mean."""
    spreads = []
    for label in labels.unique():
        members = features[labels == label].double()  # [n_c, D]
        spreads.append((members - members.mean(dim=0)).norm(dim=1).mean().item())
    return float(np.mean(spreads))


def score_samples(
    classifier: DigitsClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference_images: torch.Tensor,
    reference_labels: torch.Tensor,
) -> dict:
    """Judge generated ``images`` (intended ``labels``) against real ``reference_images`` (true labels).

    Images are ``[N, 3, H, W]`` uint8 or float in ``[-1, 1]``. See the module docstring for each metric.

    Returns:
        ``{"class_consistency", "per_class_accuracy": {class: acc}, "frechet_distance",
        "within_class_spread", "reference_within_class_spread", "spread_ratio",
        "reference_class_consistency", "num_samples", "num_reference"}``.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    reference_labels = torch.as_tensor(reference_labels, dtype=torch.int64).cpu()
    if len(labels) != len(images) or len(reference_labels) != len(reference_images):
        raise ValueError("each image set needs exactly one label per image")
    feats, preds = _predict(classifier, prepare_classifier_input(images, classifier.img_size))
    ref_feats, ref_preds = _predict(classifier, prepare_classifier_input(reference_images, classifier.img_size))

    correct = (preds == labels).float()  # [N]
    per_class = {str(c.item()): correct[labels == c].mean().item() for c in labels.unique()}
    spread = within_class_spread(feats, labels)
    reference_spread = within_class_spread(ref_feats, reference_labels)
    return {
        "class_consistency": correct.mean().item(),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(*gaussian_fit(feats.numpy()), *gaussian_fit(ref_feats.numpy())),
        "within_class_spread": spread,
        "reference_within_class_spread": reference_spread,
        "spread_ratio": spread / reference_spread,
        "reference_class_consistency": (ref_preds == reference_labels).float().mean().item(),
        "num_samples": len(labels),
        "num_reference": len(reference_labels),
    }
