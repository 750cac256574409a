"""Displacement fields in the ITK convention, whoever wrote them (firekit, ANTs, the test protocol).

A field is an array ``(*S, n)`` on the fixed image's grid, in mm with LPS signs: the fixed voxel at
world point ``x`` (RAS) is matched to the moving image's point ``x + flip(u(x))``. This is what
``firekit register --field`` writes, what ANTs' composed transforms are, and what
``protocol.make_test_pairs`` stores as the true answer, so one set of functions scores them all.
Its inverse (:func:`invert_field`, ``register --inverse-field``) lives on the moving image's grid, in
the same convention the other way (moving point ``y`` -> fixed point ``y + flip(v(y))``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from firekit.data import io
from firekit.core import spatial
from firekit.data.pairs import map_points

__all__ = ["world_points", "world_to_voxels", "ras_displacement", "sample_volume", "moving_points", "apply_field",
           "inverse_consistency", "FieldInverse", "invert_field"]


def world_points(volume: io.Volume) -> torch.Tensor:
    """World (RAS mm) points of every voxel of ``volume``: ``(1, n, *S)`` float64."""
    return _grid_points(volume.shape, volume.affine, torch.zeros((), dtype=torch.float64))


def _grid_points(shape: Sequence[int], affine: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """World (RAS mm) points ``(1, n, *shape)`` of the grid ``affine`` ``(n + 1, n + 1)``, as ``like``."""
    grid = spatial.voxel_grid(shape, like=like)
    return map_points(torch.as_tensor(np.asarray(affine, np.float64)[:len(shape)])[None], grid)


def world_to_voxels(points: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """World (RAS mm) points ``(1, n, *S)`` -> voxel coordinates of the grid ``affine`` ``(n + 1, n + 1)``."""
    n = affine.shape[0] - 1
    return map_points(torch.as_tensor(np.linalg.inv(affine)[:n])[None], points)


def ras_displacement(field: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An ITK field ``(*S, n)`` (mm, LPS) as RAS mm displacements ``(1, n, *S)`` float64 (a tensor stays
    on its device)."""
    field = torch.as_tensor(field, dtype=torch.float64)
    return (field * torch.as_tensor(io.lps_flip(field.shape[-1])).to(field)).movedim(-1, 0)[None]


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


class FieldInverse(NamedTuple):
    """A field's inverse (:func:`invert_field`) and how far it is from inverting it.

    Attributes:
        field: ``(*moving_shape, n)`` float64 mm, ITK/LPS signs: the moving point ``y`` maps to the fixed
            point ``y + v(y)``.
        max_residual, mean_residual: mm, of ``|u(y + v(y)) + v(y)|`` over ``inside``.
        inside: ``(*moving_shape)`` bool, the points whose image ``y + v(y)`` lies within the fixed grid.
        iterations: fixed-point iterations run (at most ``iterations``; fewer once every point is within
            ``tolerance``).
    """

    field: torch.Tensor
    max_residual: float
    mean_residual: float
    inside: torch.Tensor
    iterations: int

    def summary(self) -> dict:
        """The residual figures as plain numbers (``register --json``'s ``inverse``)."""
        inside = float(self.inside.double().mean() * 100) if self.inside.numel() else 0.0
        return dict(max_residual_mm=self.max_residual, mean_residual_mm=self.mean_residual,
                    inside_percent=inside, iterations=self.iterations)


