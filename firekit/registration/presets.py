"""The refinement's settings: :class:`RefineConfig` and the presets tuned for 2D slices and 3D volumes.

Every stage of the refinement reads them: the moments search (:mod:`firekit.registration.moments`), the
affine stage (:mod:`firekit.registration.affine_stage`) and the non-rigid stage
(:mod:`firekit.registration.field_stage`), driven by :func:`firekit.registration.refine.refine`.
"""

from __future__ import annotations

from dataclasses import dataclass

from firekit.core.config import PlainConfig
from firekit.core.errors import FirekitError
from firekit.core.similarity import SIMILARITIES, Similarity, get_similarity
from firekit.registration.check import ORIENTATIONS, AffineBounds, default_bounds
from firekit.registration.regularisers import REGULARISERS

__all__ = ["RefineConfig"]

# Per-ndim settings, tuned on demo-style pairs (T2-like moving -> T1 fixed; see FINDINGS.md,
# "Explicit per-pair optimisation beats ANTs on a CPU"). 2D: 128 x 160 slices; 3D: 128 x 160 x 128.
_PRESETS: dict[int, dict] = {
    2: dict(
        scan_angles=tuple(float(a) for a in range(-40, 41, 10)),
        affine_levels=(4, 2), affine_iterations=(40, 20),
        field_levels=(2, 1), field_iterations=(60, 40),
        # Diffusion matched or beat bending (0.811 vs 0.805 mean Dice) and never folded; with
        # bending, the foreground mask is needed to stop folds in noisy background near borders.
        # Control points 8 voxels apart (10 mm on the 1.28 mm grid, elastix's default B-spline spacing;
        # 6 until 2026-12-07): fewer, stiffer points follow less noise. Interleaved, one thread, the
        # default path: bench pairs (40 per case) T2-like 0.8046 -> 0.8084 mean Dice, FLAIR-like 0.8742 ->
        # 0.8754, T1 -> T1 0.9077 -> 0.9085, EPE lower in each (T1 -> T1 median 0.268 -> 0.247 mm); 504
        # protocol pairs 0.8237 -> 0.8251 (EPE 1.287 -> 1.274 mm); 40 real-head pairs 0.852 -> 0.855; no
        # gross failure. 10-12 voxels scored a little higher still on these smooth protocol fields, 16 lower
        # (T1 -> T1): 8 keeps room for anatomy that differs more finely than they do.
        grid_spacing=8, regulariser="diffusion", weight=0.3, field_mask=False,
        # The non-rigid stage's similarity: MIND plus 0.3 x normalised mutual information (2026-12-07, eighth
        # session). MIND's descriptors of two contrasts can prefer an edge a little off where the intensities put
        # it, and are less precise than intensities within one contrast; the joint histogram pins both. The
        # default path, bench pairs (40 per case, interleaved, one thread): T2-like 0.808 -> 0.825 mean Dice
        # (EPE 1.05 -> 0.94 mm), FLAIR-like 0.875 -> 0.877 (0.93 -> 0.85), T1 -> T1 0.909 -> 0.913 (0.49 ->
        # 0.44, median 0.27 -> 0.19); weight 0.2 and 0.3 about level (FLAIR-like 0.879 / T2-like 0.821 at 0.2),
        # 1 lost in the multi-modal cases. Real heads (40 2D pairs): T1 0.868 -> 0.890, T2-like 0.841 -> 0.860.
        field_similarity="mind-mi", mi_weight=0.3,
        # The start's search (bench/gross_failures.md): centre-of-mass candidates on a grid of
        # per-axis scales and four distinct starts for the affine stage (together: --no-network from
        # 11 to 1 gross failure in 120 protocol pairs, 0.1 s more per pair).
        scan_scales=(0.6, 0.8, 1.0, 1.25, 1.6, 2.0), starts=4,
        # The FFT shift search for the 32 best candidates, as a family with starts of its own (a
        # field of view that cuts the moving brain misplaces the centres of mass; mixed into one
        # ranking, the shifts pulled near-round vertex slices off, Dice 0.93 -> 0.58). With the
        # opened foreground (RefineConfig.foreground_opening): --no-network from 10 to 0 gross
        # failures in 504 protocol pairs (bench/gross_failures.md).
        shift_reach=0.2,
        # Points taken beyond a cut moving foreground's field of view are left out of the similarity
        # (a real head stretched past the field of view: 12.8 -> 3.6 mm; 504 protocol pairs: 0 gross).
        outside_cost=1.0,
    ),
    3: dict(
        # Each axis permutation also turned by +-10 degrees in each plane.
        # Judged at 1/5 size (scan_size 24; 1/8 turned a PD-like pair by 20 deg, EPE 32 mm -> 1.2 mm),
        # with a grid of per-axis scales for the centre-of-mass candidates. Two distinct starts for the
        # affine stage: a head turned 43.8 deg (with a 1.3x stretch) was 19 mm off from the one best
        # candidate and 0.9 mm from two; on 20 protocol pairs and the bench's 6 no answer changed by 0.002
        # Dice, at ~0.1 s more.
        scan_angles=(-10.0, 0.0, 10.0), scan_size=24, starts=2, scan_scales=(0.7, 1.0, 1.4),
        # Exact MIND at 1/4 size, moving smoothed before sampling (2.3x faster steps, same Dice).
        # A level at 1/2 costs 0.5 s a step; one at 1/8 first fell into wrong rotations.
        affine_levels=(4,), affine_iterations=(50,), affine_smooth_first=True,
        # 2-5 % of the voxels per step matched every voxel (within 0.003 Dice) at 1/7 of the cost.
        # The full-resolution level: +0.02 mean Dice (CSF, GM), EPE -0.3 mm, 2.1x the time
        # (bench/refine_3d.md); still several times faster than ANTs SyN (bench/results.md).
        field_levels=(4, 2, 1), field_iterations=(60, 40, 20), field_sampling=0.03,
        # Bending let 3D fields fold near the borders; the mask cost 0.01 Dice here. Weight 0.1
        # beat 0.3 by 0.003 mean Dice and 0.3 mm EPE (GM, WM up; CSF, whose outer edge T1 hides, down).
        # Control points 8 voxels apart at every level (10 mm at full resolution, as in 2D; 4 until
        # 2026-12-07). Interleaved, one thread: the bench's 6 pairs T2-like 0.807 -> 0.810 mean Dice,
        # FLAIR-like 0.902 -> 0.905, T1 -> T1 0.936 -> 0.937, EPE 1.03 / 0.70 / 0.36 -> 1.00 / 0.65 / 0.33 mm;
        # 20 protocol pairs 0.821 -> 0.824 (EPE 1.29 -> 1.22 mm, worst 2.9 -> 2.5); 6 real-head pairs
        # 0.821 -> 0.826 (0.79 -> 0.73 mm); same time. 6 scored between; 10-12 a little higher in T2-like and
        # FLAIR-like (0.814-0.816, 0.906), level in T1 -> T1: kept at 8, as in 2D.
        grid_spacing=8, regulariser="diffusion", weight=0.1, field_mask=False,
        # MIND plus 0.1 x normalised mutual information in the non-rigid stage (as in 2D; 0.3 lost end-point
        # error here, its histogram read from 3 % of the voxels, 1.2k at the coarsest level). Bench pairs (2 per
        # case): T2-like 0.811 -> 0.815 (EPE 1.00 -> 0.98 mm), FLAIR-like 0.905 -> 0.908 (0.65 -> 0.63),
        # T1 -> T1 0.937 -> 0.941 (0.33 -> 0.32), better on every pair; real heads (6 pairs): T1 0.874 -> 0.890,
        # T2-like 0.778 -> 0.795.
        field_similarity="mind-mi", mi_weight=0.1,
        # Each level's rates decay (cosine) to 1/10: the sampled similarity's noisy gradients otherwise
        # keep Adam jittering about the optimum. Held-out validation pairs (2 per case, refinement
        # alone): T1 -> T1 0.934 -> 0.940 Dice, EPE 0.34 -> 0.27 mm; T2-like +0.004, FLAIR-like +0.001;
        # no cost. (In 2D, where every pixel counts, it changed nothing: not set there.)
        final_rate=0.1,
    ),
}


