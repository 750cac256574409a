"""What the FIRE network has learned besides registration: synthesis SSIM and G's modality invariance.

    python -m bench.network_quality [--data data/demo] [--models default PATH ...] [--slices 12]
                                    [--out bench/network_quality.md]

On the demo test subjects' axial slices (the middle 40-70 % of the brain, resampled to each model's
own grid), for each model:

* **synthesis**: SSIM of F_BA(G(x_B)) (T2-like -> T1) against the subject's real T1, aligned, inside
  the head (T1 above background), and the same for F_AB(G(x_A)) against the T2-like image;
* **invariance**: the mean over the brain of ``explain.invariance_map`` (RMS over channels of
  G(T1) - G(T2-like)) for the aligned pair, and for the same pair with the T2-like image moved by the
  test protocol's random transform (``AugmentConfig()``, no registration): the ratio aligned /
  misaligned is small when G codes anatomy the same way in both contrasts.

Prints a table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from firekit.explain import maps as explain
from firekit.core import metrics, spatial
from firekit.data.augment import AugmentConfig, random_transform
from firekit.registration.pipeline import load
from firekit.workflows import build_dataset


def test_slices(data: Path, spacing: float, count: int) -> list[dict]:
    """One batch per test subject: ``count`` aligned slices from its middle brain band, as the
    network sees them (``x_a`` T1, ``x_b`` T2-like in [-1, 1], ``labels``)."""
    source = build_dataset(str(data / "test/*/T1.nii.gz"), str(data / "test/*/T2.nii.gz"),
                           str(data / "test/*/labels.nii.gz"), 2, spacing=spacing, augment=False, progress=False)
    batches = []
    for index, subject in enumerate(source.subjects):
        slices = [k for i, k in source.items if i == index]
        band = slices[int(0.4 * len(slices)):int(0.7 * len(slices)) + 1]
        chosen = band[:: max(1, len(band) // count)][:count]
        batches.append({key: torch.cat([source._image(subject, name, k) for k in chosen])
                        for key, name in (("x_a", "a"), ("x_b", "b"), ("labels", "labels"))})
    return batches


@torch.no_grad()
def measure(model, batches: list[dict], spacing: float, seed: int = 0) -> dict[str, float]:
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ssim_a, ssim_b, aligned, misaligned = [], [], [], []
    for batch in batches:
        x_a, x_b, labels = batch["x_a"], batch["x_b"], batch["labels"]
        head_a, head_b = x_a > -0.95, x_b > -0.95
        ssim_a.append(metrics.ssim(model.synthesise(x_b, "b2a"), x_a, mask=head_a))
        ssim_b.append(metrics.ssim(model.synthesise(x_a, "a2b"), x_b, mask=head_b))
        brain = labels > 0
        zero = torch.zeros(len(x_a), 2, *x_a.shape[2:])
        moved = torch.cat([random_transform(x_b.shape[2:], spacing, generator, AugmentConfig()).displacement
                           for _ in range(len(x_b))])
        x_b_moved = (spatial.warp(x_b + 1.0, moved, padding_mode="zeros") - 1.0).clamp(-1, 1)
        for target, moving in ((aligned, x_b), (misaligned, x_b_moved)):
            difference = explain.invariance_map(model, moving, x_a, "b2a", displacement=zero)
            mask = torch.nn.functional.interpolate(brain.float(), size=difference.shape[1:], mode="nearest")[:, 0] > 0
            target.append(float(difference[mask].mean()))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"ssim_t1": mean(ssim_a), "ssim_t2": mean(ssim_b), "invariance_aligned": mean(aligned),
            "invariance_misaligned": mean(misaligned), "ratio": mean(aligned) / mean(misaligned)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--models", nargs="+", default=["default"])
    parser.add_argument("--slices", type=int, default=12, help="slices per test subject (default 12)")
    parser.add_argument("--out", type=Path, default=Path("bench/network_quality.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| model | synthesis SSIM F_BA(G(T2-like)) vs T1 (head) | F_AB(G(T1)) vs T2-like | "
             "invariance aligned | misaligned | ratio (target <= 0.5) |", "|---|---|---|---|---|---|"]
    for name in args.models:
        model = load(name)
        spacing = model.spacing or 1.28
        row = measure(model, test_slices(args.data, spacing, args.slices), spacing)
        lines.append(f"| {name} ({spacing} mm) | {row['ssim_t1']:.3f} | {row['ssim_t2']:.3f} | "
                     f"{row['invariance_aligned']:.4f} | {row['invariance_misaligned']:.4f} | {row['ratio']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
