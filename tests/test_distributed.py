"""Training on several processes (torch.distributed, launched by torchrun; gloo on the CPU)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from firekit.fire.checkpoint import load_checkpoint
from firekit.fire.model import Fire, FireConfig


@pytest.fixture(scope="module")
def data(demo_data):
    return demo_data(splits=(2, 1, 0))  # two training subjects


def _train(data: Path, out: Path, processes: int, batch: int, iterations: int, *extra) -> subprocess.CompletedProcess:
    args = ["train", "--a", f"{data}/train/*/T1.nii.gz", "--b", f"{data}/train/*/T2.nii.gz", "--ndim", "2",
            "--spacing", "4", "--batch-size", str(batch), "--iterations", str(iterations), "--out", str(out),
            "--checkpoint-every", "2", "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "firekit.cli", *args]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--standalone", f"--nproc_per_node={processes}", "-m", "firekit.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _losses(run: Path) -> list[dict]:
    with open(run / "losses.csv") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_two_processes_follow_one_process_with_the_same_global_batch(data, tmp_path):
    single = _train(data, tmp_path / "one", 1, 2, 6)
    assert single.returncode == 0, single.stderr
    # losses read back in pairs of steps (at each checkpoint), averaged over the ranks in one all-reduce
    double = _train(data, tmp_path / "two", 2, 1, 6, "--sync-every", "3")
    assert double.returncode == 0, double.stderr
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes the log, once per step
    for a, b in zip(one, two):
        # the same pairs each step; RMS over two pairs vs the mean of two RMS: close, not equal
        assert abs(a["total"] - b["total"]) < 0.03 * a["total"], (a["step"], a["total"], b["total"])
    # the weights moved the same way: their difference is small beside how far training moved them
    torch.manual_seed(0)  # train_on_files seeds the initialisation with --seed (0)
    start = Fire(FireConfig.from_preset("small", ndim=2)).state_dict()
    one_w, two_w = (load_checkpoint(tmp_path / run / "model.pt")[0].state_dict() for run in ("one", "two"))
    keys = [k for k, v in start.items() if v.is_floating_point()]
    moved = sum(float((one_w[k] - start[k]).square().sum()) for k in keys) ** 0.5
    apart = sum(float((one_w[k] - two_w[k]).square().sum()) for k in keys) ** 0.5
    assert moved > 0 and apart < 0.3 * moved, (apart, moved)  # measured 0.74 apart of 3.9 moved
    # resumed on one process: a checkpoint does not depend on how many processes wrote it
    resumed = _train(data, tmp_path / "two", 1, 2, 8, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in _losses(tmp_path / "two")] == list(range(1, 9))


def test_prefetched_batches_are_the_batches_drawn_in_turn():
    from firekit.training.loading import Prefetch

    class Pairs:
        def sample(self, step, batch_size):
            generator = torch.Generator().manual_seed(step)
            return {"x_a": torch.rand(batch_size, 1, 8, 8, generator=generator), "step": step}

    prefetch = Prefetch(Pairs(), 2, ahead=3, pin=False)
    try:
        for step in range(6):
            batch = prefetch.get(step, last=6)
            assert batch["step"] == step and torch.equal(batch["x_a"], Pairs().sample(step, 2)["x_a"])
        assert not prefetch.pending  # nothing drawn past the last step
    finally:
        prefetch.close()
