"""The debugging ladder of FIRE's learning (bench/training.md): one pair, ten pairs, the distribution;
each component alone; then together. One small run per rung, each a CSV curve.

    python -m bench.ladder [--data data/demo] [--out bench/ladder] [--only NAME[,NAME...]] [--list]
                           [--threads 1] [--png bench/ladder.png]

Every rung trains the small 2D preset at 2.56 mm on the demo training subjects (T1 = A, T2-like =
B) with its own loss and data, seed 0, and scores it every ``--every`` steps on fixed pairs:

* ``epe_px``: RMS end-point error of the A->B displacement against the known answer over the
  whole grid, in 2.56 mm voxels (``start_px``: the same for the start the model begins from);
* ``dice``: mean Dice (CSF/GM/WM) of A's labels warped onto B;
* ``ssim``: SSIM of the synthesis F_BA(G(x_B)) against x_A inside the head (aligned pairs).

Fixed-pair rungs (``pairs`` > 0) are scored on their own training pairs (can the net fit at all?);
the others on 16 pairs of the same distribution from another seed. Existing CSVs are kept; delete
one to rerun it. ``--png`` draws every CSV in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

from firekit import Fire, FireConfig
from firekit.core import metrics, spatial
from firekit.data.augment import AugmentConfig
from firekit.data.pairs import PairDataset
from firekit.fire.losses import fire_loss, transform_supervision
from firekit.registration.start import network_start
from firekit.training.config import TrainConfig
from firekit.training.optim import make_optimizers
from firekit.workflows import build_dataset

SPACING = 2.56
AFFINE_ONLY = dict(elastic_mm=0.0)  # the paper's affine ranges, no smooth field
ELASTIC_ONLY = dict(scale_change=(0.0, 0.0), scale_jitter=0.0, rotation_deg=0.0, shear=0.0, translation_mm=0.0)

# loss: "aux" (the supervised end-point error alone), "full" (Eq. 1 + 1000 x aux), "synthesis"
# (Eqs. 2-5 alone, transforms held at the identity); augment: "paper", "affine", "elastic", "none".
RUNS: dict[str, dict] = {
    "one_pair": dict(pairs=1, steps=300, loss="aux"),
    "ten_pairs": dict(pairs=10, steps=600, loss="aux"),
    "distribution_gap": dict(steps=1000, loss="aux"),
    "distribution_gap_moments": dict(steps=1000, loss="aux", prealign="moments"),
    "distribution_keypoints": dict(steps=1000, loss="aux", pooling="keypoints"),
    "affine_gap": dict(steps=400, loss="aux", augment="affine", affine_only=True),
    "affine_keypoints": dict(steps=400, loss="aux", augment="affine", affine_only=True, pooling="keypoints"),
    "nonrigid": dict(steps=400, loss="aux", augment="elastic"),
    "synthesis": dict(steps=400, loss="synthesis", augment="none"),
    "full_gap": dict(steps=300, loss="full"),
    "full_keypoints": dict(steps=300, loss="full", pooling="keypoints"),
}
FIELDS = ["step", "epe_px", "start_px", "dice", "ssim", "loss", "seconds"]


def dataset(data: Path, augment: str, seed: int = 0) -> PairDataset:
    configs = {"paper": AugmentConfig(), "affine": AugmentConfig(**AFFINE_ONLY),
               "elastic": AugmentConfig(**ELASTIC_ONLY), "none": False}
    return build_dataset(str(data / "train/*/T1.nii.gz"), str(data / "train/*/T2.nii.gz"),
                         str(data / "train/*/labels.nii.gz"), 2, spacing=SPACING, seed=seed,
                         augment=configs[augment], progress=False)


def _batches(source: PairDataset, count: int, size: int, seed: int) -> list[dict]:
    held = PairDataset(source.subjects, 2, source.augment, seed, spacing=SPACING)
    held.items = source.items
    return [held.sample(i, size) for i in range(count)]


def squared_error_voxels(displacement: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared end-point error in voxels of two normalised fields ``(B, ndim, *S)``."""
    shape = displacement.shape[2:]
    scale = torch.tensor([(s - 1) / 2 for s in shape], dtype=displacement.dtype).view(1, -1, *[1] * len(shape))
    return float((((displacement - target) * scale) ** 2).sum(dim=1).mean())


def _mean_dice(warped: torch.Tensor, fixed: torch.Tensor) -> float:
    scores = [sum(d.values()) / len(d) for d in (metrics.dice(w, f, [1, 2, 3]) for w, f in zip(warped, fixed))]
    return sum(scores) / len(scores)


@torch.no_grad()
def score(model: Fire, batches: list[dict], affine_only: bool) -> dict[str, float]:
    model.eval()
    epe, start, dice, ssim = [], [], [], []
    for batch in batches:
        x_a, x_b = batch["x_a"], batch["x_b"]
        theta0 = network_start(model.config, x_a, x_b, "a2b")
        result = model.register(x_a, x_b, "a2b", affine_only=affine_only, theta0=theta0)
        dice.append(_mean_dice(spatial.warp_labels(batch["labels_a"], result.displacement), batch["labels_b"]))
        synthesis = model.synthesise(x_b, "b2a")
        ssim.append(metrics.ssim(synthesis, x_a, mask=x_a > -0.9))
        if "u_a2b" in batch:
            epe.append(squared_error_voxels(result.displacement, batch["u_a2b"]))
            zero = torch.zeros_like(batch["u_a2b"])
            begin = zero if theta0 is None else spatial.affine_to_displacement(theta0, x_a.shape[2:])
            start.append(squared_error_voxels(begin, batch["u_a2b"]))
    model.train()
    rms = lambda values: math.sqrt(sum(values) / len(values)) if values else math.nan  # noqa: E731
    return {"epe_px": rms(epe), "start_px": rms(start), "dice": sum(dice) / len(dice), "ssim": sum(ssim) / len(ssim)}


