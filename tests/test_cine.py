"""Cine series: 4D I/O, the reference phase, register_cine and its outputs, CLI register-cine and
train --cine, and the intra-modality pair source."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from firekit.registration import cine
from firekit.data import io
from firekit.core.errors import FirekitError


def beating_disk(shape=(80, 80), phases=8, spacing=1.5, slices=0, seed=0):
    """A bright blood pool in a myocardial ring (radius 20 -> 12 voxels at mid-cycle) inside a body disk;
    2D + t, or 3D + t with ``slices`` slices (the heart tapering towards the apex). Labels 3 LV, 2 Myo."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    distance = np.sqrt(((grid - np.array(shape) / 2) ** 2).sum(-1))
    frames, labels = [], []
    for t in range(phases):
        squeeze = np.sin(np.pi * t / phases) ** 2
        depth = [1.0] if not slices else np.linspace(1.0, 0.6, slices)
        frame, label = [], []
        for scale in depth:
            blood_r = (20 - 8 * squeeze) * scale
            wall = 6 + 2 * squeeze
            blood, ring = distance < blood_r, (distance >= blood_r) & (distance < blood_r + wall)
            image = 0.25 * (distance < 36) + 0.85 * blood + 0.3 * ring + 0.03 * rng.standard_normal(shape)
            frame.append(image)
            label.append(3 * blood + 2 * ring)
        frames.append(np.stack(frame, -1) if slices else frame[0])
        labels.append(np.stack(label, -1) if slices else label[0])
    ndim = len(shape) + bool(slices)
    affine = np.diag([spacing] * len(shape) + ([8.0] if slices else []) + [1.0])
    return cine.Series(np.stack(frames, -1).astype(np.float32), affine), [lab.astype(np.int32) for lab in labels], ndim


def dice(a, b, label):
    return 2 * ((a == label) & (b == label)).sum() / max(1, (a == label).sum() + (b == label).sum())


