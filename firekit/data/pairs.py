"""From files to network tensors: pair matching, network grids, resampling, training pairs.

A *subject* is a set of co-registered images of one person (modality A, modality B, optionally a
label map valid for both), as in MRBrainS (``SUBJ/T1.nii``, ``SUBJ/T2_FLAIR.nii``, ``SUBJ/segm.nii``)
or firekit's demo data (``SUBJ/T1.nii.gz``, ``SUBJ/T2.nii.gz``, ``SUBJ/labels.nii.gz``).
Training pairs are built the paper's way (Section 4.1): the A and B images of a subject each get
their own random affine + smooth non-rigid transformation.
"""

from __future__ import annotations

import glob
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from firekit.data import io
from firekit.data.contrast import apply_curve, random_curve
from firekit.core import spatial
from firekit.core.errors import FirekitError

if TYPE_CHECKING:
    from firekit.data.augment import AugmentConfig

__all__ = [
    "Subject",
    "SubjectData",
    "find_pairs",
    "network_grid",
    "resample",
    "to_network",
    "load_subject",
    "PairDataset",
    "pair_generator",
    "DEFAULT_SPACING",
]

DEFAULT_SPACING = 1.28  # mm, the paper's resampling (Section 4.1)
_NIFTI_EXT = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


@dataclass
class Subject:
    """Files of one subject: modality A, modality B, and an optional label map valid for both."""

    name: str
    a: Path
    b: Path
    labels: Path | None = None


