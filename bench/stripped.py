"""A skull-stripped image against a whole head: firekit with and without the stripped image's foreground
mask, beside ANTs SyN with and without the same mask.

    python -m bench.stripped [--pairs-2d 12] [--pairs-3d 2] [--work /tmp/firekit-heads]

The head is :mod:`bench.real_heads`' (ITK's real T1 with scalp, skull and neck); its skull-stripped
twin is the same T1 inside ITK's own brain mask (``KmeansTest_T1RawSkullStrip``, the same package), so
that the brain inside is the same image. Pairs: the paper's test protocol
(:func:`firekit.data.protocol.make_test_pairs`), the stripped T1 moving onto the head, and the head
moving onto the stripped T1; 2D pairs are axial slices from 30 % to 80 % of the head's height (where
the brain is). Scored inside the brain: Dice of the k-means classes the brain holds (three), end-point
error over them against the true mapping. Gross failure: end-point error > 10 mm or Dice below the
unaligned pair's. Writes ``bench/stripped.md`` and ``bench/stripped.json``.

The masked rows pass the stripped image's own foreground (``--moving-mask foreground`` or
``--fixed-mask foreground``: :func:`firekit.registration.pipeline.foreground_mask`) to firekit, and the
same region as an ANTs mask (``mask`` / ``moving_mask``, every stage) to ANTs SyN.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STRIP = "KmeansTest_T1RawSkullStrip.nii.gz"
DIRECTIONS = {"T1strip": ("T1strip", "T1", "stripped -> head"), "T1": ("T1", "T1strip", "head -> stripped")}
EPE_LIMIT_MM = 10.0


def build_subject(work: Path) -> Path:
    """``work/strip_subject/{T1,T1strip,labels}.nii.gz``: the real head, its stripped twin, the brain's labels."""
    import nibabel as nib

    from bench.real_heads import DATA, build_subject as build_head
    from firekit.data import io

    out = work / "strip_subject"
    if all((out / f"{name}.nii.gz").is_file() for name in ("T1", "T1strip", "labels")):
        return out
    head = build_head(work)
    t1, labels = io.load_volume(head / "T1.nii.gz"), io.load_labels(head / "labels.nii.gz")
    brain = np.asarray(nib.as_closest_canonical(nib.load(DATA / STRIP)).dataobj) > 0
    if brain.shape != t1.shape:
        raise SystemExit(f"{DATA / STRIP}: shape {brain.shape} differs from the head's {t1.shape}")
    io.save_nifti(t1.data.astype(np.float32), t1.affine, out / "T1.nii.gz")
    io.save_nifti((t1.data * brain).astype(np.float32), t1.affine, out / "T1strip.nii.gz")
    io.save_nifti((labels.data * brain).astype(np.int16), t1.affine, out / "labels.nii.gz")
    return out


def build_pairs(work: Path, pairs_2d: int, pairs_3d: int) -> list[dict]:
    from bench.gross_failures import cached_pairs

    subject = build_subject(work)
    records = []
    for ndim, count in ((2, pairs_2d), (3, pairs_3d)):
        for k, (key, (moving, fixed, label)) in enumerate(DIRECTIONS.items()):
            if count == 0:
                continue
            out = work / f"strip{ndim}d" / key
            pairs = cached_pairs(subject, out, count, ndim=ndim, moving=moving, fixed=fixed, seed=500 + 10 * ndim + k,
                                 slice_band=(0.3, 0.8))
            for index, pair in enumerate(pairs):
                pair.update(id=f"{ndim}d/{key}/pair{index:03d}", case=label, stripped="moving" if key == "T1strip"
                            else "fixed")
            records += pairs
    return records


def score(field: np.ndarray, volumes: dict) -> dict:
    """Dice of the labels the fixed brain holds and end-point error (mm) over them."""
    from bench.gross_failures import _score

    return _score(field, volumes, [int(v) for v in np.unique(volumes["fixed_labels"].data) if v])


def methods(model) -> dict:
    """name -> function(moving, fixed, stripped side) returning the field (ITK, mm, on fixed's grid)."""
    from bench.ants_runs import run_ants
    from firekit.registration.pipeline import FOREGROUND_MASK, foreground_mask, register

    def firekit(masked):
        def run(moving, fixed, stripped, seed):
            masks = {f"{stripped}_mask": FOREGROUND_MASK} if masked else {}
            return register(model, moving, fixed, direction="a2b", refine="auto", seed=seed, **masks).displacement
        return run

    def ants(masked):
        def run(moving, fixed, stripped, seed):
            image = moving if stripped == "moving" else fixed
            masks = {f"{stripped}_mask": foreground_mask(image)} if masked else {}
            return run_ants("SyN", moving, fixed, seed, **masks)["field"]
        return run

    return {"firekit default": firekit(False), "firekit, stripped image's foreground mask": firekit(True),
            "ANTs SyN": ants(False), "ANTs SyN, the same mask": ants(True)}


