"""The MNI152-derived demo dataset: layout, contrasts, the true mapping, idempotence, determinism."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from firekit import FirekitError
from firekit.data import braindata
from firekit.core import spatial
from firekit.data.io import NIFTI_INTENT_VECTOR

pytest.importorskip("nilearn")

from conftest import TINY_DEMO as TINY


@pytest.fixture(scope="module")
def dataset(tiny_demo):
    return tiny_demo, braindata.build_demo_dataset(tiny_demo, **TINY)  # a second call reads what is there


def array(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_layout_dtypes_and_metadata(dataset):
    out, info = dataset
    assert json.loads((out / "dataset.json").read_text()) == info
    assert info["splits"] == {"train": ["subj000"], "val": ["subj001"], "test": ["subj002"]}
    assert info["labels"] == {"1": "CSF", "2": "GM", "3": "WM"}
    assert info["contrasts"] == ["T1", "T2", "FLAIR"] and info["spacing"] == 4.0 and info["seed"] == 0
    readme = (out / "README.md").read_text()
    assert "What is real" in readme and "What is derived" in readme
    shape = TINY["shape"]
    for split, names in info["splits"].items():
        for name in names:
            folder = out / split / name
            assert sorted(p.name for p in folder.iterdir()) == sorted(braindata.FILES)
            for contrast in ("T1", "T2", "FLAIR"):
                image = nib.load(str(folder / f"{contrast}.nii.gz"))
                assert image.get_data_dtype() == np.int16 and image.shape == shape
                assert np.allclose(image.affine, info["affine"])
            assert nib.load(str(folder / "labels.nii.gz")).get_data_dtype() == np.uint8
            field = nib.load(str(folder / "to_template.nii.gz"))
            assert field.shape == (*shape, 1, 3) and field.get_data_dtype() == np.float32
            assert field.header.get_intent()[0] == "vector" and int(field.header["intent_code"]) == NIFTI_INTENT_VECTOR


def test_labels_and_contrast_order(dataset):
    out, _ = dataset
    folder = out / "train" / "subj000"
    labels = array(folder / "labels.nii.gz")
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    means = {c: [array(folder / f"{c}.nii.gz")[labels == k].mean() for k in range(4)] for c in ("T1", "T2", "FLAIR")}
    background, csf, gm, wm = means["T2"]
    assert csf > gm > wm > background
    background, csf, gm, wm = means["FLAIR"]
    assert gm > wm > csf > background
    background, csf, gm, wm = means["T1"]
    assert wm > gm > csf


def test_stored_mapping_reproduces_the_subject(dataset):
    out, info = dataset
    template = braindata.template_volumes(TINY["spacing"], TINY["shape"])
    assert np.allclose(template.affine, info["affine"])
    folder = out / "val" / "subj001"
    points = braindata.template_points(folder)
    affine = template.affine
    voxels = (points - affine[:3, 3]) / np.diag(affine)[:3]
    voxels = torch.from_numpy(voxels.transpose(3, 0, 1, 2)[None]).float()

    def resampled(name):
        return spatial.sample(torch.tensor(template.maps[name])[None, None], voxels)[0, 0].numpy()

    probabilities = np.stack([resampled(name) for name in ("CSF", "GM", "WM")])
    labels = np.where(probabilities.max(0) > 0.3, probabilities.argmax(0) + 1, 0)
    stored = array(folder / "labels.nii.gz")
    assert (labels == stored).mean() > 0.995
    assert (template.labels == stored).mean() < 0.95  # the subject really is moved
    t1 = array(folder / "T1.nii.gz").astype(np.float64).ravel()
    moved = np.corrcoef(t1, resampled("T1").ravel())[0, 1]
    assert moved > 0.95 and moved > np.corrcoef(t1, template.maps["T1"].ravel())[0, 1] + 0.02
    displacement, _ = braindata.load_to_template(folder / "to_template.nii.gz")
    assert 0.5 < np.linalg.norm(displacement, axis=-1)[stored > 0].mean() < 15.0


def test_mapping_follows_itk_convention(dataset, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    out, _ = dataset
    template = braindata.template_volumes(TINY["spacing"], TINY["shape"])
    folder = out / "test" / "subj002"
    path = tmp_path / "gm.nii.gz"
    nib.save(nib.Nifti1Image(template.maps["GM"], template.affine), str(path))
    field = sitk.ReadImage(str(folder / "to_template.nii.gz"), sitk.sitkVectorFloat64)
    reference = sitk.ReadImage(str(folder / "labels.nii.gz"))
    moving = sitk.ReadImage(str(path), sitk.sitkFloat32)
    warped = sitk.Resample(moving, reference, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    by_itk = sitk.GetArrayFromImage(warped).transpose(2, 1, 0)
    voxels = (braindata.template_points(folder) - template.affine[:3, 3]) / np.diag(template.affine)[:3]
    voxels = torch.from_numpy(voxels.transpose(3, 0, 1, 2)[None]).float()
    by_torch = spatial.sample(torch.tensor(template.maps["GM"])[None, None], voxels)[0, 0].numpy()
    assert np.abs(by_itk - by_torch).max() < 1e-3


def test_second_call_is_idempotent_and_other_parameters_are_refused(dataset):
    out, info = dataset
    label_file = out / "train" / "subj000" / "labels.nii.gz"
    before = label_file.stat().st_mtime_ns
    assert braindata.build_demo_dataset(out, **TINY) == info
    assert label_file.stat().st_mtime_ns == before
    with pytest.raises(FirekitError, match="seed"):
        braindata.build_demo_dataset(out, **{**TINY, "seed": 1})


def test_same_seed_same_data_other_seed_other_data(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    one = {**TINY, "subjects": 1, "splits": (1, 0, 0)}  # subject 0 depends only on (seed, 0)
    braindata.build_demo_dataset(again, **one)
    for name in ("labels.nii.gz", "T2.nii.gz", "to_template.nii.gz"):
        assert np.array_equal(array(out / "train" / "subj000" / name), array(again / "train" / "subj000" / name))
    braindata.build_demo_dataset(again, **{**one, "seed": 5}, overwrite=True)
    assert json.loads((again / "dataset.json").read_text())["seed"] == 5
    assert not np.array_equal(array(out / "train" / "subj000" / "labels.nii.gz"),
                              array(again / "train" / "subj000" / "labels.nii.gz"))


def test_bad_requests_are_one_line_errors(tmp_path):
    (tmp_path / "other.txt").write_text("not a dataset")
    with pytest.raises(FirekitError, match="not empty"):
        braindata.build_demo_dataset(tmp_path, **TINY)
    with pytest.raises(FirekitError, match="splits"):
        braindata.build_demo_dataset(tmp_path / "new", **{**TINY, "splits": (2, 1, 1)})
    with pytest.raises(FirekitError, match="does not fit"):
        braindata.template_affine(4.0, (40, 50, 40))


def test_default_grid_holds_the_brain():
    affine = braindata.template_affine()  # raises if the brain does not fit
    assert np.allclose(np.diag(affine)[:3], 1.28)
