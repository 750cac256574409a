"""firekit beside ANTs on the same pairs, in one run: ``make bench`` or ``python -m bench.vs_ants``.

    python -m bench.vs_ants [--data data/demo] [--ndims 2 3] [--cases t2 flair mono]
                            [--transforms 20] [--transforms-3d 2] [--threads N]
                            [--model-2d default] [--model-3d PATH] [--out bench/results.md]

The paper's test protocol (Section 4.1): each test subject's moving image randomly transformed
``--transforms`` times (``firekit.data.protocol.make_test_pairs``; the same transforms for every case),
registered to the subject's T1 by every method:

- firekit: the moments start (no optimisation), the network's affine alone, the network, network +
  refinement (the default path: both ways in 2D; also one way, and ``--symmetric`` in 3D), refinement alone;
- ANTs (antspyx, ``pip install firekit[bench]``): ``Affine`` (Mattes MI), ``SyN``, ``SyNRA``,
  ITK threads = ``--threads`` (default: the machine's cores), torch likewise;
- the other peers (``bench/peers.py``, same extra): Greedy (NMI affine + deformable), elastix
  (affine + B-spline, Mattes MI) and, in 3D, ConvexAdam after Greedy's affine, each in a worker
  process with ``--threads`` threads, so that a crash costs its row (marked in the report), not the run;

and scored by one code path on every method's displacement field (ANTs' transforms composed into
one ITK field, firekit's written as one; each peer's fields converted to the same convention and
checked on every pair against the tool's own nearest-neighbour warp of the labels): Dice per label, HD95, end-point error against the true
mapping, % |J| <= 0, inverse-consistency error in voxels (firekit registers both ways; ANTs composes
its forward transform with its inverse), wall and CPU seconds per pair (registration only, from
images in memory). Writes ``bench/results.md`` (tables + the goals, met or missed by how much),
``bench/results.json`` (every pair's numbers) and ``bench/results.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench import peers
from bench.ants_runs import run_ants

HERE = Path(__file__).resolve().parent
MODEL_3D = HERE.parent / "firekit" / "weights" / "fire3d_t1_t2like_small.pt"  # the shipped 3D model
CASES = {  # case -> (moving contrast, fixed contrast, model direction, label)
    "t2": ("T2", "T1", "b2a", "T2-like → T1"),
    "flair": ("FLAIR", "T1", "b2a", "FLAIR-like → T1"),
    "mono": ("T1", "T1", "a2b", "T1 → T1"),
}
FIREKIT = {  # row -> register() options
    # What the network (pre-aligned by moments) and refinement start from: no optimisation step.
    "firekit moments start alone": dict(network=False, refine="moments"),
    "firekit affine-only (network)": dict(network=True, affine_only=True, refine=0),
    "firekit network": dict(network=True, refine=0),
    "firekit network + refinement": dict(network=True, refine="auto"),
    "firekit network + refinement, symmetric": dict(network=True, refine="auto", symmetric=True),
    # The default path registers 2D pairs both ways (register(symmetric="auto")); one way only, as before 2026-12-07:
    "firekit network + refinement, one way": dict(network=True, refine="auto", symmetric=False),
    "firekit refinement alone": dict(network=False, refine="auto"),
    # Does the network earn its place in front of refinement? Half the preset's 2D steps (40 + 20
    # affine, 60 + 40 non-rigid) from each start.
    "firekit network + refinement, 20 steps/level": dict(network=True, refine=20),
    "firekit refinement alone, 20 steps/level": dict(network=False, refine=20),
}
ANTS = {"ANTs Affine (Mattes MI)": "Affine", "ANTs SyN": "SyN", "ANTs SyNRA": "SyNRA"}
PEERS = peers.PEERS  # Greedy, elastix, ConvexAdam: each in a worker process (bench/peers.py)
REFERENCE = ("unaligned", "oracle (true mapping)")
GOAL_MARGIN = {2: 0.10, 3: 0.05}  # best firekit row >= best ANTs row + this mean Dice
FOLDING_GOAL = 0.1  # % voxels with |J| <= 0
IC_GOAL = 0.5  # voxels
NETWORK_SPEEDUP_GOAL = 20.0  # network alone vs SyN, per pair


# ---------------------------------------------------------------------------------------- methods
def run_firekit(options: dict, model, moving, fixed, direction: str, seed: int) -> dict:
    """One firekit path both ways: forward field (timed), backward field (for inverse consistency)."""
    from firekit.fire.model import other_direction
    from firekit.registration.pipeline import register

    reverse = other_direction(direction)
    net = model if options["network"] else None
    kwargs = dict(affine_only=options.get("affine_only", False), refine=options["refine"], seed=seed,
                  symmetric=options.get("symmetric", "auto"))
    result, wall, cpu = peers.timed(lambda: register(net, moving, fixed, direction=direction, **kwargs))
    backward = register(net, fixed, moving, direction=reverse, **kwargs)
    return dict(field=result.displacement, backward=backward.displacement, wall=wall, cpu=cpu)


# ---------------------------------------------------------------------------------------- scoring
def score(field, backward, pair: dict, volumes: dict, label_ids) -> dict:
    """Every metric of one method on one pair, from its fields (ITK/LPS mm)."""
    import torch

    from firekit.registration import fields
    from firekit.core import metrics
    from firekit.registration.pipeline import field_jacobian

    fixed, moving, fixed_labels = volumes["fixed"], volumes["moving"], volumes["fixed_labels"].data
    brain = fixed_labels > 0
    warped = fields.apply_field(volumes["moving_labels"], field, fixed, labels=True)
    dice = metrics.dice(torch.as_tensor(warped.astype(np.int64)), torch.as_tensor(fixed_labels.astype(np.int64)),
                        label_ids)
    hd = metrics.hd95(warped, fixed_labels, fixed.spacing, label_ids)
    error = np.linalg.norm(field - volumes["true_field"], axis=-1)[brain]
    row = dict(
        dice={str(k): v for k, v in dice.items()},
        hd95=float(np.nanmean(list(hd.values()))),
        epe=float(error.mean()),
        epe95=float(np.percentile(error, 95)),
        folding=float((field_jacobian(field, fixed.affine) <= 0).mean() * 100),
        ic=None,
    )
    if backward is not None:
        row["ic"] = float(fields.inverse_consistency(field, backward, fixed, moving)[brain].mean())
    return row


def load_pair(pair: dict) -> dict:
    from firekit.data import io

    volumes = {key: io.load_volume(pair[key]) for key in ("moving", "fixed")}
    volumes.update({key: io.load_labels(pair[key]) for key in ("moving_labels", "fixed_labels")})
    volumes["true_field"] = io.load_field(pair["true_field"], volumes["fixed"])
    return volumes


# ---------------------------------------------------------------------------------------- run
def model_info(path: str) -> dict:
    """What a checkpoint says about itself: file, ndim, preset, training steps, spacing, how."""
    from firekit.fire.checkpoint import load_checkpoint
    from firekit.registration.pipeline import DEFAULT_MODEL

    path = str(DEFAULT_MODEL if path == "default" else path)
    model, extra = load_checkpoint(path)
    return dict(path=os.path.relpath(path, HERE.parent), ndim=model.ndim, preset=model.config.preset,
                step=extra.get("step"), spacing=extra.get("spacing"), prealign=model.config.prealign,
                trained_by=extra.get("trained_by"), train_seconds=extra.get("train_seconds"))


def _peer_row(worker, name: str, pair: dict, volumes: dict, seed: int, label_ids) -> dict:
    """One peer on one pair, scored like the ANTs rows, with the agreement of the composed field's
    label warp with the tool's own; ``{"error": ...}`` when the peer crashed or failed."""
    try:
        out = worker.call(PEERS[name].adapter, pair, seed)
    except peers.PeerCrashed as exc:
        return dict(error=str(exc))
    row = score(out["field"], out["backward"], pair, volumes, label_ids)
    row.update(wall=out["wall"], cpu=out["cpu"],
               agreement=peers.agreement(out["own_labels"], out["field"], volumes["moving_labels"], volumes["fixed"]))
    return row


