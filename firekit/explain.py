"""What FIRE learned, as pictures: G's latent features and where they are modality-invariant.

Section 6.3 of the paper reads the model through its components. This module gives the arrays
behind those pictures (drawing stays in ``viz``):

- :func:`latent_features`: G's feature maps of an image, for a channel browser;
- :func:`features_to_rgb`: the three principal components of G's channels as an RGB image;
- :func:`invariance_map`: per location, the RMS difference between G(fixed) and G(moving) warped by
  the model's own transform: low where G maps both modalities to the same code (the property the
  synthesis and registration losses ask of it), high where it does not.

All inputs are normalised network tensors ``(B, 1, *S)`` (``register``'s ``NetworkView`` holds them).
"""

from __future__ import annotations

import torch

from . import spatial
from .model import Fire

__all__ = ["latent_features", "features_to_rgb", "invariance_map"]


def latent_features(model: Fire, image: torch.Tensor) -> torch.Tensor:
    """G(image): ``(B, C, *S/4)`` latent features, without gradient."""
    model.check_input(image)
    with torch.no_grad():
        return model.encoder(image)


def features_to_rgb(features: torch.Tensor, percentile: float = 1.0) -> torch.Tensor:
    """The first three principal components of the channels, per sample, as RGB in [0, 1].

    Each sample's channels are centred and projected on the eigenvectors of their covariance over
    all locations (largest variance first = red); each component is stretched between its
    ``percentile`` and ``100 - percentile`` percentiles. The sign of a component is arbitrary (PCA).

    Args:
        features: ``(B, C, *s)`` with C >= 3.

    Returns:
        ``(B, 3, *s)`` float32.
    """
    if features.ndim < 4 or features.shape[1] < 3:
        raise ValueError(f"features must be (B, C >= 3, *spatial), got {tuple(features.shape)}")
    batch, channels = features.shape[:2]
    flat = features.detach().double().flatten(2)  # (B, C, N)
    centred = flat - flat.mean(dim=2, keepdim=True)
    covariance = centred @ centred.transpose(1, 2) / max(flat.shape[2] - 1, 1)  # (B, C, C)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    top = vectors[:, :, -3:].flip(-1)  # (B, C, 3), largest first
    components = top.transpose(1, 2) @ centred  # (B, 3, N)
    q = torch.tensor([percentile / 100, 1 - percentile / 100], dtype=components.dtype)
    low, high = torch.quantile(components, q, dim=2, keepdim=True)  # each (B, 3, 1)
    rgb = ((components - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    return rgb.view(batch, 3, *features.shape[2:]).float()


def invariance_map(model: Fire, moving: torch.Tensor, fixed: torch.Tensor, direction: str = "a2b",
                   displacement: torch.Tensor | None = None) -> torch.Tensor:
    """RMS over channels of ``G(fixed) - G(moving) o phi`` at every feature location.

    Args:
        moving, fixed: ``(B, 1, *S)`` normalised images (moving is modality A for ``"a2b"``).
        displacement: ``(B, n, *S)`` normalised phi (default: the model's own registration).

    Returns:
        ``(B, *S/4)`` float32, in feature units (0 where the warped codes agree exactly).
    """
    model.check_input(moving, "moving")
    model.check_input(fixed, "fixed")
    with torch.no_grad():
        if displacement is None:
            displacement = model.register(moving, fixed, direction).displacement
        feat_moving, feat_fixed = model.encoder(moving), model.encoder(fixed)
        coarse = spatial.resize_displacement(displacement, feat_fixed.shape[2:])
        warped = spatial.warp(feat_moving, coarse)
        return (warped - feat_fixed).square().mean(dim=1).sqrt().float()
