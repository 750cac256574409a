"""Sample data: two demo brains (fixed T1 + labels of one subject, moving T2-like + labels of another),
built in memory from the MNI152 template nilearn ships (first call: a few seconds)."""

from __future__ import annotations

from firekit.explain.layers import cine_sample, demo_pair


def demo_pair_2d() -> list:
    """An axial slice of each demo brain (register the moving T2-like onto the fixed T1: b2a)."""
    return demo_pair(ndim=2)


def demo_pair_3d() -> list:
    """The two demo brain volumes (128 x 160 x 128 at 1.28 mm)."""
    return demo_pair(ndim=3)


def cine_phantom() -> list:
    """A cardiac cine phantom patient, 3D + time, with labels at every phase."""
    return cine_sample(0)
