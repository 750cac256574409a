"""Spatial transforms in normalised coordinates, written once for 2D and 3D.

Conventions used everywhere in firekit:

* Images are tensors ``(B, C, *spatial)``; ``spatial`` is ``(H, W)`` in 2D and
  ``(D, H, W)`` in 3D, and spatial axis ``i`` is the i-th array index (the same
  order as the NIfTI voxel index, so an image affine applies unchanged).
* A transform ``phi`` maps a point ``x`` of the *output* (fixed) grid to the point
  ``phi(x) = x + u(x)`` of the *input* (moving) image that is sampled there:
  ``warp(image, u)(x) = image(x + u(x))``.
* Displacements ``u`` are tensors ``(B, ndim, *spatial)`` whose channel ``i`` is the
  displacement along spatial axis ``i``, in normalised coordinates: each axis
  runs from -1 (centre of the first voxel) to +1 (centre of the last voxel),
  i.e. ``align_corners=True``.
* Affine matrices ``theta`` are ``(B, ndim, ndim + 1)`` and act on normalised
  coordinates in the same axis order: ``phi(x) = theta[:, :, :ndim] @ x + theta[:, :, ndim]``.

This is the only module that knows ``grid_sample``'s (x, y, z) = reversed axis
order; every other module speaks the axis order above.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as nnf

__all__ = [
    "identity_grid",
    "identity_affine",
    "affine_matrix",
    "invert_affine",
    "compose_affines",
    "affine_to_displacement",
    "warp",
    "warp_labels",
    "resize_displacement",
    "compose",
    "compose_affine_displacement",
    "normalised_to_voxel",
    "voxel_to_normalised",
    "voxel_to_mm",
    "mm_to_voxel",
    "jacobian_determinant",
    "inverse_consistency_error",
    "voxel_grid",
    "sample",
    "invert_displacement",
    "normalised_affine_to_voxel",
    "voxel_affine_to_normalised",
]

_GRID_CACHE: dict[tuple, torch.Tensor] = {}
_GRID_CACHE_MAX = 32


def _check_field(displacement: torch.Tensor, name: str = "displacement") -> int:
    if displacement.ndim not in (4, 5) or displacement.shape[1] != displacement.ndim - 2:
        raise ValueError(
            f"{name} must have shape (B, ndim, *spatial) with ndim 2 or 3, "
            f"got {tuple(displacement.shape)}"
        )
    return displacement.ndim - 2


def _check_theta(theta: torch.Tensor) -> int:
    if theta.ndim != 3 or theta.shape[1] not in (2, 3) or theta.shape[2] != theta.shape[1] + 1:
        raise ValueError(
            f"affine matrix must have shape (B, ndim, ndim + 1) with ndim 2 or 3, got {tuple(theta.shape)}"
        )
    return theta.shape[1]


def identity_grid(shape: Sequence[int], like: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised coordinates of every voxel centre.

    Args:
        shape: spatial shape, length 2 or 3, each size >= 2.
        like: tensor whose dtype and device the grid takes (float32 on CPU if None).

    Returns:
        ``(1, ndim, *shape)``; channel ``i`` runs linearly from -1 to 1 along axis ``i``.
        Cached per shape, dtype and device; do not modify in place.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 2:
        raise ValueError(f"identity_grid needs a 2D or 3D shape with every size >= 2, got {shape}")
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    device = like.device if like is not None else torch.device("cpu")
    key = (shape, dtype, device)
    grid = _GRID_CACHE.get(key)
    if grid is None:
        # Built outside inference mode so a grid first made during inference can later be saved
        # for backward in training (inference tensors cannot).
        with torch.inference_mode(False):
            axes = [torch.linspace(-1.0, 1.0, s, dtype=dtype, device=device) for s in shape]
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)
        if len(_GRID_CACHE) >= _GRID_CACHE_MAX:
            _GRID_CACHE.clear()
        _GRID_CACHE[key] = grid
    return grid


def identity_affine(ndim: int, batch: int = 1, like: torch.Tensor | None = None) -> torch.Tensor:
    """Identity affine matrices ``(batch, ndim, ndim + 1)``."""
    eye = torch.eye(ndim, ndim + 1)
    if like is not None:
        eye = eye.to(like)
    return eye.unsqueeze(0).repeat(batch, 1, 1)


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    ndim = _check_theta(theta)
    bottom = torch.zeros(theta.shape[0], 1, ndim + 1, dtype=theta.dtype, device=theta.device)
    bottom[:, 0, ndim] = 1.0
    return torch.cat([theta, bottom], dim=1)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of affine matrices ``(B, ndim, ndim + 1)``, same shape."""
    ndim = _check_theta(theta)
    return torch.linalg.inv(_homogeneous(theta))[:, :ndim]


