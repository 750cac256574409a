"""Images in and out, keeping affines and headers; one-line errors; atomic writes.

NIfTI (``.nii``, ``.nii.gz``) goes through nibabel; NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and DICOM series folders through SimpleITK (:mod:`firekit.data.itk_io`, the
``firekit[itk]`` extra), chosen by the path: its suffix, or a folder for DICOM.

This module (with :mod:`firekit.data.pairs` and :mod:`firekit.registration.pipeline`) is where millimetres and
voxel-to-world affines live. Inside, an n-D image is a :class:`Volume`: its array in NIfTI voxel
order, and its ``(n + 1, n + 1)`` voxel-to-world affine (RAS+ mm, nibabel's convention). A 2D image
may be stored as ``(X, Y)`` or ``(X, Y, 1)``; both load as 2D, and 2D uses the in-plane block of the
file's 4x4 affine (the same 2D physical space ITK/SimpleITK read from such a file).
"""

from __future__ import annotations

import gzip
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import nibabel as nib
import numpy as np

from firekit.data import itk_io
from firekit.data.atomic import atomic_path
from firekit.core.errors import FirekitError

__all__ = [
    "Volume",
    "load_volume",
    "load_labels",
    "load_field",
    "read_field",
    "save_nifti",
    "save_volume",
    "check_output_path",
    "check_output_folder",
    "check_output_file",
    "all_or_nothing",
    "nd_affine",
    "affine_4x4",
    "spacing",
    "canonical_orientation",
    "to_canonical",
    "from_canonical",
    "normalise_intensity",
    "NIFTI_INTENT_VECTOR",
    "lps_flip",
    "itk_field_array",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + itk_io.ITK_SUFFIXES
NIFTI_INTENT_VECTOR = 1007


@dataclass
class Volume:
    """An image or label map with its geometry.

    Attributes:
        data: ``(*spatial)`` array in voxel order (2 or 3 spatial dims).
        affine: ``(n + 1, n + 1)`` voxel index -> world mm (RAS+), n = ``data.ndim``.
        header: the NIfTI header it came with (None for arrays; for an ITK file, a header holding
            its 4x4 affine, so that NIfTI outputs of a 2D slice keep its place along z).
        path: the file it came from (None for arrays).
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = field(default=None, repr=False)
    path: Path | None = None

    def __post_init__(self):
        n = self.data.ndim
        if n not in (2, 3):
            raise FirekitError(f"{self.name}: expected a 2D or 3D image, got array shape {self.data.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (n + 1, n + 1):
            raise FirekitError(f"{self.name}: affine must be {(n + 1, n + 1)} for a {n}D image, got {self.affine.shape}")

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis."""
        return spacing(self.affine)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "array"

    def with_data(self, data: np.ndarray) -> "Volume":
        """Same geometry and header, new array (same spatial shape)."""
        if data.shape[: self.ndim] != self.shape:
            raise ValueError(f"new data shape {data.shape} does not match {self.shape}")
        return replace(self, data=data, path=None)


def spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) of an ``(n + 1, n + 1)`` affine: column norms of its linear part."""
    affine = np.asarray(affine, dtype=np.float64)
    n = affine.shape[0] - 1
    return np.sqrt((affine[:n, :n] ** 2).sum(axis=0))


def nd_affine(affine4: np.ndarray, ndim: int) -> np.ndarray:
    """The ``(n + 1, n + 1)`` affine of an n-D image from a NIfTI 4x4 (2D: the in-plane block)."""
    affine4 = np.asarray(affine4, dtype=np.float64)
    if ndim == 3:
        return affine4.copy()
    keep = [0, 1, 3]
    return affine4[np.ix_(keep, keep)].copy()


def affine_4x4(affine: np.ndarray, template4: np.ndarray | None = None) -> np.ndarray:
    """NIfTI 4x4 from an n-D affine; 2D keeps the third row/column of ``template4`` (default identity)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (4, 4):
        return affine.copy()
    if affine.shape != (3, 3):
        raise ValueError(f"affine must be 3x3 (2D) or 4x4 (3D), got {affine.shape}")
    out = np.eye(4) if template4 is None else np.asarray(template4, dtype=np.float64).copy()
    keep = [0, 1, 3]
    out[np.ix_(keep, keep)] = affine
    out[:2, 2] = 0.0 if template4 is None else out[:2, 2]
    return out


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _load_image(path: str | os.PathLike, what: str) -> nib.Nifti1Image:
    path = Path(path)
    if not path.exists():
        raise FirekitError(f"{path}: {what} not found; check the path")
    if path.is_dir():
        raise FirekitError(f"{path}: is a directory; pass a .nii or .nii.gz {what} file")
    if not _is_nifti(path):
        raise FirekitError(f"{path}: not a NIfTI file (.nii or .nii.gz); convert it first (e.g. dcm2niix)")
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel ImageFileError, gzip/zlib errors, bad headers
        raise FirekitError(f"{path}: cannot read as NIfTI ({_first_line(exc)}); re-export the file") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise FirekitError(f"{path}: not a NIfTI image; convert it to .nii.gz")
    return image


