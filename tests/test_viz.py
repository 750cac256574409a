"""Reading affines as rotation, scale, shear and translation."""

import numpy as np
import pytest

from firekit.viz import affine_parameters


def rotation_2d(degrees):
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def rotation_3d(x, y, z):
    rx, ry, rz = np.eye(3), np.eye(3), np.eye(3)
    rx[1:, 1:] = rotation_2d(x)
    ry[np.ix_([0, 2], [0, 2])] = rotation_2d(-y)
    rz[:2, :2] = rotation_2d(z)
    return rz @ ry @ rx


def test_2d_affine_comes_apart_into_its_factors():
    linear = rotation_2d(17) @ np.diag([1.3, 0.8]) @ np.array([[1, 0.15], [0, 1]])
    matrix = np.hstack([linear, [[4.0], [-2.5]]])
    p = affine_parameters(matrix)
    np.testing.assert_allclose(p["rotation_deg"], [17], atol=1e-9)
    np.testing.assert_allclose(p["scale"], [1.3, 0.8], atol=1e-9)
    np.testing.assert_allclose(p["shear"], [0.15], atol=1e-9)
    np.testing.assert_allclose(p["translation"], [4.0, -2.5])
    # (n + 1, n + 1) gives the same; the identity is all zeros and ones
    assert affine_parameters(np.vstack([matrix, [0, 0, 1]])) == p
    identity = affine_parameters(np.eye(3))
    assert identity["rotation_deg"] == [0.0] and identity["scale"] == [1.0, 1.0] and identity["shear"] == [0.0]


def test_3d_affine_comes_apart_and_a_reflection_shows_as_a_negative_scale():
    shear = np.array([[1, 0.1, -0.05], [0, 1, 0.2], [0, 0, 1]])
    linear = rotation_3d(10, -20, 30) @ np.diag([1.1, 0.9, 1.4]) @ shear
    p = affine_parameters(np.hstack([linear, [[1.0], [2.0], [3.0]]]))
    np.testing.assert_allclose(p["rotation_deg"], [10, -20, 30], atol=1e-9)
    np.testing.assert_allclose(p["scale"], [1.1, 0.9, 1.4], atol=1e-9)
    np.testing.assert_allclose(p["shear"], [0.1, -0.05, 0.2], atol=1e-9)
    flipped = affine_parameters(np.hstack([np.diag([1.0, 1.0, -2.0]), np.zeros((3, 1))]))
    assert flipped["scale"] == pytest.approx([1.0, 1.0, -2.0])
    with pytest.raises(ValueError, match="n = 2 or 3"):
        affine_parameters(np.eye(5))
