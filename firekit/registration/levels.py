"""What every refinement stage shares: image pyramids, where the similarity counts, and the
similarity of one pyramid level.

Tensors follow :mod:`firekit.core.spatial`: images ``(B, C, *S)``, displacements ``(B, n, *S)``
normalised. :class:`Regions` holds the weights on the network grid that ``register`` gives the
stages (the user's masks, each image's field of view); :class:`PyramidRegions` the same as
pyramids, as the refinement reads them; :class:`Level` compares the images at one level.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as nnf

from firekit.core import spatial
from firekit.core.errors import FirekitError
from firekit.core.similarity import Similarity, box_filter

__all__ = ["check_images", "level_shape", "downsample", "Pyramid", "Regions", "PyramidRegions", "pyramid_regions",
           "cut_by_view", "open_mask", "Level", "points_offset", "log_progress", "step_rate"]


def check_images(moving: torch.Tensor, fixed: torch.Tensor) -> int:
    """The ndim of a batch of pairs ``(B, 1, *S)`` fit to refine (2 or 3, every size >= 4)."""
    if fixed.ndim not in (4, 5) or fixed.shape[1] != 1:
        raise FirekitError(f"fixed must be (B, 1, *spatial) with 2 or 3 spatial dims, got {tuple(fixed.shape)}")
    if moving.ndim != fixed.ndim or moving.shape[1] != 1 or moving.shape[0] != fixed.shape[0]:
        raise FirekitError(
            f"moving must be (B, 1, *spatial) like fixed {tuple(fixed.shape)}, got {tuple(moving.shape)}"
        )
    if min(fixed.shape[2:]) < 4 or min(moving.shape[2:]) < 4:
        raise FirekitError(f"refine needs every spatial size >= 4, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
    return fixed.ndim - 2


def level_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Grid whose voxels are ``factor`` times larger (same normalised extent), sizes >= 4."""
    return tuple(max(round((int(s) - 1) / factor) + 1, 4) for s in shape)


def downsample(image: torch.Tensor, factor: int, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Smooth with a box about ``factor`` voxels wide, then sample a coarser grid.

    Sampling with ``align_corners=True`` keeps every normalised point where it was (average
    pooling would shift the grid by half a voxel and shrink it slightly).

    Args:
        image: ``(B, C, *S)``.
        factor: the coarse grid's voxel size in voxels of ``image``.
        shape: the coarse grid (default ``level_shape(S, factor)``).
    """
    shape = level_shape(image.shape[2:], factor) if shape is None else tuple(shape)
    if factor == 1 and shape == tuple(image.shape[2:]):
        return image
    # A zero displacement on the coarse grid samples the image at the coarse grid's points.
    zero = image.new_zeros(image.shape[0], image.ndim - 2, *shape)
    return spatial.warp(box_filter(image, factor // 2), zero)


class Pyramid:
    """An image and its copies downsampled by :func:`downsample`, each made once when first asked.

    Moments, every affine level and every non-rigid level ask for the same few factors of fixed;
    smoothing a full-resolution volume is the costly part, so it is done once per factor.
    """

    def __init__(self, image: torch.Tensor):
        self.image = image
        self._levels: dict[int, torch.Tensor] = {}

    def at(self, factor: int, rows: int = 1) -> torch.Tensor:
        """The image downsampled by ``factor``, each sample repeated ``rows`` times along the batch."""
        if factor not in self._levels:
            self._levels[factor] = downsample(self.image, factor)
        level = self._levels[factor]
        return level if rows == 1 else level.repeat_interleave(rows, dim=0)


class Regions(NamedTuple):
    """Where the similarity counts, each ``(B, 1, *S)`` on the network grid with weights in [0, 1]
    (None: everywhere): the user's masks of fixed and moving (``--fixed-mask``, ``--moving-mask``)
    and each image's field of view on the grid (where its voxels are, not the grid's padding)."""

    fixed: torch.Tensor | None = None
    moving: torch.Tensor | None = None
    fixed_view: torch.Tensor | None = None
    moving_view: torch.Tensor | None = None

    def swapped(self) -> "Regions":
        """The regions of the registration the other way (fixed onto moving)."""
        return Regions(self.moving, self.fixed, self.moving_view, self.fixed_view)


class PyramidRegions(NamedTuple):
    """Where the similarity counts: weights in [0, 1] on fixed's grid and on moving's (pyramids of
    ``(B, 1, *S)``; None: everywhere), and moving's field of view (see ``RefineConfig.outside_cost``).
    Moving's are carried by the transform, zero outside its grid."""

    fixed: Pyramid | None = None
    moving: Pyramid | None = None
    view: Pyramid | None = None
    cut: torch.Tensor | None = None  # (B,) bool: the pairs whose view counts (moving cut by it)

    def after(self, displacement: torch.Tensor) -> "PyramidRegions":
        """The regions once moving is warped by ``displacement`` (as the non-rigid stage sees it)."""
        moved = [None if r is None else Pyramid(spatial.warp(r.image, displacement, padding_mode="zeros"))
                 for r in (self.moving, self.view)]
        return PyramidRegions(self.fixed, *moved, self.cut)


