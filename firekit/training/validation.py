"""Validation during training: mean label Dice of fixed batches registered both ways."""

from __future__ import annotations

import math

import torch

from firekit.core import metrics, spatial
from firekit.core.errors import FirekitError
from firekit.fire.model import Fire
from firekit.registration.network import register_from_start
from firekit.training.loading import batch_tensor

__all__ = ["check_validation_batch", "validate"]


def check_validation_batch(batch: dict, index: int) -> dict:
    """``batch`` (the ``index``-th), refused unless it has tensors x_a, x_b, labels_a and labels_b."""
    for key in ("x_a", "x_b", "labels_a", "labels_b"):
        if not isinstance(batch, dict) or key not in batch or not torch.is_tensor(batch[key]):
            raise FirekitError(
                f"validation batch {index} needs tensors x_a, x_b, labels_a, labels_b; {key!r} is missing"
            )
    return batch


def _mean_label_dice(warped: torch.Tensor, fixed: torch.Tensor) -> list[float]:
    """Per sample, the mean Dice over the non-zero labels of either map (samples with none skipped)."""
    scores = []
    for moved, target in zip(warped.cpu(), fixed.cpu()):
        per_label = metrics.dice(moved, target)
        if per_label:
            scores.append(sum(per_label.values()) / len(per_label))
    return scores


def validate(model: Fire, batches: list[dict], device: torch.device) -> dict[str, float]:
    """Mean label Dice of A warped onto B (a2b) and B onto A (b2a), in eval mode.

    Returns:
        ``dice_a2b``, ``dice_b2a`` and their mean ``dice_mean`` (NaN without any label).
    """
    model.eval()
    scores: dict[str, list[float]] = {"a2b": [], "b2a": []}
    for i, batch in enumerate(batches):
        x_a, x_b, labels_a, labels_b = (
            batch_tensor(batch, key, f"validation batch {i}", device) for key in ("x_a", "x_b", "labels_a", "labels_b")
        )
        for direction, moving, fixed, moving_labels, fixed_labels in (
            ("a2b", x_a, x_b, labels_a, labels_b),
            ("b2a", x_b, x_a, labels_b, labels_a),
        ):
            displacement = register_from_start(model, moving, fixed, direction).displacement
            scores[direction] += _mean_label_dice(spatial.warp_labels(moving_labels, displacement), fixed_labels)
    model.train()
    mean = {k: sum(v) / len(v) if v else math.nan for k, v in scores.items()}
    return {"dice_a2b": mean["a2b"], "dice_b2a": mean["b2a"], "dice_mean": (mean["a2b"] + mean["b2a"]) / 2}
