"""The moments search: the refinement's starting affines from the images' foregrounds.

Centre of mass and principal axes of each image's foreground give the affine up to a rotation in
the whitened frame; candidates (every proper signed axis permutation composed with a scan of small
rotations, the centres matched on the headers' axes at a grid of scales) are scored by the
similarity at low resolution, moved to their best shift by FFT, searched about locally (stretches
and turns), and ranked, plausible ones (:func:`firekit.registration.check.plausible_mask`) first.

Affines are normalised ``(B, n, n + 1)`` (fixed point -> moving point), or ``(B, K, n, n + 1)`` for
``K`` candidates per pair; images ``(B, 1, *S)`` in [-1, 1] (background near -1).
"""

from __future__ import annotations

import functools
import itertools
import math
from functools import partial
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as nnf

from firekit.core import spatial
from firekit.core.errors import FirekitError
from firekit.core.similarity import Similarity
from firekit.registration.check import AffineBounds, plausible_mask
from firekit.registration.levels import Pyramid, PyramidRegions, check_images, open_mask, pyramid_regions
from firekit.registration.presets import RefineConfig

__all__ = ["moments_init", "moment_candidates", "moments_search", "candidate_rotations"]

# Voxels of candidate images scored at once by moments_init: small enough for the feature maps to
# stay in cache (4x faster on a CPU than 2^21 for 3D candidates at 32 x 40 x 32).
_SCORE_VOXELS = 1 << 16


def candidate_rotations(ndim: int, angles: Sequence[float] = (0.0,)) -> torch.Tensor:
    """Rotations tried by :func:`moments_init` (see :func:`_candidate_rotations`); built once per setting."""
    return _candidate_rotations(int(ndim), tuple(float(a) for a in angles)).clone()


@functools.lru_cache(maxsize=16)
def _candidate_rotations(ndim: int, angles: tuple[float, ...]) -> torch.Tensor:
    """Rotations tried by :func:`moments_init` in the whitened frame.

    Every proper signed permutation of the axes (4 in 2D, 24 in 3D), each composed with a
    rotation by every angle of ``angles`` in each coordinate plane in turn (not their products).

    Args:
        ndim: 2 or 3.
        angles: degrees; 0 is always included.

    Returns:
        ``(K, n, n)`` float64, distinct rotation matrices.
    """
    signed = []
    for perm in itertools.permutations(range(ndim)):
        for signs in itertools.product((-1.0, 1.0), repeat=ndim):
            matrix = torch.zeros(ndim, ndim, dtype=torch.float64)
            for row, (col, sign) in enumerate(zip(perm, signs)):
                matrix[row, col] = sign
            if torch.linalg.det(matrix) > 0:
                signed.append(matrix)
    turns = [torch.eye(ndim, dtype=torch.float64), *_plane_turns(ndim, angles)]
    rotations = torch.stack([p @ t for p in signed for t in turns])
    # Drop duplicates (e.g. a 90-degree scan step reproduces a permutation).
    keep = []
    for k in range(rotations.shape[0]):
        if all((rotations[k] - rotations[j]).abs().max() > 1e-6 for j in keep):
            keep.append(k)
    return rotations[keep]


def _plane_turns(ndim: int, angles: Sequence[float]) -> list[torch.Tensor]:
    """``(n, n)`` float64 rotations by each non-zero angle (degrees) of ``angles`` in each coordinate
    plane in turn (not their products)."""
    turns = []
    for i, j in itertools.combinations(range(ndim), 2):
        for angle in angles:
            if float(angle) % 360.0 == 0.0:
                continue
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            turn = torch.eye(ndim, dtype=torch.float64)
            turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
            turns.append(turn)
    return turns


