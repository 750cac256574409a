"""Spatial transforms: exact answers on tiny inputs, 2D and 3D."""

import math

import pytest
import torch

from firekit.core import spatial

SHAPES = {2: (20, 24), 3: (12, 14, 16)}


def smooth_image(shape, batch=2, channels=1):
    """A smooth random image (sum of low-frequency cosines), so interpolation error is small."""
    grid = spatial.identity_grid(shape)
    generator = torch.Generator().manual_seed(0)
    image = torch.zeros(batch, channels, *shape)
    for _ in range(4):
        freq = torch.rand(len(shape), generator=generator) * 2.0
        phase = torch.rand(1, generator=generator) * 6.28
        image += torch.cos((grid * freq.view(1, -1, *([1] * len(shape)))).sum(1, keepdim=True) + phase)
    return image


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_grid_spans_minus_one_to_one(ndim):
    grid = spatial.identity_grid(SHAPES[ndim])
    assert grid.shape == (1, ndim, *SHAPES[ndim])
    for axis in range(ndim):
        line = grid[0, axis].movedim(axis, 0).flatten(1)[:, 0]
        assert torch.allclose(line, torch.linspace(-1, 1, SHAPES[ndim][axis]))


@pytest.mark.parametrize("ndim", [2, 3])
def test_zero_displacement_and_identity_affine_return_input(ndim):
    image = torch.randn(2, 3, *SHAPES[ndim])
    zero = torch.zeros(2, ndim, *SHAPES[ndim])
    assert torch.allclose(spatial.warp(image, zero), image, atol=1e-5)
    identity = spatial.affine_to_displacement(spatial.identity_affine(ndim, 2), SHAPES[ndim])
    assert identity.abs().max() < 1e-6
    assert torch.allclose(spatial.warp(image, identity), image, atol=1e-5)
    labels = torch.randint(0, 4, (2, 1, *SHAPES[ndim]))
    assert torch.equal(spatial.warp_labels(labels, zero), labels)


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_moves_content_in_the_stated_direction(ndim):
    """warped(x) = image(x + u): a shift of +1 voxel along axis 0 reads the next voxel."""
    shape = SHAPES[ndim]
    image = torch.arange(shape[0], dtype=torch.float32).view(1, 1, -1, *([1] * (ndim - 1))).expand(1, 1, *shape)
    one_voxel = torch.zeros(1, ndim, *shape)
    one_voxel[:, 0] = 1.0
    warped = spatial.warp(image, spatial.voxel_to_normalised(one_voxel))
    assert torch.allclose(warped[0, 0, :-1], image[0, 0, 1:], atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_then_inverse_returns_image_away_from_borders(ndim):
    shape = SHAPES[ndim]
    image = smooth_image(shape)
    theta = spatial.affine_matrix(ndim, rotation=[12.0] * (1 if ndim == 2 else 3), scale=0.9,
                                  shear=[0.05] * (1 if ndim == 2 else 3), translation=0.05).repeat(2, 1, 1)
    forward = spatial.warp(image, spatial.affine_to_displacement(theta, shape))
    back = spatial.warp(forward, spatial.affine_to_displacement(spatial.invert_affine(theta), shape))
    inner = tuple(slice(s // 4, s - s // 4) for s in shape)
    error = (back - image)[(slice(None), slice(None), *inner)].abs()
    assert error.max() < 0.05 * image.abs().max()
    # and a non-trivial transform really changed the image
    assert (forward - image)[(slice(None), slice(None), *inner)].abs().max() > 0.2


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_matrix_rotation_and_composition(ndim):
    angles = [30.0] if ndim == 2 else [30.0, 0.0, 0.0]
    rot = spatial.affine_matrix(ndim, rotation=angles, dtype=torch.float64)
    linear = rot[0, :, :ndim]
    assert torch.allclose(linear @ linear.T, torch.eye(ndim, dtype=torch.float64), atol=1e-12)
    assert math.isclose(float(torch.linalg.det(linear)), 1.0, abs_tol=1e-12)
    twice = spatial.compose_affines(rot, rot)
    expected = spatial.affine_matrix(ndim, rotation=[2 * a for a in angles], dtype=torch.float64)
    assert torch.allclose(twice, expected, atol=1e-12)
    assert torch.allclose(spatial.compose_affines(rot, spatial.invert_affine(rot)),
                          spatial.identity_affine(ndim, 1, like=rot), atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_affine_displacement_is_affine_after_field(ndim):
    """phi_af o phi_nr evaluated in closed form equals the generic composition of the two fields."""
    shape = SHAPES[ndim]
    theta = spatial.affine_matrix(ndim, scale=1.1, translation=0.1)
    flow = 0.05 * smooth_image(shape, batch=1, channels=ndim)
    exact = spatial.compose_affine_displacement(theta, flow)
    generic = spatial.compose(spatial.affine_to_displacement(theta, shape), flow)
    inner = tuple(slice(2, s - 2) for s in shape)
    assert torch.allclose(exact[(slice(None), slice(None), *inner)], generic[(slice(None), slice(None), *inner)],
                          atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_equals_sequential_warps(ndim):
    shape = SHAPES[ndim]
    image = smooth_image(shape, batch=1)
    outer = 0.04 * smooth_image(shape, batch=1, channels=ndim)
    inner = -0.03 * smooth_image(shape, batch=1, channels=ndim).flip(1)
    sequential = spatial.warp(spatial.warp(image, outer), inner)
    once = spatial.warp(image, spatial.compose(outer, inner))
    crop = tuple(slice(2, s - 2) for s in shape)
    assert (sequential - once)[(slice(None), slice(None), *crop)].abs().max() < 0.02


@pytest.mark.parametrize("ndim", [2, 3])
def test_soft_labels_are_probabilities_and_match_nearest_on_identity(ndim):
    shape = SHAPES[ndim]
    labels = torch.randint(0, 3, (1, 1, *shape))
    flow = 0.05 * smooth_image(shape, batch=1, channels=ndim)
    soft = spatial.warp_labels(labels, flow, soft=True, num_classes=3)
    assert soft.shape == (1, 3, *shape)
    assert torch.allclose(soft.sum(1), torch.ones(1, *shape), atol=1e-5)
    soft_id = spatial.warp_labels(labels, torch.zeros(1, ndim, *shape), soft=True)
    assert torch.equal(soft_id.argmax(1, keepdim=True), labels)


@pytest.mark.parametrize("ndim", [2, 3])
def test_unit_conversions_round_trip_and_scale(ndim):
    shape = SHAPES[ndim]
    field = torch.randn(2, ndim, *shape)
    voxels = spatial.normalised_to_voxel(field)
    assert torch.allclose(spatial.voxel_to_normalised(voxels), field, atol=1e-6)
    # normalised 2 = the whole axis = (S - 1) voxels
    assert torch.allclose(voxels[:, 0], field[:, 0] * (shape[0] - 1) / 2)
    affine = torch.diag(torch.tensor([2.0, -1.5, 3.0][:ndim] + [1.0]))
    affine[:ndim, ndim] = 7.0  # translation must not affect displacements
    mm = spatial.voxel_to_mm(voxels, affine)
    assert torch.allclose(mm[:, 1], -1.5 * voxels[:, 1])
    assert torch.allclose(spatial.mm_to_voxel(mm, affine.numpy()), voxels, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_affine_is_its_determinant(ndim):
    shape = SHAPES[ndim]
    theta = spatial.affine_matrix(ndim, rotation=[20.0] * (1 if ndim == 2 else 3), scale=[1.3, 0.8, 1.1][:ndim],
                                  shear=[0.1] * (1 if ndim == 2 else 3))
    jac = spatial.jacobian_determinant(spatial.affine_to_displacement(theta, shape))
    expected = float(torch.linalg.det(theta[0, :, :ndim]))
    assert torch.allclose(jac, torch.full_like(jac, expected), atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_quadratic_field_matches_analytic(ndim):
    """u_0 = a * x_0^2 (voxels) gives det J = 1 + 2 a x_0 exactly with central differences."""
    shape = SHAPES[ndim]
    a = 0.01
    x0 = torch.arange(shape[0], dtype=torch.float32).view(-1, *([1] * (ndim - 1)))
    field = torch.zeros(1, ndim, *shape)
    field[0, 0] = a * x0 ** 2
    jac = spatial.jacobian_determinant(spatial.voxel_to_normalised(field))
    expected = (1 + 2 * a * x0).expand(*shape)
    assert torch.allclose(jac[0, 1:-1], expected[1:-1], atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_flags_folding(ndim):
    shape = SHAPES[ndim]
    flip = spatial.affine_matrix(ndim, scale=[-1.0] + [1.0] * (ndim - 1))
    jac = spatial.jacobian_determinant(spatial.affine_to_displacement(flip, shape))
    assert (jac < 0).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_inverse_consistency_of_affine_and_its_inverse(ndim):
    shape = SHAPES[ndim]
    theta = spatial.affine_matrix(ndim, rotation=[10.0] * (1 if ndim == 2 else 3), scale=0.95, translation=0.04)
    forward = spatial.affine_to_displacement(theta, shape)
    backward = spatial.affine_to_displacement(spatial.invert_affine(theta), shape)
    error = spatial.inverse_consistency_error(forward, backward)
    inner = tuple(slice(s // 4, s - s // 4) for s in shape)
    assert error[(slice(None), *inner)].max() < 1e-3
    # a transform composed with itself is far from the identity
    assert spatial.inverse_consistency_error(forward, forward)[(slice(None), *inner)].mean() > 0.5


def test_resize_displacement_keeps_normalised_values():
    field = torch.ones(1, 2, 8, 8) * 0.3
    assert torch.allclose(spatial.resize_displacement(field, (32, 32)), torch.full((1, 2, 32, 32), 0.3))


def test_bad_shapes_give_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, ndim, \*spatial\)"):
        spatial.warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="spatial dims"):
        spatial.warp(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, ndim, ndim \+ 1\)"):
        spatial.affine_to_displacement(torch.zeros(1, 2, 2), (8, 8))


def test_grid_first_built_in_inference_mode_still_trains():
    """The grid cache must not hand an inference tensor to a later training step."""
    shape = (11, 13)
    spatial._GRID_CACHE.pop(((11, 13), torch.float32, torch.device("cpu")), None)
    with torch.inference_mode():
        spatial.affine_to_displacement(spatial.identity_affine(2), shape)
    theta = spatial.identity_affine(2).requires_grad_(True)
    spatial.warp(torch.rand(1, 1, *shape), spatial.affine_to_displacement(theta, shape)).sum().backward()
    assert theta.grad is not None
