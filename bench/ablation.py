"""Controlled ablation of the switches that help FIRE learn on a small budget: one run per switch set.

    python bench/ablation.py [--data data/demo] [--out bench/ablation_runs] [--iterations 1000]
                             [--only NAME[,NAME...]] [--list]

Every run trains the small preset on the demo data's training subjects (2D axial slices,
T1 = A, T2-like = B, the paper's augmentation), same seed, same steps, validation every 100 steps
on the same 8 fixed augmented pairs; only the switches named in ``RUNS`` differ. Runs go one after
another into ``--out/NAME`` (an existing finished run is kept). Then tabulate and plot them with

    python bench/training.py OUT/* --baseline 0.262 --out bench/training_runs.md --png bench/training.png

Long: each run takes minutes to tens of minutes on a CPU; use ``--only`` to split the work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from firekit.data.braindata import build_demo_dataset
from firekit.workflows import train_on_files

CURRICULUM = 300
# The auxiliary and distillation losses are mean squared end-point errors in normalised units
# (~1e-3..1e-2): at weight 10 the paper's terms drown their gradient on T_af (measured: no
# learning); at 1000 they lead.
AUX = 1000.0
# Measured: at the small preset's rates (3e-3 affine, 1e-3 non-rigid, tuned to fit ONE pair) the
# supervised affine head collapses within a few hundred steps (validation 0.44 -> 0.23); a residual
# on the moments start needs smaller steps (Adam moves every weight by about lr per step).
LOW = dict(lr_affine=3e-4, lr_nonrigid=3e-4)
RUNS: dict[str, dict] = {
    "baseline": dict(),
    "aux10": dict(aux_weight=10.0),
    "aux": dict(aux_weight=AUX),
    "curriculum": dict(curriculum_steps=CURRICULUM),
    "aux_curriculum": dict(aux_weight=AUX, curriculum_steps=CURRICULUM),
    "moments": dict(prealign="moments"),
    "moments_aux_curriculum": dict(prealign="moments", aux_weight=AUX, curriculum_steps=CURRICULUM),
    "moments_aux_curriculum_lowlr": dict(prealign="moments", aux_weight=AUX, curriculum_steps=CURRICULUM, **LOW),
    "moments_aux_lowlr": dict(prealign="moments", aux_weight=AUX, **LOW),
    # A bounded residual: measured, unbounded residuals reached -1.1 on a few pairs.
    "moments_bounded_aux_curriculum_lowlr": dict(prealign="moments", residual_bound=0.2, aux_weight=AUX,
                                                 curriculum_steps=CURRICULUM, **LOW),
    "moments_aux_curriculum_lowlr_mind": dict(prealign="moments", aux_weight=AUX, curriculum_steps=CURRICULUM,
                                              similarity_weight=1.0, **LOW),
    "moments_aux_curriculum_lowlr_affinefirst": dict(prealign="moments", aux_weight=AUX,
                                                     curriculum_steps=CURRICULUM, affine_first_steps=200, **LOW),
    "moments_aux_curriculum_lr1e-4": dict(prealign="moments", aux_weight=AUX, curriculum_steps=CURRICULUM,
                                          lr_affine=1e-4, lr_nonrigid=1e-4),
    "moments_distill_curriculum_lowlr": dict(prealign="moments", distill_weight=AUX, curriculum_steps=CURRICULUM,
                                             **LOW),
}


def finished(run: Path, iterations: int) -> bool:
    config = run / "config.yaml"
    if not (run / "model.pt").is_file() or not config.is_file():
        return False
    lines = (run / "losses.csv").read_text().strip().splitlines() if (run / "losses.csv").is_file() else []
    return len(lines) - 1 >= iterations and yaml.safe_load(config.read_text())["train"]["iterations"] == iterations


def reference(globs: dict) -> str:
    """Validation Dice, on the runs' validation pairs, of the identity and of the moments start alone."""
    import torch

    from firekit import Fire, FireConfig
    from firekit.training.validation import validate
    from firekit.workflows import build_dataset

    validation = build_dataset(globs["T1"], globs["T2"], globs["labels"], 2, progress=False).validation(8)
    lines = []
    for name, prealign in (("identity (unaligned)", "none"), ("moments start alone", "moments")):
        torch.manual_seed(0)
        model = Fire(FireConfig.from_preset("small", 2, prealign=prealign))
        # An untrained model with zero non-rigid flow: its transform is its start alone.
        for net in (model.transform_ab, model.transform_ba):
            torch.nn.init.zeros_(net.nonrigid.out.weight)
        scores = validate(model, validation, torch.device("cpu"))
        lines.append(f"{name}: validation Dice {scores['dice_mean']:.3f} "
                     f"(a2b {scores['dice_a2b']:.3f}, b2a {scores['dice_b2a']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("bench/ablation_runs"))
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the runs and their switches, then stop")
    parser.add_argument("--reference", action="store_true",
                        help="print the validation Dice of no registration and of the moments start alone, then stop")
    args = parser.parse_args(argv)
    names = list(RUNS) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    if args.list:
        for name in names:
            print(f"{name}: {RUNS[name] or 'paper losses only'}")
        return 0
    if not (args.data / "dataset.json").is_file():
        build_demo_dataset(args.data)
    globs = {key: str(args.data / "train" / "*" / f"{key}.nii.gz") for key in ("T1", "T2", "labels")}
    if args.reference:
        print(reference(globs))
        return 0
    for name in names:
        run = args.out / name
        if finished(run, args.iterations):
            print(f"{name}: finished already, kept")
            continue
        resume = (run / "checkpoint.pt").is_file()
        result = train_on_files(
            globs["T1"], globs["T2"], run, labels=globs["labels"], ndim=2, preset="small",
            iterations=args.iterations, seed=0, val_every=100, checkpoint_every=100, resume=resume,
            overwrite=not resume, **RUNS[name],
        )
        print(f"{name}: {result.steps} steps, best validation Dice {result.best_val_dice:.3f} "
              f"at step {result.best_step}, {result.seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