def compose_affines(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Matrix of ``x -> outer(inner(x))``, both ``(B, ndim, ndim + 1)``."""
    ndim = _check_theta(outer)
    return (_homogeneous(outer) @ _homogeneous(inner))[:, :ndim]


def affine_matrix(
    ndim: int,
    rotation: Sequence[float] | float = 0.0,
    scale: Sequence[float] | float = 1.0,
    shear: Sequence[float] | float = 0.0,
    translation: Sequence[float] | float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build one affine matrix ``(1, ndim, ndim + 1)`` as ``T @ R @ Sh @ S``.

    Args:
        ndim: 2 or 3.
        rotation: degrees; one angle in 2D (in the plane of axes 0 and 1), three in 3D
            (about axes 0, 1, 2, applied in that order).
        scale: per-axis factors (or one for all axes).
        shear: upper-triangular shear terms, 1 value in 2D, 3 in 3D (axis pairs 01, 02, 12).
        translation: per-axis shifts in normalised units (2 = the whole field of view).
    """
    def as_list(value, n):
        values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) != n:
            raise ValueError(f"expected {n} values for ndim={ndim}, got {len(values)}")
        return values

    n_angles = 1 if ndim == 2 else 3
    angles = [math.radians(a) for a in as_list(rotation, n_angles)]
    scales = as_list(scale, ndim)
    shears = as_list(shear, n_angles)
    shifts = as_list(translation, ndim)

    rot = torch.eye(ndim, dtype=torch.float64)
    planes = [(0, 1)] if ndim == 2 else [(1, 2), (0, 2), (0, 1)]
    for (i, j), angle in zip(planes, angles):
        plane = torch.eye(ndim, dtype=torch.float64)
        c, s = math.cos(angle), math.sin(angle)
        plane[i, i], plane[i, j], plane[j, i], plane[j, j] = c, -s, s, c
        rot = plane @ rot
    shear_mat = torch.eye(ndim, dtype=torch.float64)
    pairs = [(0, 1)] if ndim == 2 else [(0, 1), (0, 2), (1, 2)]
    for (i, j), value in zip(pairs, shears):
        shear_mat[i, j] = value
    linear = rot @ shear_mat @ torch.diag(torch.tensor(scales, dtype=torch.float64))
    theta = torch.cat([linear, torch.tensor(shifts, dtype=torch.float64)[:, None]], dim=1)
    return theta.unsqueeze(0).to(dtype)


