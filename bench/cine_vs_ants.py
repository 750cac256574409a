"""Cardiac cine, ED -> ES: firekit beside ANTs SyN on cine phantom patients (the paper's Table 3 metric).

    python -m bench.cine_vs_ants [--patients 4] [--phases 25] [--seed 100] [--threads 2]

Per patient: the end-diastolic frame (moving) is registered to the end-systolic frame (fixed) and
the ED ground truth is warped onto ES and scored against the ES ground truth: Dice of the LV
cavity, myocardium and RV, HD95 (mm), % |J| <= 0. Time per series: firekit registers every phase of
the series to the reference in one call (``register_cine``); ANTs SyN is run phase by phase on the
first patient's whole series, and per pair on the others. Writes bench/cine.md and bench/cine.json
(which ``bench.vs_ants --report-only`` puts into bench/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LABELS = {3: "LV", 2: "Myo", 1: "RV"}
FULL = {"LV cavity": "LV", "myocardium": "Myo", "RV cavity": "RV"}  # acdc.LABEL_NAMES -> table columns
# The paper (Section 5.2): 10 volumes of 10 slices, FIRE on a CPU vs SyN.
PAPER_SECONDS = {"FIRE (CPU)": 200.0, "ANTs SyN": 1887.0}


def _short(scores: dict) -> dict:
    """``cine.score_labels`` output with the table's short label names."""
    return {"dice": {FULL[k]: v for k, v in scores["dice"].items()}, "hd95": {FULL[k]: v for k, v in scores["hd95"].items()},
            "folding": scores["folding_percent"]}


def run_patient(patient, ants_series: bool, seed: int, log=print) -> dict:
    """Every method on one patient: {method: scores + seconds}."""
    from firekit.registration import cine, fields
    from firekit.data import io
    from firekit.registration.pipeline import field_jacobian

    from bench.ants_runs import run_ants

    series = patient.series()
    ed, es = patient.ed, patient.es
    fixed = series.phase(es)
    labels_ed, labels_es = patient.labels(ed), patient.labels(es)
    firekit = cine.evaluate_ed_es(None, patient, seed=seed)
    rows = {"unaligned": {**_short(firekit["unaligned"]), "seconds": None},
            "firekit refinement (register_cine)": {**_short(firekit["registered"]), "seconds": firekit["seconds"],
                                                   "phases": series.phases}}
    log(f"  {patient.name}: firekit {firekit['seconds']:.1f} s for {series.phases} phases")

    pair = run_ants("SyN", series.phase(ed), fixed, seed)
    warped = fields.apply_field(labels_ed, pair["field"], fixed, labels=True)
    scores = cine.score_labels(warped, labels_es.data, io.spacing(fixed.affine), field_jacobian(pair["field"], fixed.affine))
    rows["ANTs SyN"] = {**_short(scores), "seconds_pair": pair["wall"]}
    if ants_series:
        tick = time.perf_counter()
        for phase in range(series.phases):
            if phase != es:
                run_ants("SyN", series.phase(phase), fixed, seed)
        rows["ANTs SyN"]["seconds"] = time.perf_counter() - tick
        rows["ANTs SyN"]["phases"] = series.phases
    log(f"  {patient.name}: SyN {pair['wall']:.1f} s per pair")
    return rows


def summarise(patients: dict) -> dict:
    methods = list(next(iter(patients.values())))
    out = {}
    for method in methods:
        rows = [p[method] for p in patients.values()]
        entry = {"dice": {k: float(np.mean([r["dice"][k] for r in rows])) for k in LABELS.values()},
                 "dice_std": {k: float(np.std([r["dice"][k] for r in rows])) for k in LABELS.values()},
                 "hd95": float(np.nanmean([np.nanmean(list(r["hd95"].values())) for r in rows])),
                 "folding": float(np.mean([r["folding"] for r in rows]))}
        series_times = [r["seconds"] for r in rows if r.get("seconds") is not None]
        if series_times:
            entry["seconds_series"] = float(np.median(series_times))
        pair_times = [r["seconds_pair"] for r in rows if r.get("seconds_pair") is not None]
        if pair_times:
            entry["seconds_pair"] = float(np.median(pair_times))
        out[method] = entry
    return out


def report(results: dict) -> str:
    meta, summary = results["meta"], results["summary"]
    lines = [f"Cine phantom (ACDC layout), {meta['patients']} patients, {meta['phases']} phases, "
             f"{meta['shape']} voxels of {meta['spacing']} mm; ED -> ES, ED labels warped onto ES "
             f"({meta['date']}, {meta['machine']}, {meta['threads']} threads, `{meta['command']}`).", "",
             "| method | Dice LV | Dice Myo | Dice RV | HD95 mm | % \\|J\\| ≤ 0 | s per series | s per pair |",
             "|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        dice = " | ".join(f"{s['dice'][k]:.3f} ({s['dice_std'][k]:.3f})" for k in ("LV", "Myo", "RV"))
        series_s = f"{s['seconds_series']:.1f}" if "seconds_series" in s else ""
        pair_s = f"{s['seconds_pair']:.1f}" if "seconds_pair" in s else ""
        lines.append(f"| {method} | {dice} | {s['hd95']:.2f} | {s['folding']:.3f} | {series_s} | {pair_s} |")
    lines += ["", f"The paper (Section 5.2, 10 volumes of 10 slices): FIRE on a CPU {PAPER_SECONDS['FIRE (CPU)']:.0f} s, "
              f"ANTs SyN {PAPER_SECONDS['ANTs SyN']:.0f} s. Here, one series of {meta['phases']} phases of "
              f"{meta['shape'][2]} slices: firekit {summary['firekit refinement (register_cine)'].get('seconds_series', float('nan')):.1f} s, "
              f"ANTs SyN {summary['ANTs SyN'].get('seconds_series', float('nan')):.1f} s "
              "(SyN timed phase by phase on the first patient's series)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/cine_phantom_bench"), help="phantom folder (built)")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--phases", type=int, default=25)
    parser.add_argument("--seed", type=int, default=100, help="phantom seed (not the demo's: held-out shapes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE / "cine.md")
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # before ants is imported
    import torch

    torch.set_num_threads(args.threads)
    from firekit.data import acdc
    from firekit.data.cinephantom import build_cine_phantom

    start = time.perf_counter()
    build_cine_phantom(args.data, patients=args.patients, phases=args.phases, seed=args.seed, progress=False)
    patients = acdc.find_patients(args.data)
    per_patient = {}
    for index, patient in enumerate(patients):
        per_patient[patient.name] = run_patient(patient, ants_series=index == 0, seed=0)
    first = patients[0].series()
    results = {"meta": {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                        "threads": args.threads, "command": "python -m bench.cine_vs_ants " + " ".join(argv or sys.argv[1:]),
                        "patients": len(patients), "phases": first.phases, "shape": list(first.shape),
                        "spacing": [round(float(v), 2) for v in np.sqrt((first.affine[:-1, :-1] ** 2).sum(axis=0))],
                        "minutes": (time.perf_counter() - start) / 60},
               "patients": per_patient, "summary": summarise(per_patient)}
    text = report(results)
    args.out.write_text("# Cardiac cine: firekit beside ANTs SyN (ED → ES)\n\n" + text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