def pyramid_regions(moving: torch.Tensor, fixed: torch.Tensor, moving_mask: torch.Tensor | None,
                    fixed_mask: torch.Tensor | None, moving_view: torch.Tensor | None = None,
                    outside_cost: float = 0.0, config_foreground: float = -0.9, opening: int = 1) -> PyramidRegions:
    """The :class:`PyramidRegions` of a registration: the masks given, and moving's field of view when
    ``outside_cost`` > 0 (``moving_view``, default the whole of moving's grid) for the pairs whose
    moving foreground it cuts (:func:`cut_by_view`)."""
    for name, mask, image in (("moving_mask", moving_mask, moving), ("fixed_mask", fixed_mask, fixed),
                              ("moving_view", moving_view, moving)):
        if mask is not None and tuple(mask.shape) != tuple(image.shape):
            raise FirekitError(f"{name} must have its image's shape {tuple(image.shape)}, got {tuple(mask.shape)}")
    view = cut = None
    if outside_cost > 0:
        view = torch.ones_like(moving) if moving_view is None else moving_view.detach().to(moving)
        cut = cut_by_view(moving, view, config_foreground, opening)
        if not bool(cut.any()):
            view = cut = None
    return PyramidRegions(*(None if r is None else Pyramid(r.detach().to(fixed))
                            for r in (fixed_mask, moving_mask, view)), cut)


def cut_by_view(moving: torch.Tensor, view: torch.Tensor, threshold: float, opening: int,
                 band: int = 2, share: float = 0.05) -> torch.Tensor:
    """``(B,)`` bool: whether moving's foreground (above ``threshold``, opened) covers more than ``share``
    of the ``band`` voxels along the edge of its field of view ``view`` ``(B, 1, *S)`` (1 inside): the
    anatomy goes on beyond the edge, so what lies outside is unknown, not background."""
    pool = getattr(nnf, f"max_pool{moving.ndim - 2}d")
    inside = view > 0.5
    outside = nnf.pad((~inside).float(), [band] * (2 * (moving.ndim - 2)), value=1.0)
    edge = inside & (pool(outside, 2 * band + 1, stride=1) > 0.5)
    foreground = open_mask(moving > threshold, opening) & edge
    return foreground.flatten(1).sum(1) > share * edge.flatten(1).sum(1).clamp_min(1)


