"""Training killed with SIGKILL at random moments, then resumed (issue 10): no checkpoint is ever
corrupt, and the resumed run ends exactly where an uninterrupted one does (train() promises the same
losses, bitwise on the CPU, after a resume)."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from firekit.fire.checkpoint import load_checkpoint

ITERATIONS = 16  # each of the four kills lets one to three new steps through: the last must still land before the end
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every process: bitwise-equal sums


def blob(shape, shift, seed):
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum((g - shift) ** 2 for g in grids)
    noise = np.random.default_rng(seed).random(shape)
    return (np.exp(-4 * r2) + 0.5 * (r2 < 0.3) + 0.05 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 2D subjects (A, B, labels) of 40 x 40 voxels."""
    root = tmp_path_factory.mktemp("subjects")
    for index in range(2):
        folder = root / f"s{index}"
        folder.mkdir()
        a = blob((40, 40), 0.05 * index, index)
        for name, image in (("A", a), ("B", -blob((40, 40), 0.1, 10 + index)), ("L", (a > 0.6).astype(np.int16))):
            nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"{name}.nii.gz")
    return root


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "firekit.cli", "train", "--a", f"{data}/*/A.nii.gz", "--b", f"{data}/*/B.nii.gz",
            "--labels", f"{data}/*/L.nii.gz", "--iterations", str(ITERATIONS), "--checkpoint-every", "1",
            "--val-every", "4", "--spacing", "1", "--seed", "0", "--quiet", "--out", str(out), *extra]


def rows(path: Path) -> dict[int, dict[str, str]]:
    with open(path, newline="") as file:
        return {int(row["step"]): row for row in csv.DictReader(file)}


def rows_written(path: Path) -> int:
    """Rows in a CSV log being written by another process (0 before it exists)."""
    return max(0, path.read_text().count("\n") - 1) if path.exists() else 0


def losses(path: Path) -> dict[int, list[float]]:
    return {step: [float(v) for k, v in row.items() if k not in ("step", "seconds")]
            for step, row in rows(path).items()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0].state_dict()


def check_run_folder(run: Path) -> int:
    """Every checkpoint in ``run`` loads; returns the step checkpoint.pt holds (0: none yet)."""
    step = 0
    if (run / "checkpoint.pt").exists():
        _, extra = load_checkpoint(run / "checkpoint.pt")  # raises on a corrupt file
        step = int(extra["step"])
        assert 1 <= step <= ITERATIONS and set(extra["optimizers"]) == {"affine", "nonrigid", "synthesis"}
    for name in ("model.pt", "model_best.pt"):
        if (run / name).exists():
            _, extra = load_checkpoint(run / name)
            # model.pt is written just before checkpoint.pt: at most one step ahead of it
            assert step <= extra["step"] <= step + 1 or name == "model_best.pt", (name, extra["step"], step)
    return step


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = subprocess.run(train_command(data, run), capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    return run


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(data, straight, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(10)
    saved_steps = []
    for attempt in range(4):
        step = check_run_folder(run) if run.exists() else 0
        extra = ["--resume"] if step else (["--overwrite"] if run.exists() else [])
        done = rows_written(run / "losses.csv") if step else 0
        process = subprocess.Popen(train_command(data, run, *extra), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=ENV)
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 3.5))  # anywhere from start-up to the first steps
        else:
            deadline = time.monotonic() + 120  # wait for new steps, then kill mid-training
            while process.poll() is None and time.monotonic() < deadline and rows_written(run / "losses.csv") <= done:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.25))  # within the step that follows (under 0.4 s when the cores are free)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        saved_steps.append(check_run_folder(run) if run.exists() else 0)
    print(f"checkpoint step after each SIGKILL: {saved_steps}")
    assert saved_steps == sorted(saved_steps), f"a checkpoint went backwards: {saved_steps}"
    assert saved_steps[-1] < ITERATIONS, "every kill came too late to interrupt anything"

    step = check_run_folder(run) if run.exists() else 0
    extra = ["--resume"] if step else (["--overwrite"] if run.exists() else [])
    result = subprocess.run(train_command(data, run, *extra), capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    assert check_run_folder(run) == ITERATIONS
    assert not list(run.glob(".*.tmp")), "half-written temporary files of the killed runs are left"

    assert losses(run / "losses.csv") == losses(straight / "losses.csv")
    assert sorted(rows(run / "losses.csv")) == list(range(1, ITERATIONS + 1))
    assert rows(run / "validation.csv") == rows(straight / "validation.csv")
    for name in ("model.pt", "checkpoint.pt"):
        ours, theirs = weights(run / name), weights(straight / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_sigterm_stops_a_detached_run_at_a_step_with_a_checkpoint_and_it_resumes(data, straight, tmp_path):
    """A run started in the background (SIGINT ignored, as a shell does) stops on SIGTERM (``kill``,
    a scheduler's end of job) after its running step, checkpointed; the resume ends as the straight run."""
    run = tmp_path / "run"
    process = subprocess.Popen(train_command(data, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and rows_written(run / "losses.csv") < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    step = check_run_folder(run)
    assert 2 <= step < ITERATIONS, f"stopped at {step}"
    assert rows_written(run / "losses.csv") == step  # nothing logged past the checkpoint
    assert "interrupted" in stderr and "Traceback" not in stderr
    result = subprocess.run(train_command(data, run, "--resume"), capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    assert losses(run / "losses.csv") == losses(straight / "losses.csv")
