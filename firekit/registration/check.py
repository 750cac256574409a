"""Plausible affines and the check of a registration's answer against its start.

Two jobs, both on normalised tensors (:mod:`firekit.core.spatial`) of images that share one grid of
isotropic voxels (as :func:`firekit.registration.pipeline.register` gives them):

* :class:`AffineBounds` / :func:`implausible`: is an affine one that a scanner and a protocol can
  produce? Its fixed -> moving linear part, split by the polar decomposition into a rotation and a
  stretch, must turn by at most ``max_rotation_deg``, stretch each axis by a factor within
  ``scale_range``, and keep handedness (no reflection). With valid file headers the images arrive
  roughly in the same orientation, so a 90 or 180 degree turn is an error, never an answer; the
  bound keeps the start, the network's affine and the refinement from proposing one.
* :func:`check`: after registration, score the answer and the simpler candidates it started
  from (its start, the headers' identity) by MIND-SSC over fixed's foreground; when the answer is
  implausible or scores worse than one of them by more than :data:`MARGIN`, fall back to the best
  plausible candidate and say why (:class:`CheckReport`).

As the check stage of :func:`firekit.registration.pipeline.register`, :func:`checked` runs it on CPU
tensors and warps again only the pairs that fell back; :func:`start_candidate` turns the refinement's
start into a candidate and :func:`slices_report` sums up a volume checked slice by slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as nnf

from firekit.core import spatial
from firekit.core.errors import FirekitError
from firekit.core.similarity import get_similarity

__all__ = ["AffineBounds", "default_bounds", "affine_geometry", "implausible", "plausible_mask", "Candidate",
           "CheckReport", "check", "checked", "start_candidate", "slices_report", "coarsening", "ORIENTATIONS"]

# "header": trust the files' orientation (rotations within the bound only); "search-axes": also
# try every 90/180-degree turn and axis permutation, for files whose headers are wrong.
ORIENTATIONS = ("header", "search-axes")

# The test protocol (firekit.data.augment, the paper's Section 4.1) rotates by up to 20 deg in 2D and by
# up to 15 deg about each axis in 3D (~26 deg in all); scans of heads tilt by less. Each bound
# leaves a margin of ~20 deg above the protocol's largest turn.
_MAX_ROTATION_DEG = {2: 45.0, 3: 45.0}
# An optimised affine (the refinement's, the network's answer) may turn this far past the rotation bound
# that its starts keep: a 3D head turned by 43.8 deg (and scaled, sheared) came back turned by 46 deg, was
# rejected and its start kept (EPE 14 mm), and a start that drifted past 45 deg to the right answer lost
# to one that stayed inside (EPE 19 mm). A 90 or 180 degree turn stays far outside.
DRIFT_DEG = 10.0
# The protocol scales one axis by 1 +- 0.5 (so the answer by 0.67-2) with a 10 % jitter and shear;
# a factor 3 either way leaves room for real differences in head size and field of view.
_SCALE_RANGE = (1.0 / 3.0, 3.0)


@dataclass(frozen=True)
class AffineBounds:
    """What a plausible fixed -> moving affine does.

    Attributes:
        max_rotation_deg: largest rotation (the polar decomposition's, about any axis); None: any.
        scale_range: (low, high) bounds on each singular value of the linear part.
    """

    max_rotation_deg: float | None = 45.0
    scale_range: tuple[float, float] = _SCALE_RANGE

    def __post_init__(self):
        low, high = self.scale_range
        if not 0 < low <= 1 <= high:
            raise FirekitError(f"AffineBounds.scale_range must be (low, high) with 0 < low <= 1 <= high, got "
                               f"{self.scale_range}")
        if self.max_rotation_deg is not None and not 0 <= self.max_rotation_deg <= 180:
            raise FirekitError(f"AffineBounds.max_rotation_deg must be in [0, 180] or None, got "
                               f"{self.max_rotation_deg}")

    def drifted(self, degrees: float = DRIFT_DEG) -> "AffineBounds":
        """The bounds of an affine optimised from a start within these: the rotation bound raised by ``degrees``
        (:data:`DRIFT_DEG`), so that an answer near the bound is not rejected for the optimiser's last degrees."""
        if self.max_rotation_deg is None:
            return self
        return replace(self, max_rotation_deg=min(self.max_rotation_deg + degrees, 180.0))


def default_bounds(ndim: int, orientation: str = "header") -> AffineBounds:
    """The documented bounds for ``ndim`` images; ``"search-axes"`` lifts the rotation bound."""
    if orientation not in ORIENTATIONS:
        raise FirekitError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    rotation = _MAX_ROTATION_DEG[ndim] if orientation == "header" else None
    return AffineBounds(max_rotation_deg=rotation)


def affine_geometry(theta: torch.Tensor, shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rotation, stretch and handedness of normalised affines on a grid of isotropic voxels.

    Args:
        theta: ``(B, n, n + 1)`` normalised fixed -> moving affines on ``shape``.

    Returns:
        ``rotation_deg`` ``(B,)`` the polar rotation's angle; ``scales`` ``(B, n)`` singular values
        of the voxel linear part; ``determinant`` ``(B,)``.
    """
    n = theta.shape[1]
    linear = spatial.normalised_affine_to_voxel(theta.detach().double().cpu(), shape)[:, :, :n]
    u, scales, vh = torch.linalg.svd(linear)
    rotation = u @ vh
    determinant = torch.linalg.det(linear)
    if n == 2:
        angle = torch.atan2(rotation[:, 1, 0] - rotation[:, 0, 1], rotation[:, 0, 0] + rotation[:, 1, 1]).abs()
    else:
        trace = rotation.diagonal(dim1=-2, dim2=-1).sum(-1)
        angle = torch.acos(((trace - 1) / 2).clamp(-1.0, 1.0))
    return dict(rotation_deg=torch.rad2deg(angle), scales=scales, determinant=determinant)


def implausible(theta: torch.Tensor, shape: Sequence[int], bounds: AffineBounds) -> list[str | None]:
    """Per sample, why the affine ``(B, n, n + 1)`` is outside ``bounds`` (None when it is inside)."""
    geometry = affine_geometry(theta, shape)
    low, high = bounds.scale_range
    reasons: list[str | None] = []
    for rotation, scales, determinant in zip(geometry["rotation_deg"].tolist(), geometry["scales"].tolist(),
                                             geometry["determinant"].tolist()):
        if not math.isfinite(determinant) or determinant <= 0:
            reasons.append("a reflection" if math.isfinite(determinant) else "a non-finite affine")
        elif min(scales) < low or max(scales) > high:
            reasons.append(f"a scale of {min(scales) if min(scales) < low else max(scales):.2f} "
                           f"(bound {low:.2f}-{high:.2f})")
        elif bounds.max_rotation_deg is not None and rotation > bounds.max_rotation_deg:
            reasons.append(f"a {rotation:.0f} deg rotation (bound {bounds.max_rotation_deg:.0f} deg)")
        else:
            reasons.append(None)
    return reasons


def plausible_mask(theta: torch.Tensor, shape: Sequence[int], bounds: AffineBounds) -> torch.Tensor:
    """``(B,)`` bool: which affines are inside ``bounds``."""
    return torch.tensor([reason is None for reason in implausible(theta, shape, bounds)], device=theta.device)


class Candidate(NamedTuple):
    """One answer the check weighs: its name, normalised affine part and whole displacement."""

    name: str
    theta: torch.Tensor  # (B, n, n + 1)
    displacement: torch.Tensor  # (B, n, *S)


@dataclass
class CheckReport:
    """The check's verdict for one pair.

    Attributes:
        verdict: ``"ok"`` (the answer kept) or ``"fallback"`` (a simpler candidate kept instead).
        chosen: the kept candidate's name (``"result"``, ``"start"``, ``"header"``).
        reason: one line saying why, when it fell back ("" otherwise).
        scores: candidate name -> MIND-SSC loss over fixed's foreground (lower is better); ``None``
            for a candidate outside the bounds.
    """

    verdict: str = "ok"
    chosen: str = "result"
    reason: str = ""
    scores: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(verdict=self.verdict, chosen=self.chosen, reason=self.reason,
                    scores={k: (None if v is None else round(float(v), 6)) for k, v in self.scores.items()})


# The answer is rejected only when a candidate beats it by more than this fraction of its loss:
# the check is there for gross errors, not to second-guess a refinement by noise.
MARGIN = 0.01
# Voxels of fixed above this intensity (normalised, background near -1), grown by _GROW voxels,
# are where the candidates are compared: the background's noise says nothing about the alignment.
_FOREGROUND, _GROW = -0.9, 2
# Images of more voxels than this are scored on a grid coarsened by 2 (again while still larger):
# the check looks for gross errors (a turn, centimetres off), which 2.56 mm voxels show as well as
# 1.28 mm ones. A 128 x 160 x 128 volume: 8.0 s -> 0.3 s on one thread, the same candidate chosen
# on every one of 30 3D pairs (bench/results.md, bench/identity.md, bench/gross_failures.py's).
_MAX_VOXELS = 2 ** 20


def coarsening(shape: Sequence[int]) -> int:
    """The factor (a power of 2) that brings a grid of ``shape`` to at most :data:`_MAX_VOXELS` (2^20)
    voxels, where images are scored to judge between answers (1 for every 2D slice and small volume)."""
    factor = 1
    while math.prod(max(s // factor, 1) for s in shape) > _MAX_VOXELS and min(shape) // (2 * factor) >= 8:
        factor *= 2
    return factor


def _scores(moving: torch.Tensor, fixed: torch.Tensor, displacements: list[torch.Tensor],
            fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MIND-SSC loss ``(K, B)`` of ``moving`` warped by each displacement, over fixed's foreground
    (times ``fixed_mask``, and ``moving_mask`` where each displacement takes it, when given); large
    images on a coarser grid (:func:`coarsening`)."""
    similarity = get_similarity("mind")
    n = fixed.ndim - 2
    factor = coarsening(fixed.shape[2:])
    if factor > 1:  # every image, field and mask averaged over the same blocks
        average = getattr(nnf, f"avg_pool{n}d")
        moving, fixed = average(moving, factor), average(fixed, factor)
        displacements = [average(d.to(fixed), factor) for d in displacements]
        fixed_mask, moving_mask = (None if m is None else average(m.to(fixed), factor) for m in (fixed_mask, moving_mask))
    pool = getattr(nnf, f"max_pool{n}d")
    mask = pool((fixed > _FOREGROUND).to(fixed.dtype), 2 * _GROW + 1, stride=1, padding=_GROW)
    if fixed_mask is not None:
        mask = mask * fixed_mask.to(mask)
    target = similarity.features(fixed)
    out = []
    for displacement in displacements:
        warped = spatial.warp(moving, displacement.to(moving))
        weight = mask if moving_mask is None else mask * spatial.warp(
            moving_mask.to(mask), displacement.to(mask), padding_mode="zeros")
        out.append(similarity.compare(similarity.features(warped), target, weight))
    return torch.stack(out)


def check(moving: torch.Tensor, fixed: torch.Tensor, candidates: Sequence[Candidate], bounds: AffineBounds,
          fixed_mask: torch.Tensor | None = None,
          moving_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[CheckReport]]:
    """Keep, per pair, the registration's answer unless a simpler candidate beats it.

    Args:
        moving, fixed: ``(B, 1, *S)`` images on one grid (normalised intensities).
        candidates: the answer first (named ``"result"``), then the candidates to fall back to, in
            order of preference on ties (e.g. its start, then the headers' identity).
        bounds: a candidate outside them is never kept, nor the answer outside ``bounds.drifted()``
            (it was optimised from a start within them).
        fixed_mask, moving_mask: optional ``(B, 1, *S)`` weights (the user's masks): the similarity
            counts only inside both.

    Returns:
        ``(theta (B, n, n + 1), displacement (B, n, *S), reports)``: the kept candidate per pair.
    """
    if not candidates:
        raise FirekitError("check needs at least the registration's answer as a candidate")
    shape = fixed.shape[2:]
    with torch.no_grad():
        losses = _scores(moving, fixed, [c.displacement for c in candidates], fixed_mask, moving_mask)  # (K, B)
    outside = [implausible(c.theta, shape, bounds.drifted() if k == 0 else bounds)  # per candidate, per pair
               for k, c in enumerate(candidates)]
    allowed = torch.tensor([[why is None for why in per_pair] for per_pair in outside], device=losses.device)
    reasons = outside[0]
    theta = candidates[0].theta.clone()
    displacement = candidates[0].displacement.clone()
    reports = []
    for b in range(fixed.shape[0]):
        masked = torch.where(allowed[:, b], losses[:, b], torch.full_like(losses[:, b], math.inf))
        best = int(masked.argmin()) if bool(torch.isfinite(masked).any()) else 0
        if best != 0 and bool(allowed[0, b]) and float(losses[best, b]) >= float(losses[0, b]) * (1 - MARGIN):
            best = 0  # within the margin: keep the answer
        scores = {c.name: (float(losses[k, b]) if bool(allowed[k, b]) else None) for k, c in enumerate(candidates)}
        report = CheckReport(scores=scores)
        if best != 0:
            kept = candidates[best]
            why = (f"its affine has {reasons[b]}" if reasons[b] is not None else
                   f"its MIND loss {float(losses[0, b]):.4f} is worse than {kept.name}'s {float(losses[best, b]):.4f}")
            report.verdict, report.chosen = "fallback", kept.name
            report.reason = f"check: the registration was rejected ({why}); kept the {kept.name} alignment instead"
            theta[b] = kept.theta[b].to(theta)
            displacement[b] = kept.displacement[b].to(displacement)
        reports.append(report)
    return theta, displacement, reports


def checked(moving: torch.Tensor, fixed: torch.Tensor, candidates: Sequence[Candidate], bounds: AffineBounds,
            warped: torch.Tensor, fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[CheckReport]]:
    """:func:`check` on CPU tensors -> ``(theta, displacement, warped, reports)``.

    The user's masks weigh it; the fields of view do not, so an answer that maps fixed's anatomy
    out of moving's view is not excused. ``warped`` ``(B, 1, *S)`` (moving warped by the answer) is
    redone only for pairs that fell back.
    """
    masks = [None if m is None else m.cpu() for m in (fixed_mask, moving_mask)]
    theta, disp, reports = check(moving, fixed, candidates, bounds, *masks)
    fell_back = [b for b, report in enumerate(reports) if report.verdict != "ok"]
    if fell_back:
        warped = warped.clone()
        warped[fell_back] = spatial.warp(moving[fell_back], disp[fell_back])
    return theta, disp, warped, reports


def start_candidate(start: torch.Tensor, winner: torch.Tensor, flow: torch.Tensor | None,
                    shape: Sequence[int]) -> Candidate:
    """The refinement's start as the check's ``"start"`` candidate on ``shape``.

    Args:
        start: ``(B, n, n + 1)`` the affine each pair's refinement started from.
        winner: ``(B,)`` which start each pair kept (0: the first, the network's when it gave ``flow``).
        flow: ``(B, n, *s)`` the network's flow (None: none): the network's whole answer where its affine
            was the start kept, the affine alone elsewhere.
    """
    start = start.cpu()
    displacement = spatial.affine_to_displacement(start, shape)
    if flow is not None:
        from_network = (winner.cpu() == 0).view(-1, *[1] * (len(shape) + 1))
        with_flow = spatial.compose_affine_displacement(start, spatial.resize_displacement(flow.cpu(), shape))
        displacement = torch.where(from_network, with_flow, displacement)
    return Candidate("start", start, displacement)


def slices_report(reports: list[CheckReport]) -> CheckReport:
    """One report for a volume registered slice by slice: ``"fallback"`` if any slice fell back."""
    fell_back = [k for k, r in enumerate(reports) if r.verdict != "ok"]
    if not fell_back:
        return CheckReport()
    return CheckReport("fallback", "header", f"check: {len(fell_back)} of {len(reports)} slices kept the headers' "
                       f"alignment (slices {', '.join(map(str, fell_back[:8]))}{' ...' if len(fell_back) > 8 else ''})")
