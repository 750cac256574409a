"""ITK image formats through SimpleITK: NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``)
and DICOM series folders (read only).

SimpleITK is imported on first use (``pip install 'firekit[itk]'``). ITK places an image in LPS
millimetres by origin, spacing and an orthonormal direction; firekit's affines are nibabel's RAS,
so the two differ by the signs of x and y: ``affine_ras = diag(-1, -1, 1, 1) @ affine_lps``.
Arrays here are in NIfTI voxel order ``(X, Y[, Z])`` (ITK's index order), vector components last.
"""

from __future__ import annotations

import locale
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from firekit.data.atomic import atomic_files, atomic_path
from firekit.core.errors import FirekitError

__all__ = ["ITK_SUFFIXES", "is_itk", "data_file", "require", "read", "write", "affine_from_itk", "itk_geometry"]

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
# header + data formats: SimpleITK names the (compressed) data file after the header
_DATA_SUFFIX = {".mhd": ".zraw", ".nhdr": ".raw.gz"}
_FORMAT = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}


def is_itk(path: str | os.PathLike) -> bool:
    """True for a path SimpleITK reads here: an ITK suffix, or a folder (a DICOM series)."""
    path = Path(path)
    return path.suffix.lower() in ITK_SUFFIXES or path.is_dir()


def _kind(path: Path) -> str:
    return "DICOM series" if path.is_dir() else _FORMAT.get(path.suffix.lower(), "ITK image")


def data_file(path: str | os.PathLike) -> Path | None:
    """The data file written beside an ``.mhd``/``.nhdr`` header (None for one-file formats)."""
    path = Path(path)
    suffix = _DATA_SUFFIX.get(path.suffix.lower())
    return None if suffix is None else path.with_name(path.stem + suffix)


def require(path: str | os.PathLike, action: str = "reading"):
    """The SimpleITK module, or a one-line :class:`FirekitError` naming ``path`` and the fix."""
    try:
        import SimpleITK
    except ImportError:
        raise FirekitError(f"{path}: {action} {_kind(Path(path))} files needs SimpleITK, which is not installed; "
                           "pip install 'firekit[itk]' (or save the file as .nii.gz)") from None
    return SimpleITK


def _flip(n: int) -> np.ndarray:
    """``(n + 1, n + 1)`` sign change between RAS and LPS (its own inverse)."""
    return np.diag([-1.0, -1.0, 1.0][:n] + [1.0])


def affine_from_itk(origin, spacing, direction) -> np.ndarray:
    """``(n + 1, n + 1)`` voxel -> RAS mm affine of an ITK geometry (LPS origin, spacing, row-major direction)."""
    n = len(origin)
    lps = np.eye(n + 1)
    lps[:n, :n] = np.asarray(direction, dtype=np.float64).reshape(n, n) * np.asarray(spacing, dtype=np.float64)
    lps[:n, n] = origin
    return _flip(n) @ lps


def itk_geometry(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """ITK's (origin, spacing, row-major direction), LPS, of an ``(n + 1, n + 1)`` RAS affine."""
    affine = np.asarray(affine, dtype=np.float64)
    n = affine.shape[0] - 1
    lps = _flip(n) @ affine
    spacing = np.sqrt((lps[:n, :n] ** 2).sum(axis=0))
    direction = lps[:n, :n] / spacing
    return tuple(lps[:n, n]), tuple(spacing), tuple(direction.ravel())


def _reason(exc: BaseException) -> str:
    """ITK's reason in one short line (its first line only says where the exception was thrown)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception thrown"):
        lines = lines[1:]
    line = lines[0] if lines else type(exc).__name__
    return re.sub(r"^(sitk::ERROR|ITK ERROR):\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", line)[:160]


@contextmanager
def _quiet(sitk) -> Iterator[None]:
    """ITK's warnings off and its C++ stderr (MetaIO's parse messages) dropped, so that a bad file
    answers in firekit's one line; the caller's settings, stderr and locale are restored (GDCM's
    DICOM reader sets the C locale, which turned the process's text encoding to ASCII)."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    saved_locale = locale.setlocale(locale.LC_ALL)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sitk.ProcessObject.SetGlobalWarningDisplay(before)
        locale.setlocale(locale.LC_ALL, saved_locale)


def _read_image(path: Path, what: str, sitk):
    """The ``sitk.Image`` of a file, or of the one DICOM series in a folder."""
    if not path.is_dir():
        return sitk.ReadImage(str(path))
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise FirekitError(f"{path}: is a directory with no DICOM series; pass a folder holding the DICOM files "
                           f"of one series as the {what}, or a single file (.nii.gz, .nrrd, .mha)")
    if len(series) > 1:
        raise FirekitError(f"{path}: holds {len(series)} DICOM series; pass a folder with one series in it")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
    return reader.Execute()


def read(path: str | os.PathLike, what: str = "image") -> tuple[np.ndarray, np.ndarray, int]:
    """Read an ITK image file or a DICOM series folder.

    Returns:
        ``(data, affine, components)``: data ``(X, Y[, Z[, T]])`` in voxel order, or
        ``(X, Y[, Z], c)`` for a vector image; ``affine`` the ``(4, 4)`` voxel -> RAS mm affine of
        the first three axes (a 2D image gets the identity along z, like a 2D NIfTI); ``components``
        the values per voxel (1 for a scalar image).
    """
    path = Path(path)
    sitk = require(path, "reading")
    try:
        with _quiet(sitk):
            image = _read_image(path, what, sitk)
            array = sitk.GetArrayFromImage(image)
    except FirekitError:
        raise
    except Exception as exc:  # RuntimeError from ITK: unknown format, truncated data, bad header
        raise FirekitError(f"{path}: cannot read as {_kind(path)} ({_reason(exc)}); re-export the file") from None
    n, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    spatial = tuple(reversed(range(n)))
    data = array.transpose(spatial + ((n,) if components > 1 else ()))
    m = min(n, 3)
    direction = np.asarray(image.GetDirection()).reshape(n, n)[:m, :m]
    affine = affine_from_itk(image.GetOrigin()[:m], image.GetSpacing()[:m], direction.ravel())
    if m == 2:
        affine = np.insert(np.insert(affine, 2, 0.0, axis=0), 2, 0.0, axis=1)
        affine[2, 2] = 1.0
    return np.ascontiguousarray(data), affine, components


def write(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, vector: bool = False) -> Path:
    """Write an n-D image (gzip-compressed) in the format of ``path``'s suffix, atomically.

    Args:
        data: ``(*S)`` scalar or ``(*S, c)`` vector (``vector``) array in voxel order, n = len(S)
            given by ``affine``; singleton axes after S are dropped (ITK field layouts).
        affine: ``(n + 1, n + 1)`` voxel -> RAS mm; written as ITK's LPS origin, spacing, direction.
        path: ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` (the last two of each pair add a data file).
    """
    path = Path(path)
    sitk = require(path, "writing")
    n = np.asarray(affine).shape[0] - 1
    data = np.asarray(data)
    spatial = data.shape[:n]
    data = data.reshape(*spatial, -1) if vector else data.reshape(spatial)
    order = tuple(reversed(range(n))) + ((n,) if vector else ())
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(order)), isVector=vector)
    origin, spacing, direction = itk_geometry(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    writer = atomic_files(path) if data_file(path) is not None else atomic_path(path, suffix=f".tmp{path.suffix}")
    with writer as tmp, _quiet(sitk):
        try:
            sitk.WriteImage(image, tmp, True)
        except RuntimeError as exc:
            raise FirekitError(f"{path}: cannot write {_kind(path)} ({_reason(exc)})") from None
    return path
