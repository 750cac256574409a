"""Random affine + smooth non-rigid transforms for training augmentation (FIRE, Section 4.1).

The paper trains on pairs made by random affine and smooth non-rigid transformations that change
the image by 20-50 % along at least one dimension. Everything here is pure tensor maths, written
once for 2D and 3D, and draws all its randomness from the ``torch.Generator`` it is given, so a
seed fixes the result.

Transforms are drawn in physical units (mm, degrees) about the centre of the grid and returned in
firekit's normalised convention (see :mod:`firekit.core.spatial`): a transform maps a point ``x`` of the
output grid to the point ``phi(x)`` of the input image that is sampled there,
``apply(image, t)(x) = image(phi(x))``. ``phi = affine o elastic``: ``x -> theta(x + u_el(x))``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from firekit.core import spatial
from firekit.core.config import PlainConfig
from firekit.core.errors import FirekitError

__all__ = [
    "AugmentConfig",
    "RandomTransform",
    "random_affine",
    "random_elastic",
    "random_transform",
    "smooth_random_field",
    "apply",
    "apply_labels",
]

# Per-plane rotation limit as a fraction of ``rotation_deg``, keyed by the number of rotation
# planes (1 in 2D, 3 in 3D): the paper's +-20 deg in 2D and +-15 deg about each axis in 3D.
_ROTATION_FRACTION = {1: 1.0, 3: 0.75}


@dataclass
class AugmentConfig(PlainConfig):
    """Magnitudes of the random transform; every magnitude is multiplied by ``strength``.

    Attributes:
        scale_change: (low, high); one random axis is scaled by ``1 +- U(low, high)`` (random sign).
        scale_jitter: the other axes are scaled by ``1 +- U(0, scale_jitter)``.
        rotation_deg: 2D: one angle ``U(-r, r)``; 3D: three angles, each ``U(-0.75 r, 0.75 r)``.
        shear: each shear term ``U(-shear, shear)`` (1 term in 2D, 3 in 3D).
        translation_mm: each axis shifted by ``U(-t, t)`` mm.
        elastic_mm: the smooth field's largest displacement is ``U(0.5, 1) * elastic_mm`` mm.
        elastic_spacing_mm: control-point spacing (mm) of the cubic B-spline smooth field.
        strength: in [0, 1]; scales every magnitude above linearly toward the identity (0 = identity),
            for curricula.

    Scale factors act on the sampling map (output point -> input point): a factor 1.3 along an
    axis shows 30 % more of the input there, so the anatomy looks 1/1.3 times as large.
    """

    config_name = "augmentation config"

    scale_change: tuple[float, float] = (0.2, 0.5)
    scale_jitter: float = 0.1
    rotation_deg: float = 20.0
    shear: float = 0.1
    translation_mm: float = 10.0
    elastic_mm: float = 9.0
    elastic_spacing_mm: float = 40.0
    strength: float = 1.0

    def __post_init__(self):
        self.scale_change = tuple(float(v) for v in self.scale_change)
        low_high = self.scale_change
        if len(low_high) != 2 or not 0.0 <= low_high[0] <= low_high[1] < 1.0:
            raise FirekitError(f"AugmentConfig.scale_change must be (low, high) with 0 <= low <= high < 1, got {low_high}")
        if not 0.0 <= self.scale_jitter < 1.0:
            raise FirekitError(f"AugmentConfig.scale_jitter must be in [0, 1), got {self.scale_jitter}")
        for name in ("rotation_deg", "shear", "translation_mm", "elastic_mm"):
            if getattr(self, name) < 0:
                raise FirekitError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.elastic_spacing_mm > 0:
            raise FirekitError(f"AugmentConfig.elastic_spacing_mm must be > 0, got {self.elastic_spacing_mm}")
        if not 0.0 <= self.strength <= 1.0:
            raise FirekitError(f"AugmentConfig.strength must be in [0, 1], got {self.strength}")

    @classmethod
    def mild(cls, **overrides) -> "AugmentConfig":
        """Small per-subject differences: scale +-8 %, rotation <= 6 deg, 5 mm shift, 3 mm elastic."""
        values = dict(scale_change=(0.0, 0.08), scale_jitter=0.04, rotation_deg=6.0, shear=0.03,
                      translation_mm=5.0, elastic_mm=3.0, elastic_spacing_mm=40.0)
        return cls(**{**values, **overrides})

    def with_strength(self, strength: float) -> "AugmentConfig":
        """The same config at another curriculum ``strength``."""
        return dataclasses.replace(self, strength=float(strength))


class RandomTransform(NamedTuple):
    """One drawn transform ``phi(x) = theta(x + u_el(x))`` on a grid.

    Attributes:
        theta: ``(1, ndim, ndim + 1)`` affine in normalised coordinates.
        displacement: ``(1, ndim, *shape)`` normalised displacement of the whole ``phi``.
        scales: ``(ndim,)`` the scale factors drawn for the affine (in mm, before rotation/shear).
        elastic: ``(1, ndim, *shape)`` normalised displacement of the elastic part ``u_el`` alone.
    """

    theta: torch.Tensor
    displacement: torch.Tensor
    scales: torch.Tensor
    elastic: torch.Tensor


def _check_grid(shape: Sequence[int], spacing_mm) -> tuple[tuple[int, ...], torch.Tensor]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 2:
        raise FirekitError(f"shape must be 2D or 3D with every size >= 2, got {shape}")
    values = [float(spacing_mm)] * len(shape) if isinstance(spacing_mm, (int, float)) else [float(v) for v in spacing_mm]
    if len(values) != len(shape) or min(values) <= 0:
        raise FirekitError(f"spacing_mm must be one positive number or {len(shape)} of them, got {spacing_mm}")
    return shape, torch.tensor(values, dtype=torch.float64)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _random_sign(generator: torch.Generator, n: int) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0).double()


def _draw_affine(shape, spacing, generator, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta (1, n, n+1) float64 normalised, scales (n,) float64)."""
    ndim = len(shape)
    n_planes = ndim * (ndim - 1) // 2
    k = config.strength
    # Every draw happens whatever the strength, so a seed gives the same stream at any strength.
    axis = int(torch.randint(ndim, (1,), generator=generator))
    main = _random_sign(generator, 1) * _uniform(generator, 1, *config.scale_change)
    jitter = _random_sign(generator, ndim) * _uniform(generator, ndim, 0.0, config.scale_jitter)
    jitter[axis] = main[0]
    scales = 1.0 + k * jitter
    limit = config.rotation_deg * _ROTATION_FRACTION[n_planes]
    angles = k * _uniform(generator, n_planes, -limit, limit)
    shears = k * _uniform(generator, n_planes, -config.shear, config.shear)
    shift_mm = k * _uniform(generator, ndim, -config.translation_mm, config.translation_mm)

    linear_mm = spatial.affine_matrix(ndim, angles.tolist(), scales.tolist(), shears.tolist(), 0.0,
                                      dtype=torch.float64)[0, :, :ndim]
    # About the grid centre c in mm: v_in = c + D^-1 (A D (v - c) + t), D = diag(spacing).
    centre = torch.tensor([(s - 1) / 2.0 for s in shape], dtype=torch.float64)
    linear_vox = linear_mm * spacing[None, :] / spacing[:, None]
    offset = centre - linear_vox @ centre + shift_mm / spacing
    matrix = torch.cat([linear_vox, offset[:, None]], dim=1)[None]
    return spatial.voxel_affine_to_normalised(matrix, shape), scales


