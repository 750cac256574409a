"""One FIRE training step with the paper's three Adam optimisers (Section 3.8)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import FirekitError
from .losses import FireLoss, fire_loss
from .model import Fire

__all__ = ["TrainConfig", "TRAIN_PRESETS", "make_optimizers", "train_step"]


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        lr_affine, lr_nonrigid, lr_synthesis: learning rates of the three Adam optimisers
            (T_af of both directions; T_nr of both; G with both F).
        betas: Adam betas, shared.
        grad_clip: clip each group's gradient norm to this (None: no clipping).
        warmup_steps: ramp every learning rate linearly from 0 over this many steps. Adam's
            first steps move every weight by about ``lr`` whatever the gradient's size; on the
            affine head's output layer that adds up over its inputs and, with the noisy
            gradients of an untrained synthesis, can throw the affine off (measured: README).
    """

    lr_affine: float = 1e-5
    lr_nonrigid: float = 5e-5
    lr_synthesis: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    warmup_steps: int = 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise FirekitError(f"unknown preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return cls(**{**TRAIN_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


TRAIN_PRESETS: dict[str, dict] = {
    # Section 3.8, for 144,000 iterations.
    "paper": dict(lr_affine=1e-5, lr_nonrigid=5e-5, lr_synthesis=1e-4),
    # Chosen by experiment for a few hundred CPU steps (README, "Presets").
    "small": dict(lr_affine=3e-3, lr_nonrigid=1e-3, lr_synthesis=1e-3),
}


def make_optimizers(model: Fire, config: TrainConfig) -> dict[str, torch.optim.Adam]:
    """The three Adam optimisers, keyed like :meth:`Fire.param_groups`."""
    rates = {"affine": config.lr_affine, "nonrigid": config.lr_nonrigid, "synthesis": config.lr_synthesis}
    return {
        name: torch.optim.Adam(params, lr=rates[name], betas=tuple(config.betas))
        for name, params in model.param_groups().items()
    }


def train_step(
    model: Fire,
    optimizers: dict[str, torch.optim.Optimizer],
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    grad_clip: float | None = None,
    step: int | None = None,
    warmup_steps: int = 0,
) -> FireLoss:
    """One step: forward both directions, Eq. 1, one backward, each optimiser steps its own group.

    Args:
        x_a, x_b: ``(B, C, *S)`` normalised images of modality A and B.
        grad_clip: clip each optimiser's gradient norm (None: off).
        step: index of this step (from 0), for the warm-up.
        warmup_steps: linear learning-rate warm-up length (0: off).

    Returns:
        the loss terms, detached.
    """
    model.train()
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    if warmup_steps and step is not None:
        # Touch the rates only while warming up, so a caller's own rates or schedulers stand.
        ramp = min(1.0, (step + 1) / warmup_steps)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * ramp
    loss = fire_loss(model(x_a, x_b), x_a, x_b)
    if not torch.isfinite(loss.total):
        raise FirekitError(f"loss became {float(loss.total)}; lower the learning rates or check the inputs")
    loss.total.backward()
    for optimizer in optimizers.values():
        if grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    return FireLoss(*[v.detach() if torch.is_tensor(v) else v for v in loss])
