"""Training augmentation: seeded, physical, smooth and invertible, in 2D and 3D."""

import math

import pytest
import torch

from firekit import FirekitError
from firekit.data import augment
from firekit.core import spatial

# Tiny grids with a realistic field of view (about 15 x 17 cm), non-square, anisotropic in 3D.
GRIDS = {2: ((24, 28), 6.0), 3: ((12, 14, 16), (13.0, 12.0, 10.0))}


def spacing_tensor(ndim):
    spacing = GRIDS[ndim][1]
    values = [spacing] * ndim if isinstance(spacing, float) else list(spacing)
    return torch.tensor(values, dtype=torch.float64)


def mm_linear_part(theta, ndim):
    """Linear part of a normalised affine re-expressed in mm (D M_vox D^-1)."""
    shape = GRIDS[ndim][0]
    voxel = spatial.normalised_affine_to_voxel(theta.double(), shape)[0, :, :ndim]
    spacing = spacing_tensor(ndim)
    return voxel * spacing[:, None] / spacing[None, :]


def draw(ndim, seed=0, config=None):
    shape, spacing = GRIDS[ndim]
    return augment.random_transform(shape, spacing, torch.Generator().manual_seed(seed), config)


@pytest.mark.parametrize("ndim", [2, 3])
def test_same_seed_same_transform_other_seed_other_transform(ndim):
    first, again, other = draw(ndim, 3), draw(ndim, 3), draw(ndim, 4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.allclose(first.displacement, other.displacement)
    assert first.theta.shape == (1, ndim, ndim + 1)
    assert first.displacement.shape == first.elastic.shape == (1, ndim, *GRIDS[ndim][0])


@pytest.mark.parametrize("ndim", [2, 3])
def test_strength_zero_is_identity(ndim):
    transform = draw(ndim, 5, augment.AugmentConfig(strength=0.0))
    assert torch.allclose(transform.theta, spatial.identity_affine(ndim), atol=1e-6)
    assert transform.displacement.abs().max() < 1e-6
    assert torch.equal(transform.scales, torch.ones(ndim, dtype=torch.float64))
    image = torch.rand(2, 1, *GRIDS[ndim][0])
    assert torch.allclose(augment.apply(image, transform), image, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_one_axis_changes_by_twenty_to_fifty_percent_times_strength(ndim, strength):
    config = augment.AugmentConfig(strength=strength)
    for seed in range(10):
        transform = draw(ndim, seed, config)
        change = (transform.scales - 1.0).abs()
        assert 0.2 * strength - 1e-9 <= change.max() <= 0.5 * strength + 1e-9
        assert ((change <= 0.1 * strength + 1e-9).sum()) >= ndim - 1
        # Rotation and shear keep volume: det of the mm linear part is the product of the scales.
        det = torch.linalg.det(mm_linear_part(transform.theta, ndim))
        assert math.isclose(float(det), float(transform.scales.prod()), rel_tol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_rotation_is_a_rotation_in_mm_on_a_non_square_anisotropic_grid(ndim):
    shape, spacing = GRIDS[ndim]
    config = augment.AugmentConfig(scale_change=(0.0, 0.0), scale_jitter=0.0, shear=0.0, rotation_deg=20.0)
    theta = augment.random_affine(shape, spacing, torch.Generator().manual_seed(1), config)
    linear = mm_linear_part(theta, ndim)
    assert torch.allclose(linear @ linear.T, torch.eye(ndim, dtype=torch.float64), atol=1e-5)
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(linear)) - (ndim - 2)) / 2.0))))
    assert 0.1 < angle < 20.0 * math.sqrt(ndim)
    # In voxel units the same matrix is not orthogonal: the grid is anisotropic or non-square.
    assert not torch.allclose(theta[0, :, :ndim] @ theta[0, :, :ndim].T, torch.eye(ndim), atol=1e-2)


@pytest.mark.parametrize("ndim", [2, 3])
def test_translation_is_in_mm_about_the_centre(ndim):
    shape, spacing = GRIDS[ndim]
    config = augment.AugmentConfig(scale_change=(0.3, 0.3), rotation_deg=10.0, shear=0.1, translation_mm=0.0)
    theta = augment.random_affine(shape, spacing, torch.Generator().manual_seed(2), config)
    centre = torch.tensor([(s - 1) / 2.0 for s in shape], dtype=torch.float64)
    voxel = spatial.normalised_affine_to_voxel(theta.double(), shape)[0]
    assert torch.allclose(voxel[:, :ndim] @ centre + voxel[:, ndim], centre, atol=1e-4)
    config = augment.AugmentConfig(scale_change=(0.0, 0.0), scale_jitter=0.0, rotation_deg=0.0, shear=0.0)
    theta = augment.random_affine(shape, spacing, torch.Generator().manual_seed(2), config)
    shift_mm = spatial.normalised_affine_to_voxel(theta.double(), shape)[0, :, ndim] * spacing_tensor(ndim)
    assert 0 < shift_mm.abs().max() <= 10.0 + 1e-6


@pytest.mark.parametrize("ndim", [2, 3])
def test_elastic_magnitude_within_bound(ndim):
    shape, spacing = GRIDS[ndim]
    scale = spacing_tensor(ndim).reshape(1, ndim, *([1] * ndim))
    for seed in range(10):
        for config in (augment.AugmentConfig(), augment.AugmentConfig.mild(), augment.AugmentConfig(strength=0.3)):
            field = augment.random_elastic(shape, spacing, torch.Generator().manual_seed(seed), config)
            largest = float((spatial.normalised_to_voxel(field).double() * scale).norm(dim=1).max())
            bound = config.elastic_mm * config.strength
            assert 0.5 * bound - 1e-4 <= largest <= bound + 1e-4


@pytest.mark.parametrize("ndim", [2, 3])
def test_default_transform_does_not_fold(ndim):
    for seed in range(10):
        transform = draw(ndim, seed)
        assert spatial.jacobian_determinant(transform.displacement).min() > 0
        assert spatial.jacobian_determinant(transform.elastic).min() > 0.3


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_is_affine_after_elastic(ndim):
    transform = draw(ndim, 7)
    expected = spatial.compose_affine_displacement(transform.theta, transform.elastic)
    assert torch.allclose(transform.displacement, expected)
    labels = torch.randint(0, 4, (1, 1, *GRIDS[ndim][0]))
    warped = augment.apply_labels(labels, transform)
    assert warped.shape == labels.shape and set(warped.unique().tolist()) <= {0, 1, 2, 3}


def test_config_round_trip_and_one_line_errors():
    config = augment.AugmentConfig.mild(strength=0.5)
    assert augment.AugmentConfig.from_dict(config.to_dict()) == config
    assert config.with_strength(1.0).strength == 1.0
    with pytest.raises(FirekitError, match="strength"):
        augment.AugmentConfig(strength=1.5)
    with pytest.raises(FirekitError, match="unknown fields"):
        augment.AugmentConfig.from_dict({"scale": 2})
    with pytest.raises(FirekitError, match="spacing_mm"):
        augment.random_affine((8, 8), (1.0, 1.0, 1.0), torch.Generator())
