"""The start stage: where a registration begins, before the network and refinement.

Candidates are normalised affines ``(B, n, n + 1)`` (fixed point -> moving point) on the network
grid: the headers' alignment (the identity on a shared grid), the moments pre-alignment that a
model trained with ``prealign="moments"`` starts its transformation nets from, and the refinement's
starts (:func:`refinement_start`: a given affine, the network's answer and the best of the moments
search, :mod:`firekit.registration.moments`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from firekit.core import spatial
from firekit.fire.model import FireConfig
from firekit.registration.check import Candidate
from firekit.registration.levels import Regions, cut_by_view
from firekit.registration.moments import moment_candidates, moments_init
from firekit.registration.presets import RefineConfig

__all__ = ["header_candidate", "prealign", "network_start", "RefinementStart", "refinement_start"]


def header_candidate(fixed: torch.Tensor) -> Candidate:
    """The headers' alignment of ``(B, 1, *S)`` images on one grid: identity affine, no displacement."""
    ndim = fixed.ndim - 2
    return Candidate("header", spatial.identity_affine(ndim, fixed.shape[0]),
                     torch.zeros(fixed.shape[0], ndim, *fixed.shape[2:]))


def prealign(config: FireConfig, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor | None:
    """The pre-alignment ``theta0`` ``(B, n, n + 1)`` of ``moving`` onto ``fixed`` that a model of
    ``config`` starts T_AB from, or None (``prealign="none"``, the paper's).

    Computed without gradient from the first channel of each ``(B, C, *S)`` image (intensities in
    [-1, 1]). A pair where either image has (almost) no foreground (e.g. a slice above the head)
    starts from the identity.
    """
    if config.prealign == "none":
        return None
    ndim = config.ndim
    dtype = moving.dtype
    moving, fixed = moving[:, :1].float().detach(), fixed[:, :1].float().detach()
    theta = spatial.identity_affine(ndim, moving.shape[0], like=moving)

    def foreground_voxels(image: torch.Tensor) -> torch.Tensor:
        return (image > RefineConfig.foreground).flatten(1).sum(dim=1)

    # A stable covariance needs a few foreground voxels per dimension at least.
    minimum = 4 * (ndim + 1)
    rows = ((foreground_voxels(moving) >= minimum) & (foreground_voxels(fixed) >= minimum)).nonzero()[:, 0]
    if len(rows):
        # The refinement preset's candidate scan: in 3D it is 3x cheaper than the full one (0.3 vs
        # 1.0 s of a 2 s registration at 128x160x128) and gave the same network Dice on 4 pairs.
        scan = RefineConfig.preset(ndim)
        with torch.no_grad():
            theta[rows] = moments_init(moving[rows], fixed[rows], angles=scan.scan_angles, scan_size=scan.scan_size)
    return theta.to(dtype)


def network_start(config: FireConfig, moving: torch.Tensor, fixed: torch.Tensor, direction: str) -> torch.Tensor | None:
    """:func:`prealign` for one direction of a model (``"a2b"`` or ``"b2a"``): as in training, the B->A
    start is the A->B one (of the A image onto the B image) inverted, so the two starts are each
    other's inverse."""
    if direction == "a2b":
        return prealign(config, moving, fixed)
    theta0 = prealign(config, fixed, moving)
    return None if theta0 is None else spatial.invert_affine(theta0)


class RefinementStart(NamedTuple):
    """Where the refinement starts (:func:`firekit.registration.refine.refine`'s ``theta0`` and
    ``displacement0``; None: not given)."""

    theta0: torch.Tensor | None  # (B, n, n + 1) or (B, K, n, n + 1) normalised affines
    displacement0: torch.Tensor | None  # (B, n, *s) the network's flow, normalised


def refinement_start(x_moving: torch.Tensor, x_fixed: torch.Tensor, config: RefineConfig,
                     theta: torch.Tensor | None = None, flow: torch.Tensor | None = None,
                     start: torch.Tensor | None = None, regions: Regions = Regions()) -> RefinementStart:
    """The refinement's starts for ``(B, 1, *S)`` images on one grid.

    Args:
        theta, flow: the network's affine ``(B, n, n + 1)`` and flow ``(B, n, *s)`` (None: no network).
        start: a given affine ``(B, n, n + 1)`` (e.g. a saved transform): it replaces the moments
            candidates, beside the network's affine when there is one.
        regions: the user's masks weigh the moments search; moving's field of view says whether
            moving is cut by it (``config.cut_network_starts``).

    Returns:
        with neither ``theta`` nor ``start``, no start (the refinement searches the moments itself).
    """
    theta0 = displacement0 = None
    if start is not None:
        start = start.to(x_fixed)
        theta0 = start if theta is None else torch.stack([theta.to(start), start], dim=1)
        if theta is not None and flow is not None:
            displacement0 = flow.to(start)
    elif theta is not None:
        # The network's affine is one start among the moments search's best (the probe found the
        # moments often better); the affine stage judges them all at full resolution after its first
        # level, an implausible one (beyond the bounds) never wins, and the network's flow is kept
        # only where its affine won.
        keep = config.network_starts
        if config.cut_network_starts != keep and regions.moving_view is not None and bool(cut_by_view(
                x_moving, regions.moving_view, config.foreground, config.foreground_opening).any()):
            keep = config.cut_network_starts
        moments = moment_candidates(x_moving, x_fixed, config, keep=keep, fixed_mask=regions.fixed,
                                    moving_mask=regions.moving)
        theta0 = torch.cat([theta.to(moments)[:, None], moments], dim=1)
        if flow is not None:
            displacement0 = flow.to(moments)
    return RefinementStart(theta0, displacement0)
