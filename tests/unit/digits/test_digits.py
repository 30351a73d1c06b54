"""The digits wing: the embedded export, its judge classifier, the scores and the `--metrics digits` metric."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digits.data import MANIFEST_NAME, export_digits
from digits.judge import load_digits_classifier, prepare_classifier_input, train_digits_classifier
from digits.metric import HEADLINE_SCORES, DigitsJudge
from digits.scores import score_samples, within_class_spread
from tools import digits_metrics
from util.eval.fidelity import MissingMetricFile
from util.eval.images import read_generated_images, read_image_folder
from util.eval.layout import image_class
from util.eval.registry import EVAL_METRICS, MetricSettings

CLASS_NAMES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    export_digits(root)
    return root


@pytest.fixture(scope="module")
def classifier_report(digits_root, tmp_path_factory) -> dict:
    """A judge of 10 epochs instead of the default 20: accurate enough for every assertion here, in half the time."""
    return train_digits_classifier(digits_root, tmp_path_factory.mktemp("judge") / "classifier.pt", epochs=10)


@pytest.fixture(scope="module")
def classifier(classifier_report):
    return load_digits_classifier(classifier_report["path"])


@pytest.fixture(scope="module")
def val_set(digits_root):
    return read_image_folder(digits_root / "val")


def _write_class_major_samples(folder: Path, images: torch.Tensor, labels: torch.Tensor, per_class: int) -> int:
    """Write the first ``per_class`` images of each class as ``{index:05d}.png`` in class-major order."""
    folder.mkdir(parents=True, exist_ok=True)
    order = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in range(10)])
    for index, i in enumerate(order.tolist()):
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")
    return len(order)


def test_export_counts_and_layout(digits_root):
    manifest = json.loads((digits_root / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["counts"] == {"train": 1437, "val": 360}
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits_root / split).iterdir()) == CLASS_NAMES
    with Image.open(next((digits_root / "train" / "3").glob("*.png"))) as image:
        assert image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert pixels.min() == 0 and pixels.max() > 200


def test_export_is_stratified_and_traceable(digits_root):
    from sklearn.datasets import load_digits

    target = load_digits().target
    manifest = json.loads((digits_root / MANIFEST_NAME).read_text())
    for name in CLASS_NAMES:
        total = int((target == int(name)).sum())
        assert abs(manifest["per_class"]["val"][name] - 0.2 * total) <= 1
        for path in (digits_root / "val" / name).glob("*.png"):
            assert target[int(path.stem)] == int(name)


def test_export_is_idempotent(digits_root):
    probe = next((digits_root / "val" / "0").glob("*.png"))
    before = probe.stat().st_mtime_ns
    counts = export_digits(digits_root)
    assert counts["rewritten"] is False and (counts["train"], counts["val"]) == (1437, 360)
    assert probe.stat().st_mtime_ns == before


def test_export_rewrites_for_new_settings_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "digits"
    export_digits(root, img_size=8)
    counts = export_digits(root, img_size=12)
    assert counts["rewritten"] is True
    images, labels = read_image_folder(root / "train")
    assert images.shape == (1437, 3, 12, 12) and labels.tolist() == sorted(labels.tolist())

    foreign = tmp_path / "foreign"
    (foreign / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a digits export"):
        export_digits(foreign)


def test_read_image_folder(val_set):
    images, labels = val_set
    assert images.dtype == torch.uint8 and images.shape == (360, 3, 32, 32)
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]


def test_prepare_classifier_input():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 8, 8)
    x = prepare_classifier_input(images, img_size=16)
    assert x.shape == (2, 1, 16, 16)
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0)) and torch.allclose(x[1], torch.ones_like(x[1]))
    with pytest.raises(ValueError, match="expected images"):
        prepare_classifier_input(torch.zeros(2, 4, 8, 8), img_size=8)


def test_classifier_accuracy_and_checkpoint(classifier_report, classifier, val_set):
    assert classifier_report["val_accuracy"] >= 0.95
    checkpoint = torch.load(classifier_report["path"], map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"state_dict", "config", "val_accuracy"}
    images, labels = val_set
    x = prepare_classifier_input(images, classifier.img_size)
    with torch.no_grad():
        assert classifier.features(x).shape == (360, checkpoint["config"]["feature_dim"])
        logits = classifier(x)
    assert logits.shape == (360, 10)
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(checkpoint["val_accuracy"])


def test_classifier_training_is_seeded(digits_root, tmp_path):
    rng_before = torch.random.get_rng_state()
    for name in ("a.pt", "b.pt"):
        train_digits_classifier(digits_root, tmp_path / name, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    state_a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    state_b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_real_digits_score_like_real_digits(classifier, val_set):
    images, labels = val_set
    metrics = score_samples(classifier, images, labels, images, labels)
    assert metrics["class_consistency"] >= 0.95
    assert abs(metrics["frechet_distance"]) < 1e-6
    assert metrics["spread_ratio"] == pytest.approx(1.0)
    assert set(metrics["per_class_accuracy"]) == set(CLASS_NAMES)
    as_float = score_samples(classifier, images.float() / 127.5 - 1.0, labels, images, labels)
    assert as_float["class_consistency"] == metrics["class_consistency"]
    assert as_float["spread_ratio"] == pytest.approx(1.0)


def test_collapsed_samples_have_no_spread(classifier, val_set):
    images, labels = val_set
    first_of_class = torch.stack([(labels == c).nonzero()[0, 0] for c in range(10)])  # [10]
    collapsed = images[first_of_class[labels]]  # every image replaced by its class's first image
    metrics = score_samples(classifier, collapsed, labels, images, labels)
    assert metrics["spread_ratio"] < 0.1
    assert metrics["frechet_distance"] > 10.0


def test_shuffled_labels_are_inconsistent(classifier, val_set):
    images, labels = val_set
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    metrics = score_samples(classifier, images, shuffled, images, labels)
    assert 0.0 <= metrics["class_consistency"] <= 0.2


def test_within_class_spread_definition():
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0], [5.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert within_class_spread(features, labels) == pytest.approx((1.0 + 2.0) / 2)


def test_generated_images_are_labelled_class_major(tmp_path):
    assert [image_class(i, 20, 10) for i in range(20)] == [i // 2 for i in range(20)]
    assert image_class(999, 1000, 10) == 9
    with pytest.raises(ValueError, match="multiple"):
        image_class(0, 25, 10)
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 4, 4) * 40
    for index in range(6):
        Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(tmp_path / f"{index:05d}.png")
    loaded, labels = read_generated_images(tmp_path, num_images=6, class_num=3)
    assert torch.equal(loaded, images) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(FileNotFoundError, match="1 of 7"):
        read_generated_images(tmp_path, num_images=7, class_num=7)


def test_metric_check_refuses_missing_judge_file(digits_root, tmp_path):
    metric = DigitsJudge(str(tmp_path / "absent_judge.pt"), str(digits_root / "val"), num_images=100, class_num=10)
    with pytest.raises(MissingMetricFile, match="absent_judge.pt"):
        metric.check()


def test_metric_check_refuses_unreadable_judge_file(digits_root, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    metric = DigitsJudge(str(tmp_path / "garbage.pt"), str(digits_root / "val"), num_images=100, class_num=10)
    with pytest.raises(ValueError, match="garbage.pt"):
        metric.check()


def test_metric_check_refuses_missing_reference_folder(classifier_report, tmp_path):
    metric = DigitsJudge(classifier_report["path"], str(tmp_path / "no_val"), num_images=100, class_num=10)
    with pytest.raises(MissingMetricFile, match="no_val"):
        metric.check()


def test_metric_check_refuses_judge_of_other_class_count(classifier_report, digits_root):
    metric = DigitsJudge(classifier_report["path"], str(digits_root / "val"), num_images=100, class_num=5)
    with pytest.raises(ValueError, match="--class_num"):
        metric.check()


def test_metric_computes_headline_scores_of_a_folder(classifier_report, digits_root, val_set, tmp_path):
    num_images = _write_class_major_samples(tmp_path / "samples", *val_set, per_class=10)
    settings = MetricSettings(img_size=16, num_images=num_images, class_num=10,
                              digits_judge=classifier_report["path"], ref_images=str(digits_root / "val"))
    metric = EVAL_METRICS["digits"](settings)
    assert isinstance(metric, DigitsJudge) and metric.name == "digits"
    metric.check()
    scores = metric.compute(str(tmp_path / "samples"), torch.device("cpu"))
    assert set(scores) == set(HEADLINE_SCORES)
    assert scores["num_samples"] == 100 and scores["class_consistency"] >= 0.9
    assert set(scores["per_class_accuracy"]) == set(CLASS_NAMES)
    assert scores["frechet_distance"] >= 0.0 and 0.5 < scores["spread_ratio"] < 1.5


def test_cli_scores_a_sample_folder(digits_root, classifier_report, val_set, tmp_path):
    num_images = _write_class_major_samples(tmp_path / "samples", *val_set, per_class=30)
    out = tmp_path / "metrics.json"
    metrics = digits_metrics.main(
        [
            "--samples",
            str(tmp_path / "samples"),
            "--num_images",
            str(num_images),
            "--data_root",
            str(digits_root),
            "--classifier",
            classifier_report["path"],
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == metrics
    assert metrics["num_samples"] == 300 and metrics["class_consistency"] >= 0.95
    assert 0.8 < metrics["spread_ratio"] < 1.2


def test_a_judge_with_non_finite_weights_is_refused_naming_it(classifier_report, tmp_path):
    checkpoint = torch.load(classifier_report["path"], weights_only=True)
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    path = tmp_path / "judge.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f"^digits judge {path}: tensor {name} holds non-finite values"):
        load_digits_classifier(path)
