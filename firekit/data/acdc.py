"""The ACDC cardiac cine layout (Bernard et al. 2018), read and written as downloaded.

One folder per patient, found at depth one or two below a root (``ROOT/patient001`` or
``ROOT/training/patient001``)::

    patientNNN/Info.cfg                     ED: 1 / ES: 12 / Group: DCM / Height: 184.0 / NbFrame: 30 / Weight: 95.0
    patientNNN/patientNNN_4d.nii.gz         (X, Y, Z, T) cine series
    patientNNN/patientNNN_frameNN.nii.gz    the ED and ES frames (NN is 1-based, 2 digits)
    patientNNN/patientNNN_frameNN_gt.nii.gz their labels: 0 background, 1 RV cavity, 2 myocardium, 3 LV cavity

``Info.cfg``'s ED and ES are 1-based frame numbers; a :class:`Patient` holds them as 0-based phases,
the indices of :class:`firekit.data.series.Series`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from firekit.data.series import Series, load_series, save_series
from firekit.data import io
from firekit.data.atomic import atomic_write_text
from firekit.core.errors import FirekitError

__all__ = ["LABEL_NAMES", "INFO_KEYS", "Patient", "read_info", "read_patient", "find_patients", "write_patient"]

LABEL_NAMES = {1: "RV cavity", 2: "myocardium", 3: "LV cavity"}
# Info.cfg keys in the order ACDC writes them, with their types; other keys are parsed as int, float or text.
INFO_KEYS = {"ED": int, "ES": int, "Group": str, "Height": float, "NbFrame": int, "Weight": float}
_NAME = re.compile(r"patient\d+")


@dataclass
class Patient:
    """One ACDC patient folder.

    Attributes:
        name: folder name, e.g. ``"patient001"``.
        folder: the patient folder.
        info: ``Info.cfg`` values: ``ED``, ``ES``, ``NbFrame`` int (1-based frames), ``Height`` (cm)
            and ``Weight`` (kg) float, ``Group`` str, and any other keys.
        ed, es: end-diastolic and end-systolic phases, 0-based (``info["ED"] - 1``).
        series_path: the ``(X, Y, Z, T)`` cine series ``{name}_4d.nii.gz``.
        frames: 0-based phase -> (frame image path, ground-truth path or None), for every
            ``{name}_frameNN.nii.gz`` on disk (ED and ES in ACDC).
        shape: spatial shape of a frame; phases: number of phases of the series (from the header).
    """

    name: str
    folder: Path
    info: dict
    ed: int
    es: int
    series_path: Path
    frames: dict = field(default_factory=dict)
    shape: tuple = ()
    phases: int = 0

    def series(self) -> Series:
        """The whole cine series ``(*S, T)`` (float32) with its spatial affine."""
        return load_series(self.series_path)

    def frame(self, phase: int) -> io.Volume:
        """The frame of 0-based ``phase``: its ``_frameNN`` file, else that phase of the 4D series."""
        phase = self._phase(phase)
        if phase in self.frames:
            return io.load_volume(self.frames[phase][0], "ACDC frame")
        return self.series().phase(phase)

    def labels(self, phase: int) -> io.Volume:
        """The ground-truth labels of 0-based ``phase`` (ED or ES in ACDC), int32 0..3."""
        phase = self._phase(phase)
        gt = self.frames.get(phase, (None, None))[1]
        if gt is None:
            have = sorted(p for p, (_, g) in self.frames.items() if g is not None)
            raise FirekitError(f"{self.folder}: no ground truth {_frame_name(self.name, phase)}_gt.nii.gz for "
                               f"phase {phase}; labelled phases are {have} (ED {self.ed}, ES {self.es})")
        return io.load_labels(gt, "ACDC ground truth")

    def _phase(self, phase: int) -> int:
        phase = int(phase)
        if not 0 <= phase < self.phases:
            raise FirekitError(f"{self.series_path}: phase {phase} does not exist (0..{self.phases - 1}, 0-based)")
        return phase


def _frame_name(name: str, phase: int) -> str:
    return f"{name}_frame{phase + 1:02d}"


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_info(path: str | os.PathLike) -> dict:
    """Parse an ACDC ``Info.cfg`` (``KEY: value`` lines) into typed values (see :data:`INFO_KEYS`).

    Raises :class:`FirekitError` for a missing file, a line that is not ``KEY: value``, a value of
    the wrong type, or a missing ``ED`` or ``ES``.
    """
    path = Path(path)
    if not path.is_file():
        raise FirekitError(f"{path}: Info.cfg not found; an ACDC patient folder holds Info.cfg beside its NIfTI files")
    info = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        key, colon, text = line.partition(":")
        key, text = key.strip(), text.strip()
        if not colon or not key:
            raise FirekitError(f"{path}: line {number} {line.strip()!r} is not 'KEY: value'; fix or re-download Info.cfg")
        kind = INFO_KEYS.get(key)
        try:
            # "ED: 1.0" happens in hand-edited files; an integer key takes an integral float.
            info[key] = _value(text) if kind is None else kind(float(text)) if kind is int else kind(text)
        except (ValueError, OverflowError):
            raise FirekitError(f"{path}: line {number}: {key} must be {kind.__name__}, got {text!r}") from None
        if kind is int and float(text) != info[key]:
            raise FirekitError(f"{path}: line {number}: {key} must be a whole number, got {text!r}")
    missing = [key for key in ("ED", "ES") if key not in info]
    if missing:
        raise FirekitError(f"{path}: no {' or '.join(missing)} line; Info.cfg needs 'ED: n' and 'ES: n' (1-based frames)")
    return info


def _header_shape(path: Path, what: str) -> tuple[int, ...]:
    return tuple(int(s) for s in io._load_image(path, what).shape)


def _frame_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial shape of a 2D/3D frame file as loaded (trailing singleton axes dropped, like io)."""
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_patient(folder: str | os.PathLike) -> Patient:
    """Read one ACDC patient folder (``Info.cfg`` and NIfTI headers; no voxels are loaded).

    Raises :class:`FirekitError` (one line naming the file) for a missing ``Info.cfg`` or 4D file,
    ED/ES outside ``1..NbFrame`` or the series, ``NbFrame`` differing from the series' phases, a
    frame whose grid differs from the series, or a ground truth whose shape differs from its frame.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FirekitError(f"{folder}: patient folder not found; pass a folder such as training/patient001")
    name = folder.name
    info = read_info(folder / "Info.cfg")
    series_path = folder / f"{name}_4d.nii.gz"
    if not series_path.is_file() and (folder / f"{name}_4d.nii").is_file():
        series_path = folder / f"{name}_4d.nii"  # decompressed by the user
    if not series_path.is_file():
        raise FirekitError(f"{series_path}: 4D cine file not found; an ACDC patient folder holds {name}_4d.nii.gz")
    shape4 = _header_shape(series_path, "cine series")
    if len(shape4) != 4:
        raise FirekitError(f"{series_path}: shape {shape4} is not a 4D (X, Y, Z, T) cine series")
    phases = shape4[3]
    frames_in = info.get("NbFrame", phases)
    if frames_in != phases:
        raise FirekitError(f"{folder / 'Info.cfg'}: NbFrame {frames_in} but {series_path.name} has {phases} phases; "
                           "fix NbFrame or re-download the patient")
    for key in ("ED", "ES"):
        if not 1 <= info[key] <= phases:
            raise FirekitError(f"{folder / 'Info.cfg'}: {key} {info[key]} is outside frames 1..{phases} "
                               f"(1-based, {series_path.name} has {phases} phases); fix Info.cfg")
    spatial = _frame_shape(shape4[:3])
    frames = {}
    pattern = re.compile(rf"{re.escape(name)}_frame(\d+)(\.nii(?:\.gz)?)")
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        phase = int(match.group(1)) - 1
        if not 0 <= phase < phases:
            raise FirekitError(f"{path}: frame {phase + 1} is outside 1..{phases} of {series_path.name}; remove it")
        shape = _frame_shape(_header_shape(path, "ACDC frame"))
        if shape != spatial:
            raise FirekitError(f"{path}: frame shape {shape} differs from {series_path.name}'s frames {spatial}")
        gt = path.with_name(f"{name}_frame{match.group(1)}_gt{match.group(2)}")
        if gt.is_file():
            gt_shape = _frame_shape(_header_shape(gt, "ACDC ground truth"))
            if gt_shape != shape:
                raise FirekitError(f"{gt}: ground-truth shape {gt_shape} differs from its frame {path.name} {shape}; "
                                   "re-download the patient")
        frames[phase] = (path, gt if gt.is_file() else None)
    return Patient(name, folder, info, info["ED"] - 1, info["ES"] - 1, series_path, frames, spatial, phases)


def _patient_folders(root: Path) -> list[Path]:
    found = []
    for level in (root, *(child for child in sorted(root.iterdir()) if child.is_dir())):
        found += [child for child in sorted(level.iterdir()) if child.is_dir() and _NAME.fullmatch(child.name)]
    return found


def find_patients(root: str | os.PathLike) -> list[Patient]:
    """Every ACDC patient folder at depth one or two below ``root``, sorted by name (then path).

    ``root`` may also be one patient folder. Raises :class:`FirekitError` when none is found or
    one is incomplete (see :func:`read_patient`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FirekitError(f"{root}: folder not found; pass the ACDC folder holding patient001... or training/")
    folders = _patient_folders(root)
    if not folders and _NAME.fullmatch(root.name):
        return [read_patient(root)]  # root is one patient folder
    if not folders:
        raise FirekitError(f"{root}: no ACDC patient folders (patientNNN/) at depth 1 or 2; pass the folder "
                           "holding patient001... or training/patient001...")
    return sorted((read_patient(folder) for folder in folders), key=lambda p: (p.name, str(p.folder)))


def _info_text(info: dict) -> str:
    keys = [key for key in INFO_KEYS if key in info] + [key for key in info if key not in INFO_KEYS]
    lines = []
    for key in keys:
        value = info[key]
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(key)) or "\n" in str(value):
            raise FirekitError(f"Info.cfg key {key!r} / value {value!r}: keys are words and values one line")
        lines.append(f"{key}: {float(value) if INFO_KEYS.get(key) is float else value}")
    return "\n".join(lines) + "\n"


