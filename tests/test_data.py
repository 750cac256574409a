"""Pair matching, network grids and training pairs from files."""

import numpy as np
import pytest
import torch

from firekit.data import io
from firekit.data.pairs import PairDataset, find_pairs, load_subject, network_grid
from firekit.core.errors import FirekitError


def write(path, shape=(20, 24, 16), affine=None, value=None):
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    data = rng.random(shape).astype(np.float32) if value is None else np.full(shape, value, np.float32)
    return io.save_nifti(data, np.eye(4) if affine is None else affine, path)


def test_mrbrains_folder_layout_matches_by_folder(tmp_path):
    for subject in ("1", "2", "3"):
        for name in ("T1.nii", "T2_FLAIR.nii", "IR.nii"):
            write(tmp_path / subject / name)
        io.save_nifti(np.zeros((20, 24, 16), np.int16), np.eye(4), tmp_path / subject / "segm.nii")
    pairs = find_pairs(f"{tmp_path}/*/T1.nii", f"{tmp_path}/*/T2_FLAIR.nii", f"{tmp_path}/*/segm.nii")
    assert [p.name for p in pairs] == ["1", "2", "3"]
    for pair in pairs:
        assert pair.a.parent == pair.b.parent == pair.labels.parent
        assert pair.b.name == "T2_FLAIR.nii"


def test_flat_names_match_by_subject_token(tmp_path):
    for subject in ("sub01", "sub02"):
        write(tmp_path / f"{subject}_T1w.nii.gz")
        write(tmp_path / f"{subject}_T2w.nii.gz")
    pairs = find_pairs(f"{tmp_path}/*_T1w.nii.gz", f"{tmp_path}/*_T2w.nii.gz")
    assert [(p.name, p.a.name, p.b.name) for p in pairs] == [
        ("sub01", "sub01_T1w.nii.gz", "sub01_T2w.nii.gz"), ("sub02", "sub02_T1w.nii.gz", "sub02_T2w.nii.gz")]


def test_bad_globs_are_refused_in_one_line(tmp_path):
    with pytest.raises(FirekitError, match="matched no files"):
        find_pairs(f"{tmp_path}/*.nii.gz", f"{tmp_path}/*.nii.gz")
    for subject in ("a", "b"):
        write(tmp_path / subject / "T1.nii.gz")
    write(tmp_path / "a" / "T2.nii.gz")
    with pytest.raises(FirekitError, match="unequal numbers"):
        find_pairs(f"{tmp_path}/*/T1.nii.gz", f"{tmp_path}/*/T2.nii.gz")
    write(tmp_path / "c" / "T2.nii.gz")
    with pytest.raises(FirekitError, match="cannot match"):
        find_pairs(f"{tmp_path}/*/T1.nii.gz", f"{tmp_path}/*/T2.nii.gz")


def test_network_grid_is_canonical_resampled_and_padded():
    lps = np.array([[-0.5, 0, 0, 10.0], [0, -0.5, 0, 12.0], [0, 0, 3.0, -5.0], [0, 0, 0, 1]])
    volume = io.Volume(np.zeros((100, 60, 10), np.float32), lps)
    shape, affine = network_grid(volume, 1.28)
    assert all(s % 4 == 0 and s >= 32 for s in shape)
    np.testing.assert_allclose(np.diag(affine)[:3], [1.28, 1.28, 1.28])  # RAS, 1.28 mm
    centre_in = lps @ [49.5, 29.5, 4.5, 1]
    centre_out = affine @ [*(np.array(shape) - 1) / 2, 1]
    np.testing.assert_allclose(centre_in, centre_out, atol=1e-6)
    shape2, affine2 = network_grid(volume, [1.28, 1.28, None])
    assert affine2[2, 2] == pytest.approx(3.0)


