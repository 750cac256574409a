"""Apply saved transforms (firekit's, ANTs', ITK's) to an image or label map on a reference grid.

Every transform maps a point of the reference (fixed) image to a point of the input (moving) image,
in physical space (ITK's convention; files hold LPS mm, firekit's affines inside are RAS). A list
``[T1, T2, ..., Tk]`` composes as antsApplyTransforms' ``-t`` list (and ``ants.apply_transforms``'
``transformlist``) does: ANTs' "the last transform is applied first" speaks of the *image* (the
last moves the input first); for the *points* that means the FIRST one maps the reference points
first, ``input point = Tk(...T2(T1(x)))``. ANTs' ``fwdtransforms`` ``[*Warp.nii.gz,
*GenericAffine.mat]`` are in that order already (point = affine(warp(x)), tested against
``ants.apply_transforms``).

Formats: displacement fields (firekit ``register --field``, ANTs' ``*Warp.nii.gz``; any NIfTI / NRRD /
MetaImage ITK vector field, on its own grid) and affines (ITK text ``.tfm``/``.txt`` holding one
``AffineTransform`` or ``MatrixOffsetTransformBase``, firekit ``register --affine``; ANTs' ``.mat``,
the same transform in Matlab v4 format).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from firekit.registration import fields
from firekit.data import io
from firekit.core import spatial
from firekit.data.pairs import map_points
from firekit.core.errors import FirekitError

__all__ = ["AffineTransform", "FieldTransform", "read_transform", "read_affine", "apply_transforms", "apply_files",
           "INTERPOLATIONS"]

INTERPOLATIONS = ("linear", "nearest", "label")
AFFINE_SUFFIXES = (".tfm", ".txt", ".mat")
_ITK_AFFINE = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_(\d)_(\d)$")


@dataclass
class AffineTransform:
    """A world map ``x -> matrix @ x``: ``matrix`` ``(n + 1, n + 1)``, RAS mm, reference -> input points."""

    matrix: np.ndarray
    name: str = "affine"

    @property
    def ndim(self) -> int:
        return self.matrix.shape[0] - 1

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """``(1, n, *S)`` RAS mm -> ``(1, n, *S)`` RAS mm."""
        return map_points(torch.as_tensor(self.matrix[:self.ndim], dtype=points.dtype)[None], points)


@dataclass
class FieldTransform:
    """``x -> x + flip(u(x))``: ``field`` ``(*S, n)`` mm (LPS) on the grid ``affine`` ``(n + 1, n + 1)``.

    Outside its grid the field takes its nearest border value (ITK's displacement field transform).
    """

    field: np.ndarray
    affine: np.ndarray
    name: str = "field"

    @property
    def ndim(self) -> int:
        return self.field.shape[-1]

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """``(1, n, *S)`` RAS mm -> ``(1, n, *S)`` RAS mm."""
        voxels = fields.world_to_voxels(points, self.affine)
        u_ras = fields.ras_displacement(self.field).to(points.dtype)
        return points + spatial.sample(u_ras, voxels, mode="linear", padding_mode="border")


def _matrix_offset(params: np.ndarray, fixed: np.ndarray, n: int, path: Path) -> np.ndarray:
    """ITK ``MatrixOffsetTransformBase`` parameters (LPS: ``A`` row-major, translation; centre) -> RAS
    ``(n + 1, n + 1)``: ``y = A (x - c) + t + c``."""
    params, fixed = np.asarray(params, np.float64).ravel(), np.asarray(fixed, np.float64).ravel()
    if params.size != n * n + n or fixed.size not in (0, n):
        raise FirekitError(f"{path}: an ITK {n}D affine has {n * n + n} parameters and {n} fixed parameters, "
                           f"got {params.size} and {fixed.size}; re-export the transform")
    centre = fixed if fixed.size else np.zeros(n)
    linear = params[:n * n].reshape(n, n)
    lps = np.eye(n + 1)
    lps[:n, :n] = linear
    lps[:n, n] = params[n * n:] + centre - linear @ centre
    flip = np.diag([*io.lps_flip(n), 1.0])
    return flip @ lps @ flip


def _itk_text(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """``(transform type, parameters, fixed parameters)`` of an ITK text transform file holding one transform."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise FirekitError(f"{path}: not an ITK text transform file; pass a .tfm/.txt from ITK or a .mat from ANTs") from None
    fields: dict[str, list[str]] = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("Transform", "Parameters", "FixedParameters"):
            fields.setdefault(key.strip(), []).append(value.strip())
    kinds = [k for k in fields.get("Transform", []) if not k.startswith("CompositeTransform")]
    if len(kinds) != 1 or len(fields.get("Parameters", [])) != 1:
        raise FirekitError(f"{path}: not an ITK text transform file holding one transform "
                           f"({len(kinds)} found); pass one affine per --transform")
    try:
        params = np.array(fields["Parameters"][0].split(), dtype=np.float64)
        fixed = np.array((fields.get("FixedParameters") or [""])[0].split(), dtype=np.float64)
    except ValueError:
        raise FirekitError(f"{path}: ITK transform parameters are not numbers; re-export the transform") from None
    return kinds[0], params, fixed


def _ants_mat(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """``(transform type, parameters, fixed parameters)`` of ANTs' Matlab v4 ``.mat`` affine."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy's ValueError/TypeError/MatReadError for anything but a .mat
        raise FirekitError(f"{path}: cannot read as an ANTs .mat transform ({io._first_line(exc)})") from None
    kinds = [key for key in mat if _ITK_AFFINE.match(key)]
    if len(kinds) != 1:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise FirekitError(f"{path}: no ITK affine in this .mat (holds {found}); pass ANTs' *GenericAffine.mat")
    return kinds[0], mat[kinds[0]], mat.get("fixed", np.zeros(0))


def read_affine(path: str | os.PathLike) -> np.ndarray:
    """The ``(n + 1, n + 1)`` RAS world map (reference -> input points) of an ITK ``.tfm``/``.txt`` or ANTs ``.mat``."""
    path = Path(path)
    if not path.is_file():
        raise FirekitError(f"{path}: transform not found; check the path")
    kind, params, fixed = (_ants_mat if path.suffix.lower() == ".mat" else _itk_text)(path)
    match = _ITK_AFFINE.match(kind)
    if match is None or match.group(3) != match.group(4) or match.group(3) not in ("2", "3"):
        raise FirekitError(f"{path}: transform type {kind} is not supported; export an AffineTransform "
                           "(ANTs' GenericAffine, ITK's AffineTransform or MatrixOffsetTransformBase)")
    return _matrix_offset(params, fixed, int(match.group(3)), path)


def read_transform(path: str | os.PathLike, ndim: int) -> AffineTransform | FieldTransform:
    """An n-D transform file: an affine (``.tfm``, ``.txt``, ``.mat``) or a displacement field (an image)."""
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise FirekitError(f"{path}: transform not found; check the path")
    if name.endswith(AFFINE_SUFFIXES):
        transform = AffineTransform(read_affine(path), str(path))
    elif name.endswith(io.IMAGE_SUFFIXES):
        transform = FieldTransform(*io.read_field(path, ndim), name=str(path))
    else:
        raise FirekitError(f"{path}: unknown transform format; pass an affine (.tfm, .txt, .mat) or a displacement "
                           "field (.nii.gz, .nrrd, .mha)")
    if transform.ndim != ndim:
        raise FirekitError(f"{path}: a {transform.ndim}D transform cannot map a {ndim}D reference; pass {ndim}D transforms")
    return transform


def _sample_labels(data: np.ndarray, points: torch.Tensor) -> np.ndarray:
    """Label-aware resampling: each label's indicator linearly, then the argmax (0 = background,
    whose indicator is 1 - the others', so 1 outside the input). ``(*S)`` int32."""
    labels = [int(v) for v in np.unique(data) if v != 0]
    best_label = torch.zeros(points.shape[2:], dtype=torch.int32)
    best_score = torch.full(points.shape[2:], -1.0, dtype=points.dtype)
    total = torch.zeros(points.shape[2:], dtype=points.dtype)
    for label in labels:
        indicator = torch.as_tensor((data == label).astype(np.float64))[None, None]
        score = spatial.sample(indicator, points, mode="linear", padding_mode="zeros")[0, 0]
        total += score
        better = score > best_score
        best_label[better], best_score[better] = label, score[better]
    best_label[(1.0 - total) >= best_score] = 0
    return best_label.numpy()


def apply_transforms(image: io.Volume, reference: io.Volume, transforms: Sequence[AffineTransform | FieldTransform],
                     interpolation: str = "linear") -> np.ndarray:
    """``image`` resampled onto ``reference``'s grid through ``transforms`` (ANTs' ``-t`` order: the first
    maps the reference points first, the last is applied to the image first); outside the input is 0.

    Returns:
        ``(*reference.shape)``: float32 (``"linear"``), the input's values (``"nearest"``) or int32 labels
        (``"label"``: per-label linear interpolation of indicators, argmax).
    """
    n = reference.ndim
    if interpolation not in INTERPOLATIONS:
        raise FirekitError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if image.ndim != n:
        raise FirekitError(f"{image.name} is {image.ndim}D but the reference {reference.name} is {n}D; "
                           "pass images of the same ndim")
    for transform in transforms:
        if transform.ndim != n:
            raise FirekitError(f"{transform.name}: a {transform.ndim}D transform cannot map the {n}D reference")
    points = fields.world_points(reference)
    for transform in transforms:  # input point = Tk(...T1(x))
        points = transform(points)
    voxels = fields.world_to_voxels(points, image.affine)
    if interpolation == "label":
        return _sample_labels(np.asarray(image.data), voxels)
    out = fields.sample_volume(image, voxels, interpolation)
    return out.astype(np.float32) if interpolation == "linear" else out.astype(image.data.dtype)


def _label_dtype(data: np.ndarray) -> str:
    return "int16" if -32768 <= data.min() and data.max() < 32768 else "int32"


def apply_files(input: str | os.PathLike, reference: str | os.PathLike, transforms: Sequence[str | os.PathLike],
                out: str | os.PathLike, interpolation: str = "linear") -> Path:
    """Read, apply and write: ``input`` onto ``reference``'s grid through ``transforms`` into ``out``.

    Every input is read and checked before any work, and ``out`` (never an input) is written atomically.
    ``"nearest"`` keeps integer images integer (int16/int32), others float32; ``"label"`` needs an
    integer label map.
    """
    if not transforms:
        raise FirekitError("no transform given; pass one or more --transform files")
    if interpolation not in INTERPOLATIONS:
        raise FirekitError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    inputs = [input, reference, *transforms]
    io.check_output_path(out, inputs)
    if interpolation == "label":
        image = io.load_labels(input, "input label map")
    else:
        image = io.load_volume(input, "input image")
    grid = io.load_volume(reference, "reference image")
    loaded = [read_transform(path, grid.ndim) for path in transforms]
    data = apply_transforms(image, grid, loaded, interpolation)
    integer = interpolation == "label" or (interpolation == "nearest" and np.array_equal(data, np.rint(data)))
    dtype = _label_dtype(data) if integer else np.float32
    return io.save_nifti(data, grid.affine, out, header=grid.header, dtype=dtype, protect=inputs)
