"""The refinement stage: register one batch of pairs by optimising explicit parameters.

No network is trained here. Each pair's transform ``phi(x) = theta(x + u_nr(x))`` (the same
form as the network's, see :func:`firekit.core.spatial.compose_affine_displacement`) is fitted
directly to the images, in three steps, each a module of its own that :func:`refine` drives:

1. The moments search (:mod:`firekit.registration.moments`): centre of mass and principal axes of
   each image's foreground give the affine up to a rotation in the whitened frame; a set of
   candidate rotations (every proper signed axis permutation, composed with a scan of small
   rotations in each plane) is scored by the similarity at low resolution and the best are kept.
   Skipped when ``theta0`` is given.
2. The affine stage (:mod:`firekit.registration.affine_stage`): the affine is optimised with Adam
   on an image pyramid (MIND-SSC similarity by default), from the best ``starts`` candidates; the
   one best at full resolution is kept.
3. The non-rigid stage (:mod:`firekit.registration.field_stage`): a displacement ``u_nr`` on a
   control grid several times coarser than each pyramid level, upsampled linearly, is optimised
   with a diffusion or bending-energy penalty (:mod:`firekit.registration.regularisers`), coarse to
   fine, on the moving image already warped by the affine; each step may compare the images at a
   random sample of the voxels only (``RefineConfig.field_sampling``, used by the 3D preset).

Settings: :class:`~firekit.registration.presets.RefineConfig`; pyramids, regions and the similarity
of one level: :mod:`firekit.registration.levels`. Everything is written once for 2D and 3D and
works on a batch of ``B`` pairs at once (their losses are summed, so each pair's parameters see
only its own loss). Tensors follow :mod:`firekit.core.spatial`: images ``(B, C, *S)``,
displacements ``(B, n, *S)`` normalised, affines ``(B, n, n + 1)`` normalised,
``warp(moving, displacement)`` aligns moving to fixed.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from firekit.core import spatial
from firekit.core.errors import FirekitError
from firekit.registration.affine_stage import optimise_affine
from firekit.registration.field_stage import optimise_field
from firekit.registration.levels import Pyramid, PyramidRegions, check_images, pyramid_regions
from firekit.registration.moments import moments_search
from firekit.registration.presets import RefineConfig

__all__ = ["RefineConfig", "RefineResult", "refine"]


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
            best candidate(s) of the moments search (:func:`~firekit.registration.moments.moments_init`).
        displacement0: optional ``(B, n, *s)`` starting non-rigid part ``u_nr`` (e.g. the network's
            flow at any resolution), normalised; kept and corrected by the regularised grid (or, with
            ``config.network_flow`` ``"grid"``, averaged onto it), for the pairs whose affine came
            from (the first of) ``theta0``.
        config: :class:`RefineConfig` (default :meth:`RefineConfig.preset` for the images' ndim).
        progress: print one line per level to stderr.
        fixed_mask, moving_mask: optional ``(B, 1, *S)`` weights in [0, 1] on each image's grid (a
            region of interest, 0 over a lesion or a structure to ignore): the similarity of the
            moments search, the affine and the non-rigid stages counts only voxels inside both (as
            ANTs' ``-x`` and elastix's masks), the FFT shift search's too. The centres of mass ignore them.
        moving_view: optional ``(B, 1, *S_m)`` weights, where moving holds image data (its field of
            view when it was resampled onto a larger grid); used with ``config.outside_cost`` > 0.

    Returns:
        :class:`RefineResult`; ``warp(moving, result.displacement)`` is aligned with ``fixed``.
        On CPU the result is bitwise repeatable for a given ``config.seed``; on a GPU
        ``grid_sample``'s backward adds atomically, so the last bits may vary.
    """
    config = _checked_inputs(moving, fixed, theta0, displacement0, config)
    batch = fixed.shape[0]
    moving, fixed = moving.detach().to(fixed), fixed.detach()
    similarity = config.similarity_fn()
    history: dict = {"seconds": {}}
    moving_pyramid, fixed_pyramid = Pyramid(moving), Pyramid(fixed)
    regions = pyramid_regions(moving, fixed, moving_mask, fixed_mask, moving_view, config.outside_cost,
                              config.foreground, config.foreground_opening)
    # The voxel samples come from a generator of their own: the caller's random state is untouched.
    generator = torch.Generator(device=fixed.device).manual_seed(config.seed)
    clock = time.perf_counter()
    candidates = _starts(moving_pyramid, fixed_pyramid, theta0, config, regions, history)
    history["seconds"]["moments"] = time.perf_counter() - clock

    clock = time.perf_counter()
    theta, affine_history, winner = optimise_affine(candidates, moving_pyramid, fixed_pyramid, similarity, config,
                                                    progress, regions)
    if displacement0 is not None and bool((winner != 0).any()):
        # The starting flow belongs to the first start: pairs that kept another start drop it.
        keep_flow = (winner == 0).to(displacement0.dtype).view(-1, *[1] * (displacement0.ndim - 1))
        displacement0 = displacement0.to(fixed) * keep_flow.to(fixed)
    history["affine"] = torch.stack(affine_history) if affine_history else fixed.new_zeros(0, batch)
    history["seconds"]["affine"] = time.perf_counter() - clock

    clock = time.perf_counter()
    nonrigid, field_history, reg_history = optimise_field(
        moving, fixed_pyramid, theta, displacement0, config.similarity_fn("field"), config, progress, generator,
        regions)
    history["field"] = torch.stack(field_history) if field_history else fixed.new_zeros(0, batch)
    history["regulariser"] = torch.stack(reg_history) if reg_history else fixed.new_zeros(0, batch)
    with torch.no_grad():
        displacement = spatial.compose_affine_displacement(theta, nonrigid)
        warped = spatial.warp(moving, displacement)
    history["seconds"]["field"] = time.perf_counter() - clock
    start = candidates[torch.arange(batch, device=winner.device), winner]
    history["start"] = winner
    return RefineResult(theta, displacement, warped, history, nonrigid, start.detach().clone())


def _checked_inputs(moving: torch.Tensor, fixed: torch.Tensor, theta0: torch.Tensor | None,
                    displacement0: torch.Tensor | None, config: RefineConfig | None) -> RefineConfig:
    """:func:`refine`'s arguments checked; its config (the preset for the images' ndim when None)."""
    ndim = check_images(moving, fixed)
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
    return config


def _starts(moving: Pyramid, fixed: Pyramid, theta0: torch.Tensor | None, config: RefineConfig,
            regions: PyramidRegions, history: dict) -> torch.Tensor:
    """The affine stage's starts ``(B, K, n, n + 1)``: ``theta0`` as given, or the ``config.starts`` best of
    the moments search (weighed by the masks alone, not the field of view; its best score goes into
    ``history["moments"]``)."""
    if theta0 is None:
        masks = regions._replace(view=None, cut=None)  # the moments search weighs the masks alone
        candidates, scores = moments_search(moving, fixed, config, keep=config.starts, regions=masks)
        history["moments"] = scores[:, 0]
        return candidates
    candidates = theta0.detach().to(fixed.image)
    return candidates[:, None] if candidates.ndim == 3 else candidates
