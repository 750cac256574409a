"""Cardiac cine series (2D + time or 3D + time): loading, saving and registering every phase to a
reference phase (Sections 4.2 and 5.2 of the paper: intra-modality, the same model).

A :class:`Series` is an array ``(*S, T)`` (phases last, as in a 4D NIfTI) with the spatial
``(n + 1, n + 1)`` voxel-to-world affine of its frames.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from firekit.data import io
from firekit.data.series import Series, load_series, save_series
from firekit.core import spatial
from firekit.core.errors import FirekitError

__all__ = ["Series", "load_series", "save_series", "reference_phase", "register_cine", "CineResult", "CinePairs", "evaluate_ed_es",
           "score_labels"]


def reference_phase(reference, phases: int, ed: int | None = None, es: int | None = None) -> int:
    """A 0-based phase from ``"ED"``, ``"ES"`` (needs ``ed`` / ``es``; ED defaults to phase 0, as in
    ACDC's frame01) or an integer (negative counts from the end)."""
    if isinstance(reference, str) and reference.upper() in ("ED", "ES"):
        key = reference.upper()
        value = (0 if ed is None else ed) if key == "ED" else es
        if value is None:
            raise FirekitError("reference ES needs the end-systolic phase: es= (--es), an ACDC Info.cfg beside "
                               "the series, or a phase index instead")
    else:
        try:
            value = int(reference)
        except (TypeError, ValueError):
            raise FirekitError(f"reference must be ED, ES or a phase index, got {reference!r}") from None
    if not -phases <= value < phases:
        raise FirekitError(f"reference phase {value} does not exist (0..{phases - 1})")
    return value % phases


@dataclass
class CineResult:
    """Every phase of a series registered to one reference phase, on the reference frame's grid.

    Attributes:
        warped: the series with each phase warped onto the reference (a motion-compensated series).
        displacement: ``(*S, T, n)`` mm, ITK/LPS signs: phase t's point = reference point + u_t.
        reference: the reference phase (0-based); its displacement is exactly zero.
        series: the input.
        seconds: registration time (all phases).
    """

    warped: Series
    displacement: np.ndarray
    reference: int
    series: Series
    seconds: float
    moving_points: torch.Tensor = field(repr=False)  # (T, n, *S) phase-t voxel of each reference voxel
    grid_displacement: torch.Tensor = field(repr=False)  # (T, n, *G) normalised, on the registration grid
    grid_affine: np.ndarray = field(repr=False)

    @functools.cached_property
    def reference_points(self) -> torch.Tensor:
        """``(T, n, *S)`` reference voxel of each phase-t voxel, through the inverted fields (computed
        on first use: only :meth:`propagate` needs it)."""
        from firekit.registration.pipeline import world_mapping

        inverse = spatial.invert_displacement(self.grid_displacement)
        frame = self.series.phase(self.reference)
        return torch.cat([world_mapping(spatial.normalised_to_voxel(inverse[t:t + 1]), self.grid_affine, frame,
                                        self.series.affine)[1] for t in range(self.series.phases)])

    def apply(self, labels: io.Volume | np.ndarray, phase: int) -> io.Volume:
        """Warp a label map drawn on ``phase`` onto the reference grid (nearest neighbour)."""
        return io.Volume(_sample_labels(labels, self.moving_points[phase:phase + 1], self.series),
                         self.series.affine.copy())

    def propagate(self, labels: io.Volume | np.ndarray) -> np.ndarray:
        """Carry a label map drawn on the reference phase to every phase: ``(*S, T)`` integers."""
        return np.stack([_sample_labels(labels, self.reference_points[t:t + 1], self.series)
                         for t in range(self.series.phases)], axis=-1)

    def jacobian_determinant(self, phase: int | None = None) -> np.ndarray:
        """``(*S, T)`` Jacobian determinant of each phase's mapping (1 at the reference), or ``(*S)``
        of one ``phase``."""
        from firekit.registration.pipeline import field_jacobian

        if phase is not None:
            return field_jacobian(self.displacement[..., phase, :], self.series.affine)
        return np.stack([field_jacobian(self.displacement[..., t, :], self.series.affine)
                         for t in range(self.series.phases)], axis=-1)

    def save(self, out_dir: str | os.PathLike, labels: io.Volume | None = None, protect=()) -> dict[str, Path]:
        """Write ``warped_4d.nii.gz``, ``field_4d.nii.gz`` (``(X, Y, Z, T, n)`` ITK vectors per phase)
        and, with reference-phase ``labels``, ``labels_4d.nii.gz`` (propagated to every phase)."""
        out_dir = Path(out_dir)
        protect = [*protect, self.series.path]
        names = {"warped": "warped_4d.nii.gz", "field": "field_4d.nii.gz", "labels": "labels_4d.nii.gz"}
        io.check_output_folder(out_dir, protect)
        for name in names.values():
            io.check_output_path(out_dir / name, protect)
        propagated = None if labels is None else self.propagate(labels).astype(np.int16)  # may refuse the labels
        created = not out_dir.exists()
        field_data = self.displacement if self.series.ndim == 3 else self.displacement[:, :, None]
        written = {}
        try:
            with io.all_or_nothing(out_dir / name for name in names.values()):
                written["warped"] = save_series(self.warped.data, self.series.affine, out_dir / names["warped"],
                                                header=self.series.header, dtype=np.float32, protect=protect)
                written["field"] = io.save_nifti(field_data, self.series.affine, out_dir / names["field"],
                                                 header=self.series.header, dtype=np.float32,
                                                 intent=io.NIFTI_INTENT_VECTOR, protect=protect)
                if propagated is not None:
                    written["labels"] = save_series(propagated, self.series.affine, out_dir / names["labels"],
                                                    header=self.series.header, dtype=np.int16, protect=protect)
        except BaseException:
            if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            raise
        return written


def _sample_labels(labels, points: torch.Tensor, series: Series) -> np.ndarray:
    data = np.asarray(getattr(labels, "data", labels))
    if data.shape != series.shape:
        name = getattr(labels, "name", "labels")
        raise FirekitError(f"{name}: shape {data.shape} differs from the series' frames {series.shape}; "
                           "pass labels drawn on a frame of this series")
    source = torch.as_tensor(data.astype(np.float32))[None, None]
    out = spatial.sample(source, points.float(), mode="nearest", padding_mode="zeros")[0, 0].numpy()
    return np.rint(out).astype(np.int32)


# Refinement for cine ("auto"): the brain presets' regulariser is too stiff for a contracting ventricle
# (radial motion of 10 mm and more) and their moments start is wrong for phases of one acquisition,
# which start aligned (breath-hold): no affine stage, the identity start. A coarser first level (1/4),
# a weaker diffusion weight on a stationary velocity field (diffeomorphic: a weaker weight on a plain
# displacement followed the motion but folded 1-3 %). 3D (thick slices: a 1/4 level leaves 2-3 of
# them): levels 1/2 and 1 and 10 % of the voxels per step, mean ED -> ES Dice 0.808 / 0.856 on phantom
# seeds 0 / 50 (3 + 4 patients) against 0.775 / 0.791 with the 2D levels; an affine stage lost 0.01-0.06.
# The control grids as measured here (6 voxels in 2D, 4 in 3D), and MIND alone in the non-rigid stage,
# whatever the brain presets' spacing and similarity.
_CINE = dict(weight=0.01, field_lr=0.02, diffeomorphic=True, field_similarity=None)
CINE_REFINE = {2: dict(_CINE, field_levels=(4, 2, 1), field_iterations=(80, 40, 20), affine_iterations=(0, 0),
                       grid_spacing=6),
               3: dict(_CINE, field_levels=(2, 1), field_iterations=(80, 40), field_sampling=0.1,
                       affine_iterations=(0,), grid_spacing=4)}


def cine_refine_config(refine, ndim: int, seed: int = 0):
    """``refine`` for cine: ``"auto"`` is :data:`CINE_REFINE` over the ndim preset; K > 0 the same with
    K steps per non-rigid level; 0/None off; a ``RefineConfig`` as it is."""
    from firekit.registration.refine import RefineConfig
    from firekit.registration.pipeline import refine_config

    if isinstance(refine, str) and refine == "auto" or refine is True:
        return RefineConfig.preset(ndim, **CINE_REFINE[ndim], seed=seed)
    if isinstance(refine, int) and not isinstance(refine, bool) and refine > 0:
        levels = CINE_REFINE[ndim]["field_levels"]
        return RefineConfig.preset(ndim, **{**CINE_REFINE[ndim], "field_iterations": (int(refine),) * len(levels)},
                                   seed=seed)
    return refine_config(refine, ndim, seed)


def _solve_phases(model, x_moving: torch.Tensor, x_fixed: torch.Tensor, config, direction: str, device,
                  factor: int, progress: bool) -> torch.Tensor:
    """Network and/or refinement for a batch of phases -> ``(B, n, *S)`` normalised displacement.

    Refinement starts from the network's affine and flow, or from the identity (not from moments:
    the phases of one acquisition are already aligned but for the motion)."""
    from firekit.registration.network import run_network
    from firekit.registration.refine import refine

    theta = flow = None
    if model is not None:
        theta, disp, _, flow = run_network(model, x_moving, x_fixed, direction, False, device, factor)
        if config is None:
            return disp
    if theta is None:
        theta = spatial.identity_affine(x_fixed.ndim - 2, x_fixed.shape[0])
    with torch.enable_grad():
        result = refine(x_moving.to(device), x_fixed.to(device), theta0=theta.to(device),
                        displacement0=None if flow is None else flow.to(device), config=config, progress=progress)
    return result.displacement.detach().cpu()


def register_cine(
    model,
    series: Series,
    reference=0,
    ed: int | None = None,
    es: int | None = None,
    refine="auto",
    direction: str = "a2b",
    spacing: float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> CineResult:
    """Register every phase of ``series`` to its ``reference`` phase, phases batched.

    Intra-modality: each phase is the moving image, the reference phase the fixed one, on the
    reference frame's grid (``spacing`` None keeps the native voxel size, e.g. 1.5 x 1.5 x 8 mm).

    Args:
        model: a FIRE model of the frames' ndim (e.g. trained with ``firekit train --cine``), or
            None for refinement alone. A 2D model on 3D frames needs refinement (it then refines
            in 3D from moments, as ``register`` does).
        reference: ``"ED"``, ``"ES"`` or a 0-based phase (see :func:`reference_phase`).
        ed, es: the 0-based end-diastolic / end-systolic phases, when known (ACDC's Info.cfg).
        refine: ``"auto"`` (:data:`CINE_REFINE`), 0 for the network alone, K steps per level, or a
            ``RefineConfig``.
        batch_size: phases per batch (network and refinement run on a batch at once).
    """
    from firekit.data.pairs import network_grid, to_network
    from firekit.registration.network import network_factor

    n, phases = series.ndim, series.phases
    ref = reference_phase(reference, phases, ed, es)
    config = cine_refine_config(refine, n, seed)
    if model is None and config is None:
        raise FirekitError("no model and no refinement: pass a model, or refine='auto'")
    model_name = getattr(model, "path", None) or "model"
    if model is not None and model.ndim > n:
        raise FirekitError(f"{model_name}: a {model.ndim}D model cannot register the {n}D frames of {series.name}; "
                           f"use a {n}D model (or --model none)")
    solver_model = model if model is not None and model.ndim == n else None
    if model is not None and solver_model is None and config is None:
        raise FirekitError(f"{model_name}: a {model.ndim}D model on the {n}D frames of {series.name} needs refinement "
                           "(--refine auto) or a 3D model trained with --cine")
    # refinement alone needs no padding for a network (a series of 10 slices stays 10, not 32)
    multiple, min_size = (model.size_multiple, model.min_size) if solver_model is not None else (1, 4)
    frame = series.phase(ref)
    shape, grid_affine = network_grid(frame, spacing, multiple, min_size)
    device = torch.device(device) if device is not None else (
        next(model.parameters()).device if model is not None else torch.device("cpu"))
    x_fixed = to_network(frame, shape, grid_affine)
    x_phases = torch.cat([to_network(series.phase(t), shape, grid_affine) for t in range(phases)])
    if solver_model is not None:
        solver_model.eval()
    factor = network_factor(solver_model, shape, grid_affine)
    others = [t for t in range(phases) if t != ref]
    displacement = torch.zeros(phases, n, *shape, dtype=torch.float32)
    tick = time.perf_counter()
    for start in range(0, len(others), max(1, int(batch_size))):
        chunk = others[start:start + max(1, int(batch_size))]
        fixed_batch = x_fixed.expand(len(chunk), *x_fixed.shape[1:])
        displacement[chunk] = _solve_phases(solver_model, x_phases[chunk], fixed_batch, config, direction, device,
                                            factor, progress).float()
    return _cine_result(series, ref, frame, displacement, grid_affine, time.perf_counter() - tick)


def _cine_result(series: Series, ref: int, frame: io.Volume, displacement: torch.Tensor, grid_affine: np.ndarray,
                 seconds: float) -> CineResult:
    """The phases' normalised displacements ``(T, n, *G)`` on the registration grid (``grid_affine``) carried
    onto the reference ``frame``'s grid: in mm, as phase voxels, and each phase warped."""
    from firekit.registration.pipeline import world_mapping

    fields, forward, warped = [], [], []
    for t in range(series.phases):
        mm, points = world_mapping(spatial.normalised_to_voxel(displacement[t:t + 1]), grid_affine, frame, series.affine)
        source = torch.as_tensor(np.asarray(series.data[..., t], dtype=np.float32))[None, None]
        warped.append(spatial.sample(source, points.float(), padding_mode="zeros")[0, 0].numpy())
        fields.append(mm)
        forward.append(points)
    return CineResult(
        warped=Series(np.stack(warped, axis=-1), series.affine.copy(), series.header),
        displacement=np.stack(fields, axis=-2),
        reference=ref,
        series=series,
        seconds=seconds,
        moving_points=torch.cat(forward),
        grid_displacement=displacement,
        grid_affine=grid_affine,
    )


def score_labels(warped: np.ndarray, fixed: np.ndarray, spacing, jacobian: np.ndarray | None = None) -> dict:
    """Dice and HD95 (mm) per ACDC label (``acdc.LABEL_NAMES``) and % |J| <= 0 of ``jacobian``."""
    from firekit.core import metrics
    from firekit.data.acdc import LABEL_NAMES

    ids = list(LABEL_NAMES)
    dice = metrics.dice(torch.as_tensor(np.asarray(warped, np.int64)), torch.as_tensor(np.asarray(fixed, np.int64)),
                        labels=ids)
    hd = metrics.hd95(warped, fixed, spacing=spacing, labels=ids)
    return {"dice": {LABEL_NAMES[k]: float(dice[k]) for k in ids}, "hd95": {LABEL_NAMES[k]: float(hd[k]) for k in ids},
            "folding_percent": 0.0 if jacobian is None else float((jacobian <= 0).mean() * 100)}


def evaluate_ed_es(model, patient, refine="auto", seed: int = 0) -> dict:
    """The paper's Table 3 for one ACDC patient: end-diastole registered onto end-systole, the ED
    labels warped and scored against the ES labels.

    Every phase of the series is registered to ES in the call (so ``seconds`` is per series).

    Returns:
        ``{"unaligned": scores, "registered": scores, "seconds": s, "phases": T}``, scores as
        :func:`score_labels`.
    """
    series = patient.series()
    labels_ed, labels_es = patient.labels(patient.ed), patient.labels(patient.es)
    for labels in (labels_ed, labels_es):
        if not (labels.data > 0).any():
            raise FirekitError(f"{labels.name}: ground truth is empty (no label > 0); nothing to score; "
                               "fix or re-download it, or move the patient out of --data")
    result = register_cine(model, series, reference=patient.es, ed=patient.ed, es=patient.es, refine=refine, seed=seed)
    spacing = io.spacing(series.affine)
    warped = result.apply(labels_ed, patient.ed).data
    return {"unaligned": score_labels(labels_ed.data, labels_es.data, spacing),
            "registered": score_labels(warped, labels_es.data, spacing,
                                       result.jacobian_determinant(patient.ed)),
            "seconds": result.seconds, "phases": series.phases}


class CinePairs:
    """Training pairs of phases of cine series, intra-modality (Section 4.2: A and B are two phases
    of one series, drawn across the whole cycle). The trainer's *pair source*.

    ``sample(step, n)`` depends only on ``(seed, step)``: each pair picks a series, two different
    phases (and an axial slice with enough foreground for a 2D model on 3D frames).

    Args:
        series: the series (all 2D + t, or all 3D + t), each on its own network grid (padded to one
            common shape).
        ndim: the model's ndim (2 on 3D frames: slices).
        spacing: mm per network voxel (None: each series' own).
        labels: per series, ``{phase: Volume}`` of its labelled phases (ACDC's ED and ES), for
            :meth:`validation`.
    """

    def __init__(self, series: list[Series], ndim: int, spacing: float | None = None, seed: int = 0,
                 labels: list[dict] | None = None, min_foreground: float = 0.15, names: list[str] | None = None):
        from firekit.data.pairs import _pad_to, field_of_view, foreground_fraction, network_grid, resample, to_network

        if not series:
            raise FirekitError("no cine series to train on")
        frame_ndim = series[0].ndim
        if any(s.ndim != frame_ndim for s in series):
            raise FirekitError("the series mix 2D + t and 3D + t; use one kind")
        if ndim not in (frame_ndim, frame_ndim - 1) or ndim not in (2, 3):
            raise FirekitError(f"a {ndim}D model cannot train on {frame_ndim}D frames")
        self.ndim, self.seed, self.spacing = ndim, int(seed), spacing
        self.slicewise = frame_ndim == 3 and ndim == 2
        self.names = names or [s.name for s in series]
        grid_spacing = [spacing, spacing, None] if self.slicewise else spacing
        tensors, label_tensors, views = [], [], []
        for index, item in enumerate(series):
            shape, affine = network_grid(item.phase(0), grid_spacing)
            tensors.append(torch.cat([to_network(item.phase(t), shape, affine) for t in range(item.phases)]))
            views.append(field_of_view(item.phase(0), shape, affine))
            known = (labels or [{}] * len(series))[index] or {}
            label_tensors.append({t: resample(v, shape, affine, mode="nearest").round().long() for t, v in known.items()})
        spatial_shape = [max(t.shape[2 + i] for t in tensors) for i in range(frame_ndim)]
        self.phases = [_pad_to(t, spatial_shape, -1.0) for t in tensors]
        views = [_pad_to(v.float(), spatial_shape, 0.0) > 0.5 for v in views]
        self.labels = [{k: _pad_to(v.float(), spatial_shape, 0.0).long() for k, v in known.items()}
                       for known in label_tensors]
        self.shape = tuple(spatial_shape[:ndim])
        # (series, slice or -1)
        self.items = []
        for index, stack in enumerate(self.phases):
            if not self.slicewise:
                self.items.append((index, -1))
                continue
            foreground = foreground_fraction(stack, views[index])
            self.items += [(index, int(k)) for k in torch.nonzero(foreground >= min_foreground).flatten()]
        if not self.items:
            names = ", ".join(self.names[:3]) + (", ..." if len(self.names) > 3 else "")
            raise FirekitError(f"{names}: no slice has {min_foreground:.0%} foreground; check the series "
                               "(mostly background?) or train with --ndim 3")

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict:
        return {"cine": True, "series": self.names, "ndim": self.ndim, "slicewise": self.slicewise,
                "shape": list(self.shape), "spacing": self.spacing, "seed": self.seed}

    @staticmethod
    def _take(x: torch.Tensor, k: int) -> torch.Tensor:
        return x[..., k] if k >= 0 else x

    def sample(self, step: int, batch_size: int = 1, first: int = 0) -> dict[str, torch.Tensor]:
        """``{"x_a", "x_b"}``: ``(B, 1, *shape)``, two different phases of one series per pair;
        pairs ``first`` to ``first + batch_size - 1`` of the batch of ``step`` (as
        :meth:`firekit.data.pairs.PairDataset.sample`)."""
        from firekit.data.pairs import pair_generator

        a, b = [], []
        for pair in range(first, first + batch_size):
            generator = pair_generator(self.seed, step, pair)
            index, k = self.items[int(torch.randint(len(self.items), (1,), generator=generator))]
            stack = self.phases[index]
            i, j = torch.randperm(stack.shape[0], generator=generator)[:2].tolist()
            a.append(self._take(stack[i:i + 1], k))
            b.append(self._take(stack[j:j + 1], k))
        return {"x_a": torch.cat(a), "x_b": torch.cat(b)}

    def validation(self, count: int = 8) -> list[dict[str, torch.Tensor]]:
        """Fixed ED <-> ES batches (phases with labels), at most ``count``; each slice with labels for
        a 2D model. Empty when no series has two labelled phases."""
        batches = []
        for index, known in enumerate(self.labels):
            if len(known) < 2:
                continue
            (p, lp), (q, lq) = sorted(known.items())[:2]
            stack = self.phases[index]
            slices = [k for i, k in self.items if i == index] if self.slicewise else [-1]
            for k in slices:
                la, lb = self._take(lp, k), self._take(lq, k)
                if self.slicewise and not (la.any() and lb.any()):
                    continue
                batches.append({"x_a": self._take(stack[p:p + 1], k), "x_b": self._take(stack[q:q + 1], k),
                                "labels_a": la, "labels_b": lb})
        step = max(1, len(batches) // max(1, count))
        return batches[::step][:count]
