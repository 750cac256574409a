"""Registration from files: geometry through world space, ITK fields checked with SimpleITK."""

import numpy as np
import pytest
import torch

from firekit.data import io
from firekit.core import spatial
from firekit.core.errors import FirekitError
from firekit.fire.model import Fire, FireConfig
from firekit.registration.pipeline import register

sitk = pytest.importorskip("SimpleITK")

LPS = np.array([[-1.5, 0, 0, 30.0], [0, -1.4, 0, 35.0], [0, 0, 1.6, -20.0], [0, 0, 0, 1]])


def model_with_affine(theta: torch.Tensor, ndim: int) -> Fire:
    """A model whose affine subnet outputs ``theta`` for any input and whose non-rigid part is zero."""
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset("small", ndim=ndim))
    for net in (model.transform_ab, model.transform_ba):
        with torch.no_grad():
            net.affine.out.weight.zero_()
            net.affine.out.bias.copy_(theta.flatten())
            for p in net.nonrigid.parameters():
                p.zero_()
    return model


def blobs(shape) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = np.array([0.2, -0.1, 0.0][: len(shape)]).reshape(-1, *[1] * len(shape))
    other = np.array([-0.4, 0.4, 0.3][: len(shape)]).reshape(-1, *[1] * len(shape))
    return (np.exp(-((grid - centre) ** 2).sum(0) / 0.15) + 0.5 * np.exp(-((grid - other) ** 2).sum(0) / 0.05)).astype(np.float32)


def sitk_2d(path):
    image = sitk.ReadImage(str(path))
    return image[:, :, 0] if image.GetDimension() == 3 else image


def to_numpy(image, ndim):
    array = sitk.GetArrayFromImage(image)
    return array.T if ndim == 3 else array.reshape(array.shape[-2:]).T


