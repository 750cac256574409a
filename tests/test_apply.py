"""firekit apply (saved transforms of firekit and ANTs onto a reference grid) and register --initial-affine."""

import numpy as np
import pytest

from firekit.data import io
from firekit.registration.apply import apply_files, read_affine
from firekit.cli import main as cli_main
from firekit.registration.pipeline import write_itk_affine

SHAPE = (48, 56)


def blob(shape, shift=(0.0, 0.0, 0.0), seed=0) -> np.ndarray:
    """A bright ellipse with a brighter off-centre core, shifted by ``shift`` (fraction of the field)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum((g - d) ** 2 * w for g, d, w in zip(grids, shift, (1.0, 1.6, 1.3)))
    core = sum((g - d - c) ** 2 for g, d, c in zip(grids, shift, (0.25, -0.2, 0.1)))
    noise = np.random.default_rng(seed).random(shape)
    return (np.exp(-3 * r2) + 0.6 * np.exp(-12 * core) + 0.02 * noise).astype(np.float32)


def labels_of(image: np.ndarray) -> np.ndarray:
    """Two nested labels (3 outside, 7 in the core) of a blob."""
    return np.where(image > 0.9, 7, np.where(image > 0.35, 3, 0)).astype(np.int16)


def main(args) -> int:
    """The CLI in this process (no interpreter start per call)."""
    return cli_main([str(a) for a in args])


def assert_one_line_error(code, capsys, *fragments):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 2D blob pair on an oblique, anisotropic grid (and the moving labels), as files."""
    root = tmp_path_factory.mktemp("apply")
    affine = np.array([[0.0, -1.1, 20.0], [0.9, 0.0, -14.0], [0.0, 0.0, 1.0]])
    moving_data = blob(SHAPE, shift=(0.12, -0.08))
    moving = io.save_nifti(moving_data, affine, root / "moving.nii.gz")
    fixed = io.save_nifti(blob(SHAPE, seed=1), affine, root / "fixed.nii.gz")
    labels = io.save_nifti(labels_of(moving_data), affine, root / "labels.nii.gz")
    return root, moving, fixed, labels


def test_applying_registers_own_field_reproduces_its_outputs(pair):
    root, moving, fixed, labels = pair
    out = root / "reg"
    assert main(["register", "--no-network", "--refine", "20", "--moving", moving, "--fixed", fixed,
                 "--out", f"{out}_warped.nii.gz", "--moving-labels", labels, "--out-labels", f"{out}_labels.nii.gz",
                 "--field", f"{out}_field.nii.gz", "--quiet"]) == 0
    assert np.abs(io.load_field(f"{out}_field.nii.gz", io.load_volume(fixed))).max() > 1.0  # a real registration
    assert main(["apply", "--input", moving, "--reference", fixed, "--transform", f"{out}_field.nii.gz",
                 "--out", root / "applied.nii.gz"]) == 0
    np.testing.assert_allclose(io.load_volume(root / "applied.nii.gz").data,
                               io.load_volume(f"{out}_warped.nii.gz").data, atol=1e-4, rtol=0)
    assert main(["apply", "--input", labels, "--reference", fixed, "--transform", f"{out}_field.nii.gz",
                 "--out", root / "applied_labels.nii.gz", "--interpolation", "nearest"]) == 0
    np.testing.assert_array_equal(io.load_labels(root / "applied_labels.nii.gz").data,
                                  io.load_labels(f"{out}_labels.nii.gz").data)


def test_applying_registers_own_affine_reproduces_an_affine_only_run(pair):
    root, moving, fixed, labels = pair
    out = root / "aff"
    assert main(["register", "--affine-only", "--refine", "0", "--moving", moving, "--fixed", fixed,
                 "--out", f"{out}_warped.nii.gz", "--moving-labels", labels, "--out-labels", f"{out}_labels.nii.gz",
                 "--affine", f"{out}.tfm", "--no-check", "--quiet"]) == 0
    assert not np.allclose(read_affine(f"{out}.tfm"), np.eye(3), atol=1e-3)  # the network moved something
    apply_files(moving, fixed, [f"{out}.tfm"], root / "aff_applied.nii.gz")
    # the .tfm holds 10 digits and register samples in float32: equal to ~1e-4 (image range ~1.6)
    np.testing.assert_allclose(io.load_volume(root / "aff_applied.nii.gz").data,
                               io.load_volume(f"{out}_warped.nii.gz").data, atol=1e-3, rtol=0)
    apply_files(labels, fixed, [f"{out}.tfm"], root / "aff_labels.nii.gz", interpolation="nearest")
    np.testing.assert_array_equal(io.load_labels(root / "aff_labels.nii.gz").data,
                                  io.load_labels(f"{out}_labels.nii.gz").data)