def random_affine(shape: Sequence[int], spacing_mm, generator: torch.Generator,
                  config: AugmentConfig | None = None) -> torch.Tensor:
    """Random affine drawn in mm about the grid centre, returned in normalised coordinates.

    Args:
        shape: spatial shape ``(*S)``, 2D or 3D.
        spacing_mm: voxel size in mm, one number or one per axis.
        generator: CPU ``torch.Generator``, the only source of randomness.
        config: magnitudes (default :class:`AugmentConfig`).

    Returns:
        ``(1, ndim, ndim + 1)`` float32 ``theta`` (output point -> input point, normalised).
    """
    shape, spacing = _check_grid(shape, spacing_mm)
    theta, _ = _draw_affine(shape, spacing, generator, config or AugmentConfig())
    return theta.float()


def _bspline3(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    inner = 2.0 / 3.0 - t ** 2 + t ** 3 / 2.0
    outer = (2.0 - t).clamp(min=0.0) ** 3 / 6.0
    return torch.where(t < 1.0, inner, outer)


def smooth_random_field(shape: Sequence[int], spacing_mm, control_spacing_mm: float, channels: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Smooth random field: cubic B-spline through standard-normal control points.

    The control lattice has spacing ``control_spacing_mm``, is centred on the grid and reaches
    past its edges, so the field is equally random everywhere (no pinned borders).

    Args:
        shape: spatial shape ``(*S)``.
        spacing_mm: voxel size in mm, one number or one per axis.
        control_spacing_mm: control-point spacing in mm (sets the smoothness).
        channels: number of independent fields.
        generator: CPU ``torch.Generator``.

    Returns:
        ``(1, channels, *S)`` float32, unit-less, of order 1.
    """
    shape, spacing = _check_grid(shape, spacing_mm)
    if not control_spacing_mm > 0:
        raise FirekitError(f"control_spacing_mm must be > 0, got {control_spacing_mm}")
    weights = []
    for size, step in zip(shape, spacing.tolist()):
        half = (size - 1) * step / 2.0
        n_ctrl = 2 * math.ceil(half / control_spacing_mm) + 3
        points = (torch.arange(size, dtype=torch.float64) * step - half) / control_spacing_mm
        knots = torch.arange(n_ctrl, dtype=torch.float64) - (n_ctrl - 1) / 2.0
        weights.append(_bspline3(points[:, None] - knots[None, :]))  # (size, n_ctrl)
    field = torch.randn((channels, *[w.shape[1] for w in weights]), generator=generator, dtype=torch.float64)
    field = field.float()  # float32 from here: full-size 3D fields in float64 cost twice the time
    for axis, weight in enumerate(weights):
        moved = field.movedim(axis + 1, 0)
        field = torch.tensordot(weight.float(), moved, dims=1).movedim(0, axis + 1)
    return field.unsqueeze(0)


def _draw_elastic(shape, spacing, generator, config) -> torch.Tensor:
    """(1, n, *shape) float32 normalised."""
    ndim = len(shape)
    amplitude = float(_uniform(generator, 1, 0.5, 1.0)[0]) * config.elastic_mm * config.strength
    field_mm = smooth_random_field(shape, spacing.tolist(), config.elastic_spacing_mm, ndim, generator)
    largest = float(field_mm.square().sum(dim=1).max().sqrt())
    # Scale per axis in one pass: mm -> voxels -> normalised (align_corners=True).
    factor = [amplitude / largest / step / ((size - 1) / 2.0) if largest > 0 else 0.0
              for size, step in zip(shape, spacing.tolist())]
    return field_mm * torch.tensor(factor, dtype=field_mm.dtype).reshape(1, ndim, *([1] * ndim))


def random_elastic(shape: Sequence[int], spacing_mm, generator: torch.Generator,
                   config: AugmentConfig | None = None) -> torch.Tensor:
    """Random smooth displacement whose largest magnitude is ``U(0.5, 1) * elastic_mm * strength`` mm.

    Args:
        shape: spatial shape ``(*S)``, 2D or 3D.
        spacing_mm: voxel size in mm, one number or one per axis.
        generator: CPU ``torch.Generator``.
        config: magnitudes (default :class:`AugmentConfig`).

    Returns:
        ``(1, ndim, *S)`` float32 normalised displacement.
    """
    shape, spacing = _check_grid(shape, spacing_mm)
    return _draw_elastic(shape, spacing, generator, config or AugmentConfig())


def random_transform(shape: Sequence[int], spacing_mm, generator: torch.Generator,
                     config: AugmentConfig | None = None) -> RandomTransform:
    """Random ``phi = affine o elastic`` (``x -> theta(x + u_el(x))``) on a grid.

    Args:
        shape: spatial shape ``(*S)``, 2D or 3D.
        spacing_mm: voxel size in mm, one number or one per axis.
        generator: CPU ``torch.Generator``; the affine is drawn first, then the elastic field.
        config: magnitudes (default :class:`AugmentConfig`).

    Returns:
        :class:`RandomTransform` (float32 tensors; ``scales`` float64).
    """
    shape, spacing = _check_grid(shape, spacing_mm)
    config = config or AugmentConfig()
    theta, scales = _draw_affine(shape, spacing, generator, config)
    theta = theta.float()
    elastic = _draw_elastic(shape, spacing, generator, config)
    displacement = spatial.compose_affine_displacement(theta, elastic)
    return RandomTransform(theta, displacement, scales, elastic)


def _check_image(image: torch.Tensor, transform: RandomTransform, what: str) -> None:
    ndim = transform.displacement.shape[1]
    if image.ndim != ndim + 2:
        raise FirekitError(f"{what} must be (B, C, *spatial) with {ndim} spatial dims, got {tuple(image.shape)}")


def apply(image: torch.Tensor, transform: RandomTransform, mode: str = "linear",
          padding_mode: str = "zeros") -> torch.Tensor:
    """Resample ``image`` by a drawn transform: ``out(x) = image(phi(x))``.

    Args:
        image: ``(B, C, *S_in)``; the transform's grid sets the output shape.
        transform: from :func:`random_transform`.
        mode: ``"linear"`` or ``"nearest"``.
        padding_mode: value outside the input, as :func:`firekit.core.spatial.warp`.

    Returns:
        ``(B, C, *S)`` with ``S`` the transform's grid.
    """
    _check_image(image, transform, "image")
    displacement = transform.displacement.to(image if image.is_floating_point() else transform.displacement)
    return spatial.warp(image, displacement, mode=mode, padding_mode=padding_mode)


def apply_labels(labels: torch.Tensor, transform: RandomTransform) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map ``(B, 1, *S_in)`` -> ``(B, 1, *S)``, 0 outside."""
    _check_image(labels, transform, "labels")
    return spatial.warp_labels(labels, transform.displacement)