def open_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, 1, *S)`` boolean ``mask`` eroded then dilated by a cube ``2 radius + 1`` voxels wide: the
    specks of background noise above the threshold go, the anatomy keeps its outline."""
    if radius <= 0:
        return mask
    pool = getattr(nnf, f"max_pool{mask.ndim - 2}d")
    width = 2 * radius + 1
    as_float = mask.float()
    eroded = -pool(-as_float, width, stride=1, padding=radius)
    opened = pool(eroded, width, stride=1, padding=radius) > 0.5
    # A foreground thinner than the cube everywhere would vanish: keep the mask as it was then.
    empty = ~opened.flatten(1).any(dim=1)
    return torch.where(empty.view(-1, *[1] * (mask.ndim - 1)), mask, opened)


class Level:
    """One pyramid level: fixed features computed once, moving features per step or once.

    ``warp_features`` True: the moving image's features are computed once on its own grid and
    resampled by each transform tried (fast). Orientation-dependent descriptors such as MIND are
    then off where the transform rotates or scales much, so this suits transforms near the
    identity (the non-rigid stage, whose moving image is already warped by the affine).
    False: the moving image is resampled on a grid twice as fine as the level and smoothed down
    to it (so interpolation blurs it about as little as the fixed level image), and its features
    are recomputed at every step: exact, slower.

    ``sampling`` < 1 (used only with warped features and a pointwise similarity): each
    :meth:`loss` compares the features at a new uniform random sample of that fraction of the
    level's voxels instead of at all of them; fixed's features (and the mask) are gathered at
    the same voxels, so the loss is an unbiased estimate of the dense one.

    ``regions`` weighs each fixed voxel by fixed's region weight there times moving's region weight
    (a mask, or 1 over moving's field of view) where the transform takes it, zero outside moving's
    grid: the similarity counts only what both images show (weights carry no gradient).

    Args:
        moving, fixed: pyramids of the ``(B, 1, *S)`` images.
        factor: the level's downsampling factor.
        rows: each pair is repeated this many times along the batch (one row per start).
    """

    def __init__(self, moving: Pyramid, fixed: Pyramid, factor: int, similarity: Similarity,
                 warp_features: bool, sampling: float = 1.0, rows: int = 1, smooth_first: bool = False,
                 regions: PyramidRegions | None = None, outside_cost: float = 0.0):
        self.shape = level_shape(fixed.image.shape[2:], factor)
        regions = regions if regions is not None else PyramidRegions()
        self.fixed_weight = None if regions.fixed is None else regions.fixed.at(factor, rows)
        self.moving_weight = None if regions.moving is None else regions.moving.at(factor, rows)
        self.view = None if regions.view is None else regions.view.at(factor, rows)
        self.cut = None if regions.cut is None else regions.cut.repeat_interleave(rows)
        self.outside_cost = outside_cost
        self.fixed = fixed.at(factor, rows)
        self.fixed_features = similarity.features(self.fixed)
        self.similarity = similarity
        self.mask = None
        self.moving_level = partial(moving.at, factor, rows)  # made only if needed
        warped = warp_features and similarity.warpable
        self.moving_features = similarity.features(self.moving_level()) if warped else None
        self.sampling = sampling if warped and similarity.pointwise else 1.0
        self.smooth_moving = None
        if not warped and smooth_first:
            self.smooth_moving = box_filter(moving.image, factor // 2)
            if rows > 1:
                self.smooth_moving = self.smooth_moving.repeat_interleave(rows, dim=0)
        elif not warped:
            fine_factor = max(factor // 2, 1)
            self.fine_step = factor // fine_factor
            self.fine_shape = level_shape(fixed.image.shape[2:], fine_factor)
            self.fine_moving = moving.at(fine_factor, rows)

    def mask_foreground(self, threshold: float, margin: int) -> None:
        """Count only voxels where fixed or moving is foreground, grown by ``margin`` voxels.

        Background holds only noise: fitting it would bend the field there for nothing.
        """
        inside = ((self.fixed > threshold) | (self.moving_level() > threshold)).to(self.fixed.dtype)
        if margin > 0:
            pool = getattr(nnf, f"max_pool{len(self.shape)}d")
            inside = pool(inside, 2 * margin + 1, stride=1, padding=margin)
        self.mask = inside

    def sample_voxels(self, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``sampling`` of the level's voxels, drawn uniformly with replacement.

        Returns:
            their normalised points ``(1, n, *P)`` and flat indices ``(prod(P),)``. The points are
            laid out as a grid ``P = (m, 2, ..., 2)`` so that :func:`firekit.core.spatial.warp` and the
            similarity's ``compare`` take them like any image (see :func:`points_offset`).
        """
        ndim = len(self.shape)
        per_row = 2 ** (ndim - 1)
        rows = max(math.ceil(self.sampling * math.prod(self.shape) / per_row), 2)
        index = torch.randint(math.prod(self.shape), (rows * per_row,), generator=generator,
                              device=self.fixed.device)
        # In memory order, consecutive samples read nearby memory: resampling is 2-3x faster on a CPU.
        index = index.sort().values
        points = spatial.identity_grid(self.shape, like=self.fixed).flatten(2)[:, :, index]
        return points.view(1, ndim, rows, *([2] * (ndim - 1))), index

    def loss(self, motion: Callable[[tuple[int, ...] | torch.Tensor], torch.Tensor],
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Similarity ``(B,)`` to fixed of moving warped by a transform.

        Args:
            motion: ``motion(where)`` is the displacement with which :func:`firekit.core.spatial.warp`
                samples the transformed points. ``where`` is a grid shape (every voxel of the
                level's grid, or of the twice finer one), for which it is the transform's
                displacement ``(B, n, *shape)``; or, when sampling, normalised points
                ``(1, n, *P)`` laid out as a grid (see :meth:`sample_voxels`). Each is thus
                evaluated where it is needed, without resampling.
            generator: draws the voxel sample when ``sampling`` < 1.
        """
        if self.sampling < 1:
            points, index = self.sample_voxels(generator)

            def gather(image: torch.Tensor) -> torch.Tensor:
                return image.flatten(2)[:, :, index].view(*image.shape[:2], *points.shape[2:])

            displacement = motion(points)
            warped = spatial.warp(self.moving_features, displacement)
            return self._compare(warped, gather(self.fixed_features), displacement, gather)
        if self.moving_features is not None:
            displacement = motion(self.shape)
            warped = spatial.warp(self.moving_features, displacement)
        elif self.smooth_moving is not None:
            displacement = motion(self.shape)
            warped = self.similarity.features(spatial.warp(self.smooth_moving, displacement))
        else:
            fine = spatial.warp(self.fine_moving, motion(self.fine_shape))
            warped = self.similarity.features(downsample(fine, self.fine_step, self.shape))
            displacement = motion(self.shape) if self.moving_weight is not None or self.view is not None else None
        return self._compare(warped, self.fixed_features, displacement)

    def _compare(self, warped: torch.Tensor, fixed_features: torch.Tensor, displacement: torch.Tensor | None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The similarity ``(B,)`` over the regions; outside moving's view at ``outside_cost`` (see
        :class:`RefineConfig`)."""
        weights = self._weights(displacement, gather)
        if self.view is None:
            return self.similarity.compare(warped, fixed_features, weights)
        with torch.no_grad():
            inside = spatial.warp(self.view, displacement.detach(), padding_mode="zeros")
            inside = torch.where(self.cut.view(-1, *[1] * (inside.ndim - 1)), inside, torch.ones_like(inside))
            counted = inside if weights is None else weights * inside
            total = torch.ones_like(inside) if weights is None else weights.expand_as(inside)
            fraction = counted.flatten(1).sum(1) / total.flatten(1).sum(1).clamp_min(1e-8)
        mean_inside = self.similarity.compare(warped, fixed_features, counted)
        return mean_inside * (fraction + self.outside_cost * (1 - fraction))

    def _weights(self, displacement: torch.Tensor | None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
        """The voxel weights ``(B, 1, *P)`` of one :meth:`loss` (None: every voxel counts alike)."""
        parts = [part if part is None or gather is None else gather(part) for part in (self.mask, self.fixed_weight)]
        if self.moving_weight is not None:
            with torch.no_grad():
                parts.append(spatial.warp(self.moving_weight, displacement.detach(), padding_mode="zeros"))
        parts = [part for part in parts if part is not None]
        return None if not parts else math.prod(parts[1:], start=parts[0])


def points_offset(points: torch.Tensor) -> torch.Tensor:
    """The displacement with which :func:`firekit.core.spatial.warp` samples at ``points`` ``(B, n, *P)``.

    ``warp`` samples at the identity grid of the displacement's layout plus the displacement, so
    normalised points laid out as any grid are sampled exactly through it.
    """
    return points - spatial.identity_grid(points.shape[2:], like=points)


def log_progress(progress: bool, message: str) -> None:
    """One line of the refinement's progress on stderr, when ``progress``."""
    if progress:
        print(f"[refine] {message}", file=sys.stderr, flush=True)


def step_rate(rate: float, step: int, steps: int, final: float) -> float:
    """Adam's rate at ``step`` of a level of ``steps``: a cosine from ``rate`` down to ``final * rate``.

    Adam moves each parameter by about its rate per step whatever the gradient, so a constant rate
    leaves it jittering about the optimum (0.01 normalised is ~0.6 voxel on 128 voxels), the more so
    on a sampled, noisy similarity; a decaying one lets each level settle (elastix's gains decay
    too). ``final`` 1: constant.
    """
    if steps <= 1 or final == 1:
        return rate
    return rate * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / (steps - 1))))
