"""The network stage: FIRE's G and one transformation net T on normalised ``(B, 1, *S)`` tensors,
given its start (the moments pre-alignment, :func:`firekit.registration.start.network_start`).

Answers are normalised (:mod:`firekit.core.spatial`): affines ``(B, n, n + 1)``, displacements
``(B, n, *S)``. A model trained at a coarser spacing runs on a coarser copy of the grid
(:func:`network_factor`); a 2D model on a 3D volume runs slice by slice (:func:`network_slices`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from firekit.core import spatial
from firekit.data import io
from firekit.fire.model import Fire, Registration
from firekit.registration.levels import downsample
from firekit.registration.start import network_start

__all__ = ["NetworkAnswer", "register_from_start", "network_factor", "run_network", "network_slices", "synthesise"]


class NetworkAnswer(NamedTuple):
    """The network's registration of ``(B, 1, *S)`` images, normalised, on ``S``."""

    theta: torch.Tensor  # (B, n, n + 1) the affine part
    displacement: torch.Tensor  # (B, n, *S) the whole transform
    warped: torch.Tensor  # (B, 1, *S) moving warped by it
    flow: torch.Tensor | None  # (B, n, *s) the non-rigid part on G's grid; None when affine-only


def register_from_start(model: Fire, moving: torch.Tensor, fixed: torch.Tensor, direction: str = "a2b",
                        affine_only: bool = False) -> Registration:
    """:meth:`Fire.register` of ``(B, C, *S)`` tensors from the model's own start
    (:func:`~firekit.registration.start.network_start`: the moments pre-alignment, or none)."""
    return model.register(moving, fixed, direction, affine_only,
                          theta0=network_start(model.config, moving, fixed, direction))


def network_factor(model: Fire | None, shape: Sequence[int], grid_affine: np.ndarray) -> int:
    """How many times coarser than the registration grid the model runs: its training spacing
    (``model.spacing``, from the checkpoint) over the grid's finest spacing, rounded; 1 when unknown,
    finer, or when the coarse grid would fall below the model's minimum size."""
    if model is None or not model.spacing:
        return 1
    factor = max(1, round(model.spacing / float(io.spacing(grid_affine).min())))
    while factor > 1 and min(shape) / factor < model.min_size:
        factor -= 1
    return factor


def _coarse_shape(shape: Sequence[int], factor: int, multiple: int, min_size: int) -> tuple[int, ...]:
    """``shape`` divided by ``factor``, rounded to a multiple of ``multiple`` and at least ``min_size``."""
    return tuple(max(min_size, multiple * max(1, round(s / factor / multiple))) for s in shape)


def run_network(model: Fire, x_moving: torch.Tensor, x_fixed: torch.Tensor, direction: str, affine_only: bool,
                device, factor: int = 1) -> NetworkAnswer:
    """The model on ``(B, 1, *S)`` inputs, from its start, on ``device`` -> its answer on CPU.

    ``factor`` > 1 runs the model on copies ``factor`` times coarser (a model trained at a coarser
    spacing); its affine and flow are in normalised coordinates, so they carry over to ``S``
    unchanged (the flow is linearly resampled).
    """
    net_moving, net_fixed = x_moving, x_fixed
    if factor > 1:
        shape = _coarse_shape(x_fixed.shape[2:], factor, model.size_multiple, model.min_size)
        net_moving, net_fixed = downsample(x_moving, factor, shape), downsample(x_fixed, factor, shape)
    with torch.inference_mode():
        net_moving, net_fixed = net_moving.to(device), net_fixed.to(device)
        reg = register_from_start(model, net_moving, net_fixed, direction, affine_only)
    # clone() outside inference mode: refinement may use these in autograd
    theta, disp, warped = reg.theta.cpu().clone(), reg.displacement.cpu().clone(), reg.warped.cpu().clone()
    flow = None if reg.flow is None or affine_only else reg.flow.cpu().clone()
    if factor > 1:
        disp = spatial.resize_displacement(disp, x_fixed.shape[2:])
        warped = spatial.warp(x_moving, disp)
    return NetworkAnswer(theta, disp, warped, flow)


def network_slices(model: Fire, x_moving: torch.Tensor, x_fixed: torch.Tensor, direction: str, affine_only: bool,
                   device, slice_batch: int) -> tuple[torch.Tensor, torch.Tensor, NetworkAnswer]:
    """A 2D model on ``(1, 1, X, Y, Z)`` volumes, slice by slice along the last axis, ``slice_batch``
    slices per forward pass -> the slices ``(Z, 1, X, Y)`` of moving and fixed, and its answer on them
    (CPU; no flow)."""
    with torch.inference_mode():
        xm, xf = x_moving[0, 0].movedim(-1, 0)[:, None], x_fixed[0, 0].movedim(-1, 0)[:, None]
        parts = [register_from_start(model, m.to(device), f.to(device), direction, affine_only)
                 for m, f in zip(xm.split(slice_batch), xf.split(slice_batch))]
    theta = torch.cat([p.theta for p in parts]).cpu()
    disp = torch.cat([p.displacement for p in parts]).cpu()
    warped = torch.cat([p.warped for p in parts]).cpu()
    return xm, xf, NetworkAnswer(theta, disp, warped, None)


def synthesise(model: Fire, x_moving: torch.Tensor, direction: str, device) -> torch.Tensor:
    """``F(G(moving))``: ``(B, 1, *S)`` moving mapped into the fixed image's contrast by the model's decoder
    (outside inference mode, so that refinement can differentiate through it)."""
    with torch.inference_mode():
        synthesised = model.synthesise(x_moving.to(device), direction)
    return synthesised.clone()