def run(pairs: list[dict], model, names=None, seed: int = 0, log=print) -> list[dict]:
    from bench.vs_ants import load_pair

    table = methods(model)
    rows = []
    for number, pair in enumerate(pairs, 1):
        volumes = load_pair(pair)
        unaligned = score(np.zeros_like(volumes["true_field"]), volumes)
        for name, method in table.items():
            if names and name not in names:
                continue
            clock = time.perf_counter()
            try:
                scores, error = score(method(volumes["moving"], volumes["fixed"], pair["stripped"], seed), volumes), ""
            except Exception as exc:  # one crash costs one row
                scores, error = dict(dice=math.nan, epe=math.nan), f"{type(exc).__name__}: {exc}"[:200]
            seconds = time.perf_counter() - clock
            gross = bool(error) or scores["epe"] > EPE_LIMIT_MM or scores["dice"] < unaligned["dice"]
            rows.append(dict(pair=pair["id"], ndim=pair["ndim"], case=pair["case"], method=name, seconds=seconds,
                             unaligned_dice=unaligned["dice"], gross=gross, error=error, **scores))
        log(f"[{number}/{len(pairs)}] {pair['id']}: " + ", ".join(
            f"{r['method']} {r['dice']:.3f}" for r in rows if r["pair"] == pair["id"]), flush=True)
    return rows


def report(rows: list[dict], machine: str, day: str, notes: list[str] = ()) -> str:
    import re

    protocol = re.sub(r"``([^`]+)``", r"`\1`", re.sub(r":\w+:`([^`]+)`", r"`\1`", " ".join(
        __doc__.split("\n\n")[2:4]).replace("\n", " ")))
    lines = [
        "# A skull-stripped image against a whole head (`python -m bench.stripped`)",
        "",
        f"{day}, {machine}, one thread per tool. {protocol}",
        "",
        "| case | method | pairs | gross | mean Dice | unaligned Dice | mean EPE mm | worst EPE mm | median s/pair | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["ndim"], row["case"], row["method"]), []).append(row)
    for (ndim, case, method), group in groups.items():
        done = [r for r in group if not r["error"]]
        mean = (lambda key: float(np.mean([r[key] for r in done])) if done else math.nan)
        lines.append(f"| {ndim}D {case} | {method} | {len(group)} | **{sum(r['gross'] for r in group)}** "
                     f"| {mean('dice'):.3f} | {np.mean([r['unaligned_dice'] for r in group]):.3f} | {mean('epe'):.2f} "
                     f"| {max((r['epe'] for r in done), default=math.nan):.1f} "
                     f"| {np.median([r['seconds'] for r in group]):.2f} | {sum(bool(r['error']) for r in group)} |")
    if notes:
        lines += ["", "Notes:", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import os
    import platform
    from datetime import date

    from bench.gross_failures import _threads
    from firekit.registration.pipeline import load

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs-2d", type=int, default=12, help="pairs per direction in 2D")
    parser.add_argument("--pairs-3d", type=int, default=2, help="pairs per direction in 3D")
    parser.add_argument("--work", type=Path, default=Path("/tmp/firekit-heads"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", help="only these rows (names as in the report)")
    parser.add_argument("--out", type=Path, default=HERE / "stripped.md")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the .json beside --out")
    args = parser.parse_args(argv)
    if args.report_only:
        stored = json.loads(args.out.with_suffix(".json").read_text())
        notes = args.note or stored.get("notes", [])
        text = report(stored["rows"], stored["machine"], stored["day"], notes)
        args.out.with_suffix(".json").write_text(json.dumps({**stored, "notes": notes}, indent=0))
        args.out.write_text(text)
        print(text)
        return 0
    _threads(args.threads)
    pairs = build_pairs(args.work, args.pairs_2d, args.pairs_3d)
    rows = run(pairs, load(), args.methods)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    text = report(rows, machine, str(date.today()), args.note)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(dict(machine=machine, day=str(date.today()), notes=args.note,
                                                             rows=rows), indent=0))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