# What changes when the affine stage also starts from a network's affine (``RefineConfig.preset(ndim,
# start="network")``): the network's start is near the answer, so one moments start beside it and a
# shorter schedule reach the Dice of the whole schedule from moments (bench/training.md, "The network
# earns its place"). 3D registers from moments by default (the shipped 3D network is weaker).
# The network's flow is averaged onto the first control grid (network_flow="grid"), which is then optimised
# and regularised whole, instead of kept as a fixed base the grid only corrects. 3D: the shipped 3D network's
# flow lowers its own affine's Dice; kept, it stayed in the answer (FLAIR-like 0.895 vs 0.902 from moments
# alone, 0.10 % folding); on the grid 0.902, T1 -> T1 0.929 -> 0.936 (bench pairs). 2D, registering both
# ways (the default): on a real head with skull, which the network never saw (bench/real_heads.py, 40
# pairs), mean Dice 0.865 -> 0.869 (T1) and 0.809 -> 0.828 (T2-like); on 504 protocol pairs of the
# demo's kind 0.824 -> 0.823, EPE 1.25 -> 1.27 mm, no gross failure either way (bench/gross_failures.md).
# 2D affine steps at 1/2 size 10 -> 5 (2026-12-07): 8 % faster, the non-rigid stage takes up what the affine
# leaves. Probed interleaved (on top of a shared moments search, since dropped): 504 protocol pairs 0.8236 ->
# 0.8227 mean Dice (EPE 1.28 -> 1.29 mm), 40 real-head pairs 0.852 -> 0.853, no gross failure either way. Then
# bench/gross_failures.py with it: 0.8237 mean Dice, 1.29 mm, 0.26 s per pair, 0.47x the whole schedule from
# moments' time (0.8213, 1.30 mm; the fifth session's (20, 10): 0.823, 1.29 mm, 0.51x).
_NETWORK_PRESETS: dict[int, dict] = {
    2: dict(network_starts=1, cut_network_starts=2, affine_iterations=(20, 5), field_iterations=(20, 20),
            network_flow="grid"),
    3: dict(network_flow="grid"),
}


