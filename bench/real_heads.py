"""Real heads, not only skull-stripped templates: firekit beside ANTs SyN on a real T1 head.

    python -m bench.real_heads [--pairs-2d 40] [--pairs-3d 6] [--work /tmp/firekit-heads]

The head: ITK's ``KmeansTest_T1UCharRaw.nii.gz`` (Debian ``insighttoolkit5-examples``: a real T1 with
scalp, skull, face and neck in the field of view, 128 x 128 x 62 voxels of 2 x 2 x 3 mm, coronal
slices, turned to RAS axes here) and the k-means segmentation beside it (``KmeansTest_T1KmeansPrelimSegmentation``: five
intensity classes in the head; the four with signal are scored as labels 1-4). The package is read from
``/usr/share/doc/insighttoolkit5-examples`` when installed (``make test`` installs it), else
downloaded with ``apt-get download`` and unpacked under ``--work``; nothing is committed.

Pairs: the paper's test protocol (``firekit.data.protocol.make_test_pairs``) on the head, the moving
image either the T1 itself or a T2-like image made from it (each k-means class re-weighted, see
:data:`T2_WEIGHTS`: dark white matter, bright CSF-like class and fat), the fixed image the T1. 2D pairs are axial slices from 10 % to 95 %
of the head's extent (2 x 3 mm in plane: the acquisition's 3 mm slices run front to back); 3D pairs
the whole head.
End-point error is averaged over the labelled head (labels > 0). Methods and the gross-failure rule
are those of :mod:`bench.gross_failures`. Writes ``bench/real_heads.md`` and ``bench/real_heads.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PACKAGE = "insighttoolkit5-examples"
DATA = Path("/usr/share/doc") / PACKAGE / "examples" / "Data"
HEAD, SEGMENTATION = "KmeansTest_T1UCharRaw.nii.gz", "KmeansTest_T1KmeansPrelimSegmentation.nii.gz"
CONTRASTS = {"T1": "T1 (same contrast)", "T2like": "T2-like (classes re-weighted)"}
# T2-like weight (x 255) of each scored k-means class (labels 1-4 = classes 3-6; class 6 is the
# brightest in T1, white matter): white matter dark, grey matter mid, the CSF-like class bright, fat
# and skin bright as in T2; each voxel keeps its T1 texture (its offset from its class's mean,
# halved). Class 2, the darkest (bone, air, the coil's dark fringe), keeps its T1 values and is not
# scored: there is nothing to align where neither image has signal.
T2_WEIGHTS = {1: 0.8, 2: 1.0, 3: 0.55, 4: 0.3}


def head_files(work: Path) -> tuple[Path, Path]:
    """The ITK head and its segmentation: installed, or from the downloaded package under ``work``."""
    for folder in (DATA, work / "deb" / DATA.relative_to("/")):
        if (folder / HEAD).is_file() and (folder / SEGMENTATION).is_file():
            return folder / HEAD, folder / SEGMENTATION
    (work / "deb").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(work / "deb")], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
            raise SystemExit(f"{PACKAGE}: not installed and could not be downloaded ({exc}); "
                             f"install it: sudo apt-get install {PACKAGE}") from None
    folder = work / "deb" / DATA.relative_to("/")
    return folder / HEAD, folder / SEGMENTATION


def build_subject(work: Path) -> Path:
    """``work/subject/{T1,T2like,labels}.nii.gz`` from the ITK head (the segmentation's background,
    class 1, and its darkest class 2 become 0; classes 3-6 become labels 1-4)."""
    from firekit.data import io

    out = work / "subject"
    if all((out / f"{name}.nii.gz").is_file() for name in (*CONTRASTS, "labels")):
        return out
    import nibabel as nib

    head, segmentation = head_files(work)
    # Stored coronal (L, S, A axes); turned to the closest RAS axes so that the 2D protocol's slices
    # (along the third axis) are axial, 2 x 3 mm in plane.
    t1 = nib.as_closest_canonical(nib.load(head))
    classes = np.asarray(nib.as_closest_canonical(nib.load(segmentation)).dataobj)
    data = np.asarray(t1.dataobj, dtype=np.float32)
    # The segmentation also labels the bottom and top slices, where the stored T1 is all zero.
    labels = np.where((classes >= 3) & (data > 0), classes.astype(np.int16) - 2, 0).astype(np.int16)
    t2 = np.where(classes == 2, data, 0.0).astype(np.float32)
    for label, weight in T2_WEIGHTS.items():
        inside = labels == label
        t2[inside] = 255.0 * weight + 0.5 * (data[inside] - data[inside].mean())
    io.save_nifti(data, t1.affine, out / "T1.nii.gz")
    io.save_nifti(np.clip(t2, 0, None).astype(np.float32), t1.affine, out / "T2like.nii.gz")
    io.save_nifti(labels, t1.affine, out / "labels.nii.gz")
    return out


def build_pairs(work: Path, pairs_2d: int, pairs_3d: int) -> list[dict]:
    from bench.gross_failures import cached_pairs, slice_heights
    from firekit.data import io

    subject = build_subject(work)
    labels = io.load_labels(subject / "labels.nii.gz").data
    records = []
    for ndim, total in ((2, pairs_2d), (3, pairs_3d)):
        for k, contrast in enumerate(CONTRASTS):
            count = total // len(CONTRASTS) + (1 if k < total % len(CONTRASTS) else 0)
            if count == 0:
                continue
            out = work / f"pairs{ndim}d" / contrast
            pairs = cached_pairs(subject, out, count, ndim=ndim, moving=contrast, fixed="T1", seed=100 * ndim + k,
                                 slice_band=(0.10, 0.95))
            for index, pair in enumerate(pairs):
                # The shipped model's T1 path (a2b) for T1 -> T1; its T2-like path (b2a) for the T2-like image.
                pair.update(id=f"{ndim}d/{contrast}/pair{index:03d}", contrast=contrast,
                            direction="a2b" if contrast == "T1" else "b2a")
            slice_heights(pairs, labels)
            records += pairs
    return records


def report(rows: list[dict], machine: str, day: str) -> str:
    from bench.gross_failures import EPE_LIMIT_MM

    lines = ["# Real heads: firekit beside ANTs SyN on a real T1 head with scalp, skull and neck", "",
             f"`python -m bench.real_heads` ({day}, {machine}, one thread per tool). The head: ITK's "
             "KmeansTest_T1UCharRaw (Debian insighttoolkit5-examples, 128 x 128 x 62 at 2 x 2 x 3 mm, coronal), "
             "labels = its k-means classes with signal (4); pairs = the paper's test protocol on it; moving T1 or "
             "T2-like (its k-means classes re-weighted: WM dark, CSF-like and fat bright), fixed T1. 2D = axial slices (2 x 3 mm) from 10 % to 95 % of "
             f"the head. EPE over the labelled head (scalp, skull marrow, brain, neck). Gross failure: EPE > {EPE_LIMIT_MM:g} mm or mean Dice below "
             "the unaligned pair's.", "",
             "| case | method | pairs | gross | mean Dice | unaligned Dice | mean EPE mm | worst EPE mm | fallbacks | "
             "median s/pair | errors |", "|" + "---|" * 11]
    for ndim in (2, 3):
        for contrast in CONTRASTS:
            for method in dict.fromkeys(r["method"] for r in rows):
                sel = [r for r in rows if r["ndim"] == ndim and r["contrast"] == contrast and r["method"] == method]
                if not sel:
                    continue
                epe = np.array([r["epe"] for r in sel], float)
                lines.append(
                    f"| {ndim}D {CONTRASTS[contrast]} | {method} | {len(sel)} | **{sum(r['gross'] for r in sel)}** | "
                    f"{np.nanmean([r['dice'] for r in sel]):.3f} | {np.mean([r['unaligned_dice'] for r in sel]):.3f} | "
                    f"{np.nanmean(epe):.2f} | {np.nanmax(epe):.1f} | {sum(bool(r['fallback']) for r in sel)} | "
                    f"{np.median([r['seconds'] for r in sel]):.2f} | {sum(bool(r['error']) for r in sel)} |")
    gross = [r for r in rows if r["gross"]]
    if gross:
        lines += ["", "Gross failures:", "", "| method | pair | Dice | unaligned Dice | EPE mm | error |",
                  "|" + "---|" * 6]
        lines += [f"| {r['method']} | {r['pair']} | {r['dice']:.3f} | {r['unaligned_dice']:.3f} | {r['epe']:.1f} | "
                  f"{r['error']} |" for r in gross]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import platform
    import os
    from datetime import date

    from bench.gross_failures import _threads, run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs-2d", type=int, default=40)
    parser.add_argument("--pairs-3d", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("/tmp/firekit-heads"))
    parser.add_argument("--no-ants", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "real_heads.md")
    args = parser.parse_args(argv)
    _threads(args.threads)
    pairs = build_pairs(args.work, args.pairs_2d, args.pairs_3d)
    rows = run(pairs, "after", ants=not args.no_ants)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    text = report(rows, machine, str(date.today()))
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(dict(machine=machine, rows=rows), indent=0))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
