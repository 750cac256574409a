"""``make demo``: held-out demo brain pairs registered with the shipped model, with numbers and pictures."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from firekit.data import io
from firekit.core import metrics
from firekit.data.braindata import LABEL_NAMES
from firekit.core.errors import FirekitError

__all__ = ["run_demo", "LABEL_NAMES", "ANTS_REFERENCE"]

STAGES = {"before": "unaligned", "affine_only": "FIRE affine", "network": "FIRE full (network)",
          "refined": "FIRE + refinement", "refine_only": "refinement alone"}
# bench/results.md (make bench): ANTs on 40 2D T2-like -> T1 protocol pairs of the same test subjects
# (mean Dice CSF/GM/WM; antspyx 0.6.3, 1 ITK thread, seeded, 2026-12-07).
ANTS_REFERENCE = {"unaligned": 0.371, "ANTs Affine": 0.541, "ANTs SyN": 0.725, "ANTs SyNRA": 0.695}


def _ants_syn_labels(pair: dict, shape: tuple[int, ...]) -> np.ndarray | None:
    """The moving labels warped onto the fixed grid (array ``shape``) by ANTs ``SyN`` (antspyx, when
    installed), or None."""
    import os

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # repeatable (FINDINGS.md)
    try:
        import ants
    except ImportError:
        return None

    def read(path):  # a 2D slice is stored with a singleton third axis: ANTs must see it as 2D
        image = ants.image_read(str(path))
        if image.dimension == 3 and image.shape[2] == 1:
            image = ants.from_numpy(image.numpy()[:, :, 0], origin=image.origin[:2], spacing=image.spacing[:2],
                                    direction=image.direction[:2, :2])
        return image

    fixed, moving = read(pair["fixed"]), read(pair["moving"])
    # antspyx seeds antsRegistration's sampling only from ants.config._random_seed (a random_seed=
    # argument is dropped; 0 means a clock seed), as bench/ants_runs.py does; releases before 0.5
    # have no ants.config and run unseeded.
    config = getattr(ants, "config", None)
    before = getattr(config, "_random_seed", None)
    if config is not None:
        config._random_seed = 1
    try:
        transform = ants.registration(fixed, moving, "SyN")["fwdtransforms"]
    except RuntimeError:  # e.g. an image too small for SyN's default pyramid: the row is left out
        return None
    finally:
        if config is not None:
            config._random_seed = before
    labels = ants.apply_transforms(fixed, read(pair["moving_labels"]), transform, interpolator="nearestNeighbor")
    return labels.numpy().astype(np.int64).reshape(shape)


def _mean_dice(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    return metrics.dice(torch.as_tensor(a), torch.as_tensor(b), labels=list(LABEL_NAMES))


def _figure(result, synthesised, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from firekit.explain.pictures import registration_figure

    view = result.network
    fig = registration_figure(
        view.moving[0], view.fixed[0], view.warped[0], view.displacement[:1],
        synthesised=synthesised,
        titles=("moving (T2-like)", "fixed (T1)", "warped moving"),
    )
    # The title gets a band of its own above the panels' titles (drawn over them before).
    fig.set_figheight(fig.get_figheight() + 0.35)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def _register_pairs(model, records: list[dict], out: Path) -> tuple[list[dict], list[float]]:
    """Register each pair file to file, score it, and draw the first few; returns rows and seconds."""
    from firekit.registration.pipeline import register
    from firekit.workflows import register_files

    rows, seconds = [], []
    for index, pair in enumerate(records):
        pair_dir = Path(pair["moving"]).parent
        tick = time.perf_counter()
        result = register_files(model, pair["moving"], pair["fixed"], pair_dir / "warped.nii.gz", direction="b2a",
                                moving_labels=pair["moving_labels"], out_labels=pair_dir / "warped_labels.nii.gz",
                                field=pair_dir / "field.nii.gz", affine=pair_dir / "affine.tfm", refine="auto")
        seconds.append(time.perf_counter() - tick)
        fixed_labels = io.load_labels(pair["fixed_labels"]).data
        moving_labels = io.load_labels(pair["moving_labels"]).data
        scores = {"before": _mean_dice(moving_labels, fixed_labels),
                  "refined": _mean_dice(result.apply(moving_labels).data, fixed_labels)}
        for stage, options in (("affine_only", dict(affine_only=True)), ("network", {}),
                               ("refine_only", dict(refine="auto"))):
            other = register(None if stage == "refine_only" else model, pair["moving"], pair["fixed"], "b2a",
                             **options)
            scores[stage] = _mean_dice(other.apply(moving_labels).data, fixed_labels)
        syn = _ants_syn_labels(pair, fixed_labels.shape)
        if syn is not None:
            scores["ants_syn"] = _mean_dice(syn, fixed_labels)
        before, after = scores["before"], scores["refined"]
        folding = float((result.jacobian_determinant() <= 0).mean() * 100)
        rows.append({"pair": f"{pair['subject']}/{pair_dir.name}", **scores, "folding_percent": folding})
        if index < 4:
            synthesised = model.synthesise(result.network.moving[:1], "b2a")[0]
            _figure(result, synthesised, out / f"{pair['subject']}_{pair_dir.name}.png",
                    f"{pair['subject']}/{pair_dir.name}: mean Dice {np.mean(list(before.values())):.3f} -> "
                    f"{np.mean(list(after.values())):.3f}")
    return rows, seconds


def _demo_model(data: Path, out: Path, retrain: bool, iterations: int, seed: int, progress: bool):
    """The model the demo registers with, and its name: the shipped one, or one retrained in OUT/train."""
    from firekit.registration.pipeline import load
    from firekit.workflows import SHIPPED_RECIPE, train_on_files

    if not retrain:
        return load("default"), "the shipped model"
    run_dir = out / "train"
    train_on_files(str(data / "train/*/T1.nii.gz"), str(data / "train/*/T2.nii.gz"), run_dir,
                   labels=str(data / "train/*/labels.nii.gz"), val_a=str(data / "val/*/T1.nii.gz"),
                   val_b=str(data / "val/*/T2.nii.gz"), val_labels=str(data / "val/*/labels.nii.gz"),
                   ndim=2, iterations=iterations, seed=seed, overwrite=True, progress=progress,
                   **SHIPPED_RECIPE)
    # Early stopping by validation, as for the shipped model.
    best = run_dir / "model_best.pt"
    model_path = best if best.is_file() else run_dir / "model.pt"
    return load(model_path), str(model_path)


def _demo_pairs(data: Path, out: Path, pairs: int, seed: int) -> list[dict]:
    """``pairs`` held-out test pairs (T2-like moving, T1 fixed), spread over the test subjects."""
    from firekit.data.protocol import make_test_pairs

    test_subjects = sorted(p for p in (data / "test").iterdir() if p.is_dir())
    if not test_subjects:
        raise FirekitError(f"{data / 'test'}: no test subjects; rebuild with firekit data demo --overwrite")
    per_subject = [pairs // len(test_subjects) + (i < pairs % len(test_subjects)) for i in range(len(test_subjects))]
    records = []
    for subject, count in zip(test_subjects, per_subject):
        if count:
            records += make_test_pairs(subject, out / "pairs" / subject.name, count, ndim=2, moving="T2",
                                       fixed="T1", seed=seed + len(records))
    return records


def _summarise(rows: list[dict], seconds: list[float], stages: dict, model_name: str) -> dict:
    """Mean Dice per stage and label (and their mean), mean folding, median seconds, the model, the pairs."""
    summary = {key: {name: float(np.mean([r[key][label] for r in rows])) for label, name in LABEL_NAMES.items()}
               for key in stages}
    for key in summary:
        summary[key]["mean"] = float(np.mean(list(summary[key].values())))
    summary["folding_percent"] = float(np.mean([r["folding_percent"] for r in rows]))
    summary["seconds_per_pair"] = float(np.median(seconds))
    summary["model"] = model_name
    summary["pairs"] = len(rows)
    return summary


def _write_dice_csv(path: Path, rows: list[dict], stages: dict) -> None:
    """One line per pair and stage: Dice per label and their mean."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pair", "stage", *LABEL_NAMES.values(), "mean"])
        for r in rows:
            for stage in stages:
                values = [r[stage][k] for k in LABEL_NAMES]
                writer.writerow([r["pair"], stage, *[f"{v:.4f}" for v in values], f"{np.mean(values):.4f}"])


