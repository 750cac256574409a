"""Training FIRE: one step with the paper's three Adam optimisers (Section 3.8), and the loop around it.

A run folder holds everything one training run writes; :func:`train` fills it and can resume it:

* ``checkpoint.pt``: model, the three optimisers' states, step, RNG state (what resuming needs).
* ``model.pt``: the model alone, for :func:`firekit.load`.
* ``model_best.pt``: the model at the best validation Dice (only with validation data).
* ``config.yaml``: model, training and data settings.
* ``losses.csv``: one row per step, every term of :class:`~firekit.fire.losses.FireLoss`.
* ``validation.csv``: Dice of each validation (only with validation data).

Steps are counted from 1 in these files: row ``step = k`` is the k-th optimisation step, trained on
``source.sample(k - 1, batch_size)``, and a checkpoint at step ``k`` resumes with step ``k + 1``.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import torch
import yaml
from tqdm.auto import tqdm

from firekit.core import metrics, spatial
from firekit.data.atomic import atomic_write_text
from firekit.core.config import PlainConfig
from firekit.core.errors import FirekitError
from firekit.fire.losses import FireLoss, feature_invariance, fire_loss, synthesis_supervision, transform_supervision
from firekit.fire.checkpoint import load_checkpoint, save_model
from firekit.fire.model import Fire, architecture_differences
from firekit.registration.start import network_start, prealign

__all__ = [
    "TrainConfig",
    "TRAIN_PRESETS",
    "TrainResult",
    "PairSource",
    "RUN_FILES",
    "make_optimizers",
    "make_schedulers",
    "train_step",
    "train",
]

# Files train() owns in a run folder; ``overwrite`` removes these and nothing else.
RUN_FILES = ("checkpoint.pt", "model.pt", "model_ema.pt", "model_best.pt", "config.yaml", "losses.csv",
             "validation.csv")

# Settings a resumed run may change without leaving the path an uninterrupted run would take.
_FREE_ON_RESUME = {"iterations", "val_every", "checkpoint_every", "amp", "amp_cpu", "sync_every", "loader_threads",
                   "compile", "channels_last"}


@dataclass
class TrainConfig(PlainConfig):
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
        iterations: total optimisation steps of the run (a resumed run counts those done).
        batch_size: pairs per step.
        seed: seeds torch when a run starts (a resumed run restores the saved RNG state).
        val_every: validate every this many steps and at the end (0: only at the end).
        checkpoint_every: write checkpoint.pt and model.pt every this many steps and at the
            end (0: only at the end).
        amp: bf16 autocast for the forward pass on CUDA.
        amp_cpu: bf16 autocast on the CPU too: 1.5x faster steps on a CPU with native bf16
            (AVX512-BF16 or AMX; bench/throughput.md), slower on one without.
        sync_every: read the step losses back to the host (CSV rows, callback, progress bar,
            the finiteness check) every this many steps, each read waiting for the device to
            finish; 0: every step on the CPU (where it costs nothing), every 25 steps on a GPU.
            Validation, checkpoints and the end read at once; a non-finite loss is then reported
            up to this many steps late, and nothing written after it. The ``seconds`` column
            counts when each step was queued on the device.
        loader_threads: batches drawn (augmented) ahead in this many threads while the device
            runs a step, pinned for the copy; 0: none on the CPU (the step uses the cores), on a
            GPU ``min(8, cores per process)``.
        compile: ``torch.compile`` the network for the step (compiles on the first step).
        channels_last: keep weights and batches in channels-last memory order (GPU tensor cores
            prefer it; on the CPU slower in float32, 7 % faster with ``amp_cpu``: bench/throughput.md).
        aux_weight: weight of the auxiliary self-supervised loss on the augmentation's own
            transform (batches carrying ``u_a2b``/``u_b2a``); not in the paper, 0 = off.
        similarity_weight: weight of a direct similarity between each warped image and the
            other input (``similarity``, modality independent) on the registration path; not in
            the paper, 0 = off.
        similarity: ``"mind"`` or ``"ngf"`` (any key of :data:`firekit.core.similarity.SIMILARITIES`).
        distill_weight: weight of the supervision of both displacements by what
            :func:`firekit.registration.refine.refine` finds for the same pair (distillation; costs one
            refinement per pair and direction per step); not in the paper, 0 = off.
        synthesis_weight: weight of :func:`~firekit.fire.losses.synthesis_supervision`, each synthesis
            against the other contrast aligned with its input (batches carrying ``x_b_on_a`` /
            ``x_a_on_b``: augmented pairs of one subject); not in the paper, 0 = off.
        invariance_weight: weight of :func:`~firekit.fire.losses.feature_invariance`, G's codes of
            those aligned counterparts against the inputs' (one more pass of G); not in the paper,
            0 = off.
        train_only: ``"all"`` (the paper) or ``"decoders"``: only F_AB and F_BA learn (G and both T
            frozen), a synthesis stage that cannot change a registration; not in the paper.
        affine_first_steps: the first this many steps train the affine subnets only (zero
            non-rigid flow), on images at half resolution (when that keeps the network's minimum
            size); not in the paper, 0 = off.
        schedule: ``"constant"`` rates (the paper) or ``"cosine"``: a torch ``LambdaLR`` per
            optimiser, linear warm-up over ``warmup_steps`` then a cosine from each rate down to
            ``min_lr_fraction`` of it at ``iterations``.
        min_lr_fraction: where the cosine schedule ends, as a fraction of each rate.
        ema_decay: keep an exponential moving average of the weights
            (``torch.optim.swa_utils.AveragedModel``) with this decay per step, saved as
            ``model_ema.pt`` beside ``model.pt``; validation and ``model_best.pt`` then use it.
            0 = off.

    The paper preset has every addition off (``aux_weight``, ``similarity_weight``,
    ``distill_weight``, ``affine_first_steps`` 0; the model's ``prealign`` ``"none"``,
    ``affine_pooling`` ``"mean"``, ``residual_bound`` 0). Their measured effect: bench/training.md.
    """

    config_name = "training config"

    lr_affine: float = 1e-5
    lr_nonrigid: float = 5e-5
    lr_synthesis: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    warmup_steps: int = 0
    iterations: int = 1000
    batch_size: int = 1
    seed: int = 0
    val_every: int = 100
    checkpoint_every: int = 100
    amp: bool = True
    amp_cpu: bool = False
    sync_every: int = 0
    loader_threads: int = 0
    compile: bool = False
    channels_last: bool = False
    aux_weight: float = 0.0
    similarity_weight: float = 0.0
    similarity: str = "mind"
    distill_weight: float = 0.0
    synthesis_weight: float = 0.0
    invariance_weight: float = 0.0
    train_only: str = "all"
    affine_first_steps: int = 0
    schedule: str = "constant"
    min_lr_fraction: float = 0.05
    ema_decay: float = 0.0

    def __post_init__(self):
        from firekit.core.similarity import SIMILARITIES

        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise FirekitError(f"TrainConfig.betas needs 2 values, got {list(self.betas)}")
        if self.similarity not in SIMILARITIES:
            raise FirekitError(f"TrainConfig.similarity must be one of {sorted(SIMILARITIES)}, got {self.similarity!r}")
        if self.train_only not in ("all", "decoders"):
            raise FirekitError(f"TrainConfig.train_only must be 'all' or 'decoders', got {self.train_only!r}")
        if self.schedule not in ("constant", "cosine"):
            raise FirekitError(f"TrainConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise FirekitError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise FirekitError(f"TrainConfig.min_lr_fraction must be in [0, 1], got {self.min_lr_fraction!r}")
        for name in ("aux_weight", "similarity_weight", "distill_weight", "synthesis_weight", "invariance_weight"):
            if not getattr(self, name) >= 0:
                raise FirekitError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        minimum = {"iterations": 1, "batch_size": 1, "val_every": 0, "checkpoint_every": 0, "warmup_steps": 0,
                   "affine_first_steps": 0, "sync_every": 0, "loader_threads": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FirekitError(f"TrainConfig.{name} must be an integer >= {low}, got {value!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in TRAIN_PRESETS:
            raise FirekitError(f"unknown preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return cls(**{**TRAIN_PRESETS[name], **overrides})


TRAIN_PRESETS: dict[str, dict] = {
    # Section 3.8, for 144,000 iterations.
    "paper": dict(
        lr_affine=1e-5, lr_nonrigid=5e-5, lr_synthesis=1e-4, iterations=144_000, val_every=1000,
        checkpoint_every=1000,
    ),
    # Chosen by experiment for a few hundred CPU steps (README, "Presets").
    "small": dict(lr_affine=3e-3, lr_nonrigid=1e-3, lr_synthesis=1e-3),
}


class PairSource(Protocol):
    """What :func:`train` draws its training pairs from (e.g. the datasets of :mod:`firekit.data.pairs`)."""

    ndim: int

    def sample(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Batch for 0-based ``step``, a deterministic function of the source's seed and ``step``.

        A source whose ``sample`` also takes ``first`` (pairs ``first`` to ``first + batch_size
        - 1`` of the step's batch, as :class:`firekit.data.pairs.PairDataset`'s) lets each of several
        processes draw only its slice of the global batch; any other is drawn whole by every
        process, which keeps its own slice.

        Returns:
            ``{"x_a", "x_b"}``: ``(B, 1, *S)`` float32 in [-1, 1]; optionally ``"labels_a"``,
            ``"labels_b"``: ``(B, 1, *S)`` int64.
        """
        ...


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        out_dir: the run folder.
        steps: optimisation steps done, counting those before a resume.
        losses: every FireLoss term of the last step (empty when no step was ever run).
        best_val_dice: best mean validation Dice (a2b and b2a averaged), or None without validation.
        seconds: training wall time, counting the time before a resume.
        best_step: step of ``best_val_dice``.
    """

    out_dir: Path
    steps: int
    losses: dict[str, float]
    best_val_dice: float | None
    seconds: float
    best_step: int | None = None


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


def _to_float32(value):
    """Cast the floating tensors of a (nested) named tuple to float32."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*[_to_float32(v) for v in value])
    return value


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
        check_finite: refuse a non-finite loss before any optimiser steps. Off, the step reads
            nothing back from the device (no host sync on a GPU); the caller checks the returned
            loss later (:func:`train` does, every ``sync_every`` steps).

    Returns:
        the loss terms, detached (tensors on the device; nothing is read back).
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
    if counterparts is None:
        synthesis_weight = invariance_weight = 0.0
    encoded = counterparts if invariance_weight else None
    config_of_model = getattr(model, "module", model).config  # DistributedDataParallel wraps the Fire
    if autocast:
        with torch.autocast(x_a.device.type, dtype=torch.bfloat16):
            out = model(x_a, x_b, affine_only=affine_only, counterparts=encoded,
                        theta0=prealign(config_of_model, x_a, x_b))
        # bf16 keeps 8 bits of mantissa: too few for RMS of small residuals or for the second
        # differences of the bending energy.
        out = _to_float32(out)
    else:
        out = model(x_a, x_b, affine_only=affine_only, counterparts=encoded, theta0=prealign(config_of_model, x_a, x_b))
    loss = fire_loss(out, x_a, x_b)
    if synthesis_weight:
        syn_sup = synthesis_supervision(out.synth_b, counterparts[0], out.synth_a, counterparts[1])
        loss = loss._replace(total=loss.total + synthesis_weight * syn_sup, syn_sup=syn_sup)
    if invariance_weight:
        inv = feature_invariance(out.feat_a, out.feat_b_on_a, out.feat_b, out.feat_a_on_b)
        loss = loss._replace(total=loss.total + invariance_weight * inv, inv=inv)
    if aux_weight and targets is not None:
        aux = transform_supervision(out.disp_ab, targets[0]) + transform_supervision(out.disp_ba, targets[1])
        loss = loss._replace(total=loss.total + aux_weight * aux, aux=aux)
    if similarity_weight and similarity is not None:
        sim = (similarity.compare(similarity.features(out.warped_a), similarity.features(x_b), None).mean()
               + similarity.compare(similarity.features(out.warped_b), similarity.features(x_a), None).mean())
        loss = loss._replace(total=loss.total + similarity_weight * sim, sim=sim)
    if distill_weight and distill_targets is not None:
        distill = (transform_supervision(out.disp_ab, distill_targets[0])
                   + transform_supervision(out.disp_ba, distill_targets[1]))
        loss = loss._replace(total=loss.total + distill_weight * distill, distill=distill)
    if check_finite and not torch.isfinite(loss.total):
        raise FirekitError(f"loss became {float(loss.total.detach())}; lower the learning rates or check the inputs")
    loss.total.backward()
    for optimizer in optimizers.values():
        if grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    return FireLoss(*[v.detach() if torch.is_tensor(v) else v for v in loss])


# ---------------------------------------------------------------------------------------- the loop
def train(
    model: Fire,
    source: PairSource,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    validation: list[dict[str, torch.Tensor]] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    extra: dict | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on pairs from ``source``, writing a resumable run folder.

    Args:
        model: the model to train; moved to ``device``. With ``resume`` its weights are replaced
            by the checkpoint's, and its config must match the checkpoint's.
        source: ``source.sample(step, batch_size)`` gives the batch of 0-based ``step`` (see
            :class:`PairSource`); ``source.describe()``, if present, is saved as the ``data`` section.
        config: optimisation settings; ``iterations`` counts the steps of the whole run.
        out_dir: run folder; created if missing. A non-empty one needs ``resume`` or ``overwrite``.
        validation: fixed batches like ``source``'s, each with ``labels_a`` and ``labels_b``;
            scored by mean Dice over non-zero labels every ``config.val_every`` steps and at the end.
        resume: continue from ``out_dir/checkpoint.pt``: the steps after it compute the same
            losses an uninterrupted run computes (bitwise on the CPU).
        overwrite: start again, removing only :data:`RUN_FILES` from ``out_dir``.
        device: ``"cuda"`` when available, else ``"cpu"``, by default.
        progress: show a tqdm bar (total, syn, reg, smooth = lambda R_smooth, latest val Dice).
        extra: plain data added to ``model.pt``'s extra (e.g. the command line).
        callback: called for every step, in order, with the 1-based step and its loss terms
            (``FireLoss.as_floats()``, plus ``val_dice`` when validation ran at that step) once
            they are read back (after each step on the CPU, every ``config.sync_every`` steps on a
            GPU), e.g. a live plot (``viz.LossPlot``).

    Returns:
        a :class:`TrainResult`.

    Raises:
        FirekitError: a run-folder conflict, an unusable checkpoint, bad batches or a non-finite loss.
        KeyboardInterrupt: after checkpointing the last completed step. Ctrl-C or SIGTERM (``kill``;
            a scheduler's end of job) lets the running step finish first; a second one stops at
            once, keeping the previous checkpoint.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    source_ndim = getattr(source, "ndim", model.ndim)
    if source_ndim != model.ndim:
        raise FirekitError(
            f"the data are {source_ndim}D but the model is {model.ndim}D; build the model with ndim={source_ndim}"
        )
    describe = getattr(source, "describe", None)
    data = _plain(describe() if callable(describe) else {}, "source.describe()")
    extra = _plain(extra or {}, "extra")
    validation = [_check_validation_batch(batch, i) for i, batch in enumerate(validation or [])]
    rank, world, local_rank = _distributed()
    main = rank == 0
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    run_dir = _prepare_run_dir(Path(out_dir), resume, overwrite) if main else Path(out_dir)
    _barrier(world)
    if not resume:
        torch.manual_seed(config.seed)

    memory_format = _memory_format(model.ndim) if config.channels_last else None
    model.to(device=device, memory_format=memory_format or torch.preserve_format)
    optimizers = make_optimizers(model, config)
    schedulers = make_schedulers(optimizers, config)
    state = _RunState()
    if resume:
        state = _resume(run_dir, model, optimizers, config, data, device)
    average = _averaged_model(model, config)
    _restore_extras(run_dir, state, schedulers, average)
    scored = model if average is None else average.module  # what validation and model_best use
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The ranks start from rank 0's weights (DDP broadcasts them); gradients are averaged.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=config.affine_first_steps > 0)
    if config.compile:
        net = torch.compile(net)
    use_amp = config.amp if device.type == "cuda" else (config.amp_cpu and device.type == "cpu")
    # Reading a loss back waits for the device; on a GPU the steps between reads queue up.
    sync_every = config.sync_every or (1 if device.type == "cpu" else 25)
    if main:
        _write_config_yaml(run_dir, model, config, data)

    loss_fields = ["step", *FireLoss._fields, "seconds"]
    keep = state.step if resume else None
    losses_log = _CsvLog(run_dir / "losses.csv", loss_fields, keep) if main else _NoLog()
    val_fields = ["step", "dice_a2b", "dice_b2a", "dice_mean"]
    val_log = (_CsvLog(run_dir / "validation.csv", val_fields, keep) if main else _NoLog()) if validation else None
    progress = progress and main

    started = time.perf_counter()
    seconds_before = state.seconds

    def seconds() -> float:
        return seconds_before + time.perf_counter() - started

    def save() -> None:
        state.seconds = seconds()
        _save_run(run_dir, model, optimizers, config, data, extra, state, device, schedulers, average)

    def kept() -> str:
        return f"; {run_dir / 'checkpoint.pt'} holds step {state.saved_step}" if state.saved_step else ""

    pending: list[_PendingStep] = []  # steps done whose losses are still on the device

    def read_back() -> list[dict[str, float]]:
        """The pending steps' loss rows, read in one go and logged; raises at a non-finite loss
        (the weights are then past it: nothing is saved)."""
        rows = _read_losses(pending, world)
        for row in rows:
            if not math.isfinite(row["total"]):
                raise FirekitError(f"step {row['step']}: loss became {row['total']}; lower the learning rates or "
                                   f"check the inputs{kept()}")
            losses_log.write(row)
            state.step, state.losses = row["step"], {k: row[k] for k in FireLoss._fields}
        pending.clear()
        return rows

    similarity = None
    if config.similarity_weight:
        from firekit.core.similarity import get_similarity

        similarity = get_similarity(config.similarity, radius=1, dilation=1)
    bar = tqdm(
        total=config.iterations, initial=state.step, disable=not progress, unit="step", desc=run_dir.name,
        dynamic_ncols=True,
    )
    in_step = False
    # On a GPU the next batches are drawn (augmented) on the CPU while the current step runs.
    threads = config.loader_threads or (0 if device.type == "cpu" else _default_loader_threads())
    # One global batch per step, the same whatever the number of processes: rank r trains on
    # its slice (batch_size is per process), drawn alone when the source can.
    drawn_alone = world > 1 and _draws_slices(source)
    prefetch = _Prefetch(source, config.batch_size if drawn_alone or world == 1 else config.batch_size * world,
                         ahead=threads, pin=device.type == "cuda",
                         first=rank * config.batch_size if drawn_alone else None)
    try:
        with _HeldInterrupt() as interrupt:
            for index in range(state.step, config.iterations):
                batch = prefetch.get(index, config.iterations)
                if world > 1 and not drawn_alone:
                    batch = _shard(batch, rank, config.batch_size)
                where = f"source.sample({index})"
                in_step = True
                try:
                    x_a, x_b = (_batch_tensor(batch, key, where, device, memory_format) for key in ("x_a", "x_b"))
                    targets = None
                    if config.aux_weight and "u_a2b" in batch:
                        targets = tuple(_batch_tensor(batch, key, where, device) for key in ("u_a2b", "u_b2a"))
                    counterparts = None
                    if (config.synthesis_weight or config.invariance_weight) and "x_b_on_a" in batch:
                        counterparts = tuple(_batch_tensor(batch, key, where, device, memory_format)
                                             for key in ("x_b_on_a", "x_a_on_b"))
                    affine_first = index < config.affine_first_steps
                    if affine_first:
                        x_a, x_b, targets = _half_resolution(x_a, x_b, targets, model)
                    distill_targets = None
                    if config.distill_weight:
                        distill_targets = _refinement_targets(x_a, x_b)
                    loss = train_step(
                        net, optimizers, x_a, x_b, config.grad_clip, index,
                        0 if schedulers else config.warmup_steps, autocast=use_amp,
                        targets=targets, aux_weight=config.aux_weight, similarity=similarity,
                        similarity_weight=config.similarity_weight, distill_targets=distill_targets,
                        distill_weight=config.distill_weight, affine_only=affine_first,
                        check_finite=sync_every == 1, counterparts=None if affine_first else counterparts,
                        synthesis_weight=config.synthesis_weight, invariance_weight=config.invariance_weight,
                    )
                except FirekitError as exc:
                    # train_step checks before any optimiser steps: the steps before it stand, once
                    # their losses are read and found finite.
                    in_step = False
                    read_back()
                    if main and state.step > state.saved_step:
                        save()
                    raise FirekitError(f"step {index + 1}: {exc}{kept()}") from None
                for scheduler in schedulers.values():
                    scheduler.step()
                if average is not None:
                    average.update_parameters(model)
                in_step = False
                pending.append(_PendingStep(index + 1, loss, seconds()))
                last = index + 1 == config.iterations
                validated = val_log is not None and (last or _due(index + 1, config.val_every))
                checkpointed = last or _due(index + 1, config.checkpoint_every)
                # Every rank reads at the same steps (the read averages over the ranks), so with
                # several processes a Ctrl-C waits for the next read to stop them all at one step.
                if not (len(pending) >= sync_every or validated or checkpointed or (interrupt.pending and world == 1)):
                    continue
                rows = read_back()
                validated = validated and main
                if validated:
                    scores = _validate(scored, validation, device)
                    val_log.write({"step": state.step, **scores})
                    state.latest_dice = scores["dice_mean"]
                    if not math.isnan(scores["dice_mean"]) and (
                        state.best_val_dice is None or scores["dice_mean"] > state.best_val_dice
                    ):
                        state.best_val_dice, state.best_step = scores["dice_mean"], state.step
                        save_model(scored, run_dir / "model_best.pt", extra=_model_extra(config, data, extra, state))
                if main and checkpointed:
                    save()
                if callback is not None:
                    for row in rows:
                        terms = {k: row[k] for k in FireLoss._fields}
                        if validated and row is rows[-1]:
                            terms["val_dice"] = state.latest_dice
                        callback(row["step"], terms)
                bar.set_postfix(_postfix(rows[-1], state.latest_dice), refresh=False)
                bar.update(len(rows))
                if interrupt.pending:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        # Mid-step (a second Ctrl-C) the groups may be half updated: keep the last checkpoint then.
        if not in_step and pending and world == 1:
            try:
                read_back()
            except FirekitError:
                pass  # a non-finite loss among them: the weights are past it, keep the checkpoint
        if main and not in_step and not pending and state.step > state.saved_step:
            save()
        bar.write(
            f"interrupted; {run_dir / 'checkpoint.pt'} holds step {state.saved_step}"
            if state.saved_step else "interrupted before the first checkpoint"
        )
        raise
    finally:
        prefetch.close()
        bar.close()
        losses_log.close()
        if val_log is not None:
            val_log.close()
    return TrainResult(run_dir, state.step, state.losses, state.best_val_dice, seconds(), state.best_step)


@dataclass
class _RunState:
    """What a checkpoint carries besides the weights and optimiser states."""

    step: int = 0
    saved_step: int = 0
    seconds: float = 0.0
    losses: dict = dataclasses.field(default_factory=dict)
    best_val_dice: float | None = None
    best_step: int | None = None
    latest_dice: float | None = None
    saved: dict = dataclasses.field(default_factory=dict)  # the checkpoint's extra, when resumed


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


def _averaged_model(model: Fire, config: TrainConfig):
    """``AveragedModel`` of ``model`` with an EMA of decay ``config.ema_decay`` (None when 0)."""
    if not config.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)


def _restore_extras(run_dir: Path, state: _RunState, schedulers: dict, average) -> None:
    """Put a resumed checkpoint's scheduler states and EMA weights back (a resume that turns
    either on starts it from the checkpoint's weights)."""
    saved = state.saved
    for name, scheduler in schedulers.items():
        if name in saved.get("schedulers", {}):
            scheduler.load_state_dict(saved["schedulers"][name])
        elif state.step:
            scheduler.last_epoch = state.step - 1
            scheduler.step()
    if average is not None and "ema" in saved:
        try:
            average.module.load_state_dict(saved["ema"]["weights"])
        except (RuntimeError, KeyError) as exc:
            raise FirekitError(f"{run_dir / 'checkpoint.pt'}: EMA weights do not fit the model ({exc}); "
                               "pass --overwrite to start again") from None
        average.n_averaged.fill_(int(saved["ema"].get("count", 1)))
    elif average is not None and state.step:
        average.n_averaged.fill_(1)  # EMA turned on at resume: start it from the resumed weights


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _postfix(row: dict[str, float], dice: float | None) -> dict[str, str]:
    loss = FireLoss(**{k: row[k] for k in FireLoss._fields})  # of floats: its Eq. 6 and 9 sums
    shown = {"total": loss.total, "syn": loss.syn, "reg": loss.reg, "smooth": loss.smooth_weight * loss.r_smooth}
    postfix = {k: f"{v:.4f}" for k, v in shown.items()}
    if dice is not None:
        postfix["dice"] = f"{dice:.3f}"
    return postfix


class _PendingStep(NamedTuple):
    """A step done whose loss terms are still on the device."""

    step: int
    loss: FireLoss
    seconds: float


def _read_losses(pending: list[_PendingStep], world: int) -> list[dict[str, float]]:
    """Log rows (``step``, every FireLoss term, ``seconds``) of ``pending``, their tensors read back
    in one copy and averaged over the processes in one all-reduce; Python-number terms (lambda,
    terms that are off) are taken as they are."""
    if not pending:
        return []
    tensors = [(i, k, v) for i, p in enumerate(pending) for k, v in p.loss._asdict().items() if torch.is_tensor(v)]
    values = []
    if tensors:
        stacked = torch.stack([v.reshape(()).float() for _, _, v in tensors])
        if world > 1:
            import torch.distributed as dist

            stacked = stacked.double()
            dist.all_reduce(stacked)
            stacked /= world
        values = stacked.tolist()
    rows = [{"step": p.step, **{k: float(v) for k, v in p.loss._asdict().items()
                                if not torch.is_tensor(v)}, "seconds": p.seconds} for p in pending]
    for (i, key, _), value in zip(tensors, values):
        rows[i][key] = value
    return [{k: row[k] for k in ("step", *FireLoss._fields, "seconds")} for row in rows]


class _HeldInterrupt:
    """Hold the first Ctrl-C (SIGINT) or SIGTERM until the running step ends, so no checkpoint holds
    half a step. SIGTERM is what ``kill``, ``timeout`` and batch schedulers (SLURM at the end of a
    job's time) send, and the only one a detached run hears: a shell starts background jobs with
    SIGINT ignored, and an ignored signal stays ignored.

    Python delivers signals to the main thread only; elsewhere this does nothing.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "_HeldInterrupt":
        self.pending = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in self._SIGNALS:
                previous = signal.getsignal(number)
                if previous not in (signal.SIG_IGN, None):
                    self._previous[number] = previous
                    signal.signal(number, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)


# ------------------------------------------------------------------------------------ run folder
def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under ``torchrun`` (its environment variables), initialising the
    process group (NCCL with CUDA, else gloo) if needed; (0, 1, 0) in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _shard(batch: dict, rank: int, size: int) -> dict:
    """Rank ``rank``'s ``size`` pairs of a global batch (every tensor's first axis; a view)."""
    return {k: v[rank * size:(rank + 1) * size] if torch.is_tensor(v) else v for k, v in batch.items()}


class _NoLog:
    """What ranks other than 0 log: nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    if resume and overwrite:
        raise FirekitError("pass --resume or --overwrite, not both")
    if run_dir.exists() and not run_dir.is_dir():
        raise FirekitError(f"{run_dir} is a file; pass a folder for the run")
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise FirekitError(
                f"{run_dir / 'checkpoint.pt'} not found; nothing to resume (drop --resume to start a new run)"
            )
        for name in RUN_FILES:  # half-written temporary files of a killed run (the files themselves are whole)
            for tmp in run_dir.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        return run_dir
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise FirekitError(f"{run_dir} is not empty; pass --resume to continue or --overwrite to start again")
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
            for tmp in run_dir.glob(f".{name}.*.tmp"):  # left by a crash mid-write
                tmp.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain data, safe for yaml.safe_dump and torch.load(weights_only=True)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int)) else str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars and small arrays
        return _plain(value.tolist(), where)
    raise FirekitError(f"{where} holds a {type(value).__name__}; use plain data (str, numbers, lists, dicts)")


def _write_config_yaml(run_dir: Path, model: Fire, config: TrainConfig, data: dict) -> None:
    from firekit import __version__  # the package is fully imported by the time train() runs

    document = {
        "model": model.config.to_dict(),
        "train": config.to_dict(),
        "data": data,
        "firekit_version": __version__,
    }
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(document, sort_keys=False))


def _model_extra(config: TrainConfig, data: dict, extra: dict, state: _RunState) -> dict:
    return {"train": config.to_dict(), "step": state.step, "data": data, **extra}


def _save_run(
    run_dir: Path,
    model: Fire,
    optimizers: dict[str, torch.optim.Optimizer],
    config: TrainConfig,
    data: dict,
    extra: dict,
    state: _RunState,
    device: torch.device,
    schedulers: dict | None = None,
    average=None,
) -> None:
    """Write model.pt (and model_ema.pt), then checkpoint.pt (each atomically) for ``state.step``."""
    save_model(model, run_dir / "model.pt", extra=_model_extra(config, data, extra, state))
    more = {}
    if schedulers:
        more["schedulers"] = {name: scheduler.state_dict() for name, scheduler in schedulers.items()}
    if average is not None:
        save_model(average.module, run_dir / "model_ema.pt", extra={**_model_extra(config, data, extra, state), "ema": True})
        more["ema"] = {"weights": average.module.state_dict(), "count": int(average.n_averaged)}
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    save_model(
        model,
        run_dir / "checkpoint.pt",
        extra={
            "step": state.step,
            "train": config.to_dict(),
            "data": data,
            "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
            "rng": rng,
            "seconds": state.seconds,
            "losses": state.losses,
            "best_val_dice": state.best_val_dice,
            "best_step": state.best_step,
            "latest_dice": state.latest_dice,
            **more,
        },
    )
    state.saved_step = state.step


def _resume(
    run_dir: Path,
    model: Fire,
    optimizers: dict[str, torch.optim.Optimizer],
    config: TrainConfig,
    data: dict,
    device: torch.device,
) -> _RunState:
    """Load checkpoint.pt into ``model`` and ``optimizers``; return the saved run state."""
    path = run_dir / "checkpoint.pt"
    saved_model, saved = load_checkpoint(path, map_location="cpu")
    missing = [key for key in ("step", "train", "optimizers") if key not in saved]
    if missing:
        raise FirekitError(
            f"{path}: not a training checkpoint (no {', '.join(missing)}); pass --overwrite to start again"
        )
    differ = architecture_differences(model.config, saved_model.config)
    if differ:
        ours, theirs = model.config.to_dict(), saved_model.config.to_dict()
        changes = ", ".join(f"{k}: {theirs.get(k)} saved, {ours.get(k)} given" for k in differ)
        raise FirekitError(
            f"{path} holds a different model ({changes}); build it from {run_dir / 'config.yaml'} or pass --overwrite"
        )
    step = int(saved["step"])
    if step > config.iterations:
        raise FirekitError(
            f"{path} is at step {step}, past iterations={config.iterations}; raise iterations to continue"
        )
    model.load_state_dict(saved_model.state_dict())
    if set(saved["optimizers"]) != set(optimizers):
        raise FirekitError(f"{path}: optimisers {sorted(saved['optimizers'])} do not match {sorted(optimizers)}")
    for name, optimizer in optimizers.items():
        try:
            optimizer.load_state_dict(saved["optimizers"][name])
        except (ValueError, KeyError) as exc:
            raise FirekitError(f"{path}: {name} optimiser state does not fit the model ({exc})") from None

    saved_config = saved["train"]
    changed = sorted(
        k for k, v in config.to_dict().items() if k not in _FREE_ON_RESUME and saved_config.get(k, v) != v
    )
    if saved.get("data", data) != data:
        changed.append("data")
    if changed:
        warnings.warn(
            f"resuming {run_dir} with changed {', '.join(changed)}: the run will differ from an uninterrupted one",
            stacklevel=3,
        )
        _apply_rates(optimizers, config)

    rng = saved.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return _RunState(
        step=step, saved_step=step, seconds=float(saved.get("seconds", 0.0)), losses=dict(saved.get("losses", {})),
        best_val_dice=saved.get("best_val_dice"), best_step=saved.get("best_step"),
        latest_dice=saved.get("latest_dice"), saved=saved,
    )


def _apply_rates(optimizers: dict[str, torch.optim.Optimizer], config: TrainConfig) -> None:
    """Put ``config``'s rates and betas into restored optimisers (train_step redoes any warm-up ramp)."""
    rates = _rates(config)
    for name, optimizer in optimizers.items():
        for group in optimizer.param_groups:
            group["betas"] = tuple(config.betas)
            group["lr"] = rates[name]
            if "initial_lr" in group:
                group["initial_lr"] = rates[name]


class _CsvLog:
    """A CSV log flushed every row. With ``keep_until``, rows past that step are dropped first."""

    def __init__(self, path: Path, fields: list[str], keep_until: int | None = None):
        rows = []
        if keep_until is not None and path.is_file():
            with open(path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if _row_step(row) <= keep_until]
        text = io.StringIO()
        writer = csv.DictWriter(text, fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fields, restval="", extrasaction="ignore")

    def write(self, row: dict) -> None:
        self._writer.writerow(row)  # floats print as repr: they read back exactly
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _row_step(row: dict) -> int | float:
    try:
        return int(row.get("step") or "")
    except ValueError:
        return math.inf


# -------------------------------------------------------------------------------------- batches
def _batch_tensor(batch: dict, key: str, where: str, device: torch.device,
                  memory_format: torch.memory_format | None = None) -> torch.Tensor:
    if not isinstance(batch, dict) or key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise FirekitError(f"{where} must give a dict with {key!r}, got {keys}")
    value = batch[key]
    if not torch.is_tensor(value):
        raise FirekitError(f"{where}[{key!r}] must be a tensor (B, 1, *spatial), got {type(value).__name__}")
    if key.startswith("labels"):
        return value.to(device=device, dtype=torch.int64)
    # Checked on the host, where the batch was drawn (on a GPU the check would wait for it).
    if value.device.type == "cpu" and value.is_floating_point() and not torch.isfinite(value).all():
        raise FirekitError(f"{where}[{key!r}] contains NaN or Inf values; clean or mask the images")
    value = value.to(device=device, dtype=torch.float32, non_blocking=True)
    return value if memory_format is None else value.contiguous(memory_format=memory_format)


def _memory_format(ndim: int) -> torch.memory_format:
    """Channels-last order of a ``(B, C, *S)`` tensor with ``ndim`` spatial axes."""
    return {2: torch.channels_last, 3: torch.channels_last_3d}[ndim]


class _Prefetch:
    """Batches of the steps ahead, drawn in worker threads while the current step runs (each batch
    is a function of its step, so the result is the same as drawing in turn); pinned for CUDA."""

    def __init__(self, source, batch_size: int, ahead: int, pin: bool, first: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.source, self.batch_size, self.ahead, self.pin = source, batch_size, max(0, int(ahead)), pin
        self.options = {} if first is None else {"first": first}  # a slice of each step's batch
        self.pool = ThreadPoolExecutor(max_workers=self.ahead) if self.ahead else None
        self.pending: dict = {}

    def _draw(self, step: int) -> dict:
        batch = self.source.sample(step, self.batch_size, **self.options)
        if self.pin and isinstance(batch, dict):
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch

    def get(self, step: int, last: int) -> dict:
        if self.pool is None:
            return self._draw(step)
        for ahead in range(step, min(step + self.ahead + 1, last)):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(self._draw, ahead)
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _draws_slices(source) -> bool:
    """Whether ``source.sample`` takes ``first`` (draws a slice of a step's batch)."""
    try:
        return "first" in inspect.signature(source.sample).parameters
    except (TypeError, ValueError):
        return False


def _default_loader_threads() -> int:
    """Threads drawing batches ahead on a GPU: the cores of this process's share, at most 8."""
    per_process = (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(2, min(8, per_process))


def _check_validation_batch(batch: dict, index: int) -> dict:
    for key in ("x_a", "x_b", "labels_a", "labels_b"):
        if not isinstance(batch, dict) or key not in batch or not torch.is_tensor(batch[key]):
            raise FirekitError(
                f"validation batch {index} needs tensors x_a, x_b, labels_a, labels_b; {key!r} is missing"
            )
    return batch


def _mean_label_dice(warped: torch.Tensor, fixed: torch.Tensor) -> list[float]:
    """Per sample, the mean Dice over the non-zero labels of either map (samples with none skipped)."""
    scores = []
    for moved, target in zip(warped.cpu(), fixed.cpu()):
        per_label = metrics.dice(moved, target)
        if per_label:
            scores.append(sum(per_label.values()) / len(per_label))
    return scores


@torch.no_grad()
def _half_resolution(x_a: torch.Tensor, x_b: torch.Tensor, targets, model: Fire):
    """Images (and target displacements) on a grid half as fine, when the network accepts it.

    :func:`firekit.registration.refine.downsample` keeps the normalised extent, so normalised displacements
    stay valid as they are.
    """
    from firekit.registration.refine import downsample

    shape = tuple(s // 2 for s in x_a.shape[2:])
    if any(s % model.size_multiple or s < model.min_size for s in shape):
        return x_a, x_b, targets
    if targets is not None:
        targets = tuple(spatial.resize_displacement(t, shape) for t in targets)
    return downsample(x_a, 2, shape), downsample(x_b, 2, shape), targets


def _refinement_targets(x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacements A->B and B->A found by :func:`firekit.registration.refine.refine` (its preset), both directions batched."""
    from firekit.registration.refine import refine

    batch = x_a.shape[0]
    result = refine(torch.cat([x_a, x_b])[:, :1].float(), torch.cat([x_b, x_a])[:, :1].float())
    displacement = result.displacement.to(x_a.dtype)
    return displacement[:batch], displacement[batch:]


def _validate(model: Fire, batches: list[dict], device: torch.device) -> dict[str, float]:
    """Mean label Dice of A warped onto B (a2b) and B onto A (b2a), in eval mode."""
    model.eval()
    scores: dict[str, list[float]] = {"a2b": [], "b2a": []}
    for i, batch in enumerate(batches):
        x_a, x_b, labels_a, labels_b = (
            _batch_tensor(batch, key, f"validation batch {i}", device) for key in ("x_a", "x_b", "labels_a", "labels_b")
        )
        for direction, moving, fixed, moving_labels, fixed_labels in (
            ("a2b", x_a, x_b, labels_a, labels_b),
            ("b2a", x_b, x_a, labels_b, labels_a),
        ):
            start = network_start(model.config, moving, fixed, direction)
            displacement = model.register(moving, fixed, direction, theta0=start).displacement
            scores[direction] += _mean_label_dice(spatial.warp_labels(moving_labels, displacement), fixed_labels)
    model.train()
    mean = {k: sum(v) / len(v) if v else math.nan for k, v in scores.items()}
    return {"dice_a2b": mean["a2b"], "dice_b2a": mean["b2a"], "dice_mean": (mean["a2b"] + mean["b2a"]) / 2}
