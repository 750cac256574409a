"""The refinement's non-rigid stage: a regularised control grid, coarse to fine, on moving warped by
the affine.

Displacements are normalised ``(B, n, *S)``; ``u_nr`` is the non-rigid part of
``phi = theta o (Id + u_nr)`` on fixed's grid.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch

from firekit.core import spatial
from firekit.core.similarity import Similarity
from firekit.registration.levels import (Level, Pyramid, PyramidRegions, downsample, log_progress, points_offset,
                                         step_rate)
from firekit.registration.presets import RefineConfig
from firekit.registration.regularisers import REGULARISERS

__all__ = ["optimise_field"]


def _field_motion(grid: torch.Tensor, base: torch.Tensor | None,
                  where: tuple[int, ...] | torch.Tensor) -> torch.Tensor:
    """Warp displacement (see :meth:`Level.loss`) of ``u_nr``: ``grid`` upsampled linearly, plus ``base``."""
    if not isinstance(where, torch.Tensor):
        dense = spatial.resize_displacement(grid, where)
        return dense if base is None else dense + spatial.resize_displacement(base, where)
    # Linear upsampling with aligned corners is linear interpolation at the same normalised points.
    offset = points_offset(where)
    moved = offset + spatial.warp(grid, offset)
    return moved if base is None else moved + spatial.warp(base, offset)


def _grid_shape(shape: Sequence[int], spacing: int) -> tuple[int, ...]:
    """Control grid about ``spacing`` voxels apart covering the level grid, >= 3 points per axis."""
    return tuple(max(math.ceil((int(s) - 1) / spacing) + 1, 3) for s in shape)


def optimise_field(moving: torch.Tensor, fixed_pyramid: Pyramid, theta: torch.Tensor,
                   displacement0: torch.Tensor | None, similarity: Similarity, config: RefineConfig, progress: bool,
                   generator: torch.Generator | None = None, regions: PyramidRegions | None = None,
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Coarse-to-fine control-grid optimisation; returns ``u_nr`` on fixed's grid and histories.

    ``u_nr = displacement0 + linear upsampling of the control grid``; the grid starts at zero and
    is carried (resampled) from level to level, and only it is regularised, so a given
    ``displacement0`` is kept as it is and corrected smoothly (``config.network_flow`` ``"keep"``);
    with ``"grid"`` the first grid is ``displacement0`` averaged onto it instead, and ``u_nr`` is the
    grid alone. ``moving`` is the image,
    ``fixed_pyramid`` fixed's :class:`Pyramid`; ``generator`` draws the voxel samples
    (``config.field_sampling``); ``regions`` (:class:`PyramidRegions`) where the similarity counts.
    """
    fixed = fixed_pyramid.image
    shape = fixed.shape[2:]
    ndim = len(shape)
    batch = fixed.shape[0]
    regulariser = REGULARISERS[config.regulariser]
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
            moving_affine = Pyramid(spatial.warp(moving, affine))
            regions_affine = None if regions is None else regions.after(affine)
        level = Level(moving_affine, fixed_pyramid, factor, similarity, config.field_warp_features,
                       config.field_sampling, regions=regions_affine, outside_cost=config.outside_cost)
        if config.field_mask:
            level.mask_foreground(config.foreground, config.mask_margin)
        grid_shape = _grid_shape(level.shape, config.grid_spacing)
        if grid is None and base is not None and config.network_flow == "grid":
            # The starting flow becomes the first control grid (averaged onto it by downsample's box):
            # regularised and corrected like the rest, instead of kept as a fixed base.
            param = spatial.resize_displacement(downsample(base, max(round(base.shape[2] / grid_shape[0]), 1)),
                                                grid_shape).clone()
            base = None
        elif grid is None:
            param = fixed.new_zeros(batch, ndim, *grid_shape)
        else:
            # Linear resampling of a linearly interpolated grid keeps the field it represents.
            param = spatial.resize_displacement(grid, grid_shape).clone()
        param.requires_grad_(True)
        optimiser = torch.optim.Adam([param], lr=config.field_lr)
        for step in range(int(steps)):
            optimiser.param_groups[0]["lr"] = step_rate(config.field_lr, step, int(steps), config.final_rate)
            optimiser.zero_grad(set_to_none=True)
            field = spatial.integrate_velocity(param, config.integration_steps) if config.diffeomorphic else param
            sim = level.loss(partial(_field_motion, field, base), generator)
            reg = regulariser(param)
            (sim + config.weight * reg).sum().backward()
            optimiser.step()
            sim_history.append(sim.detach())
            reg_history.append(reg.detach())
        grid = param.detach()
        log_progress(progress, f"field level {level.shape}: similarity {float(sim_history[-1].mean()):.4f}")
    nonrigid = fixed.new_zeros(batch, ndim, *shape)
    if base is not None:
        nonrigid = nonrigid + spatial.resize_displacement(base, shape)
    if grid is not None:
        if config.diffeomorphic:
            grid = spatial.integrate_velocity(grid, config.integration_steps)
        nonrigid = nonrigid + spatial.resize_displacement(grid, shape)
    return nonrigid, sim_history, reg_history
