"""One training step: forward both directions, the loss (Eq. 1 and the added terms), one backward, each
optimiser steps its own group."""

from __future__ import annotations

import torch

from firekit.core import spatial
from firekit.core.errors import FirekitError
from firekit.fire.losses import FireLoss, feature_invariance, fire_loss, synthesis_supervision, transform_supervision
from firekit.fire.model import Fire
from firekit.registration.start import prealign

__all__ = ["train_step", "half_resolution"]


def train_step(
    model: Fire,
    optimizers: dict[str, torch.optim.Optimizer],
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    grad_clip: float | None = None,
    step: int | None = None,
    warmup_steps: int = 0,
    autocast: bool = False,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    aux_weight: float = 0.0,
    similarity=None,
    similarity_weight: float = 0.0,
    distill_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    distill_weight: float = 0.0,
    affine_only: bool = False,
    check_finite: bool = True,
    counterparts: tuple[torch.Tensor, torch.Tensor] | None = None,
    synthesis_weight: float = 0.0,
    invariance_weight: float = 0.0,
) -> FireLoss:
    """One step: forward both directions, Eq. 1, one backward, each optimiser steps its own group.

    Args:
        x_a, x_b: ``(B, C, *S)`` normalised images of modality A and B.
        grad_clip: clip each optimiser's gradient norm (None: off).
        step: index of this step (from 0), for the warm-up.
        warmup_steps: linear learning-rate warm-up length (0: off).
        autocast: run the network in bf16 autocast on the inputs' device; the loss is taken in
            float32 either way.
        targets: ``(u_a2b, u_b2a)`` known displacements ``(B, ndim, *S)`` (normalised) for the
            auxiliary loss; used when ``aux_weight`` > 0.
        aux_weight: weight of :func:`~firekit.fire.losses.transform_supervision` in the total.
        similarity: a :class:`~firekit.core.similarity.Similarity` compared between each warped image
            and the other input, weighted by ``similarity_weight`` (0: off).
        distill_targets: ``(u_a2b, u_b2a)`` displacements found by refinement, supervising the
            network's with weight ``distill_weight`` (0: off).
        affine_only: zero non-rigid flow (affine-first training).
        counterparts: ``(x_b_on_a, x_a_on_b)``, modality B aligned with ``x_a`` and A aligned with
            ``x_b``, for :func:`~firekit.fire.losses.synthesis_supervision` (weight ``synthesis_weight``)
            and :func:`~firekit.fire.losses.feature_invariance` (``invariance_weight``; 0: off).
        check_finite: refuse a non-finite loss before any optimiser steps, and skip the step
            (no optimiser steps) when a gradient is non-finite. Off, the step reads nothing back
            from the device (no host sync on a GPU): a non-finite gradient is zeroed instead, and
            the caller checks the returned loss later (:func:`~firekit.training.loop.train` does,
            every ``sync_every`` steps).

    Returns:
        the loss terms, detached (tensors on the device; nothing is read back); ``skipped`` is 1
        when the gradients were non-finite (see :func:`_step_optimizers`).
    """
    model.train()
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    if warmup_steps and step is not None:
        _warm_up(optimizers, step, warmup_steps)
    if counterparts is None:
        synthesis_weight = invariance_weight = 0.0
    out = _forward(model, x_a, x_b, autocast, affine_only, counterparts if invariance_weight else None)
    loss = fire_loss(out, x_a, x_b)
    if synthesis_weight:
        loss = _plus(loss, "syn_sup", synthesis_weight,
                     synthesis_supervision(out.synth_b, counterparts[0], out.synth_a, counterparts[1]))
    if invariance_weight:
        loss = _plus(loss, "inv", invariance_weight,
                     feature_invariance(out.feat_a, out.feat_b_on_a, out.feat_b, out.feat_a_on_b))
    if aux_weight and targets is not None:
        loss = _plus(loss, "aux", aux_weight, _displacement_supervision(out, targets))
    if similarity_weight and similarity is not None:
        loss = _plus(loss, "sim", similarity_weight, _similarity_term(similarity, out, x_a, x_b))
    if distill_weight and distill_targets is not None:
        loss = _plus(loss, "distill", distill_weight, _displacement_supervision(out, distill_targets))
    if check_finite and not torch.isfinite(loss.total):
        raise FirekitError(f"loss became {float(loss.total.detach())}; lower the learning rates or check the inputs")
    loss.total.backward()
    skipped = _step_optimizers(optimizers, grad_clip, check_finite)
    return FireLoss(*[v.detach() if torch.is_tensor(v) else v for v in loss._replace(skipped=skipped)])