def _apply_affine_to_points(theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``theta`` (B, n, n+1) applied to points ``(B, n, *spatial)``."""
    ndim = theta.shape[1]
    linear, shift = theta[:, :, :ndim], theta[:, :, ndim]
    moved = torch.einsum("bij,bj...->bi...", linear, points)
    return moved + shift.reshape(*shift.shape, *([1] * ndim))


def affine_to_displacement(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense displacement of an affine: ``u(x) = theta @ [x, 1] - x``.

    Args:
        theta: ``(B, ndim, ndim + 1)`` in normalised coordinates.
        shape: spatial shape of the output grid.

    Returns:
        ``(B, ndim, *shape)`` normalised displacement.
    """
    ndim = _check_theta(theta)
    if len(shape) != ndim:
        raise ValueError(f"affine is {ndim}D but the grid shape {tuple(shape)} is {len(shape)}D")
    grid = identity_grid(shape, like=theta).expand(theta.shape[0], *([-1] * (ndim + 1)))
    return _apply_affine_to_points(theta, grid) - grid


def compose_affine_displacement(theta: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Displacement of ``phi_af o phi_nr``: ``x -> theta(x + u_nr(x))``, exact (no resampling).

    Args:
        theta: ``(B, ndim, ndim + 1)`` affine, applied second (outer).
        displacement: ``(B, ndim, *spatial)`` non-rigid ``u_nr``, applied first (inner).

    Returns:
        ``(B, ndim, *spatial)`` normalised displacement of the composition.
    """
    ndim = _check_field(displacement)
    if _check_theta(theta) != ndim:
        raise ValueError(f"affine is {theta.shape[1]}D but the displacement is {ndim}D")
    grid = identity_grid(displacement.shape[2:], like=displacement)
    points = grid + displacement
    return _apply_affine_to_points(theta, points) - grid


def _to_grid_sample(points: torch.Tensor) -> torch.Tensor:
    """(B, n, *spatial) points in axis order -> (B, *spatial, n) in grid_sample's reversed order."""
    return points.movedim(1, -1).flip(-1)


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    mode: str = "linear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Resample ``image`` at ``x + u(x)``: ``warped(x) = image(x + u(x))``.

    Args:
        image: ``(B, C, *spatial_in)``.
        displacement: ``(B, ndim, *spatial_out)`` normalised; batch 1 broadcasts.
            ``spatial_out`` may differ from ``spatial_in``: coordinates are normalised.
        mode: ``"linear"`` (bi/trilinear) or ``"nearest"``.
        padding_mode: ``"border"``, ``"zeros"`` or ``"reflection"`` for points outside.

    Returns:
        ``(B, C, *spatial_out)``.
    """
    ndim = _check_field(displacement)
    if image.ndim != ndim + 2:
        raise ValueError(
            f"image must be (B, C, *spatial) with {ndim} spatial dims to match the displacement, "
            f"got {tuple(image.shape)}"
        )
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    batch = max(image.shape[0], displacement.shape[0])
    if image.shape[0] not in (1, batch) or displacement.shape[0] not in (1, batch):
        raise ValueError(
            f"batch sizes of image {image.shape[0]} and displacement {displacement.shape[0]} do not match"
        )
    points = identity_grid(displacement.shape[2:], like=displacement) + displacement
    grid = _to_grid_sample(points).to(image.dtype)
    image = image.expand(batch, *image.shape[1:])
    grid = grid.expand(batch, *grid.shape[1:])
    if torch.is_grad_enabled() and (grid.requires_grad or image.requires_grad):
        # grid_sample's backward indexes out of bounds at a NaN point with border or reflection
        # padding (a segfault on the CPU in torch 2.13), as after a non-finite step that the trainer
        # reads back later; a NaN point samples the centre instead, and the loss still shows the NaN.
        grid = grid.nan_to_num(nan=0.0)
    return nnf.grid_sample(
        image,
        grid,
        mode="bilinear" if mode == "linear" else "nearest",
        padding_mode=padding_mode,
        align_corners=True,
    )


def warp_labels(
    labels: torch.Tensor,
    displacement: torch.Tensor,
    soft: bool = False,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Warp an integer label map.

    Args:
        labels: ``(B, 1, *spatial_in)`` integer labels 0..K-1 (any dtype holding integers).
        displacement: ``(B, ndim, *spatial_out)`` normalised.
        soft: False: nearest-neighbour, returns ``(B, 1, *spatial_out)`` with the input's dtype.
            True: linear interpolation of the one-hot encoding, returns class
            probabilities ``(B, K, *spatial_out)`` (float, sum to 1 per voxel).
        num_classes: K for ``soft`` (default: max label + 1).
    """
    if labels.ndim < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, *spatial), got {tuple(labels.shape)}")
    if not soft:
        warped = warp(labels.float(), displacement, mode="nearest", padding_mode="zeros")
        return warped.round().to(labels.dtype)
    index = labels.long()
    k = int(num_classes) if num_classes is not None else int(index.max()) + 1
    one_hot = nnf.one_hot(index[:, 0], k).movedim(-1, 1).to(displacement.dtype)
    # Border padding keeps the probabilities summing to one outside the field of view.
    return warp(one_hot, displacement, mode="linear", padding_mode="border")


def resize_displacement(displacement: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linearly resample a normalised displacement to another grid (values need no rescaling).

    Args:
        displacement: ``(B, ndim, *spatial)``.
        shape: target spatial shape.
    """
    ndim = _check_field(displacement)
    shape = tuple(int(s) for s in shape)
    if len(shape) != ndim:
        raise ValueError(f"target shape {shape} must have {ndim} dims")
    if shape == tuple(displacement.shape[2:]):
        return displacement
    mode = "bilinear" if ndim == 2 else "trilinear"
    return nnf.interpolate(displacement, size=shape, mode=mode, align_corners=True)


def compose(outer: torch.Tensor, inner: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Displacement of ``x -> phi_outer(phi_inner(x))``.

    Warping by the result equals warping by ``outer`` and then by ``inner``:
    ``warp(warp(I, outer), inner) ~= warp(I, compose(outer, inner))``.

    Args:
        outer: ``(B, ndim, *spatial_outer)`` normalised.
        inner: ``(B, ndim, *spatial)`` normalised; the result lives on this grid.

    Returns:
        ``(B, ndim, *spatial)``: ``u_inner + u_outer(x + u_inner(x))``.
    """
    _check_field(outer, "outer")
    _check_field(inner, "inner")
    return inner + warp(outer, inner, mode="linear", padding_mode=padding_mode)


def integrate_velocity(velocity: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Displacement of the flow of a stationary velocity field, ``exp(v)``, by scaling and squaring.

    The result is a diffeomorphism up to interpolation error (no folding for smooth ``v``).

    Args:
        velocity: ``(B, ndim, *spatial)`` normalised.
        steps: squarings (``v / 2^steps`` is composed with itself ``steps`` times).

    Returns:
        ``(B, ndim, *spatial)`` normalised displacement.
    """
    _check_field(velocity, "velocity")
    field = velocity / (2 ** int(steps))
    for _ in range(int(steps)):
        field = compose(field, field)
    return field


def _axis_scales(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Voxels per normalised unit along each axis, shaped to broadcast over (B, n, *spatial)."""
    scales = torch.tensor([(s - 1) / 2.0 for s in shape], dtype=like.dtype, device=like.device)
    return scales.reshape(1, len(shape), *([1] * len(shape)))


def normalised_to_voxel(displacement: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Normalised displacement -> voxels of a grid of ``shape`` (default: the field's own grid)."""
    ndim = _check_field(displacement)
    shape = displacement.shape[2:] if shape is None else shape
    if len(shape) != ndim:
        raise ValueError(f"shape {tuple(shape)} must have {ndim} dims")
    return displacement * _axis_scales(shape, displacement)


def voxel_to_normalised(displacement: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Voxel displacement -> normalised, inverse of :func:`normalised_to_voxel`."""
    ndim = _check_field(displacement)
    shape = displacement.shape[2:] if shape is None else shape
    if len(shape) != ndim:
        raise ValueError(f"shape {tuple(shape)} must have {ndim} dims")
    return displacement / _axis_scales(shape, displacement)


def _linear_part(affine, ndim: int, like: torch.Tensor) -> torch.Tensor:
    matrix = torch.as_tensor(affine, dtype=like.dtype, device=like.device)
    if matrix.shape[-2:] != (ndim + 1, ndim + 1):
        raise ValueError(
            f"voxel-to-world affine must be ({ndim + 1}, {ndim + 1}) for a {ndim}D field, "
            f"got {tuple(matrix.shape)}"
        )
    return matrix[..., :ndim, :ndim]


def voxel_to_mm(displacement: torch.Tensor, affine) -> torch.Tensor:
    """Voxel displacement -> millimetres in the world frame of a voxel-to-world ``affine``.

    Args:
        displacement: ``(B, ndim, *spatial)`` in voxels.
        affine: ``(ndim + 1, ndim + 1)`` or ``(B, ndim + 1, ndim + 1)`` (tensor or array),
            voxel index (in the tensor's axis order) to world mm, as a NIfTI affine.

    Returns:
        ``(B, ndim, *spatial)``; channel ``i`` is world axis ``i`` (RAS for NIfTI).
    """
    ndim = _check_field(displacement)
    linear = _linear_part(affine, ndim, displacement)
    if linear.ndim == 2:
        linear = linear.unsqueeze(0).expand(displacement.shape[0], -1, -1)
    return torch.einsum("bij,bj...->bi...", linear, displacement)


def mm_to_voxel(displacement: torch.Tensor, affine) -> torch.Tensor:
    """World-mm displacement -> voxels, inverse of :func:`voxel_to_mm`."""
    ndim = _check_field(displacement)
    linear = torch.linalg.inv(_linear_part(affine, ndim, displacement))
    if linear.ndim == 2:
        linear = linear.unsqueeze(0).expand(displacement.shape[0], -1, -1)
    return torch.einsum("bij,bj...->bi...", linear, displacement)


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + u(x)`` at every voxel.

    Central differences inside, one-sided at the borders. The determinant is the
    same in normalised and voxel coordinates, so either may be passed as long as
    ``u`` is normalised (the default firekit unit).

    Args:
        displacement: ``(B, ndim, *spatial)`` normalised.

    Returns:
        ``(B, *spatial)``; 1 = volume kept, < 1 contraction, <= 0 folding.
    """
    ndim = _check_field(displacement)
    voxels = normalised_to_voxel(displacement)
    # gradient of each component along each axis, in voxel steps: (B, n_comp, n_axis, *spatial)
    grads = torch.stack(torch.gradient(voxels, dim=list(range(2, ndim + 2))), dim=2)
    jac = grads.movedim(1, -1).movedim(1, -1)  # (B, *spatial, n_comp, n_axis)
    jac = jac + torch.eye(ndim, dtype=jac.dtype, device=jac.device)
    return torch.linalg.det(jac)


def inverse_consistency_error(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Per-voxel ``|phi_forward o phi_backward - Id|`` in voxels, on ``backward``'s grid.

    For FIRE, ``forward`` is phi_AB and ``backward`` phi_BA (Eq. 8 composes them this
    way); the error is zero where the two are exact inverses.

    Args:
        forward: ``(B, ndim, *spatial)`` normalised displacement of the outer transform.
        backward: ``(B, ndim, *spatial)`` normalised displacement of the inner transform.

    Returns:
        ``(B, *spatial)`` Euclidean residual in voxels.
    """
    residual = compose(forward, backward)
    return normalised_to_voxel(residual).norm(dim=1)


def voxel_grid(shape: Sequence[int], like: torch.Tensor | None = None) -> torch.Tensor:
    """Voxel index coordinates ``(1, ndim, *shape)``: channel ``i`` holds the index along axis ``i``."""
    kwargs = {} if like is None else {"dtype": like.dtype, "device": like.device}
    axes = [torch.arange(int(s), **kwargs) for s in shape]
    kind = like.dtype if like is not None and like.is_floating_point() else torch.float32
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0).to(kind)


def sample(
    image: torch.Tensor,
    points: torch.Tensor,
    mode: str = "linear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample ``image`` at continuous voxel coordinates (index units, not normalised).

    Args:
        image: ``(B, C, *spatial_in)``.
        points: ``(B, ndim, *spatial_out)``; channel ``i`` is the voxel index along axis ``i``
            of ``image`` (0 = centre of the first voxel). Batch 1 broadcasts.
        mode: ``"linear"`` or ``"nearest"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.

    Returns:
        ``(B, C, *spatial_out)``.
    """
    ndim = _check_field(points, "points")
    if image.ndim != ndim + 2:
        raise ValueError(f"image must be (B, C, *spatial) with {ndim} spatial dims, got {tuple(image.shape)}")
    sizes = torch.tensor([max(int(s) - 1, 1) for s in image.shape[2:]], dtype=points.dtype, device=points.device)
    normalised = points / sizes.reshape(1, ndim, *([1] * ndim)) * 2.0 - 1.0
    normalised = normalised - identity_grid(points.shape[2:], like=points)
    return warp(image, normalised.to(image.dtype) if image.is_floating_point() else normalised,
                mode=mode, padding_mode=padding_mode)


def _normalising_matrix(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Homogeneous ``N`` with ``x_voxel = N @ x_normalised`` for a grid of ``shape``."""
    n = len(shape)
    matrix = torch.eye(n + 1, dtype=like.dtype, device=like.device)
    for i, s in enumerate(shape):
        matrix[i, i] = (int(s) - 1) / 2.0
        matrix[i, n] = (int(s) - 1) / 2.0
    return matrix


def normalised_affine_to_voxel(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Re-express an affine acting on normalised coordinates in voxel indices of a grid of ``shape``.

    Args:
        theta: ``(B, ndim, ndim + 1)`` normalised.
    Returns:
        ``(B, ndim, ndim + 1)`` with ``v' = M[:, :n] v + M[:, n]`` in voxel indices.
    """
    ndim = _check_theta(theta)
    norm = _normalising_matrix(shape, theta)
    return (norm @ _homogeneous(theta) @ torch.linalg.inv(norm))[:, :ndim]


def voxel_affine_to_normalised(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`normalised_affine_to_voxel`: ``(B, ndim, ndim + 1)`` voxel -> normalised."""
    ndim = _check_theta(matrix)
    norm = _normalising_matrix(shape, matrix)
    return (torch.linalg.inv(norm) @ _homogeneous(matrix) @ norm)[:, :ndim]


def invert_displacement(displacement: torch.Tensor, iterations: int = 40,
                        theta: torch.Tensor | None = None, tolerance: float = 0.0) -> torch.Tensor:
    """Inverse of a smooth invertible field by fixed-point iteration ``v(x) = -u(x + v(x))``.

    The plain iteration converges only where the field moves points by less than their spacing changes
    (``|grad u| < 1``): not for large turns or scales. ``theta``, the field's affine part, preconditions it:
    the iteration starts from ``theta``'s exact inverse and corrects by ``A^-1`` times the residual
    (``A``: ``theta``'s linear part), so only the non-rigid rest need be small.

    Args:
        displacement: ``(B, ndim, *spatial)`` normalised.
        iterations: at most this many corrections.
        theta: ``(B, ndim, ndim + 1)`` normalised affine the field is close to, or None.
        tolerance: stop once a correction moves the grid's points by less than this on average (voxels);
            0 always runs ``iterations``.

    Returns:
        ``(B, ndim, *spatial)`` normalised ``v`` with ``(x + v) + u(x + v) = x``.
    """
    ndim = _check_field(displacement)

    scales = _axis_scales(displacement.shape[2:], displacement).flatten()  # normalised -> voxels, per axis

    def settled(step: torch.Tensor) -> bool:  # the step's mean length in voxels (its L1 norm: cheap, >= L2)
        return tolerance > 0 and float((step.abs().mean(dim=[0, *range(2, ndim + 2)]) * scales).sum()) < tolerance

    if theta is None:
        inverse = -displacement
        for _ in range(iterations):
            updated = -warp(displacement, inverse)
            inverse, step = updated, updated - inverse
            if settled(step):
                break
        return inverse
    theta = theta.to(displacement.dtype)
    inverse = affine_to_displacement(invert_affine(theta), displacement.shape[2:])
    linear_inverse = torch.linalg.inv(theta[:, :, :ndim])
    for _ in range(iterations):
        # residual r(x) = (x + v) + u(x + v) - x; Newton-like step with the affine's Jacobian
        residual = inverse + warp(displacement, inverse)
        step = torch.einsum("bij,bj...->bi...", linear_inverse, residual)
        inverse = inverse - step
        if settled(step):
            break
    return inverse
