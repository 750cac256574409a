"""NIfTI reader: ``.nii`` / ``.nii.gz`` files as image or labels layers placed by their affine."""

from __future__ import annotations

from pathlib import Path

from firekit.explain.layers import read_nifti

SUFFIXES = (".nii", ".nii.gz")


def napari_get_reader(path):
    """The reader for a NIfTI path (or a list of them), else None (napari tries other readers)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(str(p).lower().endswith(SUFFIXES) for p in paths):
        return None
    return read


def read(path) -> list:
    """Layer data tuples of one or several NIfTI files."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [layer for p in paths for layer in read_nifti(Path(p))]