def _expand(pattern: str, flag: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
    if not paths:
        raise FirekitError(f"{flag} {pattern!r} matched no files; check the pattern (quote it in the shell)")
    return paths


def _stem(path: Path) -> str:
    return _NIFTI_EXT.sub("", path.name)


def _parent_keys(paths: list[Path]) -> list[str] | None:
    keys = [p.parent.name for p in paths]
    return keys if len(set(keys)) == len(keys) else None


def _token_keys(paths: list[Path]) -> list[str] | None:
    """Subject keys from file names: drop the name tokens every file shares (e.g. ``_T1``)."""
    tokens = [re.split(r"[_\-.]+", _stem(p)) for p in paths]
    if len(paths) == 1:
        return None
    common = set(tokens[0]).intersection(*map(set, tokens[1:]))
    keys = ["_".join(t for t in toks if t not in common) for toks in tokens]
    return keys if all(keys) and len(set(keys)) == len(keys) else None


def _keys(paths: list[Path]) -> list[list[str]]:
    options = [_parent_keys(paths), _token_keys(paths), [_stem(p) for p in paths]]
    return [k for k in options if k is not None]


def find_pairs(a: str, b: str, labels: str | None = None,
               flags: Sequence[str] = ("--a", "--b", "--labels")) -> list[Subject]:
    """Match the files of two globs (and a label glob) per subject.

    Subjects are matched by parent folder when every subject's files share names
    (``SUBJ/T1.nii``, ``SUBJ/T2.nii``), otherwise by file name with the tokens common to all files
    of a glob removed (``sub01_T1.nii.gz`` ~ ``sub01_T2.nii.gz``). A single file per glob pairs as is.

    Raises :class:`FirekitError` if a glob matches nothing or the subjects do not match one to one;
    ``flags`` name the three globs in its message (the command line's options).
    """
    flag_a, flag_b, flag_labels = flags
    patterns = {flag_a: a, flag_b: b, flag_labels: labels}
    files = {flag_a: _expand(a, flag_a), flag_b: _expand(b, flag_b)}
    if labels is not None:
        files[flag_labels] = _expand(labels, flag_labels)
    counts = {flag: len(paths) for flag, paths in files.items()}
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{flag} {patterns[flag]!r} matched {n}" for flag, n in counts.items())
        raise FirekitError(f"unequal numbers of files: {listing}; every subject needs one file per glob")
    if counts[flag_a] == 1:
        only = {flag: paths[0] for flag, paths in files.items()}
        name = only[flag_a].parent.name or _stem(only[flag_a])
        return [Subject(name, only[flag_a], only[flag_b], only.get(flag_labels))]
    for method in range(3):
        keyed = {}
        for flag, paths in files.items():
            options = _keys(paths)
            keys = options[min(method, len(options) - 1)]
            keyed[flag] = dict(zip(keys, paths))
        key_sets = [set(k) for k in keyed.values()]
        if all(s == key_sets[0] for s in key_sets):
            return [
                Subject(key, keyed[flag_a][key], keyed[flag_b][key], keyed.get(flag_labels, {}).get(key))
                for key in sorted(key_sets[0])
            ]
    example = files[flag_a][0]
    raise FirekitError(
        f"cannot match {flag_a} and {flag_b} files per subject (e.g. {example}); use one folder per subject "
        "(SUBJ/A.nii.gz, SUBJ/B.nii.gz) or names that differ only by the modality (sub01_T1, sub01_T2)"
    )


def _round_size(n: int, multiple: int, min_size: int) -> int:
    return max(min_size, int(math.ceil(n / multiple) * multiple))


def network_grid(
    volume: io.Volume,
    spacing: float | Sequence[float | None] | None = DEFAULT_SPACING,
    multiple: int = 4,
    min_size: int = 32,
) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid the network sees for an image: canonical axes (RAS), ``spacing`` mm, padded sizes.

    The grid keeps the image's field of view (centred on it), orders and flips axes to R, A(, S),
    and pads each size up to a multiple of ``multiple`` and at least ``min_size`` (so small images
    are padded, never refused).

    Args:
        spacing: mm per voxel, one value or one per canonical axis; None (or a None entry) keeps
            the native spacing of that axis.

    Returns:
        ``(shape, affine)``: spatial shape and ``(n + 1, n + 1)`` voxel-to-world affine.
    """
    n = volume.ndim
    canonical = io.to_canonical(io.Volume(np.zeros(volume.shape, np.uint8), volume.affine))
    native = canonical.spacing
    if spacing is None or isinstance(spacing, (int, float)):
        spacing = [spacing] * n
    if len(spacing) < n:
        raise FirekitError(f"spacing needs {n} values for a {n}D image, got {list(spacing)}")
    spacing = list(spacing)[:n]  # a 2D image uses the in-plane entries of a 3-value spacing
    target = np.array([native[i] if s is None else float(s) for i, s in enumerate(spacing)])
    if (target <= 0).any():
        raise FirekitError(f"spacing must be positive, got {list(spacing)}")
    extent = (np.array(canonical.shape) - 1) * native
    shape = tuple(_round_size(int(np.floor(e / t + 1e-6)) + 1, multiple, min_size) for e, t in zip(extent, target))
    directions = canonical.affine[:n, :n] / native
    linear = directions * target
    centre_world = canonical.affine[:n, :n] @ ((np.array(canonical.shape) - 1) / 2) + canonical.affine[:n, n]
    origin = centre_world - linear @ ((np.array(shape) - 1) / 2)
    affine = np.eye(n + 1)
    affine[:n, :n], affine[:n, n] = linear, origin
    return shape, affine


def _voxel_map(source_affine: np.ndarray, target_affine: np.ndarray) -> torch.Tensor:
    """``(1, n, n + 1)`` taking target voxel indices to source voxel indices through world space."""
    matrix = np.linalg.inv(source_affine) @ target_affine
    n = matrix.shape[0] - 1
    return torch.as_tensor(matrix[:n], dtype=torch.float64).unsqueeze(0)


def map_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``(1, n, n + 1)`` to voxel points ``(B, n, *S)``."""
    n = matrix.shape[1]
    linear, shift = matrix[:, :, :n].to(points), matrix[:, :, n].to(points)
    return torch.einsum("bij,bj...->bi...", linear, points) + shift.reshape(1, n, *([1] * n))


def resample(
    volume: io.Volume,
    shape: Sequence[int],
    affine: np.ndarray,
    mode: str = "linear",
    fill: float = 0.0,
) -> torch.Tensor:
    """Resample a volume onto another grid through world coordinates.

    Args:
        volume: source image (its own affine places it in the world).
        shape, affine: target grid (``(n + 1, n + 1)`` affine).
        mode: ``"linear"`` or ``"nearest"`` (labels).
        fill: value outside the source field of view.

    Returns:
        ``(1, 1, *shape)`` float32 tensor (labels come back as float holding integers).
    """
    if len(shape) != volume.ndim:
        raise FirekitError(f"{volume.name}: a {volume.ndim}D image cannot be resampled to a {len(shape)}D grid")
    points = map_points(_voxel_map(volume.affine, affine), spatial.voxel_grid(shape, like=torch.zeros((), dtype=torch.float64)))
    image = torch.as_tensor(np.asarray(volume.data, dtype=np.float32))[None, None] - fill
    return spatial.sample(image, points.float(), mode=mode, padding_mode="zeros") + fill


def to_network(volume: io.Volume, shape: Sequence[int], affine: np.ndarray) -> torch.Tensor:
    """Normalise intensities to [-1, 1] (robust percentiles) and resample onto a network grid.

    Returns ``(1, 1, *shape)``; outside the image's field of view is -1 (background).
    """
    normalised = volume.with_data(io.normalise_intensity(volume.data, name=volume.name))
    return resample(normalised, shape, affine, fill=-1.0)


@dataclass
class SubjectData:
    """A subject on its network grid: tensors ``(1, 1, *S)``; labels int64 or None; ``fov`` bool,
    True where the grid lies inside A's field of view (None: everywhere)."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    labels: torch.Tensor | None
    affine: np.ndarray
    fov: torch.Tensor | None = None


def load_subject(
    subject: Subject,
    spacing: float | Sequence[float | None] | None = DEFAULT_SPACING,
    multiple: int = 4,
    min_size: int = 32,
) -> SubjectData:
    """Load A, B (and labels) onto A's network grid; B and labels are resampled through world space."""
    vol_a = io.load_volume(subject.a, "modality A image")
    vol_b = io.load_volume(subject.b, "modality B image")
    if vol_a.ndim != vol_b.ndim:
        raise FirekitError(f"{subject.b}: is {vol_b.ndim}D but {subject.a} is {vol_a.ndim}D; pair images of one ndim")
    shape, affine = network_grid(vol_a, spacing, multiple, min_size)
    labels = None
    if subject.labels is not None:
        vol_l = io.load_labels(subject.labels, allow_empty=False)
        if vol_l.ndim != vol_a.ndim:
            raise FirekitError(f"{subject.labels}: labels are {vol_l.ndim}D but {subject.a} is {vol_a.ndim}D")
        labels = resample(vol_l, shape, affine, mode="nearest").round().long()
    return SubjectData(subject.name, to_network(vol_a, shape, affine), to_network(vol_b, shape, affine), labels, affine,
                       field_of_view(vol_a, shape, affine))


def field_of_view(volume: io.Volume, shape: Sequence[int], affine: np.ndarray) -> torch.Tensor:
    """``(1, 1, *shape)`` bool: the grid points inside ``volume``'s field of view (not padding)."""
    ones = io.Volume(np.ones(volume.shape, np.float32), volume.affine)
    return resample(ones, shape, affine) > 0.5


def foreground_fraction(x: torch.Tensor, fov: torch.Tensor | None = None) -> torch.Tensor:
    """Per axial slice (last axis), the fraction of in-view voxels above background.

    Args:
        x: ``(T, 1, X, Y, Z)`` normalised images (background -1); fov: ``(1, 1, X, Y, Z)`` bool or
            None (the whole grid). Relative to the field of view, so an image smaller than the
            network's minimum size (padded) keeps its slices.

    Returns:
        ``(Z,)`` fractions in [0, 1] (0 for slices outside the field of view).
    """
    foreground = (x[:, 0] > -0.9).float()
    if fov is None:
        return foreground.mean(dim=(0, 1, 2))
    inside = fov[0].float()
    return (foreground * inside).sum(dim=(0, 1, 2)) / (inside.sum(dim=(0, 1, 2)) * x.shape[0]).clamp(min=1.0)


def _pad_to(x: torch.Tensor, shape: Sequence[int], value: float) -> torch.Tensor:
    """Centre-pad (or centre-crop) the spatial dims of ``(B, C, *S)`` to ``shape``."""
    pads = []
    for size, target in zip(reversed(x.shape[2:]), reversed(tuple(shape))):
        before = (target - size) // 2
        pads += [before, target - size - before]
    return torch.nn.functional.pad(x, pads, value=value)


def pair_generator(seed: int, step: int, pair: int) -> torch.Generator:
    """The random stream of pair ``pair`` of the batch of ``step``: every pair is drawn from its
    own stream, so any slice of a batch is drawn alone exactly as within the whole batch."""
    state = np.random.SeedSequence([int(seed), int(step), int(pair)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _warp_image(x: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, 1, *S)`` in [-1, 1] warped by a normalised displacement, background outside."""
    return (spatial.warp(x + 1.0, displacement, padding_mode="zeros") - 1.0).clamp(-1.0, 1.0)


class PairDataset:
    """Training pairs drawn deterministically per step (the trainer's *pair source*).

    Each draw picks a subject (and a slice for a 2D model on 3D data), then transforms A and B
    with independent random affine + smooth transformations (Section 4.1). ``sample(step, n)``
    depends only on ``(seed, step)``, so a resumed run sees exactly the data it would have seen.

    Args:
        subjects: loaded subjects (all 2D, or all 3D).
        ndim: the model's ndim; 2 with 3D subjects uses axial slices (canonical axis 2).
        augment: augmentation settings (None: no augmentation).
        seed: data seed.
        pairing: ``"subject"`` (A and B of one subject) or ``"random"`` (B of another subject).
        spacing: mm per network voxel, for the augmentation's physical magnitudes.
        min_foreground: slices with less than this fraction of non-background voxels are skipped.
        curriculum_steps: ramp the augmentation strength from ``curriculum_start`` to 1 over this
            many steps (0: full strength from the start).
        targets: also return each pair's known answer (for the auxiliary loss).
        counterparts: also return each pair's aligned counterparts, modality B under A's transform
            and A under B's (for the trainer's synthesis and feature-invariance terms).
        near_fraction: this fraction of the pairs of one subject are drawn near alignment: B takes
            A's transform followed by a small random one (half of them none, the rest at strength
            ``U(0, near_strength)``), so the network also sees answers at and near the identity
            (bench/training.md section 8). 0: every pair drawn independently (the paper).
        near_strength: the largest strength of the small transform of a near pair.
        contrast_fraction: this fraction of the pairs pass their B image (and its aligned counterpart)
            through a random intensity curve (:mod:`firekit.data.contrast`), so the network meets many
            contrasts of B's anatomy. 0: B as stored (the paper).
    """

    def __init__(
        self,
        subjects: Sequence[SubjectData],
        ndim: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        pairing: str = "subject",
        spacing: float = DEFAULT_SPACING,
        min_foreground: float = 0.15,
        info: dict | None = None,
        curriculum_steps: int = 0,
        curriculum_start: float = 0.25,
        targets: bool = True,
        counterparts: bool = False,
        near_fraction: float = 0.0,
        near_strength: float = 0.25,
        contrast_fraction: float = 0.0,
    ):
        if not subjects:
            raise FirekitError("no subjects to train on")
        if pairing not in ("subject", "random"):
            raise FirekitError(f"pairing must be 'subject' or 'random', got {pairing!r}")
        if not (0.0 <= near_fraction <= 1.0 and 0.0 <= near_strength <= 1.0):
            raise FirekitError(f"near_fraction and near_strength must be in [0, 1], got {near_fraction}, {near_strength}")
        if not 0.0 <= contrast_fraction <= 1.0:
            raise FirekitError(f"contrast_fraction must be in [0, 1], got {contrast_fraction}")
        data_ndim = subjects[0].a.ndim - 2
        if any(s.a.ndim - 2 != data_ndim for s in subjects):
            raise FirekitError("subjects mix 2D and 3D images; use one kind per dataset")
        if ndim not in (data_ndim, data_ndim - 1) or ndim not in (2, 3):
            raise FirekitError(f"a {ndim}D model cannot train on {data_ndim}D images")
        self.subjects = list(subjects)
        self.ndim = ndim
        self.augment = augment
        self.seed = int(seed)
        self.pairing = pairing
        self.spacing = float(spacing)
        self.info = dict(info or {})
        self.curriculum_steps = int(curriculum_steps)
        self.curriculum_start = float(curriculum_start)
        self.targets = bool(targets)
        self.counterparts = bool(counterparts)
        self.near_fraction = float(near_fraction)
        self.near_strength = float(near_strength)
        self.contrast_fraction = float(contrast_fraction)
        self.slicewise = data_ndim == 3 and ndim == 2
        self.shape = tuple(
            max(s.a.shape[2 + i] for s in self.subjects) for i in range(ndim)
        )
        # (subject index, slice index or -1)
        self.items: list[tuple[int, int]] = []
        for index, subject in enumerate(self.subjects):
            if not self.slicewise:
                self.items.append((index, -1))
                continue
            foreground = foreground_fraction(subject.a, getattr(subject, "fov", None))
            self.items += [(index, int(k)) for k in torch.nonzero(foreground >= min_foreground).flatten()]
        if not self.items:
            names = ", ".join(s.name for s in self.subjects[:3]) + (", ..." if len(self.subjects) > 3 else "")
            raise FirekitError(f"{names}: no axial slice has {min_foreground:.0%} foreground; check the images "
                               "(mostly background?) or train with --ndim 3")

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict:
        return {
            **self.info,
            "subjects": [s.name for s in self.subjects],
            "ndim": self.ndim,
            "slicewise": self.slicewise,
            "shape": list(self.shape),
            "spacing": self.spacing,
            "seed": self.seed,
            "pairing": self.pairing,
            "augment": None if self.augment is None else self.augment.to_dict(),
            "curriculum_steps": self.curriculum_steps,
            "curriculum_start": self.curriculum_start,
            "near_fraction": self.near_fraction,
            "near_strength": self.near_strength,
            "contrast_fraction": self.contrast_fraction,
        }

    def _image(self, subject: SubjectData, key: str, k: int) -> torch.Tensor | None:
        x = getattr(subject, key)
        if x is None:
            return None
        x = x[..., k] if k >= 0 else x
        return _pad_to(x.float(), self.shape, -1.0 if key != "labels" else 0.0)

    def strength(self, step: int) -> float:
        """Augmentation strength at ``step``: ramps linearly from ``curriculum_start`` to 1."""
        if not self.curriculum_steps:
            return 1.0
        return min(1.0, self.curriculum_start + (1.0 - self.curriculum_start) * step / self.curriculum_steps)

    def _draw(self, generator: torch.Generator, step: int, strength: float = 1.0) -> torch.Tensor | None:
        """The displacement of a random transform at the step's strength times ``strength`` (None
        without augmentation)."""
        if self.augment is None:
            return None
        from firekit.data.augment import random_transform

        config = self.augment.with_strength(self.augment.strength * self.strength(step) * strength)
        return random_transform(self.shape, self.spacing, generator, config).displacement

    def _near(self, phi_a: torch.Tensor, generator: torch.Generator, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """B's transform of a near pair, A's followed by a small random one ``r`` (half the time
        none), and ``r``'s displacement: the pair's a2b answer ``phi_a^-1 o phi_a o r``, exactly."""
        u = float(torch.rand((), generator=generator))
        if u < 0.5:
            return phi_a, torch.zeros_like(phi_a)
        relative = self._draw(generator, step, self.near_strength * (2.0 * u - 1.0))
        return spatial.compose(phi_a, relative), relative

    @staticmethod
    def _warped(x: torch.Tensor, labels: torch.Tensor | None, phi: torch.Tensor | None):
        """``x`` (and labels) under the transform ``phi`` (unchanged when None)."""
        if phi is None:
            return x, labels
        return _warp_image(x, phi), None if labels is None else spatial.warp_labels(labels, phi)

    def sample(self, step: int, batch_size: int = 1, first: int = 0) -> dict[str, torch.Tensor]:
        """Pairs ``first`` to ``first + batch_size - 1`` of the batch of ``step``: ``(B, 1, *shape)``
        tensors, each pair a function of (seed, step, its index), so a process of several draws
        only its slice of a global batch (see :func:`pair_generator`).

        Keys: ``x_a``, ``x_b``; ``labels_a``, ``labels_b`` with labels; ``u_a2b``, ``u_b2a``
        ``(B, ndim, *shape)`` normalised, the known answer of each registration direction, when
        ``targets`` is on, A and B come from one subject and augmentation is on; likewise with
        ``counterparts`` on, ``x_b_on_a`` (B under A's transform: aligned with ``x_a``) and
        ``x_a_on_b``.
        """
        out: dict[str, list] = {"x_a": [], "x_b": [], "labels_a": [], "labels_b": [], "u_a2b": [], "u_b2a": [],
                                "x_b_on_a": [], "x_a_on_b": []}
        for pair in range(first, first + batch_size):
            generator = pair_generator(self.seed, step, pair)
            index, k = self.items[int(torch.randint(len(self.items), (1,), generator=generator))]
            subject = self.subjects[index]
            other = subject
            if self.pairing == "random":
                other = self.subjects[int(torch.randint(len(self.subjects), (1,), generator=generator))]
            labels = self._image(subject, "labels", k)
            labels_other = self._image(other, "labels", k)
            phi_a = self._draw(generator, step)
            near = (self.near_fraction > 0 and phi_a is not None and other is subject
                    and float(torch.rand((), generator=generator)) < self.near_fraction)
            phi_b, relative = self._near(phi_a, generator, step) if near else (self._draw(generator, step), None)
            x_a, labels_a = self._warped(self._image(subject, "a", k), None if labels is None else labels.long(), phi_a)
            x_b, labels_b = self._warped(self._image(other, "b", k),
                                         None if labels_other is None else labels_other.long(), phi_b)
            u_a2b = u_b2a = b_on_a = a_on_b = None
            if self.targets and relative is not None:
                u_a2b, u_b2a = relative, spatial.invert_displacement(relative)
            elif self.targets and phi_a is not None and other is subject:
                # A and B of a subject are co-registered, so the a2b answer is phi_a^-1 o phi_b.
                u_a2b = spatial.compose(spatial.invert_displacement(phi_a), phi_b)
                u_b2a = spatial.compose(spatial.invert_displacement(phi_b), phi_a)
            if self.counterparts and phi_a is not None and other is subject:
                b_on_a = _warp_image(self._image(subject, "b", k), phi_a)
                a_on_b = _warp_image(self._image(subject, "a", k), phi_b)
            # Drawn last, so that a pair's transforms do not depend on the contrast setting.
            if self.contrast_fraction > 0 and float(torch.rand((), generator=generator)) < self.contrast_fraction:
                curve = random_curve(generator)
                x_b = apply_curve(x_b, curve)
                b_on_a = None if b_on_a is None else apply_curve(b_on_a, curve)
            for key, value in zip(out, (x_a, x_b, labels_a, labels_b, u_a2b, u_b2a, b_on_a, a_on_b)):
                out[key].append(value)
        batch = {key: torch.cat(values) for key, values in out.items() if all(v is not None for v in values)}
        return batch

    def validation(self, count: int, seed: int = 12345) -> list[dict[str, torch.Tensor]]:
        """``count`` fixed single-pair batches (same draw every call), for validation Dice."""
        # Validation pairs keep B's stored contrast (contrast_fraction 0), comparable across runs.
        held = PairDataset(self.subjects, self.ndim, self.augment, seed, self.pairing, self.spacing, targets=False)
        held.items = self.items
        return [held.sample(i, 1) for i in range(count)]
