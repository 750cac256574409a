"""firekit's results as napari layer data, without napari: ``(data, kwargs, layer_type)`` tuples.

The napari plugin (``firekit/napari``) is a thin face over these functions; each is a pure function
of volumes and a model, tested without Qt. Layers are placed in physical space by their ``affine``
(voxel index -> RAS mm, as in the NIfTI file), so images of different grids overlay correctly;
deformation vectors are given directly in those world coordinates.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from firekit.explain import maps as explain
from firekit.data import io
from firekit.core import metrics
from firekit.data.pairs import DEFAULT_SPACING, network_grid, resample, to_network
from firekit.core.errors import FirekitError
from firekit.fire.model import Fire

__all__ = ["LayerData", "volume_layer", "layer_volume", "read_nifti", "is_label_file", "demo_pair", "cine_sample",
           "registration_layers", "register_layers", "synthesis_layers", "grad_cam_layers", "REFINE_CHOICES"]

LayerData = tuple  # (data, kwargs, layer_type): napari's LayerDataTuple
LABEL_HINTS = ("label", "seg", "gt", "mask", "aseg", "parc")
# What the Register widget offers for refinement (register's ``refine`` argument).
REFINE_CHOICES = {"auto (tuned preset)": "auto", "off: network only": 0, "10 steps per level": 10,
                  "40 steps per level": 40}


def volume_layer(volume: io.Volume, name: str, layer_type: str = "image", **kwargs) -> LayerData:
    """A Volume as a layer placed by its affine (``metadata`` keeps its file path)."""
    meta = {"name": name, "affine": np.asarray(volume.affine, dtype=np.float64),
            "metadata": {"path": None if volume.path is None else str(volume.path)}, **kwargs}
    return volume.data, meta, layer_type


def layer_volume(data, affine, name: str = "layer") -> io.Volume:
    """A layer's data and ``(n + 1, n + 1)`` data-to-world affine as a Volume (for ``register`` etc.).

    Raises:
        FirekitError: not 2D/3D, or NaN/Inf values (one line naming the layer).
    """
    array = np.asarray(data)
    if array.ndim not in (2, 3):
        raise FirekitError(f"layer {name!r}: expected a 2D or 3D image, got shape {array.shape}; "
                           "pick a single image or volume (not RGB or a time series)")
    if not np.issubdtype(array.dtype, np.integer) and not np.isfinite(array).all():
        raise FirekitError(f"layer {name!r}: NaN/Inf values; replace them before registering")
    return io.Volume(array, np.asarray(affine, dtype=np.float64)[-(array.ndim + 1):, -(array.ndim + 1):])


def is_label_file(path: str | os.PathLike, integer: bool) -> bool:
    """A label map: integer voxels and a name that says so (labels, seg, gt, mask, aseg, parc)."""
    stem = Path(path).name.lower()
    return integer and any(hint in stem for hint in LABEL_HINTS)


def read_nifti(path: str | os.PathLike) -> list[LayerData]:
    """Read a ``.nii``/``.nii.gz`` file as one image or labels layer in physical space."""
    import nibabel as nib

    path = Path(path)
    volume = io.load_volume(path)
    integer = np.issubdtype(nib.load(str(path)).get_data_dtype(), np.integer)
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    if is_label_file(path, integer):
        labels = io.load_labels(path)
        return [volume_layer(labels, name, "labels")]
    return [volume_layer(volume, name, "image", colormap="gray")]


@functools.lru_cache(maxsize=2)
def _demo_subjects(spacing: float, shape: tuple[int, ...], subjects: tuple[int, ...], seed: int) -> dict:
    from firekit.data.braindata import demo_subject

    return {index: demo_subject(index, spacing=spacing, shape=shape, seed=seed) for index in subjects}


def demo_pair(ndim: int = 2, spacing: float = 1.28, shape: Sequence[int] = (128, 160, 128),
              fixed_subject: int = 0, moving_subject: int = 1, seed: int = 0) -> list[LayerData]:
    """Two demo brains (built in memory from MNI152, as ``firekit data demo``): fixed = one subject's
    T1 and labels, moving = another subject's T2-like image and labels (register with ``"b2a"``).

    Args:
        ndim: 2 (an axial slice at 55 % of the height, a 2D pair) or 3 (the volumes).
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    subjects = _demo_subjects(float(spacing), tuple(int(s) for s in shape), (fixed_subject, moving_subject), seed)
    fixed, moving = subjects[fixed_subject], subjects[moving_subject]
    if ndim == 2:
        k = int(round(0.55 * (fixed["T1"].shape[2] - 1)))
        fixed, moving = ({key: _axial_slice(volume, k) for key, volume in s.items()} for s in (fixed, moving))
    return [volume_layer(fixed["T1"], f"fixed T1 (subject {fixed_subject})", colormap="gray"),
            volume_layer(moving["T2"], f"moving T2-like (subject {moving_subject})", colormap="gray",
                         visible=ndim == 2),
            volume_layer(fixed["labels"], "fixed labels", "labels", opacity=0.4, visible=False),
            volume_layer(moving["labels"], "moving labels", "labels", opacity=0.4, visible=False)]


