"""What each tool does when there is nothing to do: a subject's own contrasts, already aligned.

    python -m bench.identity [--data data/demo] [--ndims 2 3] [--cases t2 flair mono]
                             [--cases-3d t2 flair] [--slices 5] [--methods ...] [--threads 1]
                             [--out bench/identity.md]

Each test subject's moving contrast (T2-like, FLAIR-like or T1) is registered, untransformed, to the
same subject's T1: the true mapping is the identity, and the labels of both images are one map. Any
displacement a tool returns is its bias on that pair of contrasts: where one contrast shows a
tissue boundary at another place than the other (partial volume, a contrast that hides an edge) a
similarity can prefer a wrong answer, and a tool that follows fine detail follows the bias further.
The bench's own protocol pairs (``bench.vs_ants``) carry the same bias under their random transforms,
so a case whose identity Dice is low caps every tool's Dice there.

Same scoring path as ``bench.vs_ants`` (one composed ITK field per tool; Dice of the labels the field
carries onto themselves, HD95, EPE = the field's own length over brain voxels, % |J| <= 0, inverse
consistency). 2D: ``--slices`` axial slices per subject in the bench's band (40-70 % of the brain's
height); 3D: the whole volume. Writes ``--out`` (tables), its ``.json`` (every pair).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench import peers, vs_ants

HERE = Path(__file__).resolve().parent
METHODS = ("firekit network + refinement", "firekit refinement alone", "ANTs SyN",
           *[name for name in peers.PEERS])


def identity_config():
    """An augmentation that draws like the bench's but moves nothing (strength 0: the identity)."""
    from firekit.data.augment import AugmentConfig

    return AugmentConfig(strength=0.0)


def run(data: Path, ndims, cases, slices: int, methods, seed: int, work: Path, threads: int, log=print,
        cases_3d=None) -> dict:
    """Every method on every untransformed pair, by ``bench.vs_ants.run`` (its rows, its warm-up, its
    scoring) with the identity for the random transform; 2D: ``slices`` slices per subject, 3D: one volume.

    ``cases_3d``: the cases run in 3D (default: ``cases``).
    """
    results = {"runs": []}
    for ndim in ndims:
        part = vs_ants.run(data, [ndim], cases if ndim == 2 or cases_3d is None else cases_3d, {2: slices, 3: 1},
                           {2: "default", 3: str(vs_ants.MODEL_3D)}, methods, seed, work, log=log, threads=threads,
                           augment=identity_config())
        results["runs"] += part["runs"]
    return results


def report(results: dict) -> str:
    from firekit.data.braindata import LABEL_NAMES

    meta = results["meta"]
    lines = [
        "# What each tool does when there is nothing to do (`python -m bench.identity`)", "",
        f"{meta['date']}, {meta['machine']}; {meta['threads']} thread(s) for torch and ITK. "
        f"Command: `{meta['command']}` ({meta['minutes']:.0f} min).", "",
        "Each test subject's moving contrast registered, **untransformed**, to the same subject's T1 (true "
        "mapping: the identity; one label map for both). Dice: the labels each tool's field carries onto "
        "themselves (1 = it moved nothing); EPE: the field's length over brain voxels. The row `unaligned` "
        "is the right answer.", "",
    ]
    for run in results["runs"]:
        lines += [f"## {run['ndim']}D, {run['label']} ({run['pairs']} pairs)", "",
                  *vs_ants.table(run, LABEL_NAMES), ""]
    if meta.get("notes"):
        lines += ["## Notes", "", *[f"- {note}" for note in meta["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--ndims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--cases", nargs="+", default=list(vs_ants.CASES), choices=list(vs_ants.CASES))
    parser.add_argument("--cases-3d", nargs="+", choices=list(vs_ants.CASES),
                        help="the cases run in 3D (default: --cases; T1 -> T1 is the same image twice there)")
    parser.add_argument("--slices", type=int, default=5, help="2D slices per test subject")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=[*vs_ants.FIREKIT, *vs_ants.ANTS, *peers.PEERS], metavar="METHOD")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the pairs (default: a temporary one)")
    parser.add_argument("--out", default=str(HERE / "identity.md"))
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(Path(args.data), args.ndims, args.cases, args.slices, args.methods, args.seed,
                      Path(args.work) if args.work else Path(tmp), args.threads,
                      log=lambda line: print(line, file=sys.stderr, flush=True), cases_3d=args.cases_3d)
    results["meta"] = dict(date=str(date.today()), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                           threads=args.threads, minutes=(time.perf_counter() - started) / 60, notes=args.note,
                           command="python -m bench.identity " + shlex.join(argv if argv is not None else sys.argv[1:]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = report(results)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
