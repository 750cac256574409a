"""The firekit console script, through subprocess as a user runs it, on tiny demo data."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from firekit.data import io

SMALL = ["--spacing", "4", "--shape", "44", "52", "44"]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "firekit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny demo data and a 3-step 2D model, built through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    result = run("data", "demo", "--out", data, "--subjects", 3, "--quiet", *SMALL)
    assert result.returncode == 0, result.stderr
    run_dir = root / "run"
    result = run("train", "--a", f"{data}/train/*/T1.nii.gz", "--b", f"{data}/train/*/T2.nii.gz",
                 "--labels", f"{data}/train/*/labels.nii.gz", "--ndim", 2, "--iterations", 3, "--val-every", 3,
                 "--spacing", 4, "--out", run_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    return root, data, run_dir


def test_help_for_every_command():
    result = run("--help")
    assert result.returncode == 0 and "ITK/LPS" in result.stdout
    assert run("--version").stdout.startswith("firekit ")
    for command in (["data", "demo"], ["train"], ["register"], ["evaluate"], ["demo"]):
        assert run(*command, "--help").returncode == 0, command
    assert "a2b" in run("register", "--help").stdout


def test_data_demo_layout(workspace):
    _, data, _ = workspace
    info = json.loads((data / "dataset.json").read_text())
    assert info["splits"] == {"train": ["subj000"], "val": ["subj001"], "test": ["subj002"]}
    for name in ("T1", "T2", "FLAIR", "labels", "to_template"):
        assert (data / "train" / "subj000" / f"{name}.nii.gz").is_file()
    assert "real" in (data / "README.md").read_text()


def test_train_writes_a_run_and_guards_its_folder(workspace):
    root, data, run_dir = workspace
    for name in ("model.pt", "checkpoint.pt", "config.yaml", "losses.csv", "validation.csv"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "losses.csv").read_text().splitlines()) == 1 + 3
    args = ["train", "--a", f"{data}/train/*/T1.nii.gz", "--b", f"{data}/train/*/T2.nii.gz", "--ndim", 2,
            "--spacing", 4, "--quiet"]
    assert_one_line_error(run(*args, "--iterations", 4, "--out", run_dir), "--resume", "--overwrite")
    copy = root / "run_copy"
    import shutil

    shutil.copytree(run_dir, copy)
    result = run(*args, "--iterations", 5, "--out", copy, "--resume")
    assert result.returncode == 0, result.stderr
    assert len((copy / "losses.csv").read_text().splitlines()) == 1 + 5
    assert_one_line_error(run("train", "--a", f"{data}/nothing/*.nii.gz", "--b", f"{data}/train/*/T2.nii.gz",
                              "--out", root / "x"), "matched no files")


def test_register_and_evaluate_end_to_end(workspace):
    root, data, run_dir = workspace
    out = root / "reg"
    moving, fixed = data / "test/subj002/T2.nii.gz", data / "val/subj001/T1.nii.gz"
    result = run("register", "--model", run_dir / "model.pt", "--moving", moving, "--fixed", fixed,
                 "--direction", "b2a", "--out", out / "warped.nii.gz",
                 "--moving-labels", data / "test/subj002/labels.nii.gz", "--out-labels", out / "labels.nii.gz",
                 "--field", out / "field.nii.gz", "--spacing", 4)
    assert result.returncode == 0, result.stderr
    warped, labels = io.load_volume(out / "warped.nii.gz"), io.load_labels(out / "labels.nii.gz")
    fixed_volume = io.load_volume(fixed)
    assert warped.shape == labels.shape == fixed_volume.shape
    np.testing.assert_allclose(warped.affine, fixed_volume.affine)
    assert set(np.unique(labels.data)) <= {0, 1, 2, 3}
    import nibabel as nib

    field = nib.load(out / "field.nii.gz")
    assert field.shape == (*fixed_volume.shape, 1, 3) and field.header.get_intent()[0] == "vector"
    result = run("evaluate", "--fixed-labels", data / "val/subj001/labels.nii.gz", "--warped-labels",
                 out / "labels.nii.gz", "--field", out / "field.nii.gz", "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores["dice"]) == {"1", "2", "3"} and 0 < scores["mean_dice"] < 1
    assert all(v >= 0 for v in scores["hd95_mm"].values()) and scores["folding_percent"] >= 0


def test_register_network_alone_and_refinement_alone(workspace, tmp_path):
    root, data, run_dir = workspace
    moving, fixed = data / "test/subj002/T2.nii.gz", data / "val/subj001/T1.nii.gz"
    common = ["--moving", moving, "--fixed", fixed, "--direction", "b2a", "--spacing", 4,
              "--moving-labels", data / "test/subj002/labels.nii.gz"]
    scores = {}
    for name, extra in (("network", ["--model", run_dir / "model.pt", "--refine", 0]),
                        ("classical", ["--no-network"]),
                        ("symmetric", ["--no-network", "--refine", 10, "--symmetric"])):
        result = run("register", *common, *extra, "--out", tmp_path / f"{name}.nii.gz",
                     "--out-labels", tmp_path / f"{name}_labels.nii.gz")
        assert result.returncode == 0, result.stderr
        evaluated = run("evaluate", "--fixed-labels", data / "val/subj001/labels.nii.gz",
                        "--warped-labels", tmp_path / f"{name}_labels.nii.gz", "--json")
        scores[name] = json.loads(evaluated.stdout)["mean_dice"]
    # a 3-step network barely moves the image; refinement must register it
    assert scores["classical"] > scores["network"] + 0.1, scores
    assert scores["symmetric"] > scores["network"] + 0.1, scores
    assert_one_line_error(run("register", *common, "--refine", "-1", "--out", tmp_path / "x.nii.gz"), "--refine")


@pytest.mark.parametrize("case", ["missing", "not_nifti", "mismatched_ndim", "out_is_input", "directory"])
def test_register_bad_inputs_exit_2_in_one_line(workspace, tmp_path, case):
    root, data, run_dir = workspace
    fixed = data / "val/subj001/T1.nii.gz"
    moving = data / "test/subj002/T2.nii.gz"
    out = tmp_path / "warped.nii.gz"
    expected = {"missing": "not found", "not_nifti": "not a NIfTI", "mismatched_ndim": "same ndim",
                "out_is_input": "overwrite an input", "directory": "directory"}[case]
    if case == "missing":
        moving = tmp_path / "nope.nii.gz"
    elif case == "not_nifti":
        moving = tmp_path / "notes.txt"
        moving.write_text("not an image")
    elif case == "mismatched_ndim":
        moving = io.save_nifti(np.random.rand(40, 40).astype(np.float32), np.eye(4), tmp_path / "flat.nii.gz")
    elif case == "out_is_input":
        out = moving
    elif case == "directory":
        moving = tmp_path
    before = moving.read_bytes() if case == "out_is_input" else None
    result = run("register", "--model", run_dir / "model.pt", "--moving", moving, "--fixed", fixed, "--out", out,
                 "--spacing", 4)
    assert_one_line_error(result, expected)
    if before is not None:
        assert moving.read_bytes() == before
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_checkpoint_is_refused(tmp_path, workspace):
    _, data, _ = workspace
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"\x80\x04not a checkpoint")
    result = run("register", "--model", bogus, "--moving", data / "test/subj002/T2.nii.gz", "--fixed",
                 data / "val/subj001/T1.nii.gz", "--out", tmp_path / "w.nii.gz")
    assert_one_line_error(result, "checkpoint")


def test_demo_registers_test_pairs_with_the_shipped_model(workspace):
    root, data, _ = workspace
    out = root / "results"
    result = run("demo", "--data", data, "--out", out, "--pairs", 2)
    assert result.returncode == 0, result.stderr
    assert "unaligned" in result.stdout and "FIRE + refinement" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 2 and 0 <= summary["refined"]["mean"] <= 1
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    pair = out / "pairs" / "subj002" / "pair000"
    for name in ("moving", "fixed", "warped", "warped_labels", "field", "true_field"):
        assert (pair / f"{name}.nii.gz").is_file(), name
    assert (pair / "affine.tfm").read_text().startswith("#Insight Transform File")


def test_demo_train_retrains_with_the_shipped_recipe(workspace):
    root, data, _ = workspace
    out = root / "results_trained"
    result = run("demo", "--data", data, "--out", out, "--pairs", 1, "--train", "--iterations", 2)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((out / "train" / "config.yaml").read_text())
    assert config["model"]["affine_pooling"] == "keypoints" and config["train"]["aux_weight"] == 1000.0
    assert config["train"]["schedule"] == "cosine" and config["train"]["ema_decay"] > 0
    assert json.loads((out / "summary.json").read_text())["model"].startswith(str(out / "train" / "model"))


def test_train_learning_switches_reach_the_run_config(workspace):
    root, data, _ = workspace
    run_dir = root / "run_switches"
    result = run("train", "--a", f"{data}/train/*/T1.nii.gz", "--b", f"{data}/train/*/T2.nii.gz",
                 "--ndim", 2, "--iterations", 2, "--spacing", 4, "--out", run_dir, "--quiet",
                 "--prealign", "moments", "--residual-bound", 0.2, "--aux-weight", 1000, "--curriculum-steps", 2,
                 "--similarity-weight", 1, "--distill-weight", 1, "--affine-first-steps", 1,
                 "--lr-affine", 3e-4, "--lr-nonrigid", 2e-4, "--channels-last", "--sync-every", 2, "--no-amp",
                 "--loader-threads", 2)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["prealign"] == "moments" and config["model"]["residual_bound"] == 0.2
    train = config["train"]
    assert (train["aux_weight"], train["similarity_weight"], train["distill_weight"], train["affine_first_steps"]) \
        == (1000.0, 1.0, 1.0, 1)
    # the rates given, and the small preset's for the group not given
    assert (train["lr_affine"], train["lr_nonrigid"], train["lr_synthesis"]) == (3e-4, 2e-4, 1e-3)
    assert (train["channels_last"], train["sync_every"], train["amp"], train["compile"]) == (True, 2, False, False)
    assert train["loader_threads"] == 2
    assert config["data"]["curriculum_steps"] == 2