def invert_field(field: np.ndarray | torch.Tensor, fixed_affine: np.ndarray, moving_shape: Sequence[int],
                 moving_affine: np.ndarray, affine: np.ndarray | None = None, iterations: int = 100,
                 tolerance: float = 0.01) -> FieldInverse:
    """Inverse of an ITK displacement field, on the moving grid, by fixed-point iteration.

    Solves ``v(y) = -u(y + v(y))`` for every point ``y`` of the moving grid (``u`` linear between the
    fixed grid's voxels, its nearest border value outside, as ITK and ``firekit apply`` read it). The
    plain iteration converges only where ``u``'s Jacobian is small, which the scalings and turns of a
    real registration's affine part break; so it starts from the affine part's inverse and each step
    is preconditioned by it: with ``x = y + v(y)`` and ``A`` the affine's linear part,
    ``x <- x - A^-1 (x + u(x) - y)``, which converges wherever the field's Jacobian is near its affine
    part's (for ``A = I`` it is the plain iteration). Beyond the fixed grid, where ``u`` is constant
    along an axis, ``A`` is the identity along it. A step that does not bring a point closer is
    halved; a point stops once its residual is within ``tolerance``. Where the field folds there is
    no inverse, and the residual says so.

    Args:
        field: ``(*S, n)`` mm, ITK/LPS signs, on the fixed grid: the fixed point ``x`` maps to the moving
            point ``x + u(x)`` (``RegistrationResult.displacement``, ``io.load_field``); n = 2 or 3.
        fixed_affine: ``(n + 1, n + 1)`` voxel -> world (RAS mm) of the fixed grid.
        moving_shape, moving_affine: the moving grid (``n`` sizes; ``(n + 1, n + 1)`` voxel -> RAS mm).
        affine: ``(n + 1, n + 1)`` RAS world map fixed -> moving points, the field's affine part
            (``RegistrationResult.affine``); None fits one to the field by least squares.
        iterations: at most this many steps.
        tolerance: mm; a point whose residual ``|u(y + v(y)) + v(y)|`` is within it is done.

    Returns:
        :class:`FieldInverse`: ``v`` as ``(*moving_shape, n)`` mm, ITK/LPS, with the final residual.
    """
    field = torch.as_tensor(field)
    n = field.ndim - 1
    if n not in (2, 3) or field.shape[-1] != n:
        raise ValueError(f"field must be (*spatial, n) with n = 2 or 3 spatial dims, got {tuple(field.shape)}")
    for name, matrix in (("fixed_affine", fixed_affine), ("moving_affine", moving_affine), ("affine", affine)):
        if matrix is not None and np.shape(matrix) != (n + 1, n + 1):
            raise ValueError(f"{name} must be {(n + 1, n + 1)} for a {n}D field, got {np.shape(matrix)}")
    if len(moving_shape) != n:
        raise ValueError(f"moving_shape must have {n} sizes for a {n}D field, got {tuple(moving_shape)}")
    u = ras_displacement(field)
    fixed_shape = tuple(field.shape[:-1])
    if affine is None:
        affine = _fitted_affine(_grid_points(fixed_shape, fixed_affine, u), u)
    affine = np.asarray(affine, np.float64)
    steps = _affine_steps(affine, fixed_affine)
    top = torch.as_tensor(fixed_shape).to(u).reshape(n, *[1] * n) - 1
    y = _grid_points(moving_shape, moving_affine, u)

    def mapped_error(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x + u(x) - y``, its norm, and which fixed axes each point lies beyond (bit i: axis i)."""
        voxels = world_to_voxels(points, fixed_affine)
        error = points + spatial.sample(u, voxels, padding_mode="border") - y
        beyond = ((voxels < 0) | (voxels > top)).long()
        code = sum(beyond[:, i:i + 1] << i for i in range(n))
        return error, error.norm(dim=1, keepdim=True), code

    def step(error: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return sum(torch.einsum("ij,bj...->bi...", steps[k].to(error), error) * (code == k) for k in code.unique())

    x = map_points(torch.as_tensor(np.linalg.inv(affine)[:n])[None], y)
    error, residual, code = mapped_error(x)
    size = torch.ones_like(residual)
    done = 0
    while done < iterations and (left := residual > tolerance).any():
        trial = x - step(error, code) * size * left
        trial_error, trial_residual, trial_code = mapped_error(trial)
        done += 1
        # a step that does not bring a point closer is halved (where the field is far from its
        # affine part, or folds) and that point keeps its place
        better = trial_residual < residual
        x, error, residual, code = (torch.where(better, a, b) for a, b in (
            (trial, x), (trial_error, error), (trial_residual, residual), (trial_code, code)))
        size = torch.where(better | ~left, size, size / 2)
    inside = code[0, 0] == 0
    v = ((x - y)[0] * torch.as_tensor(io.lps_flip(n)).to(x).reshape(n, *[1] * n)).movedim(0, -1)
    within = residual[0, 0][inside]
    return FieldInverse(v, float(within.max()) if within.numel() else 0.0,
                        float(within.mean()) if within.numel() else 0.0, inside, done)


def _affine_steps(affine: np.ndarray, fixed_affine: np.ndarray) -> torch.Tensor:
    """Newton steps of the affine part as a field on the fixed grid applies it: ``(2**n, n, n)``.

    Beyond the grid along an axis the field keeps its border value, so there the map moves points
    as the identity does; entry ``k`` inverts the affine's Jacobian with the axes of the bits of ``k``
    (voxel axes of the fixed grid) replaced by the identity's, for points beyond those axes.
    """
    n = affine.shape[0] - 1
    linear, voxel = affine[:n, :n] - np.eye(n), fixed_affine[:n, :n]
    steps = []
    for k in range(2 ** n):
        keep = np.diag([0.0 if k >> i & 1 else 1.0 for i in range(n)])
        jacobian = np.eye(n) + linear @ voxel @ keep @ np.linalg.inv(voxel)
        # near-singular (a turn of ~90 degrees seen along one axis): the plain step, which backtracks
        steps.append(np.linalg.inv(jacobian) if np.linalg.cond(jacobian) < 1e3 else np.eye(n))
    return torch.as_tensor(np.stack(steps))


def _fitted_affine(points: torch.Tensor, displacement: torch.Tensor) -> np.ndarray:
    """Least-squares ``(n + 1, n + 1)`` world map of ``points`` ``(1, n, *S)`` to ``points + displacement``."""
    n = points.shape[1]
    points, moved = points.reshape(n, -1), (points + displacement).reshape(n, -1)
    stride = max(1, points.shape[1] // 100_000)  # an affine needs no more points than that
    source = torch.cat([points[:, ::stride], torch.ones_like(points[:1, ::stride])]).T
    target = moved[:, ::stride].T
    matrix = np.eye(n + 1)
    matrix[:n] = torch.linalg.lstsq(source.cpu(), target.cpu()).solution.T.numpy()
    return matrix
