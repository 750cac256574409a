"""Accuracy and speed of 3D per-pair refinement (``RefineConfig.preset(3)``) on demo pairs, as a table.

    python bench/refine_3d.py [--data data/demo] [--set NAME:SEED:COUNT ...] [--previous] [--threads 1]

Pairs: each test subject's T2-like image randomly transformed (Section 4.1 ranges, from
``firekit.data.protocol.make_test_pairs``) onto the subject's T1, registered by ``register(None, ...,
refine=config)`` (refinement alone, from moments). A pair set ``NAME:SEED:COUNT`` makes COUNT pairs
per test subject, subject ``i`` drawn with seed ``SEED + 100 i``; the preset was tuned on
``tuned:1000:3``, its last choice (one affine level at 1/4 instead of 1/8 then 1/4) made on
``validation:3000:3``, and ``held-out:2000:2`` was only measured. Rows: unaligned, the preset
before its full-resolution non-rigid level (``--previous``; added when the ANTs benchmark showed
3D CSF and GM lagging: +0.02 mean Dice on one pair per subject of the tuned and the validation
sets, 2.1x the time), the preset. Columns: mean Dice per label (CSF, GM, WM), mean, % voxels
with Jacobian determinant <= 0, end-point error against the true field (mm, over brain voxels),
median seconds per pair of ``register`` (loading, resampling and refinement) and of refinement
alone, with its stages (moments, affine, non-rigid; medians). Prints the table and writes it.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import firekit.registration.refine
from firekit.data import io
from firekit.core import metrics
from firekit.data.braindata import LABEL_NAMES, build_demo_dataset
from firekit.data.protocol import end_point_error, make_test_pairs
from firekit.registration.refine import RefineConfig
from firekit.registration.pipeline import register

STAGES = ("moments", "affine", "field")
# The 3D preset before its full-resolution non-rigid level (commits 90ebe85..ec1adca).
PREVIOUS = dict(field_levels=(4, 2), field_iterations=(60, 40))


class _StageClock:
    """Wraps :func:`firekit.registration.refine.refine` to keep each call's ``history["seconds"]``.

    ``register`` returns no refinement history, and it looks ``refine`` up in its module when
    called, so wrapping the module attribute sees every call.
    """

    def __init__(self):
        self.seconds: list[dict] = []
        self._refine = firekit.registration.refine.refine

    def __enter__(self):
        def timed(*args, **kwargs):
            result = self._refine(*args, **kwargs)
            self.seconds.append(dict(result.history["seconds"]))
            return result

        firekit.registration.refine.refine = timed
        return self

    def __exit__(self, *exc):
        firekit.registration.refine.refine = self._refine


def make_pairs(data: Path, out: Path, seed: int, count: int) -> list[dict]:
    subjects = sorted(p for p in (data / "test").iterdir() if p.is_dir())
    pairs = []
    for index, subject in enumerate(subjects):
        pairs += make_test_pairs(subject, out / subject.name, count, ndim=3, moving="T2", fixed="T1",
                                 seed=seed + 100 * index)
    return pairs


def evaluate(pairs: list[dict], config: RefineConfig | None) -> dict:
    """Per-pair Dice, folding, EPE and seconds of ``config`` (None: the unaligned pairs)."""
    rows = []
    for pair in pairs:
        moving_labels = io.load_labels(pair["moving_labels"]).data
        fixed_labels = io.load_labels(pair["fixed_labels"]).data
        brain = fixed_labels > 0
        if config is None:
            dice = metrics.dice(torch.as_tensor(moving_labels), torch.as_tensor(fixed_labels), list(LABEL_NAMES))
            epe = end_point_error(0.0, pair, io.load_volume(pair["fixed"]), brain)  # no displacement
            rows.append(dict(dice=dice, folding=0.0, epe=epe))
            continue
        with _StageClock() as clock:
            start = time.perf_counter()
            result = register(None, pair["moving"], pair["fixed"], direction="b2a", refine=config, seed=config.seed)
            seconds = time.perf_counter() - start
        warped = result.apply(moving_labels).data
        rows.append(dict(
            dice=metrics.dice(torch.as_tensor(warped), torch.as_tensor(fixed_labels), list(LABEL_NAMES)),
            folding=float((result.jacobian_determinant() <= 0).mean() * 100),
            epe=end_point_error(result.displacement, pair, result.fixed, brain), seconds=seconds,
            stages=clock.seconds[-1],
        ))
        print(f"  {Path(pair['moving']).parent.parent.name}/{Path(pair['moving']).parent.name}: mean Dice "
              f"{np.mean(list(rows[-1]['dice'].values())):.3f}, {seconds:.2f} s", file=sys.stderr, flush=True)
    return summarise(rows)


def summarise(rows: list[dict]) -> dict:
    per_label = {k: float(np.mean([r["dice"][k] for r in rows])) for k in LABEL_NAMES}
    summary = dict(per_label=per_label, mean=float(np.mean(list(per_label.values()))),
                   folding=float(np.mean([r["folding"] for r in rows])), epe=float(np.mean([r["epe"] for r in rows])),
                   pair_means=[float(np.mean(list(r["dice"].values()))) for r in rows])
    if "seconds" in rows[0]:
        summary["seconds"] = float(np.median([r["seconds"] for r in rows]))
        summary["stages"] = {s: float(np.median([r["stages"][s] for r in rows])) for s in STAGES}
        summary["refine"] = float(np.median([sum(r["stages"].values()) for r in rows]))
    return summary


def table_row(pairs: str, path: str, row: dict) -> str:
    dice = " | ".join(f"{row['per_label'][k]:.3f}" for k in LABEL_NAMES)
    cells = f"| {pairs} | {path} | {dice} | **{row['mean']:.3f}** | {row['folding']:.3f} | {row['epe']:.2f} |"
    if "seconds" not in row:
        return cells + " – | – | – | – | – |"
    stages = " | ".join(f"{row['stages'][s]:.2f}" for s in STAGES)
    return cells + f" {row['seconds']:.2f} | {row['refine']:.2f} | {stages} |"


def run(data: Path, sets: list[tuple[str, int, int]], previous: bool) -> str:
    if not (data / "dataset.json").is_file():
        build_demo_dataset(data, progress=False)
    configs = {"unaligned": None}
    if previous:
        configs["previous preset"] = RefineConfig.preset(3, **PREVIOUS)
    configs["preset"] = RefineConfig.preset(3)
    preset = RefineConfig.preset(3)
    lines = [
        f"3D refinement alone (T2-like → T1, 128 × 160 × 128), {datetime.date.today().isoformat()}, "
        f"{torch.get_num_threads()} torch thread(s) on {torch.get_num_interop_threads()} inter-op thread(s)",
        "",
        f"preset: moments scan {preset.scan_angles} deg at scan size {preset.scan_size}; affine levels "
        f"{preset.affine_levels} × {preset.affine_iterations} steps (exact MIND, smooth first: "
        f"{preset.affine_smooth_first}), "
        f"non-rigid levels {preset.field_levels} × {preset.field_iterations} steps on "
        f"{preset.field_sampling:.0%} of the voxels per step, grid spacing {preset.grid_spacing}, "
        f"{preset.regulariser} weight {preset.weight}",
        "",
    ]
    header = ("| pairs | path | " + " | ".join(LABEL_NAMES.values())
              + " | mean | % J<=0 | EPE mm | s/pair | refine s | moments s | affine s | non-rigid s |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    per_pair = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed, count in sets:
            pairs = make_pairs(data, Path(tmp) / name, seed, count)
            for path, config in configs.items():
                print(f"{name}: {path}", file=sys.stderr, flush=True)
                row = evaluate(pairs, config)
                lines.append(table_row(f"{name} ({len(pairs)})", path, row))
                per_pair.append(f"- {name}, {path}: " + ", ".join(f"{d:.3f}" for d in row["pair_means"]))
    lines += ["", "Mean Dice per pair:", *per_pair, "",
              "Seconds are medians over pairs; `s/pair` times `register` (loading, resampling to the network "
              "grid and back, refinement), `refine s` refinement alone and its stages."]
    return "\n".join(lines)


def pair_set(text: str) -> tuple[str, int, int]:
    name, seed, count = text.split(":")
    return name, int(seed), int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--set", dest="sets", type=pair_set, action="append",
                        help="NAME:SEED:COUNT pairs per test subject (default tuned:1000:3, validation:3000:3, "
                             "held-out:2000:2)")
    parser.add_argument("--previous", action="store_true", help="also run the preset before its full-resolution level")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "refine_3d.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = args.sets or [("tuned", 1000, 3), ("validation", 3000, 3), ("held-out", 2000, 2)]
    table = run(Path(args.data), sets, args.previous)
    print(table)
    Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
