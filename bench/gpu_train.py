"""Train the 2D and 3D recipes for a fixed number of minutes each (one prepared script for a GPU session).

    python -m bench.gpu_train --out OUT [--minutes 4] [--configs 2d 3d] [--data data/demo] [--device cuda]

For each config: builds the demo data if missing, measures the step rate over a few steps of the
recipe, sets the run's length so that it fills the budget (so the cosine schedule ends on time),
trains with the recipe (``firekit.workflows.RECIPES``: learn2d / learn3d) and writes under
``OUT/<config>/``: ``model.pt``, ``model_ema.pt``, ``model_best.pt``, ``losses.csv``,
``validation.csv``, ``config.yaml``, and ``OUT/throughput.json`` (it/s, peak memory, projected hours
for the paper's 144,000 steps). On a CPU it runs the same way (tested with a budget of seconds).
On one H200, ``--minutes 4`` for both configs, data build included, stays under 10 minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from firekit.data.braindata import build_demo_dataset
from firekit.workflows import RECIPES, train_on_files

PAPER_STEPS = 144_000
CONFIGS = {"2d": dict(recipe="learn2d", ndim=2), "3d": dict(recipe="learn3d", ndim=3)}


def _settings(recipe: str, **overrides) -> dict:
    return {**RECIPES[recipe], **overrides}


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _step_seconds(run: Path) -> tuple[int, float, float]:
    """(last step, seconds at the first step, seconds at the last step) of a run's losses.csv."""
    with open(run / "losses.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return int(rows[-1]["step"]), float(rows[0]["seconds"]), float(rows[-1]["seconds"])


def train_for(data: Path, out: Path, name: str, minutes: float, device: str, probe_steps: int) -> dict:
    """One config: probe its step rate, then a run of the length that fills ``minutes``."""
    config = CONFIGS[name]
    globs = {key: str(data / "train" / "*" / f"{key}.nii.gz") for key in ("T1", "T2", "labels")}
    val = {key: str(data / "val" / "*" / f"{key}.nii.gz") for key in ("T1", "T2", "labels")}
    common = dict(labels=globs["labels"], ndim=config["ndim"], val_a=val["T1"], val_b=val["T2"],
                  val_labels=val["labels"], device=device, progress=False, overwrite=True)
    probe = out / f".probe_{name}"
    settings = _settings(config["recipe"], iterations=probe_steps, val_every=0, checkpoint_every=0,
                         warmup_steps=1)
    train_on_files(globs["T1"], globs["T2"], probe, **common, **settings)
    steps, first, last = _step_seconds(probe)
    rate = max(steps - 1, 1) / max(last - first, 1e-6)  # the first step compiles/warms up
    shutil.rmtree(probe, ignore_errors=True)
    iterations = max(2, int(rate * minutes * 60))
    every = max(1, iterations // 8)
    warmup = min(RECIPES[config["recipe"]]["warmup_steps"], iterations // 10)
    settings = _settings(config["recipe"], iterations=iterations, val_every=every, checkpoint_every=every,
                         warmup_steps=warmup)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train_on_files(globs["T1"], globs["T2"], out / name, **common, **settings)
    wall = time.perf_counter() - started
    return {
        "config": name, "recipe": config["recipe"], "device": device, "iterations": iterations,
        "batch_size": settings["batch_size"], "spacing_mm": settings["spacing"],
        "it_per_s": iterations / result.seconds, "wall_s": wall, "peak_memory_mb": _peak_memory_mb(device),
        "projected_hours_144k": PAPER_STEPS / (iterations / result.seconds) / 3600,
        "best_val_dice": result.best_val_dice, "best_step": result.best_step,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (runs and throughput.json)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training minutes per config (default 4)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["2d", "3d"])
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="demo data (built when missing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--probe-steps", type=int, default=12, help="steps timed to size each run (default 12)")
    parser.add_argument("--demo-settings", default="{}", help=argparse.SUPPRESS)  # tests: a tiny dataset
    args = parser.parse_args(argv)
    if not (args.data / "dataset.json").is_file():
        build_demo_dataset(args.data, progress=False, **json.loads(args.demo_settings))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.configs:
        rows.append(train_for(args.data, args.out, name, args.minutes, args.device, args.probe_steps))
        (args.out / "throughput.json").write_text(json.dumps(rows, indent=1))
    print("| config | device | steps | it/s | peak MB | h for 144k steps | best val Dice (step) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        best = "-" if row["best_val_dice"] is None else f"{row['best_val_dice']:.3f} ({row['best_step']})"
        print(f"| {row['config']} | {row['device']} | {row['iterations']} | {row['it_per_s']:.2f} | "
              f"{row['peak_memory_mb']:.0f} | {row['projected_hours_144k']:.1f} | {best} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
