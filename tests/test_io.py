"""NIfTI I/O: round trips keep affines, orientation, atomic writes, refusals, normalisation."""

import nibabel as nib
import numpy as np
import pytest

from firekit.data import io
from firekit.core.errors import FirekitError

LPS = np.array([[-1.2, 0, 0, 40.0], [0, -0.9, 0, 30.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])


def test_round_trip_keeps_data_affine_and_header(tmp_path):
    data = np.random.default_rng(0).random((9, 11, 7)).astype(np.float32)
    path = io.save_nifti(data, LPS, tmp_path / "img.nii.gz")
    volume = io.load_volume(path)
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, LPS)
    assert volume.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(volume.spacing, [1.2, 0.9, 2.5])
    again = io.save_volume(volume, tmp_path / "copy.nii")
    np.testing.assert_allclose(nib.load(again).affine, LPS)


@pytest.mark.parametrize("stored", [(8, 10), (8, 10, 1)])
def test_2d_images_load_as_2d_with_in_plane_affine(tmp_path, stored):
    data = np.arange(80, dtype=np.float32).reshape(stored)
    nib.save(nib.Nifti1Image(data, LPS), tmp_path / "slice.nii.gz")
    volume = io.load_volume(tmp_path / "slice.nii.gz")
    assert volume.shape == (8, 10) and volume.ndim == 2
    np.testing.assert_allclose(volume.affine, [[-1.2, 0, 40], [0, -0.9, 30], [0, 0, 1]])


def test_canonical_reorientation_and_back():
    data = np.random.default_rng(1).random((5, 6, 4)).astype(np.float32)
    volume = io.Volume(data, LPS)
    canonical = io.to_canonical(volume)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    # the same voxel sits at the same world point
    world = LPS @ [1, 2, 3, 1]
    index = np.rint(np.linalg.inv(canonical.affine) @ world).astype(int)[:3]
    assert canonical.data[tuple(index)] == data[1, 2, 3]
    np.testing.assert_array_equal(io.from_canonical(canonical.data, volume), data)


def test_atomic_write_never_overwrites_an_input(tmp_path):
    path = io.save_nifti(np.ones((4, 4, 4), np.float32), np.eye(4), tmp_path / "in.nii.gz")
    with pytest.raises(FirekitError, match="overwrite an input"):
        io.save_nifti(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "in.nii.gz", protect=[path])
    assert io.load_volume(path).data.max() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["in.nii.gz"]  # no temp file left


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"hello", "not a NIfTI"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / ("x.txt" if content else "missing.nii.gz")
    if content:
        path.write_bytes(content)
    with pytest.raises(FirekitError, match=message) as info:
        io.load_volume(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_gzip_and_4d_and_nan(tmp_path):
    good = io.save_nifti(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4), tmp_path / "g.nii.gz")
    truncated = tmp_path / "t.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FirekitError, match="truncated|cannot read"):
        io.load_volume(truncated)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "four.nii.gz")
    with pytest.raises(FirekitError, match="4D"):
        io.load_volume(tmp_path / "four.nii.gz")
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    io.save_nifti(nan, np.eye(4), tmp_path / "nan.nii.gz")
    with pytest.raises(FirekitError, match="NaN"):
        io.load_volume(tmp_path / "nan.nii.gz")


def test_normalise_intensity_range_and_constant():
    values = np.random.default_rng(2).normal(100, 20, (30, 30)).astype(np.float32)
    out = io.normalise_intensity(values)
    assert out.min() == -1.0 and out.max() == 1.0
    with pytest.raises(FirekitError, match="constant"):
        io.normalise_intensity(np.full((5, 5), 3.0))
