"""Instance optimisation: register one batch of pairs by optimising explicit parameters.

No network is trained here. Each pair's transform ``phi(x) = theta(x + u_nr(x))`` (the same
form as the network's, see :func:`firekit.core.spatial.compose_affine_displacement`) is fitted
directly to the images, in three steps:

1. :func:`moments_init`: centre of mass and principal axes of each image's foreground give the
   affine up to a rotation in the whitened frame; a set of candidate rotations (every proper
   signed axis permutation, composed with a scan of small rotations in each plane) is scored by
   the similarity at low resolution and the best is kept. Skipped when ``theta0`` is given.
2. The affine is optimised with Adam on an image pyramid (MIND-SSC similarity by default),
   from the best ``starts`` candidates; the one best at full resolution is kept.
3. A displacement ``u_nr`` on a control grid several times coarser than each pyramid level,
   upsampled linearly, is optimised with a diffusion or bending-energy penalty, coarse to fine,
   on the moving image already warped by the affine; each step may compare the images at a
   random sample of the voxels only (``RefineConfig.field_sampling``, used by the 3D preset).

Everything is written once for 2D and 3D and works on a batch of ``B`` pairs at once (their
losses are summed, so each pair's parameters see only its own loss). Tensors follow
:mod:`firekit.core.spatial`: images ``(B, C, *S)``, displacements ``(B, n, *S)`` normalised,
affines ``(B, n, n + 1)`` normalised, ``warp(moving, displacement)`` aligns moving to fixed.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as nnf

from firekit.core import spatial
from firekit.core.config import PlainConfig
from firekit.registration.check import ORIENTATIONS, AffineBounds, plausible_mask, default_bounds
from firekit.core.errors import FirekitError
from firekit.core.similarity import SIMILARITIES, Similarity, box_filter, get_similarity

__all__ = [
    "RefineConfig",
    "RefineResult",
    "moments_init",
    "moment_candidates",
    "cut_by_view",
    "refine",
    "diffusion_energy",
    "bending_energy_per_sample",
    "candidate_rotations",
    "downsample",
]

# Per-ndim settings, tuned on demo-style pairs (T2-like moving -> T1 fixed; see FINDINGS.md,
# "Explicit per-pair optimisation beats ANTs on a CPU"). 2D: 128 x 160 slices; 3D: 128 x 160 x 128.
_PRESETS: dict[int, dict] = {
    2: dict(
        scan_angles=tuple(float(a) for a in range(-40, 41, 10)),
        affine_levels=(4, 2), affine_iterations=(40, 20),
        field_levels=(2, 1), field_iterations=(60, 40),
        # Diffusion matched or beat bending (0.811 vs 0.805 mean Dice) and never folded; with
        # bending, the foreground mask is needed to stop folds in noisy background near borders.
        grid_spacing=6, regulariser="diffusion", weight=0.3, field_mask=False,
        # The start's search (bench/gross_failures.md): centre-of-mass candidates on a grid of
        # per-axis scales and four distinct starts for the affine stage (together: --no-network from
        # 11 to 1 gross failure in 120 protocol pairs, 0.1 s more per pair).
        scan_scales=(0.6, 0.8, 1.0, 1.25, 1.6, 2.0), starts=4,
        # The FFT shift search for the 32 best candidates, as a family with starts of its own (a
        # field of view that cuts the moving brain misplaces the centres of mass; mixed into one
        # ranking, the shifts pulled near-round vertex slices off, Dice 0.93 -> 0.58). With the
        # opened foreground (RefineConfig.foreground_opening): --no-network from 10 to 0 gross
        # failures in 504 protocol pairs (bench/gross_failures.md).
        shift_reach=0.2,
        # Points taken beyond a cut moving foreground's field of view are left out of the similarity
        # (a real head stretched past the field of view: 12.8 -> 3.6 mm; 504 protocol pairs: 0 gross).
        outside_cost=1.0,
    ),
    3: dict(
        # Each axis permutation also turned by +-10 degrees in each plane.
        # Judged at 1/5 size (scan_size 24; 1/8 turned a PD-like pair by 20 deg, EPE 32 mm -> 1.2 mm),
        # with a grid of per-axis scales for the centre-of-mass candidates.
        scan_angles=(-10.0, 0.0, 10.0), scan_size=24, starts=1, scan_scales=(0.7, 1.0, 1.4),
        # Exact MIND at 1/4 size, moving smoothed before sampling (2.3x faster steps, same Dice).
        # A level at 1/2 costs 0.5 s a step; one at 1/8 first fell into wrong rotations.
        affine_levels=(4,), affine_iterations=(50,), affine_smooth_first=True,
        # 2-5 % of the voxels per step matched every voxel (within 0.003 Dice) at 1/7 of the cost.
        # The full-resolution level: +0.02 mean Dice (CSF, GM), EPE -0.3 mm, 2.1x the time
        # (bench/refine_3d.md); still several times faster than ANTs SyN (bench/results.md).
        field_levels=(4, 2, 1), field_iterations=(60, 40, 20), field_sampling=0.03,
        # Bending let 3D fields fold near the borders; the mask cost 0.01 Dice here. Weight 0.1
        # beat 0.3 by 0.003 mean Dice and 0.3 mm EPE (GM, WM up; CSF, whose outer edge T1 hides, down).
        grid_spacing=4, regulariser="diffusion", weight=0.1, field_mask=False,
    ),
}


# What changes when the affine stage also starts from a network's affine (``RefineConfig.preset(ndim,
# start="network")``): the network's start is near the answer, so one moments start beside it and a
# shorter schedule reach the Dice of the whole schedule from moments (bench/training.md, "The network
# earns its place"). 3D registers from moments by default (the shipped 3D network is weaker).
_NETWORK_PRESETS: dict[int, dict] = {
    2: dict(network_starts=1, cut_network_starts=2, affine_iterations=(20, 10), field_iterations=(20, 20)),
    3: dict(),
}


@dataclass
class RefineConfig(PlainConfig):
    """Settings of :func:`refine`.

    The field defaults are a generic configuration (bending energy with a foreground mask);
    :meth:`preset` gives the settings tuned for 2D slices and 3D volumes, which :func:`refine`
    uses when given no config.

    Attributes:
        similarity: ``"mind"`` (multi-modal default), ``"ngf"``, ``"lncc"`` or ``"mse"``.
        mind_radius, mind_dilation: MIND-SSC patch half-width and neighbour distance (voxels of
            each pyramid level).
        ngf_eps: NGF edge threshold (intensity per voxel, images in [-1, 1]).
        lncc_window: LNCC window side (voxels of each level).
        affine_warp_features, field_warp_features: in the affine / non-rigid stage, compute the
            moving image's features once per level and resample them (fast) instead of
            recomputing them on the warped image at every step (exact, slower). In the affine
            stage the features are on moving's own grid, so MIND is off where the affine rotates
            or scales much (default False: exact); in the non-rigid stage they are computed on
            moving warped by the affine (default True). NGF, whose gradient vectors turn with
            the image, is always exact.
        affine_smooth_first: in the exact affine path, smooth moving once per level at full
            resolution (with the box fixed's level is smoothed with) and sample it straight onto
            the level grid at each step, instead of resampling it on a grid twice as fine and
            smoothing that down. About 2x faster steps in 3D; the smoothing box then stays
            aligned with moving's axes instead of turning with the affine. Default False.
        field_sampling: fraction of each non-rigid level's voxels at which the similarity is
            evaluated at each step (like ANTs' sampling percentage): a new uniform random sample
            (with replacement, from a generator seeded by ``seed``; the same voxels for every pair
            of a batch, so a pair's result does not depend on the others) every step, which makes
            the loss a noisy, unbiased estimate of the dense one and each step cheaper. 1 (default)
            uses every voxel. Applies only with warped features (``field_warp_features`` and a
            warpable similarity) and a pointwise similarity (not LNCC); otherwise every voxel is
            used. (The affine stage recomputes MIND at every step, which needs every voxel.)
        foreground: intensity above which a voxel of fixed counts as foreground (moments, mask).
        foreground_opening: the moments' foreground mask is opened by a cube this many voxels from
            its centre to its faces (erosion then dilation): specks of background noise above
            ``foreground``, spread over the whole field of view, otherwise pull the centres of mass
            to the grid's centre and swell the covariances. 0: off.
        outside_cost: how the affine and non-rigid stages count fixed's points that the transform
            takes outside moving's field of view, for pairs whose moving foreground reaches the edge
            of that view (the anatomy goes on beyond it: a head stretched past the field of view;
            :func:`cut_by_view`). 0: they compare with moving's replicated border, which pays the
            optimiser to shrink the anatomy back into view (a real head: 12.8 mm end-point error).
            k > 0: they are left out of the similarity (as ANTs and elastix drop samples outside
            the moving image) and cost k times the mean loss of the points inside instead (k > 1
            makes shrinking the overlap to its easiest part cost more). Default 0; the 2D preset 1
            (the real head: 3.6 mm; no gross failure in 504 protocol pairs; 3D not yet measured).
            Pairs whose foreground lies well inside
            its view (small vertex slices: there, leaving points out let the optimiser shrink the
            overlap) are scored as with 0.
        field_mask: the non-rigid similarity counts only the foreground of fixed or of moving
            after the affine, grown by ``mask_margin`` voxels of each level; the regulariser
            alone shapes the background.
        mask_margin: see ``field_mask``.
        scan_angles: rotations (degrees) tried in each plane of the whitened frame, on top of
            the proper signed axis permutations, when initialising from moments.
        scan_scales: the centre-of-mass candidates are also scaled by every combination of these
            factors along moving's axes, after their turn (a grid: ``len ** n`` per turn); () off.
        scan_stretches, scan_turns: a local search about the ``stretch_starts`` best moment
            candidates, ``search_rounds`` times: each is also tried stretched by each factor along
            each of fixed's axes and turned by each angle (degrees) in each plane, about fixed's
            centre of mass (foregrounds cut by the field of view, anatomy that changes shape, round
            outlines that leave the turn loose). Both () or ``stretch_starts`` 0: off.
        stretch_starts, search_rounds: see ``scan_stretches``.
        shift_reach: > 0: every moments candidate is first moved to the shift of fixed's grid its
            similarity prefers, up to this fraction of each axis, found for all shifts at once by FFT
            (MIND-SSC or MSE; the centres of mass misplace the answer when the field of view cuts
            the moving foreground), tried for the ``shift_starts`` best candidates; 0: off. The
            shifted candidates form a family of their own: the affine stage gets the ``starts``
            best distinct ones of each family (a shift at this resolution can pull a small,
            near-round foreground off; the unshifted family then keeps its own starts).
        start_spread: the ``starts`` candidates the affine stage refines differ from each other by
            more than this (largest difference of their normalised entries), so that they are
            distinct guesses, not one guess repeated.
        scan_size: the moment candidates are scored on images downsampled by the largest whole
            factor that keeps at least this many voxels along the shortest axis (never upsampled).
        starts: how many of the best moment candidates the affine stage refines at its first
            level; the one with the best full-resolution similarity goes on.
        network_starts: with a network's affine as a start too (``register`` with a model), how many
            of the best distinct moment candidates compete beside it.
        cut_network_starts: the same for pairs whose moving foreground reaches the edge of its field
            of view (:func:`cut_by_view`; the network learnt on whole brains, the moments search
            knows cut ones: a real head stretched past the field of view, 10.0 -> 6.0 mm).
        affine_levels: downsampling factor of each affine pyramid level, coarse to fine.
        affine_iterations: Adam steps at each affine level.
        affine_lr: Adam learning rate of the affine entries (normalised units).
        field_levels: downsampling factor of each non-rigid level, coarse to fine.
        field_iterations: Adam steps at each non-rigid level.
        field_lr: Adam learning rate of the control-grid displacements (normalised units).
        grid_spacing: control-grid spacing in voxels of each level.
        regulariser: ``"bending"`` (second derivatives) or ``"diffusion"`` (first derivatives),
            mean over control points, in normalised coordinates.
        diffeomorphic: the control grid holds a stationary velocity field whose flow
            (``spatial.integrate_velocity``, ``integration_steps`` squarings, on the control grid)
            is the non-rigid part: large motion (a contracting ventricle) without folding. The
            regulariser then acts on the velocity.
        weight: the regulariser's weight lambda.
        seed: seed of the voxel samples (and of any other random draw) while optimising, for
            reproducibility.
        orientation: ``"header"`` (default): trust the files' orientation; the moments start and
            the affine keep within :func:`firekit.registration.check.default_bounds` (no turn beyond 45 deg, no
            reflection, scales within a factor 3). ``"search-axes"``: also try every 90/180-degree
            turn and axis permutation (for files whose headers are wrong).
    """

    config_name = "refine config"

    similarity: str = "mind"
    mind_radius: int = 1
    mind_dilation: int = 1
    ngf_eps: float = 0.005
    lncc_window: int = 9
    affine_warp_features: bool = False
    affine_smooth_first: bool = False
    field_warp_features: bool = True
    field_sampling: float = 1.0
    outside_cost: float = 0.0
    field_mask: bool = True
    mask_margin: int = 2
    foreground: float = -0.9
    foreground_opening: int = 1
    scan_angles: tuple[float, ...] = tuple(float(a) for a in range(-40, 41, 10))
    scan_size: int = 32
    scan_scales: tuple[float, ...] = ()
    scan_stretches: tuple[float, ...] = (0.55, 0.7, 0.85, 1.2, 1.45, 1.8)
    scan_turns: tuple[float, ...] = (-16.0, -8.0, 8.0, 16.0)
    shift_reach: float = 0.0
    shift_starts: int = 32
    stretch_starts: int = 4
    search_rounds: int = 2
    start_spread: float = 0.1
    starts: int = 2
    network_starts: int = 1
    cut_network_starts: int = 1
    affine_levels: tuple[int, ...] = (4, 2)
    affine_iterations: tuple[int, ...] = (40, 20)
    affine_lr: float = 0.01
    field_levels: tuple[int, ...] = (2, 1)
    field_iterations: tuple[int, ...] = (60, 40)
    field_lr: float = 0.01
    grid_spacing: int = 4
    regulariser: str = "bending"
    weight: float = 3e-3
    diffeomorphic: bool = False
    integration_steps: int = 6
    seed: int = 0
    orientation: str = "header"

    def __post_init__(self):
        if self.orientation not in ORIENTATIONS:
            raise FirekitError(f"RefineConfig.orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        for name in ("scan_angles", "scan_scales", "scan_stretches", "scan_turns", "affine_levels",
                     "affine_iterations", "field_levels", "field_iterations"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.similarity not in SIMILARITIES:
            raise FirekitError(
                f"RefineConfig.similarity must be one of {sorted(SIMILARITIES)}, got {self.similarity!r}")
        if self.regulariser not in _REGULARISERS:
            raise FirekitError(
                f"RefineConfig.regulariser must be one of {sorted(_REGULARISERS)}, got {self.regulariser!r}")
        for stage in ("affine", "field"):
            levels, iters = getattr(self, f"{stage}_levels"), getattr(self, f"{stage}_iterations")
            if len(levels) != len(iters) or any(int(f) < 1 for f in levels) or any(int(i) < 0 for i in iters):
                raise FirekitError(
                    f"RefineConfig.{stage}_levels (factors >= 1) and {stage}_iterations (>= 0) must have one "
                    f"entry per level, got {levels} and {iters}"
                )
        if (self.grid_spacing < 1 or self.scan_size < 4 or self.starts < 1 or self.network_starts < 1
                or self.cut_network_starts < 1):
            raise FirekitError(
                f"RefineConfig needs grid_spacing >= 1, scan_size >= 4, starts >= 1 and (cut_)network_starts >= 1, "
                f"got {self.grid_spacing}, {self.scan_size}, {self.starts}, {self.network_starts}, "
                f"{self.cut_network_starts}"
            )
        if self.outside_cost < 0:
            raise FirekitError(f"RefineConfig.outside_cost must be >= 0 (0: off), got {self.outside_cost}")
        if not 0 < self.field_sampling <= 1:
            raise FirekitError(f"RefineConfig.field_sampling must be a fraction in (0, 1], got {self.field_sampling}")
        if self.weight < 0 or self.affine_lr <= 0 or self.field_lr <= 0:
            raise FirekitError(
                f"RefineConfig needs weight >= 0 and positive learning rates, got weight {self.weight}, "
                f"affine_lr {self.affine_lr}, field_lr {self.field_lr}"
            )

    @classmethod
    def preset(cls, ndim: int, start: str = "moments", **overrides) -> "RefineConfig":
        """The tuned settings for 2D or 3D images, with any field overridden.

        ``start``: ``"moments"`` (the schedule from the moments search alone) or ``"network"`` (the
        shorter schedule tuned for when a network's affine and flow are a start too).
        """
        if ndim not in _PRESETS:
            raise FirekitError(f"RefineConfig presets exist for ndim 2 and 3, got {ndim}")
        if start not in ("moments", "network"):
            raise FirekitError(f"RefineConfig.preset start must be 'moments' or 'network', got {start!r}")
        network = _NETWORK_PRESETS[ndim] if start == "network" else {}
        return cls(**{**_PRESETS[ndim], **network, **overrides})


    def bounds(self, ndim: int) -> AffineBounds:
        """The :class:`~firekit.registration.check.AffineBounds` every affine of this refinement keeps within."""
        return default_bounds(ndim, self.orientation)

    def similarity_fn(self) -> Similarity:
        """The configured :class:`~firekit.core.similarity.Similarity`."""
        return get_similarity(self.similarity, radius=self.mind_radius, dilation=self.mind_dilation,
                              eps=self.ngf_eps, window=self.lncc_window)


class RefineResult(NamedTuple):
    """Output of :func:`refine`.

    Attributes:
        theta: ``(B, n, n + 1)`` fitted affine, normalised.
        displacement: ``(B, n, *S_fixed)`` normalised displacement of the whole transform
            ``phi = theta o (Id + u_nr)`` on the fixed grid: ``warp(moving, displacement)`` ~ fixed.
        warped: ``(B, C, *S_fixed)`` the moving image warped by ``displacement``.
        history: per-stage losses: ``"moments"`` ``(B,)`` score of the chosen candidate (absent
            when ``theta0`` was given); ``"affine"`` ``(steps, B)`` similarity; ``"field"`` and
            ``"regulariser"`` ``(steps, B)`` (the similarity on each step's voxel sample when
            ``field_sampling`` < 1); ``"seconds"`` a dict of wall time per stage.
        nonrigid: ``(B, n, *S_fixed)`` the non-rigid part ``u_nr`` alone, normalised.
        start: ``(B, n, n + 1)`` the affine the optimisation started from (``theta0``, or the best
            moments candidate), normalised; what :func:`firekit.registration.check.check` weighs the answer against.
    """

    theta: torch.Tensor
    displacement: torch.Tensor
    warped: torch.Tensor
    history: dict
    nonrigid: torch.Tensor
    start: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# helpers

# Voxels of candidate images scored at once by moments_init: small enough for the feature maps to
# stay in cache (4x faster on a CPU than 2^21 for 3D candidates at 32 x 40 x 32).
_SCORE_VOXELS = 1 << 16


def _check_images(moving: torch.Tensor, fixed: torch.Tensor) -> int:
    if fixed.ndim not in (4, 5) or fixed.shape[1] != 1:
        raise FirekitError(f"fixed must be (B, 1, *spatial) with 2 or 3 spatial dims, got {tuple(fixed.shape)}")
    if moving.ndim != fixed.ndim or moving.shape[1] != 1 or moving.shape[0] != fixed.shape[0]:
        raise FirekitError(
            f"moving must be (B, 1, *spatial) like fixed {tuple(fixed.shape)}, got {tuple(moving.shape)}"
        )
    if min(fixed.shape[2:]) < 4 or min(moving.shape[2:]) < 4:
        raise FirekitError(f"refine needs every spatial size >= 4, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
    return fixed.ndim - 2


def _level_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Grid whose voxels are ``factor`` times larger (same normalised extent), sizes >= 4."""
    return tuple(max(round((int(s) - 1) / factor) + 1, 4) for s in shape)


def downsample(image: torch.Tensor, factor: int, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Smooth with a box about ``factor`` voxels wide, then sample a coarser grid.

    Sampling with ``align_corners=True`` keeps every normalised point where it was (average
    pooling would shift the grid by half a voxel and shrink it slightly).

    Args:
        image: ``(B, C, *S)``.
        factor: the coarse grid's voxel size in voxels of ``image``.
        shape: the coarse grid (default ``_level_shape(S, factor)``).
    """
    shape = _level_shape(image.shape[2:], factor) if shape is None else tuple(shape)
    if factor == 1 and shape == tuple(image.shape[2:]):
        return image
    # A zero displacement on the coarse grid samples the image at the coarse grid's points.
    zero = image.new_zeros(image.shape[0], image.ndim - 2, *shape)
    return spatial.warp(box_filter(image, factor // 2), zero)


class _Pyramid:
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


class _Regions(NamedTuple):
    """Where the similarity counts: weights in [0, 1] on fixed's grid and on moving's (pyramids of
    ``(B, 1, *S)``; None: everywhere), and moving's field of view (see ``RefineConfig.outside_cost``).
    Moving's are carried by the transform, zero outside its grid."""

    fixed: _Pyramid | None = None
    moving: _Pyramid | None = None
    view: _Pyramid | None = None
    cut: torch.Tensor | None = None  # (B,) bool: the pairs whose view counts (moving cut by it)

    def after(self, displacement: torch.Tensor) -> "_Regions":
        """The regions once moving is warped by ``displacement`` (as the non-rigid stage sees it)."""
        moved = [None if r is None else _Pyramid(spatial.warp(r.image, displacement, padding_mode="zeros"))
                 for r in (self.moving, self.view)]
        return _Regions(self.fixed, *moved, self.cut)


def _regions(moving: torch.Tensor, fixed: torch.Tensor, moving_mask: torch.Tensor | None,
             fixed_mask: torch.Tensor | None, moving_view: torch.Tensor | None = None,
             outside_cost: float = 0.0, config_foreground: float = -0.9, opening: int = 1) -> _Regions:
    """The :class:`_Regions` of a registration: the masks given, and moving's field of view when
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
    return _Regions(*(None if r is None else _Pyramid(r.detach().to(fixed)) for r in (fixed_mask, moving_mask, view)),
                    cut)


def cut_by_view(moving: torch.Tensor, view: torch.Tensor, threshold: float, opening: int,
                 band: int = 2, share: float = 0.05) -> torch.Tensor:
    """``(B,)`` bool: whether moving's foreground (above ``threshold``, opened) covers more than ``share``
    of the ``band`` voxels along the edge of its field of view ``view`` ``(B, 1, *S)`` (1 inside): the
    anatomy goes on beyond the edge, so what lies outside is unknown, not background."""
    pool = getattr(nnf, f"max_pool{moving.ndim - 2}d")
    inside = view > 0.5
    outside = nnf.pad((~inside).float(), [band] * (2 * (moving.ndim - 2)), value=1.0)
    edge = inside & (pool(outside, 2 * band + 1, stride=1) > 0.5)
    foreground = _opened(moving > threshold, opening) & edge
    return foreground.flatten(1).sum(1) > share * edge.flatten(1).sum(1).clamp_min(1)


def diffusion_energy(displacement: torch.Tensor) -> torch.Tensor:
    """Mean over points of the squared first derivatives of a displacement, per sample.

    Args:
        displacement: ``(B, n, *S)`` normalised; derivatives are taken in normalised units
            (axis ``i`` has step ``2 / (S_i - 1)``), so the value does not depend on resolution.

    Returns:
        ``(B,)``; zero for a constant field.
    """
    ndim = displacement.ndim - 2
    total = displacement.new_zeros(displacement.shape[0])
    for axis in range(ndim):
        size = displacement.shape[2 + axis]
        diff = torch.diff(displacement, dim=2 + axis) * ((size - 1) / 2.0)
        total = total + diff.square().sum(dim=1).flatten(1).mean(dim=1)
    return total


def bending_energy_per_sample(displacement: torch.Tensor) -> torch.Tensor:
    """Mean over interior points of the bending energy, per sample (see :func:`firekit.fire.losses.bending_energy`).

    Args:
        displacement: ``(B, n, *S)`` normalised, every size >= 3; second derivatives are taken
            in normalised units, so the value does not depend on resolution.

    Returns:
        ``(B,)``; zero for any affine field. Its batch mean equals
        ``losses.bending_energy(displacement, reduction="mean")``.
    """
    ndim = displacement.ndim - 2
    shape = displacement.shape[2:]
    if min(shape) < 3:
        raise FirekitError(f"bending energy needs every spatial size >= 3, got {tuple(displacement.shape)}")

    def shifted(offsets: dict[int, int]) -> torch.Tensor:
        index = [slice(None), slice(None)]
        index += [slice(1 + offsets.get(axis, 0), size - 1 + offsets.get(axis, 0)) for axis, size in enumerate(shape)]
        return displacement[tuple(index)]

    scale = [(size - 1) / 2.0 for size in shape]  # 1 / step in normalised units
    centre = shifted({})
    energy = displacement.new_zeros(displacement.shape[0])
    for i in range(ndim):
        d_ii = (shifted({i: 1}) - 2 * centre + shifted({i: -1})) * scale[i] ** 2
        energy = energy + d_ii.square().sum(dim=1).flatten(1).mean(dim=1)
        for j in range(i + 1, ndim):
            d_ij = (shifted({i: 1, j: 1}) - shifted({i: 1, j: -1}) - shifted({i: -1, j: 1})
                    + shifted({i: -1, j: -1})) * (scale[i] * scale[j] / 4.0)
            energy = energy + 2 * d_ij.square().sum(dim=1).flatten(1).mean(dim=1)
    return energy


_REGULARISERS = {"bending": bending_energy_per_sample, "diffusion": diffusion_energy}


def candidate_rotations(ndim: int, angles: Sequence[float] = (0.0,)) -> torch.Tensor:
    """Rotations tried by :func:`moments_init` (see :func:`_candidate_rotations`); built once per setting."""
    return _candidate_rotations(int(ndim), tuple(float(a) for a in angles)).clone()


@functools.lru_cache(maxsize=16)
def _candidate_rotations(ndim: int, angles: tuple[float, ...]) -> torch.Tensor:
    """Rotations tried by :func:`moments_init` in the whitened frame.

    Every proper signed permutation of the axes (4 in 2D, 24 in 3D), each composed with a
    rotation by every angle of ``angles`` in each coordinate plane in turn (not their products).

    Args:
        ndim: 2 or 3.
        angles: degrees; 0 is always included.

    Returns:
        ``(K, n, n)`` float64, distinct rotation matrices.
    """
    signed = []
    for perm in itertools.permutations(range(ndim)):
        for signs in itertools.product((-1.0, 1.0), repeat=ndim):
            matrix = torch.zeros(ndim, ndim, dtype=torch.float64)
            for row, (col, sign) in enumerate(zip(perm, signs)):
                matrix[row, col] = sign
            if torch.linalg.det(matrix) > 0:
                signed.append(matrix)
    turns = [torch.eye(ndim, dtype=torch.float64), *_plane_turns(ndim, angles)]
    rotations = torch.stack([p @ t for p in signed for t in turns])
    # Drop duplicates (e.g. a 90-degree scan step reproduces a permutation).
    keep = []
    for k in range(rotations.shape[0]):
        if all((rotations[k] - rotations[j]).abs().max() > 1e-6 for j in keep):
            keep.append(k)
    return rotations[keep]


def _plane_turns(ndim: int, angles: Sequence[float]) -> list[torch.Tensor]:
    """``(n, n)`` float64 rotations by each non-zero angle (degrees) of ``angles`` in each coordinate
    plane in turn (not their products)."""
    turns = []
    for i, j in itertools.combinations(range(ndim), 2):
        for angle in angles:
            if float(angle) % 360.0 == 0.0:
                continue
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            turn = torch.eye(ndim, dtype=torch.float64)
            turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
            turns.append(turn)
    return turns


def _foreground_moments(image: torch.Tensor, threshold: float, opening: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre ``(B, n)`` and covariance ``(B, n, n)`` of ``image > threshold``, in voxel indices, after
    a morphological opening of that mask by a cube ``2 opening + 1`` voxels wide (0: none)."""
    ndim = image.ndim - 2
    mask = _opened(image > threshold, opening)[:, 0].double()  # (B, *S)
    counts = mask.flatten(1).sum(dim=1)  # (B,)
    if bool((counts < ndim + 1).any()):
        raise FirekitError(
            f"moments_init found (almost) no voxel above the foreground threshold {threshold}; "
            f"pass images in [-1, 1] or set RefineConfig.foreground"
        )

    def marginal(*axes: int) -> torch.Tensor:
        """The mask summed over every spatial axis but ``axes``: ``(B, *S[axes])``."""
        others = [1 + a for a in range(ndim) if a not in axes]
        return mask.sum(dim=others) if others else mask

    # Moments from the mask's 1- and 2-axis marginals: no grid of coordinates over the volume.
    indices = [torch.arange(size, dtype=mask.dtype, device=mask.device) for size in image.shape[2:]]
    centre = torch.stack([(marginal(i) * indices[i]).sum(dim=1) for i in range(ndim)], dim=1) / counts[:, None]
    offsets = [indices[i] - centre[:, i, None] for i in range(ndim)]  # (B, S_i) each
    cov = mask.new_zeros(mask.shape[0], ndim, ndim)
    for i in range(ndim):
        cov[:, i, i] = (marginal(i) * offsets[i].square()).sum(dim=1)
        for j in range(i + 1, ndim):
            cov[:, i, j] = cov[:, j, i] = torch.einsum("bk,bkl,bl->b", offsets[i], marginal(i, j), offsets[j])
    return centre, cov / counts[:, None, None]


def _opened(mask: torch.Tensor, radius: int) -> torch.Tensor:
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


def _sqrt_and_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of SPD matrices ``(B, n, n)`` and its inverse."""
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(values.amax(dim=-1, keepdim=True) * 1e-6 + 1e-12).sqrt()
    root = vectors @ torch.diag_embed(values) @ vectors.transpose(-1, -2)
    inverse = vectors @ torch.diag_embed(1.0 / values) @ vectors.transpose(-1, -2)
    return root, inverse


def _voxel_to_normalised_between(matrix: torch.Tensor, moving_shape, fixed_shape) -> torch.Tensor:
    """Voxel affine fixed -> moving (grids of different shapes) as a normalised ``theta``."""
    ndim = matrix.shape[1]
    # Rescale moving indices to fixed's index range; the normalised coordinates then agree.
    rescale = torch.tensor([(f - 1) / (m - 1) for m, f in zip(moving_shape, fixed_shape)],
                           dtype=matrix.dtype, device=matrix.device)
    return spatial.voxel_affine_to_normalised(matrix * rescale.view(1, ndim, 1), fixed_shape)


class _Weights(NamedTuple):
    """Region weights of the moments search at its scale: fixed's ``(B, 1, *s_f)`` (or None) and
    moving's ``(B, 1, *s_m)`` (or None), see :class:`_Regions`."""

    fixed: torch.Tensor | None
    moving: torch.Tensor | None

    def at(self, b: int, displacement: torch.Tensor) -> torch.Tensor | None:
        """Pair ``b``'s weights for moving warped by each displacement ``(K, n, *s_f)``: ``(K, 1, *s_f)``."""
        count = displacement.shape[0]
        weight = None if self.fixed is None else self.fixed[b:b + 1].expand(count, *self.fixed.shape[1:])
        if self.moving is not None:
            moved = spatial.warp(self.moving[b:b + 1].expand(count, *self.moving.shape[1:]), displacement,
                                 padding_mode="zeros")
            weight = moved if weight is None else weight * moved
        return weight


def _score_affines(moving: torch.Tensor, fixed_features: torch.Tensor, thetas: torch.Tensor,
                   similarity: Similarity, weights: _Weights | None = None) -> torch.Tensor:
    """Similarity of ``moving`` ``(B, 1, *s_m)`` warped by ``thetas`` ``(B, K, n, n+1)``: ``(B, K)``.

    ``weights``: fixed's ``(B, 1, *s_f)`` and moving's ``(B, 1, *s_m)`` region weights (see
    :class:`_Regions`), or None.
    """
    batch, count = thetas.shape[:2]
    shape = fixed_features.shape[2:]
    # Chunks of candidates keep the feature maps of all candidates from filling memory.
    chunk = max(1, _SCORE_VOXELS // math.prod(shape))
    scores = []
    for b in range(batch):
        for start in range(0, count, chunk):
            part = thetas[b, start:start + chunk]
            displacement = spatial.affine_to_displacement(part, shape)
            warped = spatial.warp(moving[b:b + 1].expand(part.shape[0], *moving.shape[1:]), displacement)
            target = fixed_features[b:b + 1].expand(part.shape[0], *fixed_features.shape[1:])
            scores.append(similarity.compare(similarity.features(warped), target,
                                             None if weights is None else weights.at(b, displacement)))
    return torch.cat(scores).view(batch, count)


def _centre_candidates(centre_m: torch.Tensor, centre_f: torch.Tensor, cov_m: torch.Tensor, cov_f: torch.Tensor,
                       angles: Sequence[float], scales: Sequence[float]) -> torch.Tensor:
    """Voxel affines ``(B, K, n, n+1)`` that match the foregrounds' centres and keep the headers' axes
    (what ANTs starts from: centres of mass, no axis search): turned by every angle of ``angles`` in
    each plane, and scaled uniformly by the ratio of the foregrounds' sizes or by every combination
    of ``scales`` along moving's axes after the turn, ``x_m = c_m + D R (x_f - c_f)`` (a foreground
    cut by the field of view misleads the moments)."""
    ndim = centre_m.shape[1]
    size = (torch.linalg.det(cov_m) / torch.linalg.det(cov_f)).clamp_min(1e-12) ** (0.5 / ndim)  # (B,)
    # Scan turns about the headers' axes only (a turn of 60 degrees or more is an axis permutation's job).
    turns = [torch.eye(ndim, dtype=torch.float64)] + [
        turn for turn in _plane_turns(ndim, angles) if float(torch.diagonal(turn).min()) > 0.5]
    turns = torch.stack(turns).to(cov_m)  # (T, n, n)
    grid = torch.tensor(list(itertools.product(*[[float(v) for v in scales]] * ndim)) if scales else [[1.0] * ndim],
                        dtype=cov_m.dtype, device=cov_m.device)  # (G, n)
    diagonal = torch.cat([torch.diag_embed(grid)[None].expand(size.shape[0], -1, -1, -1),
                          size[:, None, None, None] * torch.eye(ndim, dtype=cov_m.dtype)[None, None]], dim=1)
    linear = (diagonal[:, None] @ turns[None, :, None]).flatten(1, 2)  # (B, T * (G + 1), n, n)
    shift = centre_m[:, None] - (linear @ centre_f[:, None, :, None])[..., 0]
    return torch.cat([linear, shift[..., None]], dim=-1)


def _moment_candidates(moving: _Pyramid, fixed: _Pyramid, config: RefineConfig,
                       keep: int, regions: _Regions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best moment-based affines ``(B, keep, n, n+1)`` and their scores ``(B, keep)``.

    Candidates: the identity (the headers' alignment), the centres matched with the headers' axes
    (:func:`_centre_candidates`) and the principal axes matched under every rotation of
    :func:`candidate_rotations`; those outside ``config.bounds`` (a turn beyond the bound under
    ``orientation="header"``, a reflection, an extreme scale) are never kept unless nothing else is.
    ``regions`` (masks, :class:`_Regions`) weigh the similarity; with any, the FFT shift search is off.
    """
    ndim = fixed.image.ndim - 2
    moving_shape, fixed_shape = moving.image.shape[2:], fixed.image.shape[2:]
    voxel, centre_f = _moment_affines(moving.image, fixed.image, config)
    batch, count = voxel.shape[:2]
    thetas = _voxel_to_normalised_between(voxel.reshape(batch * count, ndim, ndim + 1), moving_shape,
                                          fixed_shape).reshape(batch, count, ndim, ndim + 1).to(fixed.image)
    # The identity competes too: it wins for pairs that are nearly aligned already.
    thetas = torch.cat([spatial.identity_affine(ndim, batch, like=thetas)[:, None], thetas], dim=1)
    similarity = config.similarity_fn()
    factor = max(1, min(fixed_shape) // config.scan_size)
    moving_small, fixed_features = moving.at(factor), similarity.features(fixed.at(factor))
    bounds = config.bounds(ndim)
    weights = None
    if regions is not None and (regions.fixed is not None or regions.moving is not None):
        weights = _Weights(*(None if r is None else r.at(factor) for r in regions[:2]))
    first = _rank(thetas, moving_small, fixed_features, similarity, fixed_shape, bounds, weights)
    search = partial(_local_search, centre_f=centre_f, moving_small=moving_small, fixed_features=fixed_features,
                     similarity=similarity, fixed_shape=fixed_shape, config=config, weights=weights)
    if (config.shift_reach <= 0 or config.shift_starts < 1 or not (similarity.pointwise and similarity.warpable)
            or weights is not None):
        return _diverse(*search(first), keep, config.start_spread)
    # The best candidates also compete moved to their best shifts (FFT), as a family of their own:
    # the unshifted keep starts too, since at this resolution a shift can pull a small, near-round
    # foreground off.
    top = first[0][:, : config.shift_starts]
    moved, moved_scores = _best_shifts(top, moving_small, fixed_features, similarity, config.shift_reach)
    shifted = search(_merge_ranked(first, _ranked(moved, moved_scores, fixed_shape, bounds)))
    if keep == 1:  # the shifted family holds the unshifted candidates too
        return _diverse(*shifted, 1, config.start_spread)
    families = [_diverse(*shifted, keep, config.start_spread), _diverse(*search(first), keep, config.start_spread)]
    return tuple(torch.cat(parts, dim=1) for parts in zip(*families))


def _local_search(ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], centre_f: torch.Tensor,
                  moving_small: torch.Tensor, fixed_features: torch.Tensor, similarity: Similarity, fixed_shape,
                  config: RefineConfig, weights: _Weights | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ranked`` candidates ``(thetas (B, K, n, n+1), scores, allowed)`` with the local search about
    the best of them merged in, ranked."""
    thetas, scores, allowed = ranked
    ndim, batch = thetas.shape[-2], thetas.shape[0]
    bounds = config.bounds(ndim)
    if config.stretch_starts > 0 and (config.scan_stretches or config.scan_turns):
        # Moments misjudge an axis's scale when the foreground is cut by the field of view or the
        # anatomy changes shape along it, and a round outline leaves the turn loose: search about
        # the best candidates, stretched along each of fixed's axes and turned in each plane about
        # fixed's centre of mass, for a few rounds; the similarity judges every one.
        inner = _perturbations(centre_f, fixed_shape, config.scan_stretches, config.scan_turns).to(thetas)
        for _ in range(config.search_rounds):
            top = thetas[:, : config.stretch_starts]  # (B, k, n, n+1)
            k, count = top.shape[1], inner.shape[1]
            outer = top[:, :, None].expand(-1, -1, count, -1, -1).reshape(-1, ndim, ndim + 1)
            moved = spatial.compose_affines(outer, inner[:, None].expand(-1, k, -1, -1, -1).reshape(-1, ndim, ndim + 1))
            ranked = _rank(moved.view(batch, k * count, ndim, ndim + 1), moving_small, fixed_features, similarity,
                           fixed_shape, bounds, weights)
            thetas, scores, allowed = _merge_ranked((thetas, scores, allowed), ranked)
    return thetas, scores, allowed


def _moment_affines(moving: torch.Tensor, fixed: torch.Tensor,
                    config: RefineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel affines ``(B, K, n, n+1)`` (fixed voxel -> moving voxel) from the moments of the images'
    foregrounds (:func:`_foreground_moments`, opened by ``config.foreground_opening``), and fixed's
    centre ``(B, n)``."""
    ndim = fixed.ndim - 2
    centre_m, cov_m = _foreground_moments(moving, config.foreground, config.foreground_opening)
    centre_f, cov_f = _foreground_moments(fixed, config.foreground, config.foreground_opening)
    root_m, _ = _sqrt_and_inverse(cov_m)
    _, inv_root_f = _sqrt_and_inverse(cov_f)
    rotations = candidate_rotations(ndim, config.scan_angles).to(root_m)  # (K, n, n)
    # x_m = c_m + C_m^1/2 R C_f^-1/2 (x_f - c_f): maps fixed's foreground ellipsoid onto moving's.
    linear = root_m[:, None] @ rotations[None] @ inv_root_f[:, None]  # (B, K, n, n)
    shift = centre_m[:, None] - (linear @ centre_f[:, None, :, None])[..., 0]
    centred = _centre_candidates(centre_m, centre_f, cov_m, cov_f, config.scan_angles, config.scan_scales)
    return torch.cat([torch.cat([linear, shift[..., None]], dim=-1), centred], dim=1), centre_f


def _diverse(thetas: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor, keep: int,
             spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best ranked candidates per pair that differ from each other by more than
    ``spread`` (largest difference of their normalised entries), plausible ones only (the best
    candidate always); fewer distinct ones are padded with the next best."""
    batch, count = thetas.shape[:2]
    keep = max(1, min(keep, count))
    chosen = []
    for b in range(batch):
        picks = [0]
        for k in range(1, count):
            if len(picks) == keep:
                break
            if bool(allowed[b, k]) and all(float((thetas[b, k] - thetas[b, j]).abs().max()) > spread for j in picks):
                picks.append(k)
        picks += [k for k in range(count) if k not in picks][: keep - len(picks)]
        chosen.append(picks)
    index = torch.tensor(chosen, device=thetas.device)
    n = thetas.shape[2]
    return (torch.gather(thetas, 1, index.view(batch, keep, 1, 1).expand(-1, -1, n, n + 1)),
            torch.gather(scores, 1, index))


def _perturbations(centre: torch.Tensor, shape, stretches: Sequence[float], turns: Sequence[float]) -> torch.Tensor:
    """Normalised affines ``(B, P, n, n+1)`` on ``shape``: a stretch by each factor along each axis and
    a turn by each angle (degrees) in each plane, about ``centre`` ``(B, n)`` (voxel indices)."""
    ndim = centre.shape[1]
    linears = []
    for axis in range(ndim):
        for value in stretches:
            scale = torch.eye(ndim, dtype=torch.float64)
            scale[axis, axis] = float(value)
            linears.append(scale)
    linears += _plane_turns(ndim, turns)
    linear = torch.stack(linears)[None].to(centre.dtype).expand(centre.shape[0], -1, -1, -1)  # (B, P, n, n)
    shift = centre[:, None] - (linear @ centre[:, None, :, None])[..., 0]  # x -> c + L (x - c)
    voxel = torch.cat([linear, shift[..., None]], dim=-1)
    return spatial.voxel_affine_to_normalised(voxel.flatten(0, 1), shape).view_as(voxel)


def _best_shifts(thetas: torch.Tensor, moving_small: torch.Tensor, fixed_features: torch.Tensor,
                 similarity: Similarity, reach: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each candidate, the shift of fixed's grid that its similarity prefers, by FFT.

    Candidate ``theta`` ``(B, K, n, n+1)`` is tried as ``x -> theta(x + t)`` for every whole-voxel
    shift ``t`` of the low-resolution grid up to ``reach`` of each axis's size: the squared
    difference of the features (MIND-SSC, or the image for MSE) at every shift at once, from
    cross-correlations computed by FFT on a grid padded by the reach (so the moving image is sampled
    there, not wrapped). The centres of mass misplace the answer when the field of view cuts the
    moving foreground: this finds it whatever the linear part.

    Returns:
        the shifted candidates ``(B, K, n, n+1)`` and their scores ``(B, K)`` (mean squared
        feature difference, as the similarity's own comparison without a mask, but for the features
        at the grid's border, which see the padded moving image).
    """
    batch, count, ndim = thetas.shape[0], thetas.shape[1], thetas.shape[2]
    shape = fixed_features.shape[2:]
    pad = [max(1, int(round(reach * int(size)))) for size in shape]
    big = [int(size) + 2 * p for size, p in zip(shape, pad)]
    # x in big-grid normalised units -> fixed-grid normalised: x * (big - 1) / (size - 1).
    stretch = torch.tensor([(b - 1) / (int(size) - 1) for b, size in zip(big, shape)], dtype=thetas.dtype,
                           device=thetas.device)
    chunk = max(1, _SCORE_VOXELS // math.prod(big))
    dims = tuple(range(-ndim, 0))
    padding = [v for p in reversed(pad) for v in (0, 2 * p)]  # fixed at the start of the padded grid
    fixed_spectrum = torch.fft.rfftn(nnf.pad(fixed_features, padding), dim=dims)
    fixed_energy = fixed_features.square().sum(dim=1).flatten(1).sum(dim=1)  # (B,)
    ones = torch.fft.rfftn(nnf.pad(torch.ones_like(fixed_features[:, :1]), padding), dim=dims)
    channels = fixed_features.shape[1]
    voxels = math.prod(int(size) for size in shape)
    shifted, scores = [], []
    for b in range(batch):
        for start in range(0, count, chunk):
            part = thetas[b, start:start + chunk]  # (k, n, n+1)
            on_big = part.clone()
            on_big[:, :, :ndim] = part[:, :, :ndim] * stretch  # theta o (x -> stretch x)
            warped = spatial.warp(moving_small[b:b + 1].expand(part.shape[0], *moving_small.shape[1:]),
                                  spatial.affine_to_displacement(on_big, big))
            features = similarity.features(warped)  # (k, C, *big)
            spectrum = torch.fft.rfftn(features, dim=dims)
            cross = torch.fft.irfftn(spectrum * fixed_spectrum[b:b + 1].conj(), s=big, dim=dims).sum(dim=1)
            energy = torch.fft.irfftn(torch.fft.rfftn(features.square().sum(dim=1, keepdim=True), dim=dims)
                                      * ones[b:b + 1].conj(), s=big, dim=dims)[:, 0]
            window = tuple(slice(0, 2 * p + 1) for p in pad)
            ssd = (fixed_energy[b] - 2 * cross[(slice(None), *window)] + energy[(slice(None), *window)])
            ssd = ssd.flatten(1) / (voxels * channels)
            best, where = ssd.min(dim=1)
            index = torch.stack(torch.unravel_index(where, tuple(2 * p + 1 for p in pad)), dim=1)  # (k, n)
            offset = index.to(part.dtype) - torch.tensor(pad, dtype=part.dtype, device=part.device)  # voxels
            step = offset * 2.0 / torch.tensor([int(size) - 1 for size in shape], dtype=part.dtype,
                                               device=part.device)  # normalised fixed units
            moved = part.clone()
            moved[:, :, ndim] = part[:, :, ndim] + (part[:, :, :ndim] @ step[..., None])[..., 0]
            shifted.append(moved)
            scores.append(best)
    return torch.cat(shifted).view_as(thetas), torch.cat(scores).view(batch, count)


def _rank(thetas: torch.Tensor, moving_small: torch.Tensor, fixed_features: torch.Tensor, similarity: Similarity,
          fixed_shape, bounds: AffineBounds,
          weights: _Weights | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates ``(B, K, n, n+1)`` sorted best first by the similarity at low resolution, those
    outside ``bounds`` after every plausible one: ``(thetas, scores (B, K), allowed (B, K))``."""
    with torch.no_grad():
        scores = _score_affines(moving_small, fixed_features, thetas, similarity, weights)
    return _ranked(thetas, scores, fixed_shape, bounds)


def _ranked(thetas: torch.Tensor, scores: torch.Tensor, fixed_shape,
            bounds: AffineBounds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scored candidates ``(B, K, n, n+1)``, ``(B, K)`` sorted as :func:`_rank` sorts them."""
    batch, count = thetas.shape[:2]
    allowed = plausible_mask(thetas.flatten(0, 1), fixed_shape, bounds).view(batch, count).to(thetas.device)
    return _sort_ranked(thetas, scores, allowed)


def _sort_ranked(thetas, scores, allowed):
    penalty = torch.where(allowed, torch.zeros_like(scores), torch.full_like(scores, 1e6))
    order = (scores + penalty).argsort(dim=1)
    n = thetas.shape[2]
    return (torch.gather(thetas, 1, order.view(*order.shape, 1, 1).expand(-1, -1, n, n + 1)),
            torch.gather(scores, 1, order), torch.gather(allowed, 1, order))


def _merge_ranked(first, second):
    """Two ranked candidate sets as one, ranked."""
    return _sort_ranked(*(torch.cat([a, b], dim=1) for a, b in zip(first, second)))


def moment_candidates(moving: torch.Tensor, fixed: torch.Tensor, config: RefineConfig, keep: int,
                      fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``keep`` best distinct starts ``(B, keep, n, n + 1)`` of ``config``'s moments search
    (see :func:`moments_init`), for :func:`refine`'s ``theta0``; the masks as :func:`refine` takes them."""
    _check_images(moving, fixed)
    moving = moving.detach().to(fixed)
    regions = _regions(moving, fixed, moving_mask, fixed_mask)
    best, _ = _moment_candidates(_Pyramid(moving), _Pyramid(fixed.detach()), config, keep=keep, regions=regions)
    return best


def moments_init(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    similarity: str = "mind",
    angles: Sequence[float] | None = None,
    foreground: float = -0.9,
    scan_size: int = 32,
    orientation: str = "header",
) -> torch.Tensor:
    """Affine pre-alignment from the foreground's centre of mass and principal axes.

    The moments fix the affine up to a rotation ``R`` in the whitened frame
    (``x_m = c_m + C_m^1/2 R C_f^-1/2 (x_f - c_f)``, covariances in voxel units, so grids with
    axes of different sizes are handled); every candidate ``R`` of :func:`candidate_rotations`
    (and the identity) is scored by ``similarity`` at low resolution and the best kept per sample.

    Args:
        moving: ``(B, 1, *S_m)`` images in [-1, 1] (background near -1).
        fixed: ``(B, 1, *S_f)``.
        similarity: a key of :data:`firekit.core.similarity.SIMILARITIES`.
        angles: degrees scanned in each plane (default: :meth:`RefineConfig.preset`'s: in 2D every
            10 deg from -40 to 40, which with the 90-degree turns covers the circle; in 3D
            -10 and 10 deg, on top of the 24 axis permutations).
        foreground: intensity above which a voxel is foreground.
        scan_size: candidates are scored on fixed downsampled by ``min(S_f) // scan_size`` (>= 1).
        orientation: ``"header"`` keeps to candidates within :func:`firekit.registration.check.default_bounds`
            (judged on fixed's grid: exact when both images share a grid of isotropic voxels, as
            ``register`` gives them); ``"search-axes"`` also tries 90/180-degree turns.

    Returns:
        ``(B, n, n + 1)`` normalised ``theta`` (fixed point -> moving point):
        ``warp(moving, affine_to_displacement(theta, S_f))`` is roughly aligned with ``fixed``.
    """
    ndim = _check_images(moving, fixed)
    overrides = dict(similarity=similarity, foreground=foreground, scan_size=scan_size, orientation=orientation)
    if angles is not None:
        overrides["scan_angles"] = tuple(angles)
    best, _ = _moment_candidates(_Pyramid(moving.detach().to(fixed)), _Pyramid(fixed.detach()),
                                 RefineConfig.preset(ndim, **overrides), keep=1)
    return best[:, 0]


# --------------------------------------------------------------------------------------------
# optimisation


class _Level:
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

    def __init__(self, moving: _Pyramid, fixed: _Pyramid, factor: int, similarity: Similarity,
                 warp_features: bool, sampling: float = 1.0, rows: int = 1, smooth_first: bool = False,
                 regions: _Regions | None = None, outside_cost: float = 0.0):
        self.shape = _level_shape(fixed.image.shape[2:], factor)
        regions = regions if regions is not None else _Regions()
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
            self.fine_shape = _level_shape(fixed.image.shape[2:], fine_factor)
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
            similarity's ``compare`` take them like any image (see :func:`_points_offset`).
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


def _points_offset(points: torch.Tensor) -> torch.Tensor:
    """The displacement with which :func:`firekit.core.spatial.warp` samples at ``points`` ``(B, n, *P)``.

    ``warp`` samples at the identity grid of the displacement's layout plus the displacement, so
    normalised points laid out as any grid are sampled exactly through it.
    """
    return points - spatial.identity_grid(points.shape[2:], like=points)


def _field_motion(grid: torch.Tensor, base: torch.Tensor | None,
                  where: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """Warp displacement (see :meth:`_Level.loss`) of ``u_nr``: ``grid`` upsampled linearly, plus ``base``."""
    if not isinstance(where, torch.Tensor):
        dense = spatial.resize_displacement(grid, where)
        return dense if base is None else dense + spatial.resize_displacement(base, where)
    # Linear upsampling with aligned corners is linear interpolation at the same normalised points.
    offset = _points_offset(where)
    moved = offset + spatial.warp(grid, offset)
    return moved if base is None else moved + spatial.warp(base, offset)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[refine] {message}", file=sys.stderr, flush=True)


def _optimise_affine(theta: torch.Tensor, moving: _Pyramid, fixed: _Pyramid, similarity: Similarity,
                     config: RefineConfig, progress: bool,
                     regions: _Regions | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Adam on the affine entries, coarse to fine, from ``K`` starts per pair.

    All starts are optimised at the first level; then only the one with the lowest similarity,
    judged at full resolution, goes on, so extra starts cost little.

    Args:
        theta: ``(B, K, n, n + 1)`` starting affines.
        moving, fixed: pyramids of the ``(B, 1, *S)`` images.

    Returns:
        the fitted ``(B, n, n + 1)``, the per-step similarity history, each ``(B,)`` (the kept
        start's at the first level), and which start each pair kept ``(B,)``.
    """
    batch, starts = theta.shape[:2]
    rows = torch.arange(batch, device=theta.device)
    flat = theta.detach().reshape(batch * starts, *theta.shape[2:])
    history: list[torch.Tensor] = []
    winner = torch.zeros(batch, dtype=torch.long, device=theta.device)
    levels = [(f, int(n)) for f, n in zip(config.affine_levels, config.affine_iterations) if int(n) > 0]
    if not levels:
        return theta[:, 0].detach().clone(), history, winner
    for factor, steps in levels:
        repeat = flat.shape[0] // batch
        level = _Level(moving, fixed, factor, similarity, config.affine_warp_features, rows=repeat,
                       smooth_first=config.affine_smooth_first, regions=regions, outside_cost=config.outside_cost)
        param = flat.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([param], lr=config.affine_lr)
        level_history = []
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            losses = level.loss(partial(spatial.affine_to_displacement, param))
            losses.sum().backward()
            optimiser.step()
            level_history.append(losses.detach())
        flat = param.detach()
        if repeat > 1:
            # Judged at full resolution: a coarse level can prefer a start that is worse there.
            judge = _Level(moving, fixed, 1, similarity, warp_features=False, rows=repeat, regions=regions,
                           outside_cost=config.outside_cost)
            with torch.no_grad():
                final = judge.loss(partial(spatial.affine_to_displacement, flat)).view(batch, repeat)
            # A start that drifted out of the bounds loses to any that stayed inside.
            allowed = plausible_mask(flat, fixed.image.shape[2:], config.bounds(fixed.image.ndim - 2))
            final = torch.where(allowed.view(batch, repeat).to(final.device), final, final + 1e6)
            best = final.argmin(dim=1)
            flat = flat.view(batch, repeat, *flat.shape[1:])[rows, best]
            level_history = [h.view(batch, repeat)[rows, best] for h in level_history]
            winner = best
        history += level_history
        _log(progress, f"affine level {level.shape}: similarity {float(history[-1].mean()):.4f}")
    return flat, history, winner


def _grid_shape(shape: Sequence[int], spacing: int) -> tuple[int, ...]:
    """Control grid about ``spacing`` voxels apart covering the level grid, >= 3 points per axis."""
    return tuple(max(math.ceil((int(s) - 1) / spacing) + 1, 3) for s in shape)


def refine(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    theta0: torch.Tensor | None = None,
    displacement0: torch.Tensor | None = None,
    config: RefineConfig | None = None,
    progress: bool = False,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    moving_view: torch.Tensor | None = None,
) -> RefineResult:
    """Register ``moving`` to ``fixed`` by optimising an affine, then a smooth displacement.

    Args:
        moving: ``(B, 1, *S_m)`` images, intensities in [-1, 1] (background near -1).
        fixed: ``(B, 1, *S_f)``; the result lives on this grid. 2D or 3D, any device.
        theta0: optional ``(B, n, n + 1)`` starting affine (e.g. the network's), or ``(B, K, n, n + 1)``
            several starts (judged after the first affine level, see ``starts``); default: the
            best candidate(s) of :func:`moments_init`.
        displacement0: optional ``(B, n, *s)`` starting non-rigid part ``u_nr`` (e.g. the network's
            flow at any resolution), normalised; kept, and corrected by the regularised grid, for
            the pairs whose affine came from (the first of) ``theta0``.
        config: :class:`RefineConfig` (default :meth:`RefineConfig.preset` for the images' ndim).
        progress: print one line per level to stderr.
        fixed_mask, moving_mask: optional ``(B, 1, *S)`` weights in [0, 1] on each image's grid (a
            region of interest, 0 over a lesion or a structure to ignore): the similarity of the
            moments search, the affine and the non-rigid stages counts only voxels inside both (as
            ANTs' ``-x`` and elastix's masks). The moments themselves and the FFT shift search
            ignore the masks (the search is then off).
        moving_view: optional ``(B, 1, *S_m)`` weights, where moving holds image data (its field of
            view when it was resampled onto a larger grid); used with ``config.outside_cost`` > 0.

    Returns:
        :class:`RefineResult`; ``warp(moving, result.displacement)`` is aligned with ``fixed``.
        On CPU the result is bitwise repeatable for a given ``config.seed``; on a GPU
        ``grid_sample``'s backward adds atomically, so the last bits may vary.
    """
    ndim = _check_images(moving, fixed)
    config = config if config is not None else RefineConfig.preset(ndim)
    if not isinstance(config, RefineConfig):
        raise FirekitError(f"config must be a RefineConfig, got {type(config).__name__}")
    batch = fixed.shape[0]
    if theta0 is not None and (theta0.ndim not in (3, 4) or tuple(theta0.shape[:1]) != (batch,)
                               or tuple(theta0.shape[-2:]) != (ndim, ndim + 1)):
        raise FirekitError(f"theta0 must be ({batch}, {ndim}, {ndim + 1}) or ({batch}, K, {ndim}, {ndim + 1}), got "
                           f"{tuple(theta0.shape)}")
    if displacement0 is not None and (displacement0.ndim != ndim + 2 or displacement0.shape[:2] != (batch, ndim)):
        raise FirekitError(f"displacement0 must be ({batch}, {ndim}, *spatial), got {tuple(displacement0.shape)}")
    moving, fixed = moving.detach().to(fixed), fixed.detach()
    similarity = config.similarity_fn()
    history: dict = {"seconds": {}}
    moving_pyramid, fixed_pyramid = _Pyramid(moving), _Pyramid(fixed)
    regions = _regions(moving, fixed, moving_mask, fixed_mask, moving_view, config.outside_cost, config.foreground,
                       config.foreground_opening)
    masks = regions._replace(view=None, cut=None)  # the moments search weighs the masks alone
    # The voxel samples come from a generator of their own: the caller's random state is untouched.
    generator = torch.Generator(device=fixed.device).manual_seed(config.seed)
    clock = time.perf_counter()
    if theta0 is None:
        candidates, scores = _moment_candidates(moving_pyramid, fixed_pyramid, config, keep=config.starts,
                                                regions=masks)
        history["moments"] = scores[:, 0]
    else:
        candidates = theta0.detach().to(fixed)
        candidates = candidates[:, None] if candidates.ndim == 3 else candidates
    history["seconds"]["moments"] = time.perf_counter() - clock

    clock = time.perf_counter()
    theta, affine_history, winner = _optimise_affine(candidates, moving_pyramid, fixed_pyramid, similarity, config,
                                                     progress, regions)
    if displacement0 is not None and bool((winner != 0).any()):
        # The starting flow belongs to the first start: pairs that kept another start drop it.
        keep_flow = (winner == 0).to(displacement0.dtype).view(-1, *[1] * (displacement0.ndim - 1))
        displacement0 = displacement0.to(fixed) * keep_flow.to(fixed)
    history["affine"] = torch.stack(affine_history) if affine_history else fixed.new_zeros(0, batch)
    history["seconds"]["affine"] = time.perf_counter() - clock

    clock = time.perf_counter()
    nonrigid, field_history, reg_history = _optimise_field(
        moving, fixed_pyramid, theta, displacement0, similarity, config, progress, generator, regions)
    history["field"] = torch.stack(field_history) if field_history else fixed.new_zeros(0, batch)
    history["regulariser"] = torch.stack(reg_history) if reg_history else fixed.new_zeros(0, batch)
    with torch.no_grad():
        displacement = spatial.compose_affine_displacement(theta, nonrigid)
        warped = spatial.warp(moving, displacement)
    history["seconds"]["field"] = time.perf_counter() - clock
    start = candidates[torch.arange(batch, device=winner.device), winner]
    history["start"] = winner
    return RefineResult(theta, displacement, warped, history, nonrigid, start.detach().clone())


def _optimise_field(moving, fixed_pyramid, theta, displacement0, similarity, config, progress, generator=None,
                    regions=None):
    """Coarse-to-fine control-grid optimisation; returns ``u_nr`` on fixed's grid and histories.

    ``u_nr = displacement0 + linear upsampling of the control grid``; the grid starts at zero and
    is carried (resampled) from level to level, and only it is regularised, so a given
    ``displacement0`` is kept as it is and corrected smoothly. ``moving`` is the image,
    ``fixed_pyramid`` fixed's :class:`_Pyramid`; ``generator`` draws the voxel samples
    (``config.field_sampling``); ``regions`` (:class:`_Regions`) where the similarity counts.
    """
    fixed = fixed_pyramid.image
    shape = fixed.shape[2:]
    ndim = len(shape)
    batch = fixed.shape[0]
    regulariser = _REGULARISERS[config.regulariser]
    base = None if displacement0 is None else displacement0.detach().to(fixed)
    grid = moving_affine = None
    sim_history, reg_history = [], []
    for factor, steps in zip(config.field_levels, config.field_iterations):
        if int(steps) == 0:
            continue
        if moving_affine is None:
            # Warped by the affine once, at full resolution: the features then have fixed's
            # orientation and each level only resamples them by the small non-rigid part.
            affine = spatial.affine_to_displacement(theta, shape)
            moving_affine = _Pyramid(spatial.warp(moving, affine))
            regions_affine = None if regions is None else regions.after(affine)
        level = _Level(moving_affine, fixed_pyramid, factor, similarity, config.field_warp_features,
                       config.field_sampling, regions=regions_affine, outside_cost=config.outside_cost)
        if config.field_mask:
            level.mask_foreground(config.foreground, config.mask_margin)
        grid_shape = _grid_shape(level.shape, config.grid_spacing)
        if grid is None:
            param = fixed.new_zeros(batch, ndim, *grid_shape)
        else:
            # Linear resampling of a linearly interpolated grid keeps the field it represents.
            param = spatial.resize_displacement(grid, grid_shape).clone()
        param.requires_grad_(True)
        optimiser = torch.optim.Adam([param], lr=config.field_lr)
        for _ in range(int(steps)):
            optimiser.zero_grad(set_to_none=True)
            field = spatial.integrate_velocity(param, config.integration_steps) if config.diffeomorphic else param
            sim = level.loss(partial(_field_motion, field, base), generator)
            reg = regulariser(param)
            (sim + config.weight * reg).sum().backward()
            optimiser.step()
            sim_history.append(sim.detach())
            reg_history.append(reg.detach())
        grid = param.detach()
        _log(progress, f"field level {level.shape}: similarity {float(sim_history[-1].mean()):.4f}")
    nonrigid = fixed.new_zeros(batch, ndim, *shape)
    if base is not None:
        nonrigid = nonrigid + spatial.resize_displacement(base, shape)
    if grid is not None:
        if config.diffeomorphic:
            grid = spatial.integrate_velocity(grid, config.integration_steps)
        nonrigid = nonrigid + spatial.resize_displacement(grid, shape)
    return nonrigid, sim_history, reg_history
