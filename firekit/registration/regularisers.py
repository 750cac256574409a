"""The non-rigid stage's regularisers: penalties of a displacement ``(B, n, *S)`` (normalised), per sample.

Derivatives are taken in normalised units, so a value does not depend on the grid's resolution.
"""

from __future__ import annotations

import torch

from firekit.core.errors import FirekitError

__all__ = ["diffusion_energy", "bending_energy_per_sample", "REGULARISERS"]


def diffusion_energy(displacement: torch.Tensor) -> torch.Tensor:
    """Mean over points of the squared first derivatives of a displacement, per sample.

    Args:
        displacement: ``(B, n, *S)`` normalised; derivatives are taken in normalised units
            (axis ``i`` has step ``2 / (S_i - 1)``), so the value does not depend on resolution.

    Returns:
        ``(B,)``; zero for a constant field.
    """
    ndim = displacement.ndim - 2
    total = displacement.new_zeros(displacement.shape[0])
    for axis in range(ndim):
        size = displacement.shape[2 + axis]
        diff = torch.diff(displacement, dim=2 + axis) * ((size - 1) / 2.0)
        total = total + diff.square().sum(dim=1).flatten(1).mean(dim=1)
    return total


def bending_energy_per_sample(displacement: torch.Tensor) -> torch.Tensor:
    """Mean over interior points of the bending energy, per sample (see :func:`firekit.fire.losses.bending_energy`).

    Args:
        displacement: ``(B, n, *S)`` normalised, every size >= 3; second derivatives are taken
            in normalised units, so the value does not depend on resolution.

    Returns:
        ``(B,)``; zero for any affine field. Its batch mean equals
        ``losses.bending_energy(displacement, reduction="mean")``.
    """
    ndim = displacement.ndim - 2
    shape = displacement.shape[2:]
    if min(shape) < 3:
        raise FirekitError(f"bending energy needs every spatial size >= 3, got {tuple(displacement.shape)}")

    def shifted(offsets: dict[int, int]) -> torch.Tensor:
        index = [slice(None), slice(None)]
        index += [slice(1 + offsets.get(axis, 0), size - 1 + offsets.get(axis, 0)) for axis, size in enumerate(shape)]
        return displacement[tuple(index)]

    scale = [(size - 1) / 2.0 for size in shape]  # 1 / step in normalised units
    centre = shifted({})
    energy = displacement.new_zeros(displacement.shape[0])
    for i in range(ndim):
        d_ii = (shifted({i: 1}) - 2 * centre + shifted({i: -1})) * scale[i] ** 2
        energy = energy + d_ii.square().sum(dim=1).flatten(1).mean(dim=1)
        for j in range(i + 1, ndim):
            d_ij = (shifted({i: 1, j: 1}) - shifted({i: 1, j: -1}) - shifted({i: -1, j: 1})
                    + shifted({i: -1, j: -1})) * (scale[i] * scale[j] / 4.0)
            energy = energy + 2 * d_ij.square().sum(dim=1).flatten(1).mean(dim=1)
    return energy


REGULARISERS = {"bending": bending_energy_per_sample, "diffusion": diffusion_energy}