@pytest.mark.parametrize("model_ndim", [2, 3])
def test_pair_dataset_is_deterministic_per_step(tmp_path, model_ndim):
    from firekit.data.augment import AugmentConfig

    for subject in ("s1", "s2"):
        image = np.zeros((40, 44, 36), np.float32)
        image[8:32, 8:36, 6:30] = 1.0
        io.save_nifti(image, np.eye(4), tmp_path / subject / "A.nii.gz")
        io.save_nifti(image * 2, np.eye(4), tmp_path / subject / "B.nii.gz")
        io.save_nifti(image.astype(np.int16), np.eye(4), tmp_path / subject / "L.nii.gz")
    subjects = [load_subject(s, 1.5) for s in find_pairs(f"{tmp_path}/*/A.nii.gz", f"{tmp_path}/*/B.nii.gz",
                                                        f"{tmp_path}/*/L.nii.gz")]
    dataset = PairDataset(subjects, model_ndim, AugmentConfig(), seed=3, spacing=1.5)
    first, again, other = dataset.sample(5, 2), dataset.sample(5, 2), dataset.sample(6, 2)
    assert set(first) == {"x_a", "x_b", "labels_a", "labels_b", "u_a2b", "u_b2a"}
    assert first["x_a"].shape[:2] == (2, 1) and first["x_a"].ndim == model_ndim + 2
    assert first["labels_a"].dtype == torch.int64
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["x_a"], other["x_a"])
    assert first["x_a"].min() >= -1.0 and first["x_a"].max() <= 1.0
    # A and B get independent transforms: their masks differ after augmentation
    assert not torch.equal(first["labels_a"], first["labels_b"])
    validation = dataset.validation(2)
    assert torch.equal(validation[0]["x_a"], dataset.validation(2)[0]["x_a"])
    # each process of several draws its slice of the step's batch alone, as within the whole batch
    whole, second = dataset.sample(5, 3), dataset.sample(5, 1, first=1)
    for key in whole:
        assert torch.equal(whole[key][:2], first[key]) and torch.equal(whole[key][1:2], second[key])


@pytest.mark.parametrize("model_ndim", [2, 3])
def test_known_answer_of_each_augmented_pair(tmp_path, model_ndim):
    """u_a2b warps the augmented A onto the augmented B (A and B co-registered), and back."""
    from firekit.core import spatial
    from firekit.data.augment import AugmentConfig

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (40, 44, 36)], indexing="ij"))
    image = (np.exp(-((grid[0] - 0.2) ** 2 / 0.1 + grid[1] ** 2 / 0.3 + grid[2] ** 2 / 0.2))
             + 0.6 * np.exp(-((grid + 0.3) ** 2).sum(0) / 0.05)).astype(np.float32)
    io.save_nifti(image, np.eye(4), tmp_path / "s1" / "A.nii.gz")
    io.save_nifti(image, np.eye(4), tmp_path / "s1" / "B.nii.gz")
    subjects = [load_subject(s, 1.0) for s in find_pairs(f"{tmp_path}/*/A.nii.gz", f"{tmp_path}/*/B.nii.gz")]
    dataset = PairDataset(subjects, model_ndim, AugmentConfig(elastic_mm=3.0), seed=1, spacing=1.0)
    batch = dataset.sample(0, 4)
    assert batch["u_a2b"].shape == (4, model_ndim, *batch["x_a"].shape[2:])
    for moving, fixed, answer in (("x_a", "x_b", "u_a2b"), ("x_b", "x_a", "u_b2a")):
        # where the answer samples inside the moving image (the augmentation's zooms and shifts
        # push content out of the field of view, and nothing can bring that back)
        points = spatial.identity_grid(batch[answer].shape[2:]) + batch[answer]
        inside = (points.abs() <= 1).all(dim=1, keepdim=True).float()
        for i in range(4):
            before = ((batch[moving] - batch[fixed]).abs() * inside)[i].sum() / inside[i].sum()
            after = ((spatial.warp(batch[moving], batch[answer]) - batch[fixed]).abs() * inside)[i].sum() / inside[i].sum()
            assert after < 0.1 * before, (i, before, after)


def test_curriculum_ramps_the_augmentation():
    from firekit.data.augment import AugmentConfig
    from firekit.data.pairs import SubjectData

    subject = SubjectData("s", torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), None, np.eye(3))
    dataset = PairDataset([subject], 2, AugmentConfig(), curriculum_steps=100, curriculum_start=0.2,
                          min_foreground=0.0)
    assert dataset.strength(0) == pytest.approx(0.2) and dataset.strength(50) == pytest.approx(0.6)
    assert dataset.strength(100) == 1.0 and dataset.strength(1000) == 1.0