def test_series_round_trip_keeps_data_and_geometry(tmp_path):
    data = np.random.default_rng(0).random((10, 12, 4, 5)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    affine[:3, 3] = [10, -20, 5]
    series = cine.load_series(cine.save_series(data, affine, tmp_path / "s_4d.nii.gz"))
    assert series.shape == (10, 12, 4) and series.phases == 5 and series.ndim == 3
    np.testing.assert_array_equal(series.data, data)
    np.testing.assert_allclose(series.affine, affine)
    flat = cine.load_series(cine.save_series(data[:, :, 0], np.diag([1.5, 1.5, 1.0]), tmp_path / "f_4d.nii.gz"))
    assert flat.ndim == 2 and flat.shape == (10, 12) and nib.load(str(tmp_path / "f_4d.nii.gz")).shape == (10, 12, 1, 5)
    assert flat.phase(-1).shape == (10, 12)
    with pytest.raises(FirekitError, match="phase 5 does not exist"):
        flat.phase(5)
    io.save_nifti(data[..., 0], affine, tmp_path / "three.nii.gz")
    with pytest.raises(FirekitError, match=r"three.nii.gz: cine series has shape \(10, 12, 4\); expected a 4D"):
        cine.load_series(tmp_path / "three.nii.gz")


def test_reference_phase_from_ed_es_or_an_index():
    assert cine.reference_phase("ED", 20) == 0 and cine.reference_phase("ed", 20, ed=3) == 3
    assert cine.reference_phase("ES", 20, es=8) == 8 and cine.reference_phase(-1, 20) == 19
    assert cine.reference_phase("7", 20) == 7
    with pytest.raises(FirekitError, match="reference ES needs the end-systolic phase"):
        cine.reference_phase("ES", 20)
    with pytest.raises(FirekitError, match="reference phase 20 does not exist"):
        cine.reference_phase(20, 20)
    with pytest.raises(FirekitError, match="ED, ES or a phase index"):
        cine.reference_phase("mid", 20)


def test_register_cine_follows_the_contraction_both_ways(tmp_path):
    series, labels, _ = beating_disk()
    mid = series.phases // 2
    result = cine.register_cine(None, series, reference="ED")
    assert result.reference == 0 and result.displacement.shape == (80, 80, series.phases, 2)
    assert np.abs(result.displacement[..., 0, :]).max() == 0  # the reference is the identity
    np.testing.assert_allclose(result.warped.data[..., 0], series.data[..., 0], atol=1e-5)
    # the reference labels carried to mid-systole, and mid-systole's labels brought back
    propagated = result.propagate(labels[0])
    assert propagated.shape == (80, 80, series.phases)
    for label in (3, 2):
        before = dice(labels[0], labels[mid], label)
        assert dice(propagated[..., mid], labels[mid], label) > max(0.85, before + 0.2), label
        assert dice(result.apply(labels[mid], mid).data, labels[0], label) > max(0.85, before + 0.2), label
    folded = (result.jacobian_determinant() <= 0).mean()
    assert folded < 0.01
    np.testing.assert_array_equal(result.jacobian_determinant(mid), result.jacobian_determinant()[..., mid])
    written = result.save(tmp_path / "out", labels=labels[0])
    warped = nib.load(str(written["warped"]))
    field = nib.load(str(written["field"]))
    assert warped.shape == (80, 80, 1, series.phases) and field.shape == (80, 80, 1, series.phases, 2)
    np.testing.assert_allclose(field.affine[:2, :2], series.affine[:2, :2])
    assert field.header.get_intent()[0] == "vector"
    assert nib.load(str(written["labels"])).shape == (80, 80, 1, series.phases)
    with pytest.raises(FirekitError, match="differs from the series' frames"):
        result.propagate(np.zeros((5, 5), np.int32))


def test_register_cine_in_3d_with_a_2d_model_refines_in_3d():
    from firekit.fire.model import Fire, FireConfig

    series, labels, _ = beating_disk(shape=(48, 48), phases=4, slices=5)
    torch.manual_seed(0)
    model = Fire(FireConfig.from_preset("small", ndim=2))
    with pytest.raises(FirekitError, match="needs refinement"):
        cine.register_cine(model, series, refine=0)
    result = cine.register_cine(model, series, reference=2)
    assert result.displacement.shape == (48, 48, 5, 4, 3) and result.reference == 2
    warped = result.apply(labels[0], 0).data
    assert dice(warped, labels[2], 3) > dice(labels[0], labels[2], 3) + 0.1


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "firekit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_register_cine_reads_ed_es_from_info_cfg(tmp_path):
    series, labels, _ = beating_disk(phases=6)
    folder = tmp_path / "patient001"
    path = cine.save_series(series.data, series.affine, folder / "patient001_4d.nii.gz")
    io.save_nifti(labels[0].astype(np.uint8), series.affine, folder / "patient001_frame01_gt.nii.gz")
    (folder / "Info.cfg").write_text("ED: 1\nES: 4\nGroup: NOR\nHeight: 180.0\nNbFrame: 6\nWeight: 80.0\n")
    out = tmp_path / "out"
    result = run("register-cine", "--model", "none", "--series", path, "--out", out, "--reference", "ES",
                 "--labels", folder / "patient001_frame01_gt.nii.gz", "--labels-phase", "ED", "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "cine.json").read_text())
    assert (summary["ed"], summary["es"], summary["reference"], summary["phases"]) == (0, 3, 3, 6)
    propagated = nib.load(str(out / "labels_4d.nii.gz")).get_fdata()[:, :, 0]
    # ED labels brought to ES (the reference), then carried to every phase: at ED they are ED's again
    before = dice(labels[0], labels[3], 3)
    assert dice(propagated[..., 3], labels[3], 3) > max(0.75, before + 0.2)
    assert dice(propagated[..., 0], labels[0], 3) > 0.75  # and carried back to ED: there and back
    bad = run("register-cine", "--model", "none", "--series", path, "--out", tmp_path / "o2", "--es", 9)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "ES frame 9 is outside 1..6" in bad.stderr
    same = run("register-cine", "--model", "none", "--series", path, "--out", folder)
    assert same.returncode == 0 or "Traceback" not in same.stderr


def test_cine_pairs_draw_two_phases_of_one_series_and_validate_ed_es():
    series, labels, _ = beating_disk(phases=6)
    other, other_labels, _ = beating_disk(phases=6, seed=1)
    known = [{0: io.Volume(labels[0], series.affine), 3: io.Volume(labels[3], series.affine)}, {}]
    pairs = cine.CinePairs([series, other], ndim=2, labels=known)
    batch = pairs.sample(5, batch_size=3)
    assert batch["x_a"].shape == (3, 1, 80, 80) and not torch.equal(batch["x_a"], batch["x_b"])
    assert torch.equal(pairs.sample(5, 3)["x_b"], batch["x_b"])  # a function of (seed, step)
    assert torch.equal(pairs.sample(5, 2, first=1)["x_a"], batch["x_a"][1:])  # a slice drawn alone
    (validation,) = pairs.validation()
    assert validation["labels_a"].shape == (1, 1, 80, 80) and int(validation["labels_b"].max()) == 3
    assert pairs.describe()["cine"] is True


def test_cli_train_cine_writes_a_model_that_register_cine_uses(tmp_path):
    series, labels, _ = beating_disk(shape=(48, 48), phases=5)
    for index in range(2):
        cine.save_series(np.roll(series.data, 2 * index, axis=0), series.affine,
                         tmp_path / "cine" / f"p{index}" / f"p{index}_4d.nii.gz")
    run_dir = tmp_path / "run"
    result = run("train", "--cine", f"{tmp_path}/cine/*/*_4d.nii.gz", "--iterations", 2, "--out", run_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "model.pt").is_file()
    mixed = run("train", "--cine", f"{tmp_path}/cine/*/*_4d.nii.gz", "--a", "x", "--out", tmp_path / "r2")
    assert mixed.returncode == 2 and "--cine alone" in mixed.stderr
    none = run("train", "--cine", f"{tmp_path}/nothing/*.nii.gz", "--out", tmp_path / "r3")
    assert none.returncode == 2 and "matches no file" in none.stderr
    registered = run("register-cine", "--model", run_dir / "model.pt", "--series",
                     tmp_path / "cine" / "p0" / "p0_4d.nii.gz", "--out", tmp_path / "reg", "--refine", 0)
    assert registered.returncode == 0, registered.stderr
    assert nib.load(str(tmp_path / "reg" / "field_4d.nii.gz")).shape == (48, 48, 1, 5, 2)


def test_ed_to_es_on_a_tiny_phantom_beats_unaligned(tmp_path):
    from firekit.data import acdc

    result = run("data", "cine-phantom", "--out", tmp_path / "phantom", "--patients", 1, "--phases", 10,
                 "--shape", 64, 64, 8, "--seed", 3, "--quiet")
    assert result.returncode == 0, result.stderr
    (patient,) = acdc.find_patients(tmp_path / "phantom")
    series = patient.series()
    labels_ed, labels_es = patient.labels(patient.ed).data, patient.labels(patient.es).data
    registered = cine.register_cine(None, series, reference="ES", ed=patient.ed, es=patient.es)
    warped = registered.apply(labels_ed, patient.ed).data
    for label, margin in ((3, 0.1), (2, 0.05)):  # LV cavity, myocardium (the paper's Table 3)
        assert dice(warped, labels_es, label) > dice(labels_ed, labels_es, label) + margin, label
    assert (registered.jacobian_determinant(patient.ed) <= 0).mean() < 0.001


def test_cli_evaluate_cine_scores_ed_to_es_per_patient(tmp_path):
    from firekit.data import cinephantom

    cinephantom.build_cine_phantom(tmp_path / "acdc" / "training", patients=2, phases=8, shape=(48, 48, 6), seed=4)
    result = run("evaluate-cine", "--data", tmp_path / "acdc", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert sorted(rows) == ["patient001", "patient002"]
    for row in rows.values():
        before, after = row["unaligned"]["dice"]["LV cavity"], row["registered"]["dice"]["LV cavity"]
        assert after > before and row["registered"]["folding_percent"] < 0.1 and row["phases"] == 8
    table = run("evaluate-cine", "--data", tmp_path / "acdc")
    assert table.returncode == 0 and "mean Dice ED -> ES: LV cavity" in table.stdout
    empty = run("evaluate-cine", "--data", tmp_path / "nothing")
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1
