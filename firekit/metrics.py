"""Registration quality measures: Dice, folding, inverse consistency. Pure tensor maths."""

from __future__ import annotations

from typing import Sequence

import torch

from . import spatial

__all__ = ["dice", "folding_fraction", "mean_inverse_consistency"]


def dice(labels_a: torch.Tensor, labels_b: torch.Tensor, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice overlap per label of two integer label maps of the same shape.

    Args:
        labels_a, labels_b: integer tensors of equal shape (any layout).
        labels: which labels to score (default: every non-zero label present in either map).

    Returns:
        ``{label: dice}``; a label absent from both maps scores 1.0.
    """
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"label maps differ in shape: {tuple(labels_a.shape)} vs {tuple(labels_b.shape)}")
    if labels is None:
        present = torch.unique(torch.cat([labels_a.flatten(), labels_b.flatten()]))
        labels = [int(v) for v in present if v != 0]
    scores = {}
    for label in labels:
        a, b = labels_a == label, labels_b == label
        total = int(a.sum()) + int(b.sum())
        scores[int(label)] = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    return scores


def folding_fraction(displacement: torch.Tensor) -> float:
    """Fraction of voxels whose Jacobian determinant is <= 0, for ``(B, ndim, *S)`` normalised fields."""
    return float((spatial.jacobian_determinant(displacement) <= 0).double().mean())


def mean_inverse_consistency(forward: torch.Tensor, backward: torch.Tensor) -> float:
    """Mean ``|phi_forward o phi_backward - Id|`` in voxels (both ``(B, ndim, *S)`` normalised)."""
    return float(spatial.inverse_consistency_error(forward, backward).mean())
