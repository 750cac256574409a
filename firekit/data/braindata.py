"""Demo brain data built offline from the MNI152 template that ships inside nilearn's wheel.

What is real: the MNI ICBM152 2009 T1 template and its grey/white-matter probability maps
(nilearn's copy, 1 mm, no download). Everything else is derived here: the CSF map and the labels
from the GM/WM maps, the T2-like and FLAIR-like contrasts as partial-volume mixes of the tissue
maps, and each "subject" as the template warped by a known mild random transform, with its own
bias fields and Rician noise. The exact subject -> template mapping is kept, so registration
accuracy can be measured in mm.

Layout written by :func:`build_demo_dataset`::

    out/dataset.json    out/README.md
    out/{train,val,test}/subjNNN/{T1,T2,FLAIR,labels,to_template}.nii.gz

Every subject lives on the template grid (same affine); ``to_template.nii.gz`` is an ITK
displacement field (LPS signs): ``q_ras = p_ras + [-u0, -u1, u2]`` is the template point seen at
the subject's world point ``p_ras``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np
import torch

from firekit.data import augment, io
from firekit.core import spatial
from firekit.data.pairs import map_points
from firekit.data.atomic import atomic_write_text
from firekit.data.dataset_folder import read_index, same_or_refuse
from firekit.core.errors import FirekitError
from firekit.data.io import NIFTI_INTENT_VECTOR, itk_field_array, lps_flip, save_nifti

__all__ = [
    "VERSION",
    "LABEL_NAMES",
    "CONTRASTS",
    "FILES",
    "INTENSITY_SCALE",
    "Template",
    "template_affine",
    "template_volumes",
    "subject_generator",
    "build_demo_dataset",
    "demo_subject",
    "load_to_template",
    "template_points",
]

VERSION = 1
LABEL_NAMES = {1: "CSF", 2: "GM", 3: "WM"}
CONTRASTS = ("T1", "T2", "FLAIR")
FILES = tuple(f"{name}.nii.gz" for name in (*CONTRASTS, "labels", "to_template"))
INTENSITY_SCALE = 1000  # images are stored as int16 round(1000 * intensity); 1000 = the T1 template's maximum
SPLITS = ("train", "val", "test")

# Partial-volume weights of (CSF, GM, WM, non-brain head tissue as a fraction of T1).
_MIX = {"T2": (1.0, 0.55, 0.30, 0.6), "FLAIR": (0.08, 0.65, 0.45, 0.6)}
_BRAIN_THRESHOLD = 0.3  # GM + WM above this is brain for the intracranial mask
_CLOSING_MM = 4.0  # closes sulci into the mask
_DILATION_MM = 3.0  # adds the CSF around the brain
_EDGE_MM = 1.0  # Gaussian sigma softening the intracranial mask's edge
_LABEL_THRESHOLD = 0.3  # a voxel is labelled when its largest tissue probability exceeds this
_HEAD_THRESHOLD = 0.05  # T1 above this outside the intracranial mask is non-brain head tissue
_BIAS = 0.15  # multiplicative bias field within +-15 %
_BIAS_SPACING_MM = 80.0  # control-point spacing of the bias field (low frequency)
_NOISE = (0.02, 0.03)  # Rician sigma as a fraction of the 99th percentile
_FIELD_STEP = 1.0 / 1024.0  # mm; the stored mapping is rounded to this so gzip can compress it


class Template(NamedTuple):
    """Noise-free maps on the template grid.

    Attributes:
        maps: name -> ``(X, Y, Z)`` float32: ``T1`` (the real template, 0..1), ``CSF``, ``GM``,
            ``WM`` (probabilities), ``head`` (non-brain tissue, T1 units), ``T2``, ``FLAIR``
            (derived contrasts, 0..1), ``intracranial`` (0..1, 1 mm soft edge).
        labels: ``(X, Y, Z)`` uint8, 0 background, 1 CSF, 2 GM, 3 WM.
        affine: ``(4, 4)`` voxel -> RAS mm of the grid.
        source: where the real maps came from (package and version).
    """

    maps: dict
    labels: np.ndarray
    affine: np.ndarray
    source: str


def _load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(T1, GM, WM) float32 1 mm arrays, their 4x4 affine and a source description."""
    try:
        import nilearn
        from nilearn import datasets
    except ImportError:
        raise FirekitError("the demo data need nilearn (it ships the MNI152 template): pip install nilearn") from None
    images = [loader(resolution=1) for loader in (datasets.load_mni152_template, datasets.load_mni152_gm_template,
                                                  datasets.load_mni152_wm_template)]
    arrays = [np.asarray(image.dataobj, dtype=np.float32) for image in images]
    source = f"nilearn {nilearn.__version__}: MNI ICBM152 2009a nonlinear symmetric T1 template, GM and WM maps"
    return arrays[0], arrays[1], arrays[2], np.asarray(images[0].affine, dtype=np.float64), source