def _read(path: Path, what: str, dtype) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """``(array in voxel order, 4x4 RAS affine, header)`` of a NIfTI or ITK file or DICOM folder."""
    if not path.exists():
        raise FirekitError(f"{path}: {what} not found; check the path")
    if not (_is_nifti(path) or itk_io.is_itk(path)):
        raise FirekitError(f"{path}: not a NIfTI file (.nii or .nii.gz) nor an ITK image (.nrrd, .nhdr, .mha, "
                           ".mhd, a DICOM series folder); convert it first (e.g. dcm2niix)")
    if _is_nifti(path):
        image = _load_image(path, what)
        return _read_array(image, path, dtype), image.affine, image.header.copy()
    data, affine, components = itk_io.read(path, what)
    if components > 1:
        raise FirekitError(f"{path}: {what} has {components} values per voxel (a vector or colour image); "
                           "pass a scalar image")
    return data.astype(dtype, copy=False), affine, _affine_header(affine)


def _affine_header(affine4: np.ndarray) -> nib.Nifti1Header:
    """A NIfTI header carrying ``affine4`` (what a NIfTI output on this grid starts from)."""
    header = nib.Nifti1Header()
    header.set_sform(affine4, code=1)
    return header


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _read_array(image: nib.Nifti1Image, path: Path, dtype) -> np.ndarray:
    try:
        return np.asarray(image.dataobj, dtype=dtype)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise FirekitError(f"{path}: file is truncated or corrupt ({_first_line(exc)}); re-export or re-download it") from None