@pytest.mark.parametrize("ndim", [2, 3])
def test_written_field_and_affine_match_simpleitk(tmp_path, ndim):
    """SimpleITK's DisplacementFieldTransform / AffineTransform reproduce firekit's warp."""
    shape = (40, 48, 36)[:ndim]
    image = blobs(shape)
    io.save_nifti(image, LPS, tmp_path / "fixed.nii.gz")
    io.save_nifti(image, LPS, tmp_path / "moving.nii.gz")
    rotation = 12 if ndim == 2 else (0, 4, 12)
    theta = spatial.affine_matrix(ndim, rotation=rotation, scale=[1.1, 0.95, 1.0][:ndim],
                                  translation=[0.05, -0.05, 0.02][:ndim])
    # check=False: the images are identical, so the check would rightly keep the headers' alignment
    # over this made-up transform; here only the conventions of the written files are tested.
    result = register(model_with_affine(theta[0], ndim), tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz",
                      spacing=1.5, check=False)
    result.save(tmp_path / "warped.nii.gz", field=tmp_path / "field.nii.gz", affine_path=tmp_path / "affine.tfm")
    assert np.abs(result.displacement).max() > 3.0  # a real transform, in mm
    assert result.displacement.shape == (*shape, ndim)
    read = sitk_2d if ndim == 2 else (lambda p: sitk.ReadImage(str(p)))
    fixed, moving = read(tmp_path / "fixed.nii.gz"), read(tmp_path / "moving.nii.gz")
    field = sitk.ReadImage(str(tmp_path / "field.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetDimension() == ndim and field.GetNumberOfComponentsPerPixel() == ndim
    by_field = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    by_affine = sitk.Resample(moving, fixed, sitk.ReadTransform(str(tmp_path / "affine.tfm")), sitk.sitkLinear, 0.0)
    value_range = image.max() - image.min()
    assert np.abs(to_numpy(by_field, ndim) - result.warped.data).mean() < 1e-3 * value_range
    assert np.abs(to_numpy(by_affine, ndim) - result.warped.data).mean() < 1e-3 * value_range
    assert result.warped.data.std() > 0.1 * value_range


def test_identity_model_undoes_a_header_only_reorientation():
    """Moving = fixed's voxels flipped with a matching affine: the identity lands on the fixed exactly."""
    image = blobs((30, 34, 26))
    fixed = io.Volume(image, LPS)
    flip = np.array([[-1, 0, 0, 29], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    moving = io.Volume(image[::-1].copy(), LPS @ flip)
    result = register(model_with_affine(torch.eye(3, 4), 3), moving, fixed)
    np.testing.assert_allclose(result.warped.data, image, atol=1e-4)
    assert np.abs(result.displacement).max() < 1e-3


def test_output_keeps_an_lps_input_in_its_own_orientation(tmp_path):
    image = blobs((30, 34, 26))
    io.save_nifti(image, LPS, tmp_path / "fixed.nii.gz")
    io.save_nifti(image, LPS, tmp_path / "moving.nii.gz")
    result = register(model_with_affine(torch.eye(3, 4), 3), tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz")
    result.save(tmp_path / "out.nii.gz")
    out = io.load_volume(tmp_path / "out.nii.gz")
    np.testing.assert_allclose(out.affine, LPS)
    np.testing.assert_allclose(out.data, image, atol=1e-4)


def test_2d_model_registers_3d_volume_slice_by_slice(tmp_path):
    image = blobs((36, 40, 12))
    theta = spatial.affine_matrix(2, translation=(0.1, 0.0))
    result = register(model_with_affine(theta[0], 2), io.Volume(image, LPS), io.Volume(image, LPS))
    assert result.affine is None and result.displacement.shape == (36, 40, 12, 3)
    assert np.abs(result.displacement[..., 2]).max() == 0.0
    assert np.abs(result.displacement[..., 0]).max() > 1.0


def test_numpy_and_nibabel_inputs_and_apply_labels():
    import nibabel as nib

    image = blobs((48, 52))
    labels = (image > 0.5).astype(np.int32) + (image > 0.8)
    model = model_with_affine(torch.eye(2, 3), 2)
    result = register(model, image, nib.Nifti1Image(image[:, :, None], np.eye(4)), direction="b2a")
    warped_labels = result.apply(labels)
    assert warped_labels.data.dtype == np.int32
    np.testing.assert_array_equal(warped_labels.data, labels)


def test_mismatched_ndim_is_refused(tmp_path):
    model = model_with_affine(torch.eye(2, 3), 2)
    with pytest.raises(FirekitError, match="same ndim"):
        register(model, blobs((40, 40)), blobs((40, 40, 40)))
    with pytest.raises(FirekitError, match="3D model cannot register 2D"):
        register(model_with_affine(torch.eye(3, 4), 3), blobs((40, 40)), blobs((40, 40)))


def test_small_images_are_padded_not_refused():
    image = blobs((12, 10))
    result = register(model_with_affine(torch.eye(2, 3), 2), image, image, spacing=None)
    assert result.warped.shape == (12, 10)
    np.testing.assert_allclose(result.warped.data, image, atol=1e-4)


def test_refinement_alone_recovers_a_shift_and_is_deterministic():
    """--no-network: refinement from moments, no weights; same seed, same field."""
    from firekit.data.phantom import phantom_pair

    theta = spatial.affine_matrix(2, rotation=15, scale=(1.2, 0.95), translation=(0.08, -0.05))
    pair = phantom_pair((96, 96), theta, seed=1, contrasts=("t2", "t1"))
    moving, fixed = pair.x_a[0, 0].numpy(), pair.x_b[0, 0].numpy()
    first = register(None, moving, fixed, refine="auto")
    again = register(None, moving, fixed, refine="auto")
    np.testing.assert_array_equal(first.displacement, again.displacement)
    from firekit.core import metrics

    labels_moving, labels_fixed = pair.labels_a[0, 0].numpy(), pair.labels_b[0, 0].numpy()
    before = np.mean(list(metrics.dice(torch.as_tensor(labels_moving), torch.as_tensor(labels_fixed), [1, 2, 3]).values()))
    warped = first.apply(labels_moving).data
    after = np.mean(list(metrics.dice(torch.as_tensor(warped), torch.as_tensor(labels_fixed), [1, 2, 3]).values()))
    assert after > before + 0.2, (before, after)
    assert (first.jacobian_determinant() <= 0).mean() < 0.001
    # refine="moments": the start alone, an affine (no optimisation step) between the two
    start = register(None, moving, fixed, refine="moments")
    started = np.mean(list(metrics.dice(torch.as_tensor(start.apply(labels_moving).data), torch.as_tensor(labels_fixed),
                                        [1, 2, 3]).values()))
    assert before < started < after, (before, started, after)
    with pytest.raises(FirekitError, match="no model"):
        register(None, moving, fixed, refine=0)


def test_refinement_similarity_and_synthesis_path(monkeypatch):
    """--similarity picks refinement's similarity; --synthesis refines F(G(moving)) and warps moving itself."""
    import firekit.registration.refine as refine_module
    from firekit.data.phantom import phantom_pair

    theta = spatial.affine_matrix(2, rotation=10, translation=(0.06, -0.04))
    pair = phantom_pair((64, 64), theta, seed=2, contrasts=("t1", "t1"))
    moving, fixed = pair.x_a[0, 0].numpy(), pair.x_b[0, 0].numpy()
    seen = {}
    original = refine_module.refine

    def spy(moving_tensor, fixed_tensor, **options):
        seen["moving"], seen["similarity"] = moving_tensor.detach().clone(), options["config"].similarity
        seen["field"] = options["config"].similarity_fn("field").features(fixed_tensor).shape[1]
        return original(moving_tensor, fixed_tensor, **options)

    monkeypatch.setattr(refine_module, "refine", spy)
    model = model_with_affine(torch.eye(2, 3), 2)
    # one way: the spy sees the last refinement (registering both ways, the backward one)
    result = register(model, moving, fixed, refine=3, similarity="lncc", synthesis=True, spacing=None, symmetric=False)
    network = result.network
    with torch.no_grad():
        expected = model.synthesise(network.moving, "a2b")
    assert seen["similarity"] == "lncc"
    torch.testing.assert_close(seen["moving"], expected)
    # The warped image is moving's (not the synthesis) resampled by the field found.
    torch.testing.assert_close(network.warped, spatial.warp(network.moving, network.displacement), atol=1e-5, rtol=0)
    plain = register(None, moving, fixed, refine="auto", similarity="lncc", spacing=None)
    assert seen["similarity"] == "lncc" and seen["field"] == 1  # LNCC's features (the image) in every stage
    from firekit.core import metrics

    labels_moving, labels_fixed = pair.labels_a[0, 0], pair.labels_b[0, 0]
    before = np.mean(list(metrics.dice(labels_moving, labels_fixed, [1, 2, 3]).values()))
    warped = torch.as_tensor(plain.apply(labels_moving.numpy()).data)
    assert np.mean(list(metrics.dice(warped, labels_fixed, [1, 2, 3]).values())) > before + 0.1
    with pytest.raises(FirekitError, match="synthesis needs a model"):
        register(None, moving, fixed, refine="auto", synthesis=True)
    with pytest.raises(FirekitError, match="needs refinement"):
        register(model, moving, fixed, refine=0, similarity="ngf")


def test_refinement_reports_progress_for_3d_only_when_auto(capsys):
    volume, image = blobs((24, 28, 20)), blobs((40, 36))
    register(None, volume, volume, refine=2, spacing=None, progress="auto")
    assert "[refine]" in capsys.readouterr().err
    register(None, image, image, refine=2, spacing=None, progress="auto")
    assert "[refine]" not in capsys.readouterr().err


def test_a_coarser_model_runs_on_a_coarser_copy_and_its_transform_carries_over():
    """A model trained at 2x the spacing sees 2x coarser inputs; its (normalised) affine is unchanged."""
    theta = torch.tensor([[[1.05, 0.1, 0.05], [-0.08, 0.95, -0.1]]])
    model = model_with_affine(theta, 2)
    image = io.Volume(blobs((96, 128)), np.diag([1.28, 1.28, 1.0]))
    seen = []
    original = model.register

    def recording(moving, fixed, *args, **kwargs):
        seen.append(tuple(fixed.shape[2:]))
        return original(moving, fixed, *args, **kwargs)

    model.register = recording
    fine = register(model, image, image, refine=0)
    model.spacing = 2.56
    coarse = register(model, image, image, refine=0)
    assert seen == [(96, 128), (48, 64)]
    assert coarse.network.displacement.shape[2:] == (96, 128)
    np.testing.assert_allclose(coarse.displacement, fine.displacement, atol=1e-4)
    np.testing.assert_allclose(coarse.warped.data, fine.warped.data, atol=1e-4)


def test_symmetric_registration_is_inverse_consistent_with_the_reverse_one():
    """--symmetric: forward and backward results are each other's inverse; plain ones are not as much."""
    from firekit.registration import fields
    from firekit.data.phantom import phantom_pair
    from firekit.registration.pipeline import symmetrise

    theta = spatial.affine_matrix(2, rotation=12, scale=(1.15, 0.95), translation=(0.05, -0.04))
    pair = phantom_pair((80, 80), theta, seed=4, contrasts=("t2", "t1"))
    moving = io.Volume(pair.x_a[0, 0].numpy(), np.eye(3))
    fixed = io.Volume(pair.x_b[0, 0].numpy(), np.eye(3))
    brain = pair.labels_b[0, 0].numpy() > 0
    errors = {}
    for symmetric in (False, True):
        forward = register(None, moving, fixed, refine=10, spacing=None, symmetric=symmetric)
        backward = register(None, fixed, moving, refine=10, spacing=None, symmetric=symmetric)
        errors[symmetric] = fields.inverse_consistency(forward.displacement, backward.displacement, fixed, moving)[brain].mean()
    assert errors[True] < 0.2 and errors[True] < errors[False] / 2, errors
    # symmetrise of an exact pair (an affine and its inverse) returns the forward one
    shape = (40, 48)
    inverse = spatial.invert_affine(theta.double()).float()
    theta_sym, disp_sym = symmetrise(theta, spatial.affine_to_displacement(theta, shape),
                                     inverse, spatial.affine_to_displacement(inverse, shape))
    torch.testing.assert_close(theta_sym, theta, atol=1e-6, rtol=0)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    torch.testing.assert_close(disp_sym[inner], spatial.affine_to_displacement(theta, shape)[inner], atol=1e-4, rtol=0)


def test_symmetric_auto_registers_2d_both_ways_and_3d_one_way():
    """The default (symmetric="auto"): both ways for 2D images with refinement; one way in 3D and for
    the network alone; anything but True, False or "auto" refused in one line."""
    from firekit.data.phantom import phantom_pair

    theta = spatial.affine_matrix(2, rotation=10, scale=(1.1, 0.95), translation=(0.04, -0.03))
    pair = phantom_pair((64, 64), theta, seed=3, contrasts=("t2", "t1"))
    moving, fixed = (io.Volume(x[0, 0].numpy(), np.eye(3)) for x in (pair.x_a, pair.x_b))
    found = {s: register(None, moving, fixed, refine=5, spacing=None, symmetric=s).displacement
             for s in ("auto", True, False)}
    np.testing.assert_array_equal(found["auto"], found[True])
    assert np.abs(found[True] - found[False]).max() > 1e-3  # the two really differ
    pair3 = phantom_pair((24, 24, 24), spatial.affine_matrix(3, rotation=(6, 0, 0)), seed=3, contrasts=("t2", "t1"))
    moving3, fixed3 = (io.Volume(x[0, 0].numpy(), np.eye(4)) for x in (pair3.x_a, pair3.x_b))
    found3 = {s: register(None, moving3, fixed3, refine=2, spacing=None, symmetric=s).displacement for s in ("auto", False)}
    np.testing.assert_array_equal(found3["auto"], found3[False])
    with pytest.raises(FirekitError, match="symmetric must be"):
        register(None, moving, fixed, refine=5, spacing=None, symmetric="yes")


def test_symmetric_keeps_the_one_way_answer_when_the_backward_one_went_wrong(monkeypatch, capsys):
    """Registering both ways, an average with a wrong backward answer would be wrong too: when the two
    directions disagree grossly, the similarity judges and the (checked) one-way answer is kept, one line
    says so; a backward answer that cannot be inverted is refused too."""
    import firekit.registration.pipeline as pipeline
    from firekit.data.phantom import phantom_pair

    theta = spatial.affine_matrix(2, rotation=8, translation=(0.03, -0.02))
    pair = phantom_pair((64, 64), theta, seed=5, contrasts=("t2", "t1"))
    moving, fixed = (io.Volume(x[0, 0].numpy(), np.eye(3)) for x in (pair.x_a, pair.x_b))
    one_way = register(None, moving, fixed, refine=5, spacing=None, symmetric=False).displacement
    both = register(None, moving, fixed, refine=5, spacing=None, symmetric=True).displacement
    assert np.abs(both - one_way).max() > 1e-3 and "disagree" not in capsys.readouterr().err  # a sound pair: averaged
    solve, calls = pipeline._solve, []

    def backward_wrong(wrong):
        def solved(model, x_moving, x_fixed, direction, **options):
            calls.append(direction)
            result = solve(model, x_moving, x_fixed, direction, **options)
            if len(calls) == 2:  # the backward registration, replaced by a wrong one
                return wrong, spatial.affine_to_displacement(wrong, x_fixed.shape[2:]), result[2], result[3]
            return result
        return solved

    # a half turn (implausible) and a shift by a third of the image (plausible, but the similarity says no)
    for wrong in (spatial.affine_matrix(2, rotation=180.0), spatial.affine_matrix(2, translation=(0.6, 0.0))):
        calls.clear()
        monkeypatch.setattr(pipeline, "_solve", backward_wrong(wrong))
        kept = register(None, moving, fixed, refine=5, spacing=None, symmetric=True).displacement
        assert len(calls) == 2
        np.testing.assert_allclose(kept, one_way, atol=1e-5)
        assert "disagree" in (err := capsys.readouterr().err) and "kept the one-way answer" in err
    # an inverse that diverged (non-finite: its gap is NaN, which no threshold rejects) is refused too
    monkeypatch.setattr(pipeline, "_solve", solve)
    monkeypatch.setattr(pipeline, "backward_inverse", lambda theta, disp: torch.full_like(disp, float("nan")))
    kept = register(None, moving, fixed, refine=5, spacing=None, symmetric=True).displacement
    np.testing.assert_allclose(kept, one_way, atol=1e-5)
    assert "could not be inverted" in capsys.readouterr().err


def test_symmetric_keeps_the_inverted_backward_answer_when_the_forward_one_went_wrong(monkeypatch, capsys):
    """The judge works both ways: a forward answer shifted by a fifth of the image (the backward one sound)
    gives way to the inverted backward answer, not to an average half as wrong."""
    import firekit.registration.pipeline as pipeline
    from firekit.data.phantom import phantom_pair

    theta = spatial.affine_matrix(2, rotation=8, translation=(0.03, -0.02))
    pair = phantom_pair((64, 64), theta, seed=5, contrasts=("t2", "t1"))
    moving, fixed = (io.Volume(x[0, 0].numpy(), np.eye(3)) for x in (pair.x_a, pair.x_b))
    sound = register(None, moving, fixed, refine=5, spacing=None, symmetric=True).displacement
    solve, calls = pipeline._solve, []

    def forward_shifted(model, x_moving, x_fixed, direction, **options):
        calls.append(direction)
        theta, disp, warped, reports = solve(model, x_moving, x_fixed, direction, **options)
        if len(calls) == 1:
            shift = torch.tensor([0.4, 0.0]).view(1, 2, *[1] * (disp.ndim - 2))
            theta, disp = theta.clone(), disp + shift
            theta[:, :, -1] += shift.flatten()
        return theta, disp, warped, reports

    monkeypatch.setattr(pipeline, "_solve", forward_shifted)
    kept = register(None, moving, fixed, refine=5, spacing=None, symmetric=True).displacement
    assert "kept the inverted backward answer" in capsys.readouterr().err
    spacing_mm = 1.0  # np.eye(3) grids: 1 mm voxels, ITK fields in mm
    assert np.abs(kept - sound).max(axis=-1).mean() < 1.0 * spacing_mm  # the sound answer, within a voxel


def test_shipped_3d_model_loads_with_its_training_spacing_and_registers_a_volume():
    from pathlib import Path

    from firekit.registration.pipeline import load

    path = Path(__file__).resolve().parents[1] / "firekit" / "weights" / "fire3d_t1_t2like_small.pt"
    model = load(path)
    assert model.ndim == 3 and model.spacing == 5.12  # learn3d (bench/runs/learn3d): 32 x 40 x 32 volumes
    volume = io.Volume(blobs((40, 48, 40)), np.diag([2.0, 2.0, 2.0, 1.0]))
    result = register(model, volume, volume, direction="b2a", refine=0)
    assert result.warped.shape == (40, 48, 40) and np.isfinite(result.displacement).all()


def test_register_pairs_batches_and_matches_one_by_one():
    from firekit.registration.pipeline import load, register, register_pairs

    model = load("default")
    rng = np.random.default_rng(0)
    pairs = [(rng.random((60, 70)).astype(np.float32), rng.random((60, 70)).astype(np.float32)) for _ in range(3)]
    pairs.append((rng.random((50, 44)).astype(np.float32), rng.random((50, 44)).astype(np.float32)))  # another grid
    batched = register_pairs(model, pairs, direction="b2a", batch_size=2)
    for (moving, fixed), result in zip(pairs, batched):
        alone = register(model, moving, fixed, direction="b2a")
        assert result.warped.shape == fixed.shape
        np.testing.assert_allclose(result.displacement, alone.displacement, atol=1e-3)
        np.testing.assert_allclose(result.affine, alone.affine, atol=1e-4)
    with pytest.raises(FirekitError, match="images must be 2D for this model"):
        register_pairs(model, [(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)))])
