"""Determinism on the CPU (issue 10): the same seed gives the same weights after N training steps, and
another seed gives other weights (same torch version and thread count; see README, Tests)."""

import nibabel as nib
import numpy as np
import torch

from firekit.fire.checkpoint import load_checkpoint
from firekit.workflows import train_on_files

STEPS = 3


def write_subjects(root):
    for index in range(2):
        grids = np.meshgrid(*[np.linspace(-1, 1, 40)] * 2, indexing="ij")
        r2 = sum((g - 0.05 * index) ** 2 for g in grids)
        noise = np.random.default_rng(index).random((40, 40))
        a = (np.exp(-4 * r2) + 0.5 * (r2 < 0.3) + 0.05 * noise).astype(np.float32)
        (root / f"s{index}").mkdir(parents=True)
        nib.save(nib.Nifti1Image(a, np.eye(4)), root / f"s{index}" / "A.nii.gz")
        nib.save(nib.Nifti1Image(-a[::-1].copy(), np.eye(4)), root / f"s{index}" / "B.nii.gz")
    return f"{root}/*/A.nii.gz", f"{root}/*/B.nii.gz"


def trained_weights(a, b, out, seed):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a sum split over other thread counts rounds differently
    try:
        train_on_files(a, b, out, iterations=STEPS, spacing=1.0, seed=seed, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(out / "model.pt")[0].state_dict(), (out / "losses.csv").read_text().splitlines()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a, b = write_subjects(tmp_path / "data")
    first, first_losses = trained_weights(a, b, tmp_path / "first", seed=0)
    again, again_losses = trained_weights(a, b, tmp_path / "again", seed=0)
    other, _ = trained_weights(a, b, tmp_path / "other", seed=1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    strip = [",".join(line.split(",")[:-1]) for line in first_losses]  # the last column is wall-clock seconds
    assert strip == [",".join(line.split(",")[:-1]) for line in again_losses] and len(strip) == 1 + STEPS
    assert not all(torch.equal(first[k], other[k]) for k in first)
