"""Seconds per pair: ``firekit register --pairs`` (one process) against a shell loop of ``firekit register``.

    python -m bench.many_pairs [--pairs 100] [--loop-pairs 100] [--work /tmp/firekit-many-pairs]
                               [--out bench/many_pairs.md]

Pairs: 2D protocol pairs of held-out demo subjects 8 and 9 (``bench.gross_failures.build_pairs``:
moving T2-like / FLAIR-like / PD-like, randomly transformed; fixed T1; 128 x 160 axial slices at
1.28 mm), written to ``--work`` with a pairs CSV (moving, fixed, labels, fixed_labels). Both ways run
firekit's default path (the shipped 2D model, then refinement; ``--direction b2a``) with one thread
(``OMP_NUM_THREADS=1``), the console script in a fresh process, and write the same files per pair
(warped image, warped labels, field). ``--pairs`` also scores Dice against the fixed labels. The
shell loop runs the first ``--loop-pairs`` pairs (every ``firekit register`` call imports torch and
loads the model again); its outputs are compared with the ``--pairs`` run's.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OPTIONS = ["--direction", "b2a", "--quiet"]


def write_csv(pairs: list[dict], path: Path) -> None:
    """The pairs CSV (paths relative to its folder; each pair named after its id)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "moving", "fixed", "labels", "fixed_labels"])
        for pair in pairs:
            writer.writerow([pair["id"].replace("/", "_"), *(Path(pair[k]).relative_to(path.parent) for k in
                                                             ("moving", "fixed", "moving_labels", "fixed_labels"))])


def loop_script(pairs: list[dict], out: Path) -> str:
    """A bash script: one ``firekit register`` per pair, the outputs named as ``--pairs`` names them."""
    from bench.startup import firekit_script

    lines = ["set -e"]
    for pair in pairs:
        name = out / pair["id"].replace("/", "_")
        argv = [*firekit_script(), "register", "--moving", pair["moving"], "--fixed", pair["fixed"],
                "--moving-labels", pair["moving_labels"], "--out", f"{name}_warped.nii.gz",
                "--out-labels", f"{name}_labels.nii.gz", "--field", f"{name}_field.nii.gz", *OPTIONS]
        lines.append(shlex.join(map(str, argv)))
    return "\n".join(lines) + "\n"


def timed(argv: list[str]) -> float:
    """Wall seconds of one command (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=ENV, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def same_outputs(first: Path, second: Path, names: list[str]) -> bool:
    import nibabel as nib
    import numpy as np

    return all(np.array_equal(np.asanyarray(nib.load(first / n).dataobj), np.asanyarray(nib.load(second / n).dataobj))
               for n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100, help="pairs in the --pairs run (default 100)")
    parser.add_argument("--loop-pairs", type=int, default=100, help="the first N of them in the shell loop")
    parser.add_argument("--work", type=Path, default=Path("/tmp/firekit-many-pairs"))
    parser.add_argument("--out", type=Path, default=HERE / "many_pairs.md")
    args = parser.parse_args(argv)
    from bench.gross_failures import build_pairs
    from bench.startup import firekit_script

    pairs = build_pairs(args.work, [8, 9], args.pairs, 0)
    table = args.work / "pairs.csv"
    write_csv(pairs, table)
    batch_out, loop_out = args.work / "out-pairs", args.work / "out-loop"
    for folder in (batch_out, loop_out):
        shutil.rmtree(folder, ignore_errors=True)
    loads = [os.getloadavg()[0]]  # at the start, after the --pairs run, after the loop
    command = [*firekit_script(), "register", "--pairs", str(table), "--out", str(batch_out), *OPTIONS]
    batch_seconds = timed(command)
    loads.append(os.getloadavg()[0])
    with open(batch_out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == args.pairs and all(r["status"] == "ok" for r in rows), "a pair failed: see the summary"
    loop = pairs[: args.loop_pairs]
    script = args.work / "loop.sh"
    script.write_text(loop_script(loop, loop_out))
    loop_out.mkdir()
    loop_seconds = timed(["bash", str(script)])
    loads.append(os.getloadavg()[0])
    names = [f"{p['id'].replace('/', '_')}_{kind}.nii.gz" for p in loop for kind in ("warped", "labels", "field")]
    identical = same_outputs(batch_out, loop_out, names)
    per_batch, per_loop = batch_seconds / len(pairs), loop_seconds / len(loop)
    inside = statistics.median(float(r["seconds"]) for r in rows)
    lines = [
        "# Many pairs in one process", "",
        f"`python -m bench.many_pairs --pairs {args.pairs} --loop-pairs {args.loop_pairs}` ({date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other work (load average "
        f"{' / '.join(f'{v:.1f}' for v in loads)} at the start / after --pairs / after the loop), Python "
        f"{platform.python_version()}, one thread: OMP_NUM_THREADS=1). 2D protocol pairs (128 x 160 axial slices at "
        "1.28 mm, moving T2-/FLAIR-/PD-like, fixed T1, demo subjects 8-9), firekit's default path (shipped model + "
        "refinement), the same outputs per pair (warped image, labels, field); wall time of the whole command, "
        "start-up included.", "",
        "| how | pairs | wall s | s per pair | median s per pair inside (summary) | mean Dice |",
        "|---|---|---|---|---|---|",
        f"| `firekit register --pairs pairs.csv` (one process) | {len(pairs)} | {batch_seconds:.1f} | "
        f"**{per_batch:.2f}** | {inside:.2f} | {statistics.mean(float(r['mean_dice']) for r in rows):.3f} |",
        f"| shell loop of `firekit register` (a process per pair) | {len(loop)} | {loop_seconds:.1f} | "
        f"**{per_loop:.2f}** | | |", "",
        f"One process is {per_loop / per_batch:.1f}x faster per pair: each `firekit register` process pays "
        f"{per_loop - per_batch:.2f} s more (importing torch, loading the model, the first pair's warm-up)"
        + (f", {(per_loop - per_batch) * 500 / 60:.0f} min over a 500-pair study" if per_loop > per_batch else "")
        + f". The loop's outputs are {'identical to' if identical else 'NOT identical to'} the `--pairs` run's for "
        f"its {len(loop)} pairs.",
    ]
    if len(loop) < len(pairs):
        lines.append(f"The shell loop ran the first {len(loop)} of the {len(pairs)} pairs (its time per pair does not "
                     "depend on how many follow).")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
