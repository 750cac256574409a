"""Synthetic head phantoms in 2D and 3D with two MR-like contrasts and exact labels.

Used by ``make demo``, the tests and the teaching material when no real data is at
hand. Everything is generated from a seed; nothing is downloaded.

Labels: 0 background, 1 CSF, 2 grey matter, 3 white matter, 4 scalp.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as nnf

from firekit.core import spatial

__all__ = ["CONTRASTS", "LABEL_NAMES", "head_labels", "contrast", "PhantomPair", "phantom_pair"]

LABEL_NAMES = {1: "CSF", 2: "GM", 3: "WM", 4: "scalp"}

# Tissue intensities in [0, 1] for background, CSF, GM, WM, scalp.
CONTRASTS: dict[str, tuple[float, ...]] = {
    "t1": (0.0, 0.15, 0.55, 0.85, 0.7),
    "t2": (0.0, 1.0, 0.6, 0.3, 0.45),
    "flair": (0.0, 0.05, 0.75, 0.5, 0.6),
}


def _smooth_noise(shape: Sequence[int], coarse: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random field ``(*shape)`` in about [-1, 1], from a ``coarse``-per-axis lattice."""
    ndim = len(shape)
    lattice = torch.rand((1, 1, *([coarse] * ndim)), generator=generator) * 2 - 1
    mode = "bilinear" if ndim == 2 else "trilinear"
    return nnf.interpolate(lattice, size=tuple(shape), mode=mode, align_corners=True)[0, 0]


def head_labels(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A random head-like label map of integer labels 0-4.

    Args:
        shape: spatial shape (2D or 3D).
        seed: random seed for the shape, size and folding of the tissue boundaries.

    Returns:
        ``(*shape)`` int64 labels.
    """
    generator = torch.Generator().manual_seed(int(seed))
    ndim = len(shape)
    grid = spatial.identity_grid(shape)[0]  # (ndim, *shape)

    def uniform(low, high, n=ndim):
        return low + (high - low) * torch.rand(n, generator=generator)

    centre = uniform(-0.05, 0.05)
    semi_axes = uniform(0.72, 0.88)
    radius = (((grid - centre.view(ndim, *([1] * ndim))) / semi_axes.view(ndim, *([1] * ndim))) ** 2).sum(0).sqrt()
    # Folded cortex: the boundaries are perturbed by smooth noise of a few wiggles.
    folds = 0.06 * _smooth_noise(shape, 7, generator)
    wobble = 0.04 * _smooth_noise(shape, 4, generator)

    labels = torch.zeros(tuple(shape), dtype=torch.int64)
    labels[radius + wobble < 1.0] = 4  # scalp
    labels[radius + wobble < 0.86] = 1  # CSF around the brain
    labels[radius + folds < 0.80] = 2  # grey matter
    labels[radius + folds < 0.58] = 3  # white matter
    # Two ventricles, mirrored across axis 1.
    offset = float(uniform(0.12, 0.2, 1))
    for side in (-1.0, 1.0):
        v_centre = centre.clone()
        v_centre[1 % ndim] += side * offset
        v_axes = uniform(0.08, 0.14)
        v_axes[0] *= 2.0
        v_radius = (((grid - v_centre.view(ndim, *([1] * ndim))) / v_axes.view(ndim, *([1] * ndim))) ** 2).sum(0)
        labels[v_radius < 1.0] = 1
    return labels


def contrast(labels: torch.Tensor, name: str = "t1", blur: float = 0.7, noise: float = 0.02,
             seed: int = 0) -> torch.Tensor:
    """Render a label map as an MR-like image normalised to [-1, 1].

    Args:
        labels: ``(*spatial)`` integer labels 0-4.
        name: a key of :data:`CONTRASTS`.
        blur: Gaussian sigma in voxels (partial volume).
        noise: standard deviation of additive Gaussian noise, in [0, 1] intensity units.
        seed: noise seed.

    Returns:
        ``(*spatial)`` float32 in [-1, 1].
    """
    if name not in CONTRASTS:
        raise ValueError(f"unknown contrast {name!r}; choose one of {sorted(CONTRASTS)}")
    table = torch.tensor(CONTRASTS[name])
    image = table[labels.clamp(0, len(table) - 1)]
    if blur > 0:
        image = _gaussian_blur(image, blur)
    if noise > 0:
        generator = torch.Generator().manual_seed(int(seed) + 7919)
        image = image + noise * torch.randn(image.shape, generator=generator)
    return (image.clamp(0, 1) * 2 - 1).float()


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndim = image.ndim
    conv = getattr(nnf, f"conv{ndim}d")
    out = image[None, None]
    for axis in range(ndim):
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = kernel.numel()
        padding = [0] * ndim
        padding[axis] = radius
        out = conv(out, kernel.view(shape), padding=tuple(padding))
    return out[0, 0]


class PhantomPair(NamedTuple):
    """A pair related by a known transform, as ``(1, 1, *S)`` tensors.

    Attributes:
        x_a: modality-A image of the subject.
        x_b: modality-B image of the same subject moved by ``theta``.
        labels_a, labels_b: integer label maps of each.
        theta: ``(1, ndim, ndim + 1)`` true transform: ``x_b(x) ~ x_a-anatomy(theta(x))``,
            i.e. warping A by ``theta`` aligns it with B.
    """

    x_a: torch.Tensor
    x_b: torch.Tensor
    labels_a: torch.Tensor
    labels_b: torch.Tensor
    theta: torch.Tensor


def phantom_pair(
    shape: Sequence[int],
    theta: torch.Tensor,
    seed: int = 0,
    contrasts: tuple[str, str] = ("t1", "t2"),
) -> PhantomPair:
    """Build a two-contrast pair whose anatomy differs by the affine ``theta``.

    Args:
        shape: spatial shape, 2D or 3D.
        theta: ``(1, ndim, ndim + 1)`` normalised affine (see :func:`firekit.core.spatial.affine_matrix`).
        seed: anatomy and noise seed.
        contrasts: modality names for A and B (``("t1", "t1")`` for a mono-modal pair).
    """
    labels_a = head_labels(shape, seed)[None, None]
    labels_b = spatial.warp_labels(labels_a, spatial.affine_to_displacement(theta, shape))
    x_a = contrast(labels_a[0, 0], contrasts[0], seed=seed)[None, None]
    x_b = contrast(labels_b[0, 0], contrasts[1], seed=seed + 1)[None, None]
    return PhantomPair(x_a, x_b, labels_a, labels_b, theta)
