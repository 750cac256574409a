"""Displacement fields in the ITK convention, whoever wrote them (firekit, ANTs, the test protocol).

A field is an array ``(*S, n)`` on the fixed image's grid, in mm with LPS signs: the fixed voxel at
world point ``x`` (RAS) is matched to the moving image's point ``x + flip(u(x))``. This is what
``firekit register --field`` writes, what ANTs' composed transforms are, and what
``protocol.make_test_pairs`` stores as the true answer, so one set of functions scores them all.
"""

from __future__ import annotations

import numpy as np
import torch

from . import io, spatial
from .data import map_points

__all__ = ["world_points", "world_to_voxels", "ras_displacement", "sample_volume", "moving_points", "apply_field",
           "inverse_consistency"]


def world_points(volume: io.Volume) -> torch.Tensor:
    """World (RAS mm) points of every voxel of ``volume``: ``(1, n, *S)`` float64."""
    n = volume.ndim
    grid = spatial.voxel_grid(volume.shape, like=torch.zeros((), dtype=torch.float64))
    return map_points(torch.as_tensor(volume.affine[:n])[None], grid)


def world_to_voxels(points: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """World (RAS mm) points ``(1, n, *S)`` -> voxel coordinates of the grid ``affine`` ``(n + 1, n + 1)``."""
    n = affine.shape[0] - 1
    return map_points(torch.as_tensor(np.linalg.inv(affine)[:n])[None], points)


def ras_displacement(field: np.ndarray) -> torch.Tensor:
    """An ITK field ``(*S, n)`` (mm, LPS) as RAS mm displacements ``(1, n, *S)`` float64."""
    n = field.shape[-1]
    return torch.as_tensor(np.asarray(field, np.float64) * io.lps_flip(n)).movedim(-1, 0)[None]


def sample_volume(image: io.Volume, voxels: torch.Tensor, mode: str = "linear") -> np.ndarray:
    """``image``'s values at voxel coordinates ``(1, n, *S)`` (``"linear"`` or ``"nearest"``; 0 outside):
    ``(*S)`` float64."""
    source = torch.as_tensor(np.asarray(image.data, np.float64))[None, None]
    return spatial.sample(source, voxels, mode=mode, padding_mode="zeros")[0, 0].numpy()


def moving_points(field: np.ndarray, fixed: io.Volume, moving: io.Volume) -> torch.Tensor:
    """Voxel coordinates in ``moving`` of every fixed voxel's match: ``(1, n, *S)`` float64."""
    n = fixed.ndim
    if field.shape != (*fixed.shape, n):
        raise ValueError(f"field shape {field.shape} does not match the fixed grid {(*fixed.shape, n)}")
    return world_to_voxels(world_points(fixed) + ras_displacement(field), moving.affine)


def apply_field(image: io.Volume, field: np.ndarray, fixed: io.Volume, labels: bool = False) -> np.ndarray:
    """``image`` (on the moving grid) warped onto ``fixed``'s grid by ``field``; ``(*S)``.

    ``labels``: nearest-neighbour sampling, keeping the dtype; otherwise linear, float32. Outside
    the moving image is 0.
    """
    warped = sample_volume(image, moving_points(field, fixed, image), "nearest" if labels else "linear")
    return warped.astype(image.data.dtype if labels else np.float32)


def inverse_consistency(forward: np.ndarray, backward: np.ndarray, fixed: io.Volume, moving: io.Volume) -> np.ndarray:
    """Per fixed voxel, ``|u_f(x) + u_b(x + u_f(x))|`` in voxels of the fixed grid; ``(*S)``.

    Args:
        forward: field on ``fixed``'s grid (fixed -> moving points).
        backward: field on ``moving``'s grid (moving -> fixed points): a registration the other way,
            or the forward registration's inverse (ANTs' inverse transforms).
    """
    n = fixed.ndim
    points = moving_points(forward, fixed, moving)
    back = torch.as_tensor(np.asarray(backward, np.float64)).movedim(-1, 0)[None]
    back_at_points = spatial.sample(back, points, mode="linear", padding_mode="border")[0].movedim(0, -1).numpy()
    residual_mm = (np.asarray(forward, np.float64) + back_at_points) * io.lps_flip(n)  # RAS mm
    to_voxels = np.linalg.inv(fixed.affine[:n, :n])
    return np.linalg.norm(residual_mm @ to_voxels.T, axis=-1)