@dataclass
class RefineConfig(PlainConfig):
    """Settings of :func:`~firekit.registration.refine.refine` (and of the moments search it starts from).

    The field defaults are a generic configuration (bending energy with a foreground mask);
    :meth:`preset` gives the settings tuned for 2D slices and 3D volumes, which :func:`refine`
    uses when given no config.

    Attributes:
        similarity: ``"mind"`` (multi-modal default), ``"ngf"``, ``"lncc"``, ``"mse"``, ``"mi"`` (normalised
            mutual information) or ``"mind-mi"`` (MIND plus ``mi_weight`` times it).
        field_similarity: the non-rigid stage's similarity, where it differs from ``similarity`` (the
            moments search, the affine stage and the check keep ``similarity``); None: the same.
        mind_radius, mind_dilation: MIND-SSC patch half-width and neighbour distance (voxels of
            each pyramid level).
        mi_weight: the mutual information's weight in ``"mind-mi"``.
        mi_bins: histogram bins per image of ``"mi"`` and ``"mind-mi"``.
        ngf_eps: NGF edge threshold (intensity per voxel, images in [-1, 1]).
        lncc_window: LNCC window side (voxels of each level).
        affine_warp_features, field_warp_features: in the affine / non-rigid stage, compute the
            moving image's features once per level and resample them (fast) instead of
            recomputing them on the warped image at every step (exact, slower). In the affine
            stage the features are on moving's own grid, so MIND is off where the affine rotates
            or scales much (default False: exact); in the non-rigid stage they are computed on
            moving warped by the affine (default True). NGF, whose gradient vectors turn with
            the image, is always exact.
        affine_smooth_first: in the exact affine path, smooth moving once per level at full
            resolution (with the box fixed's level is smoothed with) and sample it straight onto
            the level grid at each step, instead of resampling it on a grid twice as fine and
            smoothing that down. About 2x faster steps in 3D; the smoothing box then stays
            aligned with moving's axes instead of turning with the affine. Default False.
        field_sampling: fraction of each non-rigid level's voxels at which the similarity is
            evaluated at each step (like ANTs' sampling percentage): a new uniform random sample
            (with replacement, from a generator seeded by ``seed``; the same voxels for every pair
            of a batch, so a pair's result does not depend on the others) every step, which makes
            the loss a noisy, unbiased estimate of the dense one and each step cheaper. 1 (default)
            uses every voxel. Applies only with warped features (``field_warp_features`` and a
            warpable similarity) and a pointwise similarity (not LNCC); otherwise every voxel is
            used. (The affine stage recomputes MIND at every step, which needs every voxel.)
        foreground: intensity above which a voxel of fixed counts as foreground (moments, mask).
        foreground_opening: the moments' foreground mask is opened by a cube this many voxels from
            its centre to its faces (erosion then dilation): specks of background noise above
            ``foreground``, spread over the whole field of view, otherwise pull the centres of mass
            to the grid's centre and swell the covariances. 0: off.
        outside_cost: how the affine and non-rigid stages count fixed's points that the transform
            takes outside moving's field of view, for pairs whose moving foreground reaches the edge
            of that view (the anatomy goes on beyond it: a head stretched past the field of view;
            :func:`cut_by_view`). 0: they compare with moving's replicated border, which pays the
            optimiser to shrink the anatomy back into view (a real head: 12.8 mm end-point error).
            k > 0: they are left out of the similarity (as ANTs and elastix drop samples outside
            the moving image) and cost k times the mean loss of the points inside instead (k > 1
            makes shrinking the overlap to its easiest part cost more). Default 0; the 2D preset 1
            (the real head: 3.6 mm; no gross failure in 504 protocol pairs; 3D not yet measured).
            Pairs whose foreground lies well inside
            its view (small vertex slices: there, leaving points out let the optimiser shrink the
            overlap) are scored as with 0.
        field_mask: the non-rigid similarity counts only the foreground of fixed or of moving
            after the affine, grown by ``mask_margin`` voxels of each level; the regulariser
            alone shapes the background.
        mask_margin: see ``field_mask``.
        scan_angles: rotations (degrees) tried in each plane of the whitened frame, on top of
            the proper signed axis permutations, when initialising from moments.
        scan_scales: the centre-of-mass candidates are also scaled by every combination of these
            factors along moving's axes, after their turn (a grid: ``len ** n`` per turn); () off.
        scan_stretches, scan_turns: a local search about the ``stretch_starts`` best moment
            candidates, ``search_rounds`` times: each is also tried stretched by each factor along
            each of fixed's axes and turned by each angle (degrees) in each plane, about fixed's
            centre of mass (foregrounds cut by the field of view, anatomy that changes shape, round
            outlines that leave the turn loose). Both () or ``stretch_starts`` 0: off.
        stretch_starts, search_rounds: see ``scan_stretches``.
        shift_reach: > 0: every moments candidate is first moved to the shift of fixed's grid its
            similarity prefers, up to this fraction of each axis, found for all shifts at once by FFT
            (MIND-SSC or MSE; the centres of mass misplace the answer when the field of view cuts
            the moving foreground), tried for the ``shift_starts`` best candidates; 0: off. The
            shifted candidates form a family of their own: the affine stage gets the ``starts``
            best distinct ones of each family (a shift at this resolution can pull a small,
            near-round foreground off; the unshifted family then keeps its own starts).
        start_spread: the ``starts`` candidates the affine stage refines differ from each other by
            more than this (largest difference of their normalised entries), so that they are
            distinct guesses, not one guess repeated.
        scan_size: the moment candidates are scored on images downsampled by the largest whole
            factor that keeps at least this many voxels along the shortest axis (never upsampled).
        starts: how many of the best moment candidates the affine stage refines at its first
            level; the one with the best full-resolution similarity goes on.
        network_starts: with a network's affine as a start too (``register`` with a model), how many
            of the best distinct moment candidates compete beside it.
        cut_network_starts: the same for pairs whose moving foreground reaches the edge of its field
            of view (:func:`cut_by_view`; the network learnt on whole brains, the moments search
            knows cut ones: a real head stretched past the field of view, 10.0 -> 6.0 mm).
        affine_levels: downsampling factor of each affine pyramid level, coarse to fine.
        affine_iterations: Adam steps at each affine level.
        affine_lr: Adam learning rate of the affine entries (normalised units).
        field_levels: downsampling factor of each non-rigid level, coarse to fine.
        field_iterations: Adam steps at each non-rigid level.
        field_lr: Adam learning rate of the control-grid displacements (normalised units).
        network_flow: how the non-rigid stage starts from a network's flow (``displacement0``): ``"keep"``
            adds it as it is and optimises a correction on the control grid; ``"grid"`` averages it onto
            the first level's control grid, which is then optimised and regularised whole (detail finer
            than the grid, right or wrong, is dropped).
        final_rate: within each affine and non-rigid level the rates fall by a cosine from their value
            to this fraction of it at the level's last step (:func:`~firekit.registration.levels.step_rate`);
            1: constant.
        grid_spacing: control-grid spacing in voxels of each level.
        regulariser: ``"bending"`` (second derivatives) or ``"diffusion"`` (first derivatives),
            mean over control points, in normalised coordinates.
        diffeomorphic: the control grid holds a stationary velocity field whose flow
            (``spatial.integrate_velocity``, ``integration_steps`` squarings, on the control grid)
            is the non-rigid part: large motion (a contracting ventricle) without folding. The
            regulariser then acts on the velocity.
        weight: the regulariser's weight lambda.
        seed: seed of the voxel samples (and of any other random draw) while optimising, for
            reproducibility.
        orientation: ``"header"`` (default): trust the files' orientation; the moments start and
            the affine keep within :func:`firekit.registration.check.default_bounds` (no turn beyond 45 deg, no
            reflection, scales within a factor 3). ``"search-axes"``: also try every 90/180-degree
            turn and axis permutation (for files whose headers are wrong).
    """

    config_name = "refine config"

    similarity: str = "mind"
    field_similarity: str | None = None
    mind_radius: int = 1
    mind_dilation: int = 1
    mi_weight: float = 1.0
    mi_bins: int = 32
    ngf_eps: float = 0.005
    lncc_window: int = 9
    affine_warp_features: bool = False
    affine_smooth_first: bool = False
    field_warp_features: bool = True
    field_sampling: float = 1.0
    outside_cost: float = 0.0
    field_mask: bool = True
    mask_margin: int = 2
    foreground: float = -0.9
    foreground_opening: int = 1
    scan_angles: tuple[float, ...] = tuple(float(a) for a in range(-40, 41, 10))
    scan_size: int = 32
    scan_scales: tuple[float, ...] = ()
    scan_stretches: tuple[float, ...] = (0.55, 0.7, 0.85, 1.2, 1.45, 1.8)
    scan_turns: tuple[float, ...] = (-16.0, -8.0, 8.0, 16.0)
    shift_reach: float = 0.0
    shift_starts: int = 32
    stretch_starts: int = 4
    search_rounds: int = 2
    start_spread: float = 0.1
    starts: int = 2
    network_starts: int = 1
    cut_network_starts: int = 1
    affine_levels: tuple[int, ...] = (4, 2)
    affine_iterations: tuple[int, ...] = (40, 20)
    affine_lr: float = 0.01
    field_levels: tuple[int, ...] = (2, 1)
    field_iterations: tuple[int, ...] = (60, 40)
    field_lr: float = 0.01
    final_rate: float = 1.0
    network_flow: str = "keep"
    grid_spacing: int = 4
    regulariser: str = "bending"
    weight: float = 3e-3
    diffeomorphic: bool = False
    integration_steps: int = 6
    seed: int = 0
    orientation: str = "header"

    def __post_init__(self):
        if self.orientation not in ORIENTATIONS:
            raise FirekitError(f"RefineConfig.orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        for name in ("scan_angles", "scan_scales", "scan_stretches", "scan_turns", "affine_levels",
                     "affine_iterations", "field_levels", "field_iterations"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.similarity not in SIMILARITIES:
            raise FirekitError(
                f"RefineConfig.similarity must be one of {sorted(SIMILARITIES)}, got {self.similarity!r}")
        if self.field_similarity is not None and self.field_similarity not in SIMILARITIES:
            raise FirekitError(f"RefineConfig.field_similarity must be None or one of {sorted(SIMILARITIES)}, got "
                               f"{self.field_similarity!r}")
        if self.regulariser not in REGULARISERS:
            raise FirekitError(
                f"RefineConfig.regulariser must be one of {sorted(REGULARISERS)}, got {self.regulariser!r}")
        for stage in ("affine", "field"):
            levels, iters = getattr(self, f"{stage}_levels"), getattr(self, f"{stage}_iterations")
            if len(levels) != len(iters) or any(int(f) < 1 for f in levels) or any(int(i) < 0 for i in iters):
                raise FirekitError(
                    f"RefineConfig.{stage}_levels (factors >= 1) and {stage}_iterations (>= 0) must have one "
                    f"entry per level, got {levels} and {iters}"
                )
        if (self.grid_spacing < 1 or self.scan_size < 4 or self.starts < 1 or self.network_starts < 1
                or self.cut_network_starts < 1):
            raise FirekitError(
                f"RefineConfig needs grid_spacing >= 1, scan_size >= 4, starts >= 1 and (cut_)network_starts >= 1, "
                f"got {self.grid_spacing}, {self.scan_size}, {self.starts}, {self.network_starts}, "
                f"{self.cut_network_starts}"
            )
        if self.outside_cost < 0:
            raise FirekitError(f"RefineConfig.outside_cost must be >= 0 (0: off), got {self.outside_cost}")
        if not 0 < self.field_sampling <= 1:
            raise FirekitError(f"RefineConfig.field_sampling must be a fraction in (0, 1], got {self.field_sampling}")
        if self.network_flow not in ("keep", "grid"):
            raise FirekitError(f"RefineConfig.network_flow must be 'keep' or 'grid', got {self.network_flow!r}")
        if not 0 < self.final_rate <= 1:
            raise FirekitError(f"RefineConfig.final_rate must be a fraction in (0, 1], got {self.final_rate}")
        if self.mi_weight < 0 or self.mi_bins < 4:
            raise FirekitError(f"RefineConfig needs mi_weight >= 0 and mi_bins >= 4, got {self.mi_weight} and "
                               f"{self.mi_bins}")
        if self.weight < 0 or self.affine_lr <= 0 or self.field_lr <= 0:
            raise FirekitError(
                f"RefineConfig needs weight >= 0 and positive learning rates, got weight {self.weight}, "
                f"affine_lr {self.affine_lr}, field_lr {self.field_lr}"
            )

    @classmethod
    def preset(cls, ndim: int, start: str = "moments", **overrides) -> "RefineConfig":
        """The tuned settings for 2D or 3D images, with any field overridden.

        ``start``: ``"moments"`` (the schedule from the moments search alone) or ``"network"`` (the
        shorter schedule tuned for when a network's affine and flow are a start too).
        """
        if ndim not in _PRESETS:
            raise FirekitError(f"RefineConfig presets exist for ndim 2 and 3, got {ndim}")
        if start not in ("moments", "network"):
            raise FirekitError(f"RefineConfig.preset start must be 'moments' or 'network', got {start!r}")
        network = _NETWORK_PRESETS[ndim] if start == "network" else {}
        return cls(**{**_PRESETS[ndim], **network, **overrides})


    def bounds(self, ndim: int) -> AffineBounds:
        """The :class:`~firekit.registration.check.AffineBounds` every affine of this refinement keeps within."""
        return default_bounds(ndim, self.orientation)

    def similarity_fn(self, stage: str = "affine") -> Similarity:
        """The configured :class:`~firekit.core.similarity.Similarity` of a stage (``"field"``: the non-rigid
        stage's, ``field_similarity`` where set)."""
        name = self.field_similarity if stage == "field" and self.field_similarity is not None else self.similarity
        return get_similarity(name, radius=self.mind_radius, dilation=self.mind_dilation,
                              eps=self.ngf_eps, window=self.lncc_window, mi_weight=self.mi_weight, bins=self.mi_bins)
