"""Validation Dice of a training run against steps and minutes, its stages joined end to end.

    python -m bench.plot_run bench/runs/learn2d bench/runs/learn2d-cont --out bench/learn2d.png

Each folder holds a ``validation.csv`` (step, dice_a2b, dice_b2a, dice_mean) and a ``losses.csv``
(its ``seconds`` column: training seconds since that folder's run began, resumes included). A later
folder continues the one before it (``firekit train --init``): its steps and minutes are drawn after
the earlier folder's last validated step (the weights it scored and handed on). Prints the joined table (step, minutes, Dice) as Markdown.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_stage(folder: Path) -> tuple[list[tuple[int, float, float]], int, float]:
    """``[(step, minutes, dice_mean)]`` of one folder, its last step and its training minutes."""
    seconds: dict[int, float] = {}
    last_step, total = 0, 0.0
    with open(folder / "losses.csv") as handle:
        for row in csv.DictReader(handle):
            step, value = int(row["step"]), float(row["seconds"])
            seconds[step] = value
            last_step, total = max(last_step, step), max(total, value)
    points = []
    with open(folder / "validation.csv") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            points.append((step, seconds.get(step, total) / 60.0, float(row["dice_mean"])))
    return points, last_step, total / 60.0


def joined(folders: list[Path]) -> list[tuple[int, float, float, str]]:
    """Every stage's points with the earlier stages' steps and minutes added: (step, minutes, Dice, stage)."""
    out, step0, minutes0 = [], 0, 0.0
    for folder in folders:
        points, last, minutes = read_stage(folder)
        out += [(step0 + step, minutes0 + m, dice, folder.name) for step, m, dice in points]
        # The next stage starts from this one's last validated weights (the EMA it scored).
        step0, minutes0 = (step0 + points[-1][0], minutes0 + points[-1][1]) if points else (step0 + last,
                                                                                            minutes0 + minutes)
    return out


def plot(points, path: Path, reference: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for axis, index, label in ((axes[0], 0, "step"), (axes[1], 1, "training minutes")):
        for stage in dict.fromkeys(p[3] for p in points):
            sel = [p for p in points if p[3] == stage]
            axis.plot([p[index] for p in sel], [p[2] for p in sel], marker=".", label=stage)
        for name, value in (reference or {}).items():
            axis.axhline(value, ls="--", lw=1, color="grey")
            axis.text(axis.get_xlim()[0], value, f" {name}", va="bottom", fontsize=8, color="grey")
        axis.set_xlabel(label)
        axis.set_ylabel("validation Dice (mean a2b / b2a)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--unaligned", type=float, help="draw the unaligned validation Dice")
    parser.add_argument("--moments", type=float, help="draw the moments start's validation Dice")
    args = parser.parse_args(argv)
    points = joined(args.folders)
    reference = {k: v for k, v in (("unaligned", args.unaligned), ("moments start", args.moments)) if v is not None}
    plot(points, args.out, reference)
    print("| stage | step | minutes | val Dice |\n|---|---|---|---|")
    for step, minutes, dice, stage in points:
        print(f"| {stage} | {step} | {minutes:.1f} | {dice:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
