"""Pictures of registrations and the controls to browse them.

Pictures (matplotlib, Agg-safe, return arrays or Figures): :func:`overlay`, :func:`checkerboard`,
difference images, :func:`draw_grid`, :func:`draw_jacobian` (folding outlined),
:func:`registration_figure`, :func:`affine_parameters`.

Controls (ipywidgets, imported only when used): :func:`interactive_figure` redraws a figure into an
``Output`` widget as a PNG whenever a control changes (offline-safe: no JavaScript beyond
ipywidgets' own); :func:`explore_registration`, :func:`explore_features`, :func:`explore_grad_cam`,
:func:`view_slices` and :func:`view3d` are built on it (slice, direction A->B / B->A, component,
channel and phase controls).
"""

from __future__ import annotations

import base64
import importlib.util
import io as _bytes_io
import os
import socket
from typing import Callable, Sequence

import numpy as np
import torch

from firekit.core import spatial

__all__ = ["show_image", "checkerboard", "overlay", "difference", "draw_grid", "draw_point_grid", "draw_jacobian", "network_slice",
           "registration_figure", "affine_parameters", "figure_png", "interactive_figure",
           "explore_registration", "explore_features", "explore_grad_cam", "view_slices", "view3d", "explore_cine", "LossPlot"]


def _pyplot():
    """matplotlib.pyplot, on the Agg backend unless one was chosen already (Jupyter sets its own)."""
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_2d(image) -> np.ndarray:
    array = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2D image after squeezing, got shape {array.shape}")
    return array


def show_image(ax, image, title: str | None = None, **imshow_options):
    """``imshow`` a 2D image (or ``(H, W, 3)`` RGB) with array axis 0 to the right and axis 1 up
    (RAS x, y for axial slices: the usual orientation of a brain slice); returns the AxesImage."""
    array = np.asarray(image.detach().cpu() if torch.is_tensor(image) else image)
    array = _as_2d(array) if array.ndim != 3 or array.shape[-1] != 3 else array
    shown = ax.imshow(np.swapaxes(array, 0, 1), origin="lower", **imshow_options)
    if title is not None:
        ax.set_title(title)
    return shown


