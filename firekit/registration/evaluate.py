"""Score a registration from files: Dice and HD95 per label, folding of the displacement field."""

from __future__ import annotations

import numpy as np
import torch

from firekit.data import io
from firekit.core import metrics
from firekit.core.errors import FirekitError
from firekit.registration.pipeline import field_jacobian

__all__ = ["evaluate_files", "format_scores"]


def evaluate_files(fixed_labels, warped_labels, field=None) -> dict:
    """Dice and HD95 (mm) per label of two label maps on one grid, and folding of a field.

    Returns:
        ``{"dice": {label: d}, "hd95_mm": {label: h}, "mean_dice": m, "folding_percent": f | None}``.
    """
    fixed = io.load_labels(fixed_labels, "fixed label map")
    warped = io.load_labels(warped_labels, "warped label map")
    if fixed.shape != warped.shape:
        raise FirekitError(
            f"{warped_labels}: shape {warped.shape} differs from {fixed_labels} {fixed.shape}; "
            "pass labels warped onto the fixed grid (register --out-labels)"
        )
    labels = sorted(int(v) for v in np.union1d(np.unique(fixed.data), np.unique(warped.data)) if v != 0)
    if not labels:
        raise FirekitError(f"{fixed_labels}: label maps are empty (only 0); pass a segmentation with labels > 0")
    dice = metrics.dice(torch.as_tensor(fixed.data), torch.as_tensor(warped.data), labels)
    hd = metrics.hd95(fixed.data, warped.data, fixed.spacing, labels)
    folding = None
    if field is not None:
        jac = field_jacobian(io.load_field(field, fixed), fixed.affine)
        folding = float((jac <= 0).mean() * 100.0)
    return {
        "dice": dice,
        "hd95_mm": hd,
        "mean_dice": float(np.mean(list(dice.values()))),
        "folding_percent": folding,
    }


def format_scores(scores: dict, names: dict[int, str] | None = None) -> str:
    """A small text table of :func:`evaluate_files`' output."""
    names = names or {}
    lines = [f"{'label':<10}{'Dice':>8}{'HD95 mm':>10}"]
    for label, value in scores["dice"].items():
        lines.append(f"{names.get(label, str(label)):<10}{value:8.3f}{scores['hd95_mm'][label]:10.2f}")
    lines.append(f"{'mean':<10}{scores['mean_dice']:8.3f}")
    if scores.get("folding_percent") is not None:
        lines.append(f"|J| <= 0: {scores['folding_percent']:.3f} % of voxels")
    return "\n".join(lines)
