"""Accuracy of every firekit path on held-out demo pairs (the paper's test protocol), as a table.

    python bench/accuracy.py [--data data/demo] [--pairs 10] [--ndim 2] [--model default] [--out bench/accuracy.md]
                             [--similarities]

Pairs: each test subject's moving image (T2-like, or T1 for the mono-modal case) randomly transformed
(Section 4.1 ranges), the fixed image the subject's T1, from ``firekit.data.protocol.make_test_pairs``.
Rows: unaligned, network affine only, network, network + refinement, refinement alone. Columns: mean
Dice per label (CSF, GM, WM), mean, % voxels with Jacobian determinant <= 0, end-point error against
the true field (mm, over brain voxels), median seconds per pair. Prints the table and writes it.
``--similarities``: rows compare refinement's similarities instead (MIND, NGF, LNCC, MSE), and
refinement on FIRE's synthesis of the moving image in the fixed contrast.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from firekit.data import io
from firekit.core import metrics
from firekit.data.braindata import LABEL_NAMES, build_demo_dataset
from firekit.data.protocol import end_point_error, make_test_pairs
from firekit.registration.pipeline import load, register

PATHS = {
    # The moments initialisation alone (refinement with no optimisation step): what the network
    # (with --prealign moments) and refinement start from.
    "moments start alone": dict(use_model=False, refine="moments"),
    "network affine": dict(use_model=True, affine_only=True, refine=0),
    "network": dict(use_model=True, refine=0),
    "network + refinement": dict(use_model=True, refine="auto"),
    "refinement alone": dict(use_model=False, refine="auto"),
    # Does the network's start let refinement stop earlier? The same short schedule from each start.
    "network + short refinement (10 steps/level)": dict(use_model=True, refine=10),
    "short refinement alone (10 steps/level)": dict(use_model=False, refine=10),
}
# Which similarity wins where (--similarities): refinement alone with each similarity, and
# refinement on FIRE's synthesis of moving in the fixed contrast with each.
SIMILARITY_PATHS = {
    **{f"refinement alone, {name}": dict(use_model=False, refine="auto", similarity=name)
       for name in ("mind", "ngf", "lncc", "mse")},
    **{f"network + refinement on synthesis, {name}": dict(use_model=True, refine="auto", similarity=name,
                                                           synthesis=True)
       for name in ("mind", "lncc", "mse")},
}


def run(data: Path, pairs: int, ndim: int, model_path: str, cases: list[str], seed: int,
        paths: dict | None = None) -> str:
    paths = PATHS if paths is None else paths
    if not (data / "dataset.json").is_file():
        build_demo_dataset(data, progress=False)
    model = load(model_path)
    torch.manual_seed(seed)
    lines = [f"firekit accuracy on held-out {ndim}D demo pairs ({pairs} per case, seed {seed}, "
             f"{torch.get_num_threads()} threads, model {model_path})", ""]
    header = "| case | path | " + " | ".join(LABEL_NAMES.values()) + " | mean | % J<=0 | EPE mm | s/pair |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            moving_contrast = {"multi": "T2", "mono": "T1"}[case]
            subjects = sorted(p for p in (data / "test").iterdir() if p.is_dir())
            records = []
            for index, subject in enumerate(subjects):
                count = pairs // len(subjects) + (index < pairs % len(subjects))
                records += make_test_pairs(subject, Path(tmp) / case / subject.name, count, ndim=ndim,
                                           moving=moving_contrast, fixed="T1", seed=seed + 100 * index)
            rows: dict[str, list] = {"unaligned": []}
            for pair in records:
                moving_labels = io.load_labels(pair["moving_labels"]).data
                fixed_labels = io.load_labels(pair["fixed_labels"]).data
                brain = fixed_labels > 0
                unaligned = metrics.dice(torch.as_tensor(moving_labels), torch.as_tensor(fixed_labels), list(LABEL_NAMES))
                epe = end_point_error(0.0, pair, io.load_volume(pair["fixed"]), brain)  # no displacement
                rows["unaligned"].append((unaligned, 0.0, epe, 0.0))
                for name, options in paths.items():
                    refine = options["refine"]
                    start = time.perf_counter()
                    result = register(model if options["use_model"] else None, pair["moving"], pair["fixed"],
                                      direction="b2a" if case == "multi" else "a2b",
                                      affine_only=options.get("affine_only", False), refine=refine,
                                      seed=seed, similarity=options.get("similarity"),
                                      synthesis=options.get("synthesis", False))
                    seconds = time.perf_counter() - start
                    warped = result.apply(moving_labels).data
                    dice = metrics.dice(torch.as_tensor(warped), torch.as_tensor(fixed_labels), list(LABEL_NAMES))
                    folding = float((result.jacobian_determinant() <= 0).mean() * 100)
                    rows.setdefault(name, []).append((dice, folding, end_point_error(result.displacement, pair, result.fixed, brain), seconds))
            label = {"multi": "T2-like → T1", "mono": "T1 → T1"}[case]
            for name, values in rows.items():
                per_label = [np.mean([v[0][k] for v in values]) for k in LABEL_NAMES]
                lines.append(
                    f"| {label} | {name} | " + " | ".join(f"{d:.3f}" for d in per_label)
                    + f" | **{np.mean(per_label):.3f}** | {np.mean([v[1] for v in values]):.3f}"
                    + f" | {np.mean([v[2] for v in values]):.2f} | {np.median([v[3] for v in values]):.2f} |"
                )
    lines += ["", "The mono-modal case uses the shipped T1 <-> T2-like model's a2b path with T1 on both sides "
              "(it was not trained for it); refinement uses the same settings for both cases."]
    if paths is SIMILARITY_PATHS:
        lines += ["The synthesis rows map moving into the other modality with the model's decoder: meaningful "
                  "for T2-like -> T1 (F_BA makes a T1-like image); in the mono-modal case the a2b decoder turns "
                  "the T1 moving image T2-like, so those rows only show what a contrast mismatch costs."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--ndim", type=int, default=2, choices=[2, 3])
    parser.add_argument("--model", default="default")
    parser.add_argument("--cases", nargs="+", default=["multi", "mono"], choices=["multi", "mono"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="markdown file to write (default bench/accuracy_{ndim}d.md)")
    parser.add_argument("--similarities", action="store_true",
                        help="compare refinement's similarities (and the synthesis path) instead of the paths")
    args = parser.parse_args(argv)
    table = run(Path(args.data), args.pairs, args.ndim, args.model, args.cases, args.seed,
                SIMILARITY_PATHS if args.similarities else PATHS)
    print(table)
    out = Path(args.out or Path(__file__).parent / f"accuracy_{args.ndim}d.md")
    out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