def _foreground_moments(image: torch.Tensor, threshold: float, opening: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre ``(B, n)`` and covariance ``(B, n, n)`` of ``image > threshold``, in voxel indices, after
    a morphological opening of that mask by a cube ``2 opening + 1`` voxels wide (0: none)."""
    ndim = image.ndim - 2
    mask = open_mask(image > threshold, opening)[:, 0].double()  # (B, *S)
    counts = mask.flatten(1).sum(dim=1)  # (B,)
    if bool((counts < ndim + 1).any()):
        raise FirekitError(
            f"moments_init found (almost) no voxel above the foreground threshold {threshold}; "
            f"pass images in [-1, 1] or set RefineConfig.foreground"
        )

    def marginal(*axes: int) -> torch.Tensor:
        """The mask summed over every spatial axis but ``axes``: ``(B, *S[axes])``."""
        others = [1 + a for a in range(ndim) if a not in axes]
        return mask.sum(dim=others) if others else mask

    # Moments from the mask's 1- and 2-axis marginals: no grid of coordinates over the volume.
    indices = [torch.arange(size, dtype=mask.dtype, device=mask.device) for size in image.shape[2:]]
    centre = torch.stack([(marginal(i) * indices[i]).sum(dim=1) for i in range(ndim)], dim=1) / counts[:, None]
    offsets = [indices[i] - centre[:, i, None] for i in range(ndim)]  # (B, S_i) each
    cov = mask.new_zeros(mask.shape[0], ndim, ndim)
    for i in range(ndim):
        cov[:, i, i] = (marginal(i) * offsets[i].square()).sum(dim=1)
        for j in range(i + 1, ndim):
            cov[:, i, j] = cov[:, j, i] = torch.einsum("bk,bkl,bl->b", offsets[i], marginal(i, j), offsets[j])
    return centre, cov / counts[:, None, None]


def _sqrt_and_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of SPD matrices ``(B, n, n)`` and its inverse."""
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(values.amax(dim=-1, keepdim=True) * 1e-6 + 1e-12).sqrt()
    root = vectors @ torch.diag_embed(values) @ vectors.transpose(-1, -2)
    inverse = vectors @ torch.diag_embed(1.0 / values) @ vectors.transpose(-1, -2)
    return root, inverse


def _voxel_to_normalised_between(matrix: torch.Tensor, moving_shape, fixed_shape) -> torch.Tensor:
    """Voxel affine fixed -> moving (grids of different shapes) as a normalised ``theta``."""
    ndim = matrix.shape[1]
    # Rescale moving indices to fixed's index range; the normalised coordinates then agree.
    rescale = torch.tensor([(f - 1) / (m - 1) for m, f in zip(moving_shape, fixed_shape)],
                           dtype=matrix.dtype, device=matrix.device)
    return spatial.voxel_affine_to_normalised(matrix * rescale.view(1, ndim, 1), fixed_shape)


class _Weights(NamedTuple):
    """Region weights of the moments search at its scale: fixed's ``(B, 1, *s_f)`` (or None) and
    moving's ``(B, 1, *s_m)`` (or None), see :class:`PyramidRegions`."""

    fixed: torch.Tensor | None
    moving: torch.Tensor | None

    def at(self, b: int, displacement: torch.Tensor) -> torch.Tensor | None:
        """Pair ``b``'s weights for moving warped by each displacement ``(K, n, *s_f)``: ``(K, 1, *s_f)``."""
        count = displacement.shape[0]
        weight = None if self.fixed is None else self.fixed[b:b + 1].expand(count, *self.fixed.shape[1:])
        if self.moving is not None:
            moved = spatial.warp(self.moving[b:b + 1].expand(count, *self.moving.shape[1:]), displacement,
                                 padding_mode="zeros")
            weight = moved if weight is None else weight * moved
        return weight


def _score_affines(moving: torch.Tensor, fixed_features: torch.Tensor, thetas: torch.Tensor,
                   similarity: Similarity, weights: _Weights | None = None) -> torch.Tensor:
    """Similarity of ``moving`` ``(B, 1, *s_m)`` warped by ``thetas`` ``(B, K, n, n+1)``: ``(B, K)``.

    ``weights``: fixed's ``(B, 1, *s_f)`` and moving's ``(B, 1, *s_m)`` region weights (see
    :class:`PyramidRegions`), or None.
    """
    batch, count = thetas.shape[:2]
    shape = fixed_features.shape[2:]
    # Chunks of candidates keep the feature maps of all candidates from filling memory.
    chunk = max(1, _SCORE_VOXELS // math.prod(shape))
    scores = []
    for b in range(batch):
        for start in range(0, count, chunk):
            part = thetas[b, start:start + chunk]
            displacement = spatial.affine_to_displacement(part, shape)
            warped = spatial.warp(moving[b:b + 1].expand(part.shape[0], *moving.shape[1:]), displacement)
            target = fixed_features[b:b + 1].expand(part.shape[0], *fixed_features.shape[1:])
            scores.append(similarity.compare(similarity.features(warped), target,
                                             None if weights is None else weights.at(b, displacement)))
    return torch.cat(scores).view(batch, count)


def _centre_candidates(centre_m: torch.Tensor, centre_f: torch.Tensor, cov_m: torch.Tensor, cov_f: torch.Tensor,
                       angles: Sequence[float], scales: Sequence[float]) -> torch.Tensor:
    """Voxel affines ``(B, K, n, n+1)`` that match the foregrounds' centres and keep the headers' axes
    (what ANTs starts from: centres of mass, no axis search): turned by every angle of ``angles`` in
    each plane, and scaled uniformly by the ratio of the foregrounds' sizes or by every combination
    of ``scales`` along moving's axes after the turn, ``x_m = c_m + D R (x_f - c_f)`` (a foreground
    cut by the field of view misleads the moments)."""
    ndim = centre_m.shape[1]
    size = (torch.linalg.det(cov_m) / torch.linalg.det(cov_f)).clamp_min(1e-12) ** (0.5 / ndim)  # (B,)
    # Scan turns about the headers' axes only (a turn of 60 degrees or more is an axis permutation's job).
    turns = [torch.eye(ndim, dtype=torch.float64)] + [
        turn for turn in _plane_turns(ndim, angles) if float(torch.diagonal(turn).min()) > 0.5]
    turns = torch.stack(turns).to(cov_m)  # (T, n, n)
    grid = torch.tensor(list(itertools.product(*[[float(v) for v in scales]] * ndim)) if scales else [[1.0] * ndim],
                        dtype=cov_m.dtype, device=cov_m.device)  # (G, n)
    diagonal = torch.cat([torch.diag_embed(grid)[None].expand(size.shape[0], -1, -1, -1),
                          size[:, None, None, None] * torch.eye(ndim, dtype=cov_m.dtype)[None, None]], dim=1)
    linear = (diagonal[:, None] @ turns[None, :, None]).flatten(1, 2)  # (B, T * (G + 1), n, n)
    shift = centre_m[:, None] - (linear @ centre_f[:, None, :, None])[..., 0]
    return torch.cat([linear, shift[..., None]], dim=-1)


def moments_search(moving: Pyramid, fixed: Pyramid, config: RefineConfig,
                   keep: int, regions: PyramidRegions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best moment-based affines ``(B, keep, n, n+1)`` and their scores ``(B, keep)``.

    Candidates: the identity (the headers' alignment), the centres matched with the headers' axes
    (:func:`_centre_candidates`) and the principal axes matched under every rotation of
    :func:`candidate_rotations`; those outside ``config.bounds`` (a turn beyond the bound under
    ``orientation="header"``, a reflection, an extreme scale) are never kept unless nothing else is.
    ``regions`` (masks, :class:`PyramidRegions`) weigh the similarity, the FFT shift search's too.
    """
    ndim = fixed.image.ndim - 2
    moving_shape, fixed_shape = moving.image.shape[2:], fixed.image.shape[2:]
    voxel, centre_f = _moment_affines(moving.image, fixed.image, config)
    batch, count = voxel.shape[:2]
    thetas = _voxel_to_normalised_between(voxel.reshape(batch * count, ndim, ndim + 1), moving_shape,
                                          fixed_shape).reshape(batch, count, ndim, ndim + 1).to(fixed.image)
    # The identity competes too: it wins for pairs that are nearly aligned already.
    thetas = torch.cat([spatial.identity_affine(ndim, batch, like=thetas)[:, None], thetas], dim=1)
    similarity = config.similarity_fn()
    factor = max(1, min(fixed_shape) // config.scan_size)
    moving_small, fixed_features = moving.at(factor), similarity.features(fixed.at(factor))
    bounds = config.bounds(ndim)
    weights = None
    if regions is not None and (regions.fixed is not None or regions.moving is not None):
        weights = _Weights(*(None if r is None else r.at(factor) for r in regions[:2]))
    first = _rank(thetas, moving_small, fixed_features, similarity, fixed_shape, bounds, weights)
    search = partial(_local_search, centre_f=centre_f, moving_small=moving_small, fixed_features=fixed_features,
                     similarity=similarity, fixed_shape=fixed_shape, config=config, weights=weights)
    if config.shift_reach <= 0 or config.shift_starts < 1 or not (similarity.shiftable and similarity.warpable):
        return _diverse(*search(first), keep, config.start_spread)
    # The best candidates also compete moved to their best shifts (FFT), as a family of their own:
    # the unshifted keep starts too, since at this resolution a shift can pull a small, near-round
    # foreground off.
    top = first[0][:, : config.shift_starts]
    moved, moved_scores = _best_shifts(top, moving_small, fixed_features, similarity, config.shift_reach, weights)
    shifted = search(_merge_ranked(first, _ranked(moved, moved_scores, fixed_shape, bounds)))
    if keep == 1:  # the shifted family holds the unshifted candidates too
        return _diverse(*shifted, 1, config.start_spread)
    families = [_diverse(*shifted, keep, config.start_spread), _diverse(*search(first), keep, config.start_spread)]
    return tuple(torch.cat(parts, dim=1) for parts in zip(*families))


def _local_search(ranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], centre_f: torch.Tensor,
                  moving_small: torch.Tensor, fixed_features: torch.Tensor, similarity: Similarity, fixed_shape,
                  config: RefineConfig, weights: _Weights | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ranked`` candidates ``(thetas (B, K, n, n+1), scores, allowed)`` with the local search about
    the best of them merged in, ranked."""
    thetas, scores, allowed = ranked
    ndim, batch = thetas.shape[-2], thetas.shape[0]
    bounds = config.bounds(ndim)
    if config.stretch_starts > 0 and (config.scan_stretches or config.scan_turns):
        # Moments misjudge an axis's scale when the foreground is cut by the field of view or the
        # anatomy changes shape along it, and a round outline leaves the turn loose: search about
        # the best candidates, stretched along each of fixed's axes and turned in each plane about
        # fixed's centre of mass, for a few rounds; the similarity judges every one.
        inner = _perturbations(centre_f, fixed_shape, config.scan_stretches, config.scan_turns).to(thetas)
        for _ in range(config.search_rounds):
            top = thetas[:, : config.stretch_starts]  # (B, k, n, n+1)
            k, count = top.shape[1], inner.shape[1]
            outer = top[:, :, None].expand(-1, -1, count, -1, -1).reshape(-1, ndim, ndim + 1)
            moved = spatial.compose_affines(outer, inner[:, None].expand(-1, k, -1, -1, -1).reshape(-1, ndim, ndim + 1))
            ranked = _rank(moved.view(batch, k * count, ndim, ndim + 1), moving_small, fixed_features, similarity,
                           fixed_shape, bounds, weights)
            thetas, scores, allowed = _merge_ranked((thetas, scores, allowed), ranked)
    return thetas, scores, allowed


def _moment_affines(moving: torch.Tensor, fixed: torch.Tensor,
                    config: RefineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel affines ``(B, K, n, n+1)`` (fixed voxel -> moving voxel) from the moments of the images'
    foregrounds (:func:`_foreground_moments`, opened by ``config.foreground_opening``), and fixed's
    centre ``(B, n)``."""
    ndim = fixed.ndim - 2
    centre_m, cov_m = _foreground_moments(moving, config.foreground, config.foreground_opening)
    centre_f, cov_f = _foreground_moments(fixed, config.foreground, config.foreground_opening)
    root_m, _ = _sqrt_and_inverse(cov_m)
    _, inv_root_f = _sqrt_and_inverse(cov_f)
    rotations = candidate_rotations(ndim, config.scan_angles).to(root_m)  # (K, n, n)
    # x_m = c_m + C_m^1/2 R C_f^-1/2 (x_f - c_f): maps fixed's foreground ellipsoid onto moving's.
    linear = root_m[:, None] @ rotations[None] @ inv_root_f[:, None]  # (B, K, n, n)
    shift = centre_m[:, None] - (linear @ centre_f[:, None, :, None])[..., 0]
    centred = _centre_candidates(centre_m, centre_f, cov_m, cov_f, config.scan_angles, config.scan_scales)
    return torch.cat([torch.cat([linear, shift[..., None]], dim=-1), centred], dim=1), centre_f


def _diverse(thetas: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor, keep: int,
             spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best ranked candidates per pair that differ from each other by more than
    ``spread`` (largest difference of their normalised entries), plausible ones only (the best
    candidate always); fewer distinct ones are padded with the next best."""
    batch, count = thetas.shape[:2]
    keep = max(1, min(keep, count))
    chosen = []
    for b in range(batch):
        picks = [0]
        for k in range(1, count):
            if len(picks) == keep:
                break
            if bool(allowed[b, k]) and all(float((thetas[b, k] - thetas[b, j]).abs().max()) > spread for j in picks):
                picks.append(k)
        picks += [k for k in range(count) if k not in picks][: keep - len(picks)]
        chosen.append(picks)
    index = torch.tensor(chosen, device=thetas.device)
    n = thetas.shape[2]
    return (torch.gather(thetas, 1, index.view(batch, keep, 1, 1).expand(-1, -1, n, n + 1)),
            torch.gather(scores, 1, index))


def _perturbations(centre: torch.Tensor, shape, stretches: Sequence[float], turns: Sequence[float]) -> torch.Tensor:
    """Normalised affines ``(B, P, n, n+1)`` on ``shape``: a stretch by each factor along each axis and
    a turn by each angle (degrees) in each plane, about ``centre`` ``(B, n)`` (voxel indices)."""
    ndim = centre.shape[1]
    linears = []
    for axis in range(ndim):
        for value in stretches:
            scale = torch.eye(ndim, dtype=torch.float64)
            scale[axis, axis] = float(value)
            linears.append(scale)
    linears += _plane_turns(ndim, turns)
    linear = torch.stack(linears)[None].to(centre.dtype).expand(centre.shape[0], -1, -1, -1)  # (B, P, n, n)
    shift = centre[:, None] - (linear @ centre[:, None, :, None])[..., 0]  # x -> c + L (x - c)
    voxel = torch.cat([linear, shift[..., None]], dim=-1)
    return spatial.voxel_affine_to_normalised(voxel.flatten(0, 1), shape).view_as(voxel)


def _best_shifts(thetas: torch.Tensor, moving_small: torch.Tensor, fixed_features: torch.Tensor,
                 similarity: Similarity, reach: float,
                 weights: _Weights | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each candidate, the shift of fixed's grid that its similarity prefers, by FFT.

    Candidate ``theta`` ``(B, K, n, n+1)`` is tried as ``x -> theta(x + t)`` for every whole-voxel
    shift ``t`` of the low-resolution grid up to ``reach`` of each axis's size: the squared
    difference of the features (MIND-SSC, or the image for MSE) at every shift at once, from
    cross-correlations computed by FFT on a grid padded by the reach (so the moving image is sampled
    there, not wrapped). The centres of mass misplace the answer when the field of view cuts the
    moving foreground: this finds it whatever the linear part.

    With ``weights`` (the masks) the difference is averaged over the voxels inside fixed's mask whose
    shifted point lies inside moving's, as the similarity's masked comparison does, at the shifts where
    that overlap holds at least :data:`SHIFT_OVERLAP` of its largest size (a sliver of overlap says nothing).

    Returns:
        the shifted candidates ``(B, K, n, n+1)`` and their scores ``(B, K)`` (mean squared
        feature difference, as the similarity's own comparison, but for the features
        at the grid's border, which see the padded moving image).
    """
    batch, count, ndim = thetas.shape[0], thetas.shape[1], thetas.shape[2]
    shape = fixed_features.shape[2:]
    pad = [max(1, int(round(reach * int(size)))) for size in shape]
    big = [int(size) + 2 * p for size, p in zip(shape, pad)]
    # x in big-grid normalised units -> fixed-grid normalised: x * (big - 1) / (size - 1).
    stretch = torch.tensor([(b - 1) / (int(size) - 1) for b, size in zip(big, shape)], dtype=thetas.dtype,
                           device=thetas.device)
    chunk = max(1, _SCORE_VOXELS // math.prod(big))
    dims = tuple(range(-ndim, 0))
    padding = [v for p in reversed(pad) for v in (0, 2 * p)]  # fixed at the start of the padded grid
    if weights is None:
        fixed_spectrum = torch.fft.rfftn(nnf.pad(fixed_features, padding), dim=dims)
        fixed_energy = fixed_features.square().sum(dim=1).flatten(1).sum(dim=1)  # (B,)
        ones = torch.fft.rfftn(nnf.pad(torch.ones_like(fixed_features[:, :1]), padding), dim=dims)
    channels = fixed_features.shape[1]
    voxels = math.prod(int(size) for size in shape)
    shifted, scores = [], []
    for b in range(batch):
        masked = None if weights is None else _masked_fixed_spectra(fixed_features[b:b + 1], weights, b, padding)
        for start in range(0, count, chunk):
            part = thetas[b, start:start + chunk]  # (k, n, n+1)
            on_big = part.clone()
            on_big[:, :, :ndim] = part[:, :, :ndim] * stretch  # theta o (x -> stretch x)
            warped = spatial.warp(moving_small[b:b + 1].expand(part.shape[0], *moving_small.shape[1:]),
                                  spatial.affine_to_displacement(on_big, big))
            features = similarity.features(warped)  # (k, C, *big)
            window = (slice(None), *(slice(0, 2 * p + 1) for p in pad))
            if masked is not None:
                ssd = _masked_shift_ssd(features, masked, weights, b, on_big, big)[window]
            else:
                spectrum = torch.fft.rfftn(features, dim=dims)
                cross = torch.fft.irfftn(spectrum * fixed_spectrum[b:b + 1].conj(), s=big, dim=dims).sum(dim=1)
                energy = torch.fft.irfftn(torch.fft.rfftn(features.square().sum(dim=1, keepdim=True), dim=dims)
                                          * ones[b:b + 1].conj(), s=big, dim=dims)[:, 0]
                ssd = (fixed_energy[b] - 2 * cross[window] + energy[window]) / (voxels * channels)
            ssd = ssd.flatten(1)
            best, where = ssd.min(dim=1)
            index = torch.stack(torch.unravel_index(where, tuple(2 * p + 1 for p in pad)), dim=1)  # (k, n)
            offset = index.to(part.dtype) - torch.tensor(pad, dtype=part.dtype, device=part.device)  # voxels
            step = offset * 2.0 / torch.tensor([int(size) - 1 for size in shape], dtype=part.dtype,
                                               device=part.device)  # normalised fixed units
            moved = part.clone()
            moved[:, :, ndim] = part[:, :, ndim] + (part[:, :, :ndim] @ step[..., None])[..., 0]
            shifted.append(moved)
            scores.append(best)
    return torch.cat(shifted).view_as(thetas), torch.cat(scores).view(batch, count)


# The masked shift search keeps shifts whose overlap of the masks is at least this share of the largest.
SHIFT_OVERLAP = 0.5


class _MaskedFixed(NamedTuple):
    """Spectra of fixed's side of :func:`_masked_shift_ssd` for one pair, padded as :func:`_best_shifts` pads:
    its mask ``w_f``, ``w_f |f|^2`` and ``w_f f``."""

    weight: torch.Tensor
    energy: torch.Tensor
    features: torch.Tensor


def _masked_fixed_spectra(fixed_features: torch.Tensor, weights: _Weights, b: int,
                          padding: list[int]) -> _MaskedFixed:
    """:class:`_MaskedFixed` of pair ``b`` (fixed's features ``(1, C, *s)``), computed once for all its candidates."""
    dims = tuple(range(-(fixed_features.ndim - 2), 0))
    weight = torch.ones_like(fixed_features[:, :1]) if weights.fixed is None else weights.fixed[b:b + 1]
    parts = (weight, weight * fixed_features.square().sum(dim=1, keepdim=True), weight * fixed_features)
    return _MaskedFixed(*(torch.fft.rfftn(nnf.pad(part, padding), dim=dims) for part in parts))


def _masked_shift_ssd(features: torch.Tensor, fixed: _MaskedFixed, weights: _Weights, b: int,
                      on_big: torch.Tensor, big: list[int]) -> torch.Tensor:
    """Masked mean squared feature difference at every shift of :func:`_best_shifts`' padded grid.

    ``features`` ``(k, C, *big)``: moving's warped by each candidate ``on_big`` ``(k, n, n+1)``; ``fixed``:
    fixed's side (:func:`_masked_fixed_spectra`). With ``w_f`` fixed's mask and ``w_m`` moving's warped alike,
    each term is a cross-correlation ``sum_x a(x + t) c(x)`` by FFT: the difference ``sum w_f w_m (f - m)^2``
    and the overlap ``sum w_f w_m``. Returns ``(k, *big)``, infinite where the overlap is under
    :data:`SHIFT_OVERLAP` of its largest.
    """
    dims = tuple(range(-len(big), 0))
    count, channels = features.shape[0], features.shape[1]

    def correlate(moving_spectrum: torch.Tensor, fixed_spectrum: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfftn(moving_spectrum * fixed_spectrum.conj(), s=big, dim=dims).sum(1)

    if weights.moving is None:
        moving_weight = torch.ones_like(features[:, :1])
    else:
        moving_weight = spatial.warp(weights.moving[b:b + 1].expand(count, *weights.moving.shape[1:]),
                                     spatial.affine_to_displacement(on_big, big), padding_mode="zeros")
    weight_spectrum = torch.fft.rfftn(moving_weight, dim=dims)
    overlap = correlate(weight_spectrum, fixed.weight)
    difference = (correlate(weight_spectrum, fixed.energy)
                  - 2 * correlate(torch.fft.rfftn(moving_weight * features, dim=dims), fixed.features)
                  + correlate(torch.fft.rfftn(moving_weight * features.square().sum(dim=1, keepdim=True), dim=dims),
                              fixed.weight))
    enough = overlap >= SHIFT_OVERLAP * overlap.flatten(1).amax(dim=1).view(-1, *[1] * len(big))
    return torch.where(enough & (overlap > 0), difference / (overlap.clamp_min(1e-6) * channels),
                       torch.full_like(difference, float("inf")))


def _rank(thetas: torch.Tensor, moving_small: torch.Tensor, fixed_features: torch.Tensor, similarity: Similarity,
          fixed_shape, bounds: AffineBounds,
          weights: _Weights | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates ``(B, K, n, n+1)`` sorted best first by the similarity at low resolution, those
    outside ``bounds`` after every plausible one: ``(thetas, scores (B, K), allowed (B, K))``."""
    with torch.no_grad():
        scores = _score_affines(moving_small, fixed_features, thetas, similarity, weights)
    return _ranked(thetas, scores, fixed_shape, bounds)


def _ranked(thetas: torch.Tensor, scores: torch.Tensor, fixed_shape,
            bounds: AffineBounds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scored candidates ``(B, K, n, n+1)``, ``(B, K)`` sorted as :func:`_rank` sorts them."""
    batch, count = thetas.shape[:2]
    allowed = plausible_mask(thetas.flatten(0, 1), fixed_shape, bounds).view(batch, count).to(thetas.device)
    return _sort_ranked(thetas, scores, allowed)


def _sort_ranked(thetas, scores, allowed):
    penalty = torch.where(allowed, torch.zeros_like(scores), torch.full_like(scores, 1e6))
    order = (scores + penalty).argsort(dim=1)
    n = thetas.shape[2]
    return (torch.gather(thetas, 1, order.view(*order.shape, 1, 1).expand(-1, -1, n, n + 1)),
            torch.gather(scores, 1, order), torch.gather(allowed, 1, order))


def _merge_ranked(first, second):
    """Two ranked candidate sets as one, ranked."""
    return _sort_ranked(*(torch.cat([a, b], dim=1) for a, b in zip(first, second)))


def moment_candidates(moving: torch.Tensor, fixed: torch.Tensor, config: RefineConfig, keep: int,
                      fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The ``keep`` best distinct starts ``(B, keep, n, n + 1)`` of ``config``'s moments search
    (see :func:`moments_init`), for :func:`~firekit.registration.refine.refine`'s ``theta0``; the masks as it takes
    them."""
    check_images(moving, fixed)
    moving = moving.detach().to(fixed)
    regions = pyramid_regions(moving, fixed, moving_mask, fixed_mask)
    best, _ = moments_search(Pyramid(moving), Pyramid(fixed.detach()), config, keep=keep, regions=regions)
    return best


def moments_init(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    similarity: str = "mind",
    angles: Sequence[float] | None = None,
    foreground: float = -0.9,
    scan_size: int = 32,
    orientation: str = "header",
) -> torch.Tensor:
    """Affine pre-alignment from the foreground's centre of mass and principal axes.

    The moments fix the affine up to a rotation ``R`` in the whitened frame
    (``x_m = c_m + C_m^1/2 R C_f^-1/2 (x_f - c_f)``, covariances in voxel units, so grids with
    axes of different sizes are handled); every candidate ``R`` of :func:`candidate_rotations`
    (and the identity) is scored by ``similarity`` at low resolution and the best kept per sample.

    Args:
        moving: ``(B, 1, *S_m)`` images in [-1, 1] (background near -1).
        fixed: ``(B, 1, *S_f)``.
        similarity: a key of :data:`firekit.core.similarity.SIMILARITIES`.
        angles: degrees scanned in each plane (default: :meth:`RefineConfig.preset`'s: in 2D every
            10 deg from -40 to 40, which with the 90-degree turns covers the circle; in 3D
            -10 and 10 deg, on top of the 24 axis permutations).
        foreground: intensity above which a voxel is foreground.
        scan_size: candidates are scored on fixed downsampled by ``min(S_f) // scan_size`` (>= 1).
        orientation: ``"header"`` keeps to candidates within :func:`firekit.registration.check.default_bounds`
            (judged on fixed's grid: exact when both images share a grid of isotropic voxels, as
            ``register`` gives them); ``"search-axes"`` also tries 90/180-degree turns.

    Returns:
        ``(B, n, n + 1)`` normalised ``theta`` (fixed point -> moving point):
        ``warp(moving, affine_to_displacement(theta, S_f))`` is roughly aligned with ``fixed``.
    """
    ndim = check_images(moving, fixed)
    overrides = dict(similarity=similarity, foreground=foreground, scan_size=scan_size, orientation=orientation)
    if angles is not None:
        overrides["scan_angles"] = tuple(angles)
    best, _ = moments_search(Pyramid(moving.detach().to(fixed)), Pyramid(fixed.detach()),
                             RefineConfig.preset(ndim, **overrides), keep=1)
    return best[:, 0]
