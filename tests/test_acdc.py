"""The ACDC layout (reader, writer, errors) and the synthetic cine phantom written in it."""

import json

import nibabel as nib
import numpy as np
import pytest

from firekit import FirekitError
from firekit.data import acdc, cinephantom, io

TINY = dict(shape=(64, 64, 8), spacing=(1.5, 1.5, 8.0), phases=10)
PATIENTS = 2


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("cine") / "acdc"
    patients = cinephantom.build_cine_phantom(out, patients=PATIENTS, seed=3, **TINY)
    return out, patients


def volume_ml(labels, value, affine):
    return float((labels == value).sum()) * float(np.prod(io.spacing(affine))) / 1000.0


def write_tiny(root, name="patient001", shape=(8, 8, 3), phases=4, ed=0, es=2, seed=0):
    rng = np.random.default_rng(seed)
    series = rng.integers(0, 1000, (*shape, phases)).astype(np.int16)
    labels = rng.integers(0, 4, (2, *shape))
    affine = np.diag([1.5, 1.5, 8.0, 1.0][: len(shape)] + [1.0])
    return acdc.write_patient(root, name, series, affine, ed, es, labels[0], labels[1],
                              {"Group": "DCM", "Height": 184, "Weight": 95.0}), series, labels


def one_line_error(match_path, call):
    with pytest.raises(FirekitError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and str(match_path) in message, message
    return message


def test_phantom_layout_on_disk(phantom):
    out, patients = phantom
    assert [p.name for p in patients] == ["patient001", "patient002"]
    assert (out / "README.md").read_text().count("synthetic") >= 1
    for patient in patients:
        es = patient.info["ES"]
        frames = {"patient{:03d}_frame{:02d}{}.nii.gz".format(int(patient.name[7:]), n, gt)
                  for n in (1, es) for gt in ("", "_gt")}
        assert sorted(p.name for p in patient.folder.iterdir()) == sorted(
            {"Info.cfg", f"{patient.name}_4d.nii.gz", *frames})
        series = nib.load(str(patient.series_path))
        assert series.shape == (*TINY["shape"], TINY["phases"]) and series.get_data_dtype() == np.int16
        assert series.header.get_zooms()[3] > 0  # seconds per phase
        frame, gt = patient.frames[patient.es]
        assert frame.name == f"{patient.name}_frame{es:02d}.nii.gz" and gt.name.endswith(f"frame{es:02d}_gt.nii.gz")
        assert nib.load(str(frame)).get_data_dtype() == np.int16 and nib.load(str(gt)).get_data_dtype() == np.uint8


def test_reader_types_phases_and_grids(phantom):
    out, _ = phantom
    patient = acdc.read_patient(out / "patient002")
    info = patient.info
    assert set(info) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight", "EF"}
    assert [type(info[k]) for k in ("ED", "ES", "NbFrame", "Height", "Weight", "Group", "EF")] == \
        [int, int, int, float, float, str, float]
    # 1-based frame numbers on disk, 0-based phases in memory.
    assert info["ED"] == 1 and patient.ed == 0 and patient.es == info["ES"] - 1
    assert sorted(patient.frames) == [patient.ed, patient.es] and info["NbFrame"] == patient.phases == TINY["phases"]
    series = patient.series()
    assert series.data.shape == (*TINY["shape"], TINY["phases"])
    assert np.allclose(io.spacing(series.affine), TINY["spacing"])  # anisotropic, as written
    for phase in (patient.ed, patient.es):
        frame, labels = patient.frame(phase), patient.labels(phase)
        assert np.array_equal(frame.data, series.data[..., phase])
        assert labels.shape == frame.shape == TINY["shape"] and np.allclose(labels.affine, frame.affine)
        assert np.allclose(frame.affine, series.affine)
        assert set(np.unique(labels.data).tolist()) == {0, 1, 2, 3}
    one_line_error(patient.folder, lambda: patient.labels(1))  # no ground truth between ED and ES


def test_read_info_parses_acdc_values(tmp_path):
    path = tmp_path / "Info.cfg"
    path.write_text("ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
    assert acdc.read_info(path) == {"ED": 1, "ES": 12, "Group": "DCM", "Height": 184.0, "NbFrame": 30,
                                    "Weight": 95.0}
    for text in ("ED: 1\nES: twelve\n", "ED: 1\n", "ED 1\nES: 2\n", "ED: 1.5\nES: 2\n"):
        path.write_text(text)
        one_line_error(path, lambda: acdc.read_info(path))
    one_line_error(tmp_path / "none" / "Info.cfg", lambda: acdc.read_info(tmp_path / "none" / "Info.cfg"))


@pytest.mark.parametrize("shape", [(8, 8, 3), (8, 8)], ids=["3D+t", "2D+t"])
def test_write_patient_round_trip(tmp_path, shape):
    patient, series, labels = write_tiny(tmp_path, shape=shape, ed=0, es=2)
    assert patient.folder == tmp_path / "patient001" and (patient.ed, patient.es) == (0, 2)
    assert patient.info == {"ED": 1, "ES": 3, "Group": "DCM", "Height": 184.0, "NbFrame": 4, "Weight": 95.0}
    loaded = patient.series()
    assert loaded.ndim == len(shape) and np.array_equal(loaded.data, series)
    assert np.array_equal(patient.labels(0).data, labels[0]) and np.array_equal(patient.labels(2).data, labels[1])
    # Rewriting with another ES removes the old ES frame files.
    patient, _, _ = write_tiny(tmp_path, shape=shape, ed=0, es=1)
    assert sorted(p.name for p in patient.folder.glob("*frame*")) == [
        "patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz",
        "patient001_frame02.nii.gz", "patient001_frame02_gt.nii.gz"]


def test_write_patient_refuses_bad_input(tmp_path):
    with pytest.raises(FirekitError, match="patientNNN"):
        write_tiny(tmp_path, name="case1")
    with pytest.raises(FirekitError, match="two different phases"):
        write_tiny(tmp_path, ed=1, es=1)
    with pytest.raises(FirekitError, match="two different phases"):
        write_tiny(tmp_path, ed=0, es=4)


def test_find_patients_at_depth_one_and_two(tmp_path):
    for split, name in (("training", "patient002"), ("training", "patient001"), ("testing", "patient101")):
        write_tiny(tmp_path / split, name=name)
    (tmp_path / "MANDATORY_CITATION.md").write_text("cite ACDC\n")
    assert [p.name for p in acdc.find_patients(tmp_path)] == ["patient001", "patient002", "patient101"]
    assert [p.name for p in acdc.find_patients(tmp_path / "training")] == ["patient001", "patient002"]
    assert [p.name for p in acdc.find_patients(tmp_path / "testing" / "patient101")] == ["patient101"]
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    assert "no ACDC patient folders" in one_line_error(empty, lambda: acdc.find_patients(empty))


def _drop_info(folder):
    (folder / "Info.cfg").unlink()
    return folder / "Info.cfg"


def _edit_info(key, value):
    def edit(folder):
        path = folder / "Info.cfg"
        lines = [f"{key}: {value}" if line.startswith(f"{key}:") else line for line in path.read_text().splitlines()]
        path.write_text("\n".join(lines) + "\n")
        return path
    return edit


def _drop_series(folder):
    (folder / "patient001_4d.nii.gz").unlink()
    return folder / "patient001_4d.nii.gz"


def _wrong_gt(folder):
    path = folder / "patient001_frame03_gt.nii.gz"
    io.save_nifti(np.zeros((8, 7, 3), np.uint8), np.diag([1.5, 1.5, 8.0, 1.0]), path)
    return path


@pytest.mark.parametrize("damage, says", [
    (_drop_info, "Info.cfg not found"),
    (_edit_info("ED", 9), "ED 9 is outside frames 1..4"),
    (_edit_info("ES", 0), "ES 0 is outside frames 1..4"),
    (_edit_info("NbFrame", 30), "NbFrame 30 but patient001_4d.nii.gz has 4 phases"),
    (_drop_series, "4D cine file not found"),
    (_wrong_gt, "ground-truth shape (8, 7, 3) differs"),
], ids=["no-info", "ed-range", "es-range", "nbframe", "no-4d", "gt-shape"])
def test_broken_patient_is_one_line_error_naming_the_file(tmp_path, damage, says):
    write_tiny(tmp_path / "training")
    path = damage(tmp_path / "training" / "patient001")
    message = one_line_error(path, lambda: acdc.find_patients(tmp_path))
    assert says in message, message


def test_phantom_ejection_fraction_and_myocardium(phantom):
    _, patients = phantom
    for patient in patients:
        ed, es = patient.labels(patient.ed), patient.labels(patient.es)
        lv_ed, lv_es = volume_ml(ed.data, 3, ed.affine), volume_ml(es.data, 3, es.affine)
        ef = patient.info["EF"] / 100.0
        assert 0.5 <= ef <= 0.7 and lv_es < lv_ed
        assert abs((1.0 - lv_es / lv_ed) - ef) < 0.03, (lv_ed, lv_es, ef)
        myo_ed, myo_es = volume_ml(ed.data, 2, ed.affine), volume_ml(es.data, 2, es.affine)
        assert abs(myo_es / myo_ed - 1.0) < 0.2, (myo_ed, myo_es)
        # Mid-ventricular wall: annulus thickness from areas, thicker at ES.
        z = int(np.median(np.flatnonzero((es.data == 3).any(axis=(0, 1)))))
        thickness = []
        for labels in (ed.data[..., z], es.data[..., z]):
            endo = (labels == 3).sum() * 1.5 ** 2
            epi = endo + (labels == 2).sum() * 1.5 ** 2
            thickness.append(np.sqrt(epi / np.pi) - np.sqrt(endo / np.pi))
        assert thickness[1] > 1.25 * thickness[0], thickness
        rv_ed, rv_es = volume_ml(ed.data, 1, ed.affine), volume_ml(es.data, 1, es.affine)
        assert rv_ed > 0.3 * lv_ed and 0 < rv_es < rv_ed
        # Blood bright, myocardium dark (bSSFP-like) in the frames.
        frame = patient.frame(patient.ed).data
        assert frame[ed.data == 3].mean() > 2.0 * frame[ed.data == 2].mean()


def test_phantom_volume_curve_and_index(phantom):
    out, patients = phantom
    index = json.loads((out / cinephantom.INDEX_FILE).read_text())
    assert index["names"] == [p.name for p in patients] and index["parameters"]["seed"] == 3
    for patient in patients:
        truth = index["patients"][patient.name]
        curve = truth["lv_curve"]
        assert int(np.argmax(curve)) == patient.ed == 0 and int(np.argmin(curve)) == patient.es
        assert 0.3 <= patient.es / patient.phases <= 0.42
        assert truth["ESV"] == pytest.approx(truth["EDV"] * (1 - patient.info["EF"] / 100), rel=1e-3)
    tau = np.linspace(0, 1, 401)
    c = cinephantom.volume_curve(tau)
    assert c[0] == 0 and abs(c[-1]) < 1e-6 and c.max() == pytest.approx(1.0)
    assert np.abs(np.diff(c)).max() < 0.03  # smooth: no jumps


def test_phantom_is_deterministic_and_patients_differ():
    a, b = cinephantom.cine_patient(0, seed=5, **TINY), cinephantom.cine_patient(0, seed=5, **TINY)
    assert np.array_equal(a.series, b.series) and np.array_equal(a.labels, b.labels) and a.info == b.info
    other = cinephantom.cine_patient(1, seed=5, **TINY)
    lv_a, lv_o = a.labels[..., 0] == 3, other.labels[..., 0] == 3
    dice = 2 * (lv_a & lv_o).sum() / (lv_a.sum() + lv_o.sum())
    assert dice < 0.9 and a.info["EF"] != other.info["EF"]
    assert not np.array_equal(cinephantom.cine_patient(0, seed=6, **TINY).labels, a.labels)


def test_build_is_idempotent_and_refuses_other_folders(phantom, tmp_path):
    out, patients = phantom
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = cinephantom.build_cine_phantom(out, patients=PATIENTS, seed=3, **TINY)
    assert [p.name for p in again] == [p.name for p in patients]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(FirekitError, match="other seed"):
        cinephantom.build_cine_phantom(out, patients=PATIENTS, seed=4, **TINY)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(FirekitError, match="not empty"):
        cinephantom.build_cine_phantom(tmp_path, patients=1, **TINY)
    copy = tmp_path / "copy"
    cinephantom.build_cine_phantom(copy, patients=2, seed=3, **TINY)
    rebuilt = cinephantom.build_cine_phantom(copy, patients=1, seed=3, overwrite=True, **TINY)
    assert [p.name for p in rebuilt] == ["patient001"] and not (copy / "patient002").exists()
    # Patient 1 does not depend on how many were built.
    assert np.array_equal(rebuilt[0].series().data, patients[0].series().data)
