"""Pictures of registrations with matplotlib (Agg-safe): checkerboards, deformation grids, Jacobians."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import spatial

__all__ = ["checkerboard", "draw_grid", "registration_figure", "affine_parameters"]


def _as_2d(image) -> np.ndarray:
    array = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2D image after squeezing, got shape {array.shape}")
    return array


def checkerboard(a, b, tiles: int = 8) -> np.ndarray:
    """Interleave two 2D images of the same shape in ``tiles`` x ``tiles`` squares."""
    a, b = _as_2d(a), _as_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"checkerboard needs equal shapes, got {a.shape} and {b.shape}")
    rows = (np.arange(a.shape[0]) * tiles // a.shape[0])[:, None]
    cols = (np.arange(a.shape[1]) * tiles // a.shape[1])[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def draw_grid(ax, displacement: torch.Tensor, step: int = 4, color: str = "yellow", linewidth: float = 0.6) -> None:
    """Draw the deformed grid ``x + u(x)`` of a 2D field over an image shown with ``imshow``.

    Args:
        ax: matplotlib axes (image axis 0 is the row, axis 1 the column).
        displacement: ``(1, 2, H, W)`` normalised displacement.
        step: spacing of grid lines in pixels.
    """
    if displacement.ndim != 4 or displacement.shape[:2] != (1, 2):
        raise ValueError(f"draw_grid needs a (1, 2, H, W) field, got {tuple(displacement.shape)}")
    shape = displacement.shape[2:]
    points = spatial.normalised_to_voxel(spatial.identity_grid(shape, like=displacement) + displacement, shape)
    points = points[0].detach().cpu().numpy() + np.array([(s - 1) / 2 for s in shape])[:, None, None]
    rows, cols = points
    for i in range(0, shape[0], step):
        ax.plot(cols[i, :], rows[i, :], color=color, linewidth=linewidth)
    for j in range(0, shape[1], step):
        ax.plot(cols[:, j], rows[:, j], color=color, linewidth=linewidth)


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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = 7 + (synthesised is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.4 * panels, 2.8))
    for ax, image, title in zip(axes[:3], (moving, fixed, warped), titles):
        ax.imshow(_as_2d(image), cmap="gray")
        ax.set_title(title)
    axes[3].imshow(checkerboard(fixed, warped), cmap="gray")
    axes[3].set_title("checkerboard")
    difference = _as_2d(warped) - _as_2d(fixed)
    limit = float(np.abs(difference).max()) or 1.0
    axes[4].imshow(difference, cmap="coolwarm", vmin=-limit, vmax=limit)
    axes[4].set_title("warped - fixed")
    axes[5].imshow(_as_2d(warped), cmap="gray")
    draw_grid(axes[5], displacement, step=max(2, displacement.shape[-1] // 16))
    axes[5].set_title("deformation grid")
    jac = _as_2d(spatial.jacobian_determinant(displacement.detach()))
    shown = axes[6].imshow(jac, cmap="RdBu_r", vmin=0, vmax=2)
    if (jac <= 0).any():
        axes[6].contour(jac <= 0, levels=[0.5], colors="black", linewidths=0.8)
    axes[6].set_title(f"Jacobian det. ({(jac <= 0).mean():.2%} folded)")
    fig.colorbar(shown, ax=axes[6], fraction=0.046)
    if synthesised is not None:
        axes[7].imshow(_as_2d(synthesised), cmap="gray")
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
