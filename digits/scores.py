"""What the judge says about a set of generated digits, against real ones.

All scores are in the judge's feature space (``digits.judge``) unless stated. Samples are grouped by their
intended label, reference images by their true label.

- ``class_consistency``: fraction of samples the judge assigns to their intended label (pixel space).
- ``frechet_distance``: Frechet distance between Gaussian fits of sample and reference features, computed as
  FID is (``util.eval.fidelity.statistics_from_features`` and ``util.eval.fidelity.frechet_distance``).
- ``within_class_spread``: for each class, the mean Euclidean distance of its samples' features to that
  class's feature mean; then the unweighted mean over classes. ``spread_ratio`` = samples / reference: a set
  that collapses every class onto one image scores 0, a set as varied as real digits scores about 1.
"""
import numpy as np
import torch

from digits.judge import DigitsClassifier, predict, prepare_classifier_input
from util.eval.fidelity import frechet_distance, statistics_from_features


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

    Images are ``[N, 3, H, W]`` uint8 or float in ``[-1, 1]``. See the module docstring for each score.

    Returns:
        ``{"class_consistency", "per_class_accuracy": {class: acc}, "frechet_distance",
        "within_class_spread", "reference_within_class_spread", "spread_ratio",
        "reference_class_consistency", "num_samples", "num_reference"}``.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    reference_labels = torch.as_tensor(reference_labels, dtype=torch.int64).cpu()
    if len(labels) != len(images) or len(reference_labels) != len(reference_images):
        raise ValueError("each image set needs exactly one label per image")
    feats, preds = predict(classifier, prepare_classifier_input(images, classifier.img_size))  # [N, D], [N]
    ref_feats, ref_preds = predict(classifier, prepare_classifier_input(reference_images, classifier.img_size))

    correct = (preds == labels).float()  # [N]
    per_class = {str(c.item()): correct[labels == c].mean().item() for c in labels.unique()}
    stats, ref_stats = statistics_from_features(feats), statistics_from_features(ref_feats)
    spread = within_class_spread(feats, labels)
    reference_spread = within_class_spread(ref_feats, reference_labels)
    return {
        "class_consistency": correct.mean().item(),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(stats["mu"], stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "within_class_spread": spread,
        "reference_within_class_spread": reference_spread,
        "spread_ratio": spread / reference_spread,
        "reference_class_consistency": (ref_preds == reference_labels).float().mean().item(),
        "num_samples": len(labels),
        "num_reference": len(reference_labels),
    }