def _check_grid(spacing: float, shape: Sequence[int]) -> tuple[float, tuple[int, int, int]]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise FirekitError(f"shape must be 3 sizes of at least 8 voxels (the template is 3D), got {shape}")
    if not float(spacing) > 0:
        raise FirekitError(f"spacing must be a positive number of mm, got {spacing}")
    return float(spacing), shape


def template_affine(spacing: float = 1.28, shape: Sequence[int] = (128, 160, 128)) -> np.ndarray:
    """The canonical RAS grid ``diag(spacing)`` centred on the brain (centroid of GM + WM).

    Raises :class:`FirekitError` when the brain does not fit the grid.

    Returns:
        ``(4, 4)`` voxel -> RAS mm.
    """
    spacing, shape = _check_grid(spacing, shape)
    _, gm, wm, source_affine, _ = _load_mni152()
    return _centred_affine(gm + wm, source_affine, spacing, shape)


def _centred_affine(brain: np.ndarray, source_affine: np.ndarray, spacing: float, shape) -> np.ndarray:
    """Grid affine centred on the centroid of ``brain`` (source grid), checked to hold the brain."""
    total = float(brain.sum(dtype=np.float64))
    # Centre of mass from the marginal sums (no index arrays of the whole volume).
    index = np.array([np.arange(size) @ brain.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64)
                      for axis, size in enumerate(brain.shape)]) / total
    centroid = source_affine[:3, :3] @ index + source_affine[:3, 3]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centroid - spacing * (np.asarray(shape) - 1) / 2.0
    _check_brain_fits(brain, source_affine, affine, shape)
    return affine


def _distance_mm(mask: np.ndarray, spacing: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(~mask, sampling=spacing)


@functools.lru_cache(maxsize=2)
def _template(spacing: float, shape: tuple[int, int, int]) -> Template:
    from scipy import ndimage

    t1, gm, wm, source_affine, source = _load_mni152()
    affine = _centred_affine(gm + wm, source_affine, spacing, shape)

    # Trilinear resampling: grid voxel -> source voxel is one affine map.
    to_source = torch.from_numpy(np.linalg.inv(source_affine) @ affine).float()
    points = map_points(to_source[None, :3], spatial.voxel_grid(shape))
    stack = torch.from_numpy(np.stack([t1, gm, wm]))[None]
    t1, gm, wm = (channel.clamp(0, 1).numpy() for channel in spatial.sample(stack, points)[0])

    brain = gm + wm
    # Intracranial: brain, closed over the sulci, holes (ventricles) filled, dilated by a few mm.
    dilated = _distance_mm(brain > _BRAIN_THRESHOLD, spacing) <= _CLOSING_MM
    closed = _distance_mm(~dilated, spacing) > _CLOSING_MM
    inside = _distance_mm(ndimage.binary_fill_holes(closed), spacing) <= _DILATION_MM
    # A soft edge (1 mm Gaussian) stands in for partial volume at the outer CSF boundary.
    intracranial = np.clip(ndimage.gaussian_filter(inside.astype(np.float32), _EDGE_MM / spacing), 0.0, 1.0)
    csf = np.clip(intracranial * (1.0 - brain), 0.0, 1.0)
    head = np.where((t1 > _HEAD_THRESHOLD) & ~inside, t1, 0.0)
    maps = {"T1": t1, "CSF": csf, "GM": gm, "WM": wm, "head": head, "intracranial": intracranial}
    maps = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in maps.items()}
    tensor = torch.from_numpy(np.stack([maps[name] for name in ("T1", "CSF", "GM", "WM", "head")]))[None]
    for name, image in _contrasts(tensor).items():
        maps.setdefault(name, image[0, 0].numpy())
    labels = _labels(tensor[:, 1:4])[0, 0].numpy()
    for value in (*maps.values(), labels, affine):
        value.flags.writeable = False  # shared by every caller through the cache
    return Template(maps, labels, affine, source)