def write_patient(root: str | os.PathLike, name: str, series: np.ndarray, affine: np.ndarray, ed: int, es: int,
                  labels_ed: np.ndarray, labels_es: np.ndarray, info: dict | None = None,
                  time_step: float | None = None) -> Patient:
    """Write one patient in the ACDC layout under ``root / name``, every file atomically.

    ``Info.cfg`` is written last (a folder without it is incomplete); an earlier ``Info.cfg`` and
    frame files of other phases there are removed first.

    Args:
        root: folder that will hold ``name/``.
        name: ``patientNNN``.
        series: ``(X, Y, Z, T)`` (or ``(X, Y, T)``) cine series, stored with its dtype (ACDC: int16).
        affine: ``(4, 4)`` (or ``(3, 3)``) voxel -> RAS mm of a frame.
        ed, es: 0-based end-diastolic and end-systolic phases (written 1-based).
        labels_ed, labels_es: ``(X, Y, Z)`` labels 0..3 of those phases (stored as uint8).
        info: more ``Info.cfg`` keys, e.g. ``Group``, ``Height`` (cm), ``Weight`` (kg); ED, ES and
            NbFrame come from the arguments.
        time_step: seconds between phases, stored as the series' 4th voxel size.

    Returns:
        The written :class:`Patient`, read back.
    """
    series = np.asarray(series)
    affine = np.asarray(affine, dtype=np.float64)
    if not _NAME.fullmatch(str(name)):
        raise FirekitError(f"patient name {name!r} must be patientNNN (what find_patients looks for)")
    if series.ndim not in (3, 4) or affine.shape != (series.ndim, series.ndim) or series.shape[-1] < 2:
        raise FirekitError(f"{name}: series must be (*spatial, T) with T >= 2 and an ({series.ndim}, {series.ndim}) "
                           f"affine, got {series.shape} and {affine.shape}")
    phases = series.shape[-1]
    ed, es = int(ed), int(es)
    if not (0 <= ed < phases and 0 <= es < phases) or ed == es:
        raise FirekitError(f"{name}: ED {ed} and ES {es} must be two different phases in 0..{phases - 1} (0-based)")
    labels = {ed: np.asarray(labels_ed), es: np.asarray(labels_es)}
    for phase, label in labels.items():
        if label.shape != series.shape[:-1]:
            raise FirekitError(f"{name}: labels of phase {phase} have shape {label.shape}, frames {series.shape[:-1]}")
        if label.min() < 0 or label.max() > max(LABEL_NAMES):
            raise FirekitError(f"{name}: labels of phase {phase} must be 0..3 (RV, myocardium, LV), "
                               f"got {label.min()}..{label.max()}")
    folder = Path(root) / name
    (folder / "Info.cfg").unlink(missing_ok=True)
    keep = {f"{_frame_name(name, p)}{suffix}.nii.gz" for p in labels for suffix in ("", "_gt")}
    if folder.is_dir():
        for path in folder.glob(f"{name}_frame*.nii.gz"):
            if path.name not in keep:
                path.unlink()
    header = None
    if time_step is not None:
        header = nib.Nifti1Header()
        shape4 = (*series.shape[:-1], 1, phases)[-4:] if series.ndim == 3 else series.shape
        header.set_data_shape(shape4)
        header.set_zooms((*io.spacing(affine), *(1.0,) * (3 - (affine.shape[0] - 1)), float(time_step)))
    for phase, label in labels.items():
        stem = folder / _frame_name(name, phase)
        io.save_nifti(series[..., phase], affine, f"{stem}.nii.gz")
        io.save_nifti(label.astype(np.uint8), affine, f"{stem}_gt.nii.gz")
    save_series(series, affine, folder / f"{name}_4d.nii.gz", header=header)
    values = {**(info or {}), "ED": ed + 1, "ES": es + 1, "NbFrame": phases}
    atomic_write_text(folder / "Info.cfg", _info_text(values))
    return read_patient(folder)
