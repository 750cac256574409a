"""Bad input on every CLI path (issue 10): one stderr line naming the file and the fix, exit status 2,
no traceback, and nothing left behind; images firekit should accept (smaller than the network,
extremely anisotropic) register with correctly shaped outputs; untrusted checkpoints never run code.

Every case runs ``python -m firekit.cli`` in a subprocess on tiny files, as a user would; the
cases selected run two at a time (each is mostly interpreter start-up).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import firekit
from firekit import Fire, FireConfig
from firekit.data.acdc import write_patient
from firekit.fire.checkpoint import save_model
from firekit.core.errors import FirekitError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WORKERS = 2


def blob(shape, shift=0.0, seed=0):
    """A bright ball with a brighter core on a dim background, and a little noise."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum((g - shift) ** 2 for g in grids)
    noise = np.random.default_rng(seed).random(shape)
    return (np.exp(-4 * r2) + 0.5 * (r2 < 0.3) + 0.05 * noise).astype(np.float32)


def save(root: Path, name: str, data, affine=None) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


class Payload:
    """Unpickling this runs ``call(*args)``: the malicious checkpoint."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def evil_files(root: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints whose unpickling would create ``marker``: torch's zip format and plain pickles."""
    shell = Payload(os.system, f"touch {marker}")
    opener = Payload(open, str(marker), "w")
    files = {"evil_zip.pt": root / "evil_zip.pt", "evil_pickle2.pt": root / "evil_pickle2.pt",
             "evil_pickle5.pt": root / "evil_pickle5.pt"}
    torch.save({"format": "firekit-checkpoint", "config": {"ndim": 2}, "state_dict": shell}, files["evil_zip.pt"])
    files["evil_pickle2.pt"].write_bytes(pickle.dumps({"state_dict": opener}, protocol=2))
    files["evil_pickle5.pt"].write_bytes(pickle.dumps({"state_dict": shell}, protocol=5))
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny good and bad inputs, two small untrained models and a one-step training run."""
    root = tmp_path_factory.mktemp("inputs")
    for subject in ("s1", "s2"):
        a = blob((40, 40), seed=1)
        save(root, f"subjects/{subject}/A.nii.gz", a)
        save(root, f"subjects/{subject}/B.nii.gz", -blob((40, 40), 0.1, seed=2))
        save(root, f"subjects/{subject}/L.nii.gz", (a > 0.6).astype(np.int16))
    moving = blob((40, 40))
    save(root, "moving.nii.gz", moving)
    save(root, "fixed.nii.gz", blob((40, 40), 0.1))
    save(root, "labels.nii.gz", (moving > 0.6).astype(np.int16))
    save(root, "labels_3d.nii.gz", (blob((24, 24, 16)) > 0.6).astype(np.int16))
    save(root, "empty_labels.nii.gz", np.zeros((40, 40), np.int16))
    save(root, "volume.nii.gz", blob((24, 24, 16)))
    save(root, "volume_fixed.nii.gz", blob((24, 24, 16), 0.1))
    save(root, "four.nii.gz", np.random.default_rng(0).random((24, 24, 16, 3)).astype(np.float32))
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = moving.copy()
        bad[3, 4] = value
        save(root, f"{name}.nii.gz", bad)
    save(root, "constant.nii.gz", np.full((40, 40), 3.0, np.float32))
    whole = (root / "volume.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("not an image")
    (root / "garbage.nii.gz").write_bytes(b"not gzip at all")
    (root / "folder").mkdir()
    # accepted as they are
    save(root, "tiny.nii.gz", blob((10, 12)))
    save(root, "tiny_fixed.nii.gz", blob((10, 12), 0.1))
    save(root, "tiny_3d.nii.gz", blob((8, 8, 5)))
    save(root, "tiny_3d_fixed.nii.gz", blob((8, 8, 5), 0.1))
    thick = np.diag([0.5, 0.5, 10.0, 1.0])
    save(root, "aniso.nii.gz", blob((48, 48, 4)), thick)
    save(root, "aniso_fixed.nii.gz", blob((48, 48, 4), 0.1), thick)
    # cine series (X, Y, Z, T)
    series = np.stack([blob((40, 40, 3), 0.02 * t) for t in range(4)], -1)
    save(root, "cine.nii.gz", series, np.diag([1.5, 1.5, 10.0, 1.0]))
    save(root, "cine_2d.nii.gz", series[:, :, :1])
    bad = series.copy()
    bad[1, 2, 0, 3] = np.nan
    save(root, "cine_nan.nii.gz", bad)
    save(root, "cine_constant.nii.gz", np.full((40, 40, 3, 4), 2.0, np.float32))
    whole = (root / "cine.nii.gz").read_bytes()
    (root / "cine_truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    cine_labels = (series[..., 0] > 0.6).astype(np.int16)
    save(root, "cine_labels.nii.gz", cine_labels)
    save(root, "cine_empty_labels.nii.gz", np.zeros((40, 40, 3), np.int16))
    save(root, "cine_tiny.nii.gz", np.stack([blob((8, 8, 2), 0.05 * t) for t in range(4)], -1))
    write_patient(root / "acdc_empty_gt", "patient001", series, np.diag([1.5, 1.5, 10.0, 1.0]), 0, 2,
                  0 * cine_labels, 0 * cine_labels)
    (root / "acdc_none").mkdir()
    # models: untrained small 2D and 3D, one whose config does not fit its weights, a truncated one
    torch.manual_seed(0)
    save_model(Fire(FireConfig.from_preset("small", ndim=2)), root / "model_2d.pt")
    save_model(Fire(FireConfig.from_preset("small", ndim=3)), root / "model_3d.pt")
    payload = torch.load(root / "model_2d.pt", weights_only=True)
    payload["config"]["widths"] = [64, 128, 256]
    torch.save(payload, root / "model_mixed.pt")
    (root / "model_truncated.pt").write_bytes((root / "model_2d.pt").read_bytes()[:5000])
    evil_files(root, root / "PWNED")
    # a one-step run of the small preset, to resume with another
    from firekit.workflows import train_on_files

    train_on_files(str(root / "moving.nii.gz"), str(root / "fixed.nii.gz"), root / "run_small", iterations=1,
                   spacing=2.0, progress=False)
    return root


def reg(*extra, moving="moving.nii.gz", fixed="fixed.nii.gz", model="model_2d.pt", out="{O}/warped.nii.gz"):
    return ["register", "--model", f"{{F}}/{model}", "--moving", f"{{F}}/{moving}", "--fixed", f"{{F}}/{fixed}",
            "--refine", "0", "--out", out, *extra]


def train(a, b, *extra):
    return ["train", "--a", a, "--b", b, "--iterations", "1", "--spacing", "2", "--quiet", "--out", "{O}/run", *extra]


def register_cine(series, *extra, model="none"):
    return ["register-cine", "--model", model, "--series", f"{{F}}/{series}", "--refine", "1", "--quiet",
            "--out", "{O}/cine", *extra]


def evaluate(fixed_labels, warped_labels, *extra):
    return ["evaluate", "--fixed-labels", f"{{F}}/{fixed_labels}", "--warped-labels", f"{{F}}/{warped_labels}", *extra]


SUBJECTS_A, SUBJECTS_B = "{F}/subjects/*/A.nii.gz", "{F}/subjects/*/B.nii.gz"

# case -> (command line with {F} = inputs and {O} = this case's empty output folder, the text the
# one-line message must contain: the offending file's name, or the glob)
BAD = {
    # register
    "register/missing": (reg(moving="nope.nii.gz"), "nope.nii.gz"),
    "register/directory": (reg(moving="folder"), "folder"),
    "register/not_nifti": (reg(moving="notes.txt"), "notes.txt"),
    "register/garbage_nifti": (reg(moving="garbage.nii.gz"), "garbage.nii.gz"),
    "register/truncated": (reg(moving="truncated.nii.gz", fixed="volume_fixed.nii.gz"), "truncated.nii.gz"),
    "register/4d": (reg(moving="four.nii.gz", fixed="volume_fixed.nii.gz"), "four.nii.gz"),
    "register/ndim_mismatch": (reg(moving="volume.nii.gz"), "volume.nii.gz"),
    "register/nan": (reg(moving="nan.nii.gz"), "nan.nii.gz"),
    "register/inf": (reg(fixed="inf.nii.gz"), "inf.nii.gz"),
    "register/constant": (reg(moving="constant.nii.gz"), "constant.nii.gz"),
    "register/empty_labels": (reg("--moving-labels", "{F}/empty_labels.nii.gz", "--out-labels", "{O}/labels.nii.gz"),
                              "empty_labels.nii.gz"),
    "register/labels_shape": (reg("--moving-labels", "{F}/labels_3d.nii.gz", "--out-labels", "{O}/labels.nii.gz"),
                              "labels_3d.nii.gz"),
    "register/model_wrong_ndim": (reg(model="model_3d.pt"), "model_3d.pt"),
    "register/model_mixed": (reg(model="model_mixed.pt"), "model_mixed.pt"),
    "register/model_truncated": (reg(model="model_truncated.pt"), "model_truncated.pt"),
    "register/model_not_checkpoint": (reg(model="moving.nii.gz"), "moving.nii.gz"),
    "register/model_evil_zip": (reg(model="evil_zip.pt"), "evil_zip.pt"),
    "register/model_evil_pickle2": (reg(model="evil_pickle2.pt"), "evil_pickle2.pt"),
    "register/model_evil_pickle5": (reg(model="evil_pickle5.pt"), "evil_pickle5.pt"),
    "register/out_is_input": (reg(out="{F}/moving.nii.gz"), "moving.nii.gz"),
    "register/field_is_input": (reg("--field", "{F}/fixed.nii.gz"), "fixed.nii.gz"),
    "register/out_under_a_file": (reg(out="{F}/notes.txt/warped.nii.gz"), "notes.txt"),
    "register/affine_of_slices": (reg("--affine", "{O}/affine.tfm", moving="volume.nii.gz",
                                      fixed="volume_fixed.nii.gz"), "affine.tfm"),
    # train
    "train/glob_matches_nothing": (train("{F}/nothing/*.nii.gz", SUBJECTS_B), "nothing/*.nii.gz"),
    "train/unequal_counts": (train(SUBJECTS_A, "{F}/fixed.nii.gz"), "fixed.nii.gz"),
    "train/not_nifti": (train("{F}/notes.txt", "{F}/fixed.nii.gz"), "notes.txt"),
    "train/truncated": (train("{F}/truncated.nii.gz", "{F}/volume_fixed.nii.gz"), "truncated.nii.gz"),
    "train/4d": (train("{F}/four.nii.gz", "{F}/volume_fixed.nii.gz"), "four.nii.gz"),
    "train/ndim_mismatch": (train("{F}/moving.nii.gz", "{F}/volume_fixed.nii.gz"), "volume_fixed.nii.gz"),
    "train/nan": (train("{F}/nan.nii.gz", "{F}/fixed.nii.gz"), "nan.nii.gz"),
    "train/constant": (train("{F}/constant.nii.gz", "{F}/fixed.nii.gz"), "constant.nii.gz"),
    "train/empty_labels": (train("{F}/moving.nii.gz", "{F}/fixed.nii.gz", "--labels", "{F}/empty_labels.nii.gz"),
                           "empty_labels.nii.gz"),
    "train/ndim_3_on_2d": (train("{F}/moving.nii.gz", "{F}/fixed.nii.gz", "--ndim", "3"), "moving.nii.gz"),
    "train/out_is_input": (["train", "--a", "{F}/moving.nii.gz", "--b", "{F}/fixed.nii.gz", "--iterations", "1",
                            "--quiet", "--out", "{F}/moving.nii.gz"], "moving.nii.gz"),
    "train/resume_other_preset": (["train", "--a", "{F}/moving.nii.gz", "--b", "{F}/fixed.nii.gz", "--spacing", "2",
                                   "--iterations", "2", "--quiet", "--preset", "paper", "--resume",
                                   "--out", "{F}/run_small"], "checkpoint.pt"),
    "train/cine_constant": (["train", "--cine", "{F}/cine_constant.nii.gz", "--iterations", "1", "--quiet",
                             "--out", "{O}/run"], "cine_constant.nii.gz"),
    "train/cine_3d_file": (["train", "--cine", "{F}/volume.nii.gz", "--iterations", "1", "--quiet",
                            "--out", "{O}/run"], "volume.nii.gz"),
    # register-cine
    "register-cine/missing": (register_cine("nope.nii.gz"), "nope.nii.gz"),
    "register-cine/3d_not_4d": (register_cine("volume.nii.gz"), "volume.nii.gz"),
    "register-cine/truncated": (register_cine("cine_truncated.nii.gz"), "cine_truncated.nii.gz"),
    "register-cine/nan": (register_cine("cine_nan.nii.gz"), "cine_nan.nii.gz"),
    "register-cine/constant": (register_cine("cine_constant.nii.gz"), "cine_constant.nii.gz"),
    "register-cine/empty_labels": (register_cine("cine.nii.gz", "--labels", "{F}/cine_empty_labels.nii.gz"),
                                   "cine_empty_labels.nii.gz"),
    "register-cine/labels_shape": (register_cine("cine.nii.gz", "--labels", "{F}/labels.nii.gz"), "labels.nii.gz"),
    "register-cine/model_wrong_ndim": (register_cine("cine_2d.nii.gz", model="{F}/model_3d.pt"), "model_3d.pt"),
    "register-cine/model_evil": (register_cine("cine.nii.gz", model="{F}/evil_zip.pt"), "evil_zip.pt"),
    "register-cine/out_is_input": (["register-cine", "--model", "none", "--series", "{F}/cine.nii.gz",
                                    "--out", "{F}/cine.nii.gz"], "cine.nii.gz"),
    # evaluate
    "evaluate/missing": (evaluate("labels.nii.gz", "nope.nii.gz"), "nope.nii.gz"),
    "evaluate/directory": (evaluate("labels.nii.gz", "folder"), "folder"),
    "evaluate/not_nifti": (evaluate("notes.txt", "labels.nii.gz"), "notes.txt"),
    "evaluate/truncated": (evaluate("labels_3d.nii.gz", "truncated.nii.gz"), "truncated.nii.gz"),
    "evaluate/4d": (evaluate("labels.nii.gz", "four.nii.gz"), "four.nii.gz"),
    "evaluate/shape_mismatch": (evaluate("labels.nii.gz", "labels_3d.nii.gz"), "labels_3d.nii.gz"),
    "evaluate/nan": (evaluate("labels.nii.gz", "nan.nii.gz"), "nan.nii.gz"),
    "evaluate/empty": (evaluate("empty_labels.nii.gz", "empty_labels.nii.gz"), "empty_labels.nii.gz"),
    "evaluate/not_a_field": (evaluate("labels.nii.gz", "labels.nii.gz", "--field", "{F}/moving.nii.gz"),
                             "moving.nii.gz"),
    # evaluate-cine
    "evaluate-cine/missing": (["evaluate-cine", "--data", "{F}/nope"], "nope"),
    "evaluate-cine/no_patients": (["evaluate-cine", "--data", "{F}/acdc_none"], "acdc_none"),
    "evaluate-cine/empty_ground_truth": (["evaluate-cine", "--data", "{F}/acdc_empty_gt", "--refine", "1"],
                                         "patient001_frame01_gt.nii.gz"),
    "evaluate-cine/model_evil": (["evaluate-cine", "--data", "{F}/acdc_empty_gt", "--model", "{F}/evil_pickle2.pt"],
                                 "evil_pickle2.pt"),
    # data
    "data/demo_out_is_a_file": (["data", "demo", "--out", "{F}/moving.nii.gz", "--quiet"], "moving.nii.gz"),
    "data/demo_out_not_empty": (["data", "demo", "--out", "{F}/subjects", "--quiet"], "subjects"),
    "data/cine_out_is_a_file": (["data", "cine-phantom", "--out", "{F}/moving.nii.gz", "--quiet"], "moving.nii.gz"),
}

# accepted: case -> (command line, {output: expected shape})
GOOD = {
    "register/smaller_than_the_network": (
        reg("--field", "{O}/field.nii.gz", moving="tiny.nii.gz", fixed="tiny_fixed.nii.gz"),
        {"warped.nii.gz": (10, 12, 1), "field.nii.gz": (10, 12, 1, 1, 2)}),
    "register/small_volume_refined": (
        ["register", "--no-network", "--moving", "{F}/tiny_3d.nii.gz", "--fixed", "{F}/tiny_3d_fixed.nii.gz",
         "--refine", "2", "--quiet", "--out", "{O}/warped.nii.gz"], {"warped.nii.gz": (8, 8, 5)}),
    "register/anisotropic_slice_by_slice": (
        reg(moving="aniso.nii.gz", fixed="aniso_fixed.nii.gz"), {"warped.nii.gz": (48, 48, 4)}),
    "register/anisotropic_refined": (
        ["register", "--no-network", "--moving", "{F}/aniso.nii.gz", "--fixed", "{F}/aniso_fixed.nii.gz",
         "--refine", "2", "--quiet", "--out", "{O}/warped.nii.gz", "--field", "{O}/field.nii.gz"],
        {"warped.nii.gz": (48, 48, 4), "field.nii.gz": (48, 48, 4, 1, 3)}),
    "register-cine/smaller_than_the_network": (
        register_cine("cine_tiny.nii.gz", model="{F}/model_2d.pt"),
        {"cine/warped_4d.nii.gz": (8, 8, 2, 4), "cine/field_4d.nii.gz": (8, 8, 2, 4, 3)}),
    "train/cine_smaller_than_the_network": (
        ["train", "--cine", "{F}/cine_tiny.nii.gz", "--ndim", "2", "--iterations", "1", "--quiet", "--out", "{O}/run"],
        {"run/model.pt": None}),
}


def command(case: str, root: Path, outputs: Path) -> tuple[list[str], Path]:
    """The command line of ``case`` and its (new, empty) output folder under ``outputs``."""
    args = (BAD.get(case) or GOOD[case])[0]
    out = outputs / case.replace("/", "__")
    out.mkdir(parents=True)
    return [a.replace("{F}", str(root)).replace("{O}", str(out)) for a in args], out


def snapshot(root: Path) -> dict[str, bytes]:
    """Every input file's bytes (inputs must never change)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(request, inputs, tmp_path_factory):
    """Run the selected cases (two at a time) once: case -> (CompletedProcess, output folder)."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    outputs = tmp_path_factory.mktemp("outputs")
    before = snapshot(inputs)

    def run(case):
        argv, out = command(case, inputs, outputs)
        result = subprocess.run([sys.executable, "-m", "firekit.cli", *argv], capture_output=True, text=True,
                                env=ENV, timeout=600)
        return case, (result, out)

    with ThreadPoolExecutor(WORKERS) as pool:
        done = dict(pool.map(run, sorted(selected)))
    done["inputs unchanged"] = snapshot(inputs) == before
    return done


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(outcomes, inputs, case):
    result, out = outcomes[case]
    message = result.stderr.strip()
    assert result.returncode == 2, message
    assert "Traceback" not in message
    assert message.count("\n") == 0 and message.startswith("firekit: error: "), message
    assert BAD[case][1] in message, message
    left = [str(p.relative_to(out)) for p in out.rglob("*")]
    assert not left, f"left behind: {left}"
    stray = [p.name for p in inputs.rglob(".*") if p.is_file()]  # atomic writes' temp files
    assert not stray, stray
    assert not (inputs / "PWNED").exists()


def test_inputs_are_never_modified(outcomes):
    assert outcomes["inputs unchanged"]


@pytest.mark.parametrize("case", sorted(GOOD))
def test_small_and_anisotropic_images_register_with_the_right_shapes(outcomes, case):
    result, out = outcomes[case]
    assert result.returncode == 0, result.stderr
    for name, shape in GOOD[case][1].items():
        assert (out / name).is_file(), name
        if shape is not None:
            assert nib.load(out / name).shape == shape, name


def test_debug_shows_the_traceback(inputs, tmp_path):
    argv, _ = command("register/nan", inputs, tmp_path)
    result = subprocess.run([sys.executable, "-m", "firekit.cli", "--debug", *argv], capture_output=True, text=True,
                            env=ENV, timeout=600)
    assert result.returncode != 0 and "Traceback" in result.stderr and "FirekitError" in result.stderr


# ------------------------------------------------------------------------------- untrusted checkpoints
def test_malicious_checkpoints_run_nothing_through_the_api(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    for name, path in evil_files(tmp_path, marker).items():
        with pytest.raises(FirekitError) as error:
            firekit.load(path)
        message = str(error.value)
        assert "\n" not in message and name in message and "nothing ran" in message, message
        assert not marker.exists(), name


def test_the_malicious_payloads_are_live(tmp_path):
    """The control: unpickled without weights_only, each file does create its marker."""
    for name in ("evil_zip.pt", "evil_pickle2.pt", "evil_pickle5.pt"):
        marker = tmp_path / f"marker_{name}"
        (tmp_path / name).mkdir()
        path = evil_files(tmp_path / name, marker)[name]
        (torch.load(path, weights_only=False) if name.endswith("zip.pt") else pickle.loads(path.read_bytes()))
        assert marker.exists(), name


# ------------------------------------------------------------------------------- outputs together or not at all
def test_a_failure_part_way_through_the_outputs_leaves_none_of_them(tmp_path):
    from firekit.data import io

    kept = tmp_path / "kept.nii.gz"
    kept.write_bytes(b"an earlier result")
    first, second = tmp_path / "warped.nii.gz", tmp_path / "labels.nii.gz"
    with pytest.raises(OSError, match="disk full"):
        with io.all_or_nothing([first, second, kept, None]):
            io.save_nifti(np.ones((4, 4), np.float32), np.eye(3), first)
            raise OSError("disk full")  # before the second output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.nii.gz"]
    assert kept.read_bytes() == b"an earlier result"