def _check_brain_fits(brain: np.ndarray, source_affine: np.ndarray, affine: np.ndarray, shape) -> None:
    index = np.argwhere(brain > _BRAIN_THRESHOLD)
    corners = np.stack([index.min(0), index.max(0)])
    world = corners @ source_affine[:3, :3].T + source_affine[:3, 3]
    voxel = (world - affine[:3, 3]) / np.diag(affine)[:3]
    if voxel.min() < -0.5 or (voxel - (np.asarray(shape) - 0.5)).max() > 0:
        extent = world[1] - world[0] + 1.0
        raise FirekitError(
            f"the brain ({extent[0]:.0f} x {extent[1]:.0f} x {extent[2]:.0f} mm) does not fit a grid of "
            f"{tuple(shape)} voxels of {affine[0, 0]:g} mm; use a larger shape or spacing"
        )


def template_volumes(spacing: float = 1.28, shape: Sequence[int] = (128, 160, 128)) -> Template:
    """Noise-free template maps, labels and affine on the demo grid (cached, read-only arrays)."""
    return _template(*_check_grid(spacing, shape))


# Contrasts the dataset does not store, for held-out tests (bench/gross_failures.py): PD-like.
EXTRA_MIXES = {"PD": (0.90, 0.75, 0.60, 0.6)}