def cine_sample(index: int = 0, seed: int = 0) -> list[LayerData]:
    """A cine phantom patient (``firekit data cine-phantom``'s patient ``index + 1``) as a 3D + time
    image layer and its labels at every phase (phases on the last axis: napari gives it a slider)."""
    from firekit.data.cinephantom import cine_patient

    patient = cine_patient(index, seed=seed)
    affine = np.eye(5)  # (x, y, z, phase): the spatial affine, phases unscaled
    affine[:3, :3], affine[:3, 4] = patient.affine[:3, :3], patient.affine[:3, 3]
    name = f"cine phantom patient{index + 1:03d}"
    return [(patient.series, {"name": f"{name} (ED phase {patient.ed}, ES phase {patient.es})", "affine": affine,
                              "colormap": "gray", "metadata": {"ed": patient.ed, "es": patient.es, **patient.info}},
             "image"),
            (patient.labels, {"name": f"{name} labels (1 RV, 2 myocardium, 3 LV)", "affine": affine,
                              "opacity": 0.4}, "labels")]


def _axial_slice(volume: io.Volume, k: int) -> io.Volume:
    """Slice ``k`` of axis 2 as a 2D Volume (in-plane affine)."""
    from firekit.data.protocol import axial_slice

    data, affine = axial_slice(volume, k)
    return io.Volume(np.ascontiguousarray(data), io.nd_affine(affine, 2))


