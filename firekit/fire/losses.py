"""Every term of FIRE's loss (Eqs. 1-13), each a pure tensor function, and their total.

Reading of the paper, stated once:

* RMS is the root-mean-square difference per sample, averaged over the batch, on
  normalised inputs (images in [-1, 1]).
* Eq. 7 as printed, RMS(F_AB(G(x^A) phi_AB), x^B), is identical to Eq. 2. Section 3.8 says
  computing L_reg "requires the input of the transformed images into G, which creates a
  circular computing graph", so Eq. 7 is read as F_AB(G(x^A o phi_AB)): the *image* is
  warped before G. Eq. 12 (R_reg, printed identical to Eq. 11) is read the same way with
  the affine part only: F_AB(G(x^A o phi_af_AB)).
* Eq. 10 is the bending energy of the non-rigid fields (sum over every point of all
  squared second derivatives), on G's grid, with derivatives taken in normalised
  coordinates so that a given deformation costs the same at any resolution. With
  lambda = 2^(2n) / (10 N) (Section 3.7, N = points of the input image) and G's grid
  having N / 2^(2n) points, lambda * R_smooth is one tenth of the mean bending energy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "rms",
    "syn_acc",
    "syn_fea",
    "syn_cyc",
    "syn_align",
    "reg_acc",
    "reg_ic",
    "r_smooth",
    "transform_supervision",
    "synthesis_supervision",
    "feature_invariance",
    "r_syn",
    "r_reg",
    "bending_energy",
    "smooth_lambda",
    "FireLoss",
    "fire_loss",
]

_EPS = 1e-12


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square difference of each sample, averaged over the batch.

    Args:
        a, b: ``(B, ...)`` tensors of the same shape.

    Returns:
        scalar. ``clamp_min`` keeps the gradient finite when ``a == b`` (value ~1e-6 there).
    """
    if a.shape != b.shape:
        raise ValueError(f"rms needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return mse.clamp_min(_EPS).sqrt().mean()


def syn_acc(synth_b_warped, x_b, synth_a_warped, x_a) -> torch.Tensor:
    """Eq. 2, synthesis accuracy: RMS(x^B-hat_T, x^B) + RMS(x^A-hat_T, x^A)."""
    return rms(synth_b_warped, x_b) + rms(synth_a_warped, x_a)


def syn_fea(feat_a, feat_b_warped, feat_b, feat_a_warped) -> torch.Tensor:
    """Eq. 3, modality-invariant features: RMS(G(x^A), G(x^B) phi_BA) + RMS(G(x^B), G(x^A) phi_AB)."""
    return rms(feat_a, feat_b_warped) + rms(feat_b, feat_a_warped)


def syn_cyc(cycle_a, x_a, cycle_b, x_b) -> torch.Tensor:
    """Eq. 4, cycle consistency: RMS(F_BA(G(x^B-hat)), x^A) + RMS(F_AB(G(x^A-hat)), x^B)."""
    return rms(cycle_a, x_a) + rms(cycle_b, x_b)


def syn_align(feat_a, feat_synth_b, feat_b, feat_synth_a) -> torch.Tensor:
    """Eq. 5, synthesis alignment: RMS(G(x^A), G(x^B-hat)) + RMS(G(x^B), G(x^A-hat))."""
    return rms(feat_a, feat_synth_b) + rms(feat_b, feat_synth_a)


def reg_acc(reg_b, x_b, reg_a, x_a) -> torch.Tensor:
    """Eq. 7 (image warped before G): RMS(F_AB(G(x^A o phi_AB)), x^B) + RMS(F_BA(G(x^B o phi_BA)), x^A)."""
    return rms(reg_b, x_b) + rms(reg_a, x_a)


def reg_ic(x_a, cycled_a, x_b, cycled_b) -> torch.Tensor:
    """Eq. 8, inverse consistency: RMS(x^A, x^A phi_AB phi_BA) + RMS(x^B, x^B phi_BA phi_AB)."""
    return rms(x_a, cycled_a) + rms(x_b, cycled_b)


def r_syn(x_b, synth_b_affine, x_a, synth_a_affine) -> torch.Tensor:
    """Eq. 11: RMS(x^B, F_AB(G(x^A) phi_af_AB)) + RMS(x^A, F_BA(G(x^B) phi_af_BA))."""
    return rms(x_b, synth_b_affine) + rms(x_a, synth_a_affine)


def r_reg(x_b, reg_b_affine, x_a, reg_a_affine) -> torch.Tensor:
    """Eq. 12 (image warped before G): RMS(x^B, F_AB(G(x^A o phi_af_AB))) + RMS(x^A, F_BA(G(x^B o phi_af_BA)))."""
    return rms(x_b, reg_b_affine) + rms(x_a, reg_a_affine)


def bending_energy(displacement: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Bending energy sum_c [sum_i (d2u_c/dx_i2)^2 + 2 sum_{i<j} (d2u_c/dx_i dx_j)^2].

    Second differences on interior points, in normalised coordinates (axis ``i`` has
    step ``2 / (S_i - 1)``). Zero for any affine field.

    Args:
        displacement: ``(B, ndim, *spatial)`` normalised, every size >= 3.
        reduction: ``"sum"`` over points (Eq. 10, per sample) or ``"mean"`` over points;
            either way averaged over the batch.

    Returns:
        scalar.
    """
    ndim = displacement.ndim - 2
    shape = displacement.shape[2:]
    if displacement.shape[1] != ndim or min(shape) < 3:
        raise ValueError(f"bending_energy needs (B, ndim, *spatial) with sizes >= 3, got {tuple(displacement.shape)}")
    steps = [2.0 / (s - 1) for s in shape]

    def shifted(offsets: dict[int, int]) -> torch.Tensor:
        index = [slice(None), slice(None)]
        for axis in range(ndim):
            start = 1 + offsets.get(axis, 0)
            index.append(slice(start, shape[axis] - 1 + offsets.get(axis, 0)))
        return displacement[tuple(index)]

    centre = shifted({})
    energy = torch.zeros_like(centre)
    for i in range(ndim):
        d_ii = (shifted({i: 1}) - 2 * centre + shifted({i: -1})) / steps[i] ** 2
        energy = energy + d_ii.pow(2)
        for j in range(i + 1, ndim):
            d_ij = (
                shifted({i: 1, j: 1}) - shifted({i: 1, j: -1}) - shifted({i: -1, j: 1}) + shifted({i: -1, j: -1})
            ) / (4 * steps[i] * steps[j])
            energy = energy + 2 * d_ij.pow(2)
    per_point = energy.sum(dim=1).flatten(1)  # sum over components
    per_sample = per_point.sum(dim=1) if reduction == "sum" else per_point.mean(dim=1)
    return per_sample.mean()


def r_smooth(flow_ab, flow_ba) -> torch.Tensor:
    """Eq. 10: bending energy of phi_nr_AB plus that of phi_nr_BA (sums over G's grid)."""
    return bending_energy(flow_ab) + bending_energy(flow_ba)


def smooth_lambda(ndim: int, n_points: int) -> float:
    """lambda = 2^(2n) / (10 N) of Section 3.7; N = number of points of the input image."""
    return 2 ** (2 * ndim) / (10 * n_points)


class FireLoss(NamedTuple):
    """All FIRE loss terms (scalars) and their total, Eq. 1 = L_syn + L_reg + R."""

    syn_acc: torch.Tensor
    syn_fea: torch.Tensor
    syn_cyc: torch.Tensor
    syn_align: torch.Tensor
    reg_acc: torch.Tensor
    reg_ic: torch.Tensor
    r_syn: torch.Tensor
    r_reg: torch.Tensor
    r_smooth: torch.Tensor
    smooth_weight: float
    total: torch.Tensor
    # Not in the paper: weighted into ``total`` by the trainer when the augmentation's own
    # transform supervises the registration (TrainConfig.aux_weight); 0 otherwise.
    aux: torch.Tensor | float = 0.0
    # Not in the paper, weighted in by the trainer likewise: a direct similarity (e.g. MIND) of
    # each warped image to the other input (TrainConfig.similarity_weight), and the
    # supervision by refinement's result (TrainConfig.distill_weight).
    sim: torch.Tensor | float = 0.0
    distill: torch.Tensor | float = 0.0
    # Not in the paper, weighted in likewise (TrainConfig.synthesis_weight, invariance_weight):
    # each synthesis against the other contrast aligned with its input, and G's codes of the two
    # contrasts of one aligned pair (bench/training.md, "Synthesis and invariance").
    syn_sup: torch.Tensor | float = 0.0
    inv: torch.Tensor | float = 0.0
    # Not a loss: 1 when the step's gradients held a non-finite value and the trainer kept the
    # weights as they were (``firekit.training.step.train_step``), 0 otherwise; logged like the terms.
    skipped: torch.Tensor | float = 0.0

    @property
    def syn(self) -> torch.Tensor:
        """Eq. 6."""
        return self.syn_acc + self.syn_fea + self.syn_cyc + self.syn_align

    @property
    def reg(self) -> torch.Tensor:
        """Eq. 9."""
        return self.reg_acc + self.reg_ic

    @property
    def regularisation(self) -> torch.Tensor:
        """Eq. 13."""
        return self.r_syn + self.r_reg + self.smooth_weight * self.r_smooth

    def as_floats(self) -> dict[str, float]:
        """Every term as a Python float, for logs and tables."""
        return {k: float(v) for k, v in self._asdict().items()}


def transform_supervision(displacement: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared end-point error between a predicted and a known displacement (normalised units).

    Not a paper term: the auxiliary self-supervised loss on the augmentation's own transform.

    Args:
        displacement, target: ``(B, ndim, *S)`` normalised fields on the same grid.
    """
    if displacement.shape != target.shape:
        raise ValueError(f"displacement {tuple(displacement.shape)} and target {tuple(target.shape)} differ")
    return ((displacement - target) ** 2).sum(dim=1).mean()


def synthesis_supervision(synth_b, x_b_on_a, synth_a, x_a_on_b) -> torch.Tensor:
    """Synthesis against an exact target: RMS(F_AB(G(x^A)), x^B-on-A) + RMS(F_BA(G(x^B)), x^A-on-B).

    Not a paper term. ``x_b_on_a`` is modality B of the subject under x^A's own augmentation (so
    aligned with x^A voxel for voxel); Eq. 2 instead compares F's output on features warped by the
    network's estimate, whose residual error blurs the target (bench/training.md).
    """
    return rms(synth_b, x_b_on_a) + rms(synth_a, x_a_on_b)


def feature_invariance(feat_a, feat_b_on_a, feat_b, feat_a_on_b) -> torch.Tensor:
    """G codes both contrasts alike: RMS(G(x^A), G(x^B-on-A)) + RMS(G(x^B), G(x^A-on-B)).

    Not a paper term: Eq. 3 asks the same of G(x^B) warped by the network's estimate.
    """
    return rms(feat_a, feat_b_on_a) + rms(feat_b, feat_a_on_b)


def fire_loss(out, x_a: torch.Tensor, x_b: torch.Tensor, smooth_weight: float | None = None) -> FireLoss:
    """Eq. 1 from a :class:`firekit.fire.model.FireOutput` and the inputs.

    Args:
        out: the model's training output.
        x_a, x_b: ``(B, C, *S)`` input images.
        smooth_weight: lambda; default :func:`smooth_lambda` of the image grid.
    """
    if smooth_weight is None:
        smooth_weight = smooth_lambda(x_a.ndim - 2, x_a[0, 0].numel())
    terms = dict(
        syn_acc=syn_acc(out.synth_b_warped, x_b, out.synth_a_warped, x_a),
        syn_fea=syn_fea(out.feat_a, out.feat_b_warped, out.feat_b, out.feat_a_warped),
        syn_cyc=syn_cyc(out.cycle_a, x_a, out.cycle_b, x_b),
        syn_align=syn_align(out.feat_a, out.feat_synth_b, out.feat_b, out.feat_synth_a),
        reg_acc=reg_acc(out.reg_b, x_b, out.reg_a, x_a),
        reg_ic=reg_ic(x_a, out.cycled_a, x_b, out.cycled_b),
        r_syn=r_syn(x_b, out.synth_b_affine, x_a, out.synth_a_affine),
        r_reg=r_reg(x_b, out.reg_b_affine, x_a, out.reg_a_affine),
        r_smooth=r_smooth(out.transform_ab.flow, out.transform_ba.flow),
    )
    total = sum(v for k, v in terms.items() if k != "r_smooth") + smooth_weight * terms["r_smooth"]
    return FireLoss(**terms, smooth_weight=float(smooth_weight), total=total)