def test_near_pairs_are_drawn_at_and_near_alignment(tmp_path):
    """near_fraction=1: B takes A's transform; half the pairs exactly (answer 0, images equal), the
    rest followed by a small transform whose known answer warps A onto B."""
    from firekit.core import spatial
    from firekit.data.augment import AugmentConfig

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (40, 44, 8)], indexing="ij"))
    image = (np.exp(-((grid[0] - 0.2) ** 2 / 0.1 + grid[1] ** 2 / 0.3)) + 0.6 * np.exp(-((grid[:2] + 0.3) ** 2).sum(0) / 0.05)).astype(np.float32)
    io.save_nifti(image, np.eye(4), tmp_path / "s1" / "A.nii.gz")
    io.save_nifti(image, np.eye(4), tmp_path / "s1" / "B.nii.gz")
    subjects = [load_subject(s, [1.0, 1.0, None]) for s in find_pairs(f"{tmp_path}/*/A.nii.gz", f"{tmp_path}/*/B.nii.gz")]
    far = PairDataset(subjects, 2, AugmentConfig(), seed=2, spacing=1.0)
    near = PairDataset(subjects, 2, AugmentConfig(), seed=2, spacing=1.0, near_fraction=1.0, near_strength=0.25)
    assert near.describe()["near_fraction"] == 1.0
    batch, independent = near.sample(0, 16), far.sample(0, 16)
    size = batch["u_a2b"].flatten(1).abs().amax(dim=1)
    aligned = size == 0
    assert 3 <= int(aligned.sum()) <= 13  # about half exactly aligned
    assert torch.equal(batch["x_a"][aligned], batch["x_b"][aligned])  # A and B are one image here
    # the others: small answers (strength <= 0.25), far smaller than those of independent pairs
    assert size[~aligned].max() < 0.5 * independent["u_a2b"].flatten(1).abs().amax(dim=1).median()
    points = spatial.identity_grid(batch["u_a2b"].shape[2:]) + batch["u_a2b"]
    inside = (points.abs() <= 1).all(dim=1, keepdim=True).float()
    for i in torch.nonzero(~aligned).flatten():
        before = ((batch["x_a"] - batch["x_b"]).abs() * inside)[i].sum()
        after = ((spatial.warp(batch["x_a"], batch["u_a2b"]) - batch["x_b"]).abs() * inside)[i].sum()
        assert after < 0.35 * before, (int(i), float(before), float(after))
    with pytest.raises(FirekitError, match="near_fraction"):
        PairDataset(subjects, 2, AugmentConfig(), near_fraction=1.5)


def test_contrast_pairs_change_b_by_one_curve_and_nothing_else(tmp_path):
    """contrast_fraction=1: B (and its aligned counterpart) pass through one random intensity curve per
    pair; A, the transforms and their answers are those drawn without it; background stays at -1."""
    from firekit.data.augment import AugmentConfig
    from firekit.data.contrast import apply_curve, random_curve

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (40, 44, 8)], indexing="ij"))
    image = (np.exp(-((grid[0] - 0.2) ** 2 / 0.1 + grid[1] ** 2 / 0.3)) + 0.6 * np.exp(-((grid[:2] + 0.3) ** 2).sum(0) / 0.05)).astype(np.float32)
    io.save_nifti(image, np.eye(4), tmp_path / "s1" / "A.nii.gz")
    io.save_nifti(image, np.eye(4), tmp_path / "s1" / "B.nii.gz")
    subjects = [load_subject(s, [1.0, 1.0, None]) for s in find_pairs(f"{tmp_path}/*/A.nii.gz", f"{tmp_path}/*/B.nii.gz")]
    options = dict(seed=3, spacing=1.0, near_fraction=1.0, counterparts=True)
    plain = PairDataset(subjects, 2, AugmentConfig(), **options).sample(0, 12)
    dataset = PairDataset(subjects, 2, AugmentConfig(), contrast_fraction=1.0, **options)
    assert dataset.describe()["contrast_fraction"] == 1.0
    batch = dataset.sample(0, 12)
    for key in ("x_a", "u_a2b", "u_b2a", "x_a_on_b"):
        assert torch.equal(batch[key], plain[key]), key
    assert not torch.allclose(batch["x_b"], plain["x_b"], atol=0.05)
    background = plain["x_b"] == -1
    assert torch.equal(batch["x_b"][background], plain["x_b"][background])
    aligned = plain["u_a2b"].flatten(1).abs().amax(dim=1) == 0
    assert int(aligned.sum()) >= 2
    for i in torch.nonzero(aligned).flatten():
        # an aligned pair of one image: B is a function of A (one curve), the same for B's counterpart
        assert torch.equal(batch["x_b_on_a"][i], batch["x_b"][i])
        order = plain["x_b"][i].flatten().argsort()
        values, curved = plain["x_b"][i].flatten()[order], batch["x_b"][i].flatten()[order]
        same = values[1:] == values[:-1]
        assert torch.equal(curved[1:][same], curved[:-1][same])
    # the curve: background fixed, values in [-1, 1], the same for a seed
    curve = random_curve(torch.Generator().manual_seed(0))
    assert torch.equal(curve, random_curve(torch.Generator().manual_seed(0)))
    x = torch.linspace(-1.5, 1.5, 101)
    assert apply_curve(x, curve)[0] == -1 and apply_curve(x, curve).abs().max() <= 1
    with pytest.raises(FirekitError, match="contrast_fraction"):
        PairDataset(subjects, 2, AugmentConfig(), contrast_fraction=-0.1)