def run(data: Path, ndims, cases, transforms: dict, models: dict, methods, seed: int, work: Path, log=print,
        threads: int = 1, augment=None) -> dict:
    """Register every pair with every method; returns the raw results (what results.json holds).

    ``threads``: the peers' worker runs with this many (firekit and ANTs take the caller's settings).
    ``augment``: the ``AugmentConfig`` of the pairs' random transforms (None: the paper's ranges).
    """
    from firekit.data.braindata import LABEL_NAMES, build_demo_dataset

    if not (data / "dataset.json").is_file():
        build_demo_dataset(data, progress=False)
    subjects = sorted(p for p in (data / "test").iterdir() if p.is_dir())
    label_ids = list(LABEL_NAMES)
    results = {"runs": []}
    worker = peers.Worker(threads) if any(name in PEERS for name in methods) else None
    try:
        for ndim in ndims:
            _run_ndim(results, ndim, subjects, cases, transforms, models, methods, seed, work, log, worker, label_ids,
                      augment)
    finally:
        if worker is not None:
            worker.close()
    return results


def _run_ndim(results, ndim, subjects, cases, transforms, models, methods, seed, work, log, worker, label_ids,
              augment=None):
    """Every case of one ndim (see :func:`run`); appends one entry per case to ``results["runs"]``."""
    from firekit.data.protocol import make_test_pairs
    from firekit.registration.pipeline import load

    methods = [m for m in methods if m not in PEERS or ndim in PEERS[m].ndims]
    model = load(models[ndim]) if any(name in FIREKIT and FIREKIT[name]["network"] for name in methods) else None
    for case in cases:
        moving_contrast, fixed_contrast, direction, label = CASES[case]
        records = []
        for index, subject in enumerate(subjects):
            # The same seed per subject in every case: identical transforms (and 2D slices) for each contrast.
            records += make_test_pairs(subject, work / f"{ndim}d" / case / subject.name, transforms[ndim], ndim=ndim,
                                       moving=moving_contrast, fixed=fixed_contrast, seed=seed + 100 * index,
                                       config=augment)
        run_rows = {name: [] for name in (*REFERENCE, *methods)}
        for number, pair in enumerate(records, 1):
            volumes = load_pair(pair)
            if number == 1 and case == cases[0]:  # first calls pay one-off costs: not timed
                for name in (m for m in methods if m in FIREKIT):
                    run_firekit(FIREKIT[name], model, volumes["moving"], volumes["fixed"], direction, seed)
                if any(m in PEERS for m in methods):
                    _warm(worker, pair, seed, log)
            for name, row in _pair_rows(methods, model, worker, pair, volumes, direction, seed, label_ids).items():
                run_rows[name].append(row)
            log(f"[{ndim}D {label} {number}/{len(records)}] " + ", ".join(
                f"{name.replace('firekit ', 'fk ')} " + ("crashed" if "error" in rows[-1] else
                                                        f"{np.mean(list(rows[-1]['dice'].values())):.3f}")
                for name, rows in run_rows.items() if name != "oracle (true mapping)"))
        results["runs"].append(dict(ndim=ndim, case=case, label=label, pairs=len(records),
                                    subjects=[s.name for s in subjects], rows=run_rows))


