"""The inverse field (fixed <- moving, on the moving grid): fields.invert_field and register --inverse-field.

Known maps (a 20-degree turn, 30-50 % scalings, a shift and a smooth warp, between grids of other
shapes, spacings and orientations) are inverted in 2D and 3D; a real registration's inverse, written
by the CLI, composes with its field to the identity inside the brain and carries the fixed labels
onto the moving grid through ``firekit apply`` as well as the field carries the moving labels the
other way.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from firekit.registration import fields
from firekit.data import io
from firekit.core import metrics, spatial
from firekit.registration.apply import FieldTransform
from firekit.cli import main as cli_main
from firekit.data.pairs import map_points
from firekit.data.protocol import axial_slice

TOLERANCE = 0.01  # mm, invert_field's default


def grids(ndim: int) -> tuple[io.Volume, io.Volume]:
    """An oblique, anisotropic fixed grid and a moving grid of another shape, spacing and turn."""
    fixed = np.eye(ndim + 1)
    fixed[:2, :2] = [[0.0, -1.3], [1.1, 0.0]]
    fixed[:ndim, ndim] = [30.0, -25.0, -20.0][:ndim]
    moving = np.diag([1.6, 1.4, 1.5, 1.0][-ndim - 1:])
    moving[:ndim, ndim] = [-35.0, -30.0, -25.0][:ndim]
    if ndim == 3:
        fixed[2, 2] = 1.5
    shapes = ((40, 48, 32), (44, 38, 36))
    return tuple(io.Volume(np.zeros(shape[:ndim], np.float32), affine) for shape, affine in zip(shapes, (fixed, moving)))


def turn(ndim: int, degrees: float, scales, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS world map ``(n + 1, n + 1)``: axes scaled by ``scales``, turned by ``degrees`` in the first
    plane, shifted by ``shift`` mm."""
    angle = math.radians(degrees)
    matrix = np.eye(ndim + 1)
    matrix[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    matrix[:ndim, :ndim] = matrix[:ndim, :ndim] @ np.diag(scales)
    matrix[:ndim, ndim] = shift[:ndim]
    return matrix


def known_affine(ndim: int, scale: float) -> np.ndarray:
    """Fixed -> moving points: a 20-degree turn, ``scale`` along one axis and 0.7 along the other(s), a shift."""
    return turn(ndim, 20.0, [scale] + [0.7] * (ndim - 1), (4.0, -3.0, 2.0))


def mapped(points: torch.Tensor, affine: np.ndarray, warp_mm: float) -> torch.Tensor:
    """``affine`` then a smooth warp (``warp_mm`` at most, 60 mm wavelength) of RAS points ``(1, n, *S)``."""
    n = points.shape[1]
    warp = torch.stack([torch.sin(points[:, (i + 1) % n] * (2 * math.pi / 60.0)) for i in range(n)], 1) * warp_mm
    return map_points(torch.as_tensor(affine[:n])[None], points) + warp


def itk_field(grid: io.Volume, affine: np.ndarray, warp_mm: float) -> np.ndarray:
    """The ITK field ``(*S, n)`` (mm, LPS) of :func:`mapped` on ``grid``."""
    points = fields.world_points(grid)
    return ((mapped(points, affine, warp_mm) - points)[0].movedim(0, -1) * torch.as_tensor(io.lps_flip(grid.ndim))).numpy()


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("start", ["fitted", "identity"])
def test_an_affine_field_inverts_to_the_affine_inverse(ndim, start):
    fixed, moving = grids(ndim)
    affine = known_affine(ndim, 1.5)
    given = None if start == "fitted" else np.eye(ndim + 1)  # identity: the iteration has all the work
    inverse = fields.invert_field(itk_field(fixed, affine, 0.0), fixed.affine, moving.shape, moving.affine, given)
    exact = itk_field(moving, np.linalg.inv(affine), 0.0)
    error = np.linalg.norm(inverse.field.numpy() - exact, axis=-1)[inverse.inside.numpy()]
    assert 0.3 < inverse.inside.double().mean() < 0.6  # part of moving lies beyond fixed's field of view
    assert inverse.max_residual <= TOLERANCE
    # the residual bounds the error through the inverse affine (|A^-1| = 1 / 0.7)
    assert error.max() < (1e-6 if start == "fitted" else TOLERANCE / 0.7), (error.max(), inverse.iterations)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("scale", [1.5, 0.5])
def test_a_turned_scaled_warped_field_is_inverted(ndim, scale):
    fixed, moving = grids(ndim)
    affine = known_affine(ndim, scale)
    field = itk_field(fixed, affine, 4.0)
    inverse = fields.invert_field(field, fixed.affine, moving.shape, moving.affine, affine)
    assert inverse.max_residual <= TOLERANCE and inverse.mean_residual <= TOLERANCE
    assert inverse.iterations < 100  # converged, not stopped
    assert inverse.inside.any()
    # forward o inverse, through firekit apply's reading of both fields (ITK: border value outside)
    forward, backward = FieldTransform(field, fixed.affine), FieldTransform(inverse.field.numpy(), moving.affine)
    y = fields.world_points(moving)
    composed = (forward(backward(y)) - y).norm(dim=1)[0][inverse.inside]
    assert composed.max() <= TOLERANCE + 1e-9
    # against the true map (not its linear interpolation on the fixed grid): 0.018-0.024 mm measured
    truth = (mapped(backward(y), affine, 4.0) - y).norm(dim=1)[0][inverse.inside]
    assert truth.max() < 0.05, truth.max()
    # inverse o forward on the fixed points whose image lies among moving points that were inverted
    # inside fixed: v is linear between moving's voxels, so this is its interpolation error (0.06 mm
    # at worst for the 1.5 scaling, 0.41 mm for 0.5, which stretches v's curvature; 0.02-0.09 mm mean)
    x = fields.world_points(fixed)
    image = forward(x)
    inverted = torch.as_tensor(inverse.inside, dtype=torch.float64)[None, None]
    within = spatial.sample(inverted, fields.world_to_voxels(image, moving.affine))[0, 0] > 1 - 1e-9
    assert within.double().mean() > 0.5
    error = (backward(image) - x).norm(dim=1)[0][within]
    assert error.max() < 0.5 and error.mean() < 0.1, (error.max(), error.mean())


def test_a_folded_field_has_no_inverse_and_the_residual_says_so():
    fixed, moving = grids(2)
    field = itk_field(fixed, np.eye(3), 12.0)  # |warp'| = 12 * 2 pi / 60 = 1.26 > 1: the map folds
    inverse = fields.invert_field(field, fixed.affine, moving.shape, moving.affine, iterations=30)
    assert inverse.iterations == 30
    assert inverse.max_residual > 1.0 and inverse.max_residual > inverse.mean_residual > 0


def test_bad_arguments_are_named():
    fixed, moving = grids(2)
    field = itk_field(fixed, np.eye(3), 0.0)
    with pytest.raises(ValueError, match=r"moving_shape must have 2 sizes"):
        fields.invert_field(field, fixed.affine, (4, 4, 4), moving.affine)
    with pytest.raises(ValueError, match=r"affine must be \(3, 3\)"):
        fields.invert_field(field, fixed.affine, moving.shape, moving.affine, np.eye(4))
    with pytest.raises(ValueError, match=r"field must be \(\*spatial, n\)"):
        fields.invert_field(field[..., :1], fixed.affine, moving.shape, moving.affine)


# ------------------------------------------------------------------------------- a real registration
def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "firekit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    scores = metrics.dice(torch.as_tensor(a.astype(np.int64)), torch.as_tensor(b.astype(np.int64)), (1, 2, 3))
    return float(np.mean(list(scores.values())))


@pytest.fixture(scope="module")
def pair(tiny_demo, tmp_path_factory):
    """Axial slices of two demo subjects (4 mm): fixed T1; moving T2, cropped, its header turned by 20
    degrees and scaled by 1.3 (so the two grids differ), and their labels, as files."""
    root = tmp_path_factory.mktemp("inverse")
    files = {}
    for role, split, contrast, crop, world in (("fixed", "test", "T1", 0, np.eye(3)),
                                               ("moving", "val", "T2", 3, turn(2, 20.0, [1.3, 1.3]))):
        subject = next((tiny_demo / split).iterdir())
        for name, volume in ((role, io.load_volume(subject / f"{contrast}.nii.gz")),
                             (f"{role}_labels", io.load_labels(subject / "labels.nii.gz"))):
            data, affine4 = axial_slice(volume, volume.shape[2] // 2)
            affine = io.nd_affine(affine4, 2)
            affine[:2, 2] += affine[:2, :2] @ [crop, 0]
            data = np.ascontiguousarray(data[crop:data.shape[0] - crop])
            files[name] = io.save_nifti(data, world @ affine, root / f"{name}.nii.gz")
    return root, files


@pytest.fixture(scope="module")
def registered(pair):
    """``firekit register --no-network`` of the pair with --field, --inverse-field and --out-labels
    (through subprocess, as a user runs it): (files, its --json summary)."""
    root, files = pair
    files = {**files, **{name: root / f"{name}.nii.gz" for name in ("warped", "field", "inverse", "warped_labels")}}
    result = cli("register", "--no-network", "--moving", files["moving"], "--fixed", files["fixed"],
                 "--out", files["warped"], "--field", files["field"], "--inverse-field", files["inverse"],
                 "--moving-labels", files["moving_labels"], "--out-labels", files["warped_labels"], "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    return files, json.loads(result.stdout)


def test_register_writes_the_inverse_on_the_moving_grid_and_reports_its_residual(registered):
    files, summary = registered
    assert str(files["inverse"]) in summary["written"]
    inverse = summary["inverse"]
    assert inverse["max_residual_mm"] <= TOLERANCE and inverse["mean_residual_mm"] <= TOLERANCE, inverse
    assert inverse["iterations"] < 100 and inverse["inside_percent"] > 80, inverse
    moving = io.load_volume(files["moving"])
    field, affine = io.read_field(files["inverse"], 2)
    assert field.shape == (*moving.shape, 2)
    np.testing.assert_allclose(affine, moving.affine, atol=1e-5)


def test_the_inverse_composes_with_the_field_to_the_identity_inside_the_brain(registered):
    files, _ = registered
    fixed, moving = io.load_volume(files["fixed"]), io.load_volume(files["moving"])
    forward = FieldTransform(io.load_field(files["field"], fixed), fixed.affine)
    backward = FieldTransform(io.load_field(files["inverse"], moving), moving.affine)
    y = fields.world_points(moving)
    brain = io.load_labels(files["moving_labels"]).data > 0
    # forward o inverse on the moving brain: the residual, read back from the float32 files
    assert (forward(backward(y)) - y).norm(dim=1)[0].numpy()[brain].max() < TOLERANCE + 1e-3
    # inverse o forward on the fixed brain: v is linear between moving's 5.2 mm voxels (0.10 mm mean,
    # 1.07 mm at worst measured; |J| > 0 everywhere)
    x = fields.world_points(fixed)
    error = (backward(forward(x)) - x).norm(dim=1)[0].numpy()[io.load_labels(files["fixed_labels"]).data > 0]
    assert error.mean() < 0.25 and error.max() < 2.0, (error.mean(), error.max())


def test_firekit_apply_carries_the_fixed_labels_to_the_moving_grid_through_the_inverse(registered, tmp_path):
    files, _ = registered
    out = tmp_path / "fixed_labels_on_moving.nii.gz"
    result = cli("apply", "--input", files["fixed_labels"], "--reference", files["moving"], "--transform",
                 files["inverse"], "--out", out, "--interpolation", "nearest")
    assert result.returncode == 0, result.stderr
    moving_labels, fixed_labels = io.load_labels(files["moving_labels"]), io.load_labels(files["fixed_labels"])
    backward = dice(io.load_labels(out).data, moving_labels.data)
    forward = dice(io.load_labels(files["warped_labels"]).data, fixed_labels.data)
    unaligned = dice(fields.apply_field(moving_labels, np.zeros((*fixed_labels.shape, 2)), fixed_labels, labels=True),
                     fixed_labels.data)
    # 0.795 back, 0.782 forward, 0.298 unaligned measured
    assert backward > forward - 0.03 and backward > unaligned + 0.3, (backward, forward, unaligned)


def main(args) -> int:
    return cli_main([str(a) for a in args])


def test_the_one_line_output_reports_the_residual(pair, tmp_path, capsys):
    _, files = pair
    code = main(["register", "--no-network", "--refine", "2", "--spacing", "4", "--moving", files["moving"],
                 "--fixed", files["fixed"], "--out", tmp_path / "w.nii.gz", "--inverse-field", tmp_path / "i.nii.gz",
                 "--quiet"])
    line = capsys.readouterr().out.strip()
    assert code == 0 and line.count("\n") == 0, line
    assert f"{tmp_path / 'i.nii.gz'}" in line and "inverse residual max" in line and "iterations" in line, line


@pytest.mark.parametrize("case", ["input", "field", "suffix", "folder"])
def test_a_bad_inverse_field_is_refused_in_one_line_and_nothing_is_written(pair, tmp_path, capsys, case):
    _, files = pair
    out, field, inverse = tmp_path / "w.nii.gz", tmp_path / "f.nii.gz", tmp_path / "i.nii.gz"
    if case == "input":
        inverse, fragment = files["moving"], "overwrite an input"
    elif case == "field":
        inverse, fragment = field, "two outputs share one path"
    elif case == "suffix":
        inverse, fragment = tmp_path / "i.txt", "must end in .nii or .nii.gz"
    else:
        inverse, fragment = tmp_path / "folder.nii.gz", "is a directory"
        inverse.mkdir()
    before = files["moving"].stat().st_mtime_ns
    code = main(["register", "--no-network", "--moving", files["moving"], "--fixed", files["fixed"], "--out", out,
                 "--field", field, "--inverse-field", inverse, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err and fragment in err, err
    assert not out.exists() and not field.exists() and not (tmp_path / "i.nii.gz").exists()
    assert not list(tmp_path.glob("*.tmp*"))
    assert files["moving"].stat().st_mtime_ns == before