def _unit(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Stretch intensities between two percentiles to [0, 1]."""
    lo, hi = np.percentile(image, [low, high])
    return np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)


def overlay(fixed, moving) -> np.ndarray:
    """RGB ``(H, W, 3)`` in [0, 1]: fixed in green, moving in magenta (grey where they agree)."""
    fixed, moving = _unit(_as_2d(fixed)), _unit(_as_2d(moving))
    if fixed.shape != moving.shape:
        raise ValueError(f"overlay needs equal shapes, got {fixed.shape} and {moving.shape}")
    return np.stack([moving, fixed, moving], axis=-1)


def difference(a, b) -> np.ndarray:
    """``a - b`` of two 2D images after stretching each to [0, 1] (so different contrasts compare)."""
    a, b = _unit(_as_2d(a)), _unit(_as_2d(b))
    if a.shape != b.shape:
        raise ValueError(f"difference needs equal shapes, got {a.shape} and {b.shape}")
    return a - b


def checkerboard(a, b, tiles: int = 8) -> np.ndarray:
    """Interleave two 2D images of the same shape in ``tiles`` x ``tiles`` squares."""
    a, b = _as_2d(a), _as_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"checkerboard needs equal shapes, got {a.shape} and {b.shape}")
    rows = (np.arange(a.shape[0]) * tiles // a.shape[0])[:, None]
    cols = (np.arange(a.shape[1]) * tiles // a.shape[1])[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def draw_point_grid(ax, points, step: int = 4, color: str = "yellow", linewidth: float = 0.6) -> None:
    """Draw lines through a grid of points given in the voxel coordinates of the image on ``ax``.

    Args:
        ax: matplotlib axes holding an image drawn by :func:`show_image` (axis 0 across, axis 1 up).
        points: ``(1, 2, H, W)`` positions (e.g. ``fields.moving_points``: where each fixed voxel
            lands in the moving image); every ``step``-th row and column is drawn.
    """
    points = points.detach().cpu().numpy() if torch.is_tensor(points) else np.asarray(points)
    if points.ndim != 4 or points.shape[:2] != (1, 2):
        raise ValueError(f"draw_point_grid needs (1, 2, H, W) points, got {tuple(points.shape)}")
    along_0, along_1 = points[0]
    limits = ax.get_xlim(), ax.get_ylim()  # keep the image's frame: grid lines may leave it
    for i in range(0, along_0.shape[0], step):
        ax.plot(along_0[i, :], along_1[i, :], color=color, linewidth=linewidth)
    for j in range(0, along_0.shape[1], step):
        ax.plot(along_0[:, j], along_1[:, j], color=color, linewidth=linewidth)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])


def draw_grid(ax, displacement: torch.Tensor, step: int = 4, color: str = "yellow", linewidth: float = 0.6) -> None:
    """Draw the deformed grid ``x + u(x)`` of a 2D field over the MOVING image drawn by :func:`show_image`.

    Each line joins the moving-image positions that land on one row (or column) of the fixed
    grid: a regular grid on the fixed image, as the moving image sees it (moving and fixed on the
    same grid, as the network's are; for files on different grids use :func:`draw_point_grid`
    with ``fields.moving_points``).

    Args:
        ax: matplotlib axes holding the image (array axis 0 across, axis 1 up).
        displacement: ``(1, 2, H, W)`` normalised displacement.
        step: spacing of grid lines in pixels.
    """
    if displacement.ndim != 4 or displacement.shape[:2] != (1, 2):
        raise ValueError(f"draw_grid needs a (1, 2, H, W) field, got {tuple(displacement.shape)}")
    shape = displacement.shape[2:]
    points = spatial.normalised_to_voxel(spatial.identity_grid(shape, like=displacement) + displacement, shape)
    points = points.detach().cpu().numpy() + np.array([(s - 1) / 2 for s in shape])[None, :, None, None]
    draw_point_grid(ax, points, step, color, linewidth)


def draw_jacobian(ax, jacobian, colorbar: bool = True):
    """Show a 2D Jacobian-determinant map (1 = volume kept; blue < 1 contraction, red > 1
    expansion) with the folded voxels (det <= 0) outlined in black; returns the fraction folded."""
    jacobian = _as_2d(jacobian)
    shown = show_image(ax, jacobian, cmap="RdBu_r", vmin=0, vmax=2)
    folded = jacobian <= 0
    if folded.any():
        ax.contour(folded.T, levels=[0.5], colors="black", linewidths=0.8, origin="lower")
    ax.set_title(f"Jacobian det. ({folded.mean():.2%} folded)")
    if colorbar:
        ax.figure.colorbar(shown, ax=ax, fraction=0.046)
    return float(folded.mean())


def network_slice(view, index: int | None = None) -> dict:
    """One 2D slice of a registration's network view, for pictures.

    Args:
        view: a ``RegistrationResult`` or its ``NetworkView`` (2D pair, a 2D model's slices of a
            volume, or a 3D volume, sliced along its last axis).
        index: the slice (default the middle one).

    Returns:
        ``moving``, ``fixed``, ``warped`` (2D arrays), ``displacement`` ``(1, 2, H, W)`` in-plane
        normalised field, ``jacobian`` (2D, of the full field), ``index``, ``count`` (slices).
    """
    view = getattr(view, "network", view)
    field = view.displacement.detach().cpu()
    batch, n = field.shape[:2]
    count = batch if n == 2 else field.shape[-1]
    index = count // 2 if index is None else int(index)
    if not 0 <= index < count:
        raise ValueError(f"slice {index} is outside 0..{count - 1}")
    if n == 2:
        pick = (lambda x: x[index, 0]) if batch > 1 else (lambda x: x[0, 0])
        plane = field[index:index + 1] if batch > 1 else field[:1]
        jacobian = spatial.jacobian_determinant(plane)[0]
    else:
        pick = lambda x: x[0, 0, ..., index]  # noqa: E731
        plane = field[:1, :2, ..., index]
        jacobian = spatial.jacobian_determinant(field[:1])[0, ..., index]
    images = {k: pick(getattr(view, k).detach().cpu()).numpy() for k in ("moving", "fixed", "warped")}
    return {**images, "displacement": plane, "jacobian": jacobian.numpy(), "index": index, "count": count}


def registration_figure(
    moving,
    fixed,
    warped,
    displacement: torch.Tensor,
    synthesised=None,
    titles: Sequence[str] = ("moving", "fixed", "warped moving"),
):
    """One row: moving, fixed, warped, checkerboard, difference, grid, Jacobian (and synthesis).

    Args:
        moving, fixed, warped: 2D images (tensors or arrays, singleton dims allowed).
        displacement: ``(1, 2, H, W)`` normalised field that produced ``warped``.
        synthesised: optional image of F's synthesis to show as well.

    Returns:
        a matplotlib Figure (the caller saves or displays and closes it).
    """
    plt = _pyplot()
    panels = 7 + (synthesised is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.4 * panels, 2.8))
    for ax, image, title in zip(axes[:3], (moving, fixed, warped), titles):
        show_image(ax, _as_2d(image), cmap="gray")
        ax.set_title(title)
    show_image(axes[3], checkerboard(_unit(_as_2d(fixed)), _unit(_as_2d(warped))), cmap="gray")
    axes[3].set_title("checkerboard")
    show_image(axes[4], difference(warped, fixed), cmap="coolwarm", vmin=-1, vmax=1)
    axes[4].set_title("warped - fixed")
    show_image(axes[5], _as_2d(moving), cmap="gray")  # x + u(x) are moving-image positions
    draw_grid(axes[5], displacement, step=max(2, displacement.shape[-1] // 16))
    axes[5].set_title("grid on moving")
    draw_jacobian(axes[6], spatial.jacobian_determinant(displacement.detach()))
    if synthesised is not None:
        show_image(axes[7], _as_2d(synthesised), cmap="gray")
        axes[7].set_title("synthesised")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def affine_parameters(matrix) -> dict:
    """Read an affine as rotation, scale, shear and translation: ``A = R @ diag(scale) @ H``.

    ``R`` is a rotation, ``H`` unit upper-triangular (its entries above the diagonal are the shears),
    from the QR decomposition of the linear part, with the signs chosen so the scales are positive
    (a reflection, det < 0, shows as a negative last scale).

    Args:
        matrix: ``(n, n + 1)`` or ``(n + 1, n + 1)``, n = 2 or 3 (e.g. ``RegistrationResult.affine``,
            world mm; or a network ``theta``, normalised units).

    Returns:
        ``rotation_deg`` (2D: one angle; 3D: x, y, z angles of ``R = Rz @ Ry @ Rx``), ``scale`` (n),
        ``shear`` (n(n-1)/2: xy, then xz, yz in 3D), ``translation`` (n, in the matrix's units).
    """
    matrix = np.asarray(matrix.detach().cpu() if torch.is_tensor(matrix) else matrix, dtype=np.float64)
    n = matrix.shape[-1] - 1
    if n not in (2, 3) or matrix.shape[0] not in (n, n + 1):
        raise ValueError(f"expected an (n, n + 1) or (n + 1, n + 1) affine with n = 2 or 3, got {matrix.shape}")
    linear, translation = matrix[:n, :n], matrix[:n, n]
    rotation, upper = np.linalg.qr(linear)
    signs = np.sign(np.diag(upper))
    signs[signs == 0] = 1.0
    rotation, upper = rotation * signs, signs[:, None] * upper  # positive diagonal
    if np.linalg.det(rotation) < 0:  # keep R proper; a reflection goes into the last scale
        rotation[:, -1] *= -1
        upper[-1] *= -1
    scale = np.diag(upper).copy()
    shear_matrix = upper / scale[:, None]
    shear = [shear_matrix[i, j] for i, j in ((0, 1), (0, 2), (1, 2)) if j < n]
    if n == 2:
        angles = [np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))]
    else:
        angles = [np.degrees(np.arctan2(rotation[2, 1], rotation[2, 2])),
                  np.degrees(np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0))),
                  np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))]
    return {"rotation_deg": [float(a) for a in angles], "scale": [float(v) for v in scale],
            "shear": [float(v) for v in shear], "translation": [float(v) for v in translation]}


# ---------------------------------------------------------------------------------------------
# Controls: figures redrawn into an ipywidgets Output as PNG images.


def figure_png(fig, dpi: int = 80) -> bytes:
    """Render a matplotlib Figure to PNG bytes and close it."""
    buffer = _bytes_io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    return buffer.getvalue()


def _show_png(output, png: bytes) -> None:
    """Replace an Output widget's content by one PNG (works with or without a running kernel)."""
    data = {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": "<figure>"}
    output.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)


def interactive_figure(draw: Callable, controls: dict, dpi: int = 80):
    """A box of controls above an ``Output`` that shows ``draw(**values)`` and redraws on change.

    Args:
        draw: called with each control's ``value`` by name; returns a matplotlib Figure.
        controls: ``{name: ipywidgets widget with a value}`` (sliders, dropdowns, toggles).

    Returns:
        ``ipywidgets.VBox``: ``children[0]`` the controls, ``children[1]`` the Output;
        ``box.controls`` and ``box.output`` name them, ``box.redraw()`` draws again.
    """
    import ipywidgets as widgets

    output = widgets.Output()

    def redraw(_change=None) -> None:
        _show_png(output, figure_png(draw(**{name: c.value for name, c in controls.items()}), dpi))

    for control in controls.values():
        control.observe(redraw, names="value")
    box = widgets.VBox([widgets.HBox(list(controls.values())), output])
    box.controls, box.output, box.redraw = controls, output, redraw
    redraw()
    return box


def _slider(description: str, count: int, value: int | None = None):
    import ipywidgets as widgets

    return widgets.IntSlider(value=count // 2 if value is None else value, min=0, max=max(count - 1, 0),
                             description=description, continuous_update=False)


_VIEWS = ("overlay", "checkerboard", "difference", "grid", "jacobian")


def explore_registration(result, views: Sequence[str] = _VIEWS):
    """Browse a registration: moving, fixed, warped and one chosen view, slice by slice.

    Args:
        result: a ``RegistrationResult`` (or its ``NetworkView``): the network-grid images and
            the full displacement (affine + non-rigid).
        views: the choices of the fourth panel: overlay (fixed green, warped magenta),
            checkerboard, difference, deformation grid (on the moving image), Jacobian determinant.
    """
    import ipywidgets as widgets

    first = network_slice(result)
    controls = {"view": widgets.ToggleButtons(options=list(views), value=views[0], description="view")}
    if first["count"] > 1:
        controls["index"] = _slider("slice", first["count"])

    def draw(view: str, index: int | None = None):
        part = network_slice(result, index)
        plt = _pyplot()
        fig, axes = plt.subplots(1, 4, figsize=(11, 3))
        for ax, key in zip(axes, ("moving", "fixed", "warped")):
            show_image(ax, part[key], cmap="gray")
            ax.set_title(key if key != "warped" else "warped moving")
        last = axes[3]
        if view == "overlay":
            show_image(last, overlay(part["fixed"], part["warped"]))
        elif view == "checkerboard":
            show_image(last, checkerboard(_unit(part["fixed"]), _unit(part["warped"])), cmap="gray")
        elif view == "difference":
            show_image(last, difference(part["warped"], part["fixed"]), cmap="coolwarm", vmin=-1, vmax=1)
        elif view == "grid":
            show_image(last, part["moving"], cmap="gray")  # x + u(x) are moving-image positions
            draw_grid(last, part["displacement"], step=max(2, part["displacement"].shape[-1] // 16))
        else:
            draw_jacobian(last, part["jacobian"])
        if view != "jacobian":
            last.set_title("grid on moving" if view == "grid" else view)
        for ax in axes:
            ax.set_axis_off()
        fig.tight_layout()
        return fig

    return interactive_figure(draw, controls)


def _pair_slice(array: torch.Tensor, index: int | None) -> np.ndarray:
    """``(1, C, *s)`` -> ``(C, H, W)``: a 2D map as it is, a 3D one at ``index`` of its last axis."""
    array = array.detach().cpu()[0]
    if array.ndim == 4:
        array = array[..., array.shape[-1] // 2 if index is None else index]
    return array.numpy()


def _slices_of(image: torch.Tensor) -> int:
    return image.shape[-1] if image.ndim == 5 else 1


def explore_features(model, image_a: torch.Tensor, image_b: torch.Tensor, direction: str = "a2b"):
    """Browse G's latent features of A and B: one channel, the PCA of all channels as RGB, or the
    modality-invariance map (RMS of ``G(fixed) - G(moving) o phi``, :func:`explain.invariance_map`).

    Args:
        model: a ``Fire`` model; image_a, image_b: ``(1, 1, *S)`` normalised images (modality A, B).
        direction: which way phi registers for the invariance map.
    """
    import ipywidgets as widgets

    from firekit.explain import maps as explain

    features = {"A": explain.latent_features(model, image_a), "B": explain.latent_features(model, image_b)}
    rgb = {key: explain.features_to_rgb(value) for key, value in features.items()}
    moving, fixed = (image_a, image_b) if direction == "a2b" else (image_b, image_a)
    invariance = explain.invariance_map(model, moving, fixed, direction)[:, None]
    controls = {"mode": widgets.ToggleButtons(options=["channel", "PCA RGB", "invariance"], description="show"),
                "image": widgets.ToggleButtons(options=["A", "B"], description="image"),
                "channel": _slider("channel", features["A"].shape[1], 0)}
    slices = _slices_of(features["A"])
    if slices > 1:
        controls["index"] = _slider("slice", slices)

    def draw(mode: str, image: str, channel: int, index: int | None = None):
        source = image_a if image == "A" else image_b
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
        full_index = None if index is None else int(round((index + 0.5) * source.shape[-1] / slices - 0.5))
        show_image(axes[0], _pair_slice(source, full_index)[0], cmap="gray")
        axes[0].set_title(f"image {image}")
        if mode == "channel":
            shown = show_image(axes[1], _pair_slice(features[image], index)[channel], cmap="viridis")
            fig.colorbar(shown, ax=axes[1], fraction=0.046)
            axes[1].set_title(f"G({image}) channel {channel}")
        elif mode == "PCA RGB":
            show_image(axes[1], _pair_slice(rgb[image], index).transpose(1, 2, 0))
            axes[1].set_title(f"G({image}): 3 principal components")
        else:
            shown = show_image(axes[1], _pair_slice(invariance, index)[0], cmap="magma")
            fig.colorbar(shown, ax=axes[1], fraction=0.046)
            axes[1].set_title("RMS |G(fixed) - G(moving) o phi|")
        for ax in axes:
            ax.set_axis_off()
        fig.tight_layout()
        return fig

    return interactive_figure(draw, controls)


def explore_grad_cam(model, image_a: torch.Tensor, image_b: torch.Tensor, roi: torch.Tensor | None = None,
                     components: Sequence[str] | None = None):
    """Browse Grad-CAM maps (:func:`explain.grad_cam`) by component and direction, over the moving image.

    Args:
        model: a ``Fire`` model; image_a, image_b: ``(1, 1, *S)`` normalised images (modality A, B).
        roi: optional ``(1, 1, *S)`` mask on the fixed grid of the direction (see ``explain.TARGETS``).
        components: the choices (default every component of ``explain.TARGETS``).
    """
    import ipywidgets as widgets

    from firekit.explain import maps as explain

    components = list(components or explain.TARGETS)
    cache: dict = {}

    def cam(component: str, direction: str) -> torch.Tensor:
        if (component, direction) not in cache:
            moving, fixed = (image_a, image_b) if direction == "a2b" else (image_b, image_a)
            cache[component, direction] = explain.grad_cam(model, moving, fixed, component, direction, roi=roi)[:, None]
        return cache[component, direction]

    controls = {"component": widgets.Dropdown(options=components, description="component"),
                "direction": widgets.ToggleButtons(options=[("A->B", "a2b"), ("B->A", "b2a")], description="direction")}
    if _slices_of(image_a) > 1:
        controls["index"] = _slider("slice", _slices_of(image_a))

    def draw(component: str, direction: str, index: int | None = None):
        moving = image_a if direction == "a2b" else image_b
        heat = _pair_slice(cam(component, direction), index)[0]
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(4.2, 3.8))
        show_image(ax, _pair_slice(moving, index)[0], cmap="gray")
        shown = show_image(ax, heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(f"Grad-CAM: {component}, {direction}", fontsize=9)
        ax.set_axis_off()
        fig.tight_layout()
        return fig

    return interactive_figure(draw, controls)


def _as_array(volume) -> tuple[np.ndarray, np.ndarray]:
    """(data, spacing) of a Volume, tensor or array (arrays: 1 mm)."""
    data = getattr(volume, "data", volume)
    data = data.detach().cpu().numpy() if torch.is_tensor(data) else np.asarray(data)
    spacing = np.asarray(volume.spacing, float) if hasattr(volume, "spacing") else np.ones(min(data.ndim, 3))
    return data, spacing


def view_slices(volume, labels=None, cmap: str = "gray"):
    """Orthogonal slices of a 3D volume (or a 4D series, last axis = phase) with a slider per axis.

    Offline: matplotlib pictures in an Output widget. Voxels are drawn at their physical aspect.

    Args:
        volume: ``io.Volume``, array or tensor, 3D ``(X, Y, Z)`` or 4D ``(X, Y, Z, T)``.
        labels: optional label map of the volume's spatial shape, outlined in colour.
    """
    data, spacing = _as_array(volume)
    data = np.squeeze(data) if data.ndim > 4 else data
    if data.ndim not in (3, 4):
        raise ValueError(f"view_slices needs a 3D volume or a 4D series, got shape {data.shape}")
    label_data = None if labels is None else _as_array(labels)[0]
    if label_data is not None and label_data.shape != data.shape[:3]:
        raise ValueError(f"labels shape {label_data.shape} differs from the volume's {data.shape[:3]}")
    controls = {axis: _slider(axis, size) for axis, size in zip("xyz", data.shape[:3])}
    if data.ndim == 4:
        controls["phase"] = _slider("phase", data.shape[3], 0)
    spacing = np.resize(spacing, 3)
    limits = np.percentile(data, [1, 99])

    def draw(x: int, y: int, z: int, phase: int = 0):
        frame = data[..., phase] if data.ndim == 4 else data
        plt = _pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
        cuts = ((frame[x], (1, 2), "sagittal x"), (frame[:, y], (0, 2), "coronal y"), (frame[:, :, z], (0, 1), "axial z"))
        for ax, (plane, (i, j), title), position in zip(axes, cuts, (x, y, z)):
            ax.imshow(plane.T, cmap=cmap, origin="lower", vmin=limits[0], vmax=limits[1],
                      aspect=spacing[j] / spacing[i])
            if label_data is not None:
                cut = (label_data[x], label_data[:, y], label_data[:, :, z])["xyz".index(title[-1])]
                ax.contour(cut.T, levels=np.unique(cut)[1:] - 0.5, cmap="tab10", linewidths=0.7, origin="lower")
            ax.set_title(f"{title} = {position}")
            ax.set_axis_off()
        fig.tight_layout()
        return fig

    return interactive_figure(draw, controls)


_CINE_VIEWS = ("warped", "difference", "grid", "jacobian")


def explore_cine(result, views: Sequence[str] = _CINE_VIEWS):
    """Browse a cine registration (``cine.register_cine``): phase and slice sliders; panels: the
    reference phase, phase t, and one view: phase t warped onto the reference, |warped - reference|
    (vs |phase t - reference|), the deformation grid on phase t (in-plane), or the Jacobian
    determinant (blue: contraction, red: expansion).
    """
    import ipywidgets as widgets

    series = result.series
    data, warped = series.data, result.warped.data
    jacobian = result.jacobian_determinant()
    points = result.moving_points.detach().cpu().numpy()  # (T, n, *S): phase-t voxel of each reference voxel
    controls = {"view": widgets.ToggleButtons(options=list(views), value=views[0], description="view"),
                "phase": _slider("phase", series.phases, 0)}
    if series.ndim == 3:
        controls["index"] = _slider("slice", series.shape[2])
    limits = np.percentile(data, [1, 99.5])

    def plane(array: np.ndarray, index: int | None) -> np.ndarray:
        return array if index is None else array[..., index]

    def draw(view: str, phase: int, index: int | None = None):
        plt = _pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        reference = plane(data[..., result.reference], index)
        moving = plane(data[..., phase], index)
        show_image(axes[0], reference, f"reference (phase {result.reference})", cmap="gray", vmin=limits[0], vmax=limits[1])
        show_image(axes[1], moving, f"phase {phase}", cmap="gray", vmin=limits[0], vmax=limits[1])
        last = axes[2]
        if view == "warped":
            show_image(last, plane(warped[..., phase], index), f"phase {phase} warped onto the reference",
                       cmap="gray", vmin=limits[0], vmax=limits[1])
        elif view == "difference":
            before = np.abs(moving - reference).mean()
            after = np.abs(plane(warped[..., phase], index) - reference)
            show_image(last, after, f"|warped - reference| (mean {after.mean():.0f}, before {before:.0f})",
                       cmap="magma", vmin=0, vmax=(limits[1] - limits[0]) / 2)
        elif view == "grid":
            show_image(last, moving, f"grid on phase {phase}", cmap="gray", vmin=limits[0], vmax=limits[1])
            in_plane = points[phase, :2] if index is None else points[phase, :2, ..., index]
            draw_point_grid(last, in_plane[None], step=max(2, moving.shape[0] // 24))
        else:
            draw_jacobian(last, plane(jacobian[..., phase], index))
        for ax in axes:
            ax.set_axis_off()
        fig.tight_layout()
        return fig

    return interactive_figure(draw, controls)


class LossPlot:
    """A live plot of training losses: pass it as ``train(..., callback=plot)`` and show ``plot.widget``.

    Draws the total, L_syn, L_reg and lambda R_smooth (log scale) and the validation Dice on a second
    axis, every ``every`` steps (and at the last call, :meth:`draw`).
    """

    TERMS = {"total": "total (Eq. 1)", "syn": "L_syn (Eq. 6)", "reg": "L_reg (Eq. 9)", "smooth": "lambda R_smooth"}

    def __init__(self, every: int = 10):
        import ipywidgets as widgets

        self.every = max(1, int(every))
        self.widget = widgets.Output()
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {key: [] for key in self.TERMS}
        self.validation: list[tuple[int, float]] = []

    def __call__(self, step: int, losses: dict) -> None:
        syn = sum(losses[k] for k in ("syn_acc", "syn_fea", "syn_cyc", "syn_align"))
        reg = losses["reg_acc"] + losses["reg_ic"]
        row = {"total": losses["total"], "syn": syn, "reg": reg, "smooth": losses["smooth_weight"] * losses["r_smooth"]}
        self.steps.append(step)
        for key, value in row.items():
            self.values[key].append(value)
        if "val_dice" in losses and losses["val_dice"] is not None:
            self.validation.append((step, losses["val_dice"]))
        if step % self.every == 0:
            self.draw()

    def figure(self):
        """The plot as a Figure."""
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for key, label in self.TERMS.items():
            ax.plot(self.steps, self.values[key], label=label, linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(loc="upper left", fontsize=7)
        if self.validation:
            dice = ax.twinx()
            dice.plot(*zip(*self.validation), "k.-", label="validation Dice")
            dice.set_ylabel("validation Dice")
            dice.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        return fig

    def draw(self) -> None:
        """Redraw into :attr:`widget` now."""
        _show_png(self.widget, figure_png(self.figure()))


# itkwidgets 1.0 (a55) loads its viewer and the ImJoy extension's scripts from these hosts in the browser.
ITKWIDGETS_HOSTS = ("cdn.jsdelivr.net", "imjoy-team.github.io",
                    "bafybeieiqiiwvdq66e2bndws5nwojbe4wwerbxyua6u37axxivi2rwf7wy.ipfs.dweb.link")


def _itkwidgets_usable(timeout: float = 2.0) -> bool:
    """itkwidgets is installed and every host its viewer loads from answers (Binder: yes; offline: no).

    Checked WITHOUT importing itkwidgets: importing it in a kernel queues every later cell until its
    viewer's JavaScript reports ready, which never happens offline.
    """
    if os.environ.get("FIREKIT_VIEW3D", "auto") == "slices" or importlib.util.find_spec("itkwidgets") is None:
        return False
    for host in ITKWIDGETS_HOSTS:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError:
            return False
    return True


def view3d(volume, labels=None, backend: str = "auto"):
    """Look at a 3D volume: itkwidgets' viewer where it can run, else :func:`view_slices`.

    Args:
        volume: ``io.Volume``, array or tensor ``(X, Y, Z)`` (a 4D series or anisotropic voxels get
            the slice viewer, which draws voxels at their physical aspect).
        labels: optional label map of the same shape.
        backend: ``"auto"`` (itkwidgets when it is installed and its viewer's hosts answer; the
            environment variable ``FIREKIT_VIEW3D=slices`` forces the fallback), ``"itkwidgets"``
            or ``"slices"``. Versions known to work: itkwidgets[notebook] 1.0a55 with
            ngff-zarr 0.12.2 and zarr < 3 (``environment.yml``).

    Returns:
        the itkwidgets viewer, or the ipywidgets box of :func:`view_slices`.
    """
    if backend not in ("auto", "itkwidgets", "slices"):
        raise ValueError(f"backend must be 'auto', 'itkwidgets' or 'slices', got {backend!r}")
    data, spacing = _as_array(volume)
    # the viewer is given a plain array (voxels drawn as cubes): anisotropic volumes get the slice viewer
    isotropic = np.allclose(spacing, spacing[0], rtol=1e-3)
    use_itk = backend == "itkwidgets" or (backend == "auto" and data.ndim == 3 and isotropic and _itkwidgets_usable())
    if not use_itk:
        return view_slices(volume, labels)
    from itkwidgets import view

    options = {} if labels is None else {"label_image": np.ascontiguousarray(_as_array(labels)[0].T)}
    # itkwidgets takes NumPy arrays in (z, y, x) order
    return view(image=np.ascontiguousarray(data.T.astype(np.float32)), **options)
