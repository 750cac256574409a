"""Random contrast for training: an image's intensities passed through a random transfer curve.

A network trained on one pair of contrasts meets others in use (a FLAIR, a PD, another scanner's
T2). Passing the B image of some training pairs through a random, not necessarily monotone,
intensity curve shows the network many contrasts of the same anatomy, so that its shared encoder
G learns to code structure rather than one contrast's grey levels (the idea behind contrast-agnostic
training such as SynthMorph's, here on real images instead of label maps).

Images are firekit's normalised intensities in ``[-1, 1]`` with background (and padding) at -1,
which every curve keeps at -1.
"""

from __future__ import annotations

import torch

__all__ = ["CONTROL_POINTS", "random_curve", "apply_curve"]

CONTROL_POINTS = 6  # knots of the piecewise-linear curve, evenly spaced over [-1, 1]


def random_curve(generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """A random transfer curve: ``(CONTROL_POINTS,)`` output values at evenly spaced input knots.

    The first knot (background, -1) stays at -1. Each other knot moves from the identity towards an
    independent uniform draw in [-1, 1] by a factor ``U(0, strength)`` common to the curve, so a
    curve runs from near the identity to a fully random one (bright tissue made dark and the
    reverse); the largest value is then stretched to 1.
    """
    knots = torch.linspace(-1.0, 1.0, CONTROL_POINTS, dtype=torch.float64)
    mix = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(strength)
    draws = torch.rand(CONTROL_POINTS, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    values = (1.0 - mix) * knots + mix * draws
    values[0] = -1.0
    top = float(values.max())
    if top > -0.9:  # stretch to span [-1, 1]; a curve that is flat at the background stays as drawn
        values = -1.0 + (values + 1.0) * (2.0 / (top + 1.0))
    return values.float()


def apply_curve(image: torch.Tensor, curve: torch.Tensor) -> torch.Tensor:
    """``image`` (any shape, values in [-1, 1]) through ``curve`` (from :func:`random_curve`), by linear
    interpolation between its knots; the result is in [-1, 1]."""
    segments = curve.numel() - 1
    position = (image.clamp(-1.0, 1.0) + 1.0) * (segments / 2.0)
    index = position.floor().clamp(0, segments - 1).long()
    weight = position - index
    curve = curve.to(image)
    return ((1.0 - weight) * curve[index] + weight * curve[index + 1]).clamp(-1.0, 1.0)
