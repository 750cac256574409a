"""Validation Dice against steps and minutes for training runs, as a markdown table (and a PNG).

    python bench/training.py RUN_DIR [RUN_DIR ...] [--steps 250,500,1000] [--out FILE.md] [--png bench/training.png]

Each RUN_DIR is a ``firekit train --out`` folder (validation.csv, losses.csv, config.yaml). The
switches that differ between runs (augmentation curriculum, auxiliary loss, rates) are read from
config.yaml and shown beside the curve, so each row says what was on.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import yaml


def read_run(run: Path) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())
    with open(run / "losses.csv", newline="") as handle:
        seconds = {int(r["step"]): float(r["seconds"]) for r in csv.DictReader(handle)}
    with open(run / "validation.csv", newline="") as handle:
        points = [(int(r["step"]), float(r["dice_mean"])) for r in csv.DictReader(handle)]
    train, data = config.get("train", {}), config.get("data", {})
    # Only the switches that are on (the paper's settings are the default of each).
    candidates = {
        "prealign": config.get("model", {}).get("prealign", "none"),
        "pooling": config.get("model", {}).get("affine_pooling", "mean"),
        "residual bound": config.get("model", {}).get("residual_bound", 0.0),
        "aux": train.get("aux_weight", 0.0),
        "curriculum": data.get("curriculum_steps", 0),
        "MIND": train.get("similarity_weight", 0.0),
        "distill": train.get("distill_weight", 0.0),
        "affine-first": train.get("affine_first_steps", 0),
    }
    switches = {k: v for k, v in candidates.items() if v not in (0, 0.0, "none", "mean", None)}
    switches["lr"] = f"{train.get('lr_affine')}/{train.get('lr_nonrigid')}/{train.get('lr_synthesis')}"
    curve = [(step, seconds.get(step, float("nan")) / 60.0, dice) for step, dice in points]
    return {"name": run.name, "switches": switches, "curve": curve}


def summary(runs: list[dict], steps: list[int], baseline: float | None) -> str:
    """One row per run: validation Dice at chosen steps, the best, and minutes to the last step."""
    head = "| run | switches | " + " | ".join(f"step {s}" for s in steps) + " | best (step) | minutes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        at = {step: dice for step, _, dice in run["curve"]}
        best = max(run["curve"], key=lambda point: point[2]) if run["curve"] else None
        cells = [f"{at[s]:.3f}" if s in at else "" for s in steps]
        switches = ", ".join(f"{k} {v}" for k, v in run["switches"].items())
        tail = f"{best[2]:.3f} ({best[0]})" if best else ""
        minutes = f"{run['curve'][-1][1]:.1f}" if run["curve"] else ""
        lines.append(f"| {run['name']} | {switches} | " + " | ".join(cells) + f" | {tail} | {minutes} |")
    if baseline is not None:
        lines.append(f"\nUnaligned validation Dice: {baseline:.3f}.")
    return "\n".join(lines)


def table(runs: list[dict], baseline: float | None) -> str:
    lines = ["| run | switches | step | minutes | val Dice (mean a2b/b2a) |", "|---|---|---|---|---|"]
    for run in runs:
        switches = ", ".join(f"{k} {v}" for k, v in run["switches"].items())
        for step, minutes, dice in run["curve"]:
            lines.append(f"| {run['name']} | {switches} | {step} | {minutes:.1f} | {dice:.3f} |")
    if baseline is not None:
        lines.append(f"\nUnaligned validation Dice: {baseline:.3f}.")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, references: dict[str, float] | None = None) -> None:
    from matplotlib.figure import Figure  # no pyplot: a file needs no GUI backend

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for index, run in enumerate(runs):
        steps, minutes, dice = zip(*run["curve"]) if run["curve"] else ((), (), ())
        style = dict(marker="o", markersize=3, linestyle=("-", "--", ":")[index // 10 % 3], label=run["name"])
        axes[0].plot(steps, dice, **style)
        axes[1].plot(minutes, dice, **style)
    for name, value in (references or {}).items():
        for ax in axes:
            ax.axhline(value, color="grey", linewidth=0.8, linestyle="-.")
        axes[0].annotate(name, (0, value), textcoords="offset points", xytext=(2, 2), fontsize=7, color="grey")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("minutes (2 CPU cores)")
    for ax in axes:
        ax.set_ylabel("validation Dice")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--baseline", type=float, default=None, help="unaligned validation Dice, for reference")
    parser.add_argument("--start", type=float, default=None,
                        help="validation Dice of the moments start alone (bench/ablation.py --reference)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--steps", default=None,
                        help="comma-separated steps for a one-row-per-run summary (default: every validation, long)")
    args = parser.parse_args(argv)
    runs = [read_run(run) for run in args.runs]
    if args.steps:
        text = summary(runs, [int(s) for s in args.steps.split(",")], args.baseline)
    else:
        text = table(runs, args.baseline)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.png:
        references = {"unaligned": args.baseline, "moments start": args.start}
        plot(runs, args.png, {k: v for k, v in references.items() if v is not None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
