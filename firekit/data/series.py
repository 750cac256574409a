"""Cardiac cine series on disk: a 4D NIfTI as :class:`Series` (frames ``(*S, T)`` with their affine).

A :class:`Series` is an array ``(*S, T)`` (phases last, as in a 4D NIfTI) with the spatial
``(n + 1, n + 1)`` voxel-to-world affine of its frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from firekit.core.errors import FirekitError
from firekit.data import io

__all__ = ["Series", "load_series", "save_series"]


@dataclass
class Series:
    """A cine series: ``data`` ``(*S, T)`` (n = 2 or 3 spatial axes, phases last) and the frames'
    ``(n + 1, n + 1)`` affine (RAS mm); ``header`` and ``path`` as in :class:`io.Volume`."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = field(default=None, repr=False)
    path: Path | None = None

    def __post_init__(self):
        if self.data.ndim not in (3, 4):
            raise FirekitError(f"{self.name}: a cine series is (*spatial, phases) with 2 or 3 spatial axes, "
                               f"got shape {self.data.shape}")
        n = self.data.ndim - 1
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (n + 1, n + 1):
            raise FirekitError(f"{self.name}: affine must be {(n + 1, n + 1)} for {n}D frames, got {self.affine.shape}")

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "series"

    @property
    def ndim(self) -> int:
        """Spatial dimensions of a frame."""
        return self.data.ndim - 1

    @property
    def phases(self) -> int:
        return self.data.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of a frame."""
        return tuple(self.data.shape[:-1])

    def phase(self, index: int) -> io.Volume:
        """Frame ``index`` (0-based) as a Volume."""
        if not -self.phases <= index < self.phases:
            raise FirekitError(f"{self.name}: phase {index} does not exist (0..{self.phases - 1})")
        return io.Volume(np.ascontiguousarray(self.data[..., index]), self.affine.copy(), self.header)


def load_series(path: str | os.PathLike, what: str = "cine series") -> Series:
    """Load a 4D NIfTI ``(X, Y, Z, T)`` (a single-slice series ``(X, Y, 1, T)`` becomes 2D + time).

    Raises :class:`FirekitError` (one line naming the file) when it is not 4D, unreadable, has
    NaN/Inf voxels or a constant phase.
    """
    path = Path(path)
    image = io._load_image(path, what)
    data = io._read_array(image, path, np.float32)
    if data.ndim != 4:
        raise FirekitError(f"{path}: {what} has shape {data.shape}; expected a 4D (X, Y, Z, phases) NIfTI; "
                           "for one frame use register")
    if data.shape[3] < 2:
        raise FirekitError(f"{path}: {what} has {data.shape[3]} phase; a cine series needs at least 2")
    if not np.isfinite(data).all():
        raise FirekitError(f"{path}: {int((~np.isfinite(data)).sum())} NaN/Inf voxels; replace them first")
    flat = data.reshape(-1, data.shape[3])
    constant = np.flatnonzero(flat.min(axis=0) == flat.max(axis=0))
    if constant.size:
        which = "every phase is" if constant.size == data.shape[3] else f"phase {int(constant[0])} (0-based) is"
        raise FirekitError(f"{path}: {which} constant; nothing to register (check it is the right file)")
    ndim = 2 if data.shape[2] == 1 else 3
    if ndim == 2:
        data = data[:, :, 0, :]
    return Series(data, io.nd_affine(image.affine, ndim), image.header.copy(), path)


def save_series(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, header=None, dtype=None,
                intent: int | None = None, protect=()) -> Path:
    """Write ``(*S, T)`` (or ``(*S, T, n)`` for a series of vector fields) as one NIfTI, atomically.

    2D frames are written as ``(X, Y, 1, T)``; a field series as ``(X, Y, Z, T, n)``.
    """
    data = np.asarray(data)
    spatial = affine.shape[0] - 1
    if spatial == 2:
        data = data[:, :, None]
    return io.save_nifti(data, affine, path, header=header, dtype=dtype, intent=intent, protect=protect)
