"""The paper's test protocol (Section 4.1): a test subject's moving image, randomly transformed.

Each pair is written as NIfTI files so that firekit, ANTs or anything else registers the same
files: ``moving.nii.gz`` (modality M of the subject, warped by a random affine + smooth field),
``fixed.nii.gz`` (modality F of the same subject, untouched), their label maps, and
``true_field.nii.gz``, the exact answer as an ITK displacement field (mm, LPS) on the fixed grid:
``moving(x + u_true(x))`` is the fixed anatomy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from firekit.data import io
from firekit.core import spatial
from firekit.data.atomic import atomic_write_text
from firekit.core.errors import FirekitError

__all__ = ["make_test_pairs", "read_pairs", "end_point_error", "axial_slice"]


def axial_slice(volume: io.Volume, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial slice ``k`` (axis 2) as 2D data with its NIfTI 4x4 affine (``io.nd_affine(affine, 2)``
    gives the in-plane one)."""
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]
    return volume.data[:, :, k], affine


def make_test_pairs(
    subject_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    count: int,
    ndim: int = 2,
    moving: str = "T2",
    fixed: str = "T1",
    labels: str = "labels",
    seed: int = 0,
    config=None,
    slice_band: tuple[float, float] = (0.4, 0.7),
) -> list[dict]:
    """Write ``count`` transformed pairs of one subject (``SUBJ/{moving,fixed,labels}.nii.gz``).

    Args:
        ndim: 2 (an axial slice per pair, drawn in ``slice_band`` of the brain's extent) or 3.
        config: ``AugmentConfig`` of the random transformation (default: the paper's ranges).

    Returns:
        one dict of paths per pair (keys moving, fixed, moving_labels, fixed_labels, true_field).
    """
    from firekit.data.augment import AugmentConfig, random_transform

    subject_dir, out_dir = Path(subject_dir), Path(out_dir)
    vol_m = io.load_volume(subject_dir / f"{moving}.nii.gz")
    vol_f = io.load_volume(subject_dir / f"{fixed}.nii.gz")
    vol_l = io.load_labels(subject_dir / f"{labels}.nii.gz")
    if not (vol_m.shape == vol_f.shape == vol_l.shape) or vol_m.ndim != 3:
        raise FirekitError(f"{subject_dir}: expected co-registered 3D {moving}/{fixed}/{labels} images")
    config = config or AugmentConfig()
    generator = torch.Generator().manual_seed(int(seed))
    brain_slices = np.nonzero((vol_l.data > 0).any(axis=(0, 1)))[0]
    pairs = []
    for index in range(count):
        if ndim == 2:
            lo, hi = brain_slices.min(), brain_slices.max()
            band = (int(lo + slice_band[0] * (hi - lo)), int(lo + slice_band[1] * (hi - lo)))
            k = int(torch.randint(band[0], band[1] + 1, (1,), generator=generator))
            (m, affine), f, lab = axial_slice(vol_m, k), axial_slice(vol_f, k)[0], axial_slice(vol_l, k)[0]
        else:
            m, f, lab, affine = vol_m.data, vol_f.data, vol_l.data, vol_m.affine
        grid_affine = io.nd_affine(affine, ndim)
        spacing = io.spacing(grid_affine)
        moved = random_transform(m.shape, spacing, generator, config)
        m_t = torch.as_tensor(np.asarray(m, np.float32))[None, None]
        l_t = torch.as_tensor(np.asarray(lab, np.int64))[None, None]
        warped = spatial.warp(m_t, moved.displacement, padding_mode="zeros")[0, 0].numpy()
        warped_labels = spatial.warp_labels(l_t, moved.displacement)[0, 0].numpy()
        # moving = M o phi, so the registration's answer is phi^-1 on the fixed grid.
        truth = spatial.invert_displacement(moved.displacement.double())
        truth_mm = spatial.voxel_to_mm(spatial.normalised_to_voxel(truth), grid_affine)[0].movedim(0, -1).numpy()
        truth_lps = truth_mm * io.lps_flip(ndim)
        pair_dir = out_dir / f"pair{index:03d}"
        paths = {key: pair_dir / f"{key}.nii.gz" for key in ("moving", "fixed", "moving_labels", "fixed_labels",
                                                             "true_field")}
        io.save_nifti(warped.astype(np.float32), affine, paths["moving"])
        io.save_nifti(np.asarray(f, np.float32), affine, paths["fixed"])
        io.save_nifti(warped_labels.astype(np.int16), affine, paths["moving_labels"])
        io.save_nifti(np.asarray(lab, np.int16), affine, paths["fixed_labels"])
        io.save_nifti(io.itk_field_array(truth_lps), affine, paths["true_field"], intent=io.NIFTI_INTENT_VECTOR)
        record = {key: str(path) for key, path in paths.items()}
        record.update(subject=subject_dir.name, moving_contrast=moving, fixed_contrast=fixed, ndim=ndim,
                      slice=k if ndim == 2 else None, scales=[float(s) for s in np.ravel(getattr(moved, "scales", []))])
        pairs.append(record)
    if pairs:
        atomic_write_text(out_dir / "pairs.json", json.dumps(pairs, indent=1))
    return pairs


def read_pairs(out_dir: str | os.PathLike) -> list[dict]:
    """The pair records written by :func:`make_test_pairs` (``pairs.json``)."""
    path = Path(out_dir) / "pairs.json"
    if not path.is_file():
        raise FirekitError(f"{path}: not found; build the pairs with make_test_pairs first")
    return json.loads(path.read_text())


def end_point_error(displacement: np.ndarray | float, pair: dict, fixed: io.Volume, mask: np.ndarray) -> float:
    """Mean ``|u - u_true|`` in mm over ``mask`` for one pair of :func:`make_test_pairs`.

    Args:
        displacement: ``(*S, n)`` ITK/LPS field in mm on the fixed grid (``RegistrationResult.displacement``;
            0 for the unaligned pair).
        pair: the pair's paths (its ``true_field``).
        fixed: the fixed image, whose grid both fields live on.
        mask: ``S`` boolean, the voxels to average over (e.g. the brain).
    """
    truth = io.load_field(pair["true_field"], fixed)
    return float(np.linalg.norm(displacement - truth, axis=-1)[mask].mean())