def run(name: str, settings: dict, data: Path, out: Path, every: int) -> Path:
    path = out / f"{name}.csv"
    if path.is_file():
        print(f"{name}: kept {path}")
        return path
    torch.manual_seed(0)
    source = dataset(data, settings.get("augment", "paper"))
    pairs, steps, loss_name = settings.get("pairs", 0), settings["steps"], settings["loss"]
    affine_only = settings.get("affine_only", False) or loss_name == "synthesis"
    model = Fire(FireConfig.from_preset("small", 2, prealign=settings.get("prealign", "none"),
                                        affine_pooling=settings.get("pooling", "mean")))
    rate = settings.get("lr", 1e-3)
    optimizers = make_optimizers(model, TrainConfig(lr_affine=rate, lr_nonrigid=rate, lr_synthesis=rate))
    if loss_name == "synthesis":  # the transforms stay at the identity: only G and F learn
        optimizers = {"synthesis": optimizers["synthesis"]}
    fixed = [source.sample(i, 1) for i in range(pairs)]
    evaluation = ([{k: torch.cat([p[k] for p in fixed[i:i + 4]]) for k in fixed[0]} for i in range(0, pairs, 4)]
                  if pairs else _batches(source, 4, 4, seed=999))
    rows, started = [], time.perf_counter()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            row = {"step": step, **score(model, evaluation, affine_only), "seconds": time.perf_counter() - started}
            row["loss"] = rows[-1]["loss"] if rows else math.nan
            rows.append(row)
            print(f"{name} step {step}: " + ", ".join(f"{k} {row[k]:.3f}" for k in FIELDS[1:]), flush=True)
        if step == steps:
            break
        if pairs:
            chosen = [fixed[(step * 4 + j) % pairs] for j in range(min(4, pairs))]
            batch = {k: torch.cat([p[k] for p in chosen]) for k in fixed[0]}
        else:
            batch = source.sample(step, 4)
        out_ = model(batch["x_a"], batch["x_b"], affine_only=affine_only)
        if loss_name == "synthesis":
            terms = fire_loss(out_, batch["x_a"], batch["x_b"])
            loss = terms.syn
        else:
            aux = (transform_supervision(out_.disp_ab, batch["u_a2b"])
                   + transform_supervision(out_.disp_ba, batch["u_b2a"]))
            loss = aux if loss_name == "aux" else fire_loss(out_, batch["x_a"], batch["x_b"]).total + 1000.0 * aux
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
        rows[-1]["loss"] = float(loss)
    out.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def table(out: Path) -> str:
    lines = ["| rung | settings | start px | EPE px first → last (best) | Dice first → last | SSIM first → last |",
             "|---|---|---|---|---|---|"]
    for name, settings in RUNS.items():
        path = out / f"{name}.csv"
        if not path.is_file():
            continue
        rows = read(path)
        first, last = rows[0], rows[-1]
        best = min(r["epe_px"] for r in rows)
        shown = ", ".join(f"{k} {v}" for k, v in settings.items())
        lines.append(f"| {name} | {shown} | {first['start_px']:.2f} | {first['epe_px']:.2f} → {last['epe_px']:.2f} "
                     f"({best:.2f}) | {first['dice']:.3f} → {last['dice']:.3f} | "
                     f"{first['ssim']:.3f} → {last['ssim']:.3f} |")
    return "\n".join(lines)


def plot(out: Path, png: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.2))
    axes = figure.subplots(1, 3)
    import matplotlib

    colours = matplotlib.colormaps["tab20"]
    for index, name in enumerate(RUNS):
        path = out / f"{name}.csv"
        if not path.is_file():
            continue
        rows = read(path)
        steps = [r["step"] for r in rows]
        style = dict(label=name, color=colours(index % 20), linestyle="--" if "gap" in name else "-")
        if RUNS[name]["loss"] != "synthesis":
            axes[0].plot(steps, [r["epe_px"] for r in rows], **style)
            axes[1].plot(steps, [r["dice"] for r in rows], **style)
        axes[2].plot(steps, [r["ssim"] for r in rows], **style)
    for axis, title in zip(axes, ("RMS end-point error (2.56 mm voxels)", "mean Dice A->B", "synthesis SSIM")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    handles = {label: handle for axis in axes for handle, label in zip(*axis.get_legend_handles_labels())}
    axes[2].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(png, dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("bench/ladder"))
    parser.add_argument("--only", help="comma-separated rung names")
    parser.add_argument("--list", action="store_true", help="list the rungs and exit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--every", type=int, default=50, help="score every N steps (default 50)")
    parser.add_argument("--png", type=Path, help="draw the curves here")
    args = parser.parse_args(argv)
    if args.list:
        for name, settings in RUNS.items():
            print(name, settings)
        return 0
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown rungs {unknown}; see --list")
    if not (args.data / "dataset.json").is_file():
        from firekit.data.braindata import build_demo_dataset

        build_demo_dataset(args.data, progress=False)
    for name in names:
        run(name, RUNS[name], args.data, args.out, args.every)
    print(table(args.out))
    if args.png:
        plot(args.out, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
