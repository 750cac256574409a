"""How often does a registration go grossly wrong? firekit (before / after) beside ANTs SyN.

    python -m bench.gross_failures [--pairs-2d 504] [--pairs-3d 20] [--subjects 8 9 10 11]
                                   [--work /tmp/firekit-gross] [--label after] [--no-ants]
    python -m bench.gross_failures --report        # bench/gross_failures.md from the JSON

Two processes on two cores: ``--shard 1/2 --results A.json`` and ``--shard 2/2 --results B.json``,
then ``--report --results bench/gross_failures.json --merge A.json B.json``.

Pairs: the paper's test protocol (``firekit.data.protocol.make_test_pairs``: a random affine within
+-20 deg (2D) / +-15 deg per axis (3D), one axis scaled by 20-50 %, shear, 10 mm shifts, a 9 mm
smooth field) applied to held-out demo subjects (``braindata.demo_subject``: the test split, 8-9,
and subjects 10-11 that no model saw), moving contrasts T2-like, FLAIR-like and PD-like
(0.90 CSF + 0.75 GM + 0.60 WM), fixed T1. 2D pairs are axial slices drawn anywhere from 10 % to
95 % of the brain's height (the vertex slices whose outline is nearly round included).

A pair is a **gross failure** when the end-point error against the true mapping, averaged over the
brain, exceeds 10 mm, or the mean Dice (CSF, GM, WM) falls below the unaligned pair's.

Methods: firekit's default path (``firekit register``: the shipped 2D model + refinement; in 3D the
refinement from moments), ``--no-network`` (refinement alone; in 3D the same path), and ANTs SyN
(antspyx, Mattes MI affine stages). ``--label before`` with ``PYTHONPATH`` pointing at an older
firekit tree records that code's rows (the options it lacks are not passed). Each run appends its
rows to ``bench/gross_failures.json``, replacing rows of the same label and method.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from firekit.batch import parse_shard, shard_items
from firekit.core.errors import FirekitError

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "gross_failures.json"
CONTRASTS = {"T2": "T2-like", "FLAIR": "FLAIR-like", "PD": "PD-like"}
SLICE_BAND = (0.10, 0.95)
EPE_LIMIT_MM = 10.0
LABEL_IDS = (1, 2, 3)


def _threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(count)


def _shard(value: str) -> tuple[int, int]:
    try:
        return parse_shard(value)
    except FirekitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_pairs(work: Path, subjects, pairs_2d: int, pairs_3d: int, seed: int = 0) -> list[dict]:
    """Write the subjects (with the PD-like contrast) and the protocol pairs under ``work``."""
    from firekit.data import io
    from firekit.data.braindata import demo_subject

    records = []
    cases = [(c, s) for c in CONTRASTS for s in subjects]
    for ndim, total in ((2, pairs_2d), (3, pairs_3d)):
        if total <= 0:
            continue
        per_case = [total // len(cases) + (1 if k < total % len(cases) else 0) for k in range(len(cases))]
        for (contrast, subject), count in zip(cases, per_case):
            if count == 0:
                continue
            subject_dir = work / "subjects" / f"subj{subject:03d}"
            if not (subject_dir / "PD.nii.gz").is_file():
                for name, volume in demo_subject(subject, extra=("PD",)).items():
                    io.save_nifti(volume.data, volume.affine, subject_dir / f"{name}.nii.gz")
            out = work / f"pairs{ndim}d" / contrast / subject_dir.name
            pairs = cached_pairs(subject_dir, out, count, ndim=ndim, moving=contrast, fixed="T1",
                                 seed=seed + 1000 * subject + 17 * ndim + len(records), slice_band=SLICE_BAND)
            for k, pair in enumerate(pairs):
                pair.update(id=f"{ndim}d/{contrast}/{subject_dir.name}/pair{k:03d}", contrast=contrast)
            slice_heights(pairs, io.load_labels(subject_dir / "labels.nii.gz").data)
            records += pairs
    return records


def _firekit_methods(ndim: int, model, direction: str = "b2a") -> dict:
    from firekit.registration.pipeline import register

    accepts = set(inspect.signature(register).parameters)
    extra = {k: v for k, v in dict(orientation="header", check=True).items() if k in accepts}

    def default(moving, fixed):
        return register(model, moving, fixed, direction=direction, refine="auto", **extra)

    def no_network(moving, fixed):
        return register(None, moving, fixed, direction=direction, refine="auto", **extra)

    if ndim == 3:  # a 2D model on volumes refines in 3D from moments: the default path is --no-network's
        return {"firekit default (= --no-network in 3D)": no_network}
    return {"firekit default (network + refinement)": default, "firekit --no-network": no_network}


def cached_pairs(subject_dir: Path, out: Path, count: int, **options) -> list[dict]:
    """The ``count`` protocol pairs an earlier run wrote under ``out``, else made there now
    (``make_test_pairs(subject_dir, out, count, **options)``)."""
    from firekit.data.protocol import make_test_pairs, read_pairs

    try:
        pairs = read_pairs(out)
    except Exception:  # none written yet, or unreadable: made again
        pairs = None
    if pairs is None or len(pairs) != count:
        pairs = make_test_pairs(subject_dir, out, count, **options)
    return pairs


def _score(field: np.ndarray, volumes: dict, label_ids=LABEL_IDS) -> dict:
    """Mean Dice of ``label_ids`` (the moving labels carried by ``field``) and end-point error (mm) over the fixed
    labels."""
    import torch

    from firekit.registration import fields
    from firekit.core import metrics

    fixed_labels = volumes["fixed_labels"].data
    brain = fixed_labels > 0
    warped = fields.apply_field(volumes["moving_labels"], field, volumes["fixed"], labels=True)
    dice = metrics.dice(torch.as_tensor(warped.astype(np.int64)), torch.as_tensor(fixed_labels.astype(np.int64)),
                        label_ids)
    epe = float(np.linalg.norm(field - volumes["true_field"], axis=-1)[brain].mean())
    return dict(dice=float(np.mean(list(dice.values()))), epe=epe)


def run(pairs: list[dict], label: str, ants: bool, log=print) -> list[dict]:
    """Every method on every pair -> one row per (pair, method)."""
    from bench.ants_runs import run_ants
    from bench.vs_ants import load_pair
    from firekit.registration.pipeline import load

    model = load()
    commit = _commit()
    rows = []
    for index, pair in enumerate(pairs):
        volumes = load_pair(pair)
        unaligned = _score(np.zeros_like(volumes["true_field"]), volumes)
        methods = dict(_firekit_methods(pair["ndim"], model, pair.get("direction", "b2a")))
        if ants:
            methods["ANTs SyN"] = None
        for name, method in methods.items():
            clock = time.perf_counter()
            fallback = ""
            try:
                if method is None:
                    field = run_ants("SyN", volumes["moving"], volumes["fixed"], seed=0)["field"]
                else:
                    result = method(volumes["moving"], volumes["fixed"])
                    field = result.displacement
                    report = getattr(result, "check", None)
                    fallback = report.chosen if report is not None and report.verdict != "ok" else ""
                seconds = time.perf_counter() - clock  # the registration alone, not the scoring
                scores = _score(field, volumes)
                error = ""
            except Exception as exc:  # one crash costs one row, not the run
                scores, error = dict(dice=math.nan, epe=math.nan), f"{type(exc).__name__}: {exc}"[:200]
                seconds = time.perf_counter() - clock
            gross = bool(error) or scores["epe"] > EPE_LIMIT_MM or scores["dice"] < unaligned["dice"]
            rows.append(dict(label=label, method=name, pair=pair["id"], ndim=pair["ndim"], contrast=pair["contrast"],
                             slice=pair.get("slice"), height=pair.get("height"), unaligned_dice=unaligned["dice"],
                             unaligned_epe=unaligned["epe"], seconds=seconds, gross=gross, fallback=fallback,
                             error=error, commit=commit, **scores))
        if (index + 1) % 25 == 0 or index + 1 == len(pairs):
            done = [r for r in rows if r["label"] == label]
            log(f"[{label}] {index + 1}/{len(pairs)} pairs; gross so far: "
                + ", ".join(f"{m} {sum(r['gross'] for r in done if r['method'] == m)}"
                            for m in dict.fromkeys(r["method"] for r in done)), flush=True)
    return rows


def slice_heights(pairs: list[dict], labels: np.ndarray) -> None:
    """Set each 2D pair's ``height``: where its axial slice lies between the lowest (0) and highest (1)
    slice of ``labels > 0`` (the subject's 3D label map); 3D pairs get None."""
    slices = np.nonzero((labels > 0).any(axis=(0, 1)))[0]
    for pair in pairs:
        pair["height"] = None if pair["ndim"] != 2 else round(
            (pair["slice"] - slices.min()) / max(1, slices.max() - slices.min()), 3)


def _commit() -> str:
    import firekit

    root = Path(firekit.__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip() + (
            "+changes" if subprocess.run(["git", "-C", str(root), "status", "--porcelain", "firekit"],
                                         capture_output=True, text=True).stdout.strip() else "")
    except Exception:
        return "unknown"


def merge(rows: list[dict], path: Path = RESULTS) -> dict:
    """Add ``rows`` to the stored results, replacing rows of the same (label, method, pair)."""
    stored = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    keys = {(r["label"], r["method"], r["pair"]) for r in rows}
    stored["rows"] = [r for r in stored["rows"] if (r["label"], r["method"], r["pair"]) not in keys] + rows
    stored["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    stored["date"] = str(date.today())
    stored["rows"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in stored["rows"]]
    path.write_text(json.dumps(stored, separators=(",", ":")).replace("},{", "},\n{"))
    return stored


def report(stored: dict) -> str:
    """The Markdown report: gross failures per method, label and case, and the failing pairs."""
    rows = stored["rows"]
    lines = ["# Gross failures: firekit before / after, beside ANTs SyN", "",
             f"`python -m bench.gross_failures` ({stored.get('date')}, {stored.get('machine')}, one thread per tool). "
             f"Gross failure: end-point error over the brain > {EPE_LIMIT_MM:g} mm against the true mapping, or mean "
             "Dice (CSF, GM, WM) below the unaligned pair's. 2D: axial slices from 10 % to 95 % of the brain's height; "
             "moving T2-like / FLAIR-like / PD-like, fixed T1; held-out subjects 8-11. `before` = the code before the "
             "orientation bound and the check (its commit in the table); `after` = this tree. Fallbacks = pairs "
             "where the check kept a simpler candidate. Seconds: the registration alone (rows before the 2026-12-07 "
             "sixth session's include the scoring of its answer too).", ""]
    for ndim in (2, 3):
        part = [r for r in rows if r["ndim"] == ndim]
        if not part:
            continue
        lines += [f"## {ndim}D", "", "| method | code | contrast | pairs | gross | EPE > 10 mm | Dice < unaligned | "
                  "mean Dice | mean EPE mm | worst EPE mm | fallbacks | median s/pair |", "|" + "---|" * 12]
        groups = dict.fromkeys((r["method"], r["label"], r["commit"]) for r in part)
        for method, label, commit in groups:
            for contrast in [*CONTRASTS, "all"]:
                sel = [r for r in part if (r["method"], r["label"], r["commit"]) == (method, label, commit)
                       and (contrast == "all" or r["contrast"] == contrast)]
                if not sel:
                    continue
                epe = np.array([r["epe"] for r in sel], float)
                name = CONTRASTS.get(contrast, "**all**")
                lines.append(
                    f"| {method} | {label} ({commit}) | {name} | {len(sel)} | **{sum(r['gross'] for r in sel)}** | "
                    f"{int(np.sum(epe > EPE_LIMIT_MM))} | {sum(r['dice'] < r['unaligned_dice'] for r in sel)} | "
                    f"{np.nanmean([r['dice'] for r in sel]):.3f} | {np.nanmean(epe):.2f} | {np.nanmax(epe):.1f} | "
                    f"{sum(bool(r['fallback']) for r in sel)} | {np.median([r['seconds'] for r in sel]):.2f} |")
        lines.append("")
        gross = [r for r in part if r["gross"]]
        if gross:
            lines += [f"Gross failures in {ndim}D:", "", "| method | code | pair | height | Dice | unaligned Dice | "
                      "EPE mm | error |", "|" + "---|" * 8]
            for r in sorted(gross, key=lambda r: (r["method"], r["label"], r["pair"])):
                lines.append(f"| {r['method']} | {r['label']} | {r['pair']} | {r['height'] if r['height'] is not None else ''} "
                             f"| {r['dice']:.3f} | {r['unaligned_dice']:.3f} | {r['epe']:.1f} | {r['error']} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs-2d", type=int, default=504)
    parser.add_argument("--pairs-3d", type=int, default=20)
    parser.add_argument("--subjects", type=int, nargs="+", default=[8, 9, 10, 11])
    parser.add_argument("--work", type=Path, default=Path("/tmp/firekit-gross"))
    parser.add_argument("--label", default="after", help="what the rows are called (before / after)")
    parser.add_argument("--no-ants", action="store_true", help="firekit rows only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--shard", default="1/1", metavar="K/N", type=_shard,
                        help="run shard K of N only (1-based, as firekit register --shard): pairs K, K+N, ...")
    parser.add_argument("--report", action="store_true", help="only write bench/gross_failures.md from the JSON")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSON",
                        help="with --report: first add these runs' rows (e.g. shards) to --results")
    args = parser.parse_args(argv)
    if not args.report:
        _threads(args.threads)
        pairs = build_pairs(args.work, args.subjects, args.pairs_2d, args.pairs_3d)
        pairs = shard_items(pairs, args.shard)
        print(f"{len(pairs)} pairs under {args.work}", flush=True)
        rows = run(pairs, args.label, ants=not args.no_ants)
        stored = merge(rows, args.results)
    else:
        for extra in args.merge:
            merge(json.loads(extra.read_text())["rows"], args.results)
        stored = json.loads(args.results.read_text())
    text = report(stored)
    (args.results.with_suffix(".md")).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
