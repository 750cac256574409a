"""Refinement (alone, or after the 2D network) with variants of its non-rigid stage, on pairs the bench already wrote.

    python -m bench.field_similarity PAIRS_DIR [PAIRS_DIR ...] --variants default "mind alone" ...
    python -m bench.field_similarity W/2d/mono/subj008 --ndim 2 --network --variants "mind alone" "mind-mi 0.2"

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

# name -> RefineConfig.preset(ndim, **overrides)
VARIANTS = {
    "default": {},
    "mind alone": dict(field_similarity=None),  # the presets before 2026-12-07 (eighth session)
    "mind-mi 0.1": dict(field_similarity="mind-mi", mi_weight=0.1),
    "mind-mi 0.2": dict(field_similarity="mind-mi", mi_weight=0.2),
    "mind-mi 0.3": dict(field_similarity="mind-mi", mi_weight=0.3),
    "mind-mi 1": dict(field_similarity="mind-mi", mi_weight=1.0),
    "mi": dict(field_similarity="mi"),
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

    from bench.vs_ants import CASES, load_pair, score
    from firekit.data.braindata import LABEL_NAMES
    from firekit.registration.pipeline import load, register
    from firekit.registration.refine import RefineConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", type=Path, help="folders holding a pairs.json")
    parser.add_argument("--variants", nargs="+", default=["default", "field ngf"], choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ndim", type=int, default=3, choices=[2, 3])
    parser.add_argument("--network", action="store_true", help="2D: the shipped model's start, then refinement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load("default") if args.network and args.ndim == 2 else None
    start = "network" if model is not None else "moments"
    pairs = [(folder, pair) for folder in args.pairs for pair in json.loads((folder / "pairs.json").read_text())]
    found = {name: dict(dice=[], epe=[], seconds=[]) for name in args.variants}
    for folder, pair in pairs:
        volumes = load_pair(pair)
        direction = CASES[folder.parent.name][2] if model is not None else "a2b"
        for name in args.variants:
            clock = time.perf_counter()
            result = register(model, volumes["moving"], volumes["fixed"], direction=direction,
                              refine=RefineConfig.preset(args.ndim, start=start, **VARIANTS[name]))
            found[name]["seconds"].append(time.perf_counter() - clock)
            scores = score(result.displacement, None, pair, volumes, list(LABEL_NAMES))
            found[name]["dice"].append(float(np.mean(list(scores["dice"].values()))))
            found[name]["epe"].append(scores["epe"])
    for name, got in found.items():
        each = "" if args.ndim == 2 else "; pairs " + " ".join(f"{d:.3f}/{e:.2f}" for d, e in zip(got["dice"], got["epe"]))
        print(f"{name}: mean Dice {np.mean(got['dice']):.4f}, EPE {np.mean(got['epe']):.3f} mm (median "
              f"{np.median(got['epe']):.3f}), {np.mean(got['seconds']):.2f} s per pair{each}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
