"""Train the 3D FIRE model the benchmark uses (``bench/vs_ants.py`` 3D rows), on the demo data.

    python bench/train_3d.py [--data data/demo] [--iterations 100] [--out bench/runs/fire3d]
                             [--spacing 2.56] [--ship]

The moments recipe (``workflows.MOMENTS_RECIPE``, the 2D model's before issue 18: small preset, moments pre-alignment, auxiliary
loss on the augmentation's known transform, curriculum, low learning rates) on 3D T2-like <-> T1
volumes of the training subjects, at ``--spacing`` mm (2.56 mm: a 64x80x64 grid; one step costs
40-70 s on one CPU thread at this size; at the full 1.28 mm it would cost ~8x that). Validation on
4 pairs of the val subjects. ``--ship`` copies the best validation
checkpoint to ``firekit/weights/fire3d_t1_t2like_small.pt`` (``--ship-only``: without training, e.g.
after stopping a run early; ``--resume`` continues one).

``firekit register`` runs a model at the spacing it was trained at (its checkpoint records it) and
refines at the image's, so a coarse network only has to give refinement its start.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from firekit.data.braindata import build_demo_dataset
from firekit.fire.checkpoint import load_checkpoint, save_model
from firekit.workflows import MOMENTS_RECIPE, train_on_files

WEIGHTS = Path(__file__).resolve().parents[1] / "firekit" / "weights" / "fire3d_t1_t2like_small.pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--spacing", type=float, default=2.56)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--out", default=str(Path(__file__).parent / "runs" / "fire3d"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ship", action="store_true", help="copy the best checkpoint into firekit/weights")
    parser.add_argument("--ship-only", action="store_true", help="no training: ship the run folder's best checkpoint")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not args.ship_only:
        if not (data / "dataset.json").is_file():
            build_demo_dataset(data, progress=False)
        glob = lambda split, name: str(data / split / "*" / f"{name}.nii.gz")  # noqa: E731
        start = time.perf_counter()
        train_on_files(
            glob("train", "T1"), glob("train", "T2"), args.out, labels=glob("train", "labels"), ndim=3,
            iterations=args.iterations, val_a=glob("val", "T1"), val_b=glob("val", "T2"),
            val_labels=glob("val", "labels"), val_pairs=4, spacing=args.spacing, resume=args.resume,
            overwrite=not args.resume, val_every=args.val_every, checkpoint_every=args.val_every,
            progress=False, **MOMENTS_RECIPE,
        )
        print(f"trained {args.iterations} steps in {time.perf_counter() - start:.0f} s")
    if args.ship or args.ship_only:
        ship(Path(args.out))
    return 0


def ship(run: Path) -> None:
    """Copy ``run/model_best.pt`` to the package, noting how it was trained and for how long."""
    model, extra = load_checkpoint(run / "model_best.pt")
    with open(run / "losses.csv") as handle:
        seconds = {int(row["step"]): float(row["seconds"]) for row in csv.DictReader(handle)}
    extra = {**extra, "recipe": {**MOMENTS_RECIPE, "kept": "model_best.pt (best validation Dice)"},
             "trained_by": f"python bench/train_3d.py (demo data, seed 0, 1 CPU thread; run {run.name})",
             "train_seconds": seconds.get(extra.get("step"))}
    save_model(model, WEIGHTS, extra=extra)
    print(f"shipped {WEIGHTS} (step {extra.get('step')}, {extra['train_seconds']:.0f} s of training)")


if __name__ == "__main__":
    sys.exit(main())