def _warm(worker, pair: dict, seed: int, log) -> None:
    """The peers' imports and first calls, untimed (as firekit's first calls are)."""
    try:
        worker.call("bench.peers:warm", pair, seed)
    except peers.PeerCrashed as exc:  # each peer's own call will say so in its row
        log(f"warming the peers failed: {exc}")


def _pair_rows(methods, model, worker, pair: dict, volumes: dict, direction: str, seed: int, label_ids) -> dict:
    """Every method's scored row on one pair, the reference rows first."""
    rows = {"unaligned": score(np.zeros_like(volumes["true_field"]), None, pair, volumes, label_ids),
            "oracle (true mapping)": score(volumes["true_field"], None, pair, volumes, label_ids)}
    for name in methods:
        if name in PEERS:
            rows[name] = _peer_row(worker, name, pair, volumes, seed, label_ids)
            continue
        if name in FIREKIT:
            out = run_firekit(FIREKIT[name], model, volumes["moving"], volumes["fixed"], direction, seed)
        else:
            out = run_ants(ANTS[name], volumes["moving"], volumes["fixed"], seed)
        rows[name] = score(out["field"], out["backward"], pair, volumes, label_ids)
        rows[name].update(wall=out["wall"], cpu=out["cpu"])
    return rows


# ---------------------------------------------------------------------------------------- report
def summarise(rows: list[dict]) -> dict:
    """Mean/std of each metric over the pairs a method answered; medians of times. ``crashed``: how
    many pairs it did not answer (a peer's crash or error), ``nonfinite``: on how many its field held
    NaN or infinity (a diverged optimisation: its Dice counts, its distances are left out of the
    means), ``agreement``: the peers' lowest share of voxels where the composed field's label warp
    equals the tool's own."""
    crashed = sum("error" in r for r in rows)
    rows = [r for r in rows if "error" not in r]
    if not rows:
        return dict(crashed=crashed, answered=0)
    labels = list(rows[0]["dice"])
    dice = np.array([[r["dice"][k] for k in labels] for r in rows])
    ic = [r["ic"] for r in rows if r["ic"] is not None]
    summary = dict(
        dice_mean=dict(zip(labels, dice.mean(0))), dice_std=dict(zip(labels, dice.std(0))),
        mean=float(dice.mean()), mean_std=float(dice.mean(1).std()),
        hd95=float(np.nanmean([r["hd95"] for r in rows])), epe=float(np.nanmean([r["epe"] for r in rows])),
        epe95=float(np.nanmean([r["epe95"] for r in rows])), folding=float(np.mean([r["folding"] for r in rows])),
        ic=float(np.nanmean(ic)) if ic else None, crashed=crashed, answered=len(rows),
        nonfinite=sum(not np.isfinite(r["epe"]) for r in rows),
    )
    if "agreement" in rows[0]:
        summary["agreement"] = float(min(r["agreement"] for r in rows))
    if "wall" in rows[0]:
        summary.update(wall=float(np.median([r["wall"] for r in rows])), cpu=float(np.median([r["cpu"] for r in rows])))
    return summary


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(run: dict, label_names: dict) -> list[str]:
    rows = {name: summarise(values) for name, values in run["rows"].items() if values}
    syn = rows.get("ANTs SyN", {}).get("wall")
    header = ("| method | " + " | ".join(label_names.values()) + " | mean Dice | HD95 mm | EPE mm | EPE p95 mm"
              " | % \\|J\\|≤0 | IC vox | s/pair | CPU s/pair | SyN ÷ this |")
    lines = [header, "|" + "---|" * (len(label_names) + 10)]
    for name, s in rows.items():
        if not s["answered"]:
            lines.append(f"| {name} | crashed on all {s['crashed']} pairs: {_first_error(run['rows'][name])} |"
                         + " |" * (len(label_names) + 8))
            continue
        per_label = " | ".join(f"{s['dice_mean'][str(k)]:.3f} ({s['dice_std'][str(k)]:.3f})" for k in label_names)
        ratio = f"{syn / s['wall']:.1f}×" if syn and s.get("wall") else "—"
        bold = "**" if name.startswith("firekit network + refinement") else ""
        note = f" (crashed on {s['crashed']} of {s['crashed'] + s['answered']})" if s["crashed"] else ""
        if s["nonfinite"]:
            note += f" (NaN field on {s['nonfinite']} of {s['answered']}: distances over the rest)"
        lines.append(f"| {bold}{name}{bold}{note} | {per_label} | {bold}{s['mean']:.3f}{bold} ({s['mean_std']:.3f}) "
                     f"| {s['hd95']:.2f} | {s['epe']:.2f} | {s['epe95']:.2f} | {s['folding']:.3f} "
                     f"| {_fmt(s['ic'], '.3f')} | {_fmt(s.get('wall'), '.2f')} | {_fmt(s.get('cpu'), '.2f')} | {ratio} |")
    return lines