def _world_points(volume: io.Volume, step: int) -> tuple[np.ndarray, tuple]:
    """World (RAS mm) points of every ``step``-th voxel ``(N, n)``, and the index of those voxels."""
    index = tuple(np.arange(step // 2, s, step) for s in volume.shape)
    grid = np.stack(np.meshgrid(*index, indexing="ij"), axis=-1).reshape(-1, volume.ndim)
    return grid @ volume.affine[:-1, :-1].T + volume.affine[:-1, -1], np.ix_(*index)


def _mean_dice(moving_labels: np.ndarray, fixed_labels: np.ndarray) -> dict[int, float]:
    ids = sorted(int(v) for v in np.union1d(np.unique(fixed_labels), np.unique(moving_labels)) if v != 0)
    return metrics.dice(torch.as_tensor(moving_labels.astype(np.int64)), torch.as_tensor(fixed_labels.astype(np.int64)),
                        labels=ids)


def registration_layers(
    result,
    moving_labels: io.Volume | None = None,
    fixed_labels: io.Volume | None = None,
    grid_step: int = 8,
    name: str = "moving",
) -> tuple[list[LayerData], dict]:
    """Layers of a ``RegistrationResult``, all on the fixed grid, and a report.

    Layers: the warped image; the warped labels (with ``moving_labels``); the deformation as vectors
    from every ``grid_step``-th fixed voxel to the moving point it samples (world mm); the Jacobian
    determinant (1 = volume kept; 0-2 shown blue to red) and the folded voxels (det <= 0) as labels.

    Returns:
        ``(layers, report)``; report: ``folding_percent``, ``dice_before`` / ``dice_after``
        ``{label: Dice}`` when both label maps are given (before = moving labels placed on the fixed
        grid by their own affine, no registration), and ``text``: one line for a status bar.
    """
    fixed = result.fixed
    layers = [volume_layer(result.warped, f"warped {name}", colormap="gray")]
    jacobian = result.jacobian_determinant().astype(np.float32)
    folded = jacobian <= 0
    report = {"folding_percent": float(folded.mean() * 100)}
    if moving_labels is not None:
        warped_labels = result.apply(moving_labels)
        layers.append(volume_layer(warped_labels, f"warped labels {name}", "labels", opacity=0.4))
        if fixed_labels is not None:
            if fixed_labels.shape != fixed.shape:
                raise FirekitError(f"fixed labels shape {fixed_labels.shape} differs from the fixed image's {fixed.shape}")
            placed = resample(moving_labels, fixed.shape, fixed.affine, mode="nearest")[0, 0].numpy()
            report["dice_before"] = _mean_dice(placed, fixed_labels.data)
            report["dice_after"] = _mean_dice(warped_labels.data, fixed_labels.data)
    points, index = _world_points(fixed, max(1, int(grid_step)))
    # ITK/LPS mm -> RAS mm: fixed point x is matched to moving point x + flip(u(x))
    vectors = (result.displacement[index].reshape(-1, fixed.ndim) * io.lps_flip(fixed.ndim)).astype(np.float32)
    layers.append((np.stack([points, vectors], axis=1).astype(np.float32),
                   {"name": f"deformation {name}", "edge_color": "yellow", "edge_width": 0.4, "length": 1.0,
                    "vector_style": "arrow"}, "vectors"))
    layers.append(volume_layer(fixed.with_data(jacobian), f"Jacobian determinant {name}",
                               colormap="RdBu_r", contrast_limits=(0.0, 2.0), visible=False))
    layers.append(volume_layer(fixed.with_data(folded.astype(np.uint8)), f"folded voxels {name}", "labels"))
    text = f"|J| <= 0: {report['folding_percent']:.3f} %"
    if "dice_after" in report:
        before, after = (float(np.mean(list(report[k].values()))) for k in ("dice_before", "dice_after"))
        report["mean_dice_before"], report["mean_dice_after"] = before, after
        text = f"mean Dice {before:.3f} -> {after:.3f}; " + text
    report["text"] = text
    return layers, report


def _network_input(model: Fire, volume: io.Volume, grid_of: io.Volume | None = None):
    """A volume on the model's network grid (of ``grid_of``, default its own), batched as the model
    needs: a 2D model on a 3D volume gets its axial slices ``(Z, 1, X, Y)``. Returns (x, grid affine,
    slicewise)."""
    grid_of = grid_of or volume
    slicewise = model.ndim < grid_of.ndim
    if model.ndim > grid_of.ndim:
        raise FirekitError(f"a {model.ndim}D model cannot run on a {grid_of.ndim}D image; use a {grid_of.ndim}D model")
    spacing = model.spacing or DEFAULT_SPACING
    shape, affine = network_grid(grid_of, [spacing, spacing, None] if slicewise else spacing,
                                 model.size_multiple, model.min_size)
    x = to_network(volume, shape, affine)
    return (x[0, 0].movedim(-1, 0)[:, None] if slicewise else x), affine, slicewise


def _unbatch(x: torch.Tensor, slicewise: bool) -> np.ndarray:
    """``(B, *S)`` network maps -> ``(*S)`` array (slices back to the last axis)."""
    return (x.movedim(0, -1) if slicewise else x[0]).float().numpy()


def _in_chunks(function, x: torch.Tensor, size: int = 16) -> torch.Tensor:
    return torch.cat([function(chunk) for chunk in x.split(size)])


def synthesis_layers(model: Fire, image: io.Volume, direction: str = "a2b", channels: Sequence[int] = (0, 1, 2),
                     pca: bool = True, name: str = "image") -> list[LayerData]:
    """F's synthesis of ``image`` in the other modality and G's feature channels, as layers.

    Args:
        image: modality A for ``"a2b"`` (synthesis F_AB(G(x)) in B's contrast), B for ``"b2a"``.
        channels: G's channels to add, one layer each.
        pca: also add G's three principal components as an RGB layer.

    Returns:
        layers on the network grid (normalised intensities in [-1, 1]); features on G's grid, four
        times coarser, voxel j centred on network voxel 4j (the stride-2 convolutions' centres).
    """
    model.eval()
    x, affine, slicewise = _network_input(model, image)
    with torch.inference_mode():
        synthesised = _in_chunks(lambda c: model.synthesise(c, direction), x)[:, 0]
        features = _in_chunks(model.encoder, x)
    bad = [c for c in channels if not 0 <= int(c) < features.shape[1]]
    if bad:
        raise FirekitError(f"G has channels 0..{features.shape[1] - 1}; {bad} do not exist")
    target = "B" if direction == "a2b" else "A"
    layers = [(_unbatch(synthesised, slicewise), {"name": f"synthesised {target} from {name}", "affine": affine,
                                                 "colormap": "gray", "contrast_limits": (-1.0, 1.0)}, "image")]
    scale = np.diag([4.0] * (model.ndim) + [1.0] * (image.ndim - model.ndim + 1))
    feature_affine = affine @ scale
    for c in channels:
        layers.append((_unbatch(features[:, int(c)], slicewise), {"name": f"G({name}) channel {int(c)}",
                                                                  "affine": feature_affine, "colormap": "viridis",
                                                                  "visible": False}, "image"))
    if pca:
        stack = features.movedim(0, -1)[None] if slicewise else features  # (1, C, *s): one sample
        rgb = explain.features_to_rgb(stack)[0].movedim(0, -1).numpy()  # (*s, 3)
        layers.append((np.ascontiguousarray(rgb), {"name": f"G({name}) principal components", "rgb": True,
                                                   "affine": feature_affine, "visible": False}, "image"))
    return layers


def grad_cam_layers(model: Fire, moving: io.Volume, fixed: io.Volume, component: str, direction: str = "b2a",
                    name: str = "moving", roi: io.Volume | None = None,
                    target: tuple[int, int] | None = None) -> list[LayerData]:
    """Grad-CAM of ``component`` (``explain.TARGETS``) for the pair, as a heat-map layer on the fixed
    image's network grid (in world space it lies over the moving image as the network saw it).

    Args:
        roi: a label map placed in world space by its affine; the scalar is measured where it is
            non-zero (encoder, nonrigid, decoder).
        target: the affine entry ``(i, j)`` explained (affine; default the translation along axis 0).

    A 2D model on volumes explains each axial slice (each slice's map divided by its own maximum).
    """
    if target is not None and not (len(target) == 2 and 0 <= target[0] < model.ndim and 0 <= target[1] <= model.ndim):
        raise FirekitError(f"affine entry {tuple(target)} does not exist: a {model.ndim}D affine has rows "
                           f"0..{model.ndim - 1} and columns 0..{model.ndim}")
    model.eval()
    x_fixed, affine, slicewise = _network_input(model, fixed)
    x_moving, _, _ = _network_input(model, moving, grid_of=fixed)
    mask = None
    if roi is not None:
        mask = (resample(roi, x_fixed.shape[2:] if not slicewise else (*x_fixed.shape[2:], x_fixed.shape[0]),
                         affine, mode="nearest") > 0).float()
        if not mask.any():
            raise FirekitError(f"the ROI {roi.name} has no voxel inside the fixed image's grid; pick labels drawn there")
        mask = mask[0, 0].movedim(-1, 0)[:, None] if slicewise else mask
    masks = mask.split(16) if mask is not None else [None] * len(x_fixed.split(16))
    maps = torch.cat([explain.grad_cam(model, m, f, component, direction, target=target, roi=r)
                      for m, f, r in zip(x_moving.split(16), x_fixed.split(16), masks)])
    suffix = "" if roi is None else " in ROI"
    return [(_unbatch(maps, slicewise), {"name": f"Grad-CAM {component} ({direction}){suffix} {name}", "affine": affine,
                                         "colormap": "turbo", "contrast_limits": (0.0, 1.0), "opacity": 0.5,
                                         "blending": "additive"}, "image")]


def register_layers(model: Fire | None, moving: io.Volume, fixed: io.Volume, moving_labels: io.Volume | None = None,
                    fixed_labels: io.Volume | None = None, grid_step: int = 8, name: str = "moving",
                    **options) -> tuple[list[LayerData], dict]:
    """``register(model, moving, fixed, **options)`` then :func:`registration_layers` (layer names
    end with ``name``); the report adds ``seconds`` (registration only)."""
    from firekit.registration.pipeline import register

    tick = time.perf_counter()
    result = register(model, moving, fixed, **options)
    seconds = time.perf_counter() - tick
    layers, report = registration_layers(result, moving_labels, fixed_labels, grid_step, name)
    report["seconds"] = seconds
    report["text"] += f"; {seconds:.1f} s"
    return layers, report
