"""ITK formats (NRRD, MetaImage, DICOM series) through SimpleITK: the geometry NIfTI keeps, kept.

Files are converted by SimpleITK itself (``sitk.ReadImage`` of the NIfTI, ``sitk.WriteImage``), so
the tests compare firekit's reading of ITK's own files with its reading of the NIfTI.
"""

import json
import locale
import os
import subprocess
import sys

import numpy as np
import pytest

from firekit.data import io, itk_io
from firekit.core.errors import FirekitError

import SimpleITK as sitk  # noqa: E402  (the dev extra installs it: a missing install fails, never skips)

SUFFIXES = [".nrrd", ".nhdr", ".mha", ".mhd"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def rotation(degrees) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    out = np.eye(3)
    for axis, angle in enumerate(np.radians(degrees)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        turn = np.eye(3)
        turn[[i, i, j, j], [i, j, i, j]] = c, -s, s, c
        out = turn @ out
    return out


def oblique_affine(spacing=(0.7, 1.3, 2.9), degrees=(20, -15, 33), origin=(-40.125, 12.5, 77.75)) -> np.ndarray:
    """4x4 RAS affine: an oblique rotation times anisotropic voxel sizes (mm)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(degrees) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def blob(shape, shift=(0.0, 0.0), seed=0) -> np.ndarray:
    """A bright ellipse with a brighter off-centre core, shifted by ``shift`` (fraction of the field)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum((g - d) ** 2 * w for g, d, w in zip(grids, shift, (1.0, 1.6)))
    core = sum((g - d - c) ** 2 for g, d, c in zip(grids, shift, (0.25, -0.2)))
    noise = np.random.default_rng(seed).random(shape)
    return (np.exp(-3 * r2) + 0.6 * np.exp(-12 * core) + 0.02 * noise).astype(np.float32)


def convert(nifti, suffix: str):
    """The same image written by SimpleITK in another format."""
    out = nifti.with_name(nifti.name.removesuffix(".nii.gz") + suffix)
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(out))
    return out


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_simpleitk_conversion_keeps_the_affine_and_data(tmp_path, suffix):
    data = np.random.default_rng(1).random((9, 11, 7)).astype(np.float32)
    nifti = io.save_nifti(data, oblique_affine(), tmp_path / "oblique.nii.gz")
    labels = io.save_nifti((data * 4).astype(np.int16), oblique_affine(), tmp_path / "labels.nii.gz")
    reference = io.load_volume(nifti)
    volume = io.load_volume(convert(nifti, suffix))
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(volume.data, reference.data)
    np.testing.assert_array_equal(io.load_labels(convert(labels, suffix)).data, io.load_labels(labels).data)


def test_2d_image_stored_as_one_slice_loads_as_2d(tmp_path):
    affine = oblique_affine(degrees=(0, 0, 25))
    nifti = io.save_nifti(blob((12, 10)), affine, tmp_path / "slice.nii.gz")
    volume = io.load_volume(convert(nifti, ".nrrd"))
    assert volume.ndim == 2
    np.testing.assert_allclose(volume.affine, io.load_volume(nifti).affine, atol=1e-6, rtol=0)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_written_files_carry_the_geometry_in_lps(tmp_path, suffix, ndim):
    affine = oblique_affine() if ndim == 3 else oblique_affine(degrees=(0, 0, 25))[np.ix_([0, 1, 3], [0, 1, 3])]
    data = np.random.default_rng(2).random((6, 5, 4)[:ndim]).astype(np.float32)
    path = io.save_nifti(data, affine, tmp_path / f"image{suffix}")
    image = sitk.ReadImage(str(path))
    assert image.GetDimension() == ndim and image.GetSize() == data.shape
    flip = np.diag([-1.0, -1.0, 1.0][:ndim])
    linear = np.asarray(image.GetDirection()).reshape(ndim, ndim) * np.asarray(image.GetSpacing())
    np.testing.assert_allclose(linear, flip @ affine[:ndim, :ndim], atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), flip @ affine[:ndim, ndim], atol=1e-12)
    np.testing.assert_array_equal(io.load_volume(path).data, data)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def write_dicom_series(folder, array_zyx: np.ndarray, spacing, origin, direction) -> None:
    """One DICOM file per slice, with the tags a series reader needs (UIDs, position, orientation)."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.ravel().tolist())
    root = "1.2.826.0.1.3680043.2.1125.99."
    tags = {"0008|0060": "MR", "0008|0021": "20261202", "0008|0031": "120000", "0008|103e": "firekit test",
            "0020|000d": root + "1", "0020|000e": root + "2", "0018|0050": f"{spacing[2]:.6f}",
            "0020|0037": "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # GDCM's writer sets the C locale, which would turn this process's text encoding to ASCII.
    saved_locale = locale.setlocale(locale.LC_ALL)
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0008|0018", f"{root}3.{k + 1}")
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    locale.setlocale(locale.LC_ALL, saved_locale)


def test_dicom_series_folder_loads_with_its_geometry(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    array = (np.random.default_rng(3).random((5, 7, 6)) * 1000).astype(np.int16)  # (Z, Y, X)
    spacing, origin, direction = (0.8, 0.9, 2.5), (-10.5, 20.25, 30.0), rotation((10, -5, 20))
    write_dicom_series(folder, array, spacing, origin, direction)
    (folder / "notes.txt").write_text("not DICOM")  # other files in the folder are ignored
    volume = io.load_volume(folder)
    expected = np.eye(4)
    expected[:3, :3] = direction * spacing
    expected[:3, 3] = origin
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ expected  # ITK's LPS -> RAS
    assert volume.shape == (6, 7, 5)
    np.testing.assert_allclose(volume.affine, expected, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(volume.data, array.transpose(2, 1, 0).astype(np.float32))


def test_registering_nrrd_files_gives_the_nifti_field(tmp_path):
    from firekit.registration.pipeline import register

    # anisotropic, axes swapped and flipped, with values float32 holds exactly: SimpleITK's conversion
    # (NIfTI stores float32; ITK rebuilds spacing x direction) is then exact. With an oblique affine it
    # moves the geometry by ~1e-7 mm, which refinement's float32 steps turn into ~0.07 mm.
    affine = np.array([[0, -0.75, 0, 20.5], [1.25, 0, 0, -30.25], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
    moving = io.save_nifti(blob((48, 56), shift=(0.12, -0.08)), affine, tmp_path / "moving.nii.gz")
    fixed = io.save_nifti(blob((48, 56), seed=1), affine, tmp_path / "fixed.nii.gz")
    by_nifti = register(None, moving, fixed, refine="auto")
    by_nrrd = register(None, convert(moving, ".nrrd"), convert(fixed, ".nrrd"), refine="auto")
    np.testing.assert_array_equal(by_nrrd.fixed.affine, by_nifti.fixed.affine)
    np.testing.assert_array_equal(by_nrrd.moving.affine, by_nifti.moving.affine)
    assert np.abs(by_nifti.displacement).max() > 1.0  # a real registration, in mm
    np.testing.assert_allclose(by_nrrd.displacement, by_nifti.displacement, atol=1e-4, rtol=0)


def test_outputs_in_itk_formats_apply_in_simpleitk(tmp_path):
    """warped / labels / field written as .nrrd/.mha/.nhdr: SimpleITK's warp with the field is firekit's."""
    from firekit.workflows import register_files

    affine = oblique_affine(spacing=(1.1, 0.9, 1.0), degrees=(0, 0, 15))
    moving = io.save_nifti(blob((48, 56), shift=(0.1, -0.1)), affine, tmp_path / "moving.nii.gz")
    fixed = io.save_nifti(blob((48, 56), seed=1), affine, tmp_path / "fixed.nii.gz")
    labels = io.save_nifti((blob((48, 56), shift=(0.1, -0.1)) > 0.5).astype(np.int16), affine, tmp_path / "ml.nii.gz")
    moving_mha, fixed_nrrd = convert(moving, ".mha"), convert(fixed, ".nrrd")
    out = {"out": tmp_path / "warped.nrrd", "out_labels": tmp_path / "labels.nhdr", "field": tmp_path / "field.mha"}
    result = register_files(None, moving_mha, fixed_nrrd, moving_labels=labels, refine=20, **out)
    assert np.abs(result.displacement).max() > 1.0  # a real registration, in mm
    field = sitk.ReadImage(str(out["field"]))
    assert field.GetDimension() == 2 and field.GetNumberOfComponentsPerPixel() == 2  # a vector image
    np.testing.assert_array_equal(io.load_field(out["field"], result.fixed), result.displacement.astype(np.float32))
    assert (tmp_path / "labels.raw.gz").is_file()
    np.testing.assert_array_equal(io.load_labels(out["out_labels"]).data, result.apply(labels).data)
    warped = sitk.ReadImage(str(out["out"]))
    np.testing.assert_allclose(io.load_volume(out["out"]).affine, result.fixed.affine, atol=1e-12)
    by_itk = sitk.Resample(sitk.ReadImage(str(moving_mha))[:, :, 0], warped,
                           sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)), sitk.sitkLinear)
    mine = sitk.GetArrayFromImage(warped).T
    inside = (slice(4, -4), slice(4, -4))
    assert np.abs(sitk.GetArrayFromImage(by_itk).T[inside] - mine[inside]).mean() < 1e-3 * np.ptp(mine)


def assert_one_line(error: pytest.ExceptionInfo, path) -> None:
    text = str(error.value)
    assert "\n" not in text and str(path) in text, text


def test_corrupt_file_and_empty_folder_give_one_line_errors(tmp_path):
    corrupt = tmp_path / "corrupt.mha"
    corrupt.write_bytes(b"ObjectType = Image\nNDims = 3\nnot a header\x00\x01")
    with pytest.raises(FirekitError, match="cannot read as MetaImage") as error:
        io.load_volume(corrupt)
    assert_one_line(error, corrupt)
    good = io.save_nifti(np.ones((8, 8, 8), np.float32), np.eye(4), tmp_path / "good.mha")
    truncated = tmp_path / "truncated.mha"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(FirekitError, match="cannot read") as error:
        io.load_volume(truncated)
    assert_one_line(error, truncated)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FirekitError, match="no DICOM series") as error:
        io.load_volume(empty)
    assert_one_line(error, empty)
    with pytest.raises(FirekitError, match="output name must end in") as error:
        io.save_nifti(np.ones((4, 4), np.float32), np.eye(3), tmp_path / "out.dcm")
    assert_one_line(error, tmp_path / "out.dcm")


def test_field_of_the_wrong_kind_is_refused(tmp_path):
    grid = io.Volume(np.zeros((6, 5, 4), np.float32), np.eye(4))
    scalar = io.save_nifti(np.zeros((6, 5, 4), np.float32), np.eye(4), tmp_path / "scalar.nrrd")
    with pytest.raises(FirekitError, match="not an ITK 3D displacement field") as error:
        io.load_field(scalar, grid)
    assert_one_line(error, scalar)
    vector = io.save_nifti(np.zeros((6, 5, 4, 3), np.float32), np.eye(4), tmp_path / "v.mha",
                           intent=io.NIFTI_INTENT_VECTOR)
    with pytest.raises(FirekitError, match="values per voxel") as error:
        io.load_volume(vector)
    assert_one_line(error, vector)


def test_missing_simpleitk_names_the_file_and_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "image.nrrd"
    path.write_bytes(b"NRRD0004\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK now raises ImportError
    for call in (lambda: io.load_volume(path),
                 lambda: io.save_nifti(np.ones((4, 4), np.float32), np.eye(3), tmp_path / "out.mha")):
        with pytest.raises(FirekitError, match=r"pip install 'firekit\[itk\]'") as error:
            call()
        assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
    assert not (tmp_path / "out.mha").exists()


def test_header_data_output_never_overwrites_an_input_data_file(tmp_path):
    source = io.save_nifti(np.ones((4, 4, 4), np.float32), np.eye(4), tmp_path / "scan.nhdr")
    with pytest.raises(FirekitError, match="data file"):
        io.check_output_path(tmp_path / "scan.mhd", [source])
    assert itk_io.data_file(tmp_path / "scan.mhd").name == "scan.zraw"


def test_cli_registers_itk_files_and_refuses_a_corrupt_one_in_one_line(tmp_path):
    affine = oblique_affine(spacing=(1.1, 0.9, 1.0), degrees=(0, 0, 15))
    moving = convert(io.save_nifti(blob((48, 56), shift=(0.1, 0.0)), affine, tmp_path / "m.nii.gz"), ".nrrd")
    fixed = convert(io.save_nifti(blob((48, 56), seed=1), affine, tmp_path / "f.nii.gz"), ".mha")
    corrupt = tmp_path / "corrupt.mha"
    corrupt.write_bytes(b"ObjectType = Image\nNDims = 3\n\x00")

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "firekit.cli", "register", "--no-network", "--refine", "10",
                               *map(str, argv)], capture_output=True, text=True, env=ENV, timeout=600)

    done = run("--moving", moving, "--fixed", fixed, "--out", tmp_path / "w.nrrd", "--field", tmp_path / "u.mha",
               "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["written"] == [str(tmp_path / "w.nrrd"), str(tmp_path / "u.mha")]
    assert sitk.ReadImage(str(tmp_path / "u.mha")).GetNumberOfComponentsPerPixel() == 2
    refused = run("--moving", corrupt, "--fixed", fixed, "--out", tmp_path / "x.nrrd")
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and str(corrupt) in lines[0] and "cannot read as MetaImage" in lines[0], refused.stderr
    assert not (tmp_path / "x.nrrd").exists()


def test_itk_extra_and_make_test_install_simpleitk():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("itk", "dev"):
        assert any(spec.lower().startswith("simpleitk") for spec in extras[name]), name
    assert 'pip install --quiet -e ".[dev]"' in (root / "Makefile").read_text()  # what `make test` installs