def _contrasts(maps: torch.Tensor, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Noise-free contrasts from maps ``(1, 5, *S)`` = (T1, CSF, GM, WM, head) -> name: ``(1, 1, *S)``;
    ``extra``: more name -> (CSF, GM, WM, head) weights, after the stored ones."""
    out = {"T1": maps[:, 0:1]}
    for name, weights in {**_MIX, **(extra or {})}.items():
        w = torch.tensor(weights, dtype=maps.dtype).reshape(1, 4, 1, 1, 1)
        out[name] = (maps[:, 1:5] * w).sum(1, keepdim=True)
    return out


def _labels(probabilities: torch.Tensor) -> torch.Tensor:
    """(1, 3, *S) CSF/GM/WM probabilities -> (1, 1, *S) uint8 labels 0..3."""
    largest, index = probabilities.max(dim=1, keepdim=True)
    return torch.where(largest > _LABEL_THRESHOLD, index + 1, 0).to(torch.uint8)


def subject_generator(seed: int, index: int) -> torch.Generator:
    """The generator of subject ``index`` of a dataset built with ``seed`` (independent streams)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _bias_and_noise(image: torch.Tensor, spacing: float, generator: torch.Generator) -> torch.Tensor:
    """Smooth multiplicative bias (within +-15 %) then Rician noise; ``(1, 1, *S)`` in, same out."""
    field = augment.smooth_random_field(image.shape[2:], spacing, _BIAS_SPACING_MM, 1, generator)
    biased = image * (1.0 + _BIAS * field / field.abs().max())
    fraction = _NOISE[0] + (_NOISE[1] - _NOISE[0]) * float(torch.rand(1, generator=generator, dtype=torch.float64))
    values = biased.reshape(-1)
    p99 = float(values.kthvalue(max(1, int(round(0.99 * values.numel())))).values)
    noise = torch.randn((2, *image.shape), generator=generator) * (fraction * p99)
    return torch.sqrt((biased + noise[0]) ** 2 + noise[1] ** 2)


def _subject(template: Template, spacing: float, seed: int, index: int,
             extra: dict | None = None) -> dict[str, np.ndarray]:
    """Arrays of one subject: contrasts (int16), labels (uint8), to_template (X, Y, Z, 1, 3) float32.
    ``extra`` contrasts (see :func:`_contrasts`) draw their noise after the stored ones, which are unchanged."""
    generator = subject_generator(seed, index)
    shape = template.labels.shape
    transform = augment.random_transform(shape, spacing, generator, augment.AugmentConfig.mild())
    maps = torch.from_numpy(np.stack([template.maps[n] for n in ("T1", "CSF", "GM", "WM", "head")]))[None]
    warped = spatial.warp(maps, transform.displacement, padding_mode="zeros")
    out = {"labels": _labels(warped[:, 1:4])[0, 0].numpy()}
    for name, image in _contrasts(warped, extra).items():
        noisy = _bias_and_noise(image, spacing, generator)
        out[name] = np.rint(noisy[0, 0].numpy() * INTENSITY_SCALE).astype(np.int16)
    ras = spatial.voxel_to_mm(spatial.normalised_to_voxel(transform.displacement.double()), template.affine.copy())
    lps = ras[0].permute(1, 2, 3, 0).numpy() * lps_flip(3)
    out["to_template"] = itk_field_array(np.rint(lps / _FIELD_STEP) * _FIELD_STEP)
    return out


def demo_subject(index: int, spacing: float = 1.28, shape: Sequence[int] = (128, 160, 128),
                 seed: int = 0, extra: Sequence[str] = ()) -> dict[str, io.Volume]:
    """One subject of the demo dataset, in memory (as ``build_demo_dataset`` would write subject
    ``index`` with ``seed``): ``T1``, ``T2``, ``FLAIR`` and ``labels`` Volumes on the template grid,
    and the ``extra`` contrasts named (keys of :data:`EXTRA_MIXES`, e.g. ``"PD"``)."""
    spacing, shape = _check_grid(spacing, shape)
    unknown = sorted(set(extra) - set(EXTRA_MIXES))
    if unknown:
        raise FirekitError(f"unknown extra contrast(s) {unknown}; choose from {sorted(EXTRA_MIXES)}")
    template = _template(spacing, shape)
    arrays = _subject(template, spacing, seed, index, {name: EXTRA_MIXES[name] for name in extra})
    return {name: io.Volume(arrays[name], template.affine.copy())
            for name in ("T1", "T2", "FLAIR", *extra, "labels")}


def _readme(info: dict) -> str:
    sizes = ", ".join(f"{len(info['splits'][s])} {s}" for s in SPLITS)
    return f"""# firekit demo brain dataset (MNI152-derived)

Built by `firekit.data.braindata.build_demo_dataset` (version {info['version']}, seed {info['seed']}):
{info['subjects']} subjects ({sizes}) on a {' x '.join(map(str, info['shape']))} grid of {info['spacing']:g} mm voxels.

## What is real
- `T1.nii.gz` is the real MNI ICBM152 2009 T1 template (an average of 152 brains, skull-stripped
  as shipped), resampled and warped per subject.
- The grey-matter and white-matter probability maps behind `labels.nii.gz`, `T2.nii.gz` and
  `FLAIR.nii.gz` are the template's real tissue maps.
- Source: {info['source']}.

## What is derived (synthetic)
- CSF = intracranial mask x (1 - GM - WM); the mask is GM + WM closed over the sulci, holes filled,
  dilated {_DILATION_MM:g} mm, with a {_EDGE_MM:g} mm soft edge.
- `labels.nii.gz`: 1 CSF, 2 GM, 3 WM = argmax of the tissue probabilities (warped linearly) where the
  largest exceeds {_LABEL_THRESHOLD}; 0 elsewhere.
- `T2.nii.gz` (T2-like) = partial-volume mix CSF {_MIX['T2'][0]}, GM {_MIX['T2'][1]}, WM {_MIX['T2'][2]};
  `FLAIR.nii.gz` (FLAIR-like) = CSF {_MIX['FLAIR'][0]}, GM {_MIX['FLAIR'][1]}, WM {_MIX['FLAIR'][2]}. They are
  not real scans: no lesions, no vessels, no real T2 or FLAIR physics.
- The subjects are not different people: each is the same template warped by a known mild random
  transform (scale up to 8 %, rotation up to 6 deg, shift up to 5 mm, smooth elastic up to 3 mm),
  with its own multiplicative bias field (within +-{_BIAS * 100:.0f} %) and Rician noise (sigma
  {_NOISE[0] * 100:.0f}-{_NOISE[1] * 100:.0f} % of the 99th percentile) per contrast.
- Intensities are int16 = round({INTENSITY_SCALE} x intensity), 1000 being the T1 template's maximum.

## The true mapping
`to_template.nii.gz` is an ITK displacement field on the subject grid (X, Y, Z, 1, 3), float32, LPS
signs: for the voxel at RAS world point p, the template point is `q = p + [-u0, -u1, u2]` (mm). All
subjects and the template share the affine in `dataset.json`.
"""


_PARAMETERS = ("version", "subjects", "split_sizes", "spacing", "shape", "seed")


def _complete(out: Path, info: dict) -> bool:
    return all((out / split / name / file).is_file()
               for split, names in info["splits"].items() for name in names for file in FILES)


def build_demo_dataset(
    out: str | os.PathLike,
    subjects: int = 10,
    splits: Sequence[int] = (6, 2, 2),
    spacing: float = 1.28,
    shape: Sequence[int] = (128, 160, 128),
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the MNI152-derived demo dataset (T1, T2-like, FLAIR-like, labels, true mapping).

    Idempotent: a folder that already holds a complete dataset with the same parameters is left as
    it is. Deterministic given ``seed``. Files are written atomically, ``dataset.json`` last.

    Args:
        out: output folder; must be empty, absent, or hold a dataset with the same parameters
            (or ``overwrite``: rebuild over it, removing only the files of subjects it listed).
        subjects: number of subjects.
        splits: subjects in (train, val, test), summing to ``subjects``.
        spacing: isotropic voxel size in mm of the template grid (RAS).
        shape: grid size ``(X, Y, Z)``; the brain must fit.
        seed: seeds every subject's transform, bias fields and noise.
        progress: show a tqdm progress bar.
        overwrite: rebuild into a non-empty folder.

    Returns:
        The contents of ``dataset.json``.
    """
    spacing, shape = _check_grid(spacing, shape)
    splits = tuple(int(n) for n in splits)
    if len(splits) != 3 or min(splits) < 0 or sum(splits) != int(subjects) or int(subjects) < 1:
        raise FirekitError(f"splits must be 3 counts (train, val, test) summing to subjects={subjects}, got {splits}")
    out = Path(out)
    names = [f"subj{i:03d}" for i in range(int(subjects))]
    bounds = np.cumsum((0,) + splits)
    info = {
        "name": "firekit MNI152-derived demo dataset",
        "version": VERSION,
        "subjects": int(subjects),
        "split_sizes": list(splits),
        "spacing": spacing,
        "shape": list(shape),
        "seed": int(seed),
        "splits": {split: names[bounds[i]:bounds[i + 1]] for i, split in enumerate(SPLITS)},
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "contrasts": list(CONTRASTS),
        "files": list(FILES),
        "intensity_scale": INTENSITY_SCALE,
        "appearance": augment.AugmentConfig.mild().to_dict(),
        "to_template": "ITK displacement field, LPS signs: q_ras = p_ras + [-u0, -u1, u2] (mm)",
    }
    old = read_index(out / "dataset.json")
    same = same_or_refuse(out, "demo dataset", old, info, _PARAMETERS, overwrite)
    if same and not overwrite and _complete(out, old):
        return old

    template = _template(spacing, shape)
    info["affine"] = template.affine.tolist()
    info["source"] = template.source
    out.mkdir(parents=True, exist_ok=True)
    if old is not None:
        (out / "dataset.json").unlink()  # the folder is incomplete until the new one is written
        _remove_stale(out, old, info)
    atomic_write_text(out / "README.md", _readme(info))

    from tqdm.auto import tqdm

    order = [(split, name) for split in SPLITS for name in info["splits"][split]]
    for index, (split, name) in enumerate(tqdm(order, desc="demo subjects", disable=not progress)):
        arrays = _subject(template, spacing, int(seed), index)
        folder = out / split / name
        for contrast in CONTRASTS:
            save_nifti(arrays[contrast], template.affine, folder / f"{contrast}.nii.gz", dtype=np.int16)
        save_nifti(arrays["labels"], template.affine, folder / "labels.nii.gz", dtype=np.uint8)
        save_nifti(arrays["to_template"], template.affine, folder / "to_template.nii.gz", dtype=np.float32,
                   intent=NIFTI_INTENT_VECTOR)
    atomic_write_text(out / "dataset.json", json.dumps(info, indent=2) + "\n")
    return info


def _remove_stale(out: Path, old: dict, info: dict) -> None:
    """Delete the files of subjects an earlier build listed that this build does not write there."""
    keep = {(split, name) for split, names in info["splits"].items() for name in names}
    for split, names in (old.get("splits") or {}).items():
        for name in names:
            if (split, name) in keep:
                continue
            folder = out / str(split) / str(name)
            for file in FILES:
                (folder / file).unlink(missing_ok=True)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def load_to_template(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``to_template.nii.gz`` as RAS displacements.

    Returns:
        ``(X, Y, Z, 3)`` float64 ``q_ras - p_ras`` in mm, and the grid's ``(4, 4)`` affine.
    """
    path = Path(path)
    if not path.is_file():
        raise FirekitError(f"{path}: mapping not found; build the dataset with build_demo_dataset")
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim != 5 or data.shape[3:] != (1, 3):
        raise FirekitError(f"{path}: expected an ITK displacement field of shape (X, Y, Z, 1, 3), got {data.shape}")
    return data[:, :, :, 0, :] * lps_flip(3), np.asarray(image.affine, dtype=np.float64)


def template_points(subject_dir: str | os.PathLike) -> np.ndarray:
    """Template RAS point (mm) of every voxel of a subject: ``(X, Y, Z, 3)`` float64."""
    displacement, affine = load_to_template(Path(subject_dir) / "to_template.nii.gz")
    index = np.indices(displacement.shape[:3]).transpose(1, 2, 3, 0)
    return index @ affine[:3, :3].T + affine[:3, 3] + displacement
