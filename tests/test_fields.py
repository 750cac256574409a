"""ITK displacement fields from any tool: applying them, and their inverse consistency."""

import numpy as np
import torch

from firekit.registration import fields
from firekit.data import io
from firekit.registration.pipeline import register

# An oblique, anisotropic 2D grid (RAS mm), so axis order, signs and spacing all matter.
AFFINE = np.array([[0.0, -1.3, 40.0], [1.1, 0.0, -30.0], [0.0, 0.0, 1.0]])
SHAPE = (48, 56)


def affine_field(matrix: np.ndarray, grid: io.Volume) -> np.ndarray:
    """ITK/LPS field of ``x -> matrix @ x`` (RAS mm, (3, 3)) on ``grid``."""
    index = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1).astype(np.float64)
    world = index @ grid.affine[:2, :2].T + grid.affine[:2, 2]
    moved = world @ matrix[:2, :2].T + matrix[:2, 2]
    return ((moved - world) * io.lps_flip(2)).astype(np.float64)


def labels_volume() -> io.Volume:
    from firekit.data.phantom import head_labels

    return io.Volume(head_labels(SHAPE, seed=3).numpy().astype(np.int16), AFFINE)


def test_zero_field_is_the_identity():
    labels = labels_volume()
    warped = fields.apply_field(labels, np.zeros((*SHAPE, 2)), labels, labels=True)
    np.testing.assert_array_equal(warped, labels.data)
    assert warped.dtype == labels.data.dtype


def test_shift_by_whole_voxels_moves_the_labels():
    labels = labels_volume()
    shift = np.eye(3)
    shift[:2, 2] = AFFINE[:2, :2] @ np.array([3.0, -2.0])  # 3 voxels along axis 0, -2 along axis 1
    warped = fields.apply_field(labels, affine_field(shift, labels), labels, labels=True)
    np.testing.assert_array_equal(warped[5:-5, 5:-5], labels.data[8:-2, 3:-7])


def test_apply_field_matches_register_own_warp():
    from firekit.data.phantom import contrast

    labels = labels_volume()
    fixed = labels.with_data(contrast(torch.as_tensor(labels.data).long(), "t1", seed=1).numpy())
    rotation = np.eye(3)
    angle = np.deg2rad(8)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    moving_labels = labels.with_data(fields.apply_field(labels, affine_field(rotation, labels), labels, labels=True))
    moving = labels.with_data(contrast(torch.as_tensor(moving_labels.data).long(), "t2", seed=2).numpy())
    result = register(None, moving, fixed, refine=5, spacing=None)
    ours = fields.apply_field(moving_labels, result.displacement, fixed, labels=True)
    theirs = result.apply(moving_labels).data
    assert (ours == theirs).mean() > 0.999


def test_inverse_consistency_of_an_affine_and_its_inverse():
    grid = labels_volume()
    matrix = np.array([[1.1, 0.1, 4.0], [-0.05, 0.95, -3.0], [0.0, 0.0, 1.0]])
    forward = affine_field(matrix, grid)
    exact = fields.inverse_consistency(forward, affine_field(np.linalg.inv(matrix), grid), grid, grid)
    inside = (slice(12, -12), slice(12, -12))  # points that stay inside the grid
    assert exact[inside].max() < 1e-6
    # Against a zero backward field the residual is the forward displacement, in voxels.
    residual = fields.inverse_consistency(forward, np.zeros_like(forward), grid, grid)
    voxels = np.linalg.norm((forward * io.lps_flip(2)) @ np.linalg.inv(AFFINE[:2, :2]).T, axis=-1)
    np.testing.assert_allclose(residual, voxels, rtol=1e-9)