def _first_error(rows: list[dict]) -> str:
    return next((r["error"] for r in rows if "error" in r), "").replace("|", "/")


def peer_goals(rows: dict) -> list[tuple[str, bool, str]]:
    """firekit's default path beside every peer: at least as accurate as the best (mean Dice and EPE),
    and faster than each peer within 0.02 mean Dice of it."""
    default = rows.get("firekit network + refinement")
    others = {n: s for n, s in rows.items() if (n in PEERS or n in ANTS) and s.get("answered")}
    if not default or not default.get("answered") or not others:
        return []
    best = max(others, key=lambda n: others[n]["mean"])
    lowest_epe = min(others, key=lambda n: others[n]["epe"])
    out = [(f"default path mean Dice ≥ the best peer's ({best}, {others[best]['mean']:.3f})",
            default["mean"] >= others[best]["mean"], f"{default['mean'] - others[best]['mean']:+.3f}"),
           (f"default path EPE ≤ the best peer's ({lowest_epe}, {others[lowest_epe]['epe']:.2f} mm)",
            default["epe"] <= others[lowest_epe]["epe"], f"{default['epe'] - others[lowest_epe]['epe']:+.2f} mm")]
    for name, peer in others.items():
        if peer["mean"] >= default["mean"] - 0.02:
            out.append((f"default path faster than {name} (within 0.02 Dice of it)", default["wall"] < peer["wall"],
                        f"{peer['wall'] / default['wall']:.1f}× ({default['wall']:.2f} s vs {peer['wall']:.2f} s)"))
    return out


