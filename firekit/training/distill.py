"""Distillation targets: what refinement finds for a training pair, supervising the network's displacements."""

from __future__ import annotations

import torch

__all__ = ["refinement_targets"]


def refinement_targets(x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacements A->B and B->A found by :func:`firekit.registration.refine.refine` (its preset), both
    directions batched.

    Args:
        x_a, x_b: ``(B, C, *S)`` images; refinement takes their first channel.

    Returns:
        ``(u_a2b, u_b2a)``: ``(B, ndim, *S)`` normalised displacements in ``x_a``'s dtype.
    """
    from firekit.registration.refine import refine

    batch = x_a.shape[0]
    result = refine(torch.cat([x_a, x_b])[:, :1].float(), torch.cat([x_b, x_a])[:, :1].float())
    displacement = result.displacement.to(x_a.dtype)
    return displacement[:batch], displacement[batch:]