def test_ants_transforms_apply_as_ants_applies_them(tmp_path, monkeypatch):
    ants = pytest.importorskip("ants")
    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    shape = (32, 32, 32)
    # axes flipped and anisotropic, so that RAS <-> LPS and the direction matter
    affine = np.array([[-1.5, 0, 0, 30.0], [0, 1.25, 0, -20.0], [0, 0, 1.4, 5.0], [0, 0, 0, 1]])
    moving_data = blob(shape, shift=(0.1, -0.12, 0.05))
    moving = io.save_nifti(moving_data, affine, tmp_path / "moving.nii.gz")
    fixed = io.save_nifti(blob(shape, seed=1), affine, tmp_path / "fixed.nii.gz")
    labels = io.save_nifti(labels_of(moving_data), affine, tmp_path / "labels.nii.gz")
    reg = ants.registration(ants.image_read(str(fixed)), ants.image_read(str(moving)), type_of_transform="SyN",
                            reg_iterations=(20, 10, 0), aff_iterations=(50, 20, 0, 0),
                            outprefix=str(tmp_path / "ants_"))
    transforms = reg["fwdtransforms"]
    assert transforms[0].endswith("Warp.nii.gz") and transforms[1].endswith(".mat")
    expected = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(labels)), transforms,
                                     interpolator="nearestNeighbor").numpy()
    args = ["apply", "--input", labels, "--reference", fixed, "--out", tmp_path / "applied.nii.gz",
            "--interpolation", "nearest"]
    assert main(args + [item for t in transforms for item in ("--transform", t)]) == 0
    ours = io.load_labels(tmp_path / "applied.nii.gz").data
    where = (ours > 0) | (expected > 0)
    assert where.sum() > 1000
    assert (ours[where] == np.rint(expected[where])).mean() > 0.995
    apply_files(labels, fixed, transforms[::-1], tmp_path / "reversed.nii.gz", interpolation="nearest")
    assert (io.load_labels(tmp_path / "reversed.nii.gz").data[where] == np.rint(expected[where])).mean() < 0.99
    # the affine alone too: ANTs' .mat read as ANTs reads it
    affine_only = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(labels)), transforms[1:],
                                        interpolator="nearestNeighbor").numpy()
    apply_files(labels, fixed, transforms[1:], tmp_path / "affine.nii.gz", interpolation="nearest")
    ours = io.load_labels(tmp_path / "affine.nii.gz").data
    where = (ours > 0) | (affine_only > 0)
    assert (ours[where] == np.rint(affine_only[where])).mean() > 0.995


def test_label_interpolation_keeps_the_input_labels(pair):
    root, moving, fixed, labels = pair
    identity = write_itk_affine(np.eye(3), root / "identity.tfm")
    apply_files(labels, labels, [identity], root / "id_label.nii.gz", interpolation="label")
    apply_files(labels, labels, [identity], root / "id_nearest.nii.gz", interpolation="nearest")
    np.testing.assert_array_equal(io.load_labels(root / "id_label.nii.gz").data, io.load_labels(labels).data)
    np.testing.assert_array_equal(io.load_labels(root / "id_nearest.nii.gz").data, io.load_labels(labels).data)
    turn = np.eye(3)
    turn[:2, :2] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    turned = write_itk_affine(turn, root / "turn.tfm")
    apply_files(labels, fixed, [turned], root / "turned.nii.gz", interpolation="label")
    out = io.load_labels(root / "turned.nii.gz").data
    assert set(np.unique(out)) == {0, 3, 7}
    apply_files(labels, fixed, [turned], root / "turned_nearest.nii.gz", interpolation="nearest")
    assert (out == io.load_labels(root / "turned_nearest.nii.gz").data).mean() > 0.95


def test_itk_affine_centre_and_ants_mat_are_read_as_itk_defines_them(tmp_path):
    from scipy.io import savemat

    # y = A (x - c) + t + c in LPS, for x = c + e0: y = c + t + A e0
    a = np.array([[0.9, -0.2, 0.1], [0.3, 1.1, 0.0], [0.0, 0.1, 1.0]])
    t, c = np.array([1.0, -2.0, 3.0]), np.array([10.0, 20.0, -5.0])
    params = np.concatenate([a.ravel(), t])
    savemat(tmp_path / "a.mat", {"AffineTransform_float_3_3": params[:, None], "fixed": c[:, None]}, format="4")
    (tmp_path / "a.txt").write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: "
                                    f"MatrixOffsetTransformBase_double_3_3\nParameters: {' '.join(map(str, params))}\n"
                                    f"FixedParameters: {' '.join(map(str, c))}\n")
    flip = np.array([-1.0, -1.0, 1.0])
    x_lps = c + np.array([1.0, 0.0, 0.0])
    y_lps = a @ (x_lps - c) + t + c
    for name in ("a.mat", "a.txt"):
        matrix = read_affine(tmp_path / name)
        np.testing.assert_allclose(matrix[:3, :3] @ (x_lps * flip) + matrix[:3, 3], y_lps * flip, atol=1e-5)


@pytest.mark.parametrize("case", ["missing", "unknown", "ndim", "layout", "grid", "overwrite", "mat", "text",
                                  "mismatch"])
