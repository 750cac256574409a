"""ANTs (antspyx, ``pip install firekit[bench]``) on one pair, as every bench script runs it.

:func:`run_ants` registers moving to fixed (timed) and returns ANTs' forward and inverse transforms
composed into one ITK displacement field each. Shared by the scripts that put firekit beside ANTs
(``bench.vs_ants``, ``bench.cine_vs_ants``, ``bench.throughput``; ``bench.gross_failures`` through
``bench.vs_ants``), so that none of them imports another for it.
"""

from __future__ import annotations

import tempfile

import numpy as np

from bench import peers


def to_ants(volume):
    """An ANTs image with the NIfTI volume's geometry (ITK's LPS world)."""
    import ants

    origin, spacing, direction = peers.itk_geometry(volume)
    return ants.from_numpy(np.asarray(volume.data, np.float32), origin=origin, spacing=spacing, direction=direction)


def ants_fields(reg: dict, moving_image, fixed_image) -> tuple[np.ndarray, np.ndarray]:
    """An ANTs registration's forward transforms composed into one field on fixed's grid, and its
    inverse transforms into one on moving's grid (ITK/LPS mm, ``(*S, n)`` each)."""
    import ants

    with tempfile.TemporaryDirectory() as tmp:
        forward = ants.apply_transforms(fixed_image, moving_image, reg["fwdtransforms"], compose=f"{tmp}/fwd_")
        inverse_list = reg["invtransforms"]
        invert = [name.endswith(".mat") for name in inverse_list]  # affines are inverted, inverse warps are not
        backward = ants.apply_transforms(moving_image, fixed_image, inverse_list, whichtoinvert=invert,
                                         compose=f"{tmp}/inv_")
        return ants.image_read(forward).numpy(), ants.image_read(backward).numpy()


def run_ants(kind: str, moving, fixed, seed: int, fixed_mask=None, moving_mask=None) -> dict:
    """ANTs ``kind`` from moving to fixed (timed), its fields (see :func:`ants_fields`); ``fixed_mask``,
    ``moving_mask`` (Volumes on each image's grid, nonzero = inside): ANTs' masks, at every stage."""
    import ants

    masks = {key: to_ants(mask) for key, mask in (("mask", fixed_mask), ("moving_mask", moving_mask)) if mask is not None}
    if masks:
        masks["mask_all_stages"] = True

    def solve():
        moving_image, fixed_image = to_ants(moving), to_ants(fixed)
        return moving_image, fixed_image, ants.registration(fixed_image, moving_image, type_of_transform=kind,
                                                            aff_metric="mattes", **masks)

    # antspyx passes a seed to antsRegistration (`--random-seed`, its metric sampling) only from
    # `ants.config._random_seed`; a `random_seed=` argument is swallowed by `**kwargs`, and its
    # `set_ants_deterministic` also forces one ITK thread. antsRegistration reads a seed of 0 as
    # none (a clock seed), so the bench's seed s is passed as s + 1. Unseeded, a row moves run to run;
    # seeded, it repeats on one ITK thread (--threads 1; several threads draw in the scheduler's order).
    config = getattr(ants, "config", None)  # antspyx >= 0.5; older releases run unseeded
    before = getattr(config, "_random_seed", None)
    if config is not None:
        config._random_seed = int(seed) + 1
    try:
        (moving_image, fixed_image, reg), wall, cpu = peers.timed(solve)
    finally:
        if config is not None:
            config._random_seed = before
    field, backward = ants_fields(reg, moving_image, fixed_image)
    return dict(field=field, backward=backward, wall=wall, cpu=cpu)