def goals(run: dict) -> list[tuple[str, bool, str]]:
    """(goal, met, by how much) for one ndim x case."""
    rows = {name: summarise(values) for name, values in run["rows"].items() if values}
    out = peer_goals(rows)
    rows = {name: s for name, s in rows.items() if s.get("answered")}
    firekit = {n: s for n, s in rows.items() if n.startswith("firekit")}
    ants = {n: s for n, s in rows.items() if n.startswith("ANTs")}
    if firekit and ants:
        best_fk = max(firekit, key=lambda n: firekit[n]["mean"])
        best_ants = max(ants, key=lambda n: ants[n]["mean"])
        margin = GOAL_MARGIN[run["ndim"]]
        gap = firekit[best_fk]["mean"] - ants[best_ants]["mean"]
        out.append((f"best firekit ({best_fk}, {firekit[best_fk]['mean']:.3f}) ≥ best ANTs ({best_ants}, "
                    f"{ants[best_ants]['mean']:.3f}) + {margin:.2f} mean Dice", gap >= margin, f"{gap:+.3f}"))
    refined, syn, network = (rows.get(n) for n in ("firekit network + refinement", "ANTs SyN", "firekit network"))
    if refined and syn:
        worst = min((refined["dice_mean"][k] - syn["dice_mean"][k], k) for k in refined["dice_mean"])
        out.append(("firekit + refinement Dice ≥ ANTs SyN on every label", worst[0] >= 0,
                    f"worst label {worst[1]}: {worst[0]:+.3f}"))
        out.append(("firekit + refinement faster than ANTs SyN", refined["wall"] < syn["wall"],
                    f"{syn['wall'] / refined['wall']:.1f}× ({refined['wall']:.2f} s vs {syn['wall']:.2f} s)"))
    if refined:
        out.append((f"firekit + refinement % |J| ≤ 0 below {FOLDING_GOAL}", refined["folding"] < FOLDING_GOAL,
                    f"{refined['folding']:.3f} %"))
    for name in ("firekit network + refinement", "firekit network + refinement, symmetric"):
        if rows.get(name, {}).get("ic") is not None:
            ic = rows[name]["ic"]
            label = "firekit + refinement" + (", symmetric," if "symmetric" in name else "")
            out.append((f"{label} inverse-consistency error below {IC_GOAL} voxel", ic < IC_GOAL, f"{ic:.3f} vox"))
    if network and syn:
        speedup = syn["wall"] / network["wall"]
        out.append((f"network alone ≥ {NETWORK_SPEEDUP_GOAL:.0f}× faster than ANTs SyN", speedup >= NETWORK_SPEEDUP_GOAL,
                    f"{speedup:.1f}×"))
    return out