def test_bad_inputs_are_refused_in_one_line(pair, tmp_path, capsys, case):
    root, moving, fixed, labels = pair
    out = tmp_path / "out.nii.gz"
    transform = tmp_path / "t.tfm"
    write_itk_affine(np.eye(3), transform)
    fragments = ()
    if case == "missing":
        transform, fragments = tmp_path / "nope.tfm", ("not found",)
    elif case == "unknown":
        transform = tmp_path / "t.xyz"
        transform.write_text("1 2 3")
        fragments = ("unknown transform format",)
    elif case == "ndim":
        write_itk_affine(np.eye(4), transform)
        fragments = ("3D transform", "2D")
    elif case == "layout":
        transform, fragments = moving, ("not an ITK 2D displacement field",)
    elif case == "grid":  # a 3D field's layout, given for a 2D reference
        transform = io.save_nifti(np.zeros((8, 8, 4, 1, 2), np.float32), np.eye(4), tmp_path / "f.nii.gz")
        fragments = ("not an ITK 2D displacement field",)
    elif case == "overwrite":
        out, fragments = moving, ("overwrite an input",)
    elif case == "mat":
        from scipy.io import savemat

        transform = tmp_path / "t.mat"
        savemat(transform, {"something": np.zeros((3, 1))}, format="4")
        fragments = ("no ITK affine",)
    elif case == "text":
        transform.write_text("#Insight Transform File V1.0\nTransform: Euler2DTransform_double_2_2\n"
                             "Parameters: 0 0 0\nFixedParameters: 0 0\n")
        fragments = ("not supported",)
    elif case == "mismatch":
        volume = io.save_nifti(blob((8, 8, 8)), np.eye(4), tmp_path / "v.nii.gz")
        moving, fragments = volume, ("3D", "2D")
    before = moving.stat().st_mtime_ns
    code = main(["apply", "--input", moving, "--reference", fixed, "--transform", transform, "--out", out])
    assert_one_line_error(code, capsys, *fragments)
    assert moving.stat().st_mtime_ns == before
    if case != "overwrite":
        assert not out.exists()
    assert not list(tmp_path.glob("*.tmp*"))


def turned_pair(tmp_path, degrees=60.0):
    """A 2D blob and the same blob turned by ``degrees`` about the grid's centre: the true fixed ->
    moving map is that turn (RAS world, 3x3)."""
    shape = (64, 64)
    affine = np.array([[1.0, 0.0, -31.5], [0.0, 1.0, -31.5], [0.0, 0.0, 1.0]])
    angle = np.deg2rad(degrees)
    turn = np.eye(3)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    index = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    world = index @ affine[:2, :2].T + affine[:2, 2]

    def image(points):  # an asymmetric blob in world mm
        q = points / 22.0
        r2 = q[..., 0] ** 2 + 2.2 * q[..., 1] ** 2
        core = (q[..., 0] - 0.45) ** 2 + (q[..., 1] + 0.2) ** 2
        return (np.exp(-3 * r2) + 0.8 * np.exp(-14 * core)).astype(np.float32)

    inverse = np.linalg.inv(turn)
    fixed = io.save_nifti(image(world), affine, tmp_path / "fixed.nii.gz")
    moving = io.save_nifti(image(world @ inverse[:2, :2].T + inverse[:2, 2]), affine, tmp_path / "moving.nii.gz")
    truth = (world @ turn[:2, :2].T + turn[:2, 2] - world) * io.lps_flip(2)  # LPS mm
    return moving, fixed, turn, truth, image(world) > 0.2


def test_initial_affine_starts_beyond_the_header_bound(tmp_path, capsys):
    from firekit.core.errors import FirekitError
    from firekit.registration.pipeline import load, register

    # 75 deg: past the 45-deg bound of the starts and the 10 deg an answer may drift beyond it
    moving, fixed, turn, truth, mask = turned_pair(tmp_path, degrees=75.0)
    start = write_itk_affine(turn, tmp_path / "start.tfm")
    error = {}
    for name, initial in (("without", None), ("with file", start), ("with matrix", turn)):
        result = register(None, moving, fixed, refine=30, initial_affine=initial)
        error[name] = np.linalg.norm(result.displacement - truth, axis=-1)[mask].mean()
    assert error["with file"] < 0.5 and error["with matrix"] < 0.5, error
    assert error["without"] > 3.0, error  # the answer stops within 55 deg: ~20 degrees off
    with_model = register(load(), moving, fixed, refine=30, initial_affine=start)  # beside the network's start
    assert np.linalg.norm(with_model.displacement - truth, axis=-1)[mask].mean() < 0.5
    with pytest.raises(FirekitError, match="turn refinement on"):
        register(load(), moving, fixed, refine=0, initial_affine=start)
    code = main(["register", "--no-network", "--moving", moving, "--fixed", fixed, "--out", tmp_path / "w.nii.gz",
                 "--initial-affine", start, "--refine", "30", "--quiet"])
    assert code == 0
    capsys.readouterr()
    code = main(["register", "--no-network", "--moving", moving, "--fixed", fixed, "--out", tmp_path / "x.nii.gz",
                 "--initial-affine", tmp_path / "nope.tfm", "--quiet"])
    assert_one_line_error(code, capsys, "nope.tfm", "not found")
    assert not (tmp_path / "x.nii.gz").exists()