def _report(summary: dict, stages: dict, out: Path, seconds: float) -> str:
    """The demo's printed table (also OUT/metrics.txt)."""
    model_name = summary["model"]
    lines = [f"firekit demo: {summary['pairs']} held-out 2D pairs (T2-like moving -> T1 fixed), {model_name}",
             f"{'':<22}" + "".join(f"{n:>8}" for n in [*LABEL_NAMES.values(), "mean"])]
    for key, label in stages.items():
        lines.append(f"{label:<22}" + "".join(f"{summary[key][n]:8.3f}" for n in [*LABEL_NAMES.values(), "mean"]))
    if "ants_syn" in stages:
        network, syn = summary["network"]["mean"], summary["ants_syn"]["mean"]
        lines.append(f"the network alone beside ANTs SyN on these pairs: {network:.3f} vs {syn:.3f} mean Dice "
                     f"({network - syn:+.3f})")
    lines.append(f"FIRE + refinement (the files written): |J| <= 0 {summary['folding_percent']:.3f} %, "
                 f"median {summary['seconds_per_pair']:.2f} s per pair")
    lines.append("for reference, bench/results.md (make bench) on 40 pairs of these subjects: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in ANTS_REFERENCE.items()))
    lines.append(f"outputs in {out}/ ({seconds:.0f} s)")
    return "\n".join(lines)


def run_demo(
    data: Path,
    out: Path,
    retrain: bool = False,
    iterations: int = 600,
    pairs: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Build data if needed, register test pairs (T2-like moving -> T1 fixed), print and write results.

    Returns:
        ``{stage: {label: mean Dice}}`` for every stage of :data:`STAGES`, plus folding and seconds.
    """
    from firekit.data.braindata import build_demo_dataset

    start = time.perf_counter()
    data, out = Path(data), Path(out)
    if not (data / "dataset.json").is_file():
        print(f"building demo data in {data} ...", flush=True)
        build_demo_dataset(data, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    model, model_name = _demo_model(data, out, retrain, iterations, seed, progress)
    records = _demo_pairs(data, out, pairs, seed)
    rows, seconds = _register_pairs(model, records, out)
    stages = {**STAGES, **({"ants_syn": "ANTs SyN (same pairs)"} if all("ants_syn" in r for r in rows) else {})}
    summary = _summarise(rows, seconds, stages, model_name)
    _write_dice_csv(out / "dice.csv", rows, stages)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = _report(summary, stages, out, time.perf_counter() - start)
    (out / "metrics.txt").write_text(text + "\n")
    print(text)
    return summary