SUMMARY_ROWS = ("firekit network", "firekit network + refinement", "firekit refinement alone", "ANTs Affine (Mattes MI)",
                "ANTs SyN", "ANTs SyNRA", *PEERS, "oracle (true mapping)")


def summary_table(results: dict) -> str:
    """One line per ndim x case: mean Dice and median seconds of the main rows (the README's table)."""
    short = {"firekit network": "network", "firekit network + refinement": "network + refinement",
             "firekit refinement alone": "refinement alone", "ANTs Affine (Mattes MI)": "ANTs Affine",
             "ANTs SyN": "ANTs SyN", "ANTs SyNRA": "ANTs SyNRA", "oracle (true mapping)": "oracle",
             **{name: name.split(" (")[0] for name in PEERS}}
    present = [name for name in SUMMARY_ROWS if any(run["rows"].get(name) for run in results["runs"])]
    lines = ["| case | pairs | " + " | ".join(short[n] for n in present) + " |", "|---|---|" + "---|" * len(present)]
    for run in results["runs"]:
        cells = []
        for name in present:
            if not run["rows"].get(name):
                cells.append("—")
                continue
            s = summarise(run["rows"][name])
            if not s["answered"]:
                cells.append("crashed")
                continue
            cells.append(f"{s['mean']:.3f}" + (f" ({s['wall']:.2f} s)" if "wall" in s else ""))
        lines.append(f"| {run['ndim']}D {run['label']} | {run['pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict, plot_name: str | None = None) -> str:
    from firekit.data.braindata import LABEL_NAMES

    meta = results["meta"]
    lines = [
        "# firekit beside ANTs, Greedy, elastix and ConvexAdam on the same pairs",
        "",
        f"{meta['date']}, {meta['machine']}; torch {meta['torch']}, antspyx {meta['ants']}; "
        f"{meta['threads']} threads for torch and ITK. Command: `{meta['command']}` ({meta['minutes']:.0f} min).",
        "",
        "Protocol (the paper's Section 4.1): each test subject's moving image randomly transformed "
        f"({', '.join(f'{v} transforms per subject in {k}D' for k, v in meta['transforms'].items())}, seed {meta['seed']}; affine with one axis scaled 20–50 %, "
        "rotation ±20°, shear ≤ 0.1, translation ≤ 10 mm, smooth elastic ≤ 9 mm) and registered to the "
        "same subject's T1. The same transforms (and 2D slices) in every case. Demo data: MNI152-derived "
        "(`firekit data demo`), test subjects " + ", ".join(results["runs"][0]["subjects"]) + ".",
        "",
        "Models: " + "; ".join(f"{nd}D `{m['path']}` ({m['preset']} preset, {m['ndim']}D, trained {m['step']} steps "
                               f"at {m['spacing']} mm" + (f" in {m['train_seconds'] / 60:.0f} min" if m.get('train_seconds') else "")
                               + (f", by `{m['trained_by']}`" if m.get('trained_by') else "") + ")"
                               for nd, m in meta["models"].items()) + ".",
        "",
        "Columns: Dice per label mean (std over pairs); HD95 = 95th-percentile surface distance, mean over labels; "
        "EPE = end-point error against the true mapping over brain voxels (mean, and its 95th percentile); "
        "% |J| ≤ 0 over the whole grid; IC = inverse-consistency error over brain voxels in voxels "
        "(firekit: forward field ∘ a registration the other way; ANTs: forward ∘ its own inverse); "
        "s/pair = median wall seconds of the registration alone (images in memory), CPU s/pair = median "
        "process CPU seconds (all threads); SyN ÷ this = ANTs SyN's median time over the row's.",
        "",
    ]
    all_goals = []
    for run in results["runs"]:
        lines += [f"## {run['ndim']}D, {run['label']} ({run['pairs']} pairs)", ""]
        lines += table(run, LABEL_NAMES)
        lines.append("")
        agreement = {n: summarise(v).get("agreement") for n, v in run["rows"].items() if n in PEERS and v}
        if any(a is not None for a in agreement.values()):
            lines += ["Each peer's composed field warps the labels as the tool itself does on the lowest pair of: "
                      + ", ".join(f"{n.split(' (')[0]} {a * 100:.2f} %" for n, a in agreement.items() if a is not None)
                      + " of voxels.", ""]
        all_goals += [(f"{run['ndim']}D {run['label']}", *g) for g in goals(run)]
    present = [name for name in PEERS if any(run["rows"].get(name) for run in results["runs"])]
    if present:
        versions = meta.get("peers", {})
        lines += ["## The peers' parameters", "",
                  "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ". Every peer runs in a worker "
                  "process of its own with the run's threads (`bench/peers.py`), from the same files.", ""]
        lines += [f"- **{name}**: {PEERS[name].parameters}." for name in present] + [""]
    lines += ["## Goals", "", "| where | goal | met | by |", "|---|---|---|---|"]
    lines += [f"| {where} | {goal} | {'yes' if met else '**no**'} | {by} |".replace("|J|", "\\|J\\|")
              for where, goal, met, by in all_goals]
    lines.append("")
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in meta["notes"]] + [""]
    if plot_name:
        lines += [f"![firekit vs ANTs]({plot_name})", ""]
    cine = HERE / "cine.json"
    if cine.is_file():  # python -m bench.cine_vs_ants
        from bench.cine_vs_ants import report as cine_report

        lines += ["## Cardiac cine, ED → ES (`python -m bench.cine_vs_ants`)", "",
                  cine_report(json.loads(cine.read_text())), ""]
    speed = HERE / "throughput.json"
    if speed.is_file():  # python -m bench.throughput --inference
        from bench.throughput import inference_table

        info = json.loads(speed.read_text())
        lines += ["## Speed: the CPU goals beside ANTs SyN on the same pairs (`python -m bench.throughput --inference`)",
                  "", f"{info['date']}, {info['machine']}, torch {info['torch']}; bench/throughput.md has the rest.", "",
                  *inference_table(info["pairs"]), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    # A Figure of its own, not pyplot's: writing a file needs no GUI backend, whatever the
    # process (a notebook, a test session with Qt loaded) has chosen.
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure

    ndims = sorted({run["ndim"] for run in results["runs"]})
    every = list(dict.fromkeys(name for run in results["runs"] for name in run["rows"]))  # one colour per method
    palette = dict(zip(every, matplotlib.colormaps["tab20"](np.arange(len(every)) % 20)))
    fig = Figure(figsize=(13, 4.2 * len(ndims)))
    axes = fig.subplots(len(ndims), 2, squeeze=False)
    for row, ndim in enumerate(ndims):
        runs = [r for r in results["runs"] if r["ndim"] == ndim]
        stats = [{n: summarise(v) for n, v in r["rows"].items() if v} for r in runs]  # per case, per method
        names = [n for n in runs[0]["rows"] if any(case.get(n, {}).get("answered") for case in stats)]
        width = 0.8 / len(names)
        colours = [palette[name] for name in names]
        ax = axes[row, 0]
        for i, name in enumerate(names):
            means = [case.get(name, {}).get("mean", np.nan) for case in stats]
            stds = [case.get(name, {}).get("mean_std", 0.0) for case in stats]
            ax.bar(np.arange(len(runs)) + i * width, means, width, yerr=stds, color=colours[i], label=name)
        ax.set_xticks(np.arange(len(runs)) + 0.4 - width / 2, [r["label"] for r in runs])
        ax.set_ylabel("mean Dice (CSF, GM, WM)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{ndim}D: accuracy per case")
        ax = axes[row, 1]
        for i, name in enumerate(names):
            points = [case[name] for case in stats if "wall" in case.get(name, {})]
            if not points:
                continue
            ax.scatter([p["wall"] for p in points], [p["mean"] for p in points], color=colours[i], label=name, s=40)
        ax.set_xscale("log")
        low, high = ax.get_xlim()
        if high / low > 10:  # more than a decade: the decades alone label the axis
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"median seconds per pair ({results['meta']['threads']} CPU threads)")
        ax.set_ylabel("mean Dice")
        ax.set_title(f"{ndim}D: accuracy vs time (one point per case)")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes[:, 0]:  # every method once, whichever ndim it ran in
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 if len(ndims) > 1 else 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def merge_runs(parts: list[dict]) -> list[dict]:
    """The runs of several results files in order; a later file's run of a case already there (same
    ndim, case and pairs) replaces that run's rows of the same name and adds its other rows (e.g. a
    few methods rerun after a change; the report's command line lists every part)."""
    runs: list[dict] = []
    for part in parts:
        for run in part["runs"]:
            same = next((r for r in runs if (r["ndim"], r["case"], r["pairs"]) == (run["ndim"], run["case"],
                                                                                  run["pairs"])), None)
            if same is None:
                runs.append(copy.deepcopy(run))
            else:
                same["rows"].update(copy.deepcopy(run["rows"]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo", help="demo data folder (built if missing)")
    parser.add_argument("--ndims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--transforms", type=int, default=20, help="random transforms per test subject in 2D (paper: 20)")
    parser.add_argument("--transforms-3d", type=int, default=2,
                        help="per test subject in 3D (default 2: ANTs SyN/SyNRA cost ~1 min per 3D pair on 2 cores; "
                             "20 is the paper's)")
    parser.add_argument("--methods", nargs="+", default=[*FIREKIT, *ANTS, *PEERS], choices=[*FIREKIT, *ANTS, *PEERS],
                        metavar="METHOD")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ITK threads (default: cores)")
    parser.add_argument("--model-2d", default="default")
    parser.add_argument("--model-3d", default=str(MODEL_3D))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the pairs (default: a temporary one)")
    parser.add_argument("--out", default=str(HERE / "results.md"))
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report and plot from results.json")
    parser.add_argument("--summary", action="store_true", help="print the one-line-per-case summary (README) and stop")
    parser.add_argument("--merge", nargs="+", metavar="JSON", type=Path,
                        help="join the runs of these results .json files (e.g. a 2D and a 3D run) into --out's; "
                             "a later file's rows of a case already there replace those rows (merge_runs)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.summary:
        print(summary_table(json.loads(json_path.read_text())))
        return 0
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        results = dict(runs=merge_runs(parts), meta=dict(parts[0]["meta"]))
        results["meta"].update(
            command=" + ".join(part["meta"]["command"] for part in parts),
            minutes=sum(part["meta"]["minutes"] for part in parts),
            transforms={k: v for part in parts for k, v in part["meta"]["transforms"].items()},
            models={k: v for part in parts for k, v in part["meta"]["models"].items()})
        json_path.write_text(json.dumps(results, indent=1))
    elif args.report_only:
        results = json.loads(json_path.read_text())
        if args.note:
            results["meta"]["notes"] = results["meta"].get("notes", []) + args.note
            json_path.write_text(json.dumps(results, indent=1))
    else:
        # ITK reads its thread count once, when ants is first imported.
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
        try:
            import ants
        except ImportError:
            if any(m in ANTS for m in args.methods):
                print("antspyx is missing: pip install 'firekit[bench]' (or make bench)", file=sys.stderr)
                return 2
            ants = None
        models = {2: args.model_2d, 3: args.model_3d}
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            results = run(Path(args.data), args.ndims, args.cases, {2: args.transforms, 3: args.transforms_3d},
                          models, args.methods, args.seed, work, log=lambda line: print(line, file=sys.stderr),
                          threads=args.threads)
        results["meta"] = dict(
            date=str(date.today()), machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            torch=torch.__version__, ants=getattr(ants, "__version__", "—"), threads=args.threads,
            transforms={str(k): v for k, v in {2: args.transforms, 3: args.transforms_3d}.items() if k in args.ndims},
            seed=args.seed, minutes=(time.perf_counter() - started) / 60,
            command="python -m bench.vs_ants " + shlex.join(argv if argv is not None else sys.argv[1:]),
            models={str(nd): model_info(models[nd]) for nd in args.ndims}, notes=args.note, peers=peers.versions(),
        )
        json_path.write_text(json.dumps(results, indent=1))
    plot(results, png_path)
    text = report(results, png_path.name)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
