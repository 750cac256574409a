"""Properties of firekit.core.spatial on random inputs (hypothesis): 2D and 3D, float32 and float64, batches 1-3.

Tolerances are stated per dtype: "exact" means up to the rounding of grid coordinates (a few ulps
of the coordinate times the image's range; bitwise in float64 more often than not), and the
inverse of a smooth field is exact only up to interpolation.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from firekit.core import spatial

EXAMPLES = settings(max_examples=50, deadline=None, database=None)
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


@st.composite
def grids(draw):
    """(ndim, spatial shape, dtype, batch), small enough for many examples per second."""
    ndim = draw(st.sampled_from([2, 3]))
    largest = 14 if ndim == 2 else 8
    shape = tuple(draw(st.integers(4, largest)) for _ in range(ndim))
    return ndim, shape, draw(st.sampled_from([torch.float32, torch.float64])), draw(st.integers(1, 3))


def angle():
    return st.floats(-30.0, 30.0, allow_nan=False)


@st.composite
def affines(draw, ndim, batch, dtype):
    """``(batch, ndim, ndim + 1)`` well-conditioned affines: rotation, scale, shear, shift."""
    n_angles = 1 if ndim == 2 else 3
    thetas = []
    for _ in range(batch):
        thetas.append(spatial.affine_matrix(
            ndim,
            rotation=[draw(angle()) for _ in range(n_angles)],
            scale=[draw(st.floats(0.75, 1.33)) for _ in range(ndim)],
            shear=[draw(st.floats(-0.2, 0.2)) for _ in range(n_angles)],
            translation=[draw(st.floats(-0.3, 0.3)) for _ in range(ndim)],
            dtype=dtype,
        ))
    return torch.cat(thetas)


def smooth_field(shape, batch, dtype, seed, max_gradient):
    """``(batch, ndim, *shape)`` normalised displacement, a sum of 3 sinusoids per component, with
    every entry of its voxel Jacobian bounded by ``max_gradient / ndim`` (so ``||grad u|| <= max_gradient``).

    The bound is analytic (amplitude x frequency x terms), and a finite difference of a sinusoid is
    bounded by its derivative, so it holds for the discrete Jacobian too.
    """
    ndim, terms = len(shape), 3
    generator = torch.Generator().manual_seed(seed)
    voxels = spatial.voxel_grid(shape, like=torch.zeros((), dtype=dtype))  # (1, n, *S)
    field = torch.zeros(batch, ndim, *shape, dtype=dtype)
    for b in range(batch):
        for component in range(ndim):
            for _ in range(terms):
                direction = torch.randn(ndim, generator=generator, dtype=dtype)
                direction = direction / direction.abs().sum()  # |d . x|' <= 1 per axis
                frequency = 0.2 + 0.6 * float(torch.rand((), generator=generator))  # radians per voxel
                phase = 6.28 * float(torch.rand((), generator=generator))
                amplitude = max_gradient / ndim / terms / frequency
                along = (direction.view(1, ndim, *([1] * ndim)) * voxels).sum(1)[0]
                field[b, component] += amplitude * torch.sin(frequency * along + phase)
    return spatial.voxel_to_normalised(field)


def ramp(shape, batch, dtype, seed):
    """``(batch, 1, *shape)`` image linear in the normalised coordinates, and its coefficients."""
    generator = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    slope = torch.randn(batch, ndim, generator=generator, dtype=dtype)
    offset = torch.randn(batch, generator=generator, dtype=dtype)
    grid = spatial.identity_grid(shape, like=slope)
    image = (slope.view(batch, ndim, *([1] * ndim)) * grid).sum(1, keepdim=True) + offset.view(batch, 1, *([1] * ndim))
    return image, slope, offset


def inside(points, margin=1e-6):
    """``(B, *S)`` True where every coordinate of normalised ``points`` ``(B, n, *S)`` is in the field of view."""
    return (points.abs() <= 1.0 - margin).all(dim=1)


def worst(values, mask):
    """The largest of ``values`` where ``mask`` (0 when the mask is empty)."""
    return float(values[mask].max()) if bool(mask.any()) else 0.0


# ------------------------------------------------------------------------------------ identity
@EXAMPLES
@given(grids(), st.integers(0, 2**16))
def test_warping_by_the_identity_is_exact(grid, seed):
    ndim, shape, dtype, batch = grid
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 2, *shape, generator=generator, dtype=dtype)
    zero = torch.zeros(batch, ndim, *shape, dtype=dtype)
    identity = spatial.affine_to_displacement(spatial.identity_affine(ndim, batch, like=zero), shape)
    assert torch.equal(identity, zero)
    labels = torch.randint(0, 5, (batch, 1, *shape), generator=generator)
    assert torch.equal(spatial.warp_labels(labels, zero), labels)
    assert torch.equal(spatial.warp(image, zero, mode="nearest"), image)
    # Linear mode: grid coordinates are rounded, so each voxel may mix in a few ulps of a neighbour.
    tolerance = 8 * max(shape) * EPS[dtype] * float(image.abs().max())
    assert (spatial.warp(image, zero) - image).abs().max() <= tolerance


# ------------------------------------------------------------------------------------ inverses
@EXAMPLES
@given(grids(), st.data())
def test_an_affine_composed_with_its_inverse_is_the_identity(grid, data):
    ndim, shape, dtype, batch = grid
    theta = data.draw(affines(ndim, batch, dtype))
    inverse = spatial.invert_affine(theta)
    identity = spatial.identity_affine(ndim, batch, like=theta)
    matrix_tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for product in (spatial.compose_affines(theta, inverse), spatial.compose_affines(inverse, theta)):
        assert (product - identity).abs().max() <= matrix_tolerance
    # Dense: x -> inverse(theta(x)) is the identity wherever theta(x) is inside the grid (linear
    # interpolation of an affine field is exact there).
    forward = spatial.affine_to_displacement(theta, shape)
    residual = spatial.compose(spatial.affine_to_displacement(inverse, shape), forward)
    mask = inside(spatial.identity_grid(shape, like=theta) + forward)
    voxels = spatial.normalised_to_voxel(residual).norm(dim=1)
    field_tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    assert worst(voxels, mask) <= field_tolerance


@EXAMPLES
@given(grids(), st.integers(0, 2**16), st.floats(0.05, 0.4))
def test_a_smooth_field_composed_with_its_inverse_is_nearly_the_identity(grid, seed, gradient):
    ndim, shape, dtype, batch = grid
    u = smooth_field(shape, batch, dtype, seed, gradient)
    v = spatial.invert_displacement(u)
    # v solves v(x) = -u(x + v(x)) on the grid: u o v is the identity to the iteration's accuracy,
    # v o u only up to linear interpolation of v (in voxels; the field moves up to ~1 voxel).
    outer_first = spatial.normalised_to_voxel(spatial.compose(u, v)).norm(dim=1)
    inner_first = spatial.normalised_to_voxel(spatial.compose(v, u)).norm(dim=1)
    assert outer_first.max() <= (1e-4 if dtype == torch.float32 else 1e-8)
    size = spatial.normalised_to_voxel(u).norm(dim=1).max()  # measured: inner_first <= 0.094 size
    assert inner_first.max() <= 0.15 * size + 1e-4


@EXAMPLES
@given(grids(), st.integers(0, 2**16), st.floats(120.0, 180.0), st.floats(0.05, 0.3))
def test_a_large_turn_plus_a_smooth_field_inverts_when_its_affine_is_given(grid, seed, degrees, gradient):
    # A half turn moves points by up to the grid's width: the plain iteration diverges there; started
    # from the affine's inverse and corrected through its linear part it converges.
    ndim, shape, dtype, batch = grid
    theta = spatial.affine_matrix(ndim, rotation=degrees if ndim == 2 else (degrees, 0.0, 0.0)).to(dtype)
    theta = theta.expand(batch, -1, -1)
    field = spatial.compose_affine_displacement(theta, smooth_field(shape, batch, dtype, seed, gradient))
    inverse = spatial.invert_displacement(field, theta=theta)
    inside_points = spatial.identity_grid(shape, like=field).abs().amax(dim=1) < 0.6  # away from the border
    error = spatial.normalised_to_voxel(spatial.compose(field, inverse)).norm(dim=1)
    assert error[inside_points.expand_as(error)].max() <= (1e-3 if dtype == torch.float32 else 1e-6)


def test_the_inverse_stops_once_its_steps_are_below_the_tolerance_and_stays_accurate(monkeypatch):
    # A turned, scaled smooth 3D field: the preconditioned iteration with a tolerance stops early
    # (each step is one warp) and lands within the tolerance's order of the long float64 iteration.
    shape = (24, 28, 20)
    theta = spatial.affine_matrix(3, rotation=(25.0, 0.0, 10.0), scale=(1.2, 0.9, 1.0)).double()
    field = spatial.compose_affine_displacement(theta, smooth_field(shape, 1, torch.float64, 5, 0.3))
    reference = spatial.invert_displacement(field, 80, theta=theta)
    warps = []
    plain_warp = spatial.warp
    monkeypatch.setattr(spatial, "warp", lambda *a, **k: warps.append(1) or plain_warp(*a, **k))
    inverse = spatial.invert_displacement(field.float(), 80, theta=theta.float(), tolerance=1e-3)
    assert 2 <= len(warps) < 20, len(warps)
    error = spatial.normalised_to_voxel(inverse.double() - reference).norm(dim=1)
    assert error.mean() < 2e-3 and error.max() < 0.05, (error.mean(), error.max())
    warps.clear()
    spatial.invert_displacement(field, 12, theta=theta)  # no tolerance: every step runs
    assert len(warps) == 12


def test_a_half_turn_defeats_the_plain_inverse_and_not_the_preconditioned_one():
    # inside_points: away from the border, where the half-turned field stays on the grid
    shape = (24, 20)
    theta = spatial.affine_matrix(2, rotation=180.0).double()
    field = spatial.compose_affine_displacement(theta, smooth_field(shape, 1, torch.float64, 3, 0.2))
    inside_points = spatial.identity_grid(shape, like=field).abs().amax(dim=1) < 0.6
    grid = spatial.identity_grid(shape, like=field)
    errors, reach = {}, {}
    for name, given_theta in (("plain", None), ("preconditioned", theta)):
        inverse = spatial.invert_displacement(field, theta=given_theta)
        errors[name] = spatial.normalised_to_voxel(spatial.compose(field, inverse)).norm(dim=1)[inside_points].max()
        reach[name] = (grid + inverse).abs().amax(dim=1)[inside_points].max()  # > 1: outside the grid
    # the plain iteration settles on points outside the grid, where the border-padded field "agrees"
    assert errors["preconditioned"] < 1e-6 and reach["preconditioned"] < 1.0, (errors, reach)
    assert reach["plain"] > 1.5, reach


# ------------------------------------------------------------------------------------ warps
@EXAMPLES
@given(grids(), st.data(), st.integers(0, 2**16))
def test_warping_a_linear_image_by_an_affine_samples_it_exactly(grid, data, seed):
    """warp(I, u)(x) = I(x + u(x)): exact for a linear image wherever x + u(x) is inside the grid."""
    ndim, shape, dtype, batch = grid
    theta = data.draw(affines(ndim, batch, dtype))
    image, slope, offset = ramp(shape, batch, dtype, seed)
    displacement = spatial.affine_to_displacement(theta, shape)
    points = spatial.identity_grid(shape, like=theta) + displacement
    expected = (slope.view(batch, ndim, *([1] * ndim)) * points).sum(1) + offset.view(batch, *([1] * ndim))
    warped = spatial.warp(image, displacement)[:, 0]
    mask = inside(points)
    tolerance = 8 * max(shape) * EPS[dtype] * (float(slope.abs().sum(1).max()) + float(offset.abs().max()))
    assert worst((warped - expected).abs(), mask) <= tolerance
    exact = spatial.compose_affine_displacement(theta, torch.zeros_like(displacement))
    assert (exact - displacement).abs().max() <= 4 * EPS[dtype]


# ------------------------------------------------------------------------------------ Jacobian
@EXAMPLES
@given(grids(), st.integers(0, 2**16), st.floats(0.01, 0.9))
def test_the_jacobian_of_a_small_smooth_field_is_positive(grid, seed, gradient):
    ndim, shape, dtype, batch = grid
    u = smooth_field(shape, batch, dtype, seed, gradient)
    det = spatial.jacobian_determinant(u)
    assert det.shape == (batch, *shape) and det.dtype == dtype
    # J = I + G with ||G|| <= gradient < 1: every eigenvalue within `gradient` of 1.
    assert det.min() >= (1.0 - gradient) ** ndim - 1e-5
    assert det.max() <= (1.0 + gradient) ** ndim + 1e-5


@EXAMPLES
@given(grids(), st.data())
def test_the_jacobian_of_an_affine_is_its_determinant_everywhere(grid, data):
    ndim, shape, dtype, batch = grid
    theta = data.draw(affines(ndim, batch, dtype))
    det = spatial.jacobian_determinant(spatial.affine_to_displacement(theta, shape))
    expected = torch.linalg.det(theta[:, :, :ndim]).view(batch, *([1] * ndim))
    assert (det - expected).abs().max() <= (1e-4 if dtype == torch.float32 else 1e-10)
    assert det.min() > 0


# ------------------------------------------------------------------------------------ units
@EXAMPLES
@given(grids(), st.data(), st.integers(0, 2**16))
def test_unit_conversions_round_trip(grid, data, seed):
    ndim, shape, dtype, batch = grid
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, ndim, *shape, generator=generator, dtype=dtype)
    back = spatial.normalised_to_voxel(spatial.voxel_to_normalised(u))
    tolerance = 4 * EPS[dtype] * float(u.abs().max())
    assert (back - u).abs().max() <= tolerance
    theta = data.draw(affines(ndim, batch, dtype))
    again = spatial.voxel_affine_to_normalised(spatial.normalised_affine_to_voxel(theta, shape), shape)
    assert (again - theta).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-12) * math.prod(shape) ** (1 / ndim)