def _warm_up(optimizers: dict[str, torch.optim.Optimizer], step: int, warmup_steps: int) -> None:
    """Ramp every rate to ``(step + 1) / warmup_steps`` of its initial value. Only while warming up
    are the rates touched, so a caller's own rates or schedulers stand."""
    ramp = min(1.0, (step + 1) / warmup_steps)
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * ramp


def _to_float32(value):
    """Cast the floating tensors of a (nested) named tuple to float32."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*[_to_float32(v) for v in value])
    return value


def _forward(model: Fire, x_a: torch.Tensor, x_b: torch.Tensor, autocast: bool, affine_only: bool, encoded):
    """Both directions of ``model`` from their pre-alignment, in float32 (bf16 autocast with ``autocast``)."""
    config = getattr(model, "module", model).config  # DistributedDataParallel wraps the Fire
    if not autocast:
        return model(x_a, x_b, affine_only=affine_only, counterparts=encoded, theta0=prealign(config, x_a, x_b))
    with torch.autocast(x_a.device.type, dtype=torch.bfloat16):
        out = model(x_a, x_b, affine_only=affine_only, counterparts=encoded, theta0=prealign(config, x_a, x_b))
    # bf16 keeps 8 bits of mantissa: too few for RMS of small residuals or for the second
    # differences of the bending energy.
    return _to_float32(out)


def _plus(loss: FireLoss, name: str, weight: float, term: torch.Tensor) -> FireLoss:
    """``loss`` with ``term`` recorded as ``name`` and ``weight * term`` added to the total."""
    return loss._replace(total=loss.total + weight * term, **{name: term})


def _displacement_supervision(out, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Both displacements against their targets ``(u_a2b, u_b2a)``."""
    return transform_supervision(out.disp_ab, targets[0]) + transform_supervision(out.disp_ba, targets[1])


def _similarity_term(similarity, out, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """Each warped image against the other input, by ``similarity``, summed over both directions."""
    return (similarity.compare(similarity.features(out.warped_a), similarity.features(x_b), None).mean()
            + similarity.compare(similarity.features(out.warped_b), similarity.features(x_a), None).mean())


def _step_optimizers(optimizers: dict[str, torch.optim.Optimizer], grad_clip: float | None,
                     check_finite: bool = True) -> torch.Tensor:
    """Each optimiser steps its group, its gradient norm clipped to ``grad_clip`` first (None: off).

    A finite loss can still give a non-finite gradient (an overflow in one layer's backward pass);
    one Adam step on it turns every weight it reaches into NaN, for good. So the gradients are
    checked first: with ``check_finite`` (a host sync) no optimiser steps when any is non-finite;
    without it (no sync) they are zeroed on the device, and Adam takes a step on its momentum alone.

    Returns:
        ``()`` tensor: 1 when the gradients held a non-finite value (the step was skipped), else 0.
    """
    grads = [p.grad for optimizer in optimizers.values() for group in optimizer.param_groups
             for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros(())
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    if check_finite and not bool(finite):
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        return (~finite).float()
    if not check_finite:
        for g in grads:
            g.masked_fill_(~finite, 0.0)  # in place, on the device: no read back, no new tensor
    for optimizer in optimizers.values():
        if grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    return (~finite).float()


@torch.no_grad()
def half_resolution(x_a: torch.Tensor, x_b: torch.Tensor, targets, model: Fire):
    """Images (and target displacements) on a grid half as fine, when the network accepts it.

    :func:`firekit.registration.levels.downsample` keeps the normalised extent, so normalised displacements
    stay valid as they are.
    """
    from firekit.registration.levels import downsample

    shape = tuple(s // 2 for s in x_a.shape[2:])
    if any(s % model.size_multiple or s < model.min_size for s in shape):
        return x_a, x_b, targets
    if targets is not None:
        targets = tuple(spatial.resize_displacement(t, shape) for t in targets)
    return downsample(x_a, 2, shape), downsample(x_b, 2, shape), targets