def _spatial_array(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Squeeze to 2D/3D: (X, Y, 1) -> 2D; trailing singleton time/component axes dropped."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise FirekitError(
            f"{path}: {what} has shape {array.shape} (4D or more) where a 2D/3D image is expected; "
            "pass one volume (for cardiac cine use register-cine)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim < 2 or min(array.shape) < 2:
        raise FirekitError(f"{path}: {what} has shape {array.shape}; need at least 2 voxels along 2 axes")
    return array


def load_volume(path: str | os.PathLike, what: str = "image", allow_nonfinite: bool = False) -> Volume:
    """Load a 2D or 3D image (NIfTI, NRRD, MetaImage or a DICOM series folder) as float32, keeping
    its affine (RAS mm) and header.

    Raises :class:`FirekitError` (one line, naming the file) for a missing, unreadable, truncated or
    4D file, and for NaN/Inf voxels unless ``allow_nonfinite``.
    """
    path = Path(path)
    array, affine4, header = _read(path, what, np.float32)
    data = _spatial_array(array, path, what)
    if not allow_nonfinite and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise FirekitError(f"{path}: {bad} NaN/Inf voxels; replace them (e.g. with 0) before registering")
    return Volume(data, nd_affine(affine4, data.ndim), header, path)


def load_labels(path: str | os.PathLike, what: str = "label map", allow_empty: bool = True) -> Volume:
    """Load an integer label map (values rounded to int32).

    ``allow_empty`` False refuses a map with no label > 0 (nothing to warp or score: usually the
    wrong file, e.g. an empty mask exported by mistake).
    """
    path = Path(path)
    array, affine4, header = _read(path, what, np.float64)
    data = _spatial_array(array, path, what)
    if not np.isfinite(data).all():
        raise FirekitError(f"{path}: label map has NaN/Inf values; labels must be integers")
    rounded = np.rint(data)
    if np.abs(rounded - data).max() > 1e-3:
        raise FirekitError(f"{path}: label map has non-integer values; pass an integer segmentation")
    if not allow_empty and not (rounded > 0).any():
        raise FirekitError(f"{path}: {what} is empty (no label > 0); pass a segmentation with labels, or leave it out")
    return Volume(rounded.astype(np.int32), nd_affine(affine4, data.ndim), header, path)


def load_field(path: str | os.PathLike, grid: Volume) -> np.ndarray:
    """Load an ITK displacement field on ``grid`` as ``(*grid.shape, n)`` mm (LPS).

    NIfTI: ``(X, Y[, Z], 1, n)``; NRRD/MetaImage: a vector image of n components on the grid.
    """
    path = Path(path)
    field, _ = read_field(path, grid.ndim)
    if field.shape[:-1] != grid.shape:
        raise FirekitError(f"{path}: field grid {field.shape[:-1]} differs from {grid.name} {grid.shape}")
    return field


def read_field(path: str | os.PathLike, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An ITK n-D displacement field file (firekit's ``--field``, ANTs' ``*Warp.nii.gz``) on its own grid.

    Returns:
        ``(field, affine)``: ``(*S, n)`` float32 mm (LPS) and the grid's ``(n + 1, n + 1)`` voxel -> RAS mm.
    """
    path = Path(path)
    reader = _itk_field if itk_io.is_itk(path) and path.exists() else _nifti_field
    field, affine4 = reader(path, n)
    if not np.isfinite(field).all():
        raise FirekitError(f"{path}: field has NaN/Inf values; re-run the registration")
    return field, nd_affine(affine4, n)


def _nifti_field(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(*S, n)`` of a NIfTI ITK field ``(X, Y, Z, 1, n)``, and its 4x4 affine."""
    image = _load_image(path, "displacement field")
    data = _read_array(image, path, np.float32)
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != n or (n == 2 and data.shape[2] != 1):
        raise FirekitError(
            f"{path}: shape {data.shape} is not an ITK {n}D displacement field (X, Y, {'1' if n == 2 else 'Z'}, 1, {n}); "
            "pass the --field written by firekit register"
        )
    return (data[:, :, :, 0, :] if n == 3 else data[:, :, 0, 0, :]), image.affine


def _itk_field(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(*S, n)`` of a vector image (a 2D field stored as one slice of a 3D image is squeezed), and its 4x4 affine."""
    data, affine4, components = itk_io.read(path, "displacement field")
    if n == 2 and data.ndim == 4 and data.shape[2] == 1:
        data = data[:, :, 0]
    if components != n or data.ndim != n + 1:
        raise FirekitError(f"{path}: a {data.ndim - (components > 1)}D image with {components} values per voxel "
                           f"is not an ITK {n}D displacement field ({n} components); pass the --field written "
                           "by firekit register")
    return data.astype(np.float32, copy=False), affine4


def lps_flip(n: int) -> np.ndarray:
    """Signs taking an n-vector between nibabel's RAS world and ITK's LPS (its own inverse)."""
    return np.array([-1.0, -1.0, 1.0][:n])


def itk_field_array(displacement: np.ndarray) -> np.ndarray:
    """``(*S, n)`` displacement (mm, LPS) -> the NIfTI layout ITK reads as a displacement field.

    3D: ``(X, Y, Z, 1, 3)``; 2D: ``(X, Y, 1, 1, 2)``. Save with ``intent=NIFTI_INTENT_VECTOR``.
    """
    n = displacement.shape[-1]
    spatial_shape = displacement.shape[:-1] + (1,) * (3 - n)
    return np.ascontiguousarray(displacement.reshape(*spatial_shape, 1, n).astype(np.float32))


def _check_parent(path: Path, fix: str) -> None:
    """Refuse an output whose folder cannot be made or written (a file in the way, no permission)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FirekitError(f"{path}: {parent} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FirekitError(f"{path}: folder {parent} is not writable; {fix}")


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output path that is (or resolves to) an input, a folder, or in a folder that
    cannot hold it (a file in the way, no write permission)."""
    path = Path(path)
    target = path.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item)
        if target == source.resolve() or (path.exists() and source.exists() and path.samefile(source)):
            raise FirekitError(f"{path}: output would overwrite an input; choose another --out path")
    if path.is_dir():
        raise FirekitError(f"{path}: is a directory; give a file name")
    _check_parent(path, "choose another output path")
    return path


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """:func:`check_output_file` for an image output: the name must end in .nii or .nii.gz, or in an
    ITK suffix (.nrrd, .nhdr, .mha, .mhd; SimpleITK must then be installed)."""
    path = Path(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise FirekitError(f"{path}: output name must end in .nii or .nii.gz (or .nrrd, .nhdr, .mha, .mhd)")
    if path.is_dir():
        raise FirekitError(f"{path}: is a directory; give a file name ending in .nii.gz")
    if not _is_nifti(path):
        itk_io.require(path, "writing")
        _check_data_file(path, inputs)
    return check_output_file(path, inputs)


def _check_data_file(path: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse a header + data output (.mhd, .nhdr) whose data file could be an input's."""
    data = itk_io.data_file(path)
    if data is None:
        return
    for item in inputs:
        if item is None:
            continue
        source = Path(item)
        same_stem = source.parent.resolve() == path.parent.resolve() and source.stem == path.stem
        if data.resolve() == source.resolve() or (same_stem and itk_io.data_file(source) is not None):
            raise FirekitError(f"{path}: its data file {data.name} could overwrite input {source}'s; "
                               "choose another output name")


def check_output_folder(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output folder that is an existing file (e.g. an input) or that cannot be created."""
    path = Path(path)
    for item in inputs:
        if item is not None and path.resolve() == Path(item).resolve():
            raise FirekitError(f"{path}: --out is an input; give a folder for the outputs")
    if path.exists() and not path.is_dir():
        raise FirekitError(f"{path}: is a file; --out takes a folder (created if missing)")
    _check_parent(path / "x", "choose another --out folder")
    return path


@contextmanager
def all_or_nothing(outputs: Iterable[str | os.PathLike | None]) -> Iterator[None]:
    """Writes of a set of outputs that land together or not at all.

    Each write is atomic on its own; if the block fails part-way (a later write, a disk error,
    Ctrl-C), the outputs it already wrote are removed, so no half set of results is left behind.
    An output that existed before the block and was not rewritten is kept.
    """
    paths = [Path(p) for p in outputs if p is not None]
    paths += [data for p in paths if (data := itk_io.data_file(p)) is not None]  # .mhd/.nhdr data files
    before = {p: _identity(p) for p in paths}
    try:
        yield
    except BaseException:
        for path in paths:
            if _identity(path) not in (None, before[path]):
                path.unlink(missing_ok=True)
        raise


def _identity(path: Path):
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    header: nib.Nifti1Header | None = None,
    dtype=None,
    intent: int | None = None,
    protect: Sequence[str | os.PathLike | None] = (),
) -> Path:
    """Write an image atomically (temp file in the same folder, then rename).

    Args:
        data: array in voxel order (2D arrays are written as ``(X, Y, 1)`` in NIfTI).
        affine: ``(3, 3)`` (2D) or ``(4, 4)`` voxel-to-world (RAS+ mm); a 2D affine keeps the third
            row/column of ``header``'s affine when a header is given (NIfTI only).
        path: ``.nii`` or ``.nii.gz``, or ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` (written by
            SimpleITK with the same geometry; 2D data as a 2D image, a vector ``intent`` as a vector
            image); never one of ``protect`` (the inputs).
        header: header to start from (its dims, dtype and scaling are reset).
        dtype: on-disk dtype (default: the array's).
        intent: NIfTI intent code, e.g. :data:`NIFTI_INTENT_VECTOR` for displacement fields.
    """
    path = check_output_path(path, protect)
    data = np.asarray(data)
    if not _is_nifti(path):
        vector = intent == NIFTI_INTENT_VECTOR
        return itk_io.write(data.astype(dtype) if dtype is not None else data, affine, path, vector=vector)
    if data.ndim == 2:
        data = data[:, :, None]
    template = header.get_best_affine() if header is not None else None
    affine4 = affine_4x4(affine, template)
    new_header = header.copy() if header is not None else nib.Nifti1Header()
    image = nib.Nifti1Image(data.astype(dtype) if dtype is not None else data, affine4, new_header)
    image.set_data_dtype(dtype if dtype is not None else data.dtype)
    image.header.set_slope_inter(None, None)
    image.set_qform(affine4, code=1)
    image.set_sform(affine4, code=1)
    image.header.set_xyzt_units("mm", "sec")
    if intent is not None:
        image.header.set_intent(intent)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=f".tmp{suffix}") as tmp:  # nibabel picks gzip by extension
        nib.save(image, tmp)
    return path


def save_volume(volume: Volume, path: str | os.PathLike, dtype=None, protect=()) -> Path:
    """Write a :class:`Volume` keeping its header (see :func:`save_nifti`; ITK suffixes too)."""
    return save_nifti(volume.data, volume.affine, path, header=volume.header, dtype=dtype, protect=protect)


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation array taking the voxel axes of ``affine`` to RAS+ (or RA+ in 2D)."""
    return nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))


def to_canonical(volume: Volume) -> Volume:
    """Reorder/flip voxel axes so they run R, A(, S) (no resampling, the world is unchanged)."""
    ornt = canonical_orientation(volume.affine)
    data = nib.orientations.apply_orientation(volume.data, ornt)
    inv = nib.orientations.inv_ornt_aff(ornt, volume.shape)
    return replace(volume, data=np.ascontiguousarray(data), affine=volume.affine @ inv, path=None)


def from_canonical(data: np.ndarray, original: Volume) -> np.ndarray:
    """Bring an array in ``to_canonical(original)``'s voxel order back to ``original``'s."""
    ornt = canonical_orientation(original.affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")[: original.ndim]), ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, back))


def normalise_intensity(data: np.ndarray, low: float = 0.5, high: float = 99.5, name: str = "image") -> np.ndarray:
    """Map the ``low``..``high`` percentiles to [-1, 1] and clip (the network's range).

    Raises :class:`FirekitError` for a constant image (nothing to register).
    """
    values = np.asarray(data, dtype=np.float32)
    lo, hi = np.percentile(values, [low, high])
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            raise FirekitError(f"{name}: image is constant ({lo:g}); nothing to register (check it is the right file)")
    return np.clip((values - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
