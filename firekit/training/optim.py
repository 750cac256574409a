"""The paper's three Adam optimisers (Section 3.8), their learning-rate schedules and the EMA of the weights."""

from __future__ import annotations

import math

import torch

from firekit.fire.model import Fire
from firekit.training.config import TrainConfig

__all__ = ["make_optimizers", "make_schedulers", "averaged_model", "apply_rates"]


def _rates(config: TrainConfig) -> dict[str, float]:
    return {"affine": config.lr_affine, "nonrigid": config.lr_nonrigid, "synthesis": config.lr_synthesis}


def make_optimizers(model: Fire, config: TrainConfig) -> dict[str, torch.optim.Adam]:
    """The three Adam optimisers, keyed like :meth:`Fire.param_groups`; with ``train_only``
    ``"decoders"`` one, over F_AB and F_BA, every other weight frozen (``requires_grad`` off)."""
    rates = _rates(config)
    groups = model.param_groups()
    if config.train_only == "decoders":
        decoders = {id(p) for p in (*model.decoder_ab.parameters(), *model.decoder_ba.parameters())}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in decoders)
        groups = {"synthesis": [p for p in groups["synthesis"] if id(p) in decoders]}
    return {name: torch.optim.Adam(params, lr=rates[name], betas=tuple(config.betas)) for name, params in groups.items()}


def make_schedulers(optimizers: dict[str, torch.optim.Optimizer],
                    config: TrainConfig) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
    """One ``LambdaLR`` per optimiser for ``config.schedule="cosine"`` (none for ``"constant"``):
    factor ``min(1, (k + 1) / warmup)`` times a cosine from 1 at step 0 to ``min_lr_fraction`` at
    ``iterations`` for the k-th step (0-based)."""
    if config.schedule == "constant":
        return {}
    warmup, total, floor = config.warmup_steps, config.iterations, config.min_lr_fraction

    def factor(k: int) -> float:
        ramp = min(1.0, (k + 1) / warmup) if warmup else 1.0
        progress = min(1.0, k / max(1, total))
        return ramp * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    return {name: torch.optim.lr_scheduler.LambdaLR(optimizer, factor) for name, optimizer in optimizers.items()}


def averaged_model(model: Fire, config: TrainConfig):
    """``AveragedModel`` of ``model`` with an EMA of decay ``config.ema_decay`` (None when 0)."""
    if not config.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)


def apply_rates(optimizers: dict[str, torch.optim.Optimizer], config: TrainConfig) -> None:
    """Put ``config``'s rates and betas into restored optimisers (train_step redoes any warm-up ramp)."""
    rates = _rates(config)
    for name, optimizer in optimizers.items():
        for group in optimizer.param_groups:
            group["betas"] = tuple(config.betas)
            group["lr"] = rates[name]
            if "initial_lr" in group:
                group["initial_lr"] = rates[name]
