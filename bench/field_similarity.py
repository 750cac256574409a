"""3D refinement alone with variants of its non-rigid stage, on pairs the bench already wrote.

    python -m bench.field_similarity PAIRS_DIR [PAIRS_DIR ...] --variants default "field ngf" ...

Each ``PAIRS_DIR`` holds a ``pairs.json`` of :func:`firekit.data.protocol.make_test_pairs` (``bench.vs_ants
--work W`` leaves them under ``W/3d/CASE/SUBJECT``). Prints one line per variant: mean Dice (the
bench's labels), end-point error and seconds per pair, and each pair's Dice / EPE. Findings:
``bench/field_similarity.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# name -> RefineConfig.preset(3, **overrides)
VARIANTS = {
    "default": {},
    "field ngf": dict(field_similarity="ngf"),
    "ngf": dict(similarity="ngf"),
    "iterations x2": dict(field_iterations=(120, 80, 40)),
    "coarse 200, mid 80": dict(field_iterations=(200, 80, 20)),
    "eighth-size level first": dict(field_levels=(8, 4, 2, 1), field_iterations=(100, 60, 40, 20)),
    "weight 0.05": dict(weight=0.05),
    "sampling 0.1": dict(field_sampling=0.1),
    "grid 3": dict(grid_spacing=3),
    "lncc": dict(similarity="lncc"),
}


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.vs_ants import load_pair, score
    from firekit.data.braindata import LABEL_NAMES
    from firekit.registration.pipeline import register
    from firekit.registration.refine import RefineConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", type=Path, help="folders holding a pairs.json")
    parser.add_argument("--variants", nargs="+", default=["default", "field ngf"], choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = [pair for folder in args.pairs for pair in json.loads((folder / "pairs.json").read_text())]
    for name in args.variants:
        dice, epe, seconds = [], [], []
        for pair in pairs:
            volumes = load_pair(pair)
            clock = time.perf_counter()
            result = register(None, volumes["moving"], volumes["fixed"], refine=RefineConfig.preset(3, **VARIANTS[name]))
            seconds.append(time.perf_counter() - clock)
            scores = score(result.displacement, None, pair, volumes, list(LABEL_NAMES))
            dice.append(float(np.mean(list(scores["dice"].values()))))
            epe.append(scores["epe"])
        print(f"{name}: mean Dice {np.mean(dice):.3f}, EPE {np.mean(epe):.2f} mm, {np.mean(seconds):.1f} s per pair; "
              "pairs " + " ".join(f"{d:.3f}/{e:.2f}" for d, e in zip(dice, epe)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
